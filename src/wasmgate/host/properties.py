"""proxy_get_property with Envoy's attribute paths and value encodings (a first subset).

A path is segments joined by NUL (``request\\0path``). Values are encoded as Envoy
does: strings as raw bytes, integers as 8-byte little-endian int64, header maps in
the header-pair serialization.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.abi.pairs import encode_pairs
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext, Stream

if TYPE_CHECKING:
    from wasmgate.headers import HeaderMap
    from wasmgate.plugin.vm import PluginVM

R = WasmResult


def _i64(v: int) -> bytes:
    return struct.pack("<q", v)


def _req(stream: Stream, key: bytes) -> bytes | None:
    h = stream.request_headers
    return h.get(key) if h is not None else None


def _headers(h: HeaderMap | None) -> bytes | None:
    return encode_pairs(h.pairs) if h is not None else None


def _url_path(stream: Stream) -> bytes | None:
    path = _req(stream, b":path")
    return path.split(b"?", 1)[0] if path is not None else None


def _query(stream: Stream) -> bytes | None:
    path = _req(stream, b":path")
    return path.split(b"?", 1)[1] if path is not None and b"?" in path else (b"" if path is not None else None)


def _status(stream: Stream) -> bytes | None:
    h = stream.response_headers
    code = h.get(b":status") if h is not None else None
    return _i64(int(code)) if code and code.isdigit() else None


def _addr(a: tuple[str, int]) -> bytes | None:
    return f"{a[0]}:{a[1]}".encode() if a[0] else None


_STREAM: dict[bytes, Callable[[Stream], bytes | None]] = {
    b"request\0path": lambda s: _req(s, b":path"),
    b"request\0url_path": _url_path,
    b"request\0query": _query,
    b"request\0host": lambda s: _req(s, b":authority"),
    b"request\0scheme": lambda s: _req(s, b":scheme"),
    b"request\0method": lambda s: _req(s, b":method"),
    b"request\0headers": lambda s: _headers(s.request_headers),
    b"request\0referer": lambda s: _req(s, b"referer"),
    b"request\0useragent": lambda s: _req(s, b"user-agent"),
    b"request\0id": lambda s: _req(s, b"x-request-id"),
    b"request\0protocol": lambda s: b"HTTP/1.1",
    b"response\0code": _status,
    b"response\0headers": lambda s: _headers(s.response_headers),
    b"response\0trailers": lambda s: _headers(s.response_trailers),
    b"response\0code_details": lambda s: re.sub(r"\s", "_", s.code_details).encode() if s.code_details else None,
    b"source\0address": lambda s: _addr(s.downstream_addr),
    b"source\0port": lambda s: _i64(s.downstream_addr[1]) if s.downstream_addr[0] else None,
    b"destination\0address": lambda s: _addr(s.local_addr),
    b"destination\0port": lambda s: _i64(s.local_addr[1]) if s.local_addr[0] else None,
}


def lookup(vm: PluginVM, path: bytes) -> bytes | None:
    if path == b"plugin_name":
        return vm.spec.name.encode()
    if path == b"plugin_root_id":
        return vm.spec.root_id.encode()
    if path == b"plugin_vm_id":
        return vm.spec.vm_id.encode()
    getter = _STREAM.get(path)
    ctx = vm.effective
    if getter is None or not isinstance(ctx, HttpContext):
        return None
    return getter(ctx.stream)


@hostcall("iiii")
def proxy_get_property(vm: PluginVM, pp: int, ps: int, rp: int, rs: int) -> int:
    path = vm.instance.read(pp, ps)
    if path is None:
        return R.INVALID_MEMORY_ACCESS
    value = lookup(vm, path.rstrip(b"\0"))
    if value is None:
        return R.NOT_FOUND
    return vm.copy_out(value, rp, rs)
