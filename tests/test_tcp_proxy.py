"""TCP proxy listeners with network plugins, end to end through real sockets:
client -> wasmgate (tests/plugins/netfilter) -> a real TCP echo upstream.

The expected callback sequences are Envoy's (its network Wasm filter in front of
tcp_proxy); test_tcp_envoy_diff.py checks the same scenarios against a real Envoy.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from envoy_harness import free_port
from servers import PLUGIN_BUILD, ProxyThread, TcpEcho, Upstream, tcp_session, wasmplugin_yaml
from wasmgate.resources.config import load_config
from wasmgate.resources.wasmplugin import ConfigError

NETFILTER = PLUGIN_BUILD / "netfilter.wasm"


@pytest.fixture(scope="module")
def echo() -> Iterator[TcpEcho]:
    e = TcpEcho()
    yield e
    e.close()


def start(tmp: Path, echo: TcpEcho, upstream: Upstream, *, config: str | None = None, fail_strategy: str = "",
          extra: list[Path] | None = None, tcp: list[dict[str, Any]] | None = None,
          match: list[dict[str, Any]] | None = None, cluster_port: int | None = None) -> ProxyThread:
    plugin = wasmplugin_yaml(tmp, "netfilter", NETFILTER, plugin_type="NETWORK", config=config,
                             fail_strategy=fail_strategy, match=match)
    return ProxyThread([plugin, *(extra or [])], upstream.url,
                       clusters={"echo": f"127.0.0.1:{cluster_port or echo.port}"},
                       tcp_proxies=tcp or [{"listen": "127.0.0.1:0", "cluster": "echo"}])


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, echo: TcpEcho, upstream: Upstream) -> Iterator[ProxyThread]:
    p = start(tmp_path_factory.mktemp("net"), echo, upstream)
    yield p
    p.stop()


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
        yield caplog


def plugin_lines(caplog: pytest.LogCaptureFixture, until: str = "on_delete", timeout: float = 5.0) -> list[str]:
    """The plugin's log lines (ctx ids normalised to N), once ``until`` has been logged."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [r.getMessage().split(": netfilter: ", 1)[1] for r in caplog.records
                 if r.name == "wasmgate.wasm" and ": netfilter: " in r.getMessage()]
        if any(until in line for line in lines) or time.monotonic() > deadline:
            return [re.sub(r"ctx=\d+", "ctx=N", re.sub(r"127\.0\.0\.1:\d+", "ADDR", line)) for line in lines]
        time.sleep(0.02)


def port(p: ProxyThread, i: int = 0) -> int:
    return p.running.tcp_ports[i]


OPEN = ['on_context_create ctx=N parent=1',
        'on_new_connection ctx=N source=127.0.0.1 destination=127.0.0.1 upstream=status:1 request.path=status:1 '
        'mtls="\\x00"']
CLOSE_AFTER_HALF_CLOSE = ['on_downstream_data ctx=N size=0 eos=1 data="" upstream=ADDR',
                          'on_upstream_data ctx=N size=0 eos=1 data=""',
                          'on_upstream_connection_close ctx=N peer=0',
                          'on_downstream_connection_close ctx=N peer=1',
                          'on_done ctx=N']


def end(seen: str = "") -> list[str]:
    return [f"on_log ctx=N upstream=ADDR seen={seen} downstream_buffer=0/0", "on_delete ctx=N"]


