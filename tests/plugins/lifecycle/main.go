// Command lifecycle is a wasmgate test plugin that logs, at INFO, every
// Proxy-Wasm callback it receives together with its arguments, and always
// lets processing continue. Tests compare the log against the expected
// callback sequence. It also counts requests (counter lifecycle_requests), streams in
// flight (gauge lifecycle_active) and request body bytes (counter lifecycle_body_bytes),
// so the differential tests compare metrics too.
package main

import (
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

func logf(callback string, ctxID uint32, args ...string) {
	msg := "lifecycle: " + callback + " ctx=" + itoa(ctxID)
	for i := 0; i+1 < len(args); i += 2 {
		msg += " " + args[i] + "=" + args[i+1]
	}
	abi.Log(abi.LogInfo, msg)
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

var requests, active, bodyBytes uint32

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {
	logf("on_context_create", ctxID, "parent", itoa(parentID))
	if parentID != 0 {
		abi.IncrementMetric(active, 1)
	}
}

//go:wasmexport proxy_on_vm_start
func onVMStart(rootID, vmConfigSize uint32) uint32 {
	logf("on_vm_start", rootID, "vm_config_size", itoa(vmConfigSize))
	return 1
}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, configSize uint32) uint32 {
	logf("on_configure", rootID, "config_size", itoa(configSize))
	requests, _ = abi.DefineMetric(abi.Counter, "lifecycle_requests")
	active, _ = abi.DefineMetric(abi.Gauge, "lifecycle_active")
	bodyBytes, _ = abi.DefineMetric(abi.Counter, "lifecycle_body_bytes")
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	logf("on_request_headers", ctxID, "headers", itoa(numHeaders), "eos", itoa(endOfStream))
	abi.IncrementMetric(requests, 1)
	return abi.Continue
}

//go:wasmexport proxy_on_request_body
func onRequestBody(ctxID, bodySize, endOfStream uint32) abi.Action {
	logf("on_request_body", ctxID, "size", itoa(bodySize), "eos", itoa(endOfStream))
	if endOfStream != 0 && bodySize > 0 {
		abi.IncrementMetric(bodyBytes, int64(bodySize))
	}
	return abi.Continue
}

//go:wasmexport proxy_on_request_trailers
func onRequestTrailers(ctxID, numTrailers uint32) abi.Action {
	logf("on_request_trailers", ctxID, "trailers", itoa(numTrailers))
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	logf("on_response_headers", ctxID, "headers", itoa(numHeaders), "eos", itoa(endOfStream))
	return abi.Continue
}

//go:wasmexport proxy_on_response_body
func onResponseBody(ctxID, bodySize, endOfStream uint32) abi.Action {
	logf("on_response_body", ctxID, "size", itoa(bodySize), "eos", itoa(endOfStream))
	return abi.Continue
}

//go:wasmexport proxy_on_response_trailers
func onResponseTrailers(ctxID, numTrailers uint32) abi.Action {
	logf("on_response_trailers", ctxID, "trailers", itoa(numTrailers))
	return abi.Continue
}

//go:wasmexport proxy_on_done
func onDone(ctxID uint32) uint32 {
	logf("on_done", ctxID)
	return 1
}

//go:wasmexport proxy_on_log
func onLog(ctxID uint32) {
	logf("on_log", ctxID)
}

//go:wasmexport proxy_on_delete
func onDelete(ctxID uint32) {
	logf("on_delete", ctxID)
	if ctxID != 1 {
		abi.IncrementMetric(active, -1)
	}
}
