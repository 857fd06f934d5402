// Command grpccall is a wasmgate test plugin for gRPC callouts
// (proxy_grpc_call, proxy_grpc_stream, _send, _cancel, _close and the
// proxy_on_grpc_* callbacks).
//
// What a request asks for, by header:
//
//	x-grpc-call: MSG       a unary call with the raw bytes MSG to
//	                       <x-grpc-service|test.Echo>/<x-grpc-method|Echo> on
//	                       cluster <x-grpc-cluster|grpc> (x-grpc-proto: 1 sends
//	                       a serialized GrpcService naming it instead), timeout
//	                       <x-grpc-timeout|5000> ms, metadata x-md: <x-grpc-md|v1>
//	x-grpc-stream: A,B,C   a stream to <x-grpc-method|Bidi>: sends each message,
//	                       half-closes after as many answers (x-grpc-cancel: 1
//	                       cancels after the first instead)
//	x-grpc-op: NAME        edge cases answered at once (see onRequestHeaders)
//
// The request waits for the outcome. Success: the request reaches the upstream
// with x-grpc-response (hex of the answer) and x-grpc-status. Failure: a local
// reply 503 "grpc error CODE: MESSAGE". Either way x-grpc-trace lists every
// step with the statuses the host returned. Callbacks for tokens nobody waits
// for are kept and reported by x-grpc-op: strays.
//
// Every gRPC callback, and every outcome, is also logged (info) with the context it
// ran on, so the plugin's log lines can be compared with Envoy's.
package main

