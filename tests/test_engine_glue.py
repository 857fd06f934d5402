"""The two implementations of engine/wasm.py's hot operations behave alike.

Every test runs against the compiled glue (``_glue.pyx``) and the ctypes path, on small
WAT modules: guest calls, host-function arguments and results, traps from host
exceptions, nested calls, linear memory bounds, copy_out and the CPU deadline.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wasmgate.engine import wasm
from wasmgate.engine.wasm import HostError, HostFunc, Instance, ProcExit, WasmTrap, compile_module, wat_to_wasm
from wasmgate.plugin.manager import engine

IMPLS = ["compiled", "ctypes"]

_WAT = """
(module
  (import "env" "h32" (func $h32 (param i32 i64) (result i32)))
  (import "env" "h64" (func $h64 (param i32 i64) (result i64)))
  (import "env" "h0" (func $h0 (result i32)))
  (import "env" "nothing" (func $nothing (param i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "id64") (param i64) (result i64) (local.get 0))
  (func (export "noresult") (param i32) (i32.store (i32.const 0x10) (local.get 0)))
  (func (export "call_h32") (param i32 i64) (result i32) (call $h32 (local.get 0) (local.get 1)))
  (func (export "store_h64") (param i32 i64) (i64.store (i32.const 0x50) (call $h64 (local.get 0) (local.get 1))))
  (func (export "trap") (result i32) unreachable)
  (func (export "call_h0") (result i32) (call $h0))
  (func (export "call_nothing") (param i32) (call $nothing (local.get 0)))
  (func (export "spin") (loop $l (br $l)))
  (func (export "poll_h0") (loop $l (br_if $l (i32.eqz (call $h0)))))
  (func (export "grow_and_store") (param i32) (result i32)
    (drop (memory.grow (local.get 0)))
    (i32.store (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 4)) (i32.const 0x11223344))
    (memory.size))
  (func (export "alloc") (param i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get 0)))
    (local.get $p))
  (func (export "alloc_fails") (param i32) (result i32) (i32.const 0))
  (func (export "neg") (result i32) (i32.const -5)))
"""

_module: Any = None


def _compiled_module() -> Any:
    global _module
    if _module is None:
        _module = compile_module(engine(), wat_to_wasm(_WAT), "glue-test")
    return _module


class Host:
    """Host functions whose behaviour a test sets; records what they got."""

    def __init__(self) -> None:
        self.got: list[tuple[int, ...]] = []
        self.h32: Callable[..., Any] = lambda *a: 0
        self.h64: Callable[..., Any] = lambda *a: 0
        self.h0: Callable[..., Any] = lambda *a: 7
        self.nothing: Callable[..., Any] = lambda *a: None
        self.inst: Instance | None = None
        self.current = self  # h0 and nothing are bound to host.current (as host.bind does)

    def funcs(self) -> dict[tuple[str, str], HostFunc]:
        def rec(name: str) -> Callable[..., Any]:
            def f(host: Host, *args: int) -> Any:
                host.got.append(args)
                return getattr(host, name)(*args)
            return f

        return {("env", n): HostFunc("env", n, p, r, rec(n), self, attr)
                for n, p, r, attr in (("h32", "iI", "i", ""), ("h64", "iI", "I", ""), ("h0", "", "i", "current"),
                                      ("nothing", "i", "", "current"))}


def unknown(module: str, name: str, params: str, results: str) -> HostFunc:
    raise AssertionError(f"unexpected import {module}.{name}")


def need(impl: str) -> None:
    """Skip a compiled case where the glue is off on purpose; fail it where it is not built."""
    if impl == "compiled" and wasm._glue is None:
        if os.environ.get(wasm.PURE_PYTHON_ENV):
            pytest.skip(f"{wasm.PURE_PYTHON_ENV} is set")
        pytest.fail("the compiled glue is not built (make setup builds it with Cython)")


def new_instance(impl: str, deadline: float = 5.0) -> tuple[Instance, Host]:
    need(impl)
    host = Host()
    inst = Instance(engine(), _compiled_module(), host.funcs(), unknown, deadline=deadline,
                    compiled=impl == "compiled")
    inst.keep_gil()
    host.inst = inst
    return inst, host


def fn(inst: Instance, name: str) -> wasm.GuestFunc:
    f = inst.func(name)
    assert f is not None
    return f


def test_compiled_glue_is_the_default_when_built() -> None:
    if os.environ.get(wasm.PURE_PYTHON_ENV):
        assert not wasm.COMPILED
    else:
        assert wasm.COMPILED, "make setup should have built wasmgate.engine._glue"


@pytest.mark.parametrize("impl", IMPLS)
def test_guest_calls_pass_and_return_values(impl: str) -> None:
    inst, _ = new_instance(impl)
    assert inst.compiled == (impl == "compiled")
    assert inst.call(fn(inst, "add"), 2, 3) == 5
    assert inst.call(fn(inst, "add"), -7, 3) == -4  # i32 results are signed
    assert inst.call(fn(inst, "add"), 0x7FFFFFFF, 1) == -0x80000000
    assert inst.call(fn(inst, "add"), 1, 2, 99, 100) == 3  # extra arguments are dropped
    assert inst.call(fn(inst, "noresult"), 0x1234) == 0
    assert inst.read(0x10, 4) == struct.pack("<I", 0x1234)
    assert inst.call(fn(inst, "neg")) == -5
    assert inst.call_reentrant(fn(inst, "neg")) == 0xFFFFFFFB  # nested results are u32


@pytest.mark.parametrize("impl", IMPLS)
def test_host_functions_get_signed_arguments_and_set_results(impl: str) -> None:
    inst, host = new_instance(impl)
    host.h32 = lambda a, b: a + 1
    assert inst.call(fn(inst, "call_h32"), -2, -(2**40)) == -1
    assert host.got[-1] == (-2, -(2**40))
    host.h32 = lambda a, b: 0x1_0000_0005  # wider than i32: the low 32 bits
    assert inst.call(fn(inst, "call_h32"), 0, 0) == 5
    host.h32 = lambda a, b: None  # no value: 0
    assert inst.call(fn(inst, "call_h32"), 1, 1) == 0
    host.h64 = lambda a, b: b * 2
    inst.call(fn(inst, "store_h64"), 0, 2**40)
    assert host.got[-1] == (0, 2**40)
    assert inst.read(0x50, 8) == struct.pack("<q", 2**41)
    host.h64 = lambda a, b: -3
    inst.call(fn(inst, "store_h64"), 0, 0)
    assert inst.read(0x50, 8) == struct.pack("<q", -3)
    assert inst.call(fn(inst, "call_h0")) == 7
    inst.call(fn(inst, "call_nothing"), 9)
    assert list(host.got[-1]) == [9]


@pytest.mark.parametrize("impl", IMPLS)
def test_bound_attribute_is_read_at_each_call(impl: str) -> None:
    inst, host = new_instance(impl)
    other = Host()
    other.h0 = lambda: 11
    inst.call(fn(inst, "call_nothing"), 1)
    host.current = other
    inst.call(fn(inst, "call_nothing"), 2)
    assert inst.call(fn(inst, "call_h0")) == 11
    assert host.got == [(1,)] and other.got == [(2,), ()]


@pytest.mark.parametrize("impl", IMPLS)
def test_bound_attribute_with_a_c_getter_is_read_at_each_call(impl: str) -> None:
    """An attribute its class serves with a C getter (a compiled class's field, as
    SharedVM.current; here an instance's ``__dict__``), read through it at each call."""
    need(impl)
    host = Host()
    seen: list[tuple[object, tuple[int, ...]]] = []
    funcs = host.funcs()
    funcs[("env", "nothing")] = HostFunc("env", "nothing", "i", "", lambda d, *a: seen.append((d.get("tag"), a)),
                                         host, "__dict__")
    inst = Instance(engine(), _compiled_module(), funcs, unknown, compiled=impl == "compiled")
    inst.keep_gil()
    host.tag = "first"  # type: ignore[attr-defined]
    inst.call(fn(inst, "call_nothing"), 1)
    host.__dict__ = {**host.__dict__, "tag": "second"}  # another dict object
    inst.call(fn(inst, "call_nothing"), 2)
    assert seen == [("first", (1,)), ("second", (2,))]


@pytest.mark.parametrize("impl", IMPLS)
def test_host_exceptions_become_traps(impl: str) -> None:
    inst, host = new_instance(impl)

    def boom(*_: int) -> int:
        raise ValueError("boom")

    host.h32 = boom
    with pytest.raises(WasmTrap) as e:
        inst.call(fn(inst, "call_h32"), 1, 2)
    assert e.value.message == "call_h32: host function env.h32 failed: boom"
    assert inst.host_error is None  # consumed by the trap report

    def refuse(*_: int) -> int:
        raise HostError("a clean message")

    host.h32 = refuse
    with pytest.raises(WasmTrap, match=r"^call_h32: a clean message$"):
        inst.call(fn(inst, "call_h32"), 1, 2)

    def leave(*_: int) -> int:
        raise ProcExit(3)

    host.h0 = leave
    with pytest.raises(WasmTrap) as e:
        inst.call(fn(inst, "call_h0"))
    assert e.value.exit_code == 3

    host.h32 = lambda *_: "not a number"
    with pytest.raises(WasmTrap, match=r"host function env\.h32 failed"):
        inst.call(fn(inst, "call_h32"), 1, 2)
    # the instance still works after traps
    host.h32 = lambda a, b: a
    assert inst.call(fn(inst, "call_h32"), 42, 0) == 42


@pytest.mark.parametrize("impl", IMPLS)
def test_guest_traps_are_reported(impl: str) -> None:
    inst, _ = new_instance(impl)
    with pytest.raises(WasmTrap, match=r"^trap: .*unreachable"):
        inst.call(fn(inst, "trap"))
    assert inst.call(fn(inst, "add"), 1, 1) == 2


@pytest.mark.parametrize("impl", IMPLS)
def test_nested_calls_from_host_functions(impl: str) -> None:
    inst, host = new_instance(impl)
    alloc = fn(inst, "alloc")
    seen: list[int] = []

    def nested(a: int, b: int) -> int:
        assert host.inst is not None
        p = host.inst.call_reentrant(alloc, 16)
        seen.append(p)
        assert host.inst.write(p, b"x" * 16)
        q = host.inst.call_reentrant(fn(host.inst, "add"), p, 1)
        return q

    host.h32 = nested
    r = inst.call(fn(inst, "call_h32"), 0, 0)
    assert r == seen[0] + 1
    assert inst.read(seen[0], 16) == b"x" * 16


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_bounds(impl: str) -> None:
    inst, _ = new_instance(impl)
    size = inst.memory_size()
    assert size == 65536
    assert inst.write(size - 4, b"abcd")
    assert inst.read(size - 4, 4) == b"abcd"
    assert inst.read(size - 4, 5) is None
    assert inst.read(size, 0) == b""
    assert inst.read(size + 1, 0) is None
    assert inst.read(-1, 1) is None  # -1 is 0xFFFFFFFF
    assert inst.read(0, -1) is None  # a negative i32 size is a huge u32
    assert not inst.write(size - 2, b"abc")
    assert inst.write(0x20, bytearray(b"ba")) and inst.read(0x20, 2) == b"ba"
    assert inst.write(0x22, memoryview(b"mv")) and inst.read(0x22, 2) == b"mv"
    assert inst.write_u32(0x30, -1) and inst.read(0x30, 4) == b"\xff" * 4
    assert inst.write_u32(0x30, 0x1_0000_0001) and inst.read(0x30, 4) == b"\x01\0\0\0"
    assert not inst.write_u32(size - 3, 1)
    assert inst.write_u64(0x40, 2**64 + 2) and inst.read(0x40, 8) == struct.pack("<Q", 2)
    assert not inst.write_u64(size - 7, 1)


@pytest.mark.parametrize("impl", IMPLS)
def test_memory_growth_is_seen(impl: str) -> None:
    inst, _ = new_instance(impl)
    assert inst.read(65536, 4) is None
    assert inst.call(fn(inst, "grow_and_store"), 2) == 3
    assert inst.memory_size() == 3 * 65536
    assert inst.read(3 * 65536 - 4, 4) == struct.pack("<I", 0x11223344)


@pytest.mark.parametrize("impl", IMPLS)
def test_copy_out(impl: str) -> None:
    inst, _ = new_instance(impl)
    alloc = fn(inst, "alloc")
    assert inst.copy_out(alloc, b"hello", 0x100, 0x104)
    ptr, size = struct.unpack("<II", inst.read(0x100, 8) or b"")
    assert size == 5 and inst.read(ptr, size) == b"hello"
    assert inst.copy_out(alloc, b"", 0x100, 0x104)  # nothing to copy: null pointer, size 0
    assert inst.read(0x100, 8) == b"\0" * 8
    assert not inst.copy_out(fn(inst, "alloc_fails"), b"x", 0x100, 0x104)
    assert not inst.copy_out(alloc, b"x", 0xFFFFFFF0, 0x104)
    assert not inst.copy_out(alloc, b"x", 0x100, -4)


@pytest.mark.parametrize("impl", IMPLS)
def test_cpu_deadline_interrupts_a_spinning_guest(impl: str) -> None:
    # The compiled path keeps the GIL during the call: the epoch must advance without it.
    inst, _ = new_instance(impl, deadline=5.0)
    inst.set_deadline(0.05)
    with pytest.raises(WasmTrap, match="interrupt"):
        inst.call(fn(inst, "spin"))
    assert inst.call(fn(inst, "add"), 1, 1) == 2


@settings(max_examples=200, deadline=None)
@given(ptr=st.integers(-(2**40), 2**40), size=st.integers(-(2**31), 2**40), data=st.binary(max_size=40))
def test_both_paths_agree_on_memory_access(ptr: int, size: int, data: bytes) -> None:
    results = []
    for impl in IMPLS:
        inst, _ = _shared(impl)
        results.append((inst.read(ptr, size), inst.write(ptr, data), inst.write_u32(ptr, size),
                        inst.read(ptr & 0xFFFF, len(data))))
    assert results[0] == results[1]


_instances: dict[str, tuple[Instance, Host]] = {}


def _shared(impl: str) -> tuple[Instance, Host]:
    if impl not in _instances:
        _instances[impl] = new_instance(impl)
    return _instances[impl]


def test_a_vm_not_yet_serving_releases_the_gil_during_guest_code() -> None:
    """A VM started in a worker thread (before keep_gil) does not stall the event loop."""
    if wasm._glue is None:
        pytest.skip("compiled glue not in use")
    host = Host()
    inst = Instance(engine(), _compiled_module(), host.funcs(), unknown, deadline=0.3, compiled=True)
    started = threading.Event()
    done = threading.Event()

    def spin() -> None:
        started.set()
        with contextlib.suppress(WasmTrap):
            inst.call(fn(inst, "spin"))
        done.set()

    t = threading.Thread(target=spin)
    t.start()
    started.wait()
    ran = 0
    while not done.is_set():
        ran += 1
    t.join()
    assert ran > 1000  # this thread kept running while the guest spun for 0.3 s


def test_host_calls_take_the_gil_on_threads_that_do_not_hold_it() -> None:
    """A serving VM's host calls skip taking the GIL (its thread holds it, glue's
    wg_gil_held). A VM being started in a worker thread meanwhile must still take it
    for each of its host calls, also while the serving VM is inside a guest call."""
    if wasm._glue is None:
        pytest.skip("compiled glue not in use")
    import ctypes
    import time

    gil_check = ctypes.pythonapi.PyGILState_Check
    serving, serving_host = new_instance("compiled")  # keep_gil: the serving VM
    starting_host = Host()
    starting = Instance(engine(), _compiled_module(), starting_host.funcs(), unknown, deadline=5.0,
                        compiled=True)  # not keep_gil: started in a worker thread
    polled = threading.Event()
    stop = threading.Event()
    held: list[int] = []
    during: list[int] = []

    def starting_h0() -> int:
        held.append(gil_check())
        if serving_in_call.is_set():
            during.append(1)
        polled.set()
        return 1 if stop.is_set() else 0

    serving_in_call = threading.Event()

    def serving_h32(a: int, b: int) -> int:
        serving_in_call.set()
        time.sleep(0.3)  # the GIL is released inside the serving VM's guest call
        serving_in_call.clear()
        return 1

    starting_host.h0 = starting_h0
    serving_host.h32 = serving_h32
    t = threading.Thread(target=lambda: starting.call(fn(starting, "poll_h0")))
    t.start()
    polled.wait()
    assert serving.call(fn(serving, "call_h32"), 1, 2) == 1
    stop.set()
    t.join()
    assert during  # the worker's guest called the host while the serving VM was in its call
    assert set(held) == {1}  # and every one of those calls held the GIL
    assert gil_check() == 1
