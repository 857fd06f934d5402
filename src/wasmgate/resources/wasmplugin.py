"""Istio ``WasmPlugin`` resources (extensions.istio.io/v1alpha1) from YAML files.

Field names and meanings are Istio's. Errors name the file, the document and the
field, e.g. ``plugins.yaml: WasmPlugin allow-header: spec.phase: Input should be ...``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from wasmgate.plugin.spec import FailStrategy, Phase, PluginLimits, PluginSpec
from wasmgate.resources import kubeyaml

API_VERSIONS = ("extensions.istio.io/v1alpha1",)


class ConfigError(Exception):
    """A configuration file is invalid; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


INT32 = (-(1 << 31), (1 << 31) - 1)


def _int32(value: object) -> object:
    """spec.priority as the CRD types it, an int32: the API server refuses strings, booleans,
    fractions and values outside 32 bits (a whole float such as 5.0 it takes as 5)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int32", "expected a 32-bit integer, got {got}", {"got": repr(value)})
    if not INT32[0] <= value <= INT32[1]:
        raise PydanticCustomError(
            "int32", "{value} is outside the 32-bit range Istio's priority has ({lo} to {hi}); "
            "Kubernetes refuses it", {"value": value, "lo": INT32[0], "hi": INT32[1]})
    return value


# What Go's time.Parse(time.RFC3339, s) takes, as Kubernetes' metav1.Time reads it: an
# upper-case T and Z, a one- or two-digit hour, a fraction after '.' or ',', and an offset
# with a colon (up to 24:60). Range checks follow in _timestamp.
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})T(\d{1,2}):(\d{2}):(\d{2})(?:[.,](\d+))?"
                      r"(?:Z|([+-])(\d{2}):(\d{2}))", re.ASCII)
_EPOCH = datetime.min.replace(tzinfo=UTC)  # 0001-01-01T00:00:00Z, Go's zero time
_DAYS_400Y = 146097  # the Gregorian calendar repeats every 400 years


def _timestamp(value: object) -> datetime | None:
    """metadata.creationTimestamp as Kubernetes takes it (anything else it refuses); UTC,
    to the microsecond. Go also has year 0 and years past 9999 after an offset, which a
    datetime does not: those come out as 0001-01-01 or 9999-12-31 (docs/configuration.md)."""
    if value is None:
        return None
    m = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    fail = PydanticCustomError(
        "rfc3339", "{got} is not an RFC 3339 time as Kubernetes takes it (e.g. 2024-05-01T10:00:00Z, "
        "with the zone: Z or an offset such as +02:00)", {"got": repr(value)})
    if m is None:
        raise fail
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, sign, off_h, off_m = m.group(7), m.group(8), m.group(9), m.group(10)
    offset = 0 if sign is None else (1 if sign == "+" else -1) * (int(off_h) * 3600 + int(off_m) * 60)
    try:  # year 0 (a leap year) as year 400, then 400 years back
        days = date(year or 400, month, day).toordinal() - (0 if year else _DAYS_400Y)
    except ValueError:
        raise fail from None
    if hour > 23 or minute > 59 or second > 59 or (sign and (int(off_h) > 24 or int(off_m) > 60)):
        raise fail
    seconds = (days - 1) * 86400 + hour * 3600 + minute * 60 + second - offset
    micros = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return _EPOCH + timedelta(seconds=seconds, microseconds=micros)
    except OverflowError:
        return _EPOCH if seconds < 0 else datetime.max.replace(tzinfo=UTC)


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
    # Istio's is an object (sent as JSON); a string is a wasmgate extension, sent byte
    # for byte, for plugins that take raw text (Envoy allows a StringValue).
    plugin_config: dict[str, Any] | str | None = Field(None, alias="pluginConfig")
    plugin_name: str = Field("", alias="pluginName")
    phase: Phase = Phase.UNSPECIFIED_PHASE
    priority: Annotated[int | None, BeforeValidator(_int32)] = None
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
    # Istio orders by it; Kubernetes sets it, a file may (as Kubernetes would take it)
    creation_timestamp: Annotated[datetime | None, BeforeValidator(_timestamp)] = Field(
        None, alias="creationTimestamp")


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
        docs = kubeyaml.load_all(text)  # as kubectl reads it: a timestamp stays the text written
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
    return wp


def resolve_url(url: str, base: Path, where: str) -> Path | None:
    """A local path for ``file://`` URLs (relative ones against the YAML file's
    directory); None for modules to fetch: ``oci://``, ``http(s)://``, or no scheme (OCI)."""
    if url.startswith("file://"):
        path = Path(url[len("file://"):])
        return path if path.is_absolute() else (base / path)
    scheme = url.split("://", 1)[0].lower() if "://" in url else "oci"
    if scheme not in ("oci", "http", "https"):
        raise ConfigError(f"{where}: spec.url: unsupported scheme {scheme}:// (use oci://, http(s):// or file://)")
    if not url.split("://", 1)[-1].strip("/"):
        raise ConfigError(f"{where}: spec.url: {url!r} names no module")
    return None


