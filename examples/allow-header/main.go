// Command allow-header is a minimal Proxy-Wasm plugin for wasmgate: it lets
// a request through only if it carries the header "allow: true", and answers
// everything else with 403 itself.
//
// It is written against the raw Proxy-Wasm ABI 0.2.1 with no SDK, so that
// everything between the host and the plugin is visible in this file. Build
// it with scripts/build-plugins.sh, or by hand:
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o plugin.wasm
//
// The header name and the expected value can be changed with the plugin
// configuration, e.g. {"header": "x-let-me-in", "value": "yes"}.
package main

import (
	"encoding/binary"
	"encoding/json"
	"strings"
	"unsafe"
)

// A c-shared module never runs main; the host calls _initialize instead.
func main() {}

// pluginConfig is the plugin configuration, given as JSON. Fields that are
// left out keep their default.
type pluginConfig struct {
	Header string `json:"header"` // request header to check
	Value  string `json:"value"`  // value it must have
}

var defaultConfig = pluginConfig{Header: "allow", Value: "true"}

// config is set when the host configures the plugin, which happens before
// any request reaches it; every request then reads it.
var config = defaultConfig

// ---- Plugin logic --------------------------------------------------------

//go:wasmexport proxy_on_configure
func onConfigure(rootContextID, configSize uint32) uint32 {
	cfg := defaultConfig
	if configSize > 0 {
		data, ok := getBuffer(bufferPluginConfiguration, configSize)
		if !ok {
			logMsg(logError, "allow-header: cannot read plugin configuration")
			return 0
		}
		// Returning 0 rejects the configuration: the plugin fails closed
		// rather than guessing what was meant.
		if err := json.Unmarshal(data, &cfg); err != nil {
			logMsg(logError, "allow-header: invalid plugin configuration: "+err.Error())
			return 0
		}
		if cfg.Header == "" {
			logMsg(logError, `allow-header: invalid plugin configuration: "header" is empty`)
			return 0
		}
		// Header names are case-insensitive; proxies hand them to plugins
		// lowercased.
		cfg.Header = strings.ToLower(cfg.Header)
	}
	config = cfg
	logMsg(logInfo, "allow-header: configured: header="+config.Header+" value="+config.Value)
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	value, found := getRequestHeader(config.Header)
	if found && value == config.Value {
		logMsg(logDebug, "allow-header: allowed request")
		return actionContinue
	}

	seen := "<missing>"
	if found {
		seen = value
	}
	logMsg(logDebug, "allow-header: denied request: header "+config.Header+"="+seen)
	if !sendLocalResponse(403, "access_denied", "access denied\n",
		[][2]string{{"x-wasmgate-denied", "allow-header"}}) {
		logMsg(logError, "allow-header: proxy_send_local_response failed")
	}
	// The host now answers the client itself; stop passing the request on.
	return actionPause
}

// The host announces every new context: the plugin's root context
// (parentContextID 0) and one per HTTP request. This plugin keeps no
// per-request state, so there is nothing to set up.
//
//go:wasmexport proxy_on_context_create
func onContextCreate(contextID, parentContextID uint32) {}

// ---- Proxy-Wasm ABI 0.2.1 glue -------------------------------------------

// Values defined by the ABI.
const (
	actionContinue = 0
	actionPause    = 1

	mapRequestHeaders         = 0
	bufferPluginConfiguration = 7

	logDebug = 1
	logInfo  = 2
	logError = 4

	statusOK = 0
)

// The host tells the proxy which ABI version this module implements by the
// presence of this (empty) export.
//
//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

// Host functions. Pointers are i32 offsets into this module's memory; every
// function returns a status code.

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, msgSize uint32) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, retValue, retValueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(bufferType, start, length uint32, retData, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(statusCode uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

// hostBuffers holds the memory handed to the host by
// proxy_on_memory_allocate until we have read what the host wrote there.
// Keeping a reference is what stops Go's garbage collector from reusing it.
var hostBuffers = map[uint32][]byte{}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) uint32 {
	buf := make([]byte, max(size, 1)) // size 0 still gets its own address
	ptr := uint32(uintptr(unsafe.Pointer(&buf[0])))
	hostBuffers[ptr] = buf[:size]
	return ptr
}

// takeHostBuffer returns the buffer the host filled at ptr and releases it.
func takeHostBuffer(ptr, size uint32) ([]byte, bool) {
	if size == 0 {
		return nil, true
	}
	buf, ok := hostBuffers[ptr]
	delete(hostBuffers, ptr)
	if !ok || uint32(len(buf)) < size {
		return nil, false // not memory we handed out
	}
	return buf[:size], true
}

func logMsg(level uint32, msg string) {
	proxyLog(level, unsafe.Pointer(unsafe.StringData(msg)), uint32(len(msg)))
}

func getRequestHeader(name string) (string, bool) {
	clear(hostBuffers) // anything left over is from a failed call
	var ptr, size uint32
	status := proxyGetHeaderMapValue(mapRequestHeaders,
		unsafe.Pointer(unsafe.StringData(name)), uint32(len(name)),
		unsafe.Pointer(&ptr), unsafe.Pointer(&size))
	if status != statusOK {
		return "", false
	}
	value, ok := takeHostBuffer(ptr, size)
	return string(value), ok
}

func getBuffer(bufferType, size uint32) ([]byte, bool) {
	clear(hostBuffers)
	var ptr, n uint32
	if proxyGetBufferBytes(bufferType, 0, size, unsafe.Pointer(&ptr), unsafe.Pointer(&n)) != statusOK {
		return nil, false
	}
	return takeHostBuffer(ptr, n)
}

func sendLocalResponse(status uint32, details, body string, headers [][2]string) bool {
	pairs := encodePairs(headers)
	return statusOK == proxySendLocalResponse(status,
		unsafe.Pointer(unsafe.StringData(details)), uint32(len(details)),
		unsafe.Pointer(unsafe.StringData(body)), uint32(len(body)),
		unsafe.Pointer(unsafe.SliceData(pairs)), uint32(len(pairs)),
		-1) // -1: not a gRPC response
}

// encodePairs serializes headers the way the ABI expects: a little-endian
// u32 count, then a (key length, value length) u32 pair per header, then
// every key and value followed by a NUL byte.
func encodePairs(headers [][2]string) []byte {
	buf := binary.LittleEndian.AppendUint32(nil, uint32(len(headers)))
	for _, h := range headers {
		buf = binary.LittleEndian.AppendUint32(buf, uint32(len(h[0])))
		buf = binary.LittleEndian.AppendUint32(buf, uint32(len(h[1])))
	}
	for _, h := range headers {
		buf = append(append(buf, h[0]...), 0)
		buf = append(append(buf, h[1]...), 0)
	}
	return buf
}
