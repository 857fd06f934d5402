"""Which module fetches ``wasmgate run`` makes when its WasmPlugins change, as istio-agent
decides them: none for a remote plugin whose spec did not change (whatever its pull policy);
a changed one under its pull policy (Always: ask the registry; IfNotPresent: the cache).

A real registry (tests/oci_harness.py, docker-registry) behind a recording proxy
(RegistryProxy) that counts every connection and request; the proxy runs in-process
(ProxyThread) with its real file watcher, a real upstream and the real tag plugin.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from oci_harness import Registry, RegistryProxy
from servers import PLUGIN_BUILD, ProxyThread, Upstream, wasmplugin_yaml
from test_live import plugins, tag_of, wait_for
from test_xds_fetch import publish, remote_yaml
from xds_harness import distinct_module

TAG = PLUGIN_BUILD / "tag.wasm"
REMOTE = ("latest", "always", "cached")


@pytest.fixture
def modules(tmp_path: Path) -> dict[str, bytes]:
    """Modules of distinct content per plugin and version (the module cache is content-addressed
    and shared by every test of this process: no two tests may share a module)."""
    run = uuid.uuid4().hex[:8]
    return {f"{n}-{v}": distinct_module(TAG, tmp_path / f"{n}-{v}.wasm", f"{run}-{n}-{v}").read_bytes()
            for n in REMOTE for v in ("v1", "v2")}


def sha(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def by_name(p: ProxyThread) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in plugins(p)["plugins"]}


def tags(p: ProxyThread) -> set[str]:
    return {t.strip() for t in tag_of(p).split(",")}


@contextlib.contextmanager
def running(registry: Registry, proxy: RegistryProxy, modules: dict[str, bytes], upstream: Upstream,
            tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], ProxyThread]]:
    """Three remote plugins (":latest", so Always by default; Always; IfNotPresent) and a local
    one, running from their directory; then every remote tag moved to its v2 module and the
    proxy's record cleared. Yields the directory, the repositories and the running proxy."""
    d = tmp_path / "plugins"
    d.mkdir()
    repos = {n: f"run-fetch/{uuid.uuid4().hex[:12]}" for n in REMOTE}
    refs = {n: f"{repos[n]}:{'latest' if n == 'latest' else 'v1'}" for n in REMOTE}
    for n in REMOTE:
        publish(registry, refs[n], modules[f"{n}-v1"])
    remote_yaml(d, "latest", f"oci://{proxy.ref(refs['latest'])}", config={"tag": "l1"})
    remote_yaml(d, "always", f"oci://{proxy.ref(refs['always'])}", policy="Always", config={"tag": "a1"})
    remote_yaml(d, "cached", f"oci://{proxy.ref(refs['cached'])}", policy="IfNotPresent", config={"tag": "c1"})
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    p = ProxyThread([d], upstream.url)
    try:
        assert tags(p) == {"l1", "a1", "c1", "one"}
        info = by_name(p)
        for n in REMOTE:
            assert info[n]["sha256"] == sha(modules[f"{n}-v1"])
            assert proxy.paths(repos[n])  # the first fetch did ask the registry
        for n in REMOTE:  # what Always would find now
            publish(registry, refs[n], modules[f"{n}-v2"])
        proxy.reset()
        yield d, repos, p
    finally:
        p.stop()


def test_another_plugins_update_contacts_no_registry(registry: Registry, proxy: RegistryProxy,
                                                     modules: dict[str, bytes], upstream: Upstream,
                                                     tmp_path: Path) -> None:
    with running(registry, proxy, modules, upstream, tmp_path) as (d, _, p):
        before = by_name(p)
        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})
        wait_for(lambda: "two" in tags(p))
        assert tags(p) == {"l1", "a1", "c1", "two"}
        assert proxy.requests == [] and proxy.connections == 0  # not even a manifest request for :latest
        after = by_name(p)
        for n in REMOTE:  # the same module and the same VM: nothing was swapped
            assert after[n]["sha256"] == sha(modules[f"{n}-v1"])
            assert (after[n]["vm_instance"], after[n]["root_context_id"]) == \
                (before[n]["vm_instance"], before[n]["root_context_id"])
            assert after[n]["state"] == "running"
        assert after["local"]["root_context_id"] != before["local"]["root_context_id"]


def test_a_changed_always_plugin_is_pulled_again(registry: Registry, proxy: RegistryProxy,
                                                 modules: dict[str, bytes], upstream: Upstream,
                                                 tmp_path: Path) -> None:
    with running(registry, proxy, modules, upstream, tmp_path) as (d, repos, p):
        remote_yaml(d, "always", f"oci://{proxy.ref(repos['always'])}:v1", policy="Always", config={"tag": "a2"})
        remote_yaml(d, "cached", f"oci://{proxy.ref(repos['cached'])}:v1", policy="IfNotPresent",
                    config={"tag": "c2"})
        wait_for(lambda: tags(p) == {"l1", "a2", "c2", "one"}, timeout=30)
        info = by_name(p)
        assert proxy.paths(repos["always"])  # Always: the registry was asked what v1 names now
        assert info["always"]["sha256"] == sha(modules["always-v2"])  # and the moved tag is served
        assert proxy.paths(repos["cached"]) == []  # IfNotPresent: the cached module, no request
        assert info["cached"]["sha256"] == sha(modules["cached-v1"])
        assert proxy.paths(repos["latest"]) == []  # unchanged
        assert info["latest"]["sha256"] == sha(modules["latest-v1"])
