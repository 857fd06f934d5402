"""Shared data and shared queues, scoped by the VM's vm_id (see plugin/shared.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.host.registry import hostcall
from wasmgate.plugin import shared

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult


def _vm_id(vm: PluginVM) -> bytes:
    return vm.spec.vm_id.encode()


@hostcall("iiiii")
def proxy_get_shared_data(vm: PluginVM, kp: int, ks: int, rp: int, rs: int, cas_ptr: int) -> int:
    key = vm.read(kp, ks)
    if key is None:
        return R.INVALID_MEMORY_ACCESS
    entry = shared.STORE.get(_vm_id(vm), key)
    if entry is None:
        return R.NOT_FOUND
    value, cas = entry
    st = vm.copy_out(value, rp, rs)
    if st != R.OK:
        return st
    return R.OK if vm.instance.write_u32(cas_ptr, cas) else R.INVALID_MEMORY_ACCESS


@hostcall("iiiii")
def proxy_set_shared_data(vm: PluginVM, kp: int, ks: int, vp: int, vs: int, cas: int) -> int:
    key = vm.read(kp, ks)
    value = vm.read(vp, vs)
    if key is None or value is None:
        return R.INVALID_MEMORY_ACCESS
    return shared.STORE.set(_vm_id(vm), key, value, cas & 0xFFFFFFFF)


@hostcall("iii")
def proxy_register_shared_queue(vm: PluginVM, np: int, ns: int, token_ptr: int) -> int:
    name = vm.read(np, ns)
    if name is None:
        return R.INVALID_MEMORY_ACCESS
    # Registered by a stream context or the root context alike, the queue belongs to the
    # VM's root context: proxy_on_queue_ready goes there.
    token = shared.STORE.register_queue(_vm_id(vm), name, shared.LISTENERS.owner_id(vm))
    return R.OK if vm.instance.write_u32(token_ptr, token) else R.INVALID_MEMORY_ACCESS


@hostcall("iiiii")
def proxy_resolve_shared_queue(vm: PluginVM, vp: int, vs: int, np: int, ns: int, token_ptr: int) -> int:
    vm_id = vm.read(vp, vs)
    name = vm.read(np, ns)
    if vm_id is None or name is None:
        return R.INVALID_MEMORY_ACCESS
    token = shared.STORE.resolve_queue(vm_id or _vm_id(vm), name)  # empty vm_id: the caller's
    if token == 0:
        return R.NOT_FOUND
    return R.OK if vm.instance.write_u32(token_ptr, token) else R.INVALID_MEMORY_ACCESS


@hostcall("iii")
def proxy_enqueue_shared_queue(vm: PluginVM, token: int, vp: int, vs: int) -> int:
    value = vm.read(vp, vs)
    if value is None:
        return R.INVALID_MEMORY_ACCESS
    token &= 0xFFFFFFFF
    owner = shared.STORE.enqueue(token, value)
    if owner is None:
        return R.NOT_FOUND
    shared.LISTENERS.notify(owner, token)
    return R.OK


@hostcall("iii")
def proxy_dequeue_shared_queue(vm: PluginVM, token: int, rp: int, rs: int) -> int:
    st, value = shared.STORE.dequeue(token & 0xFFFFFFFF)
    if st != R.OK:
        return st
    return vm.copy_out(value, rp, rs)  # as in Envoy, the item is gone even if this fails
