"""Housekeeping host functions: logging, time, status, contexts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from wasmgate.abi.constants import LogLevel, WasmResult
from wasmgate.host.registry import hostcall
from wasmgate.log import PY_LEVEL, wasm_level, wasm_log
from wasmgate.plugin.context import RootContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult
MAX_LOG_LINE: Final = 16 * 1024  # longer plugin log lines are cut, not written whole
_PY_LEVELS: Final = tuple(PY_LEVEL[lvl] for lvl in LogLevel)  # by proxy-wasm level (0..5), no Enum call per line
_OK: Final = int(R.OK)
_INVALID_MEMORY_ACCESS: Final = int(R.INVALID_MEMORY_ACCESS)
# isEnabledFor's own memo (Python 3.11): logging clears it in place on every level change,
# so a hit is current. Reading it spares an interpreted call per log line; a miss asks.
_WASM_ENABLED: Final[dict[int, bool]] = getattr(wasm_log, "_cache", {})


@hostcall("iii")
def proxy_log(vm: PluginVM, level: int, ptr: int, size: int) -> int:
    if not 0 <= level <= 5:  # LogLevel.TRACE .. LogLevel.CRITICAL
        return R.BAD_ARGUMENT
    py_level = _PY_LEVELS[level]
    enabled = _WASM_ENABLED.get(py_level)
    if enabled is None:
        enabled = wasm_log.isEnabledFor(py_level)
    if not enabled:
        # Below the wasm level: still check the pointers, skip the copy.
        in_bounds = (ptr & 0xFFFFFFFF) + (size & 0xFFFFFFFF) <= vm.memory_size()
        return _OK if in_bounds else _INVALID_MEMORY_ACCESS
    msg = vm.read(ptr, size)
    if msg is None:
        return R.INVALID_MEMORY_ACCESS
    text = msg[:MAX_LOG_LINE].decode("utf-8", "replace")
    if len(msg) > MAX_LOG_LINE:
        text += f"... [{len(msg) - MAX_LOG_LINE} more bytes]"
    vm.log(LogLevel(level), text)
    return R.OK


@hostcall("i")
def proxy_get_log_level(vm: PluginVM, ptr: int) -> int:
    return R.OK if vm.instance.write_u32(ptr, wasm_level()) else R.INVALID_MEMORY_ACCESS


@hostcall("i")
def proxy_get_current_time_nanoseconds(vm: PluginVM, ptr: int) -> int:
    return R.OK if vm.instance.write_u64(ptr, time.time_ns()) else R.INVALID_MEMORY_ACCESS


@hostcall("iii")
def proxy_get_status(vm: PluginVM, code_ptr: int, msg_ptr_ptr: int, msg_size_ptr: int) -> int:
    # Envoy's root-context status: the code of the last gRPC close (0 before any), its
    # message only during proxy_on_grpc_close.
    if not vm.instance.write_u32(code_ptr, vm.status_code):
        return R.INVALID_MEMORY_ACCESS
    return vm.copy_out(vm.status_message, msg_ptr_ptr, msg_size_ptr)


@hostcall("i")
def proxy_set_tick_period_milliseconds(vm: PluginVM, millis: int) -> int:
    # Envoy sets the timer of the caller's root context, whichever context calls.
    vm.set_tick_period(millis & 0xFFFFFFFF)
    return R.OK


@hostcall("")
def proxy_done(vm: PluginVM) -> int:
    ctx = vm.effective
    if not isinstance(ctx, RootContext) or not ctx.done_pending:
        return R.NOT_FOUND
    ctx.done_pending = False
    return R.OK


@hostcall("i")
def proxy_set_effective_context(vm: PluginVM, context_id: int) -> int:
    if context_id == 0:
        return R.OK  # Envoy: 0 means the current context
    ctx = vm.contexts.get(context_id)  # any context on the instance, as in Envoy
    if ctx is None:
        return R.BAD_ARGUMENT
    ctx.vm.effective = ctx
    vm.shared.current = ctx.vm  # later calls act for that context's plugin
    return R.OK
