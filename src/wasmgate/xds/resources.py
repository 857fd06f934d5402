"""WasmPlugins, upstreams and clusters as Envoy xDS resources, built the way Istio builds them.

Pure: no I/O. One ECDS resource (``TypedExtensionConfig``) per WasmPlugin, named as istiod
names it (``extensions.istio.io/wasmplugin/<namespace>.<name>``); the listener's HTTP
connection manager refers to each by name through ``config_discovery`` over ADS, in Istio's
order (phase, then priority), with the router last. A module that could not be fetched is
replaced, as istio-agent replaces it, by an RBAC filter: deny-all for FAIL_CLOSE and
FAIL_RELOAD, allow-all (a no-op) for FAIL_OPEN.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Importing these registers their message types, so ParseDict resolves the "@type"s below.
import envoy.config.cluster.v3.cluster_pb2 as cluster_pb2
import envoy.config.core.v3.extension_pb2 as extension_pb2
import envoy.config.listener.v3.listener_pb2 as listener_pb2
import envoy.extensions.filters.http.rbac.v3.rbac_pb2
import envoy.extensions.filters.http.router.v3.router_pb2
import envoy.extensions.filters.http.wasm.v3.wasm_pb2
import envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
import envoy.extensions.filters.network.rbac.v3.rbac_pb2
import envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2
import envoy.extensions.filters.network.wasm.v3.wasm_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format  # type: ignore[import-untyped]

from wasmgate.plugin.spec import FailStrategy, PluginSpec

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ECDS_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
WASM_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC_FILTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"
NETWORK_RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
TCP_PROXY_TYPE = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
RESOURCE_PREFIX = "extensions.istio.io/wasmplugin/"  # istiod's, so names never collide with others
UPSTREAM_CLUSTER = "upstream"
V8 = "envoy.wasm.runtime.v8"  # Istio's only runtime
# The stat prefixes istio-agent gives its stand-in RBAC filters.
DEFAULT_ALLOW_PREFIX = "wasm-default-allow"
DEFAULT_DENY_PREFIX = "wasm-default-deny"
SYSTEM_CA = Path("/etc/ssl/certs/ca-certificates.crt")


def resource_name(spec: PluginSpec) -> str:
    return f"{RESOURCE_PREFIX}{spec.namespace or 'default'}.{spec.name}"


def plugin_config_name(spec: PluginSpec) -> str:
    """PluginConfig.name as Istio sets it: what the plugin reads as plugin_name."""
    return f"{spec.namespace or 'default'}.{spec.name}"


_FAILURE_POLICY = {FailStrategy.FAIL_OPEN: "FAIL_OPEN", FailStrategy.FAIL_CLOSE: "FAIL_CLOSED",
                   FailStrategy.FAIL_RELOAD: "FAIL_RELOAD"}


def wasm_filter(spec: PluginSpec, module: Path) -> dict[str, Any]:
    """The ``envoy.extensions.filters.http.wasm.v3.Wasm`` istiod sends, after istio-agent has
    replaced the remote code by the local file it fetched (``module``); the network filter's
    ``Wasm`` for a NETWORK plugin (the same PluginConfig)."""
    vm: dict[str, Any] = {"runtime": V8, "code": {"local": {"filename": str(module)}}}
    if spec.vm_id:
        vm["vm_id"] = spec.vm_id
    if spec.env:
        vm["environment_variables"] = {"key_values": dict(spec.env)}
    if spec.vm_config:
        vm["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                               "value": spec.vm_config.decode()}
    config: dict[str, Any] = {
        "name": plugin_config_name(spec),
        "root_id": spec.root_id,
        "vm_config": vm,
        "failure_policy": _FAILURE_POLICY[spec.fail_strategy],
    }
    if spec.network and spec.fail_strategy == FailStrategy.FAIL_OPEN:
        # Envoy's network Wasm filter reads only the older field when a VM fails mid-connection
        # (and takes one of the two): without it the connection is closed, as FAIL_CLOSE
        del config["failure_policy"]
        config["fail_open"] = True
    # Istio: compact JSON in a StringValue; an empty object, like none, is no configuration
    if spec.plugin_config and spec.plugin_config != b"{}":
        config["configuration"] = {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                   "value": spec.plugin_config.decode()}
    return {"@type": NETWORK_WASM_TYPE if spec.network else WASM_FILTER_TYPE, "config": config}


def fallback_filter(fail_open: bool, network: bool = False) -> dict[str, Any]:
    """istio-agent's stand-in for a module it could not fetch: RBAC with no rules allows
    everything; RBAC with empty rules (no policy can match) denies everything. ``network``:
    the network RBAC filter (for NETWORK plugins), which closes denied connections."""
    if network:
        d: dict[str, Any] = {"@type": NETWORK_RBAC_TYPE,
                             "stat_prefix": DEFAULT_ALLOW_PREFIX if fail_open else DEFAULT_DENY_PREFIX}
        if not fail_open:
            d["rules"] = {}
        return d
    if fail_open:
        return {"@type": RBAC_FILTER_TYPE, "rules_stat_prefix": DEFAULT_ALLOW_PREFIX}
    return {"@type": RBAC_FILTER_TYPE, "rules": {}, "rules_stat_prefix": DEFAULT_DENY_PREFIX}


def extension_config(name: str, typed_config: dict[str, Any]) -> extension_pb2.TypedExtensionConfig:
    msg = extension_pb2.TypedExtensionConfig()
    json_format.ParseDict({"name": name, "typed_config": typed_config}, msg)
    return msg


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


@dataclass(frozen=True)
class DownstreamTls:
    """The config's ``tls:`` section: the default certificate, others by SNI server name, and
    client certificates (asked for with ``client_ca``, required or not)."""

    cert: Path
    key: Path
    sni: tuple[tuple[tuple[str, ...], Path, Path], ...] = ()  # (server names, cert, key)
    client_ca: Path | None = None
    require_client_certificate: bool = False

    def transport_socket(self, cert: Path, key: Path) -> dict[str, Any]:
        common: dict[str, Any] = {
            "tls_certificates": [{"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}],
            "alpn_protocols": ["http/1.1"]}  # wasmgate's own proxy speaks HTTP/1.1 only
        ctx: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                                        "DownstreamTlsContext", "common_tls_context": common}
        if self.client_ca is not None:
            common["validation_context"] = {"trusted_ca": {"filename": str(self.client_ca)}}
            ctx["require_client_certificate"] = self.require_client_certificate
        return {"name": "envoy.transport_sockets.tls", "typed_config": ctx}


def listener(host: str, port: int, plugins: list[PluginSpec], *, stat_prefix: str = "inbound_http",
             xds: dict[str, Any] | None = None, tls: DownstreamTls | None = None) -> listener_pb2.Listener:
    """One listener: the HTTP connection manager with one ECDS-discovered filter per plugin
    (``plugins`` already in chain order), then the router, routing everything to the upstream.

    ``xds`` is wasmgate's config section of that name (docs/configuration.md): the names and
    metadata of the route, virtual host, filter chain and listener, and the listener's
    direction, so plugins read the same ``xds.*`` attributes as in wasmgate's own proxy.
    ``tls``: TLS on the listener, one filter chain per SNI entry (chosen by the TLS inspector)."""
    x = xds or {}
    config_source = {"ads": {}, "resource_api_version": "V3",
                     # as istiod: block until the plugins are loaded, they may guard security
                     "initial_fetch_timeout": "0s"}
    filters: list[dict[str, Any]] = [
        {"name": resource_name(s),
         "config_discovery": {"config_source": config_source, "type_urls": [WASM_FILTER_TYPE, RBAC_FILTER_TYPE]}}
        for s in plugins]
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}})
    route: dict[str, Any] = {"match": {"prefix": "/"}, "route": {"cluster": upstream_cluster_name(x)}}
    vhost: dict[str, Any] = {"name": x.get("virtual_host_name") or "all", "domains": ["*"], "routes": [route]}
    if x.get("route_name"):
        route["name"] = x["route_name"]
    for obj, key in ((route, "route_metadata"), (vhost, "virtual_host_metadata")):
        if x.get(key):
            obj["metadata"] = x[key]
    hcm = {"@type": HCM_TYPE, "stat_prefix": stat_prefix, "codec_type": "AUTO", "http_filters": filters,
           "route_config": {"name": "wasmgate", "virtual_hosts": [vhost]}}
    chain: dict[str, Any] = {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                          "typed_config": hcm}]}
    if x.get("filter_chain_name"):
        chain["name"] = x["filter_chain_name"]
    d: dict[str, Any] = {"name": f"{host}_{port}", "address": _address(host, port), "filter_chains": [chain]}
    if tls is not None:
        chain["transport_socket"] = tls.transport_socket(tls.cert, tls.key)
        d["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
        for i, (names, sni_cert, sni_key) in enumerate(tls.sni):
            d["filter_chains"].append({"name": f"{chain.get('name', 'sni')}-{i}",
                                       "filter_chain_match": {"server_names": list(names)}, "filters": chain["filters"],
                                       "transport_socket": tls.transport_socket(sni_cert, sni_key)})
    if x.get("listener_metadata"):
        d["metadata"] = x["listener_metadata"]
    if x.get("listener_direction", "UNSPECIFIED") != "UNSPECIFIED":
        d["traffic_direction"] = x["listener_direction"]
    msg = listener_pb2.Listener()
    json_format.ParseDict(d, msg)
    return msg


@dataclass(frozen=True)
class TcpProxy:
    """A TCP proxy listener (the config's ``tcp_proxies`` entry)."""

    name: str
    host: str
    port: int
    cluster: str
    idle_timeout: float = 3600.0  # 0: none


def tcp_listener(t: TcpProxy, plugins: list[PluginSpec]) -> listener_pb2.Listener:
    """A listener of ECDS-discovered network Wasm filters (``plugins`` in chain order) in
    front of ``tcp_proxy`` to the cluster, as istiod configures NETWORK WasmPlugins."""
    config_source = {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"}
    filters: list[dict[str, Any]] = [
        {"name": resource_name(s), "config_discovery": {"config_source": config_source,
                                                        "type_urls": [NETWORK_WASM_TYPE, NETWORK_RBAC_TYPE]}}
        for s in plugins]
    proxy: dict[str, Any] = {"@type": TCP_PROXY_TYPE, "stat_prefix": t.name, "cluster": t.cluster,
                             "idle_timeout": f"{t.idle_timeout}s"}
    filters.append({"name": "envoy.filters.network.tcp_proxy", "typed_config": proxy})
    msg = listener_pb2.Listener()
    json_format.ParseDict({"name": t.name, "address": _address(t.host, t.port), "filter_chains": [
        {"filters": filters}]}, msg)
    return msg


def upstream_cluster_name(xds: dict[str, Any] | None) -> str:
    return str((xds or {}).get("cluster_name") or UPSTREAM_CLUSTER)


@dataclass(frozen=True)
class UpstreamTls:
    ca: Path | None = None  # None: the system store
    insecure_skip_verify: bool = False
    cert: Path | None = None  # a client certificate for upstreams that ask for one
    key: Path | None = None


def cluster(name: str, url: str, tls: UpstreamTls | None = None, connect_timeout: float = 5.0, *,
            metadata: dict[str, Any] | None = None, host_metadata: dict[str, Any] | None = None,
            http2: bool = False) -> cluster_pb2.Cluster:
    """A cluster for an ``http://`` or ``https://host:port`` URL, as wasmgate's upstream and
    clusters are written. Raises ValueError naming the cluster for a URL it cannot use.

    ``http2``: Envoy speaks HTTP/2 to it (with prior knowledge over plain TCP), as
    plugins' gRPC calls need; Envoy's clusters speak one protocol, wasmgate's pick per call."""
    u = urlsplit(url if "://" in url else f"http://{url}")  # HOST:PORT, as wasmgate's clusters take it
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"cluster {name}: expected http://HOST:PORT or https://HOST:PORT, got {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    try:
        ipaddress.ip_address(u.hostname)
        kind, san_type = "STATIC", "IP_ADDRESS"
    except ValueError:
        kind, san_type = "STRICT_DNS", "DNS"
    d: dict[str, Any] = {
        "name": name, "type": kind, "connect_timeout": f"{connect_timeout}s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(u.hostname, port)},
                               **({"metadata": host_metadata} if host_metadata else {})}]}]}}
    if metadata:
        d["metadata"] = metadata
    if http2:
        d["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    if u.scheme == "https":
        tls = tls or UpstreamTls()
        # As wasmgate's own proxy (OpenSSL's client): TLS 1.2 to 1.3 (Envoy's default stops at 1.2)
        common: dict[str, Any] = {"tls_params": {"tls_minimum_protocol_version": "TLSv1_2",
                                                 "tls_maximum_protocol_version": "TLSv1_3"}}
        if not http2:
            common["alpn_protocols"] = ["http/1.1"]
        ctx: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                                        "UpstreamTlsContext", "common_tls_context": common}
        if kind == "STRICT_DNS":  # no SNI for an IP address, as OpenSSL's client
            ctx["sni"] = u.hostname
        if tls.cert is not None and tls.key is not None:
            common["tls_certificates"] = [{"certificate_chain": {"filename": str(tls.cert)},
                                           "private_key": {"filename": str(tls.key)}}]
        if not tls.insecure_skip_verify:
            common["validation_context"] = {
                "trusted_ca": {"filename": str(tls.ca or SYSTEM_CA)},
                "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": u.hostname}}]}
        d["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": ctx}
    msg = cluster_pb2.Cluster()
    json_format.ParseDict(d, msg)
    return msg
