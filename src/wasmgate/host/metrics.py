"""Metrics: proxy_define_metric, proxy_increment_metric, proxy_record_metric, proxy_get_metric.

Metric ids belong to the module instance (shared by the plugins on it, as in Envoy); the
metrics themselves are process-wide (plugin/metrics.py).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.host.registry import hostcall
from wasmgate.plugin.metrics import VmMetrics

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM, SharedVM

R = WasmResult

_by_vm: weakref.WeakKeyDictionary[SharedVM, VmMetrics] = weakref.WeakKeyDictionary()


def vm_metrics(vm: PluginVM) -> VmMetrics:
    """The metric ids of the VM's instance (created on first use)."""
    m = _by_vm.get(vm.shared)
    if m is None:
        m = _by_vm[vm.shared] = VmMetrics()
    return m


@hostcall("iiii")
def proxy_define_metric(vm: PluginVM, mtype: int, np: int, ns: int, id_ptr: int) -> int:
    name = vm.read(np, ns)
    if name is None:
        return R.INVALID_MEMORY_ACCESS
    st, mid = vm_metrics(vm).define(mtype & 0xFFFFFFFF, name)
    if st != R.OK:
        return st
    return R.OK if vm.instance.write_u32(id_ptr, mid) else R.INVALID_MEMORY_ACCESS


@hostcall("iI")
def proxy_increment_metric(vm: PluginVM, mid: int, offset: int) -> int:
    return vm_metrics(vm).increment(mid & 0xFFFFFFFF, offset)


@hostcall("iI")
def proxy_record_metric(vm: PluginVM, mid: int, value: int) -> int:
    return vm_metrics(vm).record(mid & 0xFFFFFFFF, value)


@hostcall("ii")
def proxy_get_metric(vm: PluginVM, mid: int, value_ptr: int) -> int:
    st, value = vm_metrics(vm).get(mid & 0xFFFFFFFF)
    if st != R.OK:
        return st
    return R.OK if vm.instance.write_u64(value_ptr, value) else R.INVALID_MEMORY_ACCESS
