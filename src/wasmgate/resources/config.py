"""The wasmgate config file: listener, admin, upstream, plugins, limits, logging.

Example::

    listen: 127.0.0.1:8080
    admin: 127.0.0.1:9901
    upstream: http://127.0.0.1:8000
    clusters: {auth: "http://127.0.0.1:9000"}   # for proxy_http_call, by Envoy cluster name
    plugins: [plugins/]          # WasmPlugin YAML files or directories, relative to this file
    log_level: info
    component_log_levels: {wasm: debug}
    limits: {max_header_bytes: 61440, max_headers: 100, max_buffered_body: 1048576}
    plugin_limits: {max_memory_bytes: 268435456, callback_deadline_ms: 500, memory_recycle_bytes: 0}
    watch: true                  # re-apply plugin files and modules when they change
    tls: {cert: server.pem, key: server.key,          # serve HTTPS; paths relative to this file
          sni: [{server_names: [a.example, "*.b.example"], cert: a.pem, key: a.key}],
          client_ca: clients.pem, require_client_certificate: false}   # mTLS
    upstream_tls: {ca: ca.pem, insecure_skip_verify: false,   # for https:// upstreams and clusters
                   cert: client.pem, key: client.key}
    node: {id: sidecar~10.0.0.1~web.ns, cluster: web, metadata: {WORKLOAD_NAME: web}}   # xds.node
    xds: {route_name: default, route_metadata: {filter_metadata: {ns: {key: value}}}}   # xds.* attributes
    tcp_proxies: [{name: db, listen: "127.0.0.1:15432", cluster: db}]   # TCP listeners for network plugins
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from wasmgate.abi.constants import LogLevel
from wasmgate.plugin.spec import PluginLimits
from wasmgate.resources.wasmplugin import ConfigError, _explain, load_documents


def parse_address(value: str, what: str = "address") -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must be HOST:PORT, got {value!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    max_buffered_body: int = 1024 * 1024
    header_timeout: float = 10.0  # seconds to read a request's headers (408 after)
    request_timeout: float = 0.0  # seconds to read a whole request; 0 = no limit
    idle_timeout: float = 60.0  # seconds a keep-alive connection may sit idle


class PluginLimitsConfig(BaseModel):
    """Defaults for every plugin; a WasmPlugin's wasmgate.io/* annotations override them."""

    model_config = ConfigDict(extra="forbid")
    max_memory_bytes: int = 256 << 20
    callback_deadline_ms: int = 500
    start_deadline_ms: int = 10_000
    max_random_bytes: int = 1 << 20
    memory_recycle_bytes: int = 0
    reload_backoff_ms: int = 500

    def to_limits(self) -> PluginLimits:
        return PluginLimits(self.max_memory_bytes, self.callback_deadline_ms / 1000, self.start_deadline_ms / 1000,
                            self.max_random_bytes, self.memory_recycle_bytes, self.reload_backoff_ms / 1000)


class SniConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    server_names: list[str]
    cert: Path
    key: Path


class TlsConfig(BaseModel):
    """Downstream TLS: the default certificate, and others chosen by SNI server name."""

    model_config = ConfigDict(extra="forbid")
    cert: Path
    key: Path
    sni: list[SniConfig] = []
    client_ca: Path | None = None  # ask clients for a certificate and verify it against this CA
    require_client_certificate: bool = False  # refuse clients without one (needs client_ca)


class UpstreamTlsConfig(BaseModel):
    """How https:// upstreams and clusters are verified."""

    model_config = ConfigDict(extra="forbid")
    ca: Path | None = None  # None: the system CA store
    insecure_skip_verify: bool = False
    cert: Path | None = None  # a client certificate for upstreams that ask for one (mTLS)
    key: Path | None = None


