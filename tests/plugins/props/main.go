// Command props is a wasmgate test plugin that reports properties.
//
// Its configuration is JSON {"paths": ["request.path", "response.code"]}. Each path
// is read in on_request_headers and again in on_response_headers; the response gets
// `x-prop-req-<path>` and `x-prop-<path>` with the value in hex, or "status:<n>"
// when the read failed. It also sets the filter-state property "wasmgate_test" on
// request headers and reads it back into `x-prop-filter-state`.
package main

import (
	"encoding/hex"
	"encoding/json"
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

var paths []string

// values read in on_request_headers, by context
var atRequest = map[uint32][]string{}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, size uint32) uint32 {
	cfg, _ := abi.GetBuffer(abi.PluginConfiguration, 0, size)
	var c struct{ Paths []string }
	if err := json.Unmarshal(cfg, &c); err != nil {
		abi.Log(abi.LogError, "props: bad configuration: "+err.Error())
		return 0
	}
	paths = c.Paths
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	abi.SetProperty("wasmgate_test", []byte("set-by-plugin"))
	values := make([]string, len(paths))
	for i, p := range paths {
		values[i] = read(p)
	}
	atRequest[ctxID] = values
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	for i, p := range paths {
		abi.AddHeader(abi.ResponseHeaders, "x-prop-"+p, read(p))
		if v, ok := atRequest[ctxID]; ok {
			abi.AddHeader(abi.ResponseHeaders, "x-prop-req-"+p, v[i])
		}
	}
	delete(atRequest, ctxID)
	abi.AddHeader(abi.ResponseHeaders, "x-prop-filter-state", read("wasmgate_test"))
	return abi.Continue
}

func read(path string) string {
	v, st := abi.GetProperty(path)
	if st != abi.OK {
		return "status:" + strconv.Itoa(int(st))
	}
	return hex.EncodeToString(v)
}
