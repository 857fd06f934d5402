"""proxy_get_property / proxy_set_property with Envoy's attribute paths and encodings.

A path is segments joined by NUL (``request\\0path``): the first names a top-level
attribute (host/attributes.py), each further one a map key, message field or list index
below it. The value found is encoded as Envoy's ``serializeValue`` does: strings and
bytes raw, integers 8-byte little-endian, booleans one byte, timestamps and durations
int64 nanoseconds, maps and lists as serialized pairs, messages as serialized protobuf;
what cannot be serialized (Envoy's wrapper maps, null) is SERIALIZATION_FAILURE.
``proxy_set_property`` writes the stream's filter state under ``wasm.<path>`` (Envoy's
CelState); a later read of that name returns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.host import attributes
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext, NetworkContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult


def get(vm: PluginVM, path: bytes) -> tuple[WasmResult, bytes]:
    """The status and encoded value of the attribute at ``path`` (segments joined by NUL)."""
    value = attributes.lookup_path(vm, path)
    if value is None:
        return R.NOT_FOUND, b""
    try:
        return R.OK, attributes.serialize(value)
    except attributes.SerializationFailure:
        return R.SERIALIZATION_FAILURE, b""


@hostcall("iiii")
def proxy_get_property(vm: PluginVM, pp: int, ps: int, rp: int, rs: int) -> int:
    path = vm.read(pp, ps)
    if path is None:
        return R.INVALID_MEMORY_ACCESS
    status, value = get(vm, path.rstrip(b"\0"))
    if status != R.OK:
        return status
    return vm.copy_out(value, rp, rs)


@hostcall("iiii")
def proxy_set_property(vm: PluginVM, pp: int, ps: int, vp: int, vs: int) -> int:
    path = vm.read(pp, ps)
    value = vm.read(vp, vs)
    if path is None or value is None:
        return R.INVALID_MEMORY_ACCESS
    ctx = vm.effective
    if isinstance(ctx, NetworkContext):
        state = ctx.conn.filter_state  # a TCP connection's own filter state
    elif isinstance(ctx, HttpContext):
        state = ctx.stream.filter_state
    else:
        return R.NOT_FOUND  # Envoy: no stream, no filter state
    path = path.rstrip(b"\0")
    key = b"wasm." + path
    declared = vm.declared_properties.get(path)
    if declared is not None and declared[1] and key in state:
        return R.BAD_ARGUMENT  # a read-only declared property is set once
    state[key] = value
    return R.OK
