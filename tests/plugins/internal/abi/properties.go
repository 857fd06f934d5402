package abi

import (
	"strings"
	"unsafe"
)

//go:wasmimport env proxy_get_property
func proxyGetProperty(path unsafe.Pointer, pathSize uint32, retValue unsafe.Pointer, retSize unsafe.Pointer) uint32

//go:wasmimport env proxy_set_property
func proxySetProperty(path unsafe.Pointer, pathSize uint32, value unsafe.Pointer, valueSize uint32) uint32

// GetProperty reads an attribute such as "request.path" (segments joined by NUL on the wire).
func GetProperty(dotted string) ([]byte, Status) {
	return GetPropertyPath(strings.Split(dotted, "."))
}

// GetPropertyPath reads an attribute given as segments, for keys that contain dots
// (e.g. metadata namespaces such as "envoy.lb").
func GetPropertyPath(segments []string) ([]byte, Status) {
	path := strings.Join(segments, "\x00")
	hostAlloc()
	var addr, size uint32
	st := Status(proxyGetProperty(strPtr(path), uint32(len(path)), unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return nil, st
	}
	data, ok := claim(addr, size)
	if !ok {
		return nil, BadArgument
	}
	return data, OK
}

// SetProperty stores a value in the stream's filter state under path.
func SetProperty(dotted string, value []byte) Status {
	path := strings.ReplaceAll(dotted, ".", "\x00")
	return Status(proxySetProperty(strPtr(path), uint32(len(path)), bytesPtr(value), uint32(len(value))))
}