ANNOTATION_PREFIX = "wasmgate.io/"
VM_ID_ANNOTATION = ANNOTATION_PREFIX + "vm-id"  # Envoy's vm_id, which Istio leaves empty
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
        if key == VM_ID_ANNOTATION:
            continue
        if name not in _LIMIT_ANNOTATIONS:
            raise ConfigError(f"{where}: metadata.annotations.{key}: unknown; known: "
                              + ", ".join(ANNOTATION_PREFIX + k for k in (*_LIMIT_ANNOTATIONS, "vm-id")))
        field_name, convert = _LIMIT_ANNOTATIONS[name]
        try:
            parsed = convert(str(value))
        except ValueError:
            raise ConfigError(f"{where}: metadata.annotations.{key}: expected an integer, got {value!r}") from None
        if parsed < 0:
            raise ConfigError(f"{where}: metadata.annotations.{key}: must not be negative")
        changes[field_name] = parsed
    return dataclasses.replace(defaults, **changes)


@dataclass
class Scope:
    """What decides which resources apply here and how: Istio's selection, our defaults."""

    defaults: PluginLimits = field(default_factory=PluginLimits)
    labels: dict[str, str] = field(default_factory=dict)  # this proxy's labels, for spec.selector
    port: int = 0  # the listener port, for spec.match[].ports (0: any)
    secrets: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (namespace, name) -> dockerconfigjson


_SERVER_MODES = ("UNDEFINED", "SERVER", "CLIENT_AND_SERVER")


def selected(wp: WasmPlugin, scope: Scope) -> bool:
    """Istio's selection for a proxy with ``scope.labels`` serving inbound traffic on ``scope.port``.

    A NETWORK plugin is checked against the labels and modes here, and against each TCP
    listener's port when a connection comes (``network_ports``)."""
    s = wp.spec
    if s.selector and any(scope.labels.get(k) != v for k, v in s.selector.match_labels.items()):
        return False
    if s.type == "NETWORK":
        return not s.match or any(m.mode in _SERVER_MODES for m in s.match)
    if s.match:
        return any(m.mode in ("UNDEFINED", "SERVER", "CLIENT_AND_SERVER")
                   and (not m.ports or not scope.port or any(p.number == scope.port for p in m.ports))
                   for m in s.match)
    return True


def network_ports(wp: WasmPlugin) -> tuple[int, ...]:
    """The TCP listener ports a NETWORK plugin's ``match`` names; empty: every listener."""
    entries = [m for m in wp.spec.match if m.mode in _SERVER_MODES]
    if not entries or any(not m.ports for m in entries):
        return ()
    return tuple(sorted({p.number for m in entries for p in m.ports}))


def to_spec(wp: WasmPlugin, path: Path, scope: Scope | None = None) -> PluginSpec:
    scope = scope or Scope()
    where = f"{path}: WasmPlugin {wp.metadata.name}"
    s = wp.spec
    env: dict[str, str] = {}
    for var in (s.vm_config.env if s.vm_config else []):
        env[var.name] = var.value if var.value_from == "INLINE" else os.environ.get(var.name, "")
    # Istio hands pluginConfig to the plugin as compact JSON text; an empty object as no configuration.
    if not s.plugin_config:
        config = b""
    elif isinstance(s.plugin_config, str):
        config = s.plugin_config.encode()
    else:
        config = json.dumps(s.plugin_config, separators=(",", ":")).encode()
    secret = b""
    if s.image_pull_secret:
        found = scope.secrets.get((wp.metadata.namespace, s.image_pull_secret))
        if found is None:
            raise ConfigError(f"{where}: spec.imagePullSecret: no kubernetes.io/dockerconfigjson Secret "
                              f"{s.image_pull_secret!r} in namespace {wp.metadata.namespace!r}")
        secret = found
    refs = [*([s.target_ref] if s.target_ref else []), *s.target_refs]
    annotations = wp.metadata.model_extra.get("annotations") if wp.metadata.model_extra else None
    return PluginSpec(
        name=wp.metadata.name,
        namespace=wp.metadata.namespace,
        module_path=resolve_url(s.url, path.parent, where),
        root_id=s.plugin_name,
        vm_id=str(dict(annotations or {}).get(VM_ID_ANNOTATION, "")),
        plugin_config=config,
        env=env,
        fail_strategy=s.fail_strategy,
        phase=s.phase,
        priority=s.priority,
        created=wp.metadata.creation_timestamp,
        source=str(path),
        limits=_limits(wp, scope.defaults, where),
        url=s.url,
        sha256=s.sha256,
        pull_policy="" if s.image_pull_policy == "UNSPECIFIED_POLICY" else s.image_pull_policy,
        pull_secret=secret,
        target_refs=tuple(f"{r.kind}/{r.namespace + '/' if r.namespace else ''}{r.name}" for r in refs),
        network=s.type == "NETWORK",
        ports=network_ports(wp) if s.type == "NETWORK" else (),
    )


