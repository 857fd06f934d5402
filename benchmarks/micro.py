"""In-process microbenchmark: what one request costs the host for the seed plugin.

The allow-header plugin is loaded with wasmgate's own API and driven through a full
request lifecycle with realistic header maps, without any I/O:

* **VM API**: ``create_http_context``, ``on_request_headers``, ``on_response_headers``,
  ``log_stream``, ``finish_stream``, as the host functions see them.
* **filter**: the same through ``PluginFilter``, the per-stream object the proxy
  calls (adds the fail-strategy and header-map bookkeeping).

The guest's own Wasm time is isolated by instrumenting a second copy of the VM:
every guest call and every host function is timed, host time is subtracted from
guest-call time, and the fixed cost of each boundary crossing (measured with a
no-op WAT module and the same instrumentation) is removed. What remains is time
spent executing the plugin's Wasm code; host overhead is the rest.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from proxies import PLUGIN_YAML

from wasmgate import log
from wasmgate.abi.constants import Action, MapType
from wasmgate.engine import wasm
from wasmgate.headers import HeaderMap, Pair
from wasmgate.host import registry
from wasmgate.plugin import manager
from wasmgate.plugin.context import Stream
from wasmgate.plugin.filter import PluginFilter
from wasmgate.plugin.manager import engine
from wasmgate.plugin.vm import PluginVM
from wasmgate.resources.wasmplugin import load_plugin_specs

# What the plugin sees from `wrk -H 'allow: true'` through wasmgate's exchange.
_REQUEST: list[Pair] = [
    (b":authority", b"127.0.0.1:8080"), (b":path", b"/"), (b":method", b"GET"), (b":scheme", b"http"),
    (b"user-agent", b"curl/8.5.0"), (b"accept", b"*/*"), (b"x-forwarded-for", b"127.0.0.1"),
    (b"x-forwarded-proto", b"http"), (b"x-request-id", b"6f1c1e0a-3b52-4c7e-9a4e-6d0c2f8b9e17"),
]
_ALLOW: Pair = (b"allow", b"true")
_RESPONSE: list[Pair] = [
    (b":status", b"200"), (b"server", b"nginx/1.22.1"), (b"date", b"Thu, 26 Nov 2026 05:45:00 GMT"),
    (b"content-type", b"text/plain"), (b"content-length", b"17"), (b"x-envoy-upstream-service-time", b"0"),
]
_DENIED: list[Pair] = [
    (b":status", b"403"), (b"content-length", b"14"), (b"content-type", b"text/plain"),
    (b"x-wasmgate-denied", b"allow-header"),
]
_REQ_BIT = 1 << MapType.REQUEST_HEADERS
_RESP_BIT = 1 << MapType.RESPONSE_HEADERS


def load_seed_plugin() -> tuple[Any, PluginVM]:
    """(what PluginFilter takes, the running VM) for the allow-header example."""
    log.setup("info")  # as `wasmgate run` does: the plugin's per-request debug lines are dropped
    logging.getLogger("wasmgate").handlers[:] = [logging.NullHandler()]  # ... and nothing is printed here
    (spec,) = load_plugin_specs([PLUGIN_YAML])
    # manager.load_handle (plugin handles with VM generations) replaced load_plugin.
    load = getattr(manager, "load_handle", None) or getattr(manager, "load_plugin")  # noqa: B009
    plugin = load(spec)
    vm = plugin.vm
    if not isinstance(vm, PluginVM):
        raise RuntimeError(f"{spec.name}: no running VM after loading")
    return plugin, vm


# ---- one request ---------------------------------------------------------------------------


def request_vm(vm: PluginVM, allow: bool) -> int:
    """One request's lifecycle through the PluginVM API; returns the response status."""
    stream = Stream()
    stream.request_headers = HeaderMap([*_REQUEST, _ALLOW] if allow else _REQUEST)
    ctx = vm.create_http_context(stream)
    ctx.open_maps |= _REQ_BIT
    action = vm.on_request_headers(ctx, len(stream.request_headers), True)
    if action == Action.CONTINUE:
        ctx.open_maps &= ~_REQ_BIT
    reply = stream.local_reply
    stream.response_headers = HeaderMap(_RESPONSE if reply is None else _DENIED)
    ctx.open_maps |= _RESP_BIT
    vm.on_response_headers(ctx, len(stream.response_headers), reply is not None)
    ctx.logging = True
    vm.log_stream(ctx)
    ctx.logging = False
    vm.finish_stream(ctx)
    return 200 if reply is None else reply.status


