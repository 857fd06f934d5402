# ruff: noqa: E501  (Go source inside strings)
"""Files ``wasmgate new`` writes. ``__NAME__`` is the plugin name, ``__METRIC__`` its counter."""

GO_MOD = """module example.com/__NAME__

go 1.24
"""

MAIN_GO = r'''// Command __NAME__ is a Proxy-Wasm plugin, scaffolded by `wasmgate new`.
//
// It counts requests (metric __METRIC__), answers 403 itself for paths under
// the configured prefix (default /admin), marks the requests it lets through
// with the request header x-__NAME__, and tags responses with x-powered-by.
//
// It is written against the raw Proxy-Wasm ABI 0.2.1 with //go:wasmimport and
// //go:wasmexport, self-contained in this file, and builds with plain Go >= 1.24:
//
//	wasmgate build          # GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o plugin.wasm
//	wasmgate test spec.yaml
package main

import (
	"encoding/binary"
	"encoding/json"
	"strings"
	"unsafe"
)

// A c-shared module never runs main; the host calls _initialize instead.
func main() {}

type pluginConfig struct {
	DenyPrefix string `json:"deny_prefix"` // paths starting with this get 403
}

var config = pluginConfig{DenyPrefix: "/admin"}

var requestsMetric uint32 // id of the __METRIC__ counter

// ---- Plugin logic --------------------------------------------------------

//go:wasmexport proxy_on_configure
func onConfigure(rootContextID, configSize uint32) uint32 {
	cfg := pluginConfig{DenyPrefix: "/admin"}
	if configSize > 0 {
		data, ok := getBuffer(bufferPluginConfiguration, configSize)
		if !ok || json.Unmarshal(data, &cfg) != nil {
			logMsg(logError, "__NAME__: invalid plugin configuration: "+string(data))
			return 0 // refuse it: the plugin fails closed rather than guess
		}
	}
	config = cfg
	name := "__METRIC__"
	if proxyDefineMetric(metricCounter, unsafe.Pointer(unsafe.StringData(name)), uint32(len(name)),
		unsafe.Pointer(&requestsMetric)) != statusOK {
		logMsg(logError, "__NAME__: cannot define metric "+name)
		return 0
	}
	logMsg(logInfo, "__NAME__: configured: deny_prefix="+config.DenyPrefix)
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	proxyIncrementMetric(requestsMetric, 1)
	path, _ := getHeader(mapRequestHeaders, ":path")
	if config.DenyPrefix != "" && strings.HasPrefix(path, config.DenyPrefix) {
		logMsg(logInfo, "__NAME__: denied "+path)
		sendLocalResponse(403, "__NAME___denied", "forbidden by __NAME__\n",
			[][2]string{{"x-denied-by", "__NAME__"}})
		return actionPause // the host answers the client itself
	}
	logMsg(logDebug, "__NAME__: allowed "+path)
	addHeader(mapRequestHeaders, "x-__NAME__", "seen")
	return actionContinue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(contextID, numHeaders, endOfStream uint32) uint32 {
	addHeader(mapResponseHeaders, "x-powered-by", "__NAME__")
	return actionContinue
}

// The host announces every context: the root context (parent 0) and one per
// request. This plugin keeps no per-request state.
//
//go:wasmexport proxy_on_context_create
func onContextCreate(contextID, parentContextID uint32) {}

// ---- Proxy-Wasm ABI 0.2.1 glue -------------------------------------------

const (
	actionContinue = 0
	actionPause    = 1

	mapRequestHeaders         = 0
	mapResponseHeaders        = 2
	bufferPluginConfiguration = 7
	metricCounter             = 0

	logDebug = 1
	logInfo  = 2
	logError = 4

	statusOK = 0
)

//go:wasmexport proxy_abi_version_0_2_1
func abiVersion() {}

//go:wasmimport env proxy_log
func proxyLog(level uint32, msg unsafe.Pointer, msgSize uint32) uint32

//go:wasmimport env proxy_get_header_map_value
func proxyGetHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, retValue, retValueSize unsafe.Pointer) uint32

//go:wasmimport env proxy_add_header_map_value
func proxyAddHeaderMapValue(mapType uint32, key unsafe.Pointer, keySize uint32, value unsafe.Pointer, valueSize uint32) uint32

//go:wasmimport env proxy_get_buffer_bytes
func proxyGetBufferBytes(bufferType, start, length uint32, retData, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_send_local_response
func proxySendLocalResponse(statusCode uint32, details unsafe.Pointer, detailsSize uint32, body unsafe.Pointer, bodySize uint32, headers unsafe.Pointer, headersSize uint32, grpcStatus int32) uint32

//go:wasmimport env proxy_define_metric
func proxyDefineMetric(metricType uint32, name unsafe.Pointer, nameSize uint32, retID unsafe.Pointer) uint32

//go:wasmimport env proxy_increment_metric
func proxyIncrementMetric(metricID uint32, offset int64) uint32

// hostBuffers keeps memory handed to the host by proxy_on_memory_allocate
// alive (away from Go's garbage collector) until we have read it.
var hostBuffers = map[uint32][]byte{}

//go:wasmexport proxy_on_memory_allocate
func onMemoryAllocate(size uint32) uint32 {
	buf := make([]byte, max(size, 1))
	ptr := uint32(uintptr(unsafe.Pointer(&buf[0])))
	hostBuffers[ptr] = buf[:size]
	return ptr
}

func takeHostBuffer(ptr, size uint32) ([]byte, bool) {
	if size == 0 {
		return nil, true
	}
	buf, ok := hostBuffers[ptr]
	delete(hostBuffers, ptr)
	if !ok || uint32(len(buf)) < size {
		return nil, false
	}
	return buf[:size], true
}

func strPtr(s string) unsafe.Pointer { return unsafe.Pointer(unsafe.StringData(s)) }

func logMsg(level uint32, msg string) { proxyLog(level, strPtr(msg), uint32(len(msg))) }

func getHeader(mapType uint32, name string) (string, bool) {
	clear(hostBuffers)
	var ptr, size uint32
	if proxyGetHeaderMapValue(mapType, strPtr(name), uint32(len(name)),
		unsafe.Pointer(&ptr), unsafe.Pointer(&size)) != statusOK {
		return "", false
	}
	value, ok := takeHostBuffer(ptr, size)
	return string(value), ok
}

func addHeader(mapType uint32, name, value string) {
	if proxyAddHeaderMapValue(mapType, strPtr(name), uint32(len(name)), strPtr(value), uint32(len(value))) != statusOK {
		logMsg(logError, "__NAME__: cannot add header "+name)
	}
}

func getBuffer(bufferType, size uint32) ([]byte, bool) {
	clear(hostBuffers)
	var ptr, n uint32
	if proxyGetBufferBytes(bufferType, 0, size, unsafe.Pointer(&ptr), unsafe.Pointer(&n)) != statusOK {
		return nil, false
	}
	return takeHostBuffer(ptr, n)
}

func sendLocalResponse(status uint32, details, body string, headers [][2]string) {
	pairs := encodePairs(headers)
	if proxySendLocalResponse(status, strPtr(details), uint32(len(details)), strPtr(body), uint32(len(body)),
		unsafe.Pointer(unsafe.SliceData(pairs)), uint32(len(pairs)), -1) != statusOK {
		logMsg(logError, "__NAME__: proxy_send_local_response failed")
	}
}

// encodePairs serializes headers as the ABI expects: a u32 count, a (key
// length, value length) u32 pair per header, then each key and value + NUL.
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
'''

