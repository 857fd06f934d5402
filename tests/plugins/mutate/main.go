// Command mutate is a wasmgate test plugin exercising header mutation:
// it replaces request header x-replace with "replaced", and on the response
// adds x-wasm: hello and removes x-remove-me.
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
	check("replace x-replace", abi.ReplaceHeader(abi.RequestHeaders, "x-replace", "replaced"))
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	check("add x-wasm", abi.AddHeader(abi.ResponseHeaders, "x-wasm", "hello"))
	check("remove x-remove-me", abi.RemoveHeader(abi.ResponseHeaders, "x-remove-me"))
	return abi.Continue
}

func check(what string, st abi.Status) {
	if st != abi.OK {
		abi.Log(abi.LogError, "mutate: "+what+" failed status="+strconv.Itoa(int(st)))
		return
	}
	abi.Log(abi.LogDebug, "mutate: "+what)
}
