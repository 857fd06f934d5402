"""From selected WasmPlugins to an xDS snapshot: fetch each module on wasmgate's side, as
istio-agent does, and hand Envoy local files.

Modules are fetched with the data plane's cache and checks (:mod:`wasmgate.oci.fetch`:
digests, pull policy, size and magic); a ``file://`` module is copied into that cache too, so
the file Envoy loads is named by its content and a module edit reaches Envoy as a new ECDS
version. A module that cannot be fetched is served as istio-agent serves it: an RBAC
deny-all filter (FAIL_CLOSE, FAIL_RELOAD) or allow-all filter (FAIL_OPEN), and fetched again
with backoff.

What is fetched when, as istio-agent decides it (docs/envoy.md, "When modules are fetched"):
a remote plugin whose spec is unchanged keeps its module without any request; a new or
changed one is fetched under its pull policy (``fetch_module``: IfNotPresent uses the cache,
Always asks the registry), all of an update's fetches at once; ``file://`` modules are read
again on every update (the feed's signal that one changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasmgate.oci.auth import Keychain
from wasmgate.oci.errors import OciError
from wasmgate.oci.fetch import ModuleCache, fetch_module
from wasmgate.plugin.manager import chain_order, module_cache
from wasmgate.plugin.spec import FailStrategy, PluginSpec
from wasmgate.resources.feed import SpecSet
from wasmgate.xds.resources import (
    ECDS_TYPE,
    DownstreamTls,
    TcpProxy,
    UpstreamTls,
    cluster,
    extension_config,
    fallback_filter,
    listener,
    resource_name,
    tcp_listener,
    upstream_cluster_name,
    wasm_filter,
)
from wasmgate.xds.server import Snapshot, XdsServer

_log = logging.getLogger("wasmgate.config")


@dataclass(frozen=True)
class PluginState:
    """One WasmPlugin as Envoy is told to run it."""

    spec: PluginSpec
    module: Path | None = None  # the local file Envoy loads; None: the fetch failed
    sha256: str = ""
    error: str | None = None  # why the module could not be fetched

    @property
    def resource(self) -> str:
        return resource_name(self.spec)

    @property
    def fallback(self) -> str:
        """"" when the plugin runs; else which RBAC filter stands in for it."""
        if self.module is not None:
            return ""
        return "allow" if self.spec.fail_strategy == FailStrategy.FAIL_OPEN else "deny"


def fetch(spec: PluginSpec, cache: ModuleCache) -> tuple[Path, str]:
    """The module's file in the cache and its sha256 (blocking: run it off the loop)."""
    url = f"file://{spec.module_path}" if spec.module_path is not None else spec.url
    auth = Keychain.from_dockerconfigjson(spec.pull_secret, f"imagePullSecret of {spec.name}") \
        if spec.pull_secret else None
    got = fetch_module(url, sha256=spec.sha256, pull_policy=spec.pull_policy, auth=auth, cache=cache)
    if spec.module_path is None:
        return got.path, got.sha256
    sha, path = cache.put(got.path.read_bytes(), source=url)  # named by content, never edited in place
    return path, sha


def _unchanged(old: PluginState, spec: PluginSpec) -> bool:
    """Whether ``old`` still serves ``spec`` with no fetch at all: the same remote resource
    (istio-agent asks nothing for an unchanged WasmPlugin, whatever its pull policy), its
    module still on disk. A ``file://`` module is read again: the feed's update may be its edit."""
    return old.spec == spec and spec.remote and (old.module is None or old.module.is_file())


