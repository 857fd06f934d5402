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
from wasmgate.oci.ops import resolve
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import RegistryClient
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


def test_a_failing_plugins_retry_holds_up_no_other_update(registry: Registry, proxy: RegistryProxy,
                                                           upstream: Upstream, tmp_path: Path) -> None:
    """A plugin whose fetch failed is fetched again by the retry loop only, outside apply: while
    its registry keeps that fetch waiting, another plugin's edit is served; once it answers,
    the plugin comes up and the edit stays."""
    d = tmp_path / "plugins"
    d.mkdir()
    broken = f"run-fetch/{uuid.uuid4().hex[:12]}"
    wasm = distinct_module(TAG, tmp_path / "broken.wasm", uuid.uuid4().hex).read_bytes()
    publish(registry, f"{broken}:v1", wasm)
    remote_yaml(d, "broken", f"oci://{proxy.ref(broken)}:v1", fail_strategy="FAIL_OPEN", config={"tag": "b1"})
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    proxy.refuse(broken)
    p = ProxyThread([d], upstream.url)
    try:
        assert by_name(p)["broken"]["state"] == "unavailable" and tags(p) == {"one"}
        proxy.hold(broken)  # the retry loop's next fetch waits at the registry
        proxy.refuse(broken, False)
        proxy.reset()
        assert proxy.wait_for(broken, 30), "no retry"
        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})
        wait_for(lambda: tags(p) == {"two"}, timeout=10)  # the held fetch would last 15 s or more
        assert by_name(p)["broken"]["state"] == "unavailable"  # still held
        assert len(proxy.paths(broken)) == 1  # the edit asked the failing plugin's registry nothing
        proxy.release(broken)
        wait_for(lambda: by_name(p)["broken"]["state"] == "running", timeout=30)
        assert by_name(p)["broken"]["sha256"] == sha(wasm)
        assert tags(p) == {"b1", "two"}  # the retry kept the newer edit
    finally:
        proxy.release(broken)
        p.stop()


def applied(p: ProxyThread) -> int:
    """Completed applies of the proxy's resource source (the watcher, or the retry loop's reload)."""
    assert p.running.watcher is not None
    return p.running.watcher.applied


def unavailable(registry: Registry, proxy: RegistryProxy, upstream: Upstream, d: Path, tmp_path: Path,
                **extra: str) -> tuple[str, ProxyThread]:
    """A running proxy with a local plugin ("one") and a remote one, "broken", whose registry refused
    its first fetch; the retry loop's next fetch of it is waiting at the registry (held)."""
    broken = f"run-fetch/{uuid.uuid4().hex[:12]}"
    publish(registry, f"{broken}:v1", distinct_module(TAG, tmp_path / "b1.wasm", uuid.uuid4().hex).read_bytes())
    remote_yaml(d, "broken", f"oci://{proxy.ref(broken)}:v1", fail_strategy="FAIL_OPEN", config={"tag": "b1"},
                **extra)
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    proxy.refuse(broken)
    p = ProxyThread([d], upstream.url)
    try:
        assert by_name(p)["broken"]["state"] == "unavailable" and "one" in tags(p) and "b1" not in tags(p)
        proxy.hold(broken)
        proxy.refuse(broken, False)
        proxy.reset()
        assert proxy.wait_for(broken, 30), "no retry"
    except BaseException:
        proxy.release(broken)
        p.stop()
        raise
    return broken, p


def unavailable_beside_other(registry: Registry, proxy: RegistryProxy, upstream: Upstream,
                             tmp_path: Path) -> tuple[Path, str, str, ProxyThread]:
    """``unavailable`` (Always), with a third, remote plugin "other" (tag o1) whose updates a
    test can hold to keep apply busy: the plugins' directory, other's and broken's repositories,
    the proxy."""
    d = tmp_path / "plugins"
    d.mkdir()
    other = f"run-fetch/{uuid.uuid4().hex[:12]}"
    publish(registry, f"{other}:v1", distinct_module(TAG, tmp_path / "o.wasm", uuid.uuid4().hex).read_bytes())
    remote_yaml(d, "other", f"oci://{proxy.ref(other)}:v1", policy="Always", config={"tag": "o1"})
    broken, p = unavailable(registry, proxy, upstream, d, tmp_path, policy="Always")
    return d, other, broken, p


