"""``wasmgate envoy --kube``: WasmPlugins from a real kube-apiserver (tests/kube_harness.py) become
ECDS updates for a real Envoy: apply, serve, edit under load (no failed request), delete."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kube_harness import KubeServer, kube_server
from servers import Upstream
from test_kube import NS, allow_header, setup_cluster, tag
from test_xds_envoy import ECDS, Load, get, tag_of
from xds_harness import GatewayThread


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeServer]:
    with kube_server(tmp_path_factory.mktemp("kube")) as k:
        setup_cluster(k)
        yield k


def test_kube_wasmplugins_reach_envoy_over_ecds(kube: KubeServer, upstream: Upstream, tmp_path: Path) -> None:
    kube.apply(allow_header())
    gw = GatewayThread([], upstream.url, tmp_path / "gw", kube=True, kube_namespace=NS,
                       kubeconfig=str(kube.kubeconfig()))
    try:
        assert get(gw.port)[0] == 403 and get(gw.port, headers={"allow": "true"})[0] == 200
        (p,) = gw.status()["plugins"]
        assert p["resource"] == f"extensions.istio.io/wasmplugin/{NS}.allow-header" and p["envoy"] == "accepted"

        kube.apply(tag("v1"))  # a new plugin: the listener gains a filter
        gw.wait_for(lambda: get(gw.port, headers={"allow": "true"})[1].get("x-chain-resp") == "v1",
                    what="the tag plugin")
        lds = gw.status()["xds"]["versions"]["LDS"]
        load = Load(gw.port, headers={"allow": "true"})
        try:
            time.sleep(0.3)
            for version in ("v2", "v3"):
                kube.apply(tag(version))
                gw.wait_for(lambda v=version: tag_of(gw, {"allow": "true"}) == v,  # type: ignore[misc]
                            what=f"tag {version}")
        finally:
            load.stop()
        assert gw.status()["xds"]["versions"]["LDS"] == lds  # edits went through ECDS alone
        assert load.errors == [] and len(load.results) > 10 and {s for s, _ in load.results} == {200}
        assert {t for _, t in load.results} <= {"v1", "v2", "v3"}

        kube.delete(allow_header())
        gw.wait_for(lambda: get(gw.port)[0] == 200, what="allow-header removed")
        assert [p["resource"] for p in gw.status()["plugins"]] == [ECDS.replace("default.", f"{NS}.") + "tag"]
    finally:
        gw.stop()
