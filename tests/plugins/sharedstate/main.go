// Command sharedstate is a wasmgate test plugin for metrics, shared data and
// shared queues.
//
// Every request without `x-ops`:
//   - increments the counter metric `sharedstate_requests` and records the
//     request path length in the histogram `sharedstate_path_length`;
//   - increments the shared-data key `hits` with compare-and-swap, retrying on
//     CAS_MISMATCH;
//   - enqueues "hit <n>" to the queue `sharedstate_events`, which this root
//     context registered in on_configure and drains in proxy_on_queue_ready.
//
// The response carries what the plugin saw: `x-hits` (the value it stored),
// `x-requests` (the counter from proxy_get_metric), `x-drained` (items taken
// off the queue so far) and `x-last-item`.
//
// A request with `x-ops` instead runs a script of raw host calls and returns
// their results in the response header `x-ops-result`, so tests can compare
// status codes and values with Envoy's. Ops are separated by ',' and their
// arguments by ' '; '-' is the empty string and '@i' the value op i returned:
//
//	define TYPE NAME | inc ID OFFSET | rec ID VALUE | get ID
//	sget KEY | sset KEY VALUE CAS
//	reg NAME | resolve VMID NAME | enq TOKEN VALUE | deq TOKEN
//
// Each result is STATUS or STATUS=VALUE (sget: STATUS=VALUE/CAS), joined by ','.
//
// It logs (info) each request's hits and counter, each script with its results, and
// each item proxy_on_queue_ready takes off the queue, so the order of those callbacks
// can be compared with Envoy's.
package main

import (
	"strconv"
	"strings"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

const queueName = "sharedstate_events"

var (
	requestsID   uint32
	pathLengthID uint32
	queueToken   uint32
	drained      int
	lastItem     string
	// Per stream: response headers to add in on_response_headers.
	pending = map[uint32][][2]string{}
)

func logf(msg string) { abi.Log(abi.LogInfo, "sharedstate: "+msg) }

func itoa(v uint64) string { return strconv.FormatUint(v, 10) }

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, configSize uint32) uint32 {
	var st abi.Status
	if requestsID, st = abi.DefineMetric(abi.Counter, "sharedstate_requests"); st != abi.OK {
		logf("define_metric counter failed status=" + itoa(uint64(st)))
		return 0
	}
	if pathLengthID, st = abi.DefineMetric(abi.Histogram, "sharedstate_path_length"); st != abi.OK {
		logf("define_metric histogram failed status=" + itoa(uint64(st)))
		return 0
	}
	if queueToken, st = abi.RegisterSharedQueue(queueName); st != abi.OK {
		logf("register_shared_queue failed status=" + itoa(uint64(st)))
		return 0
	}
	logf("configured root=" + itoa(uint64(rootID)))
	return 1
}

//go:wasmexport proxy_on_queue_ready
func onQueueReady(rootID, token uint32) {
	for {
		item, st := abi.DequeueSharedQueue(token)
		if st == abi.Empty {
			return
		}
		if st != abi.OK {
			logf("dequeue_shared_queue failed status=" + itoa(uint64(st)))
			return
		}
		drained++
		lastItem = string(item)
		logf("on_queue_ready token=" + itoa(uint64(token)) + " item=" + lastItem)
	}
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	if ops, st := abi.GetHeader(abi.RequestHeaders, "x-ops"); st == abi.OK {
		result := runOps(ops)
		logf("ops " + ops + " = " + result)
		pending[ctxID] = [][2]string{{"x-ops-result", result}}
		return abi.Continue
	}
	if st := abi.IncrementMetric(requestsID, 1); st != abi.OK {
		logf("increment_metric failed status=" + itoa(uint64(st)))
	}
	path, _ := abi.GetHeader(abi.RequestHeaders, ":path")
	if st := abi.RecordMetric(pathLengthID, uint64(len(path))); st != abi.OK {
		logf("record_metric failed status=" + itoa(uint64(st)))
	}
	hits, ok := incrementHits()
	if !ok {
		return abi.Continue
	}
	// Resolve rather than use the registered token, to exercise the lookup.
	token, st := abi.ResolveSharedQueue("", queueName)
	if st != abi.OK || token != queueToken {
		logf("resolve_shared_queue: status=" + itoa(uint64(st)) + " token=" + itoa(uint64(token)))
	}
	if st := abi.EnqueueSharedQueue(token, []byte("hit "+itoa(hits))); st != abi.OK {
		logf("enqueue_shared_queue failed status=" + itoa(uint64(st)))
	}
	requests, _ := abi.GetMetric(requestsID)
	logf("request hits=" + itoa(hits) + " requests=" + itoa(requests))
	pending[ctxID] = [][2]string{{"x-hits", itoa(hits)}, {"x-requests", itoa(requests)}}
	return abi.Continue
}

