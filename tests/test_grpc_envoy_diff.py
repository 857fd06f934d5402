"""Differential test: gRPC callouts through Envoy (V8) and wasmgate, same plugin
(tests/plugins/grpccall), same gRPC server, same requests, in the same order.

Compared per request: status, body, the x-grpc-* response headers, and the x-grpc-*
headers the upstream received; over the whole run, the plugin's log lines and metrics
(tests/plugin_checks.py). The plugin's x-grpc-trace holds every host-call status,
every callback (on which context, with which token kind), what proxy_get_status said,
and callbacks that arrived for tokens nobody waited for.
"""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from envoy_harness import Envoy, EnvoyPlugin
from grpc_server import GrpcServer
from plugin_checks import PluginLogs, assert_same_logs, assert_same_metrics, envoy_messages, plugin_metrics, settled
from servers import PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml
from xds_harness import GatewayThread

WASM = PLUGIN_BUILD / "grpccall.wasm"

# In order: later ones see what earlier ones left (strays, the last status code).
# Not here: a call that times out. Envoy's own timer (14 "upstream request timeout") races
# with the server's answer to grpc-timeout (4 "Deadline Exceeded"); wasmgate always
# reports the first (test_grpc_callout.py::test_unary_timeout).
CASES: list[dict[str, str]] = [
    {"x-grpc-op": "tokens"},
    {"x-grpc-call": "hello"},
    {"x-grpc-call": "hello", "x-grpc-proto": "1"},
    {"x-grpc-call": "bob", "x-grpc-method": "Fail"},
    {"x-grpc-call": "bob", "x-grpc-method": "Nope"},
    {"x-grpc-call": "bob", "x-grpc-method": "Slow", "x-grpc-timeout": "0"},
    {"x-grpc-call": "bob", "x-grpc-cluster": "nope"},
    {"x-grpc-call": "bob", "x-grpc-cluster": "nope", "x-grpc-proto": "1"},
    {"x-grpc-call": "bob", "x-grpc-cluster": "dead"},
    {"x-grpc-op": "strays", "x-wait": "0.3"},
    {"x-grpc-op": "tokens"},
    {"x-grpc-op": "close-call"},
    {"x-grpc-op": "cancel-call"},
    {"x-grpc-stream": "a,b,c"},
    {"x-grpc-stream": "a,b,c", "x-grpc-cancel": "1"},
    {"x-grpc-stream": "a,b", "x-grpc-method": "BidiFail"},
    {"x-grpc-stream": "a", "x-grpc-method": "Nope"},
    {"x-grpc-stream": "a", "x-grpc-method": "Nope", "x-grpc-dump": "1"},
    {"x-grpc-stream": "a,b", "x-grpc-method": "BidiFail", "x-grpc-dump": "1"},
    {"x-grpc-stream": "%", "x-grpc-method": "BidiFail", "x-grpc-dump": "1"},
    {"x-grpc-stream": "a", "x-grpc-cluster": "dead"},
    {"x-grpc-stream": "a", "x-grpc-cluster": "nope", "x-grpc-proto": "1"},
    {"x-grpc-op": "call-only"},
    {"x-grpc-op": "strays", "x-wait": "1.5"},
    {"x-grpc-op": "tokens"},
]

# grpcio does not show a client the response's grpc-accept-encoding header, which
# Envoy's initial metadata map holds (docs/abi-support.md); compared without it.
_ACCEPT_ENCODING = re.compile(r"initial-pairs=(\d+):([^ ]*?);grpc-accept-encoding=identity, deflate, gzip")


def _without_accept_encoding(trace: str) -> str:
    return _ACCEPT_ENCODING.sub(lambda m: f"initial-pairs={int(m.group(1)) - 1}:{m.group(2)}", trace)


@dataclass
class Seen:
    status: int
    body: bytes
    headers: dict[str, str]
    upstream: dict[str, str]


