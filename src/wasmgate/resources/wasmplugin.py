"""Istio ``WasmPlugin`` resources (extensions.istio.io/v1alpha1) from YAML files.

Field names and meanings are Istio's. Errors name the file, the document and the
field, e.g. ``plugins.yaml: WasmPlugin allow-header: spec.phase: Input should be ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wasmgate.plugin.spec import FailStrategy, Phase, PluginSpec

API_VERSIONS = ("extensions.istio.io/v1alpha1",)


class ConfigError(Exception):
    """A configuration file is invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EnvVar(_Model):
    name: str
    value_from: Literal["INLINE", "HOST"] = Field("INLINE", alias="valueFrom")
    value: str = ""


class VmConfig(_Model):
    env: list[EnvVar] = []


class Selector(_Model):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")


class TargetRef(_Model):
    group: str = ""
    kind: str = ""
    name: str = ""
    namespace: str = ""


class PortSelector(_Model):
    number: int


class TrafficSelector(_Model):
    mode: Literal["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"] = "UNDEFINED"
    ports: list[PortSelector] = []


class WasmPluginSpec(_Model):
    url: str
    sha256: str = ""
    image_pull_policy: Literal["UNSPECIFIED_POLICY", "IfNotPresent", "Always"] = Field(
        "UNSPECIFIED_POLICY", alias="imagePullPolicy")
    image_pull_secret: str = Field("", alias="imagePullSecret")
    plugin_config: dict[str, Any] | None = Field(None, alias="pluginConfig")
    plugin_name: str = Field("", alias="pluginName")
    phase: Phase = Phase.UNSPECIFIED_PHASE
    priority: int | None = None
    fail_strategy: FailStrategy = Field(FailStrategy.FAIL_CLOSE, alias="failStrategy")
    vm_config: VmConfig | None = Field(None, alias="vmConfig")
    selector: Selector | None = None
    target_ref: TargetRef | None = Field(None, alias="targetRef")
    target_refs: list[TargetRef] = Field(default_factory=list, alias="targetRefs")
    match: list[TrafficSelector] = []
    type: Literal["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"] = "UNSPECIFIED_PLUGIN_TYPE"


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    namespace: str = "default"


class WasmPlugin(_Model):
    api_version: str = Field(alias="apiVersion")
    kind: Literal["WasmPlugin"]
    metadata: Metadata
    spec: WasmPluginSpec
    status: dict[str, Any] | None = None


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(e: ValidationError) -> str:
    return "; ".join(f"{_field_path(err['loc'])}: {err['msg']}" for err in e.errors())


def load_documents(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: document {i + 1}: expected a mapping, got {type(d).__name__}")
    return docs


def parse_wasmplugin(doc: dict[str, Any], path: Path) -> WasmPlugin:
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    try:
        wp = WasmPlugin.model_validate(doc)
    except ValidationError as e:
        raise ConfigError(f"{path}: WasmPlugin {name}: {_explain(e)}") from None
    if wp.api_version not in API_VERSIONS:
        raise ConfigError(f"{path}: WasmPlugin {name}: apiVersion: expected one of {', '.join(API_VERSIONS)}, "
                          f"got {wp.api_version!r}")
    if wp.spec.type == "NETWORK":
        raise ConfigError(f"{path}: WasmPlugin {name}: spec.type: NETWORK plugins are not supported; "
                          "wasmgate runs HTTP plugins")
    return wp


def resolve_url(url: str, base: Path, where: str) -> Path:
    """``file://`` URLs, relative ones against the YAML file's directory."""
    if url.startswith("file://"):
        raw = url[len("file://"):]
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"{where}: spec.url: scheme {scheme}:// is not supported yet "
                          "(only file:// modules can be loaded)")
    else:
        raise ConfigError(f"{where}: spec.url: {url!r} has no scheme; pulling OCI images is not "
                          "supported yet (use file://PATH)")
    path = Path(raw)
    return path if path.is_absolute() else (base / path)


def to_spec(wp: WasmPlugin, path: Path) -> PluginSpec:
    where = f"{path}: WasmPlugin {wp.metadata.name}"
    s = wp.spec
    env: dict[str, str] = {}
    for var in (s.vm_config.env if s.vm_config else []):
        env[var.name] = var.value if var.value_from == "INLINE" else os.environ.get(var.name, "")
    # Istio hands pluginConfig to the plugin as JSON text.
    config = b"" if s.plugin_config is None else json.dumps(s.plugin_config, separators=(",", ":")).encode()
    return PluginSpec(
        name=wp.metadata.name,
        namespace=wp.metadata.namespace,
        module_path=resolve_url(s.url, path.parent, where),
        root_id=s.plugin_name,
        plugin_config=config,
        env=env,
        fail_strategy=s.fail_strategy,
        phase=s.phase,
        priority=s.priority,
        source=str(path),
    )


def load_plugin_specs(paths: list[Path]) -> list[PluginSpec]:
    """Every WasmPlugin in the given files and directories (``*.yaml``/``*.yml``)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml"))
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or directory")
    specs: list[PluginSpec] = []
    seen: dict[tuple[str, str], Path] = {}
    for f in files:
        for doc in load_documents(f):
            if doc.get("kind") != "WasmPlugin":
                continue  # other resources (Secrets ...) share these files
            spec = to_spec(parse_wasmplugin(doc, f), f)
            key = (spec.namespace, spec.name)
            if key in seen:
                raise ConfigError(f"{f}: WasmPlugin {spec.name}: metadata.name: duplicate of the one in {seen[key]}")
            seen[key] = f
            specs.append(spec)
    return specs
