"""Differential tests of network (TCP) plugins: the same plugin (tests/plugins/netfilter)
as an ``envoy.filters.network.wasm`` filter in front of Envoy's ``tcp_proxy`` and as a
``type: NETWORK`` WasmPlugin on a wasmgate TCP proxy listener, both to one real TCP echo
upstream. Each scenario runs on a new connection through both; compared: the bytes and
the close the client sees, the bytes and the end of stream the upstream sees, every log
line the plugin writes for that connection (in order, with Envoy's context ids), and at
the end the plugin's metrics on /stats/prometheus.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from envoy_harness import Envoy, EnvoyPlugin, EnvoyTcpProxy
from servers import PLUGIN_BUILD, ProxyThread, Step, TcpEcho, start_upstream, tcp_session, wasmplugin_yaml
from wasmgate.plugin import metrics
from xds_harness import GatewayThread

NETFILTER = PLUGIN_BUILD / "netfilter.wasm"


@dataclass
class Seen:
    client: list[object]  # what the client read, and how the connection ended for it
    upstream: list[tuple[bytes, bool]]  # per upstream connection: bytes received, ended
    lines: list[str]  # the plugin's log lines for the connection


def _plugin_lines(text: str) -> list[str]:
    return [line.split(": netfilter: ", 1)[1] for line in text.splitlines() if ": netfilter: " in line]


class NetPair:
    """Envoy and wasmgate, each with one TCP proxy listener running the netfilter plugin."""

    def __init__(self, workdir: Path, config: str = "", fail_open: bool = False, names: tuple[str, ...] = (),
                 kind: str = "static"):
        """``names``: several netfilter plugins in that order, on one shared VM (Istio sets no
        vm_id), instead of the one named netfilter. ``kind`` "xds": the Envoy is `wasmgate
        envoy` with the same WasmPlugin files and TCP proxy listener, configured over ADS."""
        self.kind = kind
        self.echo = TcpEcho()
        self.http_upstream = start_upstream()
        (workdir / "envoy").mkdir()
        plugins = [EnvoyPlugin(n, NETFILTER, config, fail_open=fail_open, root_id=n, vm_id="" if names else None)
                   for n in names or ("netfilter",)]
        files = [wasmplugin_yaml(workdir, p.name, NETFILTER, plugin_type="NETWORK", config=config or None,
                                 fail_strategy="FAIL_OPEN" if fail_open else "", priority=100 - i)
                 for i, p in enumerate(plugins)]
        self.envoy: Envoy | GatewayThread
        node = {"id": "tcp-diff"}  # wasmgate envoy names Envoy's node "wasmgate" by default
        if kind == "xds":
            self.envoy = GatewayThread(files, self.http_upstream.url, workdir / "xds", node=node,
                                       clusters={"echo": f"127.0.0.1:{self.echo.port}"},
                                       tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}])
        else:
            self.envoy = Envoy([], self.http_upstream.port, workdir / "envoy", clusters={"echo": self.echo.port},
                               tcp_proxies=[EnvoyTcpProxy("echo", plugins)], node=node)
            self.envoy.start()
        try:
            self.wasmgate = ProxyThread(files, self.http_upstream.url, node=node,
                                        clusters={"echo": f"127.0.0.1:{self.echo.port}"},
                                        tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}])
        except BaseException:
            self.envoy.stop()
            raise
        self.ours: list[str] = []  # wasmgate's plugin lines, appended by the log handler

    def stop(self) -> None:
        self.wasmgate.stop()
        self.envoy.stop()
        self.echo.close()
        self.http_upstream.server.shutdown()

    def _run(self, port: int, steps: list[Step], lines: Callable[[], list[str]], until: str) -> Seen:
        before_up, before_lines = len(self.echo.received), len(lines())
        client = tcp_session(port, steps)
        deadline = time.monotonic() + 5
        while not any(until in line for line in lines()[before_lines:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        quiet, count = time.monotonic(), len(lines())
        while time.monotonic() - quiet < 0.3 and time.monotonic() < deadline + 5:  # Envoy logs asynchronously
            time.sleep(0.05)
            if len(lines()) != count:
                quiet, count = time.monotonic(), len(lines())
        upstream = [(bytes(self.echo.received[i]), self.echo.ended[i])
                    for i in range(before_up, len(self.echo.received))]
        return Seen(client, upstream, lines()[before_lines:])

    def compare(self, steps: list[Step], until: str = "on_delete", *, reset_is_eof: bool = False) -> Seen:
        """``reset_is_eof``: a connection closed unanswered may reach the client as a reset or
        as an end of stream, depending on whether its bytes had arrived before the close."""
        theirs = self._run(self.envoy.tcp_ports[0], steps, lambda: _plugin_lines(self.envoy.log_text()), until)
        ours = self._run(self.wasmgate.running.tcp_ports[0], steps, lambda: list(self.ours), until)
        if self.kind == "xds":
            # Root context ids follow the order Envoy applies the plugins' ECDS resources (not
            # the filter order): which root a connection's context hangs from is compared by name.
            for seen in (ours, theirs):
                seen.lines = [re.sub(r" parent=\d+", " parent=ROOT", line) for line in seen.lines]
        if reset_is_eof:
            for seen in (ours, theirs):
                seen.client = [("eof", b"") if c == ("reset", b"") else c for c in seen.client]
        assert ours == theirs, f"wasmgate differs from Envoy for {steps}"
        return ours


class _Collector(logging.Handler):
    """wasmgate's plugin lines, as they are logged."""

    def __init__(self, pair: NetPair):
        super().__init__(logging.INFO)
        self.pair = pair

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if ": netfilter: " in message:
            self.pair.ours.append(message.split(": netfilter: ", 1)[1])