def test_bytes_flow_and_are_rewritten(proxy: ProxyThread, echo: TcpEcho, logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"upper:abc"), ("recv",), ("send", b"wrap:xy"), ("recv",),
                                    ("send", b"swap:12345"), ("recv",), ("send", b"a secret b"), ("recv",),
                                    ("shut",), ("eof",)])
    assert got == [b"UPPER:ABC", b"<<wrap:xy>>", b"SWAPPED:12345", b"a [redacted] b", ("eof", b"")]
    assert bytes(echo.received[-1]) == b"UPPER:ABC<<wrap:xy>>SWAPPED:12345a secret b"
    assert echo.ended[-1]
    lines = plugin_lines(logs)
    assert lines[:2] == OPEN
    assert lines[2:10] == [
        'on_downstream_data ctx=N size=9 eos=0 data="upper:abc" upstream=ADDR',
        'on_upstream_data ctx=N size=9 eos=0 data="UPPER:ABC"',
        'on_downstream_data ctx=N size=7 eos=0 data="wrap:xy" upstream=ADDR',
        'on_upstream_data ctx=N size=11 eos=0 data="<<wrap:xy>>"',
        'on_downstream_data ctx=N size=10 eos=0 data="swap:12345" upstream=ADDR',
        'on_upstream_data ctx=N size=13 eos=0 data="SWAPPED:12345"',
        'on_downstream_data ctx=N size=10 eos=0 data="a secret b" upstream=ADDR',
        'on_upstream_data ctx=N size=10 eos=0 data="a secret b"']
    ctx = lines[10:]
    seen = re.search(r"seen=(ctx\d+)", " ".join(r.getMessage() for r in logs.records))
    assert seen is not None
    assert ctx == CLOSE_AFTER_HALF_CLOSE + end(seen.group(1))


def test_paused_data_accumulates_until_the_plugin_continues(proxy: ProxyThread, echo: TcpEcho,
                                                            logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"hold:1"), ("send", b"more"), ("send", b"release"), ("recv",),
                                    ("shut",), ("eof",)])
    assert got == [b"hold:1morerelease", ("eof", b"")]
    assert bytes(echo.received[-1]) == b"hold:1morerelease"
    lines = plugin_lines(logs)
    assert lines[2:6] == ['on_downstream_data ctx=N size=6 eos=0 data="hold:1" upstream=ADDR',
                          'on_downstream_data ctx=N size=10 eos=0 data="hold:1more" upstream=ADDR',
                          'on_downstream_data ctx=N size=17 eos=0 data="hold:1morerelease" upstream=ADDR',
                          'on_upstream_data ctx=N size=17 eos=0 data="hold:1morerelease"']
    assert lines[6:11] == CLOSE_AFTER_HALF_CLOSE


def test_continue_stream_from_a_tick(proxy: ProxyThread, echo: TcpEcho, logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"wait:1"), ("recv",), ("shut",), ("eof",)])
    assert got == [b"wait:1", ("eof", b"")]
    lines = plugin_lines(logs)
    assert lines[2:5] == ['on_downstream_data ctx=N size=6 eos=0 data="wait:1" upstream=ADDR',
                          "tick resumes ctx=N status=0",
                          'on_upstream_data ctx=N size=6 eos=0 data="wait:1"']


def test_close_stream_closes_the_connection(proxy: ProxyThread, echo: TcpEcho,
                                            logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"hello"), ("recv",), ("send", b"close:"), ("eof",)])
    assert got == [b"hello", ("eof", b"")]
    lines = plugin_lines(logs)
    # The closing chunk never reaches the upstream; the plugin still sees it in on_log.
    assert lines[4:] == ['on_downstream_data ctx=N size=6 eos=0 data="close:" upstream=ADDR',
                         "closing ctx=N status=0",
                         "on_downstream_connection_close ctx=N peer=1",
                         "on_done ctx=N",
                         lines[-2],
                         "on_delete ctx=N"]
    assert "downstream_buffer=6/0" in lines[-2]
    deadline = time.monotonic() + 5
    while not echo.ended[-1] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert bytes(echo.received[-1]) == b"hello" and echo.ended[-1]


def test_upstream_closing_first(proxy: ProxyThread, logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"bye"), ("recv",), ("eof",), ("shut",)])
    assert got == [b"bye", ("eof", b"")]
    lines = plugin_lines(logs)
    assert lines[2:] == ['on_downstream_data ctx=N size=3 eos=0 data="bye" upstream=ADDR',
                         'on_upstream_data ctx=N size=3 eos=0 data="bye"',
                         'on_upstream_data ctx=N size=0 eos=1 data=""',
                         "on_upstream_connection_close ctx=N peer=0",
                         'on_downstream_data ctx=N size=0 eos=1 data="" upstream=ADDR',
                         "on_downstream_connection_close ctx=N peer=2",
                         "on_done ctx=N", lines[-2], "on_delete ctx=N"]


