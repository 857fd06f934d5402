// Command pause is a wasmgate test plugin that pauses request headers until
// the whole request body has arrived, then records the body length in the
// request header x-body-seen before letting the request continue.
//
// It checks that the host buffers the body while headers are paused and
// still accepts header mutations at that point (as Envoy does).
package main

import (
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	if endOfStream != 0 {
		setBodySeen(ctxID, "0")
		abi.Log(abi.LogInfo, "pause: no request body ctx="+itoa(ctxID)+", continuing")
		return abi.Continue
	}
	abi.Log(abi.LogInfo, "pause: pausing request headers until body ends ctx="+itoa(ctxID))
	return abi.Pause
}

//go:wasmexport proxy_on_request_body
func onRequestBody(ctxID, bodySize, endOfStream uint32) abi.Action {
	if endOfStream == 0 {
		// Pausing here asks the host to keep buffering the body.
		abi.Log(abi.LogInfo, "pause: buffering request body ctx="+itoa(ctxID)+" size="+itoa(bodySize))
		return abi.Pause
	}
	seen := "0"
	if bodySize > 0 {
		body, st := abi.GetBuffer(abi.RequestBody, 0, bodySize)
		if st != abi.OK {
			abi.Log(abi.LogError, "pause: proxy_get_buffer_bytes failed ctx="+itoa(ctxID)+" status="+itoa(uint32(st)))
			seen = "read-error"
		} else {
			seen = strconv.Itoa(len(body))
		}
	}
	setBodySeen(ctxID, seen)
	abi.Log(abi.LogInfo, "pause: request body complete ctx="+itoa(ctxID)+" size="+itoa(bodySize)+" read="+seen+", continuing")
	return abi.Continue
}

func setBodySeen(ctxID uint32, value string) {
	if st := abi.ReplaceHeader(abi.RequestHeaders, "x-body-seen", value); st != abi.OK {
		abi.Log(abi.LogError, "pause: proxy_replace_header_map_value failed ctx="+itoa(ctxID)+" status="+itoa(uint32(st)))
	}
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }
