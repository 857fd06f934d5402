"""WasmPlugins and their pull Secrets from the Kubernetes API (``wasmgate run --kube``).

List, then watch from the list's resourceVersion, for two kinds: ``WasmPlugin``
(extensions.istio.io/v1alpha1) and ``kubernetes.io/dockerconfigjson`` Secrets, in one
namespace or all. What is known is applied exactly as the directory source applies files
(resources/wasmplugin.py ``scan_documents``, then ``ResourceSource.apply_scan``): the same
selection, Istio ordering, pulls and live swap. Each object is a source named by its API
path, so an object that does not parse keeps its plugin's last good version, as a bad file
does.

Failure handling, as a Kubernetes reflector does it:
- a watch that ends is resumed from the last resourceVersion seen;
- 410 Gone (resourceVersion too old, e.g. compacted while the API server was away)
  relists: the list replaces what was known, so deletions missed meanwhile are seen;
- any other error (API server restarting, connection lost, CRD not served yet, 403)
  retries with backoff, and changes nothing: the plugins keep serving;
- a relist that returns the same objects applies nothing.

The client is lightkube (async, on httpx2, typed); in-cluster config or a kubeconfig.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.core.exceptions import ConfigError as KubeConfigError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Secret

from wasmgate.plugin.manager import PluginManager
from wasmgate.plugin.spec import PluginSpec
from wasmgate.resources.wasmplugin import Scope, scan_documents
from wasmgate.resources.watch import ResourceSource

_log = logging.getLogger("wasmgate.config.kube")  # under the `config` log component

WasmPluginResource = create_namespaced_resource("extensions.istio.io", "v1alpha1", "WasmPlugin", "wasmplugins")

SECRET_TYPE = "kubernetes.io/dockerconfigjson"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"  # in-cluster: token, ca.crt, namespace


class KubeError(Exception):
    """The Kubernetes API could not be read (at startup: it stops startup)."""


@dataclass(frozen=True)
class Kind:
    name: str  # "WasmPlugin" or "Secret"
    resource: Any  # the lightkube resource class
    api: str  # API group path, for naming sources
    plural: str
    fields: dict[str, str] | None  # field selector
    selected: bool  # whether the user's label selector applies


KINDS = (
    Kind("WasmPlugin", WasmPluginResource, "/apis/extensions.istio.io/v1alpha1", "wasmplugins", None, True),
    Kind("Secret", Secret, "/api/v1", "secrets", {"type": SECRET_TYPE}, False),
)


def load_config(kubeconfig: str | None) -> KubeConfig:
    """A kubeconfig file when given, else in-cluster config, else $KUBECONFIG or ~/.kube/config."""
    try:
        if kubeconfig:
            return KubeConfig.from_file(kubeconfig)
        return KubeConfig.from_env(service_account=SERVICE_ACCOUNT_DIR)
    except (KubeConfigError, OSError, KeyError) as e:  # KeyError: KUBERNETES_SERVICE_HOST/PORT unset
        where = kubeconfig or "in-cluster config, $KUBECONFIG or ~/.kube/config"
        raise KubeError(f"{where}: cannot load Kubernetes config: {e}") from None


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiError):
        return f"{e.status.code} {e.status.reason or ''}: {e.status.message}".strip()
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class KubeSource(ResourceSource):
    """Follows WasmPlugins and pull Secrets through the API server; see the module docstring."""

    def __init__(self, manager: PluginManager, scope: Scope, *, namespace: str | None = None,
                 selector: dict[str, str] | None = None, kubeconfig: str | None = None,
                 client: AsyncClient | None = None):
        super().__init__(manager, scope)
        self.namespace = namespace
        self.selector = dict(selector or {})
        self.kubeconfig = kubeconfig
        self._client = client
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k.name: {} for k in KINDS}
        self.versions: dict[str, str] = {}  # kind -> resourceVersion to watch from; absent: relist
        self.relists = 0  # lists after the first (410 Gone), for tests and logs
        self.backoff_initial = 0.5
        self.backoff_max = 30.0
        self.watch_timeout = 290  # seconds the API server keeps one watch open
        self.debounce = 0.05  # a burst of events (a relist, a multi-object apply) is applied once
        self._dirty = asyncio.Event()
        self._last: tuple[list[PluginSpec], dict[str, str]] | None = None
        self._last_error: dict[str, str] = {}

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            self._client = AsyncClient(load_config(self.kubeconfig), timeout=httpx2.Timeout(10.0))
        return self._client

    @property
    def _ns(self) -> str:
        return self.namespace or "*"  # "*": every namespace

    def where(self) -> str:
        return f"namespace {self.namespace}" if self.namespace else "all namespaces"

    # ---- list and watch ----------------------------------------------------------------

    async def sync(self, timeout: float = 60.0) -> None:
        """List every kind once (startup), retrying until ``timeout``; raises KubeError."""
        deadline = asyncio.get_running_loop().time() + timeout
        delay = self.backoff_initial
        for kind in KINDS:
            while True:
                try:
                    await self._list(kind)
                    break
                except (ApiError, httpx2.HTTPError, OSError) as e:
                    if asyncio.get_running_loop().time() + delay > deadline:
                        hint = ""
                        if isinstance(e, ApiError) and e.status.code == 404 and kind.name == "WasmPlugin":
                            hint = " (is the WasmPlugin CRD installed? deploy/kubernetes/crd-wasmplugin.yaml)"
                        raise KubeError(f"cannot list {kind.plural} ({self.where()}) from "
                                        f"{self.client.config.cluster.server}: {_describe(e)}{hint}") from None
                    _log.warning("listing %s: %s; retrying", kind.plural, _describe(e))
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max)
        self.relists = 0

    async def _list(self, kind: Kind) -> None:
        found: dict[tuple[str, str], dict[str, Any]] = {}
        listing = self.client.list(kind.resource, namespace=self._ns, **self._selectors(kind))
        async for obj in listing:
            doc = _document(kind, obj)
            found[_key(doc)] = doc
        self.objects[kind.name] = found  # replaces: what the list lacks was deleted
        self.versions[kind.name] = listing.resourceVersion
        self.relists += 1
        self._dirty.set()

    def _selectors(self, kind: Kind) -> dict[str, Any]:
        return {"fields": kind.fields, "labels": self.selector if kind.selected and self.selector else None}

    async def _watch(self, kind: Kind) -> None:
        """One watch session, from the last resourceVersion; returns when it should be renewed."""
        stream: AsyncGenerator[tuple[str, Any]] = self.client.watch(  # type: ignore[assignment]
            kind.resource, namespace=self._ns, resource_version=self.versions[kind.name],
            server_timeout=self.watch_timeout, **self._selectors(kind))
        try:
            # A half-open connection sends nothing: renew the watch past the server's own timeout.
            async with asyncio.timeout(self.watch_timeout + 30):
                async for event, obj in stream:
                    doc = _document(kind, obj)
                    if event == "DELETED":
                        self.objects[kind.name].pop(_key(doc), None)
                    else:
                        self.objects[kind.name][_key(doc)] = doc
                    rv = (doc.get("metadata") or {}).get("resourceVersion")
                    if rv:
                        self.versions[kind.name] = str(rv)
                    self._dirty.set()
        except TimeoutError:
            return
        finally:
            await stream.aclose()

    async def _follow(self, kind: Kind) -> None:
        delay = self.backoff_initial
        while not self._stop.is_set():
            try:
                if kind.name not in self.versions:
                    await self._list(kind)
                    _log.info("relisted %s (%s): %d", kind.plural, self.where(), len(self.objects[kind.name]))
                await self._watch(kind)
                delay = self.backoff_initial
                self._last_error.pop(kind.name, None)
            except ApiError as e:
                if e.status.code == 410:  # too old: resume is impossible, start over from a list
                    _log.info("watching %s: %s; relisting", kind.plural, _describe(e))
                    self.versions.pop(kind.name, None)
                    continue
                delay = await self._backoff(kind, e, delay)
            except (httpx2.HTTPError, OSError) as e:
                delay = await self._backoff(kind, e, delay)
            except Exception as e:  # anything else (an undecodable object): never stop following
                _log.exception("watching %s: unexpected error", kind.plural)
                self.versions.pop(kind.name, None)
                delay = await self._backoff(kind, e, delay)

    async def _backoff(self, kind: Kind, e: BaseException, delay: float) -> float:
        why = _describe(e)
        if self._last_error.get(kind.name) != why:  # once per distinct error, not once per retry
            _log.warning("watching %s (%s): %s; plugins keep serving, retrying", kind.plural, self.where(), why)
            self._last_error[kind.name] = why
        await asyncio.sleep(delay)
        return min(delay * 2, self.backoff_max)

    # ---- applying ----------------------------------------------------------------------

    def documents(self) -> dict[Path, list[dict[str, Any]]]:
        """What is known, by source (the object's API path), Secrets first."""
        return {Path(path): [doc] for path, doc in self._by_path()}

    def _by_path(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for kind in sorted(KINDS, key=lambda k: k.name != "Secret"):
            for (ns, name), doc in sorted(self.objects[kind.name].items()):
                yield f"{kind.api}/namespaces/{ns}/{kind.plural}/{name}", doc

    def scan(self, strict: bool = False) -> tuple[list[PluginSpec], dict[str, str]]:
        return scan_documents(self.documents(), self.scope, strict=strict)

    async def reload(self) -> None:
        scanned = self.scan()
        unavailable = any(h.module is None for h in self.manager.chain.plugins)
        if scanned == self._last and not unavailable:
            return  # nothing changed (e.g. a relist of the same objects)
        self._last = scanned
        await self.apply_scan(*scanned)

    async def _run(self) -> None:
        self._last = self.scan()  # what startup applied
        self._dirty.clear()
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._follow(k)) for k in KINDS]
        tasks.append(loop.create_task(self._apply_changes()))
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._client is not None:
                await self._client.close()

    async def _apply_changes(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            try:
                await self.reload()
            except Exception:  # never stop applying: log, and try again on the next change
                _log.exception("applying WasmPlugins from the Kubernetes API failed")
                self._last = None


def _document(kind: Kind, obj: Any) -> dict[str, Any]:
    doc: dict[str, Any] = obj.to_dict()
    doc.setdefault("kind", kind.name)  # list items may come without apiVersion/kind
    doc.setdefault("apiVersion", "v1" if kind.name == "Secret" else "extensions.istio.io/v1alpha1")
    return doc


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")