// incrementHits adds one to the shared-data key "hits" with compare-and-swap.
func incrementHits() (uint64, bool) {
	for range 1000 {
		var n uint64
		value, cas, st := abi.GetSharedData("hits")
		switch st {
		case abi.OK:
			n, _ = strconv.ParseUint(string(value), 10, 64)
		case abi.NotFound:
			cas = 0
		default:
			logf("get_shared_data failed status=" + itoa(uint64(st)))
			return 0, false
		}
		n++
		switch st := abi.SetSharedData("hits", []byte(itoa(n)), cas); st {
		case abi.OK:
			return n, true
		case abi.CasMismatch:
			continue
		default:
			logf("set_shared_data failed status=" + itoa(uint64(st)))
			return 0, false
		}
	}
	logf("set_shared_data: too many CAS mismatches")
	return 0, false
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	headers, ok := pending[ctxID]
	delete(pending, ctxID)
	if ok && headers[0][0] != "x-ops-result" {
		// Read now: the queue was drained after on_request_headers returned.
		headers = append(headers, [2]string{"x-drained", strconv.Itoa(drained)}, [2]string{"x-last-item", lastItem})
	}
	for _, h := range headers {
		abi.AddHeader(abi.ResponseHeaders, h[0], h[1])
	}
	return abi.Continue
}

//go:wasmexport proxy_on_done
func onDone(ctxID uint32) uint32 {
	delete(pending, ctxID)
	return 1
}

// runOps runs an x-ops script; see the package comment.
func runOps(script string) string {
	var values []uint64
	var out []string
	for _, op := range strings.Split(script, ",") {
		args := strings.Fields(op)
		for i, a := range args {
			if a == "-" {
				args[i] = ""
			}
		}
		res, value := runOp(args, values)
		values = append(values, value)
		out = append(out, res)
	}
	return strings.Join(out, ",")
}

func num(arg string, values []uint64) uint64 {
	if strings.HasPrefix(arg, "@") {
		i, err := strconv.Atoi(arg[1:])
		if err == nil && i >= 0 && i < len(values) {
			return values[i]
		}
		return 0
	}
	if v, err := strconv.ParseInt(arg, 10, 64); err == nil {
		return uint64(v)
	}
	v, _ := strconv.ParseUint(arg, 10, 64)
	return v
}

func result(st abi.Status, value string) string {
	if value == "" {
		return itoa(uint64(st))
	}
	return itoa(uint64(st)) + "=" + value
}

func runOp(args []string, values []uint64) (string, uint64) {
	arg := func(i int) string {
		if i < len(args) {
			return args[i]
		}
		return ""
	}
	n := func(i int) uint64 { return num(arg(i), values) }
	switch arg(0) {
	case "define":
		id, st := abi.DefineMetric(abi.MetricType(n(1)), arg(2))
		return result(st, itoa(uint64(id))), uint64(id)
	case "inc":
		return result(abi.IncrementMetric(uint32(n(1)), int64(n(2))), ""), 0
	case "rec":
		return result(abi.RecordMetric(uint32(n(1)), n(2)), ""), 0
	case "get":
		v, st := abi.GetMetric(uint32(n(1)))
		return result(st, itoa(v)), v
	case "sget":
		v, cas, st := abi.GetSharedData(arg(1))
		if st != abi.OK {
			return result(st, ""), 0
		}
		return result(st, string(v)+"/"+itoa(uint64(cas))), uint64(cas)
	case "sset":
		return result(abi.SetSharedData(arg(1), []byte(arg(2)), uint32(n(3))), ""), 0
	case "reg":
		token, st := abi.RegisterSharedQueue(arg(1))
		return result(st, itoa(uint64(token))), uint64(token)
	case "resolve":
		token, st := abi.ResolveSharedQueue(arg(1), arg(2))
		return result(st, itoa(uint64(token))), uint64(token)
	case "enq":
		return result(abi.EnqueueSharedQueue(uint32(n(1)), []byte(arg(2))), ""), 0
	case "deq":
		v, st := abi.DequeueSharedQueue(uint32(n(1)))
		if st != abi.OK {
			return result(st, ""), 0
		}
		return result(st, string(v)), 0
	}
	return "?", 0
}
