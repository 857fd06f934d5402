"""deploy/kubernetes/crd-wasmplugin.yaml: a structural CRD whose schema accepts the
repository's WasmPlugin examples and rejects what Istio rejects (wasmgate's extensions too)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from crd_schema import errors, load_crd, openapi_schema
from wasmgate.devtools.templates import WASMPLUGIN_YAML
from wasmgate.resources.wasmplugin import WasmPluginSpec, parse_wasmplugin

ROOT = Path(__file__).resolve().parent.parent


def test_crd_identity() -> None:
    crd = load_crd()
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1" and crd["kind"] == "CustomResourceDefinition"
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}" == "wasmplugins.extensions.istio.io"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "WasmPlugin"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}


def _structural_problems(node: dict[str, Any], where: str) -> list[str]:
    """Kubernetes' structural-schema rules that a hand-written schema can break."""
    problems = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{where}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: both properties and additionalProperties")
    for key in ("properties",):
        for name, child in (node.get(key) or {}).items():
            problems += _structural_problems(child, f"{where}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _structural_problems(node[key], f"{where}[{key}]")
    for key in ("allOf", "anyOf", "oneOf", "not"):
        if key in node:
            problems.append(f"{where}: {key} is not used by this CRD (structural schemas restrict it)")
    return problems


def test_schema_is_structural() -> None:
    assert _structural_problems(openapi_schema(), "openAPIV3Schema") == []


def test_schema_fields_are_the_ones_wasmgate_reads() -> None:
    # verificationKey is Istio's (hidden, unimplemented there too); wasmgate's model has the rest.
    ours = {f.alias or name for name, f in WasmPluginSpec.model_fields.items()}
    crd = set(openapi_schema()["properties"]["spec"]["properties"])
    assert crd - ours == {"verificationKey"}
    assert ours - crd == set()


def _markdown_examples(path: Path) -> list[tuple[str, str]]:
    """WasmPlugin YAML in a Markdown file: ```yaml blocks, and shell here-documents."""
    text = path.read_text()
    found = []
    for m in re.finditer(r"```yaml\n(.*?)```", text, re.S):
        found.append((f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1)))
    for m in re.finditer(r"<<-?'?(\w+)'?\n(.*?)\n\1\n", text, re.S):
        found.append((f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(2)))
    return [(w, t) for w, t in found if "kind: WasmPlugin" in t]


def _examples() -> list[tuple[str, dict[str, Any]]]:
    sources: list[tuple[str, str]] = [(str(p.relative_to(ROOT)), p.read_text())
                                      for p in sorted((ROOT / "examples").rglob("*.y*ml"))]
    sources.append(("wasmgate-new-template", WASMPLUGIN_YAML.replace("__NAME__", "my-plugin")))
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        sources += _markdown_examples(md)
    out = []
    for where, text in sources:
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "WasmPlugin":
                out.append((f"{where} {doc['metadata']['name']}", doc))
    return out


EXAMPLES = _examples()


def test_examples_found() -> None:
    where = {w.split(" ")[0].split(":")[0] for w, _ in EXAMPLES}
    assert {"examples/allow-header/wasmplugin.yaml", "README.md", "wasmgate-new-template"} <= where


@pytest.mark.parametrize("where,doc", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_against_crd(where: str, doc: dict[str, Any]) -> None:
    parse_wasmplugin(doc, Path(where))  # wasmgate reads every example
    if isinstance(doc["spec"].get("pluginConfig"), str):
        # wasmgate's extension: the CRD refuses it, as Istio does (docs/configuration.md).
        assert any(e.startswith("spec.pluginConfig:") for e in errors(doc))
    else:
        assert errors(doc) == []


def _plugin(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"url": "oci://registry.example/p:v1", **spec}}


def test_every_istio_field_accepted() -> None:
    doc = _plugin(
        selector={"matchLabels": {"app": "gateway"}},
        sha256="a" * 64, imagePullPolicy="Always", imagePullSecret="pull", verificationKey="k",
        pluginConfig={"nested": {"list": [1, "two", None, True]}, "n": 1.5},
        pluginName="root", phase="AUTHZ", priority=-7, failStrategy="FAIL_RELOAD",
        vmConfig={"env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": "HOST"}]},
        match=[{"mode": "SERVER", "ports": [{"number": 8080}]}, {"mode": "CLIENT_AND_SERVER"}],
        type="HTTP")
    assert errors(doc) == []
    assert errors(_plugin(targetRefs=[{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}])) == []
    assert errors(_plugin(targetRef={"kind": "Service", "name": "svc"}, priority=None)) == []


REJECTED: list[tuple[dict[str, Any], str]] = [  # also sent to a real API server by tests/test_kube.py
    ({"pluginConfig": "raw text"}, "spec.pluginConfig"),  # wasmgate's extension
    ({"pluginConfig": ["a"]}, "spec.pluginConfig"),
    ({"url": ""}, "spec.url"),
    ({"sha256": "sha256:" + "a" * 64}, "spec.sha256"),
    ({"sha256": "A" * 64}, "spec.sha256"),
    ({"phase": "AUTH"}, "spec.phase"),
    ({"failStrategy": "FAIL_CLOSED"}, "spec.failStrategy"),
    ({"imagePullPolicy": "Never"}, "spec.imagePullPolicy"),
    ({"imagePullSecret": ""}, "spec.imagePullSecret"),
    ({"pluginName": ""}, "spec.pluginName"),
    ({"priority": 1 << 31}, "spec.priority"),
    ({"priority": "1"}, "spec.priority"),
    ({"vmConfig": {"env": [{"valueFrom": "HOST"}]}}, "spec.vmConfig.env.0"),
    ({"vmConfig": {"env": [{"name": "A", "valueFrom": "ENV"}]}}, "spec.vmConfig.env.0.valueFrom"),
    ({"match": [{"mode": "INBOUND"}]}, "spec.match.0.mode"),
    ({"match": [{"ports": [{"number": 0}]}]}, "spec.match.0.ports.0.number"),
    ({"match": [{"ports": [{"number": 65536}]}]}, "spec.match.0.ports.0.number"),
    ({"type": "TCP"}, "spec.type"),
    ({"selector": {"matchLabels": {"app": 1}}}, "spec.selector.matchLabels.app"),
    ({"targetRefs": [{"kind": "Gateway"}]}, "spec.targetRefs.0"),
    ({"targetRefs": [{"kind": "Gateway", "name": "g"}] * 17}, "spec.targetRefs"),
]


@pytest.mark.parametrize("spec,field", REJECTED)
def test_rejected(spec: dict[str, Any], field: str) -> None:
    errs = errors(_plugin(**spec))
    assert errs and all(e.startswith(field + ":") for e in errs), errs


def test_spec_and_url_required() -> None:
    doc = _plugin()
    del doc["spec"]["url"]
    assert errors(doc) == ["spec: 'url' is a required property"]
    del doc["spec"]
    assert errors(doc) == ["<root>: 'spec' is a required property"]