SPEC_YAML = """# Test cases for __NAME__: `wasmgate test spec.yaml` runs them in-process,
# `wasmgate test spec.yaml --against envoy` also through Envoy.
plugin: plugin.wasm
name: __NAME__
root_id: __NAME__
config: {deny_prefix: /admin}
cases:
  - name: lets ordinary requests through and tags them
    request: {method: GET, path: /hello, headers: {user-agent: spec}}
    response: {status: 200, headers: {content-type: text/plain}, body: "hi\\n"}
    expect:
      actions: {request_headers: continue, response_headers: continue}
      immediate_response: false
      upstream:
        reached: true
        headers: {equal: {x-__NAME__: seen, user-agent: spec}}
      response:
        status: 200
        headers: {equal: {x-powered-by: __NAME__}}
        body: "hi\\n"
      logs: ["debug __NAME__: allowed /hello"]
      metrics: {__METRIC__: 1}

  - name: answers 403 under the deny prefix
    request: {path: /admin/users}
    expect:
      actions: {request_headers: pause}
      immediate_response: {status: 403, body: "forbidden by __NAME__\\n", headers: {equal: {x-denied-by: __NAME__}}}
      upstream: {reached: false}
      response: {status: 403, body_regex: "^forbidden"}
      logs: ["info __NAME__: denied /admin/users"]
      metrics: {__METRIC__: 1}

  - name: the prefix comes from the plugin configuration
    config: {deny_prefix: /private}
    request: {path: /admin/users}
    expect:
      immediate_response: false
      response: {status: 200}
"""

WASMPLUGIN_YAML = """# Istio WasmPlugin resource for __NAME__; wasmgate resolves file:// against this file's directory.
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: __NAME__
spec:
  url: file://plugin.wasm
  pluginName: __NAME__
  phase: AUTHZ
  failStrategy: FAIL_CLOSE
  pluginConfig:
    deny_prefix: /admin
"""

README_MD = """# __NAME__

A Proxy-Wasm plugin in Go, scaffolded by `wasmgate new`. `main.go` is the whole plugin,
written against the raw Proxy-Wasm ABI (`//go:wasmimport` / `//go:wasmexport`), so it
needs no SDK and builds with plain Go >= 1.24.

```sh
wasmgate build                              # -> plugin.wasm
wasmgate test spec.yaml                     # the cases in spec.yaml, in-process
wasmgate test spec.yaml --against envoy     # the same cases through Envoy too
wasmgate bench plugin.wasm --spec spec.yaml # per-phase latency, memory growth, leak verdict
wasmgate run --plugins wasmplugin.yaml --log-level wasm=debug
```

What it does: counts requests in the metric `__METRIC__`, answers 403 for paths under
`deny_prefix` (plugin configuration, default `/admin`), adds `x-__NAME__: seen` to the
requests it lets through and `x-powered-by: __NAME__` to responses.

Ship it: `wasmgate push plugin.wasm REGISTRY/plugins/__NAME__:v1`, then point the
`url:` of `wasmplugin.yaml` at `oci://REGISTRY/plugins/__NAME__:v1`.
"""