def request_filter(plugin: Any, allow: bool) -> int:
    """The same through PluginFilter, as proxy/exchange.py drives a plugin."""
    stream = Stream()
    stream.request_headers = HeaderMap([*_REQUEST, _ALLOW] if allow else _REQUEST)
    f = PluginFilter(plugin, stream)
    f.request.headers(len(stream.request_headers), True)
    reply = stream.local_reply
    stream.response_headers = HeaderMap(_RESPONSE if reply is None else _DENIED)
    f.response.headers(len(stream.response_headers), reply is not None)
    f.log()
    f.finish()
    return 200 if reply is None else reply.status


def _time_per_call(fn: Callable[[], object], n: int, runs: int) -> list[float]:
    """Microseconds per call of ``fn``, one figure per run."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out


# ---- guest-only isolation --------------------------------------------------------------------


@dataclass
class _Probe:
    """Time accumulated at the boundaries, in seconds."""

    outer: float = 0.0  # top-level guest calls (Instance.call), host calls inside included
    host: float = 0.0  # host functions (Python), nested guest calls (malloc) included
    nested: float = 0.0  # guest calls made from inside host functions (Instance.call_reentrant)
    n_outer: int = 0
    n_host: int = 0
    n_nested: int = 0
    by_name: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))  # seconds, by name

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def _instrument_instance(inst: wasm.Instance, probe: _Probe) -> None:
    call_args, reentrant, pc = inst.call_args, inst.call_reentrant, time.perf_counter

    def timed_call(fn: wasm.GuestFunc, *args: int) -> int:
        return timed_call_args(fn, args, wasm.CallStats())

    def timed_call_args(fn: wasm.GuestFunc, args: tuple[int, ...], stats: wasm.CallStats) -> int:  # how PluginVM calls
        t0 = pc()
        try:
            return call_args(fn, args, stats)
        finally:
            dt = pc() - t0
            probe.outer += dt
            probe.n_outer += 1
            probe.by_name["guest " + fn.name] += dt

    def timed_reentrant(fn: wasm.GuestFunc, *args: int) -> int:
        t0 = pc()
        try:
            return reentrant(fn, *args)
        finally:
            dt = pc() - t0
            probe.nested += dt
            probe.n_nested += 1
            probe.by_name["guest " + fn.name + " (from host)"] += dt

    inst.call = timed_call  # type: ignore[method-assign]
    inst.call_args = timed_call_args  # type: ignore[method-assign]
    inst.call_reentrant = timed_reentrant  # type: ignore[method-assign]
    # The compiled copy_out allocates in C; this one goes through the timed call_reentrant.
    inst.copy_out = partial(wasm.Instance.copy_out, inst)  # type: ignore[method-assign]


def _timed_host(fn: Callable[..., Any], probe: _Probe) -> Callable[..., Any]:
    pc, name = time.perf_counter, "host " + fn.__name__

    def call(*args: Any) -> Any:  # (vm, *guest arguments)
        t0 = pc()
        try:
            return fn(*args)
        finally:
            dt = pc() - t0
            probe.host += dt
            probe.n_host += 1
            probe.by_name[name] += dt

    return call


@contextmanager
def _host_functions_timed(probe: _Probe) -> Iterator[None]:
    """While active, VMs created bind host functions wrapped with timers."""
    original = dict(registry.REGISTRY)
    for key, e in original.items():
        registry.REGISTRY[key] = dataclasses.replace(e, fn=_timed_host(e.fn, probe))
    try:
        yield
    finally:
        registry.REGISTRY.update(original)


_CALIBRATION_WAT = """
(module
  (import "env" "h" (func $h (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "nop") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "cb") (param i32 i32 i32) (result i32)
    (call $h (local.get 0) (local.get 1) (local.get 2) (i32.const 0) (i32.const 0))))
