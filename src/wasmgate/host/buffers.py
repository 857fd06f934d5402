"""Buffer host functions: bodies and the plugin/VM configuration."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wasmgate.abi.constants import BufferType, WasmResult
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import NetworkContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult


def _buffer(vm: PluginVM, buffer_type: int) -> bytes | bytearray | None:
    # Envoy offers the configurations only inside the callback they are for.
    if buffer_type == BufferType.VM_CONFIGURATION:
        return vm.spec.vm_config if vm.starting else None
    if buffer_type == BufferType.PLUGIN_CONFIGURATION:
        return vm.spec.plugin_config if vm.configuring else None
    if buffer_type == BufferType.HTTP_CALL_RESPONSE_BODY:
        return vm.call_response.body if vm.call_response is not None else None
    if buffer_type == BufferType.CALL_DATA:
        return vm.call_data
    if buffer_type == BufferType.GRPC_RECEIVE_BUFFER:
        # The message in proxy_on_grpc_receive; elsewhere Envoy offers an empty buffer.
        receive = vm.grpc_receive
        return receive.message if receive is not None and receive.message is not None else b""
    ctx = vm.effective
    if buffer_type in _NETWORK:
        # A TCP connection's data; Envoy offers any context an empty, read-only buffer
        # when there is none (outside the data callback, or after the plugin continued).
        buf = None
        if isinstance(ctx, NetworkContext) and ctx.alive:
            buf = ctx.downstream_data if buffer_type == BufferType.DOWNSTREAM_DATA else ctx.upstream_data
        return b"" if buf is None else buf
    stream = ctx.stream if ctx is not None else None
    return stream.body(buffer_type) if stream is not None else None


_NETWORK = (BufferType.DOWNSTREAM_DATA, BufferType.UPSTREAM_DATA)
_HTTP_BODY = (BufferType.HTTP_REQUEST_BODY, BufferType.HTTP_RESPONSE_BODY)


def _or_empty(vm: PluginVM, buffer_type: int) -> bytes | bytearray | None:
    buf = _buffer(vm, buffer_type)
    # Envoy has an HTTP body buffer with no body in it (a header callback, a root
    # context): it reads as empty and refuses writes (BAD_ARGUMENT), never NOT_FOUND.
    if buf is None and buffer_type in _HTTP_BODY:
        return b""
    return buf


@hostcall("iiiii")
def proxy_get_buffer_bytes(vm: PluginVM, buffer_type: int, start: int, length: int, rp: int, rs: int) -> int:
    if not 0 <= buffer_type <= BufferType.CALL_DATA:
        return R.BAD_ARGUMENT
    buf = _or_empty(vm, buffer_type)
    if buf is None:
        return R.NOT_FOUND
    start &= 0xFFFFFFFF
    length &= 0xFFFFFFFF
    # Envoy clamps reads to the buffer: past the end is an empty OK read.
    return vm.copy_out(bytes(buf[start : start + length]), rp, rs)


@hostcall("iii")
def proxy_get_buffer_status(vm: PluginVM, buffer_type: int, length_ptr: int, flags_ptr: int) -> int:
    if not 0 <= buffer_type <= BufferType.CALL_DATA:
        return R.BAD_ARGUMENT
    buf = _or_empty(vm, buffer_type)
    if buf is None:
        return R.NOT_FOUND
    ok = vm.instance.write_u32(length_ptr, len(buf)) and vm.instance.write_u32(flags_ptr, 0)
    return R.OK if ok else R.INVALID_MEMORY_ACCESS


@hostcall("iiiii")
def proxy_set_buffer_bytes(vm: PluginVM, buffer_type: int, start: int, length: int, dp: int, ds: int) -> int:
    if not 0 <= buffer_type <= BufferType.CALL_DATA:
        return R.BAD_ARGUMENT
    buf = _or_empty(vm, buffer_type)
    if buf is None:
        return R.NOT_FOUND
    if not isinstance(buf, bytearray):
        return R.BAD_ARGUMENT  # configuration buffers and a missing body are read-only
    data = vm.read(dp, ds)
    if data is None:
        return R.INVALID_MEMORY_ACCESS
    start &= 0xFFFFFFFF
    length &= 0xFFFFFFFF
    # Envoy's rules: start 0 replaces the first `length` bytes (so (0, 0) prepends and
    # (0, >=size) replaces all); start >= size appends; anything else is refused.
    if start == 0:
        buf[:length] = data
    elif start >= len(buf):
        buf += data
    else:
        return R.BAD_ARGUMENT
    return R.OK


@hostcall("ii")
def proxy_get_configuration(vm: PluginVM, rp: int, rs: int) -> int:
    """ABI 0.1.0's way to read the plugin configuration (in on_configure)."""
    if not vm.configuring:
        return R.NOT_FOUND
    return vm.copy_out(vm.spec.plugin_config, rp, rs)
