"""Shared data and shared queues: state plugins share across VMs, scoped by vm_id.

``SharedStore`` is the seam. Its operations are synchronous and small, and take and
return only bytes and ints, so an implementation may live in another process: the
multi-worker proxy will put one store behind every worker. ``LocalStore`` is the
in-process implementation, with proxy-wasm-cpp-host's semantics (src/shared_data.cc,
src/shared_queue.cc):

* Shared data is keyed by (vm_id, key); an empty vm_id is a scope of its own. Every
  successful set gives the entry the next CAS value of one process-wide counter that
  starts at 1 and skips 0. A set with CAS 0 is unconditional; any other CAS must equal
  the entry's, else CAS_MISMATCH; a set of a missing key succeeds whatever its CAS.
* A queue is keyed by (vm_id, name) and gets a token (1, 2, ...; never 0). Registering
  the name again returns the same token, keeps the queued items and makes the caller
  the queue's owner. Any VM may resolve, enqueue to and dequeue from any queue; each
  enqueue tells the owner, whose root context then gets proxy_on_queue_ready.

Owners are opaque ints to the store. ``QueueListeners`` maps them to VMs in this
process and delivers proxy_on_queue_ready on the owner's event loop, after the call
that enqueued has returned, as Envoy posts it to the owning thread's dispatcher. A
cross-process store would route an owner to its worker and notify there.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult
_U32 = 0xFFFFFFFF


class SharedStore(ABC):
    """Shared data and queues of every VM. Bytes and ints in, bytes and ints out."""

    @abstractmethod
    def get(self, vm_id: bytes, key: bytes) -> tuple[bytes, int] | None:
        """The value and CAS of ``key``, or None when it is not set."""

    @abstractmethod
    def set(self, vm_id: bytes, key: bytes, value: bytes, cas: int) -> WasmResult:
        """Store ``value``: OK, or CAS_MISMATCH when ``cas`` is not 0 nor the entry's CAS."""

    @abstractmethod
    def register_queue(self, vm_id: bytes, name: bytes, owner: int) -> int:
        """The queue's token (created if new); ``owner`` hears of new items from now on."""

    @abstractmethod
    def resolve_queue(self, vm_id: bytes, name: bytes) -> int:
        """The queue's token, or 0 when no VM registered it."""

    @abstractmethod
    def enqueue(self, token: int, value: bytes) -> int | None:
        """Append ``value``; returns the owner to notify, or None for an unknown token."""

    @abstractmethod
    def dequeue(self, token: int) -> tuple[WasmResult, bytes]:
        """(OK, the oldest item), (EMPTY, b"") or (NOT_FOUND, b"") for an unknown token."""


class _Queue:
    __slots__ = ("items", "owner")

    def __init__(self, owner: int):
        self.owner = owner
        self.items: deque[bytes] = deque()


