// Command tag is a wasmgate test plugin that appends its tag to the request
// header x-chain and the response header x-chain-resp. The tag is the plugin
// configuration: JSON {"tag": "A"} (as a WasmPlugin's pluginConfig arrives)
// or a plain string. Chaining several instances shows the
// order the host runs them in: request in order, response in reverse.
package main

import (
	"encoding/json"
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

// Plugins with the same module share one VM (Envoy's VM sharing), each with its
// own root context: the tag is kept per root context, as SDKs keep plugin state.
var (
	tags       = map[uint32]string{} // root context -> its configured tag
	streamRoot = map[uint32]uint32{} // stream context -> its root context
)

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {
	if parentID != 0 {
		streamRoot[ctxID] = parentID
	}
}

//go:wasmexport proxy_on_delete
func onDelete(ctxID uint32) {
	delete(streamRoot, ctxID)
	delete(tags, ctxID)
}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, configSize uint32) uint32 {
	tag := "unset"
	if configSize > 0 {
		cfg, st := abi.GetBuffer(abi.PluginConfiguration, 0, configSize)
		if st != abi.OK {
			abi.Log(abi.LogError, "tag: reading plugin configuration failed status="+strconv.Itoa(int(st)))
			return 0
		}
		var obj struct{ Tag string }
		if json.Unmarshal(cfg, &obj) == nil && obj.Tag != "" {
			tag = obj.Tag
		} else {
			tag = string(cfg)
		}
	}
	tags[rootID] = tag
	abi.Log(abi.LogInfo, "tag: configured tag="+tag)
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	add(ctxID, abi.RequestHeaders, "x-chain")
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	add(ctxID, abi.ResponseHeaders, "x-chain-resp")
	return abi.Continue
}

func add(ctxID uint32, m abi.MapType, key string) {
	tag, ok := tags[streamRoot[ctxID]]
	if !ok {
		tag = "unset"
	}
	if st := abi.AddHeader(m, key, tag); st != abi.OK {
		abi.Log(abi.LogError, "tag: proxy_add_header_map_value "+key+" failed status="+strconv.Itoa(int(st)))
		return
	}
	abi.Log(abi.LogDebug, "tag: added "+key+": "+tag)
}
