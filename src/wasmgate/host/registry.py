"""Registration of host functions by ABI name.

Each ABI area module decorates plain functions ``fn(vm, *i32_args) -> status``;
``bind`` turns them into engine ``HostFunc``s for one module instance; each call goes to
the plugin whose context is effective (plugins sharing an instance have their own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wasmgate.engine.wasm import HostFunc

if TYPE_CHECKING:
    from wasmgate.plugin.vm import SharedVM

ENV = "env"
WASI = "wasi_snapshot_preview1"
WASI_UNSTABLE = "wasi_unstable"  # AssemblyScript 0.14 imports proc_exit & co from here
WASI_MODULES = (WASI, WASI_UNSTABLE)


@dataclass(frozen=True)
class _Entry:
    module: str
    name: str
    params: str
    results: str
    fn: Callable[..., Any]


REGISTRY: dict[tuple[str, str], _Entry] = {}


def hostcall(params: str, results: str = "i", *, module: str = ENV,
             name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn`` as import ``module.name`` (default: the function's own name)."""

    modules = WASI_MODULES if module == WASI else (module,)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for m in modules:
            n = name or fn.__name__
            REGISTRY[(m, n)] = _Entry(m, n, params, results, fn)
        return fn

    return wrap


def bind(vm: SharedVM) -> dict[tuple[str, str], HostFunc]:
    out = {}
    for key, e in REGISTRY.items():
        fn = e.fn
        out[key] = HostFunc(e.module, e.name, e.params, e.results, _bound(fn, vm))
    return out


def _bound(fn: Callable[..., Any], vm: SharedVM) -> Callable[..., Any]:
    def call(*args: int) -> Any:
        return fn(vm.current, *args)

    return call