class LocalStore(SharedStore):
    """The store of one process, with proxy-wasm-cpp-host's semantics.

    A lock makes each operation atomic, as cpp-host's mutex does: VMs start (and may call
    these) in executor threads while the event loop serves requests.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[tuple[bytes, bytes], tuple[bytes, int]] = {}
        self._cas = 1
        self._tokens: dict[tuple[bytes, bytes], int] = {}
        self._queues: dict[int, _Queue] = {}
        self._next_token = 1

    def _next_cas(self) -> int:
        cas = self._cas
        self._cas = (self._cas + 1) & _U32 or 1  # 0 is not a valid CAS
        return cas

    def get(self, vm_id: bytes, key: bytes) -> tuple[bytes, int] | None:
        with self._lock:
            return self._data.get((vm_id, key))

    def set(self, vm_id: bytes, key: bytes, value: bytes, cas: int) -> WasmResult:
        with self._lock:
            entry = self._data.get((vm_id, key))
            if entry is not None and cas != 0 and cas != entry[1]:
                return R.CAS_MISMATCH
            self._data[(vm_id, key)] = (value, self._next_cas())
            return R.OK

    def register_queue(self, vm_id: bytes, name: bytes, owner: int) -> int:
        with self._lock:
            token = self._tokens.get((vm_id, name))
            if token is None:
                while True:  # tokens are never 0 and never reused while a queue holds them
                    token, self._next_token = self._next_token, (self._next_token + 1) & _U32
                    if token and token not in self._queues:
                        break
                self._tokens[(vm_id, name)] = token
                self._queues[token] = _Queue(owner)
            else:
                self._queues[token].owner = owner
            return token

    def resolve_queue(self, vm_id: bytes, name: bytes) -> int:
        with self._lock:
            return self._tokens.get((vm_id, name), 0)

    def enqueue(self, token: int, value: bytes) -> int | None:
        with self._lock:
            q = self._queues.get(token)
            if q is None:
                return None
            q.items.append(value)
            return q.owner

    def dequeue(self, token: int) -> tuple[WasmResult, bytes]:
        with self._lock:
            q = self._queues.get(token)
            if q is None:
                return R.NOT_FOUND, b""
            if not q.items:
                return R.EMPTY, b""
            return R.OK, q.items.popleft()


class QueueListeners:
    """Queue owners of this process: an owner id per VM, and delivery of proxy_on_queue_ready.

    Delivery runs on the event loop the owner serves on, after the call that enqueued has
    returned. A VM takes deliveries once it is activated (``PluginVM.activate``, on that
    loop): a VM still starting in an executor thread may enqueue (to itself too) from
    on_vm_start or on_configure, and what it is told waits until it serves, so a VM is
    never entered from two threads. VMs are held weakly; a VM that is gone, failed or
    shut down is skipped, as Envoy skips an owner whose Wasm or context no longer exists.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()  # executor threads start VMs (and may enqueue) off the loop
        self._ids = itertools.count(1)
        self._owners: dict[int, weakref.ref[PluginVM]] = {}
        self._by_vm: weakref.WeakKeyDictionary[PluginVM, int] = weakref.WeakKeyDictionary()
        self._loops: weakref.WeakKeyDictionary[PluginVM, asyncio.AbstractEventLoop] = weakref.WeakKeyDictionary()
        self._waiting: weakref.WeakKeyDictionary[PluginVM, list[int]] = weakref.WeakKeyDictionary()

    def owner_id(self, vm: PluginVM) -> int:
        with self._lock:
            oid = self._by_vm.get(vm)
            if oid is None:
                oid = self._by_vm[vm] = next(self._ids)
                self._owners[oid] = weakref.ref(vm, self._forget(oid))
            return oid

    def _forget(self, oid: int) -> Callable[[weakref.ref[PluginVM]], None]:
        def forget(_ref: weakref.ref[PluginVM]) -> None:
            self._owners.pop(oid, None)

        return forget

    def activate(self, vm: PluginVM) -> None:
        """``vm`` serves on the running loop from now on: deliver what waited for it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a test driving the VM by hand): see run_pending
        with self._lock:
            self._loops[vm] = loop
            waiting = self._waiting.pop(vm, [])
        for token in waiting:
            loop.call_soon(_deliver, weakref.ref(vm), token)

    def notify(self, owner: int, token: int) -> None:
        """Tell the owner's root context of a new item, once the current call returns."""
        with self._lock:
            ref = self._owners.get(owner)
            vm = ref() if ref is not None else None
            if ref is None or vm is None:
                return
            loop = self._loops.get(vm)
            if loop is None:
                self._waiting.setdefault(vm, []).append(token)
                return
        if loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.call_soon(_deliver, ref, token)
        else:
            loop.call_soon_threadsafe(_deliver, ref, token)

    def run_pending(self) -> int:
        """Deliver, here and now, what waits for VMs never activated (tests driving VMs by
        hand); returns how many."""
        with self._lock:
            waiting = [(weakref.ref(vm), tokens) for vm, tokens in self._waiting.items()]
            self._waiting.clear()
        for ref, tokens in waiting:
            for token in tokens:
                _deliver(ref, token)
        return sum(len(tokens) for _, tokens in waiting)


def _deliver(ref: weakref.ref[PluginVM], token: int) -> None:
    vm = ref()
    if vm is not None and vm.failed is None:
        vm.on_queue_ready(token)


STORE: SharedStore = LocalStore()
LISTENERS = QueueListeners()


def use_store(store: SharedStore) -> SharedStore:
    """Replace the process's store (a cross-process one, or a fresh one in tests); returns the old."""
    global STORE
    old, STORE = STORE, store
    return old
