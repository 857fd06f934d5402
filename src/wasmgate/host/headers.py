"""Header map host functions: proxy_*_header_map_* (every map type, trailers included)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from wasmgate.abi.constants import AbiVersion, MapType, WasmResult, Word
from wasmgate.abi.pairs import PairsError, decode_pairs, encode_pairs
from wasmgate.headers import HeaderMap
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult
_NOT_FOUND: Final = int(R.NOT_FOUND)  # plain ints where a lookup per call shows: an Enum member costs ~70 ns
_ABI_0_1_0: Final = AbiVersion.V0_1_0


_MAX_MAP_TYPE: Final = 7
_lower: Final = bytes.lower  # called unbound: no method lookup per call
_GRPC_MAPS: Final = (MapType.GRPC_RECEIVE_INITIAL_METADATA, MapType.GRPC_RECEIVE_TRAILING_METADATA)


def _map(vm: PluginVM, map_type: int) -> HeaderMap | None:
    """The map if this context may touch it now (see HttpContext.header_map)."""
    if 0 <= map_type <= 3:  # the stream's own headers and trailers: the common case first
        ctx = vm.effective
        return ctx.header_map(map_type) if isinstance(ctx, HttpContext) else None
    if map_type in _GRPC_MAPS:
        receive = vm.grpc_receive  # only during the matching proxy_on_grpc_receive_*_metadata
        if receive is None:
            return None
        return receive.initial if map_type == MapType.GRPC_RECEIVE_INITIAL_METADATA else receive.trailing
    if map_type in (MapType.HTTP_CALL_RESPONSE_HEADERS, MapType.HTTP_CALL_RESPONSE_TRAILERS):
        resp = vm.call_response
        if resp is None:
            return None
        return resp.headers if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS else resp.trailers
    ctx = vm.effective
    if not isinstance(ctx, HttpContext) or not 0 <= map_type <= _MAX_MAP_TYPE:
        return None
    return ctx.header_map(map_type)


def _writable(vm: PluginVM, map_type: int) -> HeaderMap | None:
    ctx = vm.effective
    if isinstance(ctx, HttpContext) and ctx.logging:
        return None  # maps are read-only in on_log
    if map_type in _GRPC_MAPS:
        return None  # Envoy: gRPC metadata is read-only
    return _map(vm, map_type)


def _missing(vm: PluginVM) -> int:
    # Envoy: an unavailable map is BadArgument, except while logging (NotFound).
    ctx = vm.effective
    return R.NOT_FOUND if isinstance(ctx, HttpContext) and ctx.logging else R.BAD_ARGUMENT


@hostcall("iiiii")
def proxy_get_header_map_value(vm: PluginVM, map_type: int, kp: Word, ks: Word, rvp: Word, rsp: Word) -> int:
    if not 0 <= map_type <= _MAX_MAP_TYPE:
        return R.BAD_ARGUMENT
    hmap = _map(vm, map_type)
    if hmap is None:
        return _missing(vm)
    key = vm.read(kp, ks)
    if key is None:
        return R.INVALID_MEMORY_ACCESS
    if len(key) == 4 and _lower(key) == b"host":  # (the length first: no new bytes per lookup)
        key = b":authority"  # Envoy answers Host from :authority
    value = hmap.get(key)
    if value is None:
        if vm.abi is not _ABI_0_1_0:
            return _NOT_FOUND
        value = b""  # ABI 0.1.0: a missing header reads as empty
    return vm.copy_out(value, rvp, rsp)


@hostcall("iii")
def proxy_get_header_map_pairs(vm: PluginVM, map_type: int, rp: int, rs: int) -> int:
    if not 0 <= map_type <= _MAX_MAP_TYPE:
        return R.BAD_ARGUMENT
    hmap = _map(vm, map_type)
    if hmap is None:
        return _missing(vm) if isinstance(vm.effective, HttpContext) and vm.effective.logging \
            else vm.copy_out(b"", rp, rs)  # Envoy: an unavailable map reads as empty
    return vm.copy_out(encode_pairs(hmap.pairs) if hmap.pairs else b"", rp, rs)


@hostcall("iii")
def proxy_set_header_map_pairs(vm: PluginVM, map_type: int, ptr: int, size: int) -> int:
    hmap = _writable(vm, map_type)
    if hmap is None:
        return R.BAD_ARGUMENT
    data = vm.read(ptr, size)
    if data is None:
        return R.INVALID_MEMORY_ACCESS
    try:
        hmap.set_all(decode_pairs(data))
    except PairsError:
        return R.BAD_ARGUMENT
    return R.OK


@hostcall("ii")
def proxy_get_header_map_size(vm: PluginVM, map_type: int, rs: int) -> int:
    if not 0 <= map_type <= _MAX_MAP_TYPE or map_type in _GRPC_MAPS:
        return R.BAD_ARGUMENT  # Envoy sizes only maps a plugin could write
    hmap = _map(vm, map_type)
    if hmap is None:
        return _missing(vm)
    return R.OK if vm.instance.write_u32(rs, hmap.byte_size()) else R.INVALID_MEMORY_ACCESS


def _key_value(vm: PluginVM, kp: int, ks: int, vp: int, vs: int) -> tuple[bytes, bytes] | None:
    key = vm.read(kp, ks)
    value = vm.read(vp, vs)
    if key is None or value is None:
        return None
    return key, value


@hostcall("iiiii")
def proxy_add_header_map_value(vm: PluginVM, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
    hmap = _writable(vm, map_type)
    if hmap is None:
        return R.BAD_ARGUMENT
    kv = _key_value(vm, kp, ks, vp, vs)
    if kv is None:
        return R.INVALID_MEMORY_ACCESS
    hmap.add(*kv)
    return R.OK


@hostcall("iiiii")
def proxy_replace_header_map_value(vm: PluginVM, map_type: int, kp: int, ks: int, vp: int, vs: int) -> int:
    hmap = _writable(vm, map_type)
    if hmap is None:
        return R.BAD_ARGUMENT
    kv = _key_value(vm, kp, ks, vp, vs)
    if kv is None:
        return R.INVALID_MEMORY_ACCESS
    hmap.replace(*kv)
    return R.OK


@hostcall("iii")
def proxy_remove_header_map_value(vm: PluginVM, map_type: int, kp: int, ks: int) -> int:
    hmap = _writable(vm, map_type)
    if hmap is None:
        return R.BAD_ARGUMENT
    key = vm.read(kp, ks)
    if key is None:
        return R.INVALID_MEMORY_ACCESS
    hmap.remove(key)
    return R.OK
