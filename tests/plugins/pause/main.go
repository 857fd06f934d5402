// Command pause is a wasmgate test plugin for stopped iteration and resumption.
//
//   - A request with header `x-pause` is paused in on_request_headers and resumed
//     from the root context's on_tick: it switches to the stream's context, sets
//     request header `x-resumed: tick` and calls proxy_continue_stream.
//   - Request bodies are buffered (Pause until end of stream), then upper-cased in
//     place with proxy_set_buffer_bytes, which keeps their length.
//   - The header callbacks read and write the body buffers before any body arrived
//     (Envoy: an empty buffer, OK; writes BAD_ARGUMENT), and on_tick first asks for a local reply from the root
//     context (Envoy: OK, nothing happens); both results are logged.
package main

import (
	"bytes"
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

var paused []uint32

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_vm_start
func onVMStart(rootID, size uint32) uint32 {
	if st := abi.SetTickPeriod(10); st != abi.OK {
		abi.Log(abi.LogError, "pause: set_tick_period failed status="+itoa(uint32(st)))
		return 0
	}
	return 1
}

//go:wasmexport proxy_on_tick
func onTick(rootID uint32) {
	if len(paused) > 0 {
		st := abi.SendLocalResponse(500, "root", []byte("from root"), nil, -1)
		abi.Log(abi.LogInfo, "pause: local reply from root status="+itoa(uint32(st)))
	}
	for _, id := range paused {
		if st := abi.SetEffectiveContext(id); st != abi.OK {
			abi.Log(abi.LogError, "pause: set_effective_context failed ctx="+itoa(id))
			continue
		}
		abi.ReplaceHeader(abi.RequestHeaders, "x-resumed", "tick")
		abi.Log(abi.LogInfo, "pause: resuming ctx="+itoa(id))
		abi.ContinueStream(abi.StreamRequest)
	}
	paused = paused[:0]
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	peekBody("request", abi.RequestBody)
	if _, st := abi.GetHeader(abi.RequestHeaders, "x-pause"); st != abi.OK {
		return abi.Continue
	}
	abi.Log(abi.LogInfo, "pause: pausing ctx="+itoa(ctxID))
	paused = append(paused, ctxID)
	return abi.Pause
}

//go:wasmexport proxy_on_request_body
func onRequestBody(ctxID, bodySize, endOfStream uint32) abi.Action {
	if endOfStream == 0 {
		return abi.Pause // buffer: the next call sees the whole body so far
	}
	body, st := abi.GetBuffer(abi.RequestBody, 0, bodySize)
	if st != abi.OK {
		abi.Log(abi.LogError, "pause: get_buffer_bytes failed status="+itoa(uint32(st)))
		return abi.Continue
	}
	abi.SetBuffer(abi.RequestBody, 0, bodySize, bytes.ToUpper(body))
	abi.Log(abi.LogInfo, "pause: body complete ctx="+itoa(ctxID)+" size="+itoa(bodySize))
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	peekBody("response", abi.ResponseBody)
	return abi.Continue
}

// peekBody logs what reading and writing a body buffer in a header callback gives.
func peekBody(what string, b abi.BufferType) {
	size, st := abi.GetBufferSize(b)
	data, bst := abi.GetBuffer(b, 0, 100)
	abi.Log(abi.LogInfo, "pause: "+what+" body in headers status="+itoa(uint32(st))+" size="+itoa(size)+
		" bytes status="+itoa(uint32(bst))+" len="+itoa(uint32(len(data)))+
		" set status="+itoa(uint32(abi.SetBuffer(b, 0, 0, []byte("x"))))+" setempty status="+itoa(uint32(abi.SetBuffer(b, 0, 0, nil))))
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }
