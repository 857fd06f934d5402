"""The only module that touches wasmtime.

Compilation and instantiation go through wasmtime-py's public API. Calls in both
directions use the C API's *unchecked* entry points: the public ``Func.__call__``
costs ~20 us a call, the unchecked path through ctypes ~1.5 us, and every request
crosses the boundary several times. We reach below wasmtime-py's public API here,
so the wasmtime version is pinned in pyproject.toml.

The hot operations (guest calls, host-function dispatch, linear memory) have two
implementations with the same behaviour: the compiled one in ``_glue.pyx`` (built
by ``make setup``; no ctypes on the way) and the ctypes one below, used when the
extension is missing or ``WASMGATE_PURE_PYTHON=1`` is set.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import importlib.metadata
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime
from wasmtime import _ffi as ffi

from wasmgate import compiled

# Own copies of the C entry points with no argtypes: ctypes then skips per-call
# argument conversion; every argument we pass is already a ctypes object.
_dll: Any = ffi.dll
_call_unchecked = _dll["wasmtime_func_call_unchecked"]
_call_unchecked.restype = ctypes.c_void_p
_define_unchecked = _dll["wasmtime_linker_define_func_unchecked"]
_define_unchecked.restype = ctypes.c_void_p
_trap_new = _dll["wasmtime_trap_new"]
_trap_new.restype = ctypes.c_void_p
_mem_data = _dll["wasmtime_memory_data"]
_mem_data.restype = ctypes.c_void_p
_mem_size = _dll["wasmtime_memory_data_size"]
_mem_size.restype = ctypes.c_size_t
_set_deadline = _dll["wasmtime_context_set_epoch_deadline"]
_set_deadline.restype = None
_wasm_trap_t_p = ctypes.POINTER(ffi.wasm_trap_t)
_wasmtime_error_t_p = ctypes.POINTER(ffi.wasmtime_error_t)

# (env, caller, args_and_results, nargs) -> wasm_trap_t* or NULL
_HOST_CB = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_NO_FINALIZER = ctypes.cast(0, ctypes.CFUNCTYPE(None, ctypes.c_void_p))

_WASMTIME_VERSION = importlib.metadata.version("wasmtime")
_U32 = struct.Struct("<I")
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)  # 16: one slot per argument/result
_MAX_SLOTS = 16
_WASM_PAGE = 65536

_VALTYPES = {"i": wasmtime.ValType.i32, "I": wasmtime.ValType.i64}
_SLOT_FMT = {"i": f"i{_VAL_SIZE - 4}x", "I": f"q{_VAL_SIZE - 8}x"}

PURE_PYTHON_ENV = compiled.PURE_PYTHON_ENV  # set (non-empty): use the ctypes path only
_glue: Any = None  # wasmgate.engine._glue (see _glue.pyi), or None
if not os.environ.get(PURE_PYTHON_ENV):
    try:
        _glue = importlib.import_module("wasmgate.engine._glue")
    except ImportError:  # not built (no C compiler at install time): the ctypes path
        _glue = None


class CallStats:
    """A plugin's guest-call figures, counted by ``Instance.call_args``. With the compiled
    glue this is ``_glue.CallStats`` (same fields, counted in C: no clock objects per call)."""

    __slots__ = ("calls", "errors", "seconds", "failed_streams")

    def __init__(self) -> None:
        self.calls = 0  # guest callbacks
        self.errors = 0  # callbacks that trapped
        self.seconds = 0.0  # time spent in guest callbacks
        self.failed_streams = 0  # streams the fail strategy handled


if not TYPE_CHECKING and _glue is not None:
    CallStats = _glue.CallStats


def _addr(fn: Any) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class WasmError(Exception):
    """A module failed to compile, link or instantiate."""


class WasmTrap(Exception):
    """Guest code trapped (or a host function raised) during a call."""

    def __init__(self, message: str, frames: list[str] | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.frames = frames or []
        self.exit_code = exit_code

    def describe(self) -> str:
        if not self.frames:
            return self.message
        return self.message + "\nwasm backtrace:\n" + "\n".join(f"  {i}: {f}" for i, f in enumerate(self.frames))


class HostError(Exception):
    """Raised inside a host function to trap the guest with a clean message."""


class ProcExit(HostError):
    def __init__(self, code: int):
        super().__init__(f"proc_exit({code})")
        self.code = code


@dataclass(frozen=True)
class HostFunc:
    """A host import. ``params``/``results`` use 'i' for i32 and 'I' for i64.

    ``impl`` gets the guest's arguments as ints, after ``bound`` when that is not None
    (after ``bound.<bound_attr>``, read at each call, when ``bound_attr`` is set).
    """

    module: str
    name: str
    params: str
    results: str
    impl: Callable[..., int | None]
    bound: Any = None
    bound_attr: str = ""


if _glue is not None:
    _glue.setup(_addr(_call_unchecked), _addr(_mem_data), _addr(_mem_size), _addr(_set_deadline), _addr(_trap_new),
                _addr(_dll["wasmtime_engine_increment_epoch"]), HostError)
    _TRAMPOLINE = ctypes.c_void_p(_glue.trampoline_address())
COMPILED = _glue is not None  # the compiled glue is in use (by default, for new instances)


# Settings that change generated code; part of the compiled-module cache key.
ENGINE_SETTINGS = "epoch-opt_speed"
EPOCH_TICK = 0.01  # seconds per epoch tick: the resolution of callback deadlines


def new_engine() -> wasmtime.Engine:
    """An engine whose guest code checks an epoch deadline (see EpochTicker)."""
    cfg = wasmtime.Config()
    cfg.cranelift_opt_level = "speed"
    cfg.epoch_interruption = True
    return wasmtime.Engine(cfg)


class EpochTicker:
    """Advances an engine's epoch every EPOCH_TICK from a daemon thread.

    Guest calls run with the GIL released (ctypes), so this thread ticks while a
    plugin spins; a callback past its deadline then traps with "interrupt".
    """

    _started: dict[int, threading.Thread] = {}
    _lock = threading.Lock()

    @classmethod
    def ensure(cls, engine: wasmtime.Engine) -> None:
        with cls._lock:
            if id(engine) in cls._started:
                return
            t = threading.Thread(target=cls._run, args=(engine,), name="wasm-epoch", daemon=True)
            cls._started[id(engine)] = t
            t.start()

    @staticmethod
    def _run(engine: wasmtime.Engine) -> None:
        if _glue is not None:
            # Compiled guest calls keep the GIL: tick without it (this never returns).
            _glue.run_epoch_ticker(engine, _addr(engine.ptr()), int(EPOCH_TICK * 1e6))
        while True:
            time.sleep(EPOCH_TICK)
            engine.increment_epoch()


def deadline_ticks(seconds: float) -> int:
    """Ticks for a deadline; +1 because the current tick may be nearly over."""
    return max(1, math.ceil(seconds / EPOCH_TICK)) + 1


def compile_module(engine: wasmtime.Engine, wasm: bytes, name: str,
                   cache_dir: Path | None = None, sha256: str | None = None) -> wasmtime.Module:
    """Compile ``wasm``; with ``cache_dir``, reuse native code keyed by module sha256.

    Compiling a Go plugin takes ~1 s, loading cached code ~3 ms. The key also
    holds the wasmtime version, since native code is only valid for one version.
    """
    if wasm[:4] != b"\0asm":
        raise WasmError(f"{name}: not a WebAssembly module (missing \\0asm magic)")
    cached = None
    if cache_dir is not None:
        key = sha256 or hashlib.sha256(wasm).hexdigest()
        cached = cache_dir / f"{key}-wasmtime{_WASMTIME_VERSION}-{ENGINE_SETTINGS}.cwasm"
        if cached.is_file():
            try:
                return wasmtime.Module.deserialize_file(engine, str(cached))
            except (wasmtime.WasmtimeError, OSError):
                pass  # stale or corrupt: compile again and overwrite
    try:
        module = wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as e:
        raise WasmError(f"{name}: invalid WebAssembly module: {_first_line(e)}") from None
    if cached is not None:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(module.serialize())
            os.replace(tmp, cached)
        except OSError:
            pass  # the cache is an optimisation only
    return module


def exports_of(module: wasmtime.Module) -> list[str]:
    return [e.name for e in module.exports]


def imports_of(module: wasmtime.Module) -> list[tuple[str, str, str]]:
    """(module, name, signature) of every import, signature like ``(i32,i64)->i32``."""
    out = []
    for imp in module.imports:
        ty = imp.type
        if isinstance(ty, wasmtime.FuncType):
            sig = f"({','.join(map(str, ty.params))})->{','.join(map(str, ty.results)) or '()'}"
        else:
            sig = type(ty).__name__
        out.append((imp.module, imp.name or "", sig))
    return out


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _sig_code(types: Iterable[wasmtime.ValType]) -> str | None:
    out = ""
    for t in types:
        if t == wasmtime.ValType.i32():
            out += "i"
        elif t == wasmtime.ValType.i64():
            out += "I"
        else:
            return None
    return out


class GuestFunc:
    """A guest export prepared for unchecked calls."""

    __slots__ = ("name", "nparams", "nresults", "_func", "ref", "slots", "raw")

    def __init__(self, name: str, func: wasmtime.Func, nparams: int, nresults: int):
        self.name = name
        self.nparams = nparams
        self.nresults = nresults
        self._func = func._func  # keeps the wasmtime_func_t alive for `ref`
        self.ref = ctypes.c_void_p(ctypes.addressof(self._func))
        self.slots = ctypes.c_size_t(max(nparams, nresults))
        # What the compiled glue reads: one attribute, unpacked in C.
        self.raw = (ctypes.addressof(self._func), nparams, nresults, max(nparams, nresults), name)


# Instance methods the compiled glue provides (same names and behaviour).
_CORE_METHODS = ("call", "call_args", "call_reentrant", "read", "write", "write_u32", "write_u64", "memory_size",
                 "copy_out")


class Instance:
    """One instantiated module in its own store, with fast calls both ways.

    Host functions raise ``HostError`` (or anything else) to trap the guest; the
    exception never unwinds through wasmtime's frames.

    ``compiled``: use the compiled glue (default: when it is available); False forces
    the ctypes path for this instance.
    """

    def __init__(
        self,
        engine: wasmtime.Engine,
        module: wasmtime.Module,
        host_funcs: dict[tuple[str, str], HostFunc],
        unknown_import: Callable[[str, str, str, str], HostFunc],
        *,
        max_memory_bytes: int = -1,
        deadline: float = 5.0,
        compiled: bool | None = None,
    ):
        if compiled and _glue is None:
            raise WasmError("the compiled glue (wasmgate.engine._glue) is not available")
        self.compiled = COMPILED if compiled is None else compiled
        self._core: Any = None
        self.store = wasmtime.Store(engine)
        self._ctx = self.store._context()
        if max_memory_bytes >= 0:
            self.store.set_limits(memory_size=max_memory_bytes)
        EpochTicker.ensure(engine)
        self._deadline = ctypes.c_uint64(deadline_ticks(deadline))
        _set_deadline(self._ctx, self._deadline)  # instantiation may run guest code
        self.host_error: BaseException | None = None  # the exception behind the last host trap
        linker = wasmtime.Linker(engine)
        self._callbacks: list[Any] = []  # ctypes callbacks must outlive the instance
        defined: set[tuple[str, str]] = set()
        for imp in module.imports:
            ty = imp.type
            key = (imp.module, imp.name or "")
            if key in defined:  # Go may import the same function twice
                continue
            defined.add(key)
            if not isinstance(ty, wasmtime.FuncType):
                raise WasmError(f"unsupported non-function import {key[0]}.{key[1]} ({type(ty).__name__})")
            params, results = _sig_code(ty.params), _sig_code(ty.results)
            if params is None or results is None:
                raise WasmError(f"import {key[0]}.{key[1]} uses value types other than i32/i64")
            hf = host_funcs.get(key)
            if hf is None or hf.params != params or hf.results != results:
                hf = unknown_import(key[0], key[1], params, results)
            self._define(linker, hf)
        try:
            self._instance = linker.instantiate(self.store, module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise WasmError(f"instantiation failed: {_first_line(e)}") from None
        exports = self._instance.exports(self.store)
        mem = exports.get("memory") if "memory" in exports else None
        if not isinstance(mem, wasmtime.Memory):
            raise WasmError("module does not export its linear memory as 'memory'")
        self._memory = mem._memory
        self._mem_ref = ctypes.byref(self._memory)
        self._mem_base = 0
        self._mem_len = -1
        self._view = memoryview(b"")
        self._stale = True
        self._exports = exports
        buf = (ctypes.c_int64 * (2 * _MAX_SLOTS))()
        self._args64 = buf
        self._nested = False
        self._nested_args = (ctypes.c_int64 * (2 * _MAX_SLOTS))()
        self._nested_trap = ctypes.c_void_p()
        self._args32 = ctypes.cast(buf, ctypes.POINTER(ctypes.c_int32))
        self._args_ref = ctypes.byref(buf)
        self._trap = ctypes.c_void_p()
        self._trap_ref = ctypes.byref(self._trap)
        if self.compiled:
            core = self._core = _glue.Core(self, _addr(self._ctx), ctypes.addressof(self._memory),
                                           (self.store, self._ctx, self._memory), self._deadline.value)
            # The compiled methods shadow the ctypes ones below, for this instance only
            # (setattr: they are plain attributes of the instance from here on).
            for name in _CORE_METHODS:
                setattr(self, name, getattr(core, name))

    # ---- exports -------------------------------------------------------------------

    def func(self, name: str) -> GuestFunc | None:
        try:
            f = self._exports[name]
        except (KeyError, IndexError):
            return None
        if not isinstance(f, wasmtime.Func):
            return None
        ty = f.type(self.store)
        return GuestFunc(name, f, len(ty.params), len(ty.results))

    def call(self, fn: GuestFunc, *args: int) -> int:
        """Call a guest function whose params and result are i32/i64; returns result or 0."""
        buf = self._args64
        # Extra args are dropped: ABI 0.1.0 callbacks take fewer parameters.
        for i in range(fn.nparams):
            buf[2 * i] = args[i]
        self._trap.value = None
        _set_deadline(self._ctx, self._deadline)
        err = _call_unchecked(self._ctx, fn.ref, self._args_ref, fn.slots, self._trap_ref)
        self._stale = True
        if err or self._trap.value:
            raise self._trap_from(err, self._trap.value, fn.name)
        return self._args32[0] if fn.nresults else 0

    def call_args(self, fn: GuestFunc, args: tuple[int, ...], stats: CallStats) -> int:
        """``call`` with the arguments as one tuple (the compiled glue avoids repacking
        them), counted in ``stats``."""
        t0 = time.perf_counter()
        stats.calls += 1
        try:
            return self.call(fn, *args)
        finally:
            stats.seconds += time.perf_counter() - t0

    def keep_gil(self) -> None:
        """Guest calls from now on keep the GIL: faster, for a VM serving on the event loop.
        Until then they release it during guest code (as ctypes does), so a VM started in a
        worker thread does not stall the loop. No-op on the ctypes path."""
        if self._core is not None:
            self._core.keep_gil = True

    def set_deadline(self, seconds: float) -> None:
        """The CPU-time budget of each top-level guest call from now on."""
        self._deadline = ctypes.c_uint64(deadline_ticks(seconds))
        if self._core is not None:
            self._core.deadline = self._deadline.value

    def call_reentrant(self, fn: GuestFunc, *args: int) -> int:
        """Like ``call`` but from inside a host function: own buffers, and linear
        memory may have grown afterwards."""
        if self._nested:  # deeper nesting is rare: fresh buffers
            return self._call_with(fn, args, (ctypes.c_int64 * (2 * _MAX_SLOTS))(), ctypes.c_void_p())
        self._nested = True
        try:
            return self._call_with(fn, args, self._nested_args, self._nested_trap)
        finally:
            self._nested = False

    def _call_with(self, fn: GuestFunc, args: tuple[int, ...], buf: Any, trap: ctypes.c_void_p) -> int:
        for i in range(fn.nparams):
            buf[2 * i] = args[i]
        trap.value = None
        try:
            err = _call_unchecked(self._ctx, fn.ref, ctypes.byref(buf), fn.slots, ctypes.byref(trap))
        finally:
            self._stale = True
        if err or trap.value:
            raise self._trap_from(err, trap.value, fn.name)
        return int(buf[0]) & 0xFFFFFFFF if fn.nresults else 0

    def _trap_from(self, err: int | None, trap: int | None, where: str) -> WasmTrap:
        host = self.host_error
        self.host_error = None
        exit_code = host.code if isinstance(host, ProcExit) else None
        if err:
            e = wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _wasmtime_error_t_p))
            message, frames = _parse_error_text(str(e))
            return WasmTrap(f"{where}: {message}", frames, getattr(e, "code", exit_code))
        t = wasmtime.Trap._from_ptr(ctypes.cast(trap or 0, _wasm_trap_t_p))
        message, _ = _parse_error_text(t.message)
        return WasmTrap(f"{where}: {message}", [_frame_str(f) for f in t.frames], exit_code)

    # ---- linear memory ---------------------------------------------------------------

    # Memory can grow (and in principle move) only while guest code runs, so the
    # view is re-read lazily once per host callback and after a nested guest call.

    def _refresh(self) -> memoryview:
        self._stale = False
        size = _mem_size(self._ctx, self._mem_ref)
        base = _mem_data(self._ctx, self._mem_ref) or 0
        if size != self._mem_len or base != self._mem_base:
            self._mem_len = size
            self._mem_base = base
            self._view = memoryview((ctypes.c_ubyte * size).from_address(base)).cast("B") if size else \
                memoryview(b"")
        return self._view

    def memory_size(self) -> int:
        self._refresh()
        return self._mem_len

    def read(self, ptr: int, size: int) -> bytes | None:
        """Guest bytes, or None when [ptr, ptr+size) is outside linear memory."""
        view = self._refresh() if self._stale else self._view
        ptr &= 0xFFFFFFFF
        if size < 0:
            size &= 0xFFFFFFFF  # an i32 argument meant as u32
        if ptr + size > self._mem_len:  # also refuses sizes computed past 32 bits
            return None
        return view[ptr:ptr + size].tobytes()

    def write(self, ptr: int, data: bytes | bytearray | memoryview) -> bool:
        view = self._refresh() if self._stale else self._view
        ptr &= 0xFFFFFFFF
        end = ptr + len(data)
        if end > self._mem_len:
            return False
        view[ptr:end] = data
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        view = self._refresh() if self._stale else self._view
        ptr &= 0xFFFFFFFF
        if ptr + 4 > self._mem_len:
            return False
        _U32.pack_into(view, ptr, value & 0xFFFFFFFF)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        return self.write(ptr, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))

    def copy_out(self, alloc: GuestFunc, data: bytes, ptr_ptr: int, size_ptr: int) -> bool:
        """From a host function: allocate ``len(data)`` bytes in the guest with ``alloc``,
        copy ``data`` there and write its pointer and size; False on a bad address."""
        ptr = 0
        if data:
            ptr = self.call_reentrant(alloc, len(data)) & 0xFFFFFFFF
            if ptr == 0 or not self.write(ptr, data):
                return False
        return self.write_u32(ptr_ptr, ptr) and self.write_u32(size_ptr, len(data))

    # ---- host functions --------------------------------------------------------------

    def _define(self, linker: wasmtime.Linker, hf: HostFunc) -> None:
        label = f"{hf.module}.{hf.name}"
        cb: Any
        env: Any = None
        if self.compiled:
            # One C trampoline for all imports; the binding (its env) says how to call impl.
            binding = _glue.HostBinding(hf.impl, hf.bound, hf.bound_attr, hf.params, hf.results, self, label)
            self._callbacks.append(binding)
            cb, env = _TRAMPOLINE, ctypes.c_void_p(id(binding))
        else:
            cb = _HOST_CB(self._ctypes_callback(hf, label))
            self._callbacks.append(cb)
        functype = wasmtime.FuncType(
            [_VALTYPES[c]() for c in hf.params], [_VALTYPES[c]() for c in hf.results]
        )
        self._callbacks.append(functype)
        mod, name = hf.module.encode(), hf.name.encode()
        err = _define_unchecked(
            linker.ptr(), mod, ctypes.c_size_t(len(mod)), name, ctypes.c_size_t(len(name)),
            functype.ptr(), cb, env, _NO_FINALIZER,
        )
        if err:
            e = wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, _wasmtime_error_t_p))
            raise WasmError(f"cannot define {label}: {e}")

    def _ctypes_callback(self, hf: HostFunc, label: str) -> Callable[[int, int, int, int], int]:
        """The ctypes path's host callback: arguments unpacked from the raw value buffer
        with one struct call."""
        unpack = struct.Struct("<" + "".join(_SLOT_FMT[c] for c in hf.params)).unpack
        span = len(hf.params) * _VAL_SIZE
        impl = hf.impl
        bound = hf.bound
        if hf.bound_attr:  # the first argument is read from `bound` at each call
            impl = partial(_via_attr, hf.impl, attrgetter(hf.bound_attr))
        result_i64 = hf.results == "I"
        has_result = bool(hf.results)
        string_at = ctypes.string_at
        i32_at = ctypes.c_int32.from_address
        i64_at = ctypes.c_int64.from_address

        def callback(_env: int, _caller: int, args: int, _n: int) -> int:
            self._stale = True  # the guest ran since we last looked at memory
            try:
                if bound is not None:
                    r = impl(bound, *unpack(string_at(args, span))) if span else impl(bound)
                else:
                    r = impl(*unpack(string_at(args, span))) if span else impl()
                if has_result:
                    (i64_at if result_i64 else i32_at)(args).value = r or 0
                return 0
            except BaseException as e:
                self.host_error = e
                msg = f"host function {label} failed: {e}" if not isinstance(e, HostError) else str(e)
                raw = msg.encode("utf-8", "replace")
                return _trap_new(raw, ctypes.c_size_t(len(raw))) or 0

        return callback


def _via_attr(impl: Callable[..., int | None], get: Callable[[Any], Any], bound: Any, *args: int) -> int | None:
    return impl(get(bound), *args)


def _parse_error_text(text: str) -> tuple[str, list[str]]:
    """Split wasmtime's error text into its root cause and backtrace frames."""
    frames: list[str] = []
    cause: list[str] = []
    section = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.endswith("wasm backtrace:"):
            section = "bt"
        elif stripped == "Caused by:":
            section = "cause"
        elif section == "bt" and stripped[0].isdigit():
            frames.append(stripped.split(" - ", 1)[-1])
        elif section == "cause":
            cause.append(stripped)
        elif not section:
            cause = [stripped]
    return (cause[-1] if cause else "trap"), frames


def _frame_str(f: Any) -> str:
    name = f.func_name or f"<func {f.func_index}>"
    mod = f.module_name or "module"
    return f"{mod}!{name} @ 0x{f.module_offset:x}"


def wat_to_wasm(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))