def test_an_update_made_while_the_retry_fetches_wins(registry: Registry, proxy: RegistryProxy,
                                                     upstream: Upstream, tmp_path: Path) -> None:
    """The failing plugin's own resource changes while the retry loop fetches its old version:
    the new version is served, and the old one, fetched afterwards, is never installed."""
    d = tmp_path / "plugins"
    d.mkdir()
    broken, p = unavailable(registry, proxy, upstream, d, tmp_path)
    try:
        moved = f"run-fetch/{uuid.uuid4().hex[:12]}"
        new = distinct_module(TAG, tmp_path / "b2.wasm", uuid.uuid4().hex).read_bytes()
        publish(registry, f"{moved}:v1", new)
        remote_yaml(d, "broken", f"oci://{proxy.ref(moved)}:v1", fail_strategy="FAIL_OPEN", config={"tag": "b2"})
        wait_for(lambda: by_name(p)["broken"]["state"] == "running", timeout=10)
        assert tags(p) == {"b2", "one"} and by_name(p)["broken"]["sha256"] == sha(new)
        n = applied(p)
        proxy.release(broken)  # the retry's fetch of the old version completes, then it reloads
        wait_for(lambda: applied(p) > n, timeout=30)
        assert any("/blobs/" in r for r in proxy.paths(broken))  # it did fetch the old module
        assert tags(p) == {"b2", "one"} and by_name(p)["broken"]["sha256"] == sha(new)
    finally:
        proxy.release(broken)
        p.stop()


