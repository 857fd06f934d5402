// Command vmshare is a wasmgate test plugin for VM sharing: several plugins with
// the same vm_id and module run in one VM, each with its own root context.
//
// Package-level state belongs to the VM, so it is shared by every plugin on it:
// how often proxy_on_vm_start and proxy_on_configure ran, how many requests the VM
// saw, and the root contexts alive. Each root context keeps its own tag (from its
// plugin configuration {"tag": NAME, "tick": MS}), request count and timer.
//
// On the response each plugin adds `x-vmshare-<tag>` describing that state. A
// request with `x-vmshare-trap: <tag>` makes the plugin with that tag trap in
// on_request_headers.
package main

import (
	"encoding/json"
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

type root struct {
	tag      string
	requests int
	ticks    int
}

var (
	vmStarts   int
	configures int
	requests   int // every request of every plugin on this VM
	roots      = map[uint32]*root{}
	streamRoot = map[uint32]uint32{}
)

func itoa(v int) string { return strconv.Itoa(v) }

func u(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

func logf(msg string) { abi.Log(abi.LogInfo, "vmshare: "+msg) }

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {
	if parentID == 0 {
		roots[ctxID] = &root{}
		logf("root_create ctx=" + u(ctxID) + " roots=" + itoa(len(roots)))
		return
	}
	streamRoot[ctxID] = parentID
}

//go:wasmexport proxy_on_vm_start
func onVMStart(rootID, size uint32) uint32 {
	vmStarts++
	logf("vm_start root=" + u(rootID) + " vm_starts=" + itoa(vmStarts))
	return 1
}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, size uint32) uint32 {
	config, _ := abi.GetBuffer(abi.PluginConfiguration, 0, size)
	configures++
	r := roots[rootID]
	if r == nil { // no proxy_on_context_create for it: an SDK would create it here
		r = &root{}
		roots[rootID] = r
	}
	var cfg struct {
		Tag  string
		Tick uint32
	}
	if err := json.Unmarshal(config, &cfg); err != nil {
		logf("configure root=" + u(rootID) + ": bad configuration: " + err.Error())
		return 0
	}
	r.tag = cfg.Tag
	if cfg.Tick > 0 {
		abi.SetTickPeriod(cfg.Tick)
	}
	logf("configure root=" + u(rootID) + " tag=" + r.tag + " configures=" + itoa(configures))
	return 1
}

//go:wasmexport proxy_on_tick
func onTick(rootID uint32) {
	if r := roots[rootID]; r != nil {
		r.ticks++
	}
}

func rootOf(ctxID uint32) *root {
	if r := roots[streamRoot[ctxID]]; r != nil {
		return r
	}
	return &root{tag: "?"}
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	r := rootOf(ctxID)
	if v, st := abi.GetHeader(abi.RequestHeaders, "x-vmshare-trap"); st == abi.OK && v == r.tag {
		logf("trapping tag=" + r.tag)
		var table []int
		table[len(roots)+5] = 1 // index out of range: the VM traps
	}
	requests++
	r.requests++
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	r := rootOf(ctxID)
	ticking := "no"
	if r.ticks > 0 {
		ticking = "yes"
	}
	abi.AddHeader(abi.ResponseHeaders, "x-vmshare-"+r.tag,
		"vm_starts="+itoa(vmStarts)+" configures="+itoa(configures)+" roots="+itoa(len(roots))+
			" vm_requests="+itoa(requests)+" own_requests="+itoa(r.requests)+" ticking="+ticking+
			" ctx="+u(ctxID)+" root="+u(streamRoot[ctxID]))
	return abi.Continue
}

//go:wasmexport proxy_on_done
func onDone(ctxID uint32) uint32 {
	if r, ok := roots[ctxID]; ok {
		logf("done root=" + u(ctxID) + " tag=" + r.tag)
	}
	return 1
}

//go:wasmexport proxy_on_delete
func onDelete(ctxID uint32) {
	if r, ok := roots[ctxID]; ok {
		delete(roots, ctxID)
		logf("delete root=" + u(ctxID) + " tag=" + r.tag + " roots=" + itoa(len(roots)))
		return
	}
	delete(streamRoot, ctxID)
}
