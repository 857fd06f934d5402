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
    """Every registered function as an import of ``vm``'s instance, called as
    fn(vm.current, *args): for the plugin whose context is the effective one."""
    return {key: HostFunc(e.module, e.name, e.params, e.results, e.fn, vm, "current") for key, e in REGISTRY.items()}
