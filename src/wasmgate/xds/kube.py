"""``wasmgate envoy --kube``: WasmPlugins and pull Secrets from the Kubernetes API as a feed.

The Kubernetes source of ``wasmgate run --kube`` (resources/kube.py: list, watch, 410 relist,
backoff, no-op resyncs) is reused whole; only where its scans go changes: into the
:class:`~wasmgate.resources.feed.SpecSet` feed the xDS controller consumes, instead of a
proxy's plugin manager.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from wasmgate.plugin.manager import PluginManager
from wasmgate.plugin.spec import PluginSpec
from wasmgate.resources.feed import SpecSet
from wasmgate.resources.kube import KubeSource
from wasmgate.resources.wasmplugin import Scope


class _Source(KubeSource):
    def __init__(self, scope: Scope, **kw: Any):
        # Its manager's chain stays empty: module fetching and its retries are the controller's.
        super().__init__(PluginManager(), scope, **kw)
        self.updates: asyncio.Queue[SpecSet] = asyncio.Queue()

    async def apply_scan(self, specs: list[PluginSpec], errors: dict[str, str]) -> None:
        self.errors = errors
        await self.updates.put(SpecSet(specs, errors))
        self.applied += 1


class KubeFeed:
    """The first list (raises KubeError when the API server cannot be listed in ``timeout``),
    then every change the watches bring."""

    def __init__(self, scope: Scope, *, namespace: str | None = None, selector: dict[str, str] | None = None,
                 kubeconfig: str | None = None, watch: bool = True, timeout: float = 60.0):
        self.source = _Source(scope, namespace=namespace, selector=selector, kubeconfig=kubeconfig)
        self.watch = watch
        self.timeout = timeout

    async def __aiter__(self) -> AsyncIterator[SpecSet]:
        source = self.source
        try:
            await source.sync(self.timeout)
            yield SpecSet(*source.scan())
            if not self.watch:
                return
            source.start()
            while True:
                yield await source.updates.get()
        finally:
            if source._task is not None:
                await source.stop()  # closes its client
            elif source._client is not None:
                await source._client.close()
