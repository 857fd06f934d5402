// Package abi is a small hand-written binding to the Proxy-Wasm ABI 0.2.1,
// shared by the wasmgate test plugins. It covers only what the tests use.
//
// Importing this package exports proxy_abi_version_0_2_1 and
// proxy_on_memory_allocate from the module; each plugin exports its own
// proxy_on_* callbacks.
package abi

import (
	"encoding/binary"
	"unsafe"
)

// Status is the result code every host function returns.
type Status uint32

const (
	OK          Status = 0
	NotFound    Status = 1
	BadArgument Status = 2
)

// Action is what a stream callback tells the host to do next.
type Action = uint32

const (
	Continue Action = 0
	Pause    Action = 1
)

// MapType selects a header map.
type MapType uint32

const (
	RequestHeaders   MapType = 0
	RequestTrailers  MapType = 1
	ResponseHeaders  MapType = 2
	ResponseTrailers MapType = 3
)

// BufferType selects a byte buffer.
type BufferType uint32

const (
	RequestBody         BufferType = 0
	ResponseBody        BufferType = 1
	VMConfiguration     BufferType = 6
	PluginConfiguration BufferType = 7
)

// StreamType selects the direction for ContinueStream.
type StreamType uint32

const (
	StreamRequest  StreamType = 0
	StreamResponse StreamType = 1
)

// LogLevel is a proxy_log level.
type LogLevel uint32

const (
	LogTrace    LogLevel = 0
	LogDebug    LogLevel = 1
	LogInfo     LogLevel = 2
	LogWarn     LogLevel = 3
	LogError    LogLevel = 4
	LogCritical LogLevel = 5
)

// Host functions. Pointers are i32 offsets into this module's memory.

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, msgSize uint32) uint32

