"""Istio ``WasmPlugin`` resources (extensions.istio.io/v1alpha1) from YAML files.

Field names and meanings are Istio's. Errors name the file, the document and the
field, e.g. ``plugins.yaml: WasmPlugin allow-header: spec.phase: Input should be ...``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from wasmgate.plugin.spec import FailStrategy, Phase, PluginLimits, PluginSpec

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


ANNOTATION_PREFIX = "wasmgate.io/"
_LIMIT_ANNOTATIONS: dict[str, tuple[str, Callable[[str], float]]] = {
    "max-memory-bytes": ("max_memory_bytes", int),
    "callback-deadline-ms": ("callback_deadline", lambda v: int(v) / 1000),
    "start-deadline-ms": ("start_deadline", lambda v: int(v) / 1000),
    "max-random-bytes": ("max_random_bytes", int),
    "memory-recycle-bytes": ("memory_recycle_bytes", int),
    "reload-backoff-ms": ("reload_backoff", lambda v: int(v) / 1000),
    "max-buffered-body-bytes": ("max_buffered_body", int),
}


def _limits(wp: WasmPlugin, defaults: PluginLimits, where: str) -> PluginLimits:
    """Per-plugin overrides from ``wasmgate.io/*`` annotations (Istio ignores them)."""
    annotations = wp.metadata.model_extra.get("annotations") if wp.metadata.model_extra else None
    if not annotations:
        return defaults
    changes: dict[str, Any] = {}
    for key, value in dict(annotations).items():
        if not str(key).startswith(ANNOTATION_PREFIX):
            continue
        name = str(key)[len(ANNOTATION_PREFIX):]
        if name not in _LIMIT_ANNOTATIONS:
            raise ConfigError(f"{where}: metadata.annotations.{key}: unknown; known: "
                              + ", ".join(ANNOTATION_PREFIX + k for k in _LIMIT_ANNOTATIONS))
        field_name, convert = _LIMIT_ANNOTATIONS[name]
        try:
            parsed = convert(str(value))
        except ValueError:
            raise ConfigError(f"{where}: metadata.annotations.{key}: expected an integer, got {value!r}") from None
        if parsed < 0:
            raise ConfigError(f"{where}: metadata.annotations.{key}: must not be negative")
        changes[field_name] = parsed
    return dataclasses.replace(defaults, **changes)


def to_spec(wp: WasmPlugin, path: Path, defaults: PluginLimits | None = None) -> PluginSpec:
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
        limits=_limits(wp, defaults or PluginLimits(), where),
    )


def resource_files(paths: list[Path]) -> list[Path]:
    """The YAML files named, and the ``*.yaml``/``*.yml`` files in directories named."""
    files: list[Path] = []
    for p in (q.resolve() for q in paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or directory")
    return files


def load_file(path: Path, defaults: PluginLimits) -> list[PluginSpec]:
    """The WasmPlugins of one file; other kinds (Secrets ...) may share it and are skipped."""
    return [to_spec(parse_wasmplugin(doc, path), path, defaults)
            for doc in load_documents(path) if doc.get("kind") == "WasmPlugin"]


def _no_duplicates(specs: list[PluginSpec]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.namespace, spec.name)
        if key in seen:
            raise ConfigError(f"{spec.source}: WasmPlugin {spec.name}: metadata.name: duplicate of the one in "
                              f"{seen[key]}")
        seen[key] = spec.source


def load_plugin_specs(paths: list[Path], defaults: PluginLimits | None = None) -> list[PluginSpec]:
    """Every WasmPlugin in ``paths``; the first error raises (startup is all or nothing)."""
    specs = [s for f in resource_files(paths) for s in load_file(f, defaults or PluginLimits())]
    _no_duplicates(specs)
    return specs


def scan_plugin_specs(paths: list[Path], defaults: PluginLimits | None = None) -> tuple[list[PluginSpec],
                                                                                      dict[str, str]]:
    """Like load_plugin_specs, but a bad file is reported (by path) and skipped."""
    specs: list[PluginSpec] = []
    errors: dict[str, str] = {}
    try:
        files = resource_files(paths)
    except ConfigError as e:
        return [], {str(e).split(":", 1)[0]: str(e)}
    for f in files:
        try:
            got = load_file(f, defaults or PluginLimits())
            _no_duplicates(specs + got)
        except ConfigError as e:
            errors[str(f)] = str(e)
            continue
        specs += got
    return specs, errors
