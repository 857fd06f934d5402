"""proxy_call_foreign_function and the foreign functions Envoy ships that plugins call.

Each foreign function takes the argument bytes and returns result bytes, or raises
``ForeignError(status)``. Arguments that Envoy defines as protobuf messages are read
with a small wire-format reader (their fields are plain strings and enums).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext, NetworkContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult

ForeignFunction = Callable[["PluginVM", bytes], bytes]


class ForeignError(Exception):
    def __init__(self, status: WasmResult):
        super().__init__(status.name)
        self.status = status


FOREIGN: dict[str, ForeignFunction] = {}


def foreign(name: str) -> Callable[[ForeignFunction], ForeignFunction]:
    def register(fn: ForeignFunction) -> ForeignFunction:
        FOREIGN[name] = fn
        return fn
    return register


def proto_fields(data: bytes) -> dict[int, bytes | int]:
    """The last value of each field of a protobuf message (varints and length-delimited only)."""
    out: dict[int, bytes | int] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ForeignError(R.BAD_ARGUMENT)
            b = data[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out[field] = varint()
        elif wire == 2:
            n = varint()
            if pos + n > len(data):
                raise ForeignError(R.BAD_ARGUMENT)
            out[field] = data[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ForeignError(R.BAD_ARGUMENT)
    return out


def _stream_context(vm: PluginVM) -> HttpContext:
    ctx = vm.effective
    if not isinstance(ctx, HttpContext):
        raise ForeignError(R.NOT_FOUND)
    return ctx


@foreign("compress")
def _compress(vm: PluginVM, arg: bytes) -> bytes:
    return zlib.compress(arg)


@foreign("uncompress")
def _uncompress(vm: PluginVM, arg: bytes) -> bytes:
    try:
        return zlib.decompress(arg)
    except zlib.error:
        raise ForeignError(R.SERIALIZATION_FAILURE) from None


@foreign("set_envoy_filter_state")
def _set_envoy_filter_state(vm: PluginVM, arg: bytes) -> bytes:
    # SetEnvoyFilterStateArguments: path = 1, value = 2, span = 3
    fields = proto_fields(arg)
    path, value = fields.get(1, b""), fields.get(2, b"")
    if not isinstance(path, bytes) or not isinstance(value, bytes) or not path:
        raise ForeignError(R.BAD_ARGUMENT)
    ctx = vm.effective
    state = ctx.conn.filter_state if isinstance(ctx, NetworkContext) else _stream_context(vm).stream.filter_state
    state[path] = value
    return b""


@foreign("clear_route_cache")
def _clear_route_cache(vm: PluginVM, arg: bytes) -> bytes:
    return b""  # one route: nothing cached


@foreign("declare_property")
def _declare_property(vm: PluginVM, arg: bytes) -> bytes:
    # DeclarePropertyArguments: name = 1, readonly = 2, type = 3 (WasmType: 0 bytes, 1 string,
    # 2 flatbuffers, 3 protobuf), schema = 4, span = 5
    fields = proto_fields(arg)
    name, readonly, kind = fields.get(1, b""), fields.get(2, 0), fields.get(3, 0)
    if not isinstance(name, bytes) or not isinstance(kind, int) or not isinstance(readonly, int):
        raise ForeignError(R.BAD_ARGUMENT)
    if name in vm.declared_properties:
        raise ForeignError(R.BAD_ARGUMENT)  # Envoy refuses a second declaration
    vm.declared_properties[name] = (kind, bool(readonly))
    return b""


@hostcall("iiiiii")
def proxy_call_foreign_function(vm: PluginVM, np: int, ns: int, ap: int, asz: int, rp: int, rs: int) -> int:
    name = vm.read(np, ns)
    arg = vm.read(ap, asz)
    if name is None or arg is None:
        return R.INVALID_MEMORY_ACCESS
    fn = FOREIGN.get(name.decode("utf-8", "replace"))
    if fn is None:
        return R.NOT_FOUND
    try:
        result = fn(vm, arg)
    except ForeignError as e:
        return e.status
    return vm.copy_out(result, rp, rs)
