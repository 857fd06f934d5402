// Command props is a wasmgate test plugin that reports properties, CEL expressions
// and foreign-function results, so that wasmgate and Envoy can be compared.
//
// Configuration (JSON, every field optional):
//
//	{"paths":    ["request.path"],                 // dotted attribute paths: value in hex
//	 "segments": [["metadata", "filter_metadata", "a.b"]],  // paths whose keys contain dots
//	 "shapes":   ["request.time"],                 // only the value's length ("len:8"): values that differ per run
//	 "exprs":    ["request.method == 'GET'"],      // CEL, created once in on_configure (expr_create)
//	 "foreign":  [{"name": "compress", "arg": "<hex>"}]}  // called in on_request_headers
//
// Each item is read in on_request_headers, on_response_headers and on_log. The response
// gets `x-<kind>-<label>` (read in on_response_headers) and `x-<kind>-req-<label>` (read
// in on_request_headers) with the result: hex, "len:<n>", or "status:<n>" when the call
// failed. Every result is also logged at info as "props: <phase> <kind> <label> = <result>",
// on_log's only there. It also sets the filter-state property "wasmgate_test" on request
// headers and reads it back into `x-prop-filter-state`.
package main

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"strconv"

	"wasmgate.test/plugins/internal/abi"
)

func main() {}

type foreignCall struct {
	Name string
	Arg  string // hex
}

var cfg struct {
	Paths    []string
	Segments [][]string
	Shapes   []string
	Exprs    []string
	Foreign  []foreignCall
}

// expression tokens from expr_create, or -1 when it failed
var exprTokens []int64

type item struct{ kind, label, value string }

// results read in on_request_headers, by context
var atRequest = map[uint32][]item{}

//go:wasmexport proxy_on_context_create
func onContextCreate(ctxID, parentID uint32) {}

//go:wasmexport proxy_on_configure
func onConfigure(rootID, size uint32) uint32 {
	data, _ := abi.GetBuffer(abi.PluginConfiguration, 0, size)
	if err := json.Unmarshal(data, &cfg); err != nil {
		abi.Log(abi.LogError, "props: bad configuration: "+err.Error())
		return 0
	}
	exprTokens = make([]int64, len(cfg.Exprs))
	for i, e := range cfg.Exprs {
		res, st := abi.CallForeign("expr_create", []byte(e))
		exprTokens[i] = -1
		if st == abi.OK && len(res) == 4 {
			exprTokens[i] = int64(binary.LittleEndian.Uint32(res))
		}
		abi.Log(abi.LogInfo, "props: expr_create "+strconv.Itoa(i)+" status="+strconv.Itoa(int(st))+
			" size="+strconv.Itoa(len(res)))
	}
	return 1
}

func readAll(phase string) []item {
	var out []item
	add := func(kind, label, value string) {
		out = append(out, item{kind, label, value})
		abi.Log(abi.LogInfo, "props: "+phase+" "+kind+" "+label+" = "+value)
	}
	for _, p := range cfg.Paths {
		v, st := abi.GetProperty(p)
		add("prop", p, result(v, st))
	}
	for i, s := range cfg.Segments {
		v, st := abi.GetPropertyPath(s)
		add("seg", strconv.Itoa(i), result(v, st))
	}
	for _, p := range cfg.Shapes {
		v, st := abi.GetProperty(p)
		if st == abi.OK {
			add("shape", p, "len:"+strconv.Itoa(len(v)))
		} else {
			add("shape", p, result(v, st))
		}
	}
	for i, tok := range exprTokens {
		if tok < 0 {
			add("expr", strconv.Itoa(i), "not-created")
			continue
		}
		arg := binary.LittleEndian.AppendUint32(nil, uint32(tok))
		v, st := abi.CallForeign("expr_evaluate", arg)
		add("expr", strconv.Itoa(i), result(v, st))
	}
	return out
}

func result(v []byte, st abi.Status) string {
	if st != abi.OK {
		return "status:" + strconv.Itoa(int(st))
	}
	return hex.EncodeToString(v)
}

//go:wasmexport proxy_on_request_headers
func onRequestHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	abi.SetProperty("wasmgate_test", []byte("set-by-plugin"))
	items := readAll("request")
	for i, f := range cfg.Foreign {
		arg, err := hex.DecodeString(f.Arg)
		if err != nil {
			abi.Log(abi.LogError, "props: bad foreign arg: "+err.Error())
			continue
		}
		v, st := abi.CallForeign(f.Name, arg)
		value := result(v, st)
		items = append(items, item{"foreign", strconv.Itoa(i), value})
		abi.Log(abi.LogInfo, "props: request foreign "+f.Name+" "+strconv.Itoa(i)+" = "+value)
	}
	atRequest[ctxID] = items
	return abi.Continue
}

//go:wasmexport proxy_on_response_headers
func onResponseHeaders(ctxID, numHeaders, endOfStream uint32) abi.Action {
	for _, it := range readAll("response") {
		abi.AddHeader(abi.ResponseHeaders, "x-"+it.kind+"-"+it.label, it.value)
	}
	for _, it := range atRequest[ctxID] {
		abi.AddHeader(abi.ResponseHeaders, "x-"+it.kind+"-req-"+it.label, it.value)
	}
	delete(atRequest, ctxID)
	v, st := abi.GetProperty("wasmgate_test")
	abi.AddHeader(abi.ResponseHeaders, "x-prop-filter-state", result(v, st))
	return abi.Continue
}

//go:wasmexport proxy_on_log
func onLog(ctxID uint32) {
	readAll("log")
	delete(atRequest, ctxID)
}