//go:wasmimport env proxy_get_log_level
func proxyGetLogLevel(retLevel unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, retValue unsafe.Pointer, retValueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_get_header_map_pairs
func proxyGetHeaderMapPairs(mapType uint32, retPairs unsafe.Pointer, retPairsSize unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_replace_header_map_value
func proxyReplaceHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_remove_header_map_value
func proxyRemoveHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(bufferType uint32, start uint32, length uint32, retData unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(statusCode uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

//go:wasmimport env proxy_continue_stream
func proxyContinueStream(streamType uint32) uint32

//go:wasmimport env proxy_set_buffer_bytes
func proxySetBufferBytes(bufferType uint32, start uint32, length uint32, data unsafe.Pointer, size uint32) uint32

//go:wasmimport env proxy_set_tick_period_milliseconds
func proxySetTickPeriodMilliseconds(millis uint32) uint32

//go:wasmimport env proxy_set_effective_context
func proxySetEffectiveContext(contextID uint32) uint32

//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

// pending holds buffers handed to the host by proxy_on_memory_allocate until
// a wrapper below claims them. Referencing them here is what stops Go's GC
// from freeing memory the host is still writing into.
var pending = map[uint32][]byte{}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) uint32 {
	buf := make([]byte, max(size, 1)) // never hand out a zero-length (shared) address
	addr := uint32(uintptr(unsafe.Pointer(&buf[0])))
	pending[addr] = buf[:size]
	return addr
}

// claim takes ownership of a host-filled buffer. Anything still pending
// afterwards is stale (left by a failed host call) and dropped by the next
// call to hostAlloc.
func claim(addr, size uint32) ([]byte, bool) {
	if addr == 0 && size == 0 {
		return nil, true // the host may skip allocating for empty results
	}
	buf, ok := pending[addr]
	delete(pending, addr)
	if !ok || uint32(len(buf)) < size {
		return nil, false
	}
	return buf[:size], true
}

// hostAlloc starts a host call that returns memory. The ABI is
// single-threaded and never re-enters the guest except for allocation, so
// nothing pending at this point can still be in use.
func hostAlloc() { clear(pending) }

func strPtr(s string) unsafe.Pointer { return unsafe.Pointer(unsafe.StringData(s)) }

func bytesPtr(b []byte) unsafe.Pointer { return unsafe.Pointer(unsafe.SliceData(b)) }

// Log writes msg to the host log.
func Log(level LogLevel, msg string) {
	proxyLog(uint32(level), strPtr(msg), uint32(len(msg)))
}

// GetLogLevel returns the host's current log level.
func GetLogLevel() (LogLevel, Status) {
	var level uint32
	st := Status(proxyGetLogLevel(unsafe.Pointer(&level)))
	return LogLevel(level), st
}

// GetHeader returns the value of key in the given map.
func GetHeader(m MapType, key string) (string, Status) {
	hostAlloc()
	var addr, size uint32
	st := Status(proxyGetHeaderMapValue(uint32(m), strPtr(key), uint32(len(key)), unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return "", st
	}
	b, ok := claim(addr, size)
	if !ok {
		return "", BadArgument
	}
	return string(b), OK
}

// GetHeaders returns all pairs of the given map, in host order.
func GetHeaders(m MapType) ([][2]string, Status) {
	hostAlloc()
	var addr, size uint32
	st := Status(proxyGetHeaderMapPairs(uint32(m), unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return nil, st
	}
	b, ok := claim(addr, size)
	if !ok {
		return nil, BadArgument
	}
	pairs, ok := DecodePairs(b)
	if !ok {
		return nil, BadArgument
	}
	return pairs, OK
}

// AddHeader appends a value for key, keeping existing ones.
func AddHeader(m MapType, key, value string) Status {
	return Status(proxyAddHeaderMapValue(uint32(m), strPtr(key), uint32(len(key)), strPtr(value), uint32(len(value))))
}

// ReplaceHeader sets key to value, replacing any existing values.
func ReplaceHeader(m MapType, key, value string) Status {
	return Status(proxyReplaceHeaderMapValue(uint32(m), strPtr(key), uint32(len(key)), strPtr(value), uint32(len(value))))
}

// RemoveHeader deletes every value of key.
func RemoveHeader(m MapType, key string) Status {
	return Status(proxyRemoveHeaderMapValue(uint32(m), strPtr(key), uint32(len(key))))
}

// GetBuffer returns up to length bytes of a buffer starting at start.
func GetBuffer(b BufferType, start, length uint32) ([]byte, Status) {
	hostAlloc()
	var addr, size uint32
	st := Status(proxyGetBufferBytes(uint32(b), start, length, unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return nil, st
	}
	data, ok := claim(addr, size)
	if !ok {
		return nil, BadArgument
	}
	return data, OK
}

// SetBuffer replaces length bytes at start with data (Envoy's rules: start 0
// replaces the front, start >= size appends).
func SetBuffer(b BufferType, start, length uint32, data []byte) Status {
	return Status(proxySetBufferBytes(uint32(b), start, length, bytesPtr(data), uint32(len(data))))
}

// SetTickPeriod asks for proxy_on_tick every millis milliseconds (root context only).
func SetTickPeriod(millis uint32) Status {
	return Status(proxySetTickPeriodMilliseconds(millis))
}

// SetEffectiveContext makes later host calls act on another context.
func SetEffectiveContext(ctxID uint32) Status {
	return Status(proxySetEffectiveContext(ctxID))
}

// SendLocalResponse answers the request from the plugin. grpcStatus -1
// means "not a gRPC response".
func SendLocalResponse(status uint32, details string, body []byte, headers [][2]string, grpcStatus int32) Status {
	hdrs := EncodePairs(headers)
	return Status(proxySendLocalResponse(status,
		strPtr(details), uint32(len(details)),
		bytesPtr(body), uint32(len(body)),
		bytesPtr(hdrs), uint32(len(hdrs)),
		grpcStatus))
}

// ContinueStream resumes a stream paused by a previous callback.
func ContinueStream(s StreamType) Status {
	return Status(proxyContinueStream(uint32(s)))
}

// EncodePairs serializes pairs as the ABI expects: u32 count, then a
// (u32 key length, u32 value length) per pair, then each key and value
// followed by a NUL byte. Integers are little-endian.
func EncodePairs(pairs [][2]string) []byte {
	if len(pairs) == 0 {
		return nil
	}
	n := 4 + 8*len(pairs)
	for _, p := range pairs {
		n += len(p[0]) + len(p[1]) + 2
	}
	b := make([]byte, 0, n)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(pairs)))
	for _, p := range pairs {
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p[0])))
		b = binary.LittleEndian.AppendUint32(b, uint32(len(p[1])))
	}
	for _, p := range pairs {
		b = append(b, p[0]...)
		b = append(b, 0)
		b = append(b, p[1]...)
		b = append(b, 0)
	}
	return b
}

// DecodePairs is the inverse of EncodePairs. It reports false on malformed
// input.
func DecodePairs(b []byte) ([][2]string, bool) {
	if len(b) == 0 {
		return nil, true
	}
	if len(b) < 4 {
		return nil, false
	}
	count := uint64(binary.LittleEndian.Uint32(b))
	if 4+8*count > uint64(len(b)) {
		return nil, false
	}
	sizes := b[4 : 4+8*count]
	data := b[4+8*count:]
	pairs := make([][2]string, 0, count)
	for i := range count {
		klen := uint64(binary.LittleEndian.Uint32(sizes[8*i:]))
		vlen := uint64(binary.LittleEndian.Uint32(sizes[8*i+4:]))
		if klen+vlen+2 > uint64(len(data)) || data[klen] != 0 || data[klen+1+vlen] != 0 {
			return nil, false
		}
		pairs = append(pairs, [2]string{string(data[:klen]), string(data[klen+1 : klen+1+vlen])})
		data = data[klen+vlen+2:]
	}
	return pairs, true
}