def test_paused_upstream_data_waits_for_the_next_chunk(proxy: ProxyThread, logs: pytest.LogCaptureFixture) -> None:
    got = tcp_session(port(proxy), [("send", b"uphold"), ("send", b"more"), ("recv",), ("shut",), ("eof",)])
    assert got == [b"upholdmore", ("eof", b"")]
    lines = plugin_lines(logs)
    assert lines[2:6] == ['on_downstream_data ctx=N size=6 eos=0 data="uphold" upstream=ADDR',
                          'on_upstream_data ctx=N size=6 eos=0 data="uphold"',
                          'on_downstream_data ctx=N size=4 eos=0 data="more" upstream=ADDR',
                          'on_upstream_data ctx=N size=10 eos=0 data="upholdmore"']


def test_client_closing_at_once(proxy: ProxyThread, echo: TcpEcho, logs: pytest.LogCaptureFixture) -> None:
    assert tcp_session(port(proxy), [("shut",), ("eof",)]) == [("eof", b"")]
    lines = plugin_lines(logs)
    assert lines[2:7] == CLOSE_AFTER_HALF_CLOSE
    assert bytes(echo.received[-1]) == b"" and echo.ended[-1]


def test_plugin_metrics_and_tcp_stats(proxy: ProxyThread, logs: pytest.LogCaptureFixture) -> None:
    def stats() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.admin_port}/stats", timeout=10) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+)(?:\{\})? (\S+)$", text, re.M)}

    before = stats()
    tcp_session(port(proxy), [("send", b"12345"), ("recv",), ("send", b"a secret"), ("recv",), ("shut",), ("eof",)])
    plugin_lines(logs)
    after = stats()

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert delta("tcp_connections") == 1
    assert delta("tcp_downstream_bytes") == 13
    assert delta("tcp_upstream_bytes") == 5 + 12  # "a [redacted]"
    assert delta("wasmgate_tcp_connections_total") == 1
    assert delta("wasmgate_tcp_received_bytes_total") == 13
    assert delta("wasmgate_tcp_sent_bytes_total") == 17
    assert after["wasmgate_tcp_connections_active"] == 0


def test_pause_in_new_connection_reads_nothing_until_continued(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                               logs: pytest.LogCaptureFixture) -> None:
    p = start(tmp_path, echo, upstream, config="pause-new")
    try:
        got = tcp_session(port(p), [("send", b"hello"), ("recv",), ("shut",), ("eof",)])
    finally:
        p.stop()
    assert got == [b"hello", ("eof", b"")]
    lines = plugin_lines(logs)
    assert lines[2:5] == ["tick resumes ctx=N status=0",
                          'on_downstream_data ctx=N size=5 eos=0 data="hello" upstream=ADDR',
                          'on_upstream_data ctx=N size=5 eos=0 data="hello"']


def test_trap_with_fail_close_closes_connections(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                 logs: pytest.LogCaptureFixture) -> None:
    p = start(tmp_path, echo, upstream)
    try:
        got = tcp_session(port(p), [("send", b"hello"), ("recv",), ("send", b"trap:"), ("eof",)])
        accepted = len(echo.received)
        again = tcp_session(port(p), [("send", b"again"), ("eof",)])
        failed = p.running.app.chain.plugins[0].stats.failed_streams
    finally:
        p.stop()
    assert got == [b"hello", ("eof", b"")]
    assert again[0][0] in ("eof", "reset") and again[0][1] == b""  # type: ignore[index]
    assert len(echo.received) == accepted  # the next connection never reached the upstream
    assert bytes(echo.received[-1]) == b"hello"
    assert failed == 2
    lines = plugin_lines(logs, until="trap:")
    assert lines[-1] == 'on_downstream_data ctx=N size=5 eos=0 data="trap:" upstream=ADDR'  # nothing after


