package abi

import "unsafe"

//go:wasmimport env proxy_http_call
func proxyHttpCall(upstream unsafe.Pointer, upstreamSize uint32, headers unsafe.Pointer, headersSize uint32,
	body unsafe.Pointer, bodySize uint32, trailers unsafe.Pointer, trailersSize uint32, timeoutMillis uint32,
	retToken unsafe.Pointer) uint32

// HttpCall sends a request to the named cluster; the answer comes to
// proxy_on_http_call_response with the returned token.
func HttpCall(cluster string, headers [][2]string, body []byte, timeoutMillis uint32) (uint32, Status) {
	hdrs := EncodePairs(headers)
	var token uint32
	st := Status(proxyHttpCall(strPtr(cluster), uint32(len(cluster)), bytesPtr(hdrs), uint32(len(hdrs)),
		bytesPtr(body), uint32(len(body)), nil, 0, timeoutMillis, unsafe.Pointer(&token)))
	return token, st
}

// The map and buffer of an HTTP call's response, readable in proxy_on_http_call_response.
const (
	HttpCallResponseHeaders  MapType    = 6
	HttpCallResponseTrailers MapType    = 7
	HttpCallResponseBody     BufferType = 4
)