class Controller:
    """Keeps the xDS snapshot equal to the selected plugins, the upstream and the clusters."""

    def __init__(self, server: XdsServer, listen: tuple[str, int], upstream: str, clusters: dict[str, str],
                 tls: UpstreamTls | None = None, cache: ModuleCache | None = None,
                 xds: dict[str, Any] | None = None, http2: Collection[str] = (),
                 tcp_proxies: list[TcpProxy] | None = None, downstream_tls: DownstreamTls | None = None):
        self.server = server
        self.listen = listen
        self.xds = dict(xds or {})
        self.cache = cache or module_cache()
        self.plugins: list[PluginState] = []
        self.errors: dict[str, str] = {}  # resource source -> why it was not read
        self.tcp_proxies = list(tcp_proxies or [])
        self.downstream_tls = downstream_tls
        self.skipped: list[str] = []  # NETWORK plugins with no TCP proxy listener to run on
        self.applied = 0
        self.retry_initial = 2.0
        self._last: SpecSet | None = None
        self._lock = asyncio.Lock()
        # Fetches wait on registries: threads of their own, so that many slow ones leave the
        # loop's default executor (getaddrinfo, for the Kubernetes client too) free.
        self._fetcher = ThreadPoolExecutor(max_workers=16, thread_name_prefix="wasmgate-fetch")
        # Checked now: a bad URL or an unknown HTTP/2 cluster stops startup with the cluster's name.
        for t in self.tcp_proxies:
            if t.cluster not in clusters:
                raise ValueError(f"tcp proxy {t.name}: no cluster named {t.cluster!r} (clusters: "
                                 f"{', '.join(sorted(clusters)) or 'none'})")
        for name in http2:
            if name not in clusters:
                raise ValueError(f"HTTP/2 cluster {name}: no cluster of that name (clusters: "
                                 f"{', '.join(sorted(clusters)) or 'none'})")
        self.clusters = [cluster(upstream_cluster_name(self.xds), upstream, tls,
                                 metadata=self.xds.get("cluster_metadata"),
                                 host_metadata=self.xds.get("upstream_host_metadata")),
                         *(cluster(n, u, tls, http2=n in http2) for n, u in clusters.items())]

    async def apply(self, update: SpecSet | None,
                    fetched: dict[tuple[str, str], tuple[PluginState, PluginState]] | None = None) -> None:
        """Serve ``update`` (None: the last one again, as it is once the lock is held).
        ``fetched``: states fetched meanwhile (the retry loop's), each with the failed state it
        was fetched for; used only while that very state is still the plugin's (not when its
        spec changed meanwhile, even back to the same one: that update fetched anew)."""
        async with self._lock:
            if update is None:
                if self._last is None:
                    return
                update = self._last
            self._last = update
            current = {(p.spec.namespace, p.spec.name): p for p in self.plugins}
            for source, why in update.errors.items():
                if self.errors.get(source) != why:
                    _log.error("%s; its plugins keep their last good version", why)
            self.errors = dict(update.errors)
            states = [p for p in self.plugins if p.spec.source in update.errors]
            kept = {(p.spec.namespace, p.spec.name) for p in states}
            network = sorted(f"{s.namespace}/{s.name}" for s in update.specs if s.network
                             and not any(s.applies_to_port(t.port) for t in self.tcp_proxies))
            if network != self.skipped:
                if network:
                    _log.warning("NETWORK WasmPlugins with no TCP proxy listener (tcp_proxies) to run on: %s",
                                 ", ".join(network))
                self.skipped = network
            todo = []
            for spec in update.specs:
                key = (spec.namespace, spec.name)
                if f"{spec.namespace}/{spec.name}" in network or key in kept:
                    continue
                old = current.get(key)
                pre = (fetched or {}).get(key)
                if pre is not None and old is not None and pre[0] is old and pre[1].spec == spec:
                    self._note(old, pre[1])
                    states.append(pre[1])
                elif old is not None and _unchanged(old, spec):
                    states.append(old)  # no request: its failure, if any, is the retry loop's
                else:
                    todo.append(spec)
            for state in await self._fetch_all(todo):
                self._note(current.get((state.spec.namespace, state.spec.name)), state)
                states.append(state)
            for p in states:
                if p.module is not None:
                    self.cache.pin(p.module)
            for p in self.plugins:
                if p.module is not None:
                    self.cache.unpin(p.module)
            order = {id(s): i for i, s in enumerate(chain_order([p.spec for p in states]))}
            self.plugins = sorted(states, key=lambda p: order[id(p.spec)])
            self.server.set_snapshot(self.snapshot())
            self.applied += 1

    async def _fetch_all(self, specs: list[PluginSpec]) -> list[PluginState]:
        """Fetch these modules concurrently (each blocking fetch on a thread of its own), so one
        slow or unreachable registry costs the others no more than its own wait."""
        loop = asyncio.get_running_loop()
        got = await asyncio.gather(*(loop.run_in_executor(self._fetcher, fetch, s, self.cache) for s in specs),
                                   return_exceptions=True)
        out = []
        for spec, r in zip(specs, got, strict=True):
            if isinstance(r, (OciError, OSError)):
                out.append(PluginState(spec, error=f"{spec.source or spec.url}: plugin {spec.name}: {r}"))
            elif isinstance(r, BaseException):
                raise r
            else:
                out.append(PluginState(spec, *r))
        return out

    @staticmethod
    def _note(old: PluginState | None, state: PluginState) -> None:
        """Log what changed for one plugin (nothing when it did not)."""
        spec = state.spec
        if state.error is not None:
            if old is None or old.error != state.error or old.spec != spec:
                _log.error("%s; Envoy serves an RBAC %s-all filter in its place (%s)", state.error,
                           state.fallback, spec.fail_strategy.value)
        elif old is None or (old.spec, old.sha256) != (spec, state.sha256):
            _log.info("plugin %s: module sha256 %s%s", spec.name, state.sha256[:12],
                      " (changed)" if old is not None else "")

    def snapshot(self) -> Snapshot:
        host, port = self.listen
        extensions = [extension_config(p.resource, wasm_filter(p.spec, p.module) if p.module is not None
                                       else fallback_filter(p.fallback == "allow", p.spec.network))
                      for p in self.plugins]
        http = [p.spec for p in self.plugins if not p.spec.network]
        tcp = [tcp_listener(t, [p.spec for p in self.plugins if p.spec.network and p.spec.applies_to_port(t.port)])
               for t in self.tcp_proxies]
        return Snapshot.of([listener(host, port, http, xds=self.xds, tls=self.downstream_tls), *tcp], self.clusters,
                           extensions)

    async def run(self, feed: AsyncIterable[SpecSet], first: asyncio.Event | None = None) -> None:
        """Apply every update of ``feed``; fetch unavailable modules again, with backoff."""
        retry = asyncio.get_running_loop().create_task(self._retry())
        try:
            async for update in feed:
                await self.apply(update)
                if first is not None:
                    first.set()
            await retry  # a feed that ends (no watching) still gets its unavailable modules fetched again
        finally:
            retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await retry

    async def _retry(self) -> None:
        delay = self.retry_initial
        while True:
            await asyncio.sleep(delay)
            failed = [p for p in self.plugins if p.error is not None]
            if self._last is None or not failed:
                delay = self.retry_initial
                continue
            # Fetched outside apply's lock: a registry slow to answer holds up no other update.
            got = await self._fetch_all([p.spec for p in failed])
            await self.apply(None, {(p.spec.namespace, p.spec.name): (p, s) for p, s in zip(failed, got, strict=True)})
            delay = min(delay * 2, 60.0)

    def describe(self) -> list[dict[str, Any]]:
        ecds = self.server.status.resources.get(ECDS_TYPE, {})
        out = []
        for p in self.plugins:
            r = ecds.get(p.resource)
            out.append({"name": p.spec.name, "namespace": p.spec.namespace, "resource": p.resource,
                        "source": p.spec.source, "url": p.spec.url, "sha256": p.sha256 or None,
                        "module": str(p.module) if p.module else None, "fetch_error": p.error,
                        "serving": f"rbac-{p.fallback}-all" if p.fallback else "wasm",
                        "phase": p.spec.phase.value, "priority": p.spec.priority,
                        "fail_strategy": p.spec.fail_strategy.value,
                        "envoy": r.state if r else "waiting",
                        "envoy_error": r.nack if r is not None and r.state == "rejected" else None})
        return out