def test_trap_with_fail_open_lets_bytes_through(tmp_path: Path, echo: TcpEcho, upstream: Upstream) -> None:
    p = start(tmp_path, echo, upstream, fail_strategy="FAIL_OPEN")
    try:
        got = tcp_session(port(p), [("send", b"hello"), ("recv",), ("send", b"trap:"), ("recv",), ("send", b"x"),
                                    ("recv",), ("shut",), ("eof",)])
        again = tcp_session(port(p), [("send", b"again"), ("recv",), ("shut",), ("eof",)])
    finally:
        p.stop()
    assert got == [b"hello", b"trap:", b"x", ("eof", b"")]
    assert again == [b"again", ("eof", b"")]


def test_upstream_connect_failure_closes_the_client(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                    logs: pytest.LogCaptureFixture) -> None:
    p = start(tmp_path, echo, upstream, cluster_port=free_port())  # nothing listens there
    try:
        got = tcp_session(port(p), [("send", b"hello"), ("eof",)])
    finally:
        p.stop()
    assert got[0][0] in ("eof", "reset")  # type: ignore[index]
    lines = plugin_lines(logs)
    assert lines == [*OPEN, "on_downstream_connection_close ctx=N peer=1", "on_done ctx=N",
                     lines[-2], "on_delete ctx=N"]
    assert "upstream=status:1" in lines[-2]


def test_idle_timeout_closes(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                             logs: pytest.LogCaptureFixture) -> None:
    p = start(tmp_path, echo, upstream, tcp=[{"listen": "127.0.0.1:0", "cluster": "echo", "idle_timeout": 0.3}])
    try:
        got = tcp_session(port(p), [("send", b"hello"), ("recv",), ("eof",)])
    finally:
        p.stop()
    assert got == [b"hello", ("eof", b"")]
    assert plugin_lines(logs)[4:6] == ["on_downstream_connection_close ctx=N peer=1", "on_done ctx=N"]


def test_http_and_network_plugins_stay_on_their_listeners(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                          logs: pytest.LogCaptureFixture) -> None:
    http_plugin = wasmplugin_yaml(tmp_path, "lifecycle", PLUGIN_BUILD / "lifecycle.wasm")
    p = start(tmp_path, echo, upstream, extra=[http_plugin])
    try:
        assert [h.name for h in p.running.app.chain.http] == ["lifecycle"]
        assert [h.name for h in p.running.app.chain.network] == ["netfilter"]
        with urllib.request.urlopen(f"http://127.0.0.1:{p.port}/", timeout=10) as r:
            assert r.status == 200
        assert tcp_session(port(p), [("send", b"ping"), ("recv",), ("shut",), ("eof",)]) == [b"ping", ("eof", b"")]
        plugin_lines(logs)
    finally:
        p.stop()
    messages = [r.getMessage() for r in logs.records if r.name == "wasmgate.wasm"]
    # One stream context each: the HTTP plugin's for the request, the network one's for the connection.
    assert sum(re.search(r"lifecycle: on_context_create ctx=\d+ parent=[1-9]", m) is not None
               for m in messages) == 1
    assert sum("lifecycle: on_request_headers" in m for m in messages) == 1
    assert sum("netfilter: on_context_create" in m for m in messages) == 1


def test_connection_ids_are_one_sequence_across_http_and_tcp(tmp_path: Path, echo: TcpEcho,
                                                             upstream: Upstream) -> None:
    # Envoy numbers every connection of the process in one sequence (connection.id): opened
    # one after the other, an HTTP, a TCP and an HTTP connection get consecutive ids.
    p = start(tmp_path, echo, upstream)

    def http_round_trip(s: socket.socket) -> None:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")

    try:
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as h1:
            http_round_trip(h1)  # accepted before the next one opens
            with socket.create_connection(("127.0.0.1", port(p)), timeout=10) as tcp:
                tcp.sendall(b"ping")
                assert tcp.recv(16) == b"ping"
                with socket.create_connection(("127.0.0.1", p.port), timeout=10) as h2:
                    http_round_trip(h2)  # all three held open: their listeners list them now
                    tcp_ids = [c.conn.connection_id for c in p.running.tcp[0].connections]
                    http_ids = sorted(c.id for c in p.running.app.connections)
    finally:
        p.stop()
    assert len(tcp_ids) == 1 and len(http_ids) == 2
    assert http_ids == [tcp_ids[0] - 1, tcp_ids[0] + 1]


