// Command leaky is a wasmgate test plugin that leaks: every request's headers
// are kept (as a "cache" that is never evicted), padded to about 1 KiB, so
// its linear memory grows for as long as requests come. `wasmgate bench`
// must flag it. With the plugin configuration "clean" it keeps nothing and
// must pass.
package main

import (
	"strings"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

var (
	leak  = true
	cache [][]byte
)

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, configSize uint32) uint32 {
	if configSize > 0 {
		cfg, st := abi.GetBuffer(abi.PluginConfiguration, 0, configSize)
		if st == abi.OK && strings.TrimSpace(string(cfg)) == "clean" {
			leak = false
		}
	}
	return 1
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	headers, _ := abi.GetHeaders(abi.RequestHeaders)
	entry := make([]byte, 0, 1024)
	for _, h := range headers {
		entry = append(entry, h[0]+": "+h[1]+"\n"...)
	}
	if leak {
		cache = append(cache, entry)
	}
	abi.AddHeader(abi.RequestHeaders, "x-leaky-entries", itoa(len(cache)))
	return abi.Continue
}

func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b []byte
	for ; n > 0; n /= 10 {
		b = append([]byte{byte('0' + n%10)}, b...)
	}
	return string(b)
}
