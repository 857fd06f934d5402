"""Wiring: config -> plugins -> proxy, admin and (by default) the demo upstream."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasmgate.admin.server import AdminState, serve_admin
from wasmgate.host.attributes import XdsInfo
from wasmgate.plugin.manager import Chain, PluginHandle, PluginManager, VmPool, chain_order, load_handle
from wasmgate.plugin.spec import PluginLimits, PluginSpec
from wasmgate.plugin.vm import PluginError
from wasmgate.proxy.callout import Callouts
from wasmgate.proxy.demo import start_demo_upstream
from wasmgate.proxy.server import Limits, ProxyApp, serve
from wasmgate.proxy.tcp import TcpListener
from wasmgate.proxy.tls import TlsError, client_context, server_context
from wasmgate.proxy.upstream import Cluster
from wasmgate.resources.config import parse_address
from wasmgate.resources.kube import KubeError, KubeSource
from wasmgate.resources.wasmplugin import ConfigError, Scope, load_plugin_specs
from wasmgate.resources.watch import PluginWatcher, ResourceSource

_log = logging.getLogger("wasmgate")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PLUGIN = REPO_ROOT / "examples" / "allow-header" / "wasmplugin.yaml"


class StartupError(Exception):
    pass


@dataclass
class RunOptions:
    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:9901"
    upstream: str | None = None  # None: start the built-in demo upstream
    plugins: list[Path] | None = None  # None: the embedded allow-header example
    limits: Limits = field(default_factory=Limits)
    plugin_limits: PluginLimits = field(default_factory=PluginLimits)
    clusters: dict[str, str] = field(default_factory=dict)  # name -> http://host:port, for proxy_http_call
    node: dict[str, Any] = field(default_factory=dict)  # id, cluster, metadata: the `xds.node` attribute
    xds: dict[str, Any] = field(default_factory=dict)  # route/listener/cluster names and metadata (XdsInfo)
    labels: dict[str, str] = field(default_factory=dict)  # this proxy's labels, for WasmPlugin selectors
    watch: bool = True  # re-apply plugin files and modules when they change
    reuse_port: bool = False  # SO_REUSEPORT: set for each of several worker processes
    drain_seconds: float = 10.0
    # Downstream TLS (all plain, JSON-serializable: workers get these as JSON).
    tls_cert: str | None = None  # with tls_key: serve HTTPS
    tls_key: str | None = None
    tls_sni: list[dict[str, Any]] = field(default_factory=list)  # {server_names: [...], cert, key}
    tls_client_ca: str | None = None  # ask clients for a certificate, verified against this CA
    tls_require_client_certificate: bool = False
    # TLS to https:// upstreams and clusters.
    upstream_ca: str | None = None  # None: the system CA store
    upstream_insecure_skip_verify: bool = False
    upstream_cert: str | None = None  # the client certificate presented to upstreams that ask
    upstream_key: str | None = None
    # WasmPlugins and pull Secrets from the Kubernetes API instead of files (resources/kube.py).
    kube: bool = False
    kube_namespace: str | None = None  # None: all namespaces
    kube_selector: dict[str, str] = field(default_factory=dict)  # label selector for WasmPlugins
    kubeconfig: str | None = None  # None: in-cluster config, else $KUBECONFIG or ~/.kube/config
    # TCP proxy listeners for network plugins: {name, listen, cluster, connect_timeout, idle_timeout}.
    tcp_proxies: list[dict[str, Any]] = field(default_factory=list)


def tls_contexts(opts: RunOptions) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """The listener's context (None: plain HTTP) and the upstream client context
    (None: no https:// upstream or cluster). Raises StartupError naming the file and field."""
    try:
        server = None
        if opts.tls_cert or opts.tls_key or opts.tls_sni:
            if not (opts.tls_cert and opts.tls_key):
                raise TlsError("tls: cert and key are both required (--tls-cert, --tls-key)")
            server = server_context(opts.tls_cert, opts.tls_key, opts.tls_sni, opts.tls_client_ca,
                                    opts.tls_require_client_certificate)
        urls = [opts.upstream or "", *opts.clusters.values()]
        client = None
        if any(u.lower().startswith("https://") for u in urls):
            client = client_context(opts.upstream_ca, opts.upstream_insecure_skip_verify, opts.upstream_cert,
                                    opts.upstream_key)
    except TlsError as e:
        raise StartupError(str(e)) from None
    return server, client


def load_chain(paths: list[Path], scope: Scope | None = None) -> Chain:
    try:
        specs = load_plugin_specs(paths, scope)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    return chain_of(specs)


def chain_of(specs: list[PluginSpec]) -> Chain:
    plugins: list[PluginHandle] = []
    pool = VmPool()  # plugins with the same VM key share an instance
    for spec in chain_order(specs):
        try:
            plugins.append(load_handle(spec, pool))
        except PluginError as e:
            raise StartupError(str(e)) from None
    return Chain(plugins, pool)


async def kube_chain(opts: RunOptions, scope: Scope) -> tuple[Chain, KubeSource]:
    """The first list from the Kubernetes API, loaded as strictly as files are at startup."""
    source = KubeSource(PluginManager(), scope, namespace=opts.kube_namespace, selector=opts.kube_selector,
                        kubeconfig=opts.kubeconfig)
    try:
        await source.sync()
        specs, _ = source.scan(strict=True)
    except (KubeError, ConfigError) as e:
        if source._client is not None:
            await source._client.close()
        raise StartupError(str(e)) from None
    return await asyncio.get_running_loop().run_in_executor(None, chain_of, specs), source


def default_plugins() -> list[Path]:
    if not DEFAULT_PLUGIN.is_file():
        raise StartupError(f"the embedded example {DEFAULT_PLUGIN} is missing; pass --plugins FILE_OR_DIR")
    if not (DEFAULT_PLUGIN.parent / "plugin.wasm").is_file():
        raise StartupError(f"{DEFAULT_PLUGIN.parent / 'plugin.wasm'} is not built; run `make setup` "
                           "(or scripts/build-plugins.sh)")
    return [DEFAULT_PLUGIN]


class Running:
    """A started proxy; ``stop()`` drains it."""

    def __init__(self, app: ProxyApp, admin: AdminState, servers: list[asyncio.Server],
                 proxy: asyncio.Server, upstream_url: str, watcher: ResourceSource | None,
                 tcp: list[TcpListener] | None = None):
        self.app = app
        self.tcp = tcp or []
        self.watcher = watcher
        self.admin = admin
        self.servers = servers
        self.proxy = proxy
        self.upstream_url = upstream_url

    @property
    def port(self) -> int:
        return int(self.proxy.sockets[0].getsockname()[1])

    @property
    def tcp_ports(self) -> list[int]:
        """The bound ports of the TCP proxy listeners, in config order."""
        return [t.bound_port for t in self.tcp]

    @property
    def admin_port(self) -> int:
        return int(self.servers[1].sockets[0].getsockname()[1])  # when it serves the admin API

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish, then close everything."""
        self.admin.draining = True
        self.proxy.close()
        for t in self.tcp:
            if t.server is not None:
                t.server.close()
        if self.watcher is not None:
            await self.watcher.stop()
        for c in list(self.app.connections):
            c.drain()
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while self.app.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.app.connections):
            c._close()
        for t in self.tcp:
            t.close_all()  # network plugins hear of the close before their VMs go
        for h in self.app.chain.plugins:
            h.replaced()  # root contexts get on_done/on_delete; fetched modules are unpinned
        for s in self.servers:
            s.close()
        self.app.cluster.close()
        if self.app.plugins.callouts is not None:
            self.app.plugins.callouts.close()


async def start(opts: RunOptions) -> Running:
    plugin_paths = opts.plugins if opts.plugins is not None or opts.kube else default_plugins()
    try:
        lhost, lport = parse_address(opts.listen, "--listen")
        ahost, aport = parse_address(opts.admin, "--admin") if opts.admin else ("", 0)
    except ValueError as e:
        raise StartupError(str(e)) from None
    scope = Scope(opts.plugin_limits, dict(opts.labels), lport)
    server_tls, client_tls = tls_contexts(opts)
    check_tcp_proxies(opts)
    kube: KubeSource | None = None
    if opts.kube:
        chain, kube = await kube_chain(opts, scope)
    else:
        assert plugin_paths is not None
        chain = load_chain(plugin_paths, scope)
    servers: list[asyncio.Server] = []
    upstream = opts.upstream
    demo = None
    if upstream is None:
        demo = await start_demo_upstream()
        upstream = f"http://127.0.0.1:{demo.sockets[0].getsockname()[1]}"
    try:
        cluster = Cluster("upstream", upstream, tls=client_tls)
        callouts = Callouts({name: Cluster(name, url, tls=client_tls) for name, url in opts.clusters.items()})
    except ValueError as e:
        raise StartupError(str(e)) from None
    manager = PluginManager(chain, callouts, XdsInfo(node=opts.node, **opts.xds))
    app = ProxyApp(manager, cluster, opts.limits, server_tls)
    admin = AdminState(app)
    tcp = tcp_listeners(opts, callouts, manager)
    try:
        proxy = await serve(app, lhost, lport, reuse_port=opts.reuse_port)
        servers.append(proxy)
        if opts.admin:
            servers.append(await serve_admin(admin, ahost, aport))
        for t, (thost, tport) in tcp:
            servers.append(await t.serve(thost, tport, reuse_port=opts.reuse_port))
    except (OSError, ValueError) as e:
        for s in servers:
            s.close()
        raise StartupError(f"cannot listen: {e}") from None
    if demo is not None:
        servers.append(demo)
    watcher: ResourceSource | None = None
    if kube is not None:
        kube.manager = manager
        watcher = kube if opts.watch else None
        if watcher is None and kube._client is not None:
            await kube._client.close()
    elif opts.watch:
        assert plugin_paths is not None
        watcher = PluginWatcher(plugin_paths, manager, scope)
    if watcher is not None:
        watcher.start()
    running = Running(app, admin, servers, proxy, upstream, watcher, [t for t, _ in tcp])
    _log.info("listening on %s%s:%d, admin on %s, upstream %s%s, plugins: %s",
              "https://" if server_tls else "", lhost, running.port,
              f"{ahost}:{running.admin_port}" if opts.admin else "the supervisor", upstream,
              " (demo)" if demo else "", ", ".join(p.name for p in chain.plugins) or "none")
    if kube is not None:
        _log.info("plugins from the Kubernetes API (%s)%s", kube.where(), ", watched" if opts.watch else "")
    for t in running.tcp:
        _log.info("tcp proxy %s on %s:%d to cluster %s, network plugins: %s", t.name, t.server.sockets[0]
                  .getsockname()[0] if t.server else "", t.bound_port, t.cluster.name,
                  ", ".join(h.name for h in t.handles()) or "none")
    return running


def check_tcp_proxies(opts: RunOptions) -> list[tuple[str, int]]:
    """The TCP proxy listen addresses; StartupError names the entry and field at fault."""
    out = []
    for i, t in enumerate(opts.tcp_proxies):
        where = f"tcp_proxies[{i}]"
        try:
            out.append(parse_address(str(t.get("listen", "")), f"{where}.listen"))
        except ValueError as e:
            raise StartupError(str(e)) from None
        name = str(t.get("cluster", ""))
        if name not in opts.clusters:
            raise StartupError(f"{where}.cluster: no cluster named {name!r} (clusters: "
                               f"{', '.join(sorted(opts.clusters)) or 'none'})")
    return out


def tcp_listeners(opts: RunOptions, callouts: Callouts,
                  manager: PluginManager) -> list[tuple[TcpListener, tuple[str, int]]]:
    """The TCP proxy listeners to serve, each with its address (not bound yet)."""
    out = []
    for t, (host, port) in zip(opts.tcp_proxies, check_tcp_proxies(opts), strict=True):
        cluster = callouts.clusters[str(t["cluster"])]
        out.append((TcpListener(str(t.get("name") or f"tcp_{port}"), port, cluster, manager,
                                buffer_limit=opts.limits.max_buffered_body,
                                connect_timeout=float(t.get("connect_timeout", 5.0)),
                                idle_timeout=float(t.get("idle_timeout", 3600.0))), (host, port)))
    return out


async def run_forever(opts: RunOptions) -> None:
    running = await start(opts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    _log.info("draining")
    await running.stop(opts.drain_seconds)