def test_match_ports_pick_the_tcp_listeners(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                            logs: pytest.LogCaptureFixture) -> None:
    first, second = free_port(), free_port()
    p = start(tmp_path, echo, upstream, match=[{"mode": "SERVER", "ports": [{"number": second}]}],
              tcp=[{"listen": f"127.0.0.1:{first}", "cluster": "echo"},
                   {"listen": f"127.0.0.1:{second}", "cluster": "echo"}])
    try:
        assert tcp_session(first, [("send", b"one"), ("recv",), ("shut",), ("eof",)]) == [b"one", ("eof", b"")]
        assert tcp_session(second, [("send", b"two"), ("recv",), ("shut",), ("eof",)]) == [b"two", ("eof", b"")]
        lines = plugin_lines(logs)
    finally:
        p.stop()
    assert [line for line in lines if "on_downstream_data" in line and "eos=0" in line] == \
        ['on_downstream_data ctx=N size=3 eos=0 data="two" upstream=ADDR']


def test_client_only_match_mode_leaves_the_plugin_out(tmp_path: Path, echo: TcpEcho, upstream: Upstream) -> None:
    p = start(tmp_path, echo, upstream, match=[{"mode": "CLIENT"}])
    try:
        assert p.running.app.chain.plugins == []
        assert tcp_session(port(p), [("send", b"x"), ("recv",), ("shut",), ("eof",)]) == [b"x", ("eof", b"")]
    finally:
        p.stop()


# ---- configuration ---------------------------------------------------------------------


def test_config_file_tcp_proxies(tmp_path: Path) -> None:
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text("clusters: {db: '127.0.0.1:5432'}\n"
                   "tcp_proxies: [{name: db, listen: '127.0.0.1:15432', cluster: db, idle_timeout_s: 60}]\n")
    loaded = load_config(cfg)
    assert [t.to_options() for t in loaded.tcp_proxies] == [
        {"name": "db", "listen": "127.0.0.1:15432", "cluster": "db", "connect_timeout": 5.0, "idle_timeout": 60.0}]


_A = "clusters: {a: '127.0.0.1:1'}\n"


@pytest.mark.parametrize(("text", "error"), [
    ("tcp_proxies: [{listen: '127.0.0.1:1', cluster: nope}]\n", "tcp_proxies[0].cluster: no cluster named 'nope'"),
    (_A + "tcp_proxies: [{listen: 'nohost', cluster: a}]\n", "tcp_proxies[0].listen: Value error"),
    (_A + "tcp_proxies: [{cluster: a}]\n", "tcp_proxies[0].listen: Field required"),
    (_A + "tcp_proxies: [{listen: ':1', cluster: a, bogus: 1}]\n", "tcp_proxies[0].bogus: Extra inputs"),
])
def test_config_file_tcp_proxy_errors(tmp_path: Path, text: str, error: str) -> None:
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value).startswith(str(cfg)) and error in str(e.value)


def test_held_bytes_over_the_limit_stop_reading(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                logs: pytest.LogCaptureFixture) -> None:
    from wasmgate.proxy.server import Limits

    plugin = wasmplugin_yaml(tmp_path, "netfilter", NETFILTER, plugin_type="NETWORK")
    p = ProxyThread([plugin], upstream.url, clusters={"echo": f"127.0.0.1:{echo.port}"},
                    tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}], limits=Limits(max_buffered_body=1000))
    try:
        got = tcp_session(port(p), [("send", b"hold:" + b"x" * 3000), ("send", b"release"), ("recv",)], timeout=1)
        lines = plugin_lines(logs, until="never", timeout=0.5)
    finally:
        p.stop()
    assert got == ["timeout"]  # the plugin never saw "release": the client was no longer read
    sizes = [int(m.group(1)) for line in lines if (m := re.search(r"on_downstream_data ctx=N size=(\d+)", line))]
    assert sizes and all(s <= 3005 for s in sizes) and sizes[-1] > 1000


# ---- fail strategies and limits ------------------------------------------------------------

_SPIN = """
  (func (export "proxy_on_new_connection") (param i32) (result i32) (i32.const 0))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever)) (i32.const 0))
"""


