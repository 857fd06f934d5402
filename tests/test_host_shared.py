"""Shared data (proxy_get/set_shared_data) and shared queues (register, resolve, enqueue,
dequeue, proxy_on_queue_ready), with proxy-wasm-cpp-host's semantics as Envoy 1.40 shows them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.abi.constants import WasmResult
from wasmgate.plugin import shared
from wasmgate.plugin.context import Stream
from wasmgate.plugin.shared import LocalStore, QueueListeners
from wat_util import OOB, R2, RP, RS, SENTINEL, Guest, module_wat, new_vm

R = WasmResult

# proxy_on_queue_ready records its calls: count, then the last (context id, token).
REC_QUEUE_READY = 0x160
QUEUE_READY = f"""
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (i32.store (i32.const {REC_QUEUE_READY}) (i32.add (i32.load (i32.const {REC_QUEUE_READY})) (i32.const 1)))
    (i32.store (i32.const {REC_QUEUE_READY + 4}) (local.get 0))
    (i32.store (i32.const {REC_QUEUE_READY + 8}) (local.get 1)))
"""


def wat() -> str:
    base = module_wat()
    assert base.endswith(")")
    return base[:-1] + QUEUE_READY + ")"


@pytest.fixture(autouse=True)
def store(monkeypatch: pytest.MonkeyPatch) -> LocalStore:
    """A fresh process-wide store and queue listeners for each test."""
    fresh = LocalStore()
    monkeypatch.setattr(shared, "STORE", fresh)
    monkeypatch.setattr(shared, "LISTENERS", QueueListeners())
    return fresh


class Vms:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.guests: list[Guest] = []

    def __call__(self, vm_id: str = "", name: str = "p") -> Guest:
        g = Guest(new_vm(self.tmp_path, wat(), name=name, vm_id=vm_id))
        self.guests.append(g)
        return g


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[Vms]:
    made = Vms(tmp_path)
    yield made
    for g in made.guests:
        g.vm.shutdown()


@pytest.fixture
def g(vms: Vms) -> Guest:
    return vms()


def sget(g: Guest, key: bytes) -> tuple[int, bytes | None, int | None]:
    kp, ks = g.put_str(key)
    g.poison(RP, RS, R2)
    st = g.call("proxy_get_shared_data", kp, ks, RP, RS, R2)
    if st != R.OK:
        assert (g.u32(RP), g.u32(RS), g.u32(R2)) == (SENTINEL,) * 3
        return st, None, None
    return st, g.out(), g.u32(R2)


def sset(g: Guest, key: bytes, value: bytes, cas: int = 0) -> int:
    kp, ks = g.put_str(key)
    vp, vs = g.put_str(value)
    return g.call("proxy_set_shared_data", kp, ks, vp, vs, cas)


def register(g: Guest, name: bytes) -> tuple[int, int]:
    p, n = g.put_str(name)
    g.poison(RP)
    return g.call("proxy_register_shared_queue", p, n, RP), g.u32(RP)


def resolve(g: Guest, vm_id: bytes, name: bytes) -> tuple[int, int]:
    vp, vs = g.put_str(vm_id)
    np, ns = g.put_str(name)
    g.poison(RP)
    return g.call("proxy_resolve_shared_queue", vp, vs, np, ns, RP), g.u32(RP)


def enqueue(g: Guest, token: int, value: bytes) -> int:
    p, n = g.put_str(value)
    return g.call("proxy_enqueue_shared_queue", token, p, n)


def dequeue(g: Guest, token: int) -> tuple[int, bytes | None]:
    g.poison(RP, RS)
    st = g.call("proxy_dequeue_shared_queue", token, RP, RS)
    return st, (g.out() if st == R.OK else None)


def queue_ready(g: Guest) -> tuple[int, int, int]:
    """(calls of proxy_on_queue_ready, last context id, last token)."""
    return g.u32(REC_QUEUE_READY), g.u32(REC_QUEUE_READY + 4), g.u32(REC_QUEUE_READY + 8)


# ---- shared data ---------------------------------------------------------------------


def test_get_missing(g: Guest) -> None:
    assert sget(g, b"k") == (R.NOT_FOUND, None, None)


def test_set_and_get(g: Guest) -> None:
    assert sset(g, b"k", b"v1") == R.OK
    assert sget(g, b"k") == (R.OK, b"v1", 1)
    assert sset(g, b"k", b"v2") == R.OK  # CAS 0: unconditional
    assert sget(g, b"k") == (R.OK, b"v2", 2)


def test_compare_and_swap(g: Guest) -> None:
    assert sset(g, b"k", b"v1") == R.OK
    assert sset(g, b"k", b"v2", cas=999) == R.CAS_MISMATCH
    assert sget(g, b"k") == (R.OK, b"v1", 1)
    assert sset(g, b"k", b"v2", cas=1) == R.OK
    assert sset(g, b"k", b"v3", cas=1) == R.CAS_MISMATCH  # stale
    assert sget(g, b"k") == (R.OK, b"v2", 2)


def test_set_missing_key_ignores_cas(g: Guest) -> None:
    assert sset(g, b"new", b"x", cas=5) == R.OK
    assert sget(g, b"new") == (R.OK, b"x", 1)


def test_cas_counter_is_process_wide(vms: Vms) -> None:
    a, b = vms("a"), vms("b")
    assert sset(a, b"k1", b"1") == R.OK
    assert sset(b, b"k2", b"2") == R.OK
    assert sset(a, b"k1", b"3") == R.OK
    assert sget(a, b"k1") == (R.OK, b"3", 3)
    assert sget(b, b"k2") == (R.OK, b"2", 2)


def test_cas_wraps_past_zero() -> None:
    store = LocalStore()
    store._cas = 0xFFFFFFFF
    assert store.set(b"", b"k", b"a", 0) == R.OK
    assert store.get(b"", b"k") == (b"a", 0xFFFFFFFF)
    assert store.set(b"", b"k", b"b", 0xFFFFFFFF) == R.OK
    assert store.get(b"", b"k") == (b"b", 1)  # 0 is skipped


def test_cas_argument_is_u32(g: Guest, store: LocalStore) -> None:
    store._cas = 0xFFFFFFFF
    assert sset(g, b"k", b"a") == R.OK
    assert sset(g, b"k", b"b", cas=-1) == R.OK  # the i32 -1 is CAS 0xFFFFFFFF
    assert sget(g, b"k") == (R.OK, b"b", 1)


def test_empty_key_and_value(g: Guest) -> None:
    assert sget(g, b"") == (R.NOT_FOUND, None, None)
    assert sset(g, b"", b"") == R.OK
    assert sget(g, b"") == (R.OK, b"", 1)
    assert g.u32(RP) == 0 and g.u32(RS) == 0  # nothing allocated for an empty value


def test_scope_is_vm_id(vms: Vms) -> None:
    a1, a2, b, empty1, empty2 = vms("a"), vms("a"), vms("b"), vms(""), vms("")
    assert sset(a1, b"k", b"from a") == R.OK
    assert sset(empty1, b"k", b"from empty") == R.OK
    assert sget(a2, b"k")[1] == b"from a"
    assert sget(b, b"k")[0] == R.NOT_FOUND
    assert sget(empty2, b"k")[1] == b"from empty"  # an empty vm_id is one scope of its own


def test_shared_data_bad_pointers(g: Guest) -> None:
    kp, ks = g.put_str(b"k")
    vp, vs = g.put_str(b"v")
    assert g.call("proxy_set_shared_data", OOB, 1, vp, vs, 0) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_set_shared_data", kp, ks, OOB, 1, 0) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_get_shared_data", OOB, 1, RP, RS, R2) == R.INVALID_MEMORY_ACCESS
    assert sget(g, b"k") == (R.NOT_FOUND, None, None)  # nothing was set
    assert sset(g, b"k", b"v") == R.OK
    assert g.call("proxy_get_shared_data", kp, ks, OOB, RS, R2) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_get_shared_data", kp, ks, RP, OOB, R2) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_get_shared_data", kp, ks, RP, RS, OOB) == R.INVALID_MEMORY_ACCESS


# ---- shared queues -------------------------------------------------------------------


def test_register_and_resolve(vms: Vms) -> None:
    g = vms("mine")
    assert resolve(g, b"", b"q") == (R.NOT_FOUND, SENTINEL)
    assert register(g, b"q") == (R.OK, 1)
    assert register(g, b"q") == (R.OK, 1)
    assert register(g, b"other") == (R.OK, 2)
    assert register(g, b"") == (R.OK, 3)
    assert resolve(g, b"", b"q") == (R.OK, 1)  # empty vm_id: the caller's
    assert resolve(g, b"mine", b"other") == (R.OK, 2)
    assert resolve(g, b"", b"") == (R.OK, 3)
    assert resolve(g, b"theirs", b"q") == (R.NOT_FOUND, SENTINEL)


def test_queues_are_scoped_by_vm_id(vms: Vms) -> None:
    a, b = vms("a"), vms("b")
    assert register(a, b"q") == (R.OK, 1)
    assert register(b, b"q") == (R.OK, 2)
    assert resolve(b, b"a", b"q") == (R.OK, 1)
    assert resolve(b, b"", b"q") == (R.OK, 2)


def test_enqueue_dequeue_fifo(g: Guest) -> None:
    _, t = register(g, b"q")
    assert dequeue(g, t) == (R.EMPTY, None)
    assert enqueue(g, t, b"one") == R.OK
    assert enqueue(g, t, b"") == R.OK
    assert enqueue(g, t, b"three") == R.OK
    assert dequeue(g, t) == (R.OK, b"one")
    assert dequeue(g, t) == (R.OK, b"")
    assert dequeue(g, t) == (R.OK, b"three")
    assert dequeue(g, t) == (R.EMPTY, None)


@pytest.mark.parametrize("token", [0, 2, 9999, 0xFFFFFFFF])
def test_unknown_token(g: Guest, token: int) -> None:
    register(g, b"q")
    assert enqueue(g, token, b"x") == R.NOT_FOUND
    assert dequeue(g, token) == (R.NOT_FOUND, None)


def test_any_vm_may_use_any_queue(vms: Vms) -> None:
    a, b = vms("a"), vms("b")
    _, t = register(a, b"q")
    assert enqueue(b, t, b"from b") == R.OK
    assert dequeue(b, t) == (R.OK, b"from b")


def test_queue_bad_pointers(g: Guest) -> None:
    assert g.call("proxy_register_shared_queue", OOB, 1, RP) == R.INVALID_MEMORY_ACCESS
    np, ns = g.put_str(b"q")
    assert g.call("proxy_register_shared_queue", np, ns, OOB) == R.INVALID_MEMORY_ACCESS
    assert resolve(g, b"", b"q") == (R.OK, 1)  # registered even though the token was not written
    assert g.call("proxy_resolve_shared_queue", OOB, 1, np, ns, RP) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_resolve_shared_queue", 0, 0, OOB, 1, RP) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_resolve_shared_queue", 0, 0, np, ns, OOB) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_enqueue_shared_queue", 1, OOB, 1) == R.INVALID_MEMORY_ACCESS
    assert dequeue(g, 1) == (R.EMPTY, None)
    assert enqueue(g, 1, b"lost") == R.OK
    assert g.call("proxy_dequeue_shared_queue", 1, OOB, RS) == R.INVALID_MEMORY_ACCESS
    assert dequeue(g, 1) == (R.EMPTY, None)  # as in Envoy, the item was taken all the same


# ---- proxy_on_queue_ready ------------------------------------------------------------


def test_queue_ready_is_delivered_after_the_call(g: Guest) -> None:
    _, t = register(g, b"q")
    assert enqueue(g, t, b"x") == R.OK
    assert queue_ready(g) == (0, 0, 0)  # not from inside the host call
    assert shared.LISTENERS.run_pending() == 1
    assert queue_ready(g) == (1, g.vm.root.id, t)
    assert dequeue(g, t) == (R.OK, b"x")


def test_queue_ready_on_the_event_loop(g: Guest) -> None:
    _, t = register(g, b"q")

    async def run() -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        g.vm.activate()  # serving on this loop
        assert enqueue(g, t, b"x") == R.OK
        assert enqueue(g, t, b"y") == R.OK
        before = queue_ready(g)
        await asyncio.sleep(0)
        return before, queue_ready(g)

    before, after = asyncio.run(run())
    assert before == (0, 0, 0)
    assert after == (2, g.vm.root.id, t)  # once per enqueue, as Envoy posts one per enqueue
    assert shared.LISTENERS.run_pending() == 0


def test_queue_ready_waits_for_a_starting_vm(g: Guest) -> None:
    """A VM enqueueing while it starts (off the loop) hears of it once it serves."""
    _, t = register(g, b"q")
    assert enqueue(g, t, b"x") == R.OK  # as from on_configure, in an executor thread

    async def run() -> tuple[int, int]:
        await asyncio.sleep(0)
        before = queue_ready(g)[0]
        g.vm.activate()
        await asyncio.sleep(0)
        return before, queue_ready(g)[0]

    assert asyncio.run(run()) == (0, 1)


def test_queue_ready_from_another_thread(vms: Vms) -> None:
    """An enqueue from an executor thread (a VM starting there) reaches the owner on its loop."""
    owner, starting = vms("x"), vms("x")
    _, t = register(owner, b"q")

    async def run() -> tuple[int, int, int]:
        owner.vm.activate()
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, enqueue, starting, t, b"x") == R.OK
        for _ in range(100):
            if queue_ready(owner)[0]:
                break
            await asyncio.sleep(0.01)
        return queue_ready(owner)

    assert asyncio.run(run()) == (1, owner.vm.root.id, t)
    assert queue_ready(starting)[0] == 0


def test_queue_ready_goes_to_the_registering_vm(vms: Vms) -> None:
    owner, other = vms("x"), vms("x")
    _, t = register(owner, b"q")
    assert enqueue(other, t, b"x") == R.OK
    shared.LISTENERS.run_pending()
    assert queue_ready(owner)[0] == 1
    assert queue_ready(other)[0] == 0
    # Registering the name again keeps the token and the items, and moves the queue.
    assert register(other, b"q") == (R.OK, t)
    assert enqueue(owner, t, b"y") == R.OK
    shared.LISTENERS.run_pending()
    assert (queue_ready(owner)[0], queue_ready(other)[0]) == (1, 1)
    assert dequeue(other, t) == (R.OK, b"x")


def test_queue_registered_from_a_stream_context_reports_to_the_root(g: Guest) -> None:
    g.http(Stream())
    _, t = register(g, b"q")
    assert enqueue(g, t, b"x") == R.OK
    shared.LISTENERS.run_pending()
    assert queue_ready(g) == (1, g.vm.root.id, t)


def test_no_delivery_to_a_vm_that_is_gone(vms: Vms) -> None:
    owner, other = vms(), vms()
    _, t = register(owner, b"q")
    owner.vm.shutdown()
    assert enqueue(other, t, b"x") == R.OK  # the queue outlives its owner
    assert shared.LISTENERS.run_pending() == 1
    assert queue_ready(other)[0] == 0
    assert dequeue(other, t) == (R.OK, b"x")


def test_module_without_on_queue_ready(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path))  # the default test module exports no proxy_on_queue_ready
    _, t = register(g, b"q")
    assert enqueue(g, t, b"x") == R.OK
    assert shared.LISTENERS.run_pending() == 1
    assert g.vm.failed is None


def test_cas_increments_from_many_threads_end_at_the_total() -> None:
    """The store's operations are atomic: CAS increments retried on mismatch never lose one.

    The key is set first: as in cpp-host, setting a missing key ignores the CAS, so two
    first writers could both succeed (the ABI has no atomic create).
    """
    store = LocalStore()
    assert store.set(b"", b"n", b"0", 0) == R.OK

    def worker() -> None:
        for _ in range(500):
            while True:
                entry = store.get(b"", b"n")
                assert entry is not None
                if store.set(b"", b"n", b"%d" % (int(entry[0]) + 1), entry[1]) == R.OK:
                    break

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert store.get(b"", b"n") == (b"4000", 4001)
