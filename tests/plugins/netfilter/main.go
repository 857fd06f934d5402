// Command netfilter is a wasmgate test plugin for network (TCP) filters. It logs, at
// INFO, each callback with its sizes and the data it sees, and acts on markers in
// the data:
//
//   - from the client: "upper:" upper-cases the whole chunk (replace), "wrap:" prepends
//     "<<" and appends ">>", "swap:" replaces the first 5 bytes with "SWAPPED:",
//     "hold:" pauses until a chunk with "release" arrives ("hold@ROOT:" only the plugin
//     whose pluginName is ROOT), "wait:" pauses until the
//     root context's tick resumes it with proxy_continue_stream(DOWNSTREAM), "close:"
//     closes the connection with proxy_close_stream, "trap:" makes the VM trap;
//   - from the upstream: "secret" is replaced with "[redacted]", a chunk ending in
//     "uphold" pauses until the next upstream chunk.
//
// The plugin configuration is text: "pause-new" makes it pause in proxy_on_new_connection
// too, until the tick resumes it; a line "paths=a.b,c" or "shapes=d,e" lists properties it
// logs in proxy_on_new_connection, its first proxy_on_downstream_data and in on_log ("prop <phase> <path> = " and
// the value in hex, "len:<n>" for shapes, or "status:<n>"). Counters: tcp_connections, tcp_downstream_bytes,
// tcp_upstream_bytes (bytes passed on, after rewriting).
package main