@contextlib.contextmanager
def running(workdir: Path, kind: str, config: str = "", fail_open: bool = False,
            names: tuple[str, ...] = ()) -> Iterator[NetPair]:
    logger = logging.getLogger("wasmgate.wasm")
    level = logger.level
    saved, metrics.STORE = metrics.STORE, metrics.MetricStore()  # process-wide here, per Envoy process there
    try:
        pair = NetPair(workdir, config, fail_open, names, kind)
        handler = _Collector(pair)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            yield pair
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            pair.stop()
    finally:
        metrics.STORE = saved


# "static": the harness's bootstrap; "xds": `wasmgate envoy`, Envoy configured over ADS.
ENVOY_KINDS = ["static", "xds"]


@pytest.fixture(params=ENVOY_KINDS)
def envoy_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", params=ENVOY_KINDS)
def pair(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[NetPair]:
    with running(tmp_path_factory.mktemp("netdiff"), str(request.param)) as p:
        yield p


SCENARIOS: dict[str, list[Step]] = {
    "echo": [("send", b"hello"), ("recv",), ("send", b"world"), ("recv",), ("shut",), ("eof",)],
    "rewrite": [("send", b"upper:abc"), ("recv",), ("send", b"wrap:xy"), ("recv",), ("send", b"swap:12345"),
                ("recv",), ("send", b"a secret b"), ("recv",), ("shut",), ("eof",)],
    "hold": [("send", b"hold:1"), ("send", b"more"), ("send", b"release"), ("recv",), ("shut",), ("eof",)],
    "tick-continue": [("send", b"wait:1"), ("recv",), ("shut",), ("eof",)],
    "close-stream": [("send", b"hello"), ("recv",), ("send", b"close:"), ("eof",)],
    "upstream-closes": [("send", b"bye"), ("recv",), ("eof",), ("shut",)],
    "upstream-hold": [("send", b"uphold"), ("send", b"more"), ("recv",), ("shut",), ("eof",)],
    "no-data": [("shut",), ("eof",)],
    "client-closes": [("send", b"x"), ("recv",), ("close",)],
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_tcp_scenario_same_as_envoy(pair: NetPair, name: str) -> None:
    seen = pair.compare(SCENARIOS[name])
    assert len(seen.lines) >= 7
    assert seen.lines[-1].startswith("on_delete ctx=")


def test_tcp_plugin_metrics_same_as_envoy(pair: NetPair) -> None:
    pair.compare(SCENARIOS["rewrite"])

    def metric_lines(port: int) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=10) as r:
            text = r.read().decode()
        return [line for line in text.splitlines() if re.match(r"(# TYPE )?tcp_", line)]

    deadline = time.monotonic() + 10
    while (ours := metric_lines(pair.wasmgate.admin_port)) != (theirs := metric_lines(pair.envoy.admin_port)) \
            and time.monotonic() < deadline:
        time.sleep(0.2)  # a connection's last callbacks may still be on their way on a busy machine
    assert ours == theirs
    assert any(line.startswith("tcp_downstream_bytes{} ") for line in ours)


def test_tcp_trap_fail_close_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    with running(tmp_path, envoy_kind) as p:
        seen = p.compare([("send", b"hello"), ("recv",), ("send", b"trap:"), ("eof",)], until="trap:")
        assert seen.client == [b"hello", ("eof", b"")]
        assert seen.lines[-1].startswith("on_downstream_data") and "trap:" in seen.lines[-1]
        seen = p.compare([("send", b"again"), ("eof",)], until="never", reset_is_eof=True)
        # closed at once: no callback, the upstream never contacted
        assert seen.client == [("eof", b"")] and seen.upstream == [] and seen.lines == []


def test_tcp_trap_fail_open_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    with running(tmp_path, envoy_kind, fail_open=True) as p:
        seen = p.compare([("send", b"hello"), ("recv",), ("send", b"trap:"), ("recv",), ("send", b"after"),
                          ("recv",), ("shut",), ("eof",)], until="trap:")
        assert seen.client == [b"hello", b"trap:", b"after", ("eof", b"")]
        seen = p.compare([("send", b"again"), ("recv",), ("shut",), ("eof",)], until="never")
        assert seen.client == [b"again", ("eof", b"")] and seen.lines == []  # no filter on a failed VM


def test_tcp_pause_in_new_connection_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    with running(tmp_path, envoy_kind, config="pause-new") as p:
        seen = p.compare(SCENARIOS["echo"])
        assert seen.lines[2].startswith("tick resumes")
        p.compare(SCENARIOS["no-data"])


# Attributes read in proxy_on_new_connection, the first proxy_on_downstream_data and on_log
# (SHAPES: values that differ per run, compared by length).
TCP_PROPERTIES = [
    "request", "request.path", "request.method", "request.protocol", "request.size", "request.total_size",
    "request.headers", "request.nope", "response", "response.code", "response.code_details", "response.flags",
    "response.grpc_status", "response.size", "response.total_size", "response.headers", "response.trailers",
    "response.backend_latency", "connection", "connection.mtls", "connection.requested_server_name",
    "connection.tls_version", "connection.termination_details", "connection.sha256_peer_certificate_digest",
    "upstream", "upstream.request_attempt_count", "upstream.transport_failure_reason", "upstream.locality",
    "upstream.tls_version", "upstream.address", "source", "source.nope", "destination", "metadata",
    "metadata.filter_metadata", "filter_state", "upstream_filter_state", "xds", "xds.cluster_name",
    "xds.route_name", "xds.virtual_host_name", "xds.filter_chain_name", "xds.listener_direction",
    "xds.route_metadata", "xds.cluster_metadata", "xds.listener_metadata", "xds.upstream_host_metadata",
    "xds.node.id", "plugin_name", "plugin_root_id", "netfilter_seen", "filter_state.wasm.netfilter_seen",
    "no.such.attribute"]
TCP_SHAPES = ["request.time", "request.duration", "connection.id", "connection_id", "source.address", "source.port",
              "destination.address", "destination.port", "upstream.port", "upstream.local_address"]


def test_tcp_properties_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    # Through `wasmgate envoy`, plugin_name is Istio's "<namespace>.<name>" (docs/envoy.md).
    paths = [p for p in TCP_PROPERTIES if envoy_kind == "static" or p != "plugin_name"]
    config = f"paths={','.join(paths)}\nshapes={','.join(TCP_SHAPES)}"
    with running(tmp_path, envoy_kind, config=config) as p:
        seen = p.compare(SCENARIOS["echo"])
    props = [line for line in seen.lines if line.startswith("prop ")]
    assert len(props) == 3 * (len(paths) + len(TCP_SHAPES))
    assert "prop new upstream.address = status:1" in props  # not connected yet
    assert "prop data request.size = 0500000000000000" in props  # bytes received so far
    assert "prop log response.size = 0a00000000000000" in props  # bytes sent to the client
    assert "prop data xds.cluster_name = " + b"echo".hex() in props


def test_two_network_plugins_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    """Read order first-second, write order second-first; a read after the second paused
    starts again at the first with the whole buffer (Envoy's filter manager)."""
    with running(tmp_path, envoy_kind, names=("first", "second")) as p:
        seen = p.compare([("send", b"hold@second:1"), ("send", b"more"), ("send", b"release"), ("recv",),
                          ("send", b"uphold"), ("send", b"x"), ("recv",), ("shut",), ("eof",)])
        assert seen.client == [b"hold@second:1morerelease", b"upholdx", ("eof", b"")]
        data = [line.split(" data=")[0] for line in seen.lines if "_data ctx" in line]
        first, second = "[first] on_downstream_data ctx=3", "[second] on_downstream_data ctx=4"
        assert data[:8] == [f"{first} size=13 eos=0", f"{second} size=13 eos=0",  # second pauses
                            f"{first} size=17 eos=0", f"{second} size=17 eos=0",  # the first sees it all again
                            f"{first} size=24 eos=0", f"{second} size=24 eos=0",
                            "[second] on_upstream_data ctx=4 size=24 eos=0",  # writes: the other way round
                            "[first] on_upstream_data ctx=3 size=24 eos=0"]
        p.compare([("send", b"hold@first:1"), ("send", b"release"), ("recv",), ("send", b"close:"), ("eof",)])
