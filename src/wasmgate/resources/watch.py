"""Live reload: watch the WasmPlugin files and their modules, apply what changed.

A change is applied through ``PluginManager.apply``: compiled and canaried off the
event loop, swapped in atomically; a file that no longer parses keeps its last
good plugins serving, with the error logged and shown on /plugins.

``ResourceSource`` is what every source of resources shares (this directory watcher and
the Kubernetes one in resources/kube.py): applying a scan, retrying modules that could
not be fetched, expiring the module cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from wasmgate.plugin.manager import PluginManager, module_cache
from wasmgate.plugin.spec import PluginSpec
from wasmgate.resources.fswatch import relevant_changes
from wasmgate.resources.wasmplugin import Scope, scan_plugin_specs

_log = logging.getLogger("wasmgate.config")


class ResourceSource:
    """A live source of WasmPlugin resources; subclasses define ``_run`` and ``reload``."""

    def __init__(self, manager: PluginManager, scope: Scope):
        self.manager = manager
        self.scope = scope
        self.errors: dict[str, str] = {}  # resource source -> why it was not applied
        self.applied = 0  # completed reloads, for tests and /plugins
        self.retry_initial = 2.0  # seconds before fetching an unavailable module again
        self.purge_every = 3600.0  # seconds between module-cache expiry runs
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._main())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        background = [loop.create_task(self._retry_unavailable()), loop.create_task(self._purge_cache())]
        try:
            await self._run()
        finally:
            for task in background:
                task.cancel()

    async def _run(self) -> None:
        raise NotImplementedError

    async def reload(self) -> None:
        raise NotImplementedError

    async def apply_scan(self, specs: list[PluginSpec], errors: dict[str, str]) -> None:
        """Apply one scan: plugins of a source in ``errors`` keep their last good version."""
        for source, why in errors.items():
            if self.errors.get(source) != why:
                _log.error("%s; its plugins keep their last good version", why)
        self.errors = self.manager.resource_errors = errors
        await self.manager.apply(specs, keep=set(errors))
        self.applied += 1

    async def _purge_cache(self) -> None:
        """Expire fetched modules nobody uses (the ones in use are pinned)."""
        while not self._stop.is_set():
            await asyncio.sleep(self.purge_every)
            removed = await asyncio.get_running_loop().run_in_executor(None, module_cache().purge)
            if removed:
                _log.info("module cache: removed %d expired module(s)", len(removed))

    async def _retry_unavailable(self) -> None:
        """Plugins whose remote module could not be fetched are tried again, with backoff:
        fetched outside apply (a slow registry holds up no other update), then, when one came,
        applied with the resources as they are now (a newer update is kept)."""
        delay = self.retry_initial
        while not self._stop.is_set():
            await asyncio.sleep(delay)
            if any(h.module is None for h in self.manager.chain.plugins):
                if await self.manager.fetch_unavailable():
                    await self.reload()
                delay = min(delay * 2, 60.0)
            else:
                delay = self.retry_initial


class PluginWatcher(ResourceSource):
    def __init__(self, paths: list[Path], manager: PluginManager, scope: Scope):
        super().__init__(manager, scope)
        # Not resolved: symlinks are followed at each read (a Kubernetes volume's ``..data``).
        self.paths = [Path(os.path.abspath(p)) for p in paths]

    def _watched(self) -> set[Path]:
        """The resource files and directories, and every module in use."""
        return {*self.paths, *(h.spec.module_path for h in self.manager.chain.plugins if h.spec.module_path)}

    async def _run(self) -> None:
        async for _ in relevant_changes(self._watched, self._stop):
            await self.reload()

    async def reload(self) -> None:
        await self.apply_scan(*scan_plugin_specs(self.paths, self.scope))
