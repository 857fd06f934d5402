package abi

import "unsafe"

// Buffers and stream types of network (TCP) plugins.
const (
	DownstreamData BufferType = 2
	UpstreamData   BufferType = 3

	StreamDownstream StreamType = 2
	StreamUpstream   StreamType = 3
)

//go:wasmimport env proxy_close_stream
func proxyCloseStream(streamType uint32) uint32

//go:wasmimport env proxy_get_buffer_status
func proxyGetBufferStatus(bufferType uint32, retSize unsafe.Pointer, retFlags unsafe.Pointer) uint32

// CloseStream closes a stream; for a TCP connection either type closes it.
func CloseStream(s StreamType) Status {
	return Status(proxyCloseStream(uint32(s)))
}

// GetBufferSize returns the size of a buffer.
func GetBufferSize(b BufferType) (uint32, Status) {
	var size, flags uint32
	st := Status(proxyGetBufferStatus(uint32(b), unsafe.Pointer(&size), unsafe.Pointer(&flags)))
	return size, st
}