"""


@dataclass(frozen=True)
class Crossing:
    """Fixed cost of each crossing with the instrumentation in place, microseconds."""

    outer_us: float  # host -> guest top-level call of a no-op
    callback_us: float  # guest -> host call of a no-op host function (its own time excluded)
    nested_us: float  # host -> guest call from inside a host function


def calibrate(n: int, runs: int) -> Crossing:
    probe = _Probe()
    module = wasm.compile_module(engine(), wasm.wat_to_wasm(_CALIBRATION_WAT), "calibration")

    def noop(_vm: object, *_args: int) -> int:
        return 0

    host = {("env", "h"): wasm.HostFunc("env", "h", "iiiii", "i", _timed_host(noop, probe))}

    def unknown(m: str, name: str, p: str, r: str) -> wasm.HostFunc:
        raise AssertionError(f"{m}.{name}")

    inst = wasm.Instance(engine(), module, host, unknown)
    _instrument_instance(inst, probe)
    nop, cb = inst.func("nop"), inst.func("cb")
    assert nop is not None and cb is not None
    outer, callback, nested = [], [], []
    for _ in range(runs):
        probe.reset()
        for _ in range(n):
            inst.call(nop, 1, 2, 3)
        outer.append(probe.outer / n)
        probe.reset()
        for _ in range(n):
            inst.call(cb, 1, 2, 3)
        callback.append((probe.outer - probe.host) / n - outer[-1])
        probe.reset()
        for _ in range(n):
            inst.call_reentrant(nop, 1, 2, 3)
        nested.append(probe.nested / n)
    return Crossing(statistics.median(outer) * 1e6, statistics.median(callback) * 1e6,
                    statistics.median(nested) * 1e6)


@dataclass(frozen=True)
class GuestCost:
    guest_us: float  # Wasm execution per request, crossings removed
    outer_calls: float  # top-level guest calls per request
    host_calls: float  # host function calls per request
    nested_calls: float  # guest calls from host functions (allocations) per request
    breakdown_us: dict[str, float]  # per request, by guest export / host function (inclusive)


def guest_cost(allow: bool, crossing: Crossing, n: int, runs: int) -> GuestCost:
    """The plugin's own Wasm time per request, from an instrumented copy of its VM."""
    probe = _Probe()
    with _host_functions_timed(probe):
        _, vm = load_seed_plugin()
    _instrument_instance(vm.instance, probe)
    vm._call_args = vm.instance.call_args  # PluginVM binds its instance's call_args once, at start
    if request_vm(vm, allow) != (200 if allow else 403):
        raise AssertionError("instrumented VM answered wrongly")
    guest = []
    for _ in range(runs):
        probe.reset()
        for _ in range(n):
            request_vm(vm, allow)
        if probe.n_host == 0:
            raise RuntimeError("host functions were not instrumented (registry.REGISTRY or bind changed?)")
        if probe.n_outer == 0:
            raise RuntimeError("guest calls were not instrumented (how PluginVM calls its instance changed?)")
        excl = probe.outer - probe.host + probe.nested
        excl -= (probe.n_outer * crossing.outer_us + probe.n_host * crossing.callback_us
                 + probe.n_nested * crossing.nested_us) / 1e6
        guest.append(excl / n * 1e6)
    return GuestCost(  # counts and breakdown from the last run
        # Crossings now cost less than the timing wrappers around them; on a busy machine the
        # subtraction can dip below zero: then the guest time is below what this resolves.
        guest_us=max(statistics.median(guest), 0.0),
        outer_calls=probe.n_outer / n, host_calls=probe.n_host / n, nested_calls=probe.n_nested / n,
        breakdown_us={k: v / n * 1e6 for k, v in sorted(probe.by_name.items(), key=lambda kv: -kv[1])},
    )


# ---- the whole microbenchmark ------------------------------------------------------------------


@dataclass(frozen=True)
class PathCost:
    vm_us: float  # full lifecycle through the PluginVM API (median over runs)
    filter_us: float  # through PluginFilter
    guest: GuestCost | None  # None when the instrumentation could not be applied
    guest_error: str = ""

    @property
    def host_overhead_us(self) -> float | None:
        return None if self.guest is None else self.filter_us - self.guest.guest_us


@dataclass(frozen=True)
class MicroResult:
    n: int
    runs: int
    allow: PathCost
    deny: PathCost
    crossing: Crossing | None


def run(n: int = 20000, runs: int = 7) -> MicroResult:
    plugin, vm = load_seed_plugin()
    for allow, want in ((True, 200), (False, 403)):  # behaves as the plugin should
        got = (request_vm(vm, allow), request_filter(plugin, allow))
        if got != (want, want):
            raise AssertionError(f"seed plugin answered {got}, expected {want} (allow={allow})")
    gc.collect()
    try:
        crossing: Crossing | None = calibrate(n, runs)
    except Exception:  # the engine's internals moved: report timings without the split
        crossing = None
    costs = {}
    for allow in (True, False):
        vm_us = statistics.median(_time_per_call(partial(request_vm, vm, allow), n, runs))
        filter_us = statistics.median(_time_per_call(partial(request_filter, plugin, allow), n, runs))
        guest, error = None, ""
        if crossing is not None:
            try:
                guest = guest_cost(allow, crossing, n, runs)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        else:
            error = "calibration failed"
        costs[allow] = PathCost(vm_us, filter_us, guest, error)
    return MicroResult(n, runs, costs[True], costs[False], crossing)
