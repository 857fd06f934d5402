"""proxy_get_property / proxy_set_property with Envoy's attribute paths and encodings.

A path is segments joined by NUL (``request\\0path``). Values are encoded as Envoy
does: strings and bytes raw, integers as 8-byte little-endian int64, booleans as one
byte, timestamps and durations as int64 nanoseconds, maps in the header-pair
serialization. A path that names no attribute is looked up in the stream's filter
state, where ``proxy_set_property`` writes (Envoy's ``wasm.``-prefixed CelState).
The supported attributes are listed in docs/abi-support.md.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmgate.abi.constants import MapType, WasmResult
from wasmgate.abi.pairs import encode_pairs
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext, Stream

if TYPE_CHECKING:
    from wasmgate.headers import HeaderMap
    from wasmgate.plugin.vm import PluginVM

R = WasmResult

Getter = Callable[[HttpContext], bytes | None]


def _i64(v: int) -> bytes:
    return struct.pack("<q", v)


def _bool(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


# Attributes read from a header map follow the map's own reachability (see
# HttpContext.header_map): Envoy answers request.path in on_response_headers with
# NotFound, because the request headers are gone from the filter by then.

def _req(key: bytes) -> Getter:
    def get(c: HttpContext) -> bytes | None:
        h = c.header_map(MapType.REQUEST_HEADERS)
        return h.get(key) if h is not None else None
    return get


def _map(map_type: MapType) -> Getter:
    def get(c: HttpContext) -> bytes | None:
        h = c.header_map(map_type)
        return encode_pairs(h.pairs) if h is not None else None
    return get


def _path(c: HttpContext) -> bytes | None:
    return _req(b":path")(c)


def _url_path(c: HttpContext) -> bytes | None:
    p = _path(c)
    return p.split(b"?", 1)[0] if p is not None else None


def _query(c: HttpContext) -> bytes | None:
    p = _path(c)
    return (p.split(b"?", 1)[1] if b"?" in p else b"") if p is not None else None


def _status(c: HttpContext) -> bytes | None:
    h = c.stream.response_headers
    code = h.get(b":status") if h is not None else None
    return _i64(int(code)) if code and code.isdigit() else None


def _addr(a: tuple[str, int]) -> bytes | None:
    return f"{a[0]}:{a[1]}".encode() if a[0] else None


def _port(a: tuple[str, int]) -> bytes | None:
    return _i64(a[1]) if a[0] else None


def _header_bytes(h: HeaderMap | None) -> int:
    return h.byte_size() if h is not None else 0


def _s(get: Callable[[Stream], bytes | None]) -> Getter:
    return lambda c: get(c.stream)


_STREAM: dict[bytes, Getter] = {
    b"request\0path": _path,
    b"request\0url_path": _url_path,
    b"request\0query": _query,
    b"request\0host": _req(b":authority"),
    b"request\0scheme": _req(b":scheme"),
    b"request\0method": _req(b":method"),
    b"request\0headers": _map(MapType.REQUEST_HEADERS),
    b"request\0referer": _req(b"referer"),
    b"request\0useragent": _req(b"user-agent"),
    b"request\0id": _req(b"x-request-id"),
    b"request\0protocol": _s(lambda s: s.protocol),
    b"request\0time": _s(lambda s: _i64(s.start_ns) if s.start_ns else None),
    b"request\0duration": _s(lambda s: _i64(time.time_ns() - s.start_ns) if s.start_ns else None),
    b"request\0size": _s(lambda s: _i64(s.request_bytes)),
    b"request\0total_size": _s(lambda s: _i64(s.request_bytes + _header_bytes(s.request_headers))),
    b"response\0code": _status,
    b"response\0code_details": _s(lambda s: re.sub(r"\s", "_", s.code_details).encode() if s.code_details
                                   else None),
    b"response\0headers": _map(MapType.RESPONSE_HEADERS),
    b"response\0trailers": lambda c: _map(MapType.RESPONSE_TRAILERS)(c) if c.stream.response_trailers else None,
    b"response\0size": _s(lambda s: _i64(s.response_bytes) if s.response_headers is not None else None),
    b"response\0total_size": _s(lambda s: _i64(s.response_bytes + _header_bytes(s.response_headers))
                                 if s.response_headers is not None else None),
    b"source\0address": _s(lambda s: _addr(s.downstream_addr)),
    b"source\0port": _s(lambda s: _port(s.downstream_addr)),
    b"destination\0address": _s(lambda s: _addr(s.local_addr)),
    b"destination\0port": _s(lambda s: _port(s.local_addr)),
    b"connection\0id": _s(lambda s: struct.pack("<Q", s.connection_id) if s.connection_id else None),
    b"connection\0mtls": _s(lambda s: _bool(False)),
    b"connection\0requested_server_name": _s(lambda s: b""),
    b"upstream\0address": _s(lambda s: _addr(s.upstream_addr)),
    b"upstream\0port": _s(lambda s: _port(s.upstream_addr)),
}


def _node(vm: PluginVM, path: bytes) -> bytes | None:
    """``node`` attributes from the config file's ``node`` section (id, cluster, metadata)."""
    parts = path.split(b"\0")
    node = vm.node
    if len(parts) == 2 and parts[1] in (b"id", b"cluster"):
        value = node.get(parts[1].decode())
        return value.encode() if isinstance(value, str) else None
    if len(parts) >= 3 and parts[1] == b"metadata":
        meta = node.get("metadata")
        value = meta.get(parts[2].decode("utf-8", "replace")) if isinstance(meta, dict) else None
        return str(value).encode() if value is not None and len(parts) == 3 else None
    return None


def lookup(vm: PluginVM, path: bytes) -> bytes | None:
    if path == b"plugin_name":
        return vm.spec.name.encode()
    if path == b"plugin_root_id":
        return vm.spec.root_id.encode()
    if path == b"plugin_vm_id":
        return vm.spec.vm_id.encode()
    if path.startswith(b"node\0"):
        return _node(vm, path)
    ctx = vm.effective
    if not isinstance(ctx, HttpContext):
        return None
    getter = _STREAM.get(path)
    if getter is not None:
        return getter(ctx)
    return ctx.stream.filter_state.get(path)


@hostcall("iiii")
def proxy_get_property(vm: PluginVM, pp: int, ps: int, rp: int, rs: int) -> int:
    path = vm.instance.read(pp, ps)
    if path is None:
        return R.INVALID_MEMORY_ACCESS
    value = lookup(vm, path.rstrip(b"\0"))
    if value is None:
        return R.NOT_FOUND
    return vm.copy_out(value, rp, rs)


@hostcall("iiii")
def proxy_set_property(vm: PluginVM, pp: int, ps: int, vp: int, vs: int) -> int:
    path = vm.instance.read(pp, ps)
    value = vm.instance.read(vp, vs)
    if path is None or value is None:
        return R.INVALID_MEMORY_ACCESS
    ctx = vm.effective
    if not isinstance(ctx, HttpContext):
        return R.NOT_FOUND  # Envoy: no stream, no filter state
    ctx.stream.filter_state[path.rstrip(b"\0")] = value
    return R.OK