def observe(port: int, upstream: Upstream, headers: dict[str, str]) -> Seen:
    before = len(upstream.seen)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.request("GET", "/", headers={k: v for k, v in headers.items() if k != "x-wait"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    got = {k.lower(): _without_accept_encoding(v) for k, v in r.getheaders() if k.lower().startswith("x-grpc-")}
    seen = upstream.seen[before:]
    up = {k: _without_accept_encoding(v) for k, v in seen[-1].headers
          if k.startswith("x-grpc-") and k not in headers} if seen else {}
    return Seen(r.status, body, got, up)


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcServer]:
    s = GrpcServer()
    yield s
    s.stop()


def run_cases(port: int, upstream: Upstream) -> list[Seen]:
    out = []
    for case in CASES:
        time.sleep(float(case.get("x-wait", "0")))
        out.append(observe(port, upstream, case))
    return out


def start_envoy(kind: str, tmp_path: Path, upstream: Upstream, grpc_server: GrpcServer) -> Envoy | GatewayThread:
    """"static": the harness's bootstrap; "xds": `wasmgate envoy` with the same WasmPlugin file
    and the gRPC clusters as HTTP/2 clusters (``http2_clusters``)."""
    if kind == "xds":
        return GatewayThread([wasmplugin_yaml(tmp_path, "grpccall", WASM)], upstream.url, tmp_path / "xds",
                             clusters={"grpc": f"http://127.0.0.1:{grpc_server.port}", "dead": "http://127.0.0.1:1"},
                             http2_clusters=["grpc", "dead"], envoy_component_log_level="wasm:debug")
    envoy = Envoy([EnvoyPlugin("grpccall", WASM, root_id="grpccall")], upstream.port, tmp_path / "envoy",
                  log_level="debug", clusters={"grpc": grpc_server.port, "dead": 1}, http2_clusters=("grpc", "dead"))
    envoy.start()
    return envoy


@pytest.mark.parametrize("envoy_kind", ["static", "xds"])
def test_grpc_callouts_same_as_envoy(tmp_path: Path, grpc_server: GrpcServer, envoy_kind: str) -> None:
    """Envoy runs every case, then wasmgate; then the exchanges, the plugin's log lines
    (every gRPC callback and outcome, in order) and its metrics are compared. The Envoy is
    configured statically or over ADS by `wasmgate envoy` (``envoy_kind``)."""
    upstream = start_upstream()
    logs = PluginLogs()
    try:
        envoy = start_envoy(envoy_kind, tmp_path, upstream, grpc_server)
        try:
            mark = len(envoy_messages(envoy))
            expected = run_cases(envoy.port, upstream)
            [envoy_lines] = settled((lambda: envoy_messages(envoy), mark))
            envoy_metrics = plugin_metrics(envoy.admin_port)
        finally:
            envoy.stop()
        proxy = ProxyThread([wasmplugin_yaml(tmp_path, "grpccall", WASM)], upstream.url,
                            clusters={"grpc": f"http://127.0.0.1:{grpc_server.port}", "dead": "http://127.0.0.1:1"})
        try:
            mark = len(logs.messages)
            actual = run_cases(proxy.port, upstream)
            [our_lines] = settled((lambda: logs.messages, mark))
            our_metrics = plugin_metrics(proxy.admin_port)
        finally:
            proxy.stop()
    finally:
        logs.close()
        upstream.server.shutdown()
    for case, want, got in zip(CASES, expected, actual, strict=True):
        assert got == want, f"wasmgate differs from Envoy for {case}"
    assert_same_logs([_without_accept_encoding(m) for m in our_lines],
                     [_without_accept_encoding(m) for m in envoy_lines], "the gRPC cases")
    assert_same_metrics(our_metrics, envoy_metrics, "after the gRPC cases")
    assert any(m.startswith("grpccall: on_grpc_close@root kind=1 arg=14") for m in envoy_lines)
    # The run exercised what it should have (Envoy's side, so a broken harness shows).
    traces = " | ".join(s.headers.get("x-grpc-trace", "") + s.upstream.get("x-grpc-trace", "") for s in expected)
    for needle in ("receive@root=echo:hello/0", "close@root=7", "close@root=14", "trailing@root=2/0",
                   "strays: close:1/14", "close:2/14", "receive:1", "halfclose=0"):
        assert needle in traces, needle