import (
	"encoding/hex"
	"strconv"
	"strings"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

type waiter struct {
	stream   uint32 // the stream context that waits
	trace    []string
	expected int // stream: answers to wait for before half-closing
	got      int
	cancel   bool
	dump     bool // trace whole metadata maps
	response []byte
}

var (
	rootID  uint32
	waiting = map[uint32]*waiter{} // by token
	strays  []string
)

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {
	if parentID == 0 {
		rootID = ctxID
	}
}

func header(name, def string) string {
	v, st := abi.GetHeader(abi.RequestHeaders, name)
	if st != abi.OK || v == "" {
		return def
	}
	return v
}

func itoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

// grpcService is a serialized envoy.config.core.v3.GrpcService with only
// envoy_grpc.cluster_name set.
func grpcService(cluster string) string {
	inner := append([]byte{0x0a, byte(len(cluster))}, cluster...)
	return string(append([]byte{0x0a, byte(len(inner))}, inner...))
}

func logf(msg string) { abi.Log(abi.LogInfo, "grpccall: "+msg) }

// callback logs a gRPC callback: its name, context, token kind and argument.
func callback(name string, ctxID, token, arg uint32) {
	logf(name + "@" + who(ctxID) + " kind=" + itoa(token%4) + " arg=" + itoa(arg))
}

func finish(w *waiter, ok bool, code uint32, msg string) {
	st := abi.SetEffectiveContext(w.stream)
	if st != abi.OK {
		strays = append(strays, "gone:"+itoa(uint32(st)))
		return
	}
	trace := strings.Join(w.trace, " ")
	logf("finish ctx" + itoa(w.stream) + " ok=" + strconv.FormatBool(ok) + " code=" + itoa(code) + ": " + trace)
	if ok {
		abi.ReplaceHeader(abi.RequestHeaders, "x-grpc-response", hex.EncodeToString(w.response))
		abi.ReplaceHeader(abi.RequestHeaders, "x-grpc-status", itoa(code))
		abi.ReplaceHeader(abi.RequestHeaders, "x-grpc-trace", trace)
		abi.ContinueStream(abi.StreamRequest)
		return
	}
	abi.SendLocalResponse(503, "grpc_error", []byte("grpc error "+itoa(code)+": "+msg+"\n"),
		[][2]string{{"x-grpc-status", itoa(code)}, {"x-grpc-trace", trace}}, -1)
}

func done(ctxID uint32, trace []string) abi.Action {
	logf("done ctx" + itoa(ctxID) + ": " + strings.Join(trace, " "))
	abi.ReplaceHeader(abi.RequestHeaders, "x-grpc-trace", strings.Join(trace, " "))
	return abi.Continue
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	cluster := header("x-grpc-cluster", "grpc")
	if header("x-grpc-proto", "") == "1" {
		cluster = grpcService(cluster)
	}
	service := header("x-grpc-service", "test.Echo")
	md := [][2]string{{"x-md", header("x-grpc-md", "v1")}}
	timeout, _ := strconv.Atoi(header("x-grpc-timeout", "5000"))

	switch header("x-grpc-op", "") {
	case "strays":
		trace := append([]string{"strays:"}, strays...)
		strays = nil
		return done(ctxID, trace)
	case "tokens":
		// Statuses for tokens that are unknown or of the wrong kind.
		code, msg, st := abi.GetStatus()
		return done(ctxID, []string{
			"status=" + itoa(uint32(st)) + "/" + itoa(code) + "/" + msg,
			"close5=" + itoa(uint32(abi.GrpcClose(5))),
			"cancel5=" + itoa(uint32(abi.GrpcCancel(5))),
			"close6=" + itoa(uint32(abi.GrpcClose(6))),
			"cancel6=" + itoa(uint32(abi.GrpcCancel(6))),
			"send6=" + itoa(uint32(abi.GrpcSend(6, []byte("x"), false))),
			"send5=" + itoa(uint32(abi.GrpcSend(5, []byte("x"), false))),
			"close4=" + itoa(uint32(abi.GrpcClose(4))),
			"cancel3=" + itoa(uint32(abi.GrpcCancel(3))),
			"send7=" + itoa(uint32(abi.GrpcSend(7, nil, true))),
			"buffer5=" + bufferStatus(abi.GrpcReceiveBuffer),
			"map4=" + headerStatus(abi.GrpcReceiveInitialMetadata),
			"map5=" + headerStatus(abi.GrpcReceiveTrailingMetadata),
			"pairs4=" + pairs(abi.GrpcReceiveInitialMetadata),
		})
	case "close-call", "cancel-call":
		// A call dropped while in flight: no callback may follow.
		token, st := abi.GrpcCall(cluster, service, "Slow", md, []byte("x"), uint32(timeout))
		trace := []string{"call=" + itoa(uint32(st)), "kind=" + itoa(token%4)}
		if header("x-grpc-op", "") == "close-call" {
			trace = append(trace, "close="+itoa(uint32(abi.GrpcClose(token))))
		} else {
			trace = append(trace, "cancel="+itoa(uint32(abi.GrpcCancel(token))))
		}
		trace = append(trace, "again="+itoa(uint32(abi.GrpcClose(token))))
		return done(ctxID, trace)
	case "call-only":
		// Start a call and let the request go on; the answer becomes a stray.
		token, st := abi.GrpcCall(cluster, service, header("x-grpc-method", "Echo"), md, []byte("late"),
			uint32(timeout))
		return done(ctxID, []string{"call=" + itoa(uint32(st)), "kind=" + itoa(token%4)})
	}

	if msg, st := abi.GetHeader(abi.RequestHeaders, "x-grpc-call"); st == abi.OK {
		token, st := abi.GrpcCall(cluster, service, header("x-grpc-method", "Echo"), md, []byte(msg),
			uint32(timeout))
		trace := []string{"call=" + itoa(uint32(st))}
		if st != abi.OK {
			abi.SendLocalResponse(500, "grpc_call_error", []byte("grpc_call failed: "+itoa(uint32(st))+"\n"),
				[][2]string{{"x-grpc-trace", strings.Join(trace, " ")}}, -1)
			return abi.Pause
		}
		waiting[token] = &waiter{stream: ctxID, trace: append(trace, "kind="+itoa(token%4))}
		return abi.Pause
	}
	if msgs, st := abi.GetHeader(abi.RequestHeaders, "x-grpc-stream"); st == abi.OK {
		token, st := abi.GrpcStream(cluster, service, header("x-grpc-method", "Bidi"), md)
		trace := []string{"stream=" + itoa(uint32(st))}
		if st != abi.OK {
			abi.SendLocalResponse(500, "grpc_stream_error", []byte("grpc_stream failed: "+itoa(uint32(st))+"\n"),
				[][2]string{{"x-grpc-trace", strings.Join(trace, " ")}}, -1)
			return abi.Pause
		}
		w := &waiter{stream: ctxID, trace: append(trace, "kind="+itoa(token%4)),
			cancel: header("x-grpc-cancel", "") == "1", dump: header("x-grpc-dump", "") == "1"}
		for _, m := range strings.Split(msgs, ",") {
			w.trace = append(w.trace, "send="+itoa(uint32(abi.GrpcSend(token, []byte(m), false))))
			w.expected++
		}
		waiting[token] = w
		return abi.Pause
	}
	return abi.Continue
}

// bufferStatus is the status and size of reading a whole buffer.
func bufferStatus(b abi.BufferType) string {
	data, st := abi.GetBuffer(b, 0, 1024)
	return itoa(uint32(st)) + "/" + itoa(uint32(len(data)))
}

// headerStatus is the status of reading x-init (and what was read) from a map.
func headerStatus(m abi.MapType) string {
	v, st := abi.GetHeader(m, "x-init")
	return itoa(uint32(st)) + "/" + v
}

func pairs(m abi.MapType) string {
	ps, st := abi.GetHeaders(m)
	if st != abi.OK {
		return "!" + itoa(uint32(st))
	}
	var out []string
	for _, p := range ps {
		out = append(out, p[0]+"="+p[1])
	}
	return strings.Join(out, ";")
}

func who(ctxID uint32) string {
	if ctxID == rootID {
		return "root"
	}
	return "ctx" + itoa(ctxID)
}

//go:wasmexport proxy_on_grpc_receive_initial_metadata
func onGrpcReceiveInitialMetadata(ctxID, token, headers uint32) {
	// (not the size: Envoy's holds transport headers grpcio does not show, docs/abi-support.md)
	logf("on_grpc_receive_initial_metadata@" + who(ctxID) + " kind=" + itoa(token%4))
	w, ok := waiting[token]
	if !ok {
		strays = append(strays, "initial:"+itoa(token%4))
		return
	}
	v, st := abi.GetHeader(abi.GrpcReceiveInitialMetadata, "x-init")
	w.trace = append(w.trace, "initial@"+who(ctxID)+"="+v+"/"+itoa(uint32(st)))
	if w.dump {
		w.trace = append(w.trace, "initial-pairs="+itoa(headers)+":"+pairs(abi.GrpcReceiveInitialMetadata))
	}
}

//go:wasmexport proxy_on_grpc_receive
func onGrpcReceive(ctxID, token, size uint32) {
	callback("on_grpc_receive", ctxID, token, size)
	w, ok := waiting[token]
	if !ok {
		strays = append(strays, "receive:"+itoa(token%4))
		return
	}
	data, st := abi.GetBuffer(abi.GrpcReceiveBuffer, 0, size)
	w.trace = append(w.trace, "receive@"+who(ctxID)+"="+string(data)+"/"+itoa(uint32(st)))
	if token%4 == 1 { // a unary call is done with its answer
		delete(waiting, token)
		w.response = data
		code, msg, _ := abi.GetStatus()
		w.trace = append(w.trace, "status="+itoa(code)+"/"+msg)
		finish(w, true, 0, "")
		return
	}
	w.response = append(w.response, data...)
	w.got++
	if w.cancel {
		delete(waiting, token)
		w.trace = append(w.trace, "cancel="+itoa(uint32(abi.GrpcCancel(token))),
			"again="+itoa(uint32(abi.GrpcCancel(token))))
		finish(w, true, 0, "")
		return
	}
	if w.got == w.expected {
		w.trace = append(w.trace, "halfclose="+itoa(uint32(abi.GrpcClose(token))),
			"sendafter="+itoa(uint32(abi.GrpcSend(token, []byte("late"), false))))
	}
}

//go:wasmexport proxy_on_grpc_receive_trailing_metadata
func onGrpcReceiveTrailingMetadata(ctxID, token, trailers uint32) {
	callback("on_grpc_receive_trailing_metadata", ctxID, token, trailers)
	w, ok := waiting[token]
	if !ok {
		strays = append(strays, "trailing:"+itoa(token%4))
		return
	}
	v, st := abi.GetHeader(abi.GrpcReceiveTrailingMetadata, "x-trail")
	w.trace = append(w.trace, "trailing@"+who(ctxID)+"="+v+"/"+itoa(uint32(st)))
	if w.dump {
		w.trace = append(w.trace, "trailing-pairs="+itoa(trailers)+":"+pairs(abi.GrpcReceiveTrailingMetadata))
	}
}

//go:wasmexport proxy_on_grpc_close
func onGrpcClose(ctxID, token, status uint32) {
	callback("on_grpc_close", ctxID, token, status)
	w, ok := waiting[token]
	if !ok {
		strays = append(strays, "close:"+itoa(token%4)+"/"+itoa(status))
		return
	}
	delete(waiting, token)
	code, msg, _ := abi.GetStatus()
	w.trace = append(w.trace, "close@"+who(ctxID)+"="+itoa(status), "status="+itoa(code)+"/"+msg)
	if status == 0 {
		finish(w, true, 0, "")
		return
	}
	finish(w, false, code, msg)
}