def test_a_plugin_removed_while_the_retry_fetches_stays_removed(registry: Registry, proxy: RegistryProxy,
                                                                upstream: Upstream, tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    broken, p = unavailable(registry, proxy, upstream, d, tmp_path)
    try:
        (d / "broken.yaml").unlink()
        wait_for(lambda: "broken" not in by_name(p), timeout=10)
        n = applied(p)
        proxy.release(broken)
        wait_for(lambda: applied(p) > n, timeout=30)  # the retry loop fetched it and reloaded
        assert any("/blobs/" in r for r in proxy.paths(broken))
        assert set(by_name(p)) == {"local"} and tags(p) == {"one"}
    finally:
        proxy.release(broken)
        p.stop()


def test_a_retry_never_installs_what_it_fetched_for_a_plugin_since_added_again(
        registry: Registry, proxy: RegistryProxy, upstream: Upstream, tmp_path: Path) -> None:
    """The plugin is removed while the retry loop fetches it, then added again (the same spec,
    Always) after its tag moved: the new plugin gets the module the tag names now, never the
    one the retry fetched for the removed plugin. Another plugin's update keeps apply busy
    meanwhile, so that both orders of the retry's reload and the re-add's apply are covered."""
    d, other, broken, p = unavailable_beside_other(registry, proxy, upstream, tmp_path)
    try:
        assert tags(p) == {"o1", "one"}
        resource = (d / "broken.yaml").read_text()
        (d / "broken.yaml").unlink()
        wait_for(lambda: "broken" not in by_name(p), timeout=10)
        proxy.hold(other)  # "other"'s update holds apply's lock, fetching at its registry
        remote_yaml(d, "other", f"oci://{proxy.ref(other)}:v1", policy="Always", config={"tag": "o2"})
        assert proxy.wait_for(other, 10)
        proxy.release(broken)  # the retry fetches the removed plugin's module (v1 as it was)
        wait_for(lambda: any("/blobs/" in r for r in proxy.paths(broken)), timeout=10)
        moved = distinct_module(TAG, tmp_path / "b1-moved.wasm", uuid.uuid4().hex).read_bytes()
        publish(registry, f"{broken}:v1", moved)
        n = applied(p)
        (d / "broken.yaml").write_text(resource)
        proxy.release(other)
        # "other"'s apply, the re-add's and the retry loop's reload
        wait_for(lambda: applied(p) >= n + 3, timeout=30)
        wait_for(lambda: by_name(p)["broken"]["state"] == "running", timeout=10)
        assert by_name(p)["broken"]["sha256"] == sha(moved)
        assert tags(p) == {"b1", "o2", "one"}
    finally:
        proxy.release(broken)
        proxy.release(other)
        p.stop()


def test_a_retry_for_a_replaced_version_fetches_nothing_under_apply(registry: Registry, proxy: RegistryProxy,
                                                                    upstream: Upstream, tmp_path: Path) -> None:
    """The failing plugin changes to another version that fails too while the retry loop fetches
    the old one: the retry's reload asks no registry for the new version (that is for the retry
    loop's next round, outside apply), so another plugin's edit is served meanwhile."""
    d = tmp_path / "plugins"
    d.mkdir()
    broken, p = unavailable(registry, proxy, upstream, d, tmp_path)
    try:
        moved = f"run-fetch/{uuid.uuid4().hex[:12]}"
        publish(registry, f"{moved}:v1", distinct_module(TAG, tmp_path / "b2.wasm", uuid.uuid4().hex).read_bytes())
        proxy.refuse(moved)
        remote_yaml(d, "broken", f"oci://{proxy.ref(moved)}:v1", fail_strategy="FAIL_OPEN", config={"tag": "b2"})
        wait_for(lambda: moved in by_name(p)["broken"]["url"] and by_name(p)["broken"]["state"] == "unavailable",
                 timeout=10)
        proxy.hold(moved)  # a fetch of the new version now waits at its registry
        n, asked = applied(p), len(proxy.paths(moved))
        proxy.release(broken)
        # the retry loop's reload is done, or it is fetching the new version (under apply's lock)
        wait_for(lambda: applied(p) > n or len(proxy.paths(moved)) > asked, timeout=30)
        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})
        wait_for(lambda: tags(p) == {"two"}, timeout=10)  # a held fetch would last 15 s or more
        info = by_name(p)["broken"]
        assert info["state"] == "unavailable" and moved in info["url"]
    finally:
        proxy.release(broken)
        proxy.release(moved)
        p.stop()


def test_a_spec_changed_and_reverted_while_the_retry_fetches_serves_the_tag_as_it_is_now(
        registry: Registry, proxy: RegistryProxy, upstream: Upstream, tmp_path: Path) -> None:
    """The failing plugin (Always) changes from S1 to S2 and back to S1 while the retry loop's
    fetch of S1 is in flight, and S1's tag moves meanwhile. The revert is a new plugin entry
    (S1's was replaced by S2's): its own apply fetches S1, and gets the tag's new module; the
    module the retry fetched for the replaced entry (the tag's old one) is never installed,
    though its spec is S1 again."""
    d = tmp_path / "plugins"
    d.mkdir()
    broken, p = unavailable(registry, proxy, upstream, d, tmp_path, policy="Always")
    with RegistryClient() as client:
        layer = str(resolve(client, parse_reference(registry.ref(f"{broken}:v1"))).doc["layers"][0]["digest"])
    try:
        s1 = (d / "broken.yaml").read_text()
        # The retry's fetch goes on past the tag (resolved to the module published first) and
        # waits at that module's layer.
        proxy.hold(f"{broken}/blobs/{layer}")
        proxy.release(broken)
        wait_for(lambda: any(layer in r for r in proxy.paths(broken)), timeout=10)
        moved = distinct_module(TAG, tmp_path / "b1-moved.wasm", uuid.uuid4().hex).read_bytes()
        publish(registry, f"{broken}:v1", moved)

        other = f"run-fetch/{uuid.uuid4().hex[:12]}"  # S2: another url (and pluginConfig)
        s2 = distinct_module(TAG, tmp_path / "b2.wasm", uuid.uuid4().hex).read_bytes()
        publish(registry, f"{other}:v1", s2)
        remote_yaml(d, "broken", f"oci://{proxy.ref(other)}:v1", policy="Always", fail_strategy="FAIL_OPEN",
                    config={"tag": "b2"})
        wait_for(lambda: tags(p) == {"b2", "one"}, timeout=10)
        assert by_name(p)["broken"]["sha256"] == sha(s2)

        (d / "broken.yaml").write_text(s1)  # S1 again
        wait_for(lambda: tags(p) == {"b1", "one"}, timeout=10)
        assert by_name(p)["broken"]["sha256"] == sha(moved)  # fetched anew: the tag as it is now
        instance = by_name(p)["broken"]["vm_instance"]

        n = applied(p)
        proxy.release(f"{broken}/blobs/{layer}")  # the retry's fetch of the old module completes
        wait_for(lambda: applied(p) > n, timeout=30)  # and the retry loop reloaded
        info = by_name(p)["broken"]
        assert info["sha256"] == sha(moved) and info["vm_instance"] == instance  # nothing swapped
        assert tags(p) == {"b1", "one"} and info["state"] == "running"
    finally:
        proxy.release(broken)
        proxy.release(f"{broken}/blobs/{layer}")
        p.stop()


