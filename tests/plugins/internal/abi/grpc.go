package abi

import "unsafe"

//go:wasmimport env proxy_grpc_call
func proxyGrpcCall(service unsafe.Pointer, serviceSize uint32, serviceName unsafe.Pointer, serviceNameSize uint32,
	method unsafe.Pointer, methodSize uint32, metadata unsafe.Pointer, metadataSize uint32,
	message unsafe.Pointer, messageSize uint32, timeoutMillis uint32, retToken unsafe.Pointer) uint32

//go:wasmimport env proxy_grpc_stream
func proxyGrpcStream(service unsafe.Pointer, serviceSize uint32, serviceName unsafe.Pointer, serviceNameSize uint32,
	method unsafe.Pointer, methodSize uint32, metadata unsafe.Pointer, metadataSize uint32,
	retToken unsafe.Pointer) uint32

//go:wasmimport env proxy_grpc_send
func proxyGrpcSend(token uint32, message unsafe.Pointer, messageSize uint32, endStream uint32) uint32

//go:wasmimport env proxy_grpc_cancel
func proxyGrpcCancel(token uint32) uint32

//go:wasmimport env proxy_grpc_close
func proxyGrpcClose(token uint32) uint32

//go:wasmimport env proxy_get_status
func proxyGetStatus(retCode unsafe.Pointer, retMessage unsafe.Pointer, retMessageSize unsafe.Pointer) uint32

// The metadata maps and the message buffer of a gRPC callout, readable in the
// matching proxy_on_grpc_* callback.
const (
	GrpcReceiveInitialMetadata  MapType    = 4
	GrpcReceiveTrailingMetadata MapType    = 5
	GrpcReceiveBuffer           BufferType = 5
)

// GrpcCall sends one request message to service/method on the gRPC service
// named by `service` (a cluster name, or a serialized GrpcService). The
// answer comes to proxy_on_grpc_receive, or proxy_on_grpc_close on failure.
func GrpcCall(service, serviceName, method string, metadata [][2]string, message []byte,
	timeoutMillis uint32) (uint32, Status) {
	md := EncodePairs(metadata)
	var token uint32
	st := Status(proxyGrpcCall(strPtr(service), uint32(len(service)), strPtr(serviceName), uint32(len(serviceName)),
		strPtr(method), uint32(len(method)), bytesPtr(md), uint32(len(md)), bytesPtr(message),
		uint32(len(message)), timeoutMillis, unsafe.Pointer(&token)))
	return token, st
}

// GrpcStream opens a bidirectional stream; messages go out with GrpcSend.
func GrpcStream(service, serviceName, method string, metadata [][2]string) (uint32, Status) {
	md := EncodePairs(metadata)
	var token uint32
	st := Status(proxyGrpcStream(strPtr(service), uint32(len(service)), strPtr(serviceName), uint32(len(serviceName)),
		strPtr(method), uint32(len(method)), bytesPtr(md), uint32(len(md)), unsafe.Pointer(&token)))
	return token, st
}

// GrpcSend writes one message on a stream; endStream half-closes it.
func GrpcSend(token uint32, message []byte, endStream bool) Status {
	var end uint32
	if endStream {
		end = 1
	}
	return Status(proxyGrpcSend(token, bytesPtr(message), uint32(len(message)), end))
}

// GrpcCancel drops a call or stream; no more callbacks come for it.
func GrpcCancel(token uint32) Status { return Status(proxyGrpcCancel(token)) }

// GrpcClose closes a call (like cancel) or half-closes a stream.
func GrpcClose(token uint32) Status { return Status(proxyGrpcClose(token)) }

// GetStatus returns the gRPC status code and message (in proxy_on_grpc_close).
func GetStatus() (uint32, string, Status) {
	hostAlloc()
	var code, addr, size uint32
	st := Status(proxyGetStatus(unsafe.Pointer(&code), unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return 0, "", st
	}
	b, ok := claim(addr, size)
	if !ok {
		return code, "", BadArgument
	}
	return code, string(b), OK
}