import (
	"bytes"
	"encoding/hex"
	"strconv"
	"strings"
	"unsafe"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

var (
	pauseNew                              bool
	paths, shapes                         []string
	reported                              = map[uint32]bool{}
	connections, downstreamBytes, upBytes uint32
	waiting                               []uint32
	sink                                  uint32
)

func rootID() string {
	root, _ := abi.GetProperty("plugin_root_id")
	return string(root)
}

// logf logs one line; a plugin whose pluginName is not "netfilter" names itself, so that
// several of them in one chain (maybe on one shared VM) can be told apart.
func logf(msg string) {
	if root := rootID(); root != "netfilter" {
		msg = "[" + root + "] " + msg
	}
	abi.Log(abi.LogInfo, "netfilter: "+msg)
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

func prop(path string) string {
	v, st := abi.GetProperty(path)
	if st != abi.OK {
		return "status:" + itoa(uint32(st))
	}
	return string(v)
}

// host gives the address without its port (ports differ between proxies).
func host(addr string) string {
	if i := strings.LastIndexByte(addr, ':'); i >= 0 && !strings.HasPrefix(addr, "status:") {
		return addr[:i]
	}
	return addr
}

func report(phase string) {
	for i, path := range append(append([]string{}, paths...), shapes...) {
		v, st := abi.GetProperty(path)
		out := "status:" + itoa(uint32(st))
		if st == abi.OK && i >= len(paths) {
			out = "len:" + itoa(uint32(len(v)))
		} else if st == abi.OK {
			out = hex.EncodeToString(v)
		}
		logf("prop " + phase + " " + path + " = " + out)
	}
}

func data(b abi.BufferType, size uint32) []byte {
	d, st := abi.GetBuffer(b, 0, size)
	if st != abi.OK {
		logf("get_buffer_bytes failed status=" + itoa(uint32(st)))
	}
	return d
}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {
	if parentID != 0 {
		logf("on_context_create ctx=" + itoa(ctxID) + " parent=" + itoa(parentID))
	}
}

//go:wasmexport proxy_on_vm_start
func onVMStart(rootID, size uint32) uint32 { return 1 }

//go:wasmexport proxy_on_configure
func onConfigure(rootID, size uint32) uint32 {
	cfg, _ := abi.GetBuffer(abi.PluginConfiguration, 0, size)
	pauseNew = bytes.Contains(cfg, []byte("pause-new"))
	for _, line := range strings.Split(string(cfg), "\n") {
		if v, ok := strings.CutPrefix(line, "paths="); ok {
			paths = strings.Split(v, ",")
		} else if v, ok := strings.CutPrefix(line, "shapes="); ok {
			shapes = strings.Split(v, ",")
		}
	}
	connections, _ = abi.DefineMetric(abi.Counter, "tcp_connections")
	downstreamBytes, _ = abi.DefineMetric(abi.Counter, "tcp_downstream_bytes")
	upBytes, _ = abi.DefineMetric(abi.Counter, "tcp_upstream_bytes")
	abi.SetTickPeriod(50)
	return 1
}

//go:wasmexport proxy_on_tick
func onTick(rootID uint32) {
	for _, id := range waiting {
		if st := abi.SetEffectiveContext(id); st != abi.OK {
			continue
		}
		logf("tick resumes ctx=" + itoa(id) + " status=" + itoa(uint32(abi.ContinueStream(abi.StreamDownstream))))
	}
	waiting = waiting[:0]
}

//go:wasmexport proxy_on_new_connection
func onNewConnection(ctxID uint32) abi.Action {
	abi.IncrementMetric(connections, 1)
	abi.SetProperty("netfilter_seen", []byte("ctx"+itoa(ctxID)))
	logf("on_new_connection ctx=" + itoa(ctxID) + " source=" + host(prop("source.address")) +
		" destination=" + host(prop("destination.address")) + " upstream=" + prop("upstream.address") +
		" request.path=" + prop("request.path") + " mtls=" + strconv.Quote(prop("connection.mtls")))
	report("new")
	if pauseNew {
		waiting = append(waiting, ctxID)
		return abi.Pause
	}
	return abi.Continue
}

//go:wasmexport proxy_on_downstream_data
func onDownstreamData(ctxID, size, eos uint32) abi.Action {
	d := data(abi.DownstreamData, size)
	logf("on_downstream_data ctx=" + itoa(ctxID) + " size=" + itoa(size) + " eos=" + itoa(eos) +
		" data=" + strconv.Quote(string(d)) + " upstream=" + prop("upstream.address"))
	if !reported[ctxID] {
		reported[ctxID] = true
		report("data")
	}
	action := abi.Continue
	switch {
	case bytes.Contains(d, []byte("trap:")):
		p := (*uint32)(unsafe.Pointer(uintptr(0xFFFFFFF0)))
		sink = *p // out of bounds of linear memory: a Wasm trap
	case bytes.Contains(d, []byte("close:")):
		logf("closing ctx=" + itoa(ctxID) + " status=" + itoa(uint32(abi.CloseStream(abi.StreamDownstream))))
	case bytes.Contains(d, []byte("release")):
	case bytes.Contains(d, []byte("hold:")), bytes.Contains(d, []byte("hold@"+rootID()+":")):
		action = abi.Pause
	case bytes.Contains(d, []byte("wait:")):
		waiting = append(waiting, ctxID)
		action = abi.Pause
	case bytes.HasPrefix(d, []byte("upper:")):
		abi.SetBuffer(abi.DownstreamData, 0, size, bytes.ToUpper(d))
	case bytes.HasPrefix(d, []byte("wrap:")):
		abi.SetBuffer(abi.DownstreamData, 0, 0, []byte("<<"))
		abi.SetBuffer(abi.DownstreamData, size+2, 0, []byte(">>"))
	case bytes.HasPrefix(d, []byte("swap:")):
		abi.SetBuffer(abi.DownstreamData, 0, 5, []byte("SWAPPED:"))
	}
	if action == abi.Continue {
		n, _ := abi.GetBufferSize(abi.DownstreamData)
		if n > 0 {
			abi.IncrementMetric(downstreamBytes, int64(n))
		}
	}
	return action
}

//go:wasmexport proxy_on_upstream_data
func onUpstreamData(ctxID, size, eos uint32) abi.Action {
	d := data(abi.UpstreamData, size)
	logf("on_upstream_data ctx=" + itoa(ctxID) + " size=" + itoa(size) + " eos=" + itoa(eos) +
		" data=" + strconv.Quote(string(d)))
	if bytes.Contains(d, []byte("secret")) {
		abi.SetBuffer(abi.UpstreamData, 0, size, bytes.ReplaceAll(d, []byte("secret"), []byte("[redacted]")))
	}
	if bytes.HasSuffix(d, []byte("uphold")) {
		return abi.Pause
	}
	n, _ := abi.GetBufferSize(abi.UpstreamData)
	if n > 0 {
		abi.IncrementMetric(upBytes, int64(n))
	}
	return abi.Continue
}

//go:wasmexport proxy_on_downstream_connection_close
func onDownstreamConnectionClose(ctxID, peer uint32) {
	logf("on_downstream_connection_close ctx=" + itoa(ctxID) + " peer=" + itoa(peer))
}

//go:wasmexport proxy_on_upstream_connection_close
func onUpstreamConnectionClose(ctxID, peer uint32) {
	logf("on_upstream_connection_close ctx=" + itoa(ctxID) + " peer=" + itoa(peer))
}

//go:wasmexport proxy_on_done
func onDone(ctxID uint32) uint32 {
	if ctxID > 1 {
		logf("on_done ctx=" + itoa(ctxID))
	}
	return 1
}

//go:wasmexport proxy_on_log
func onLog(ctxID uint32) {
	n, st := abi.GetBufferSize(abi.DownstreamData)
	logf("on_log ctx=" + itoa(ctxID) + " upstream=" + prop("upstream.address") + " seen=" + prop("netfilter_seen") +
		" downstream_buffer=" + itoa(n) + "/" + itoa(uint32(st)))
	report("log")
	delete(reported, ctxID)
}

//go:wasmexport proxy_on_delete
func onDelete(ctxID uint32) {
	if ctxID > 1 {
		logf("on_delete ctx=" + itoa(ctxID))
	}
}
