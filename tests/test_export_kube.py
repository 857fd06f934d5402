"""Exported manifests against a real kube-apiserver serving deploy/kubernetes/crd-wasmplugin.yaml:
the server's own validation (OpenAPI schema and CEL rules) accepts every exported object and
stores it unpruned, and refuses the raw wasmgate resources that export refuses or rewrites."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from crd_schema import load_crd
from kube_harness import KubeServer, kube_server, object_path
from oci_harness import Registry
from test_export import OCI, SCOPE, _pushing, plugin, resources
from wasmgate.export.istio import ExportError, export_istio
from wasmgate.plugin.spec import PluginSpec
from wasmgate.resources.wasmplugin import scan_documents, scan_plugin_specs


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeServer]:
    with kube_server(tmp_path_factory.mktemp("kube")) as server:
        with server.client() as c:
            r = c.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", json=load_crd())
            assert r.status_code == 201, r.text
            r = c.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                   "metadata": {"name": "edge"}})
            assert r.status_code == 201, r.text
        server.wait_established("wasmplugins.extensions.istio.io")
        yield server


REGISTRY_KIND = "basic"  # of conftest's registry fixture


def _create(kube: KubeServer, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    with kube.client() as c:
        r = c.post(object_path(doc).rsplit("/", 1)[0], json=doc)
    body: dict[str, Any] = r.json()
    return r.status_code, body


def test_exported_manifests_are_accepted_unchanged(kube: KubeServer, registry: Registry, tmp_path: Path) -> None:
    src = resources(tmp_path, registry)
    exported = export_istio([src, tmp_path / "example" / "wasmplugin.yaml"], _pushing(registry, []))
    out = tmp_path / "istio.yaml"
    out.write_text(exported.yaml())
    start = datetime.now(UTC).replace(microsecond=0)
    stored_docs: dict[Path, list[dict[str, Any]]] = {}
    for doc in yaml.safe_load_all(out.read_text()):
        status, stored = _create(kube, doc)
        assert status == 201, stored.get("message")
        # Nothing pruned or defaulted away: what Istio would read is what export wrote.
        key = "data" if doc["kind"] == "Secret" else "spec"
        assert stored[key] == doc[key], doc["metadata"]["name"]
        for field in ("labels", "annotations"):
            assert stored["metadata"].get(field) == doc["metadata"].get(field)
        stored_docs[Path(object_path(doc))] = [stored]
    # wasmgate reading the stored objects (as `run --kube` does) gets the plugins the file gives.
    from_api = scan_documents(stored_docs, SCOPE, strict=True)[0]
    from_file = scan_plugin_specs([out], SCOPE, strict=True)[0]
    assert len(from_api) == len(exported.documents) - 1
    # The API server stores objects as JSON maps, so pluginConfig comes back with its keys sorted:
    # the same JSON value, other bytes than the file's order gives (docs/istio.md).
    for s in from_api:
        assert s.plugin_config == b"" or s.plugin_config == json.dumps(
            json.loads(s.plugin_config), separators=(",", ":"), sort_keys=True).encode()

    # The export keeps a file's creationTimestamp (Istio's tie-break), which the API server replaces
    # with the time it creates the object (docs/istio.md).
    given = {(s.namespace, s.name): s.created for s in from_file if s.created is not None}
    assert given == {("edge", "everything"): datetime(2024, 5, 1, 10, tzinfo=UTC)}
    assert all(s.created is not None and s.created >= start for s in from_api)

    def same(s: PluginSpec) -> PluginSpec:
        return dataclasses.replace(s, source="", created=None, plugin_config=s.plugin_config and json.dumps(
            json.loads(s.plugin_config), sort_keys=True).encode())

    assert {(s.namespace, s.name): same(s) for s in from_api} == {(s.namespace, s.name): same(s) for s in from_file}


@pytest.mark.parametrize("name,spec,message", [
    ("string-config", {"pluginConfig": "raw text"}, "spec.pluginConfig"),
    ("host-value", {"vmConfig": {"env": [{"name": "A", "valueFrom": "HOST", "value": "x"}]}},
     "value may only be set when valueFrom is INLINE"),
    ("duplicate-env", {"vmConfig": {"env": [{"name": "A"}, {"name": "A"}]}}, "Duplicate value"),
    ("selector-and-refs", {"selector": {"matchLabels": {"a": "b"}}, "targetRefs": [{"kind": "Gateway", "name": "g"}]},
     "only one of targetRefs or selector can be set"),
    ("ref-namespace", {"targetRef": {"kind": "Gateway", "name": "g", "namespace": "other"}},
     "cross namespace referencing is not currently supported"),
    ("wildcard-label", {"selector": {"matchLabels": {"app": "gw*"}}}, "wildcard not allowed"),
    ("duplicate-port", {"match": [{"ports": [{"number": 80}, {"number": 80}]}]}, "Duplicate value"),
    ("port-zero", {"match": [{"ports": [{"number": 0}]}]}, "spec.match[0].ports[0].number"),
    ("prefixed-sha", {"sha256": "sha256:" + "a" * 64}, "spec.sha256"),
    ("big-priority", {"priority": 1 << 31}, "spec.priority"),
    ("ftp-url", {"url": "ftp://host/p.wasm"}, "url must have schema one of"),
])
def test_server_refuses_what_export_does_not_pass_through(kube: KubeServer, tmp_path: Path, name: str,
                                                          spec: dict[str, Any], message: str) -> None:
    doc = plugin(name, **spec)
    status, body = _create(kube, doc)
    assert status == 422 and message in body["message"], body
    # export refuses it, or rewrites it into a form the server accepts
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(doc))
    try:
        (out,) = export_istio([f]).documents
    except ExportError as e:
        assert all(line.startswith(f"{f}: WasmPlugin {name}: ") for line in e.problems)
        return
    out["metadata"]["name"] = f"{name}-exported"
    status, body = _create(kube, out)
    assert status == 201, body.get("message")


def test_url_forms_istio_takes(kube: KubeServer) -> None:
    for i, url in enumerate([OCI, "registry.example.com/team/p:v1", "https://h.example.com/p.wasm",
                             "file:///opt/filters/p.wasm", f"oci://r.example.com/p@sha256:{'c' * 64}"]):
        status, body = _create(kube, plugin(f"url-{i}", url=url))
        assert status == 201, (url, body.get("message"))
