"""A feed of "the selected WasmPlugins changed": where ``wasmgate envoy`` gets its resources.

A feed is any async iterable of :class:`SpecSet`: the first item is the state at start, each
later one the whole selected set after a change (selection, Secrets and ordering already
applied, as :func:`wasmgate.resources.wasmplugin.scan_plugin_specs` does). The consumer
compares with what it has. :class:`DirectoryFeed` watches WasmPlugin files and the local
modules they name; a Kubernetes watch yields the same type.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from wasmgate.plugin.spec import PluginSpec
from wasmgate.resources.fswatch import relevant_changes
from wasmgate.resources.wasmplugin import Scope, scan_plugin_specs


@dataclass(frozen=True)
class SpecSet:
    specs: list[PluginSpec]
    # source (a file, or a Kubernetes object) -> why it was not read this time; the plugins
    # defined there keep their last good version
    errors: dict[str, str] = field(default_factory=dict)


class DirectoryFeed:
    """WasmPlugin YAML files or directories; a new :class:`SpecSet` when a resource file or a
    ``file://`` module in use changes (``watch=False``: only the first)."""

    def __init__(self, paths: list[Path], scope: Scope | None = None, *, watch: bool = True):
        self.paths = [p.resolve() for p in paths]
        self.scope = scope or Scope()
        self.watch = watch
        self._modules: set[Path] = set()

    def scan(self) -> SpecSet:
        specs, errors = scan_plugin_specs(self.paths, self.scope)
        self._modules = {s.module_path.resolve() for s in specs if s.module_path is not None}
        return SpecSet(specs, errors)

    def _roots(self) -> set[Path]:
        roots = {p if p.is_dir() else p.parent for p in self.paths} | {m.parent for m in self._modules}
        return {r for r in roots if r.is_dir()}

    def _relevant(self, changed: set[Path]) -> bool:
        return any(p in self._modules or p in self.paths
                   or (p.suffix in (".yaml", ".yml") and p.parent in self.paths) for p in changed)

    async def __aiter__(self) -> AsyncIterator[SpecSet]:
        yield self.scan()
        if self.watch:
            async for _ in relevant_changes(self._roots, self._relevant, asyncio.Event()):
                yield self.scan()