class MetadataConfig(BaseModel):
    """Envoy's ``envoy.config.core.v3.Metadata`` in its JSON form."""

    model_config = ConfigDict(extra="forbid")
    filter_metadata: dict[str, dict[str, Any]] = {}

    @field_validator("filter_metadata")
    @classmethod
    def _struct(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from google.protobuf import struct_pb2  # type: ignore[import-untyped]

        for ns, fields in v.items():
            try:
                struct_pb2.Struct().update(fields)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{ns}: not a JSON object: {e}") from None
        return v


class XdsConfig(BaseModel):
    """What the ``xds.*`` attributes report about wasmgate's listener, route and upstream
    cluster (Envoy takes them from its xDS configuration)."""

    model_config = ConfigDict(extra="forbid")
    cluster_name: str = "upstream"
    cluster_metadata: MetadataConfig | None = None
    route_name: str = ""
    route_metadata: MetadataConfig | None = None
    virtual_host_name: str = ""
    virtual_host_metadata: MetadataConfig | None = None
    upstream_host_metadata: MetadataConfig | None = None
    listener_metadata: MetadataConfig | None = None
    listener_direction: Literal["UNSPECIFIED", "INBOUND", "OUTBOUND"] = "UNSPECIFIED"
    filter_chain_name: str = ""

    def info(self) -> dict[str, Any]:
        """Keyword arguments for ``XdsInfo`` (plain JSON: workers get them that way)."""
        out = self.model_dump(exclude_unset=True)
        if "listener_direction" in out:
            out["listener_direction"] = ["UNSPECIFIED", "INBOUND", "OUTBOUND"].index(self.listener_direction)
        return out


class TcpProxyConfig(BaseModel):
    """A TCP proxy listener: bytes from ``listen`` to the cluster named ``cluster``,
    through the WasmPlugins of type NETWORK (Envoy's tcp_proxy)."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""  # default tcp_<port>
    listen: str
    cluster: str  # a name in clusters:
    connect_timeout_ms: int = 5000
    idle_timeout_s: float = 3600.0  # Envoy's tcp_proxy default (1 h); 0: none

    @field_validator("listen")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v

    def to_options(self) -> dict[str, Any]:
        return {"name": self.name, "listen": self.listen, "cluster": self.cluster,
                "connect_timeout": self.connect_timeout_ms / 1000, "idle_timeout": self.idle_timeout_s}


class ProxyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:9901"
    upstream: str | None = None
    clusters: dict[str, str] = {}  # name -> http://host:port that plugins may call (proxy_http_call)
    node: dict[str, Any] = {}  # id, cluster, metadata, locality: what plugins read as xds.node
    xds: XdsConfig = XdsConfig()
    labels: dict[str, str] = {}  # this proxy's labels, matched by WasmPlugin spec.selector
    plugins: list[Path] = []
    workers: int = 1  # used when given; else the number of cores
    log_level: str = "info"
    component_log_levels: dict[str, str] = {}
    limits: LimitsConfig = LimitsConfig()
    plugin_limits: PluginLimitsConfig = PluginLimitsConfig()
    watch: bool = True
    tls: TlsConfig | None = None
    upstream_tls: UpstreamTlsConfig = UpstreamTlsConfig()
    tcp_proxies: list[TcpProxyConfig] = []
    http2_clusters: list[str] = []  # wasmgate envoy: clusters Envoy reaches over HTTP/2 (gRPC calls)

    @field_validator("listen", "admin")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_address(v)
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        LogLevel.parse(v)
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        if v < 1:
            raise ValueError("workers must be at least 1")
        return v


def load_config(path: Path) -> ProxyConfig:
    docs = load_documents(path)
    if len(docs) != 1:
        raise ConfigError(f"{path}: expected one YAML document, found {len(docs)}")
    try:
        cfg = ProxyConfig.model_validate(docs[0])
    except ValidationError as e:
        raise ConfigError(f"{path}: {_explain(e)}") from None
    def rel(p: Path) -> Path:
        return p if p.is_absolute() else path.parent / p

    for i, t in enumerate(cfg.tcp_proxies):
        if t.cluster not in cfg.clusters:
            raise ConfigError(f"{path}: tcp_proxies[{i}].cluster: no cluster named {t.cluster!r} in clusters")
    for i, name in enumerate(cfg.http2_clusters):
        if name not in cfg.clusters:
            raise ConfigError(f"{path}: http2_clusters[{i}]: no cluster named {name!r} in clusters")
    cfg.plugins = [rel(p) for p in cfg.plugins]
    if cfg.tls is not None:
        cfg.tls.cert, cfg.tls.key = rel(cfg.tls.cert), rel(cfg.tls.key)
        for entry in cfg.tls.sni:
            entry.cert, entry.key = rel(entry.cert), rel(entry.key)
        if cfg.tls.client_ca is not None:
            cfg.tls.client_ca = rel(cfg.tls.client_ca)
    ut = cfg.upstream_tls
    ut.ca, ut.cert, ut.key = (rel(p) if p is not None else None for p in (ut.ca, ut.cert, ut.key))
    return cfg


def key_values(items: list[str], flag: str) -> dict[str, str]:
    """Command-line ``k=v,k2=v2`` (repeatable) as a dict."""
    out: dict[str, str] = {}
    for item in items:
        for part in filter(None, item.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ConfigError(f"{flag}: expected KEY=VALUE, got {part!r}")
            out[key.strip()] = value.strip()
    return out


def tcp_proxy_flags(items: list[str]) -> list[dict[str, str]]:
    """Command-line ``--tcp-proxy LISTEN=CLUSTER`` (repeatable) as ``tcp_proxies`` entries."""
    out = []
    for item in items:
        listen, sep, cluster = item.rpartition("=")
        if not sep or not listen or not cluster:
            raise ConfigError(f"--tcp-proxy: expected LISTEN=CLUSTER, got {item!r}")
        out.append({"listen": listen, "cluster": cluster})
    return out


def add_kube_flags(parser: argparse.ArgumentParser) -> None:
    """``--kube`` and its options, the same for ``wasmgate run`` and ``wasmgate envoy``."""
    parser.add_argument("--kube", action="store_true",
                        help="watch WasmPlugins and pull Secrets through the Kubernetes API (docs/kubernetes.md)")
    parser.add_argument("--namespace", metavar="NS", help="with --kube: only this namespace (default: all)")
    parser.add_argument("--kube-selector", metavar="K=V[,K=V]",
                        help="with --kube: only WasmPlugins with these Kubernetes labels")
    parser.add_argument("--kubeconfig", metavar="PATH",
                        help="with --kube: this kubeconfig (default: in-cluster, $KUBECONFIG, ~/.kube/config)")


@dataclass(frozen=True)
class KubeFlags:
    namespace: str | None
    selector: dict[str, str]
    kubeconfig: str | None


def kube_flags(args: argparse.Namespace, files_flag: str, files_given: bool) -> KubeFlags | None:
    """The options of ``add_kube_flags``; None without ``--kube``. ``files_flag`` names the
    command's own source of WasmPlugins, which ``--kube`` replaces."""
    if args.kube:
        if files_given:
            raise ConfigError(f"--kube and {files_flag}: choose one source of WasmPlugins")
        return KubeFlags(args.namespace, key_values([args.kube_selector or ""], "--kube-selector"), args.kubeconfig)
    if args.namespace or args.kube_selector or args.kubeconfig:
        raise ConfigError("--namespace, --kube-selector and --kubeconfig need --kube")
    return None
