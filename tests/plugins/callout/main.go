// Command callout is a wasmgate test plugin for proxy_http_call.
//
// A request with header `x-user` is paused while the plugin asks the cluster
// "auth" for GET /auth/<user>. On the answer it switches to the request's
// context: 200 adds request header `x-auth: <body>` and resumes the request;
// another status answers 403 "denied: <status>" (a failed call arrives as Envoy's
// 503 or 504 response, so it is denied too); a call with no response answers 503.
// Before switching it asks for a local reply from the root context and logs the
// result (Envoy: OK, nothing happens).
package main

import (
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

// token of a call -> the stream context that waits for it
var waiting = map[uint32]uint32{}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	user, st := abi.GetHeader(abi.RequestHeaders, "x-user")
	if st != abi.OK {
		return abi.Continue
	}
	token, st := abi.HttpCall("auth", [][2]string{
		{":method", "GET"}, {":path", "/auth/" + user}, {":authority", "auth.internal"},
	}, nil, 2000)
	if st != abi.OK {
		abi.Log(abi.LogError, "callout: http_call failed status="+strconv.Itoa(int(st)))
		abi.SendLocalResponse(500, "callout_error", []byte("callout error\n"), nil, -1)
		return abi.Pause
	}
	waiting[token] = ctxID
	return abi.Pause
}

//go:wasmexport proxy_on_http_call_response
func onHttpCallResponse(ctxID, token, numHeaders, bodySize, numTrailers uint32) {
	stream, ok := waiting[token]
	if !ok {
		return
	}
	delete(waiting, token)
	st := abi.SendLocalResponse(500, "root", []byte("from root\n"), nil, -1)
	abi.Log(abi.LogInfo, "callout: local reply from root status="+strconv.Itoa(int(st)))
	abi.SetEffectiveContext(stream)
	if numHeaders == 0 {
		abi.SendLocalResponse(503, "callout_failed", []byte("callout failed\n"), nil, -1)
		return
	}
	status, _ := abi.GetHeader(abi.HttpCallResponseHeaders, ":status")
	if status != "200" {
		abi.SendLocalResponse(403, "callout_denied", []byte("denied: "+status+"\n"), nil, -1)
		return
	}
	body, _ := abi.GetBuffer(abi.HttpCallResponseBody, 0, bodySize)
	abi.ReplaceHeader(abi.RequestHeaders, "x-auth", string(body))
	abi.ContinueStream(abi.StreamRequest)
}
