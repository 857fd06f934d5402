"""Loaded plugins and the chain they form, ordered as Istio orders WasmPlugins."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime

from wasmgate.engine.wasm import WasmError, compile_module, new_engine
from wasmgate.plugin.context import Stream
from wasmgate.plugin.filter import PluginFilter
from wasmgate.plugin.spec import PluginSpec
from wasmgate.plugin.vm import PluginError, PluginStats, PluginVM

_log = logging.getLogger("wasmgate.wasm")

_engine: wasmtime.Engine | None = None


def engine() -> wasmtime.Engine:
    global _engine
    if _engine is None:
        _engine = new_engine()
    return _engine


def cache_dir() -> Path | None:
    """Compiled-module cache: $WASMGATE_CACHE_DIR, else ~/.cache/wasmgate; "off" disables it."""
    env = os.environ.get("WASMGATE_CACHE_DIR")
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "wasmgate" / "compiled"


def chain_order(specs: list[PluginSpec]) -> list[PluginSpec]:
    """Istio's order: by phase, then priority descending, then namespace/name."""
    return sorted(specs, key=lambda s: (s.phase.rank, -s.priority, s.namespace, s.name))


@dataclass
class Plugin:
    spec: PluginSpec
    sha256: str = ""
    vm: PluginVM | None = None
    error: str | None = None
    stats: PluginStats = field(default_factory=PluginStats)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        if self.vm is None:
            return "failed"
        return "failed" if self.vm.failed else "running"

    def describe(self) -> dict[str, object]:
        vm = self.vm
        return {
            "name": self.name,
            "root_id": self.spec.root_id,
            "vm_id": self.spec.vm_id,
            "url": str(self.spec.module_path),
            "sha256": self.sha256,
            "abi_version": vm.abi.label if vm else None,
            "state": self.state,
            "phase": self.spec.phase.value,
            "priority": self.spec.priority,
            "fail_strategy": self.spec.fail_strategy.value,
            "memory_bytes": vm.memory_bytes() if vm else 0,
            "last_error": (vm.failed if vm and vm.failed else self.error),
            "calls": self.stats.calls,
            "errors": self.stats.errors,
        }


def load_plugin(spec: PluginSpec) -> Plugin:
    """Read, compile, instantiate and start one plugin. Raises PluginError naming it."""
    where = spec.source or str(spec.module_path)
    try:
        wasm = spec.module_path.read_bytes()
    except OSError as e:
        raise PluginError(f"{where}: plugin {spec.name}: cannot read module {spec.module_path}: "
                          f"{e.strerror or e}") from None
    sha = hashlib.sha256(wasm).hexdigest()
    try:
        module = compile_module(engine(), wasm, str(spec.module_path), cache_dir(), sha)
        stats = PluginStats()
        vm = PluginVM(spec, engine(), module, stats)
    except WasmError as e:
        raise PluginError(f"{where}: plugin {spec.name}: {e}") from None
    except PluginError as e:
        raise PluginError(f"{where}: {e}") from None
    vm.start()
    _log.info("plugin %s loaded: abi %s, sha256 %s", spec.name, vm.abi.label, sha[:12])
    return Plugin(spec, sha, vm, None, stats)


class Chain:
    """The active plugin chain; swapped as a whole so streams see one version."""

    def __init__(self, plugins: list[Plugin]):
        self.plugins = plugins

    def filters(self, stream: Stream) -> list[PluginFilter]:
        return [PluginFilter(p, stream) for p in self.plugins]
