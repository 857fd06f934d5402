package abi

import "unsafe"

//go:wasmimport env proxy_call_foreign_function
func proxyCallForeignFunction(name unsafe.Pointer, nameSize uint32, arg unsafe.Pointer, argSize uint32,
	retResult unsafe.Pointer, retSize unsafe.Pointer) uint32

// CallForeign calls a host-provided function by name (Envoy's compress, expr_create, sign, ...).
func CallForeign(name string, arg []byte) ([]byte, Status) {
	hostAlloc()
	var addr, size uint32
	st := Status(proxyCallForeignFunction(strPtr(name), uint32(len(name)), bytesPtr(arg), uint32(len(arg)),
		unsafe.Pointer(&addr), unsafe.Pointer(&size)))
	if st != OK {
		return nil, st
	}
	data, ok := claim(addr, size)
	if !ok {
		return nil, BadArgument
	}
	return data, OK
}