def test_cpu_deadline_applies_to_network_plugins(tmp_path: Path, echo: TcpEcho, upstream: Upstream) -> None:
    from wat_util import module_wat, write_module

    wasm = write_module(tmp_path, module_wat().rstrip().removesuffix(")") + _SPIN + ")", "spin.wasm")
    resource = tmp_path / "spin.yaml"
    resource.write_text(json.dumps({
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": "spin", "annotations": {"wasmgate.io/callback-deadline-ms": "50"}},
        "spec": {"url": f"file://{wasm}", "type": "NETWORK"}}))
    p = ProxyThread([resource], upstream.url, clusters={"echo": f"127.0.0.1:{echo.port}"},
                    tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}])
    try:
        started = time.monotonic()
        got = tcp_session(port(p), [("send", b"x"), ("eof",)], pause=0)
        elapsed = time.monotonic() - started
        handle = p.running.app.chain.plugins[0]
        described = handle.describe()
    finally:
        p.stop()
    assert got[0][0] in ("eof", "reset") and got[0][1] == b""  # type: ignore[index]
    assert elapsed < 2.5
    assert described["last_error"] == "proxy_on_downstream_data: CPU deadline exceeded (50 ms)"
    assert (described["state"], described["failed_streams"]) == ("failed", 1)


def test_fail_reload_serves_new_connections_with_a_fresh_vm(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                            logs: pytest.LogCaptureFixture) -> None:
    p = start(tmp_path, echo, upstream, fail_strategy="FAIL_RELOAD")
    try:
        got = tcp_session(port(p), [("send", b"trap:"), ("eof",)])
        handle = p.running.app.chain.plugins[0]
        deadline = time.monotonic() + 10
        while handle.reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = tcp_session(port(p), [("send", b"upper:ok"), ("recv",), ("shut",), ("eof",)])
    finally:
        p.stop()
    assert got[0][0] in ("eof", "reset")  # type: ignore[index]
    assert handle.reloads == 1
    assert again == [b"UPPER:OK", ("eof", b"")]
    assert "on_context_create ctx=N parent=1" in plugin_lines(logs)[3:]  # the new VM's first connection


def test_live_swap_keeps_open_connections_on_their_vm(tmp_path: Path, echo: TcpEcho, upstream: Upstream,
                                                      logs: pytest.LogCaptureFixture) -> None:
    import socket

    d = tmp_path / "plugins"
    d.mkdir()

    def resource(plugin_name: str) -> None:
        (d / "netfilter.yaml").write_text(json.dumps({
            "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "netfilter"},
            "spec": {"url": f"file://{NETFILTER}", "pluginName": plugin_name, "type": "NETWORK"}}))

    resource("netfilter")
    p = ProxyThread([d], upstream.url, clusters={"echo": f"127.0.0.1:{echo.port}"},
                    tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}])
    try:
        old = socket.create_connection(("127.0.0.1", port(p)), timeout=5)
        old.sendall(b"before")
        assert old.recv(100) == b"before"
        watcher = p.running.watcher
        assert watcher is not None
        applied = watcher.applied
        resource("v2")  # a new root id: the new VM's lines say [v2]
        deadline = time.monotonic() + 10
        while watcher.applied == applied and time.monotonic() < deadline:
            time.sleep(0.02)
        assert tcp_session(port(p), [("send", b"new"), ("recv",), ("shut",), ("eof",)]) == [b"new", ("eof", b"")]
        old.sendall(b"after")
        assert old.recv(100) == b"after"
        old.shutdown(socket.SHUT_WR)
        assert old.recv(100) == b""
        old.close()
        lines = plugin_lines(logs, until="never", timeout=1)
    finally:
        p.stop()
    assert 'on_downstream_data ctx=N size=5 eos=0 data="after" upstream=ADDR' in lines  # the old VM, untagged
    assert '[v2] on_downstream_data ctx=N size=3 eos=0 data="new" upstream=ADDR' in lines
    assert not any(line.startswith("[v2]") and "after" in line for line in lines)
    assert lines.count("on_delete ctx=N") == 1 and lines.count("[v2] on_delete ctx=N") == 1