def resource_files(paths: list[Path]) -> list[Path]:
    """The YAML files named, and the ``*.yaml``/``*.yml`` files in directories named.

    Symlinks are not resolved: a file keeps its name when a Kubernetes ConfigMap or Secret
    volume's ``..data`` link moves to a new version (and its plugins their source)."""
    files: list[Path] = []
    for p in (Path(os.path.abspath(q)) for q in paths):
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.suffix in (".yaml", ".yml") and q.is_file())
        elif p.exists():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file or directory")
    return files


def parse_secret(doc: dict[str, Any], path: Path) -> tuple[tuple[str, str], bytes] | None:
    """A ``kubernetes.io/dockerconfigjson`` Secret as ((namespace, name), config JSON); other
    Secret types are not ours to read."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    name = str(meta.get("name", ""))
    where = f"{path}: Secret {name or '?'}"
    if doc.get("type") != "kubernetes.io/dockerconfigjson":
        return None
    if not name:
        raise ConfigError(f"{where}: metadata.name: required")
    key = (str(meta.get("namespace") or "default"), name)
    string_data = doc.get("stringData") or {}
    data = doc.get("data") or {}
    if isinstance(string_data, dict) and ".dockerconfigjson" in string_data:
        return key, str(string_data[".dockerconfigjson"]).encode()
    if isinstance(data, dict) and ".dockerconfigjson" in data:
        try:
            return key, base64.b64decode(str(data[".dockerconfigjson"]), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"{where}: data..dockerconfigjson: not valid base64") from None
    raise ConfigError(f"{where}: data..dockerconfigjson: missing")


def load_file(path: Path, scope: Scope, docs: list[dict[str, Any]] | None = None) -> list[PluginSpec]:
    """The selected WasmPlugins of one file; other kinds may share it and are skipped."""
    specs = []
    for doc in load_documents(path) if docs is None else docs:
        if doc.get("kind") == "WasmPlugin":
            wp = parse_wasmplugin(doc, path)
            if selected(wp, scope):
                specs.append(to_spec(wp, path, scope))
    return specs


def _no_duplicates(specs: list[PluginSpec]) -> None:
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.namespace, spec.name)
        if key in seen:
            raise ConfigError(f"{spec.source}: WasmPlugin {spec.name}: metadata.name: duplicate of the one in "
                              f"{seen[key]}")
        seen[key] = spec.source


def scan_plugin_specs(paths: list[Path], scope: Scope | None = None, *,
                      strict: bool = False) -> tuple[list[PluginSpec], dict[str, str]]:
    """Every selected WasmPlugin in ``paths``, with the Secrets beside them.

    A file that fails is reported by path and skipped, or with ``strict`` raises
    (startup is all or nothing).
    """
    errors: dict[str, str] = {}
    try:
        files = resource_files(paths)
    except ConfigError as e:
        if strict:
            raise
        return [], {str(e).split(":", 1)[0]: str(e)}
    parsed: dict[Path, list[dict[str, Any]]] = {}
    for f in files:
        try:
            parsed[f] = load_documents(f)
        except ConfigError as e:
            if strict:
                raise
            errors[str(f)] = str(e)
    specs, more = scan_documents(parsed, scope, strict=strict)
    return specs, {**errors, **more}


def scan_documents(parsed: dict[Path, list[dict[str, Any]]], scope: Scope | None = None, *,
                   strict: bool = False) -> tuple[list[PluginSpec], dict[str, str]]:
    """The selected WasmPlugins among parsed documents, by source (a file, or a Kubernetes
    object's API path), with the dockerconfigjson Secrets among them. Errors by source."""
    scope = dataclasses.replace(scope or Scope(), secrets={})
    errors: dict[str, str] = {}
    for f, docs in parsed.items():  # Secrets first: a WasmPlugin may name one from another source
        try:
            for doc in docs:
                if doc.get("kind") == "Secret" and (secret := parse_secret(doc, f)) is not None:
                    scope.secrets[secret[0]] = secret[1]
        except ConfigError as e:
            if strict:
                raise
            errors[str(f)] = str(e)
    specs: list[PluginSpec] = []
    for f, docs in parsed.items():
        if str(f) in errors:
            continue
        try:
            got = load_file(f, scope, docs)
            _no_duplicates(specs + got)
        except ConfigError as e:
            if strict:
                raise
            errors[str(f)] = str(e)
            continue
        specs += got
    return specs, errors


def load_plugin_specs(paths: list[Path], scope: Scope | None = None) -> list[PluginSpec]:
    """Every selected WasmPlugin in ``paths``; the first error raises."""
    return scan_plugin_specs(paths, scope, strict=True)[0]
