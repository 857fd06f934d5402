"""The admin API: /ready, /stats, /logging, /plugins."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from servers import ALLOW_HEADER_YAML, ProxyThread, Upstream
from test_e2e import request


@pytest.fixture
def proxy(upstream: Upstream) -> Iterator[ProxyThread]:
    p = ProxyThread([ALLOW_HEADER_YAML], upstream.url)
    yield p
    p.stop()


def admin(p: ProxyThread, path: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{p.admin_port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /stats")


def test_ready(proxy: ProxyThread) -> None:
    assert admin(proxy, "/ready") == (200, "LIVE\n")


def test_stats_count_requests_responses_and_plugin_calls(proxy: ProxyThread) -> None:
    request(proxy.port)
    request(proxy.port)
    request(proxy.port, headers={"allow": "true"})
    status, text = admin(proxy, "/stats")
    assert status == 200
    assert metric(text, "wasmgate_downstream_requests_total") == 3
    assert metric(text, 'wasmgate_downstream_responses_total{code="403"}') == 2
    assert metric(text, 'wasmgate_downstream_responses_total{code="200"}') == 1
    # start: _initialize, root context_create, configure; per request: context_create,
    # request_headers (the plugin exports no other stream callbacks)
    assert metric(text, 'wasmgate_plugin_calls_total{plugin="allow-header"}') == 3 + 3 * 2
    assert metric(text, 'wasmgate_plugin_errors_total{plugin="allow-header"}') == 0
    assert metric(text, 'wasmgate_plugin_call_seconds_total{plugin="allow-header"}') > 0
    assert metric(text, 'wasmgate_plugin_memory_bytes{plugin="allow-header"}') > 65536
    assert metric(admin(proxy, "/stats/prometheus")[1], "wasmgate_downstream_requests_total") == 3


def test_logging_wasm_debug_at_runtime(proxy: ProxyThread, caplog: pytest.LogCaptureFixture) -> None:
    def plugin_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.name == "wasmgate.wasm" and "denied request" in r.getMessage()]

    with caplog.at_level(logging.NOTSET):
        logging.getLogger("wasmgate.wasm").setLevel(logging.INFO)
        request(proxy.port)
        assert plugin_lines() == []
        status, text = admin(proxy, "/logging?wasm=debug", "POST")
        assert status == 200 and "wasm: debug" in text
        request(proxy.port)
        lines = plugin_lines()
        assert len(lines) == 1
        assert lines[0].startswith("wasm log allow-header allow-header: ")  # names the plugin
        assert [r.levelname for r in caplog.records if "denied request" in r.getMessage()] == ["DEBUG"]
        assert admin(proxy, "/logging?wasm=info", "POST")[0] == 200
        request(proxy.port)
        assert len(plugin_lines()) == 1
    assert admin(proxy, "/logging?wasm=loud", "POST")[0] == 400
    assert admin(proxy, "/logging?nosuch=debug", "POST")[0] == 400
    assert "wasm: info" in admin(proxy, "/logging")[1]


def test_plugins_lists_sha_abi_and_state(proxy: ProxyThread) -> None:
    import hashlib

    status, text = admin(proxy, "/plugins")
    assert status == 200
    (p,) = json.loads(text)["plugins"]
    wasm = ALLOW_HEADER_YAML.parent / "plugin.wasm"
    assert p["name"] == "allow-header"
    assert p["sha256"] == hashlib.sha256(wasm.read_bytes()).hexdigest()
    assert p["abi_version"] == "0.2.1"
    assert p["state"] == "running"
    assert p["phase"] == "AUTHN"
    assert p["fail_strategy"] == "FAIL_CLOSE"
    assert p["last_error"] is None


def test_unknown_admin_path(proxy: ProxyThread) -> None:
    assert admin(proxy, "/nope")[0] == 404
