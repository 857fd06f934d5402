// Command resize is a wasmgate test plugin that changes body sizes with
// proxy_set_buffer_bytes, to check the framing of what leaves the proxy.
//
// Request headers choose what it does (read in on_request_headers):
//
//   - x-resize-req: OP  changes the request body; x-resize-resp: OP the response body.
//     OP is append (adds "+appended"), prepend (adds "prepended+" in front),
//     replace (the whole body becomes "replaced"), shrink (keeps the first half)
//     or empty (removes the body).
//   - x-resize-mode: buffer (default) holds the body until its end (Pause) and
//     changes it whole; stream changes every chunk as it passes.
//   - x-resize-hold: headers pauses in on_request_headers (and in
//     on_response_headers for x-resize-resp) and continues from proxy_on_tick, so the
//     headers wait for the plugin while the body is buffered.
//   - x-resize-drop-length: 1 removes content-length in the headers callback of each
//     direction it changes, as the SDK examples advise for Envoy (which never fixes it).
package main

import (
	"bytes"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

type stream struct {
	req, resp, mode  string
	hold, dropLength bool
}

var (
	streams = map[uint32]*stream{}
	held    []heldStream // streams paused in a headers callback, continued on the next tick
)

type heldStream struct {
	ctx uint32
	dir abi.StreamType
}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_vm_start
func onVMStart(rootID, size uint32) uint32 {
	abi.SetTickPeriod(5)
	return 1
}

//go:wasmexport proxy_on_tick
func onTick(rootID uint32) {
	for _, h := range held {
		if abi.SetEffectiveContext(h.ctx) == abi.OK {
			abi.ContinueStream(h.dir)
		}
	}
	held = held[:0]
}

func header(name string) string {
	v, _ := abi.GetHeader(abi.RequestHeaders, name)
	return v
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	s := &stream{req: header("x-resize-req"), resp: header("x-resize-resp"), mode: header("x-resize-mode"),
		hold: header("x-resize-hold") == "headers", dropLength: header("x-resize-drop-length") == "1"}
	streams[ctxID] = s
	if s.dropLength && s.req != "" {
		abi.RemoveHeader(abi.RequestHeaders, "content-length")
	}
	if s.hold && s.req != "" {
		held = append(held, heldStream{ctxID, abi.StreamRequest})
		return abi.Pause
	}
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	s := streams[ctxID]
	if s != nil && s.dropLength && s.resp != "" {
		abi.RemoveHeader(abi.ResponseHeaders, "content-length")
	}
	if s != nil && s.hold && s.resp != "" {
		held = append(held, heldStream{ctxID, abi.StreamResponse})
		return abi.Pause
	}
	return abi.Continue
}

func change(buf abi.BufferType, op string, size uint32) {
	switch op {
	case "append":
		abi.SetBuffer(buf, size, 0, []byte("+appended"))
	case "prepend":
		abi.SetBuffer(buf, 0, 0, []byte("prepended+"))
	case "replace":
		abi.SetBuffer(buf, 0, size, []byte("replaced"))
	case "shrink":
		body, _ := abi.GetBuffer(buf, 0, size)
		abi.SetBuffer(buf, 0, size, bytes.Clone(body[:len(body)/2]))
	case "empty":
		abi.SetBuffer(buf, 0, size, nil)
	}
}

func onBody(buf abi.BufferType, op, mode string, size, endOfStream uint32) abi.Action {
	if op == "" {
		return abi.Continue
	}
	if mode == "stream" {
		if size > 0 {
			change(buf, op, size)
		}
		return abi.Continue
	}
	if endOfStream == 0 {
		return abi.Pause // buffer: the last call sees the whole body
	}
	change(buf, op, size)
	return abi.Continue
}

//go:wasmexport proxy_on_request_body
func onRequestBody(ctxID, size, endOfStream uint32) abi.Action {
	s := streams[ctxID]
	if s == nil {
		return abi.Continue
	}
	return onBody(abi.RequestBody, s.req, s.mode, size, endOfStream)
}

//go:wasmexport proxy_on_response_body
func onResponseBody(ctxID, size, endOfStream uint32) abi.Action {
	s := streams[ctxID]
	if s == nil {
		return abi.Continue
	}
	return onBody(abi.ResponseBody, s.resp, s.mode, size, endOfStream)
}

//go:wasmexport proxy_on_delete
func onDelete(ctxID uint32) {
	delete(streams, ctxID)
}