def test_a_spec_changed_and_reverted_within_one_apply_keeps_the_retrys_fetch(
        registry: Registry, proxy: RegistryProxy, upstream: Upstream, tmp_path: Path) -> None:
    """The failing plugin's resource goes from S1 to S2 and back to S1 while another plugin's
    update holds apply, so the next apply sees S1 only: for it nothing changed. The plugin is
    the same entry, that apply fetches nothing (the retry's fetch of S1, in flight, is not
    waited for nor repeated under apply's lock), and the retry's module is installed when it
    arrives, from its one fetch."""
    d, other, broken, p = unavailable_beside_other(registry, proxy, upstream, tmp_path)
    with RegistryClient() as client:
        layer = str(resolve(client, parse_reference(registry.ref(f"{broken}:v1"))).doc["layers"][0]["digest"])
    s2 = f"run-fetch/{uuid.uuid4().hex[:12]}"
    try:
        assert tags(p) == {"o1", "one"}
        s1 = (d / "broken.yaml").read_text()
        proxy.hold(f"{broken}/blobs/{layer}")  # the retry's fetch goes on to the layer, and waits there
        proxy.release(broken)
        wait_for(lambda: any(layer in r for r in proxy.paths(broken)), timeout=10)
        proxy.hold(other)  # "other"'s update holds apply's lock, fetching at its registry
        remote_yaml(d, "other", f"oci://{proxy.ref(other)}:v1", policy="Always", config={"tag": "o2"})
        assert proxy.wait_for(other, 10)
        remote_yaml(d, "broken", f"oci://{proxy.ref(s2)}:v1", policy="Always", fail_strategy="FAIL_OPEN",
                    config={"tag": "b2"})
        (d / "broken.yaml").write_text(s1)
        n = applied(p)
        proxy.release(other)
        wait_for(lambda: applied(p) >= n + 2, timeout=10)  # "other"'s apply, then the one seeing S1 again
        assert tags(p) == {"o2", "one"} and by_name(p)["broken"]["state"] == "unavailable"
        assert proxy.paths(s2) == []
        manifests = [r for r in proxy.paths(broken) if "/manifests/" in r]
        assert len(manifests) == 1  # the retry's: no apply asked for S1

        proxy.release(f"{broken}/blobs/{layer}")
        wait_for(lambda: by_name(p)["broken"]["state"] == "running", timeout=30)
        assert by_name(p)["broken"]["sha256"] == sha((tmp_path / "b1.wasm").read_bytes())  # unavailable()'s
        assert tags(p) == {"b1", "o2", "one"}
        assert [r for r in proxy.paths(broken) if "/manifests/" in r] == manifests  # from that one fetch
    finally:
        proxy.release(f"{broken}/blobs/{layer}")
        proxy.release(broken)
        proxy.release(other)
        p.stop()
