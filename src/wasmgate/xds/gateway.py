"""``wasmgate envoy``: the xDS server, the controller, Envoy, and a small status API.

Status API (``--admin``): ``GET /plugins`` (each plugin: module, what Envoy serves for it,
whether Envoy accepted it, and Envoy's message when it rejected it; the xDS state and every
recent NACK), ``GET /ready`` (200 ``LIVE`` once Envoy is ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import urllib.request
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasmgate.oci.fetch import ModuleCache
from wasmgate.proxy.demo import start_demo_upstream
from wasmgate.resources.config import parse_address
from wasmgate.resources.feed import DirectoryFeed, SpecSet
from wasmgate.resources.wasmplugin import Scope
from wasmgate.xds.control import Controller
from wasmgate.xds.envoy import EnvoyError, EnvoyProcess, bootstrap
from wasmgate.xds.resources import DownstreamTls, TcpProxy, UpstreamTls
from wasmgate.xds.server import XdsServer

_log = logging.getLogger("wasmgate")


class GatewayError(Exception):
    pass


@dataclass
class EnvoyOptions:
    listen: str = "127.0.0.1:8080"  # Envoy's listener
    admin: str = "127.0.0.1:9901"  # wasmgate's status API ("" for none)
    envoy_admin: str = "127.0.0.1:15000"  # Envoy's admin API (Istio's port)
    upstream: str | None = None  # None: the built-in demo upstream
    plugins: list[Path] = field(default_factory=list)
    clusters: dict[str, str] = field(default_factory=dict)
    http2_clusters: list[str] = field(default_factory=list)  # clusters Envoy reaches over HTTP/2 (gRPC calls)
    # TCP proxy listeners for NETWORK plugins, as wasmgate run's: {name, listen, cluster, idle_timeout}
    tcp_proxies: list[dict[str, Any]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    node: dict[str, Any] = field(default_factory=dict)
    watch: bool = True
    upstream_ca: Path | None = None
    upstream_insecure_skip_verify: bool = False
    upstream_cert: Path | None = None  # client certificate for upstreams that ask for one
    upstream_key: Path | None = None
    # The config's tls: section (cert, key, sni, client_ca, require_client_certificate): TLS on Envoy's listener
    tls: dict[str, Any] | None = None
    envoy_log: Path | None = None  # None: Envoy logs to wasmgate's stderr
    envoy_log_level: str = "info"
    envoy_component_log_level: str = ""  # e.g. "wasm:debug"
    concurrency: int = 0  # Envoy worker threads (0: Envoy's default, one per core)
    # Envoy's ads_config.rate_limit_settings ({max_tokens, fill_rate}); Envoy then answers bursts of
    # pushes with fewer requests (tests use it to make it batch its ACKs)
    ads_rate_limit: dict[str, Any] | None = None
    start_timeout: float = 60.0
    module_cache: Path | None = None  # None: $WASMGATE_MODULE_CACHE or ~/.cache/wasmgate/modules
    xds: dict[str, Any] = field(default_factory=dict)  # the config's xds: section (names, metadata)
    feed: AsyncIterable[SpecSet] | None = None  # None: a DirectoryFeed over ``plugins`` (or kube)
    kube: bool = False  # WasmPlugins and pull Secrets from the Kubernetes API instead of files
    kube_namespace: str | None = None
    kube_selector: dict[str, str] = field(default_factory=dict)
    kubeconfig: str | None = None


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body: bytes = r.read()
        return body


def _downstream_tls(tls: dict[str, Any]) -> DownstreamTls:
    def path(v: Any) -> Path | None:
        return Path(v) if v else None

    cert, key = path(tls.get("cert")), path(tls.get("key"))
    if cert is None or key is None:
        raise GatewayError("tls: needs cert and key")
    sni = []
    for i, e in enumerate(tls.get("sni") or []):
        c, k = path(e.get("cert")), path(e.get("key"))
        if c is None or k is None or not e.get("server_names"):
            raise GatewayError(f"tls.sni[{i}]: needs server_names, cert and key")
        sni.append((tuple(str(n) for n in e["server_names"]), c, k))
    return DownstreamTls(cert, key, tuple(sni), path(tls.get("client_ca")), bool(tls.get("require_client_certificate")))


class Gateway:
    def __init__(self, opts: EnvoyOptions):
        self.opts = opts
        self.server = XdsServer()
        self.envoy: EnvoyProcess | None = None
        self.controller: Controller | None = None
        self.port = 0  # Envoy's listener port, once known
        self.tcp_ports: list[int] = []  # Envoy's TCP proxy listener ports, once known
        self._listener_names: list[str] = []
        self._envoy_admin = ("127.0.0.1", 15000)
        self.admin_port = 0
        self.ready = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._servers: list[asyncio.Server] = []

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        o = self.opts
        try:
            lhost, lport = parse_address(o.listen, "--listen")
            ahost, aport = parse_address(o.admin, "--admin") if o.admin else ("", 0)
            self._envoy_admin = parse_address(o.envoy_admin, "--envoy-admin")
            tcp = []
            for i, t in enumerate(o.tcp_proxies):
                host, port = parse_address(str(t.get("listen", "")), f"tcp_proxies[{i}].listen")
                tcp.append(TcpProxy(str(t.get("name") or (f"tcp_{port}" if port else f"tcp_{i}")), host, port,
                                    str(t.get("cluster", "")), float(t.get("idle_timeout", 3600.0))))
        except ValueError as e:
            raise GatewayError(str(e)) from None
        upstream = o.upstream
        if upstream is None:
            demo = await start_demo_upstream()
            self._servers.append(demo)
            upstream = f"http://127.0.0.1:{demo.sockets[0].getsockname()[1]}"
        try:
            self.controller = Controller(self.server, (lhost, lport), upstream, o.clusters,
                                         UpstreamTls(o.upstream_ca, o.upstream_insecure_skip_verify, o.upstream_cert,
                                                     o.upstream_key),
                                         ModuleCache(o.module_cache) if o.module_cache else None, o.xds,
                                         http2=o.http2_clusters, tcp_proxies=tcp,
                                         downstream_tls=_downstream_tls(o.tls) if o.tls else None)
        except ValueError as e:
            raise GatewayError(str(e)) from None
        scope = Scope(labels=dict(o.labels), port=lport)
        feed = o.feed
        if feed is None and o.kube:
            from wasmgate.xds.kube import KubeFeed

            feed = KubeFeed(scope, namespace=o.kube_namespace, selector=o.kube_selector, kubeconfig=o.kubeconfig,
                            watch=o.watch)
        elif feed is None:
            feed = DirectoryFeed(o.plugins, scope, watch=o.watch)
        self._listener_names = [f"{lhost}_{lport}", *(t.name for t in tcp)]
        xds_port = await self.server.start()
        first = asyncio.Event()
        run = asyncio.get_running_loop().create_task(self.controller.run(feed, first))
        self._tasks.append(run)
        await asyncio.wait({run, asyncio.ensure_future(first.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():  # the feed failed or ended before its first update
            raise GatewayError(f"resources: {run.exception() or 'the source gave nothing'}")
        if o.admin:
            try:
                self._servers.append(await asyncio.start_server(self._serve_status, ahost, aport))
            except OSError as e:
                raise GatewayError(f"--admin: cannot listen on {o.admin}: {e}") from None
            self.admin_port = int(self._servers[-1].sockets[0].getsockname()[1])
        await self.start_envoy()
        assert self.envoy is not None
        _log.info("envoy serving on %s:%d (envoy admin %s), configured over ADS from 127.0.0.1:%d; upstream %s; "
                  "plugins: %s%s", lhost, self.port, self.envoy.admin_url(), xds_port, upstream,
                  ", ".join(p.spec.name for p in self.controller.plugins) or "none",
                  f"; status on {ahost}:{self.admin_port}" if o.admin else "")

    async def start_envoy(self) -> None:
        """Start Envoy, a new process with a bootstrap of its own, and wait until it serves."""
        o = self.opts
        self.envoy = EnvoyProcess(bootstrap(self.server.port, self._envoy_admin, o.node, o.ads_rate_limit),
                                  log_path=o.envoy_log, log_level=o.envoy_log_level,
                                  component_log_level=o.envoy_component_log_level, concurrency=o.concurrency)
        try:
            await self.envoy.start()
        except (EnvoyError, OSError) as e:
            raise GatewayError(f"cannot start envoy: {e}") from None
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        assert self.envoy is not None and self.envoy.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.start_timeout
        while loop.time() < deadline:
            if self.envoy.proc.returncode is not None:
                raise GatewayError(f"envoy exited with code {self.envoy.proc.returncode} while starting"
                                   + (f"; see {self.opts.envoy_log}" if self.opts.envoy_log else ""))
            with contextlib.suppress(OSError, EnvoyError, ValueError, KeyError):
                base = self.envoy.admin_url()
                if (await loop.run_in_executor(None, _get, f"{base}/ready")).strip() == b"LIVE":
                    listeners = json.loads(await loop.run_in_executor(None, _get, f"{base}/listeners?format=json"))
                    ports = {ls["name"]: int(ls["local_address"]["socket_address"]["port_value"])
                             for ls in listeners.get("listener_statuses", [])}
                    if all(n in ports for n in self._listener_names):
                        self.port, *self.tcp_ports = (ports[n] for n in self._listener_names)
                        self.ready = True
                        return
            await asyncio.sleep(0.05)
        raise GatewayError(f"envoy not ready after {self.opts.start_timeout:g}s; status: "
                           f"{json.dumps(self.status()['xds'])}")

    def status(self) -> dict[str, Any]:
        c = self.controller
        proc = self.envoy.proc if self.envoy is not None else None
        envoy: dict[str, Any] = {"ready": self.ready, "listener_port": self.port, "tcp_ports": self.tcp_ports,
                                 "pid": proc.pid if proc is not None else None}
        with contextlib.suppress(EnvoyError, AttributeError):
            envoy["admin"] = self.envoy.admin_url() if self.envoy is not None else None
        return {"plugins": c.describe() if c else [], "resource_errors": c.errors if c else {},
                "not_served": c.skipped if c else [],
                "xds": self.server.status.describe(), "envoy": envoy}

    async def _serve_status(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass
            parts = line.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
            if path == "/plugins":
                code, body, ctype = 200, json.dumps(self.status(), indent=2).encode(), "application/json"
            elif path == "/ready":
                code, body, ctype = (200, b"LIVE\n", "text/plain") if self.ready else (503, b"NOT READY\n",
                                                                                      "text/plain")
            else:
                code, body, ctype = 404, b"not found: try /plugins or /ready\n", "text/plain"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[code]
            writer.write(f"HTTP/1.1 {code} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         "connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def wait(self) -> int:
        """Until Envoy exits (its exit code) or the controller fails."""
        assert self.envoy is not None
        envoy = asyncio.ensure_future(self.envoy.wait())
        await asyncio.wait({envoy, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
        for t in self._tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise GatewayError(f"resource feed failed: {t.exception()}")
        return envoy.result() if envoy.done() else 0

    async def stop(self) -> None:
        self.ready = False
        if self.envoy is not None:
            await self.envoy.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.server.stop()
        for s in self._servers:
            s.close()
        if self.controller is not None:
            for p in self.controller.plugins:
                if p.module is not None:
                    self.controller.cache.unpin(p.module)


async def run_forever(opts: EnvoyOptions) -> int:
    gw = Gateway(opts)
    await gw.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    done = asyncio.ensure_future(gw.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({done, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if done.done():
        code = done.result()
        _log.error("envoy exited with code %d", code)
        code = code or 1
    else:
        done.cancel()
        _log.info("stopping envoy")
    stopping.cancel()
    await gw.stop()
    return code
