"""A feed of "the selected WasmPlugins changed": where ``wasmgate envoy`` gets its resources.

A feed is any async iterable of :class:`SpecSet`: the first item is the state at start, each
later one the whole selected set after a change (selection, Secrets and ordering already
applied, as :func:`wasmgate.resources.wasmplugin.scan_plugin_specs` does). The consumer
compares with what it has. :class:`DirectoryFeed` watches WasmPlugin files and the local
modules they name; a Kubernetes watch yields the same type.
"""

from __future__ import annotations

import asyncio
import os
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
        # Not resolved: symlinks are followed at each read (a Kubernetes volume's ``..data``).
        self.paths = [Path(os.path.abspath(p)) for p in paths]
        self.scope = scope or Scope()
        self.watch = watch
        self._modules: set[Path] = set()

    def scan(self) -> SpecSet:
        specs, errors = scan_plugin_specs(self.paths, self.scope)
        self._modules = {s.module_path for s in specs if s.module_path is not None}
        return SpecSet(specs, errors)

    async def __aiter__(self) -> AsyncIterator[SpecSet]:
        yield self.scan()
        if self.watch:
            async for _ in relevant_changes(lambda: {*self.paths, *self._modules}, asyncio.Event()):
                yield self.scan()
