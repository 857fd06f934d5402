"""Which module fetches ``wasmgate envoy`` makes, as istio-agent makes them: none for a WasmPlugin
whose spec did not change (whatever its pull policy); for a changed one, its pull policy (Always:
ask the registry; IfNotPresent: the cache); changed ones fetched at once; a failing registry
holding up no other plugin's update.

A real registry (tests/oci_harness.py, docker-registry) behind a recording proxy (RegistryProxy)
that counts every connection and request; WasmPlugin files read by the real feed; a real Envoy
for the end-to-end case.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from oci_harness import Registry, RegistryProxy
from servers import ALLOW_HEADER_WASM, PLUGIN_BUILD, Upstream, wasmplugin_yaml
from test_xds_envoy import get
from wasmgate.oci.fetch import ModuleCache
from wasmgate.oci.image import Package
from wasmgate.oci.ops import push
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import RegistryClient
from wasmgate.resources.feed import DirectoryFeed, SpecSet
from wasmgate.xds.control import Controller, PluginState
from wasmgate.xds.resources import ECDS_TYPE
from wasmgate.xds.server import XdsServer
from xds_harness import GatewayThread, distinct_module

TAG = PLUGIN_BUILD / "tag.wasm"


@pytest.fixture
def modules(tmp_path: Path) -> dict[str, bytes]:
    """Modules of distinct content (a registry is content-addressed: no two tests share one)."""
    run = uuid.uuid4().hex[:8]
    return {v: distinct_module(TAG, tmp_path / f"{v}.wasm", f"{run}-{v}").read_bytes() for v in ("v1", "v2", "v3")}


def sha(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def repo() -> str:
    return f"xds-fetch/{uuid.uuid4().hex[:12]}"


def publish(registry: Registry, ref: str, wasm: bytes) -> Package:
    """Push straight to the registry (never through the proxy: only fetches are counted)."""
    with RegistryClient() as client:
        return push(client, parse_reference(registry.ref(ref)), wasm, "image")


def remote_yaml(d: Path, name: str, url: str, *, config: Any = None, policy: str = "",
                fail_strategy: str = "") -> Path:
    spec: dict[str, Any] = {"url": url, "pluginName": name}
    if config is not None:
        spec["pluginConfig"] = config
    if policy:
        spec["imagePullPolicy"] = policy
    if fail_strategy:
        spec["failStrategy"] = fail_strategy
    path = d / f"{name}.yaml"
    path.write_text(json.dumps({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                                "metadata": {"name": name}, "spec": spec}))
    return path


def controller(tmp_path: Path) -> Controller:
    return Controller(XdsServer(), ("127.0.0.1", 0), "http://127.0.0.1:1", {}, cache=ModuleCache(tmp_path / "cache"))


def config(p: PluginState) -> Any:
    return json.loads(p.spec.plugin_config)


def by_name(c: Controller) -> dict[str, PluginState]:
    return {p.spec.name: p for p in c.plugins}


def test_an_update_of_one_plugin_contacts_no_registry_for_the_unchanged_others(
        registry: Registry, proxy: RegistryProxy, modules: dict[str, bytes], tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    latest, always, cached = repo(), repo(), repo()
    publish(registry, f"{latest}:latest", modules["v1"])
    publish(registry, f"{always}:v1", modules["v1"])
    publish(registry, f"{cached}:v1", modules["v1"])
    remote_yaml(d, "latest", f"oci://{proxy.ref(latest)}:latest")  # :latest: Always by default
    remote_yaml(d, "always", f"oci://{proxy.ref(always)}:v1", policy="Always")
    remote_yaml(d, "cached", f"oci://{proxy.ref(cached)}:v1")
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    feed = DirectoryFeed([d], watch=False)

    async def scenario() -> None:
        c = controller(tmp_path)
        await c.apply(feed.scan())
        before = by_name(c)
        assert all(p.module is not None for p in before.values()), [p.error for p in before.values()]
        assert proxy.paths(latest) and proxy.paths(always) and proxy.paths(cached)  # the first fetch asks
        ecds = c.server.versions[ECDS_TYPE]
        proxy.reset()

        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})
        await c.apply(feed.scan())
        assert proxy.requests == [] and proxy.connections == 0  # not even a manifest HEAD for :latest
        after = by_name(c)
        assert after["local"].spec.plugin_config != before["local"].spec.plugin_config
        for name in ("latest", "always", "cached"):
            assert after[name] is before[name]  # the same state: module file and sha256
        assert c.server.versions[ECDS_TYPE] != ecds  # the change itself did go out

        await c.apply(feed.scan())  # an update changing nothing (a resync, a Secret elsewhere)
        assert proxy.requests == [] and proxy.connections == 0

    asyncio.run(scenario())


def test_a_changed_always_plugin_is_pulled_again_and_an_if_not_present_one_is_not(
        registry: Registry, proxy: RegistryProxy, modules: dict[str, bytes], tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    always, cached, latest = repo(), repo(), repo()
    for r in (f"{always}:v1", f"{cached}:v1", f"{latest}:latest"):
        publish(registry, r, modules["v1"])
    remote_yaml(d, "always", f"oci://{proxy.ref(always)}:v1", policy="Always", config={"tag": "a1"})
    remote_yaml(d, "cached", f"oci://{proxy.ref(cached)}:v1", policy="IfNotPresent", config={"tag": "c1"})
    remote_yaml(d, "latest", f"oci://{proxy.ref(latest)}:latest", config={"tag": "l1"})
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    feed = DirectoryFeed([d], watch=False)

    async def scenario() -> None:
        c = controller(tmp_path)
        await c.apply(feed.scan())
        first = {n: p.sha256 for n, p in by_name(c).items()}
        # every tag now names other content (not the same: each pull is then a download of its own)
        publish(registry, f"{always}:v1", modules["v2"])
        publish(registry, f"{cached}:v1", modules["v2"])
        publish(registry, f"{latest}:latest", modules["v3"])
        proxy.reset()

        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})  # their resources unchanged
        await c.apply(feed.scan())
        assert proxy.requests == [] and {n: p.sha256 for n, p in by_name(c).items() if n != "local"} == \
            {n: s for n, s in first.items() if n != "local"}

        remote_yaml(d, "always", f"oci://{proxy.ref(always)}:v1", policy="Always", config={"tag": "a2"})
        remote_yaml(d, "cached", f"oci://{proxy.ref(cached)}:v1", policy="IfNotPresent", config={"tag": "c2"})
        remote_yaml(d, "latest", f"oci://{proxy.ref(latest)}:latest", config={"tag": "l2"})
        await c.apply(feed.scan())
        now = by_name(c)
        # Always (explicit, or by the :latest default): the tag is resolved again, the new module pulled
        for name, r, v in (("always", always, "v2"), ("latest", latest, "v3")):
            assert any("/manifests/" in p for p in proxy.paths(r)) and any("/blobs/" in p for p in proxy.paths(r))
            module = now[name].module
            assert now[name].sha256 != first[name] and module is not None and module.read_bytes() == modules[v]
        # IfNotPresent: the module cached for that URL, no request at all
        assert proxy.paths(cached) == [] and now["cached"].sha256 == first["cached"]
        assert config(now["cached"]) == {"tag": "c2"}

        proxy.reset()  # Always again, nothing moved: the manifest is asked, no blob downloaded
        remote_yaml(d, "always", f"oci://{proxy.ref(always)}:v1", policy="Always", config={"tag": "a3"})
        await c.apply(feed.scan())
        assert proxy.paths(always) and not any("/blobs/" in p for p in proxy.paths(always))
        assert proxy.paths(latest) == [] and proxy.paths(cached) == []

    asyncio.run(scenario())


def test_changed_plugins_are_fetched_at_once(registry: Registry, proxy: RegistryProxy, modules: dict[str, bytes],
                                             tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    one, two = repo(), repo()
    publish(registry, f"{one}:v1", modules["v1"])
    publish(registry, f"{two}:v1", modules["v2"])
    remote_yaml(d, "one", f"oci://{proxy.ref(one)}:v1")
    remote_yaml(d, "two", f"oci://{proxy.ref(two)}:v1")
    feed = DirectoryFeed([d], watch=False)

    async def scenario() -> None:
        c = controller(tmp_path)
        proxy.hold(one)
        proxy.hold(two)  # neither answers until both were asked
        task = asyncio.get_running_loop().create_task(c.apply(feed.scan()))
        try:
            both = await asyncio.to_thread(lambda: proxy.wait_for(one, 20) and proxy.wait_for(two, 20))
            assert both, f"one fetch waited for the other: {proxy.requests}"
        finally:
            proxy.release(one)
            proxy.release(two)
        await task
        assert {n: p.module is not None for n, p in by_name(c).items()} == {"one": True, "two": True}

    asyncio.run(scenario())


def test_a_failing_plugin_holds_up_no_other_update(registry: Registry, proxy: RegistryProxy,
                                                   modules: dict[str, bytes], tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    broken = repo()
    publish(registry, f"{broken}:v1", modules["v1"])
    remote_yaml(d, "broken", f"oci://{proxy.ref(broken)}:v1", fail_strategy="FAIL_OPEN")
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"})
    feed = DirectoryFeed([d], watch=False)

    async def scenario() -> None:
        c = controller(tmp_path)
        c.retry_initial = 3600.0  # no retry yet
        proxy.refuse(broken)
        updates: asyncio.Queue[SpecSet] = asyncio.Queue()

        async def queued() -> Any:
            while True:
                yield await updates.get()

        await updates.put(feed.scan())
        run = asyncio.get_running_loop().create_task(c.run(queued()))
        try:
            while c.applied < 1:
                await asyncio.sleep(0.01)
            assert by_name(c)["broken"].error is not None and by_name(c)["broken"].fallback == "allow"
            proxy.reset()
            # Another plugin's update: the failing one is left to the retry loop, not asked again
            wasmplugin_yaml(d, "local", TAG, config={"tag": "two"})
            await updates.put(feed.scan())
            while c.applied < 2:
                await asyncio.sleep(0.01)
            assert proxy.paths(broken) == [] and config(by_name(c)["local"]) == {"tag": "two"}

            # The retry, held at the registry, blocks no update meanwhile
            proxy.refuse(broken, False)
            proxy.hold(broken)
            c.retry_initial = 0.05
            run.cancel()  # restart the loop with the short delay
            with pytest.raises(asyncio.CancelledError):
                await run
            run = asyncio.get_running_loop().create_task(c.run(queued()))
            assert await asyncio.to_thread(proxy.wait_for, broken, 20), "no retry"
            applied = c.applied
            wasmplugin_yaml(d, "local", TAG, config={"tag": "three"})
            await updates.put(feed.scan())
            for _ in range(2000):
                if c.applied > applied:
                    break
                await asyncio.sleep(0.01)
            assert config(by_name(c)["local"]) == {"tag": "three"}, "the update waited for the retry"
            assert by_name(c)["broken"].error is not None  # still held
            proxy.release(broken)
            for _ in range(2000):
                if by_name(c)["broken"].module is not None:
                    break
                await asyncio.sleep(0.01)
            assert by_name(c)["broken"].module is not None and by_name(c)["broken"].error is None
            assert config(by_name(c)["local"]) == {"tag": "three"}  # the retry kept the new update
        finally:
            proxy.release(broken)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

    asyncio.run(scenario())


def test_a_retry_for_a_spec_changed_and_reverted_meanwhile_is_not_served(registry: Registry, proxy: RegistryProxy,
                                                                          modules: dict[str, bytes],
                                                                          tmp_path: Path) -> None:
    """A failing plugin (Always) changes from S1 to S2 and back to S1 while the retry loop's fetch
    of S1 is in flight, and S1's tag moves meanwhile: the revert's own fetch gets the tag's new
    module, and the retry's result (the old module), fetched for the state the revert replaced,
    is not served though its spec is S1 again."""
    d = tmp_path / "plugins"
    d.mkdir()
    broken, other = repo(), repo()
    layer = publish(registry, f"{broken}:v1", modules["v1"]).layers[0].digest
    publish(registry, f"{other}:v1", modules["v2"])
    s1 = remote_yaml(d, "broken", f"oci://{proxy.ref(broken)}:v1", policy="Always", fail_strategy="FAIL_OPEN",
                     config={"tag": "b1"}).read_text()
    feed = DirectoryFeed([d], watch=False)

    async def scenario() -> None:
        c = controller(tmp_path)
        c.retry_initial = 0.05
        proxy.refuse(broken)
        await c.apply(feed.scan())
        assert by_name(c)["broken"].error is not None
        never: asyncio.Event = asyncio.Event()

        async def no_updates() -> Any:
            await never.wait()
            yield SpecSet([], {})

        run = asyncio.get_running_loop().create_task(c.run(no_updates()))
        try:
            # The retry's fetch goes on past the tag (resolved to v1's first module) and waits at
            # that module's layer.
            proxy.hold(f"{broken}/blobs/{layer}")
            proxy.refuse(broken, False)
            for _ in range(2000):
                if any(layer in r for r in proxy.paths(broken)):
                    break
                await asyncio.sleep(0.01)
            assert any(layer in r for r in proxy.paths(broken)), "no retry"
            publish(registry, f"{broken}:v1", modules["v3"])  # the tag moves

            remote_yaml(d, "broken", f"oci://{proxy.ref(other)}:v1", policy="Always", fail_strategy="FAIL_OPEN",
                        config={"tag": "b2"})
            await c.apply(feed.scan())
            assert by_name(c)["broken"].sha256 == sha(modules["v2"])
            (d / "broken.yaml").write_text(s1)  # S1 again
            await c.apply(feed.scan())
            assert by_name(c)["broken"].sha256 == sha(modules["v3"])  # the tag as it is now

            applied = c.applied
            proxy.release(f"{broken}/blobs/{layer}")  # the retry's fetch of the old module completes
            for _ in range(2000):
                if c.applied > applied:
                    break
                await asyncio.sleep(0.01)
            assert c.applied > applied, "the retry applied nothing"
            assert by_name(c)["broken"].sha256 == sha(modules["v3"]) and by_name(c)["broken"].error is None
        finally:
            proxy.release(f"{broken}/blobs/{layer}")
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run

    asyncio.run(scenario())


def test_envoy_gets_a_new_latest_module_when_its_resource_changes(
        registry: Registry, proxy: RegistryProxy, upstream: Upstream, tmp_path: Path) -> None:
    """The :latest tag moves from the tag plugin to allow-header; Envoy keeps the first while only
    another WasmPlugin changes, and gets the second once this WasmPlugin changes (Istio's Always)."""
    d = tmp_path / "plugins"
    d.mkdir()
    r = repo()
    run = uuid.uuid4().hex[:8]
    publish(registry, f"{r}:latest", distinct_module(TAG, tmp_path / "v1.wasm", run).read_bytes())
    conf = {"header": "allow", "value": "true"}  # allow-header's; the tag plugin ignores it
    remote_yaml(d, "remote", f"oci://{proxy.ref(r)}:latest", config={**conf, "tag": "r1"})
    wasmplugin_yaml(d, "local", TAG, config={"tag": "one"}, phase="AUTHN")
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        status, headers, _ = get(gw.port)
        assert status == 200 and "r1" in headers["x-chain-resp"]
        publish(registry, f"{r}:latest", distinct_module(ALLOW_HEADER_WASM, tmp_path / "v2.wasm", run).read_bytes())
        proxy.reset()

        wasmplugin_yaml(d, "local", TAG, config={"tag": "two"}, phase="AUTHN")
        gw.wait_for(lambda: "two" in get(gw.port)[1].get("x-chain-resp", ""), what="local plugin updated")
        status, headers, _ = get(gw.port)
        assert status == 200 and "r1" in headers["x-chain-resp"]  # still the first module
        assert proxy.requests == []

        remote_yaml(d, "remote", f"oci://{proxy.ref(r)}:latest", config={**conf, "tag": "r2"})
        gw.wait_for(lambda: get(gw.port)[0] == 403, what="the new :latest module in Envoy")
        assert get(gw.port, headers={"allow": "true"})[0] == 200
        assert any("/blobs/" in p for p in proxy.paths(r))
        # Envoy answers the push with its ACK after it serves the new listener: wait for it.
        gw.wait_for(lambda: gw.plugin("remote")["envoy"] == "accepted", what="Envoy's ACK of the new module")
    finally:
        gw.stop()
