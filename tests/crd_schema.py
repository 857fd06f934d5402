"""The WasmPlugin CRD (deploy/kubernetes/crd-wasmplugin.yaml) as a JSON Schema validator.

The API server validates a custom resource against the CRD's OpenAPI v3 schema; here the
same schema is turned into JSON Schema for the ``jsonschema`` package: OpenAPI's
``nullable`` becomes a ``null`` type and ``format: int32`` its range (the API server checks
both). The CEL rules (``x-kubernetes-validations``) are not evaluated here; they run in the
real API server: tests/test_kube.py sends the same cases to kube-apiserver, which runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_PATH = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "crd-wasmplugin.yaml"
INT32 = (-(1 << 31), (1 << 31) - 1)
DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


def load_crd() -> dict[str, Any]:
    crd = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(crd, dict)
    return crd


def openapi_schema(crd: dict[str, Any] | None = None) -> dict[str, Any]:
    crd = crd or load_crd()
    (version,) = crd["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    assert isinstance(schema, dict)
    return schema


def to_json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if out.get("format") == "int32":
        out.setdefault("minimum", INT32[0])
        out.setdefault("maximum", INT32[1])
    if out.pop("nullable", False):
        out["type"] = [out["type"], "null"]
    return out


def validator() -> jsonschema.Draft7Validator:
    """A validator for whole WasmPlugin objects (apiVersion, kind and metadata are the API
    server's business for any resource; the CRD's schema covers spec and status)."""
    schema = to_json_schema(openapi_schema())
    schema["properties"]["apiVersion"] = {"const": "extensions.istio.io/v1alpha1"}
    schema["properties"]["kind"] = {"const": "WasmPlugin"}
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": rf"^{DNS_LABEL}(\.{DNS_LABEL})*$", "maxLength": 253},
                       "namespace": {"type": "string", "pattern": rf"^{DNS_LABEL}$", "maxLength": 63},
                       "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                       "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata"})
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(doc: dict[str, Any]) -> list[str]:
    """Each violation as ``path: message``; empty when the object is valid."""
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator().iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]
