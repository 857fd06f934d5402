"""Hostile plugins: the proxy stays up and answers as each fail strategy says."""

from __future__ import annotations

import http.client
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import hostile
from servers import ProxyThread, Upstream
from test_e2e import request


def resource(directory: Path, name: str, wasm: Path, strategy: str, **annotations: str) -> Path:
    doc = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
           "metadata": {"name": name, "annotations": {f"wasmgate.io/{k.replace('_', '-')}": v
                                                      for k, v in annotations.items()}},
           "spec": {"url": f"file://{wasm}", "failStrategy": strategy}}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return path


def plugin_info(p: ProxyThread) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/plugins", timeout=10) as r:
        return dict(json.loads(r.read())["plugins"][0])


def stats(p: ProxyThread) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/stats", timeout=10) as r:
        return str(r.read().decode())


LIMITS = {"callback_deadline_ms": "100", "max_memory_bytes": str(4 << 20)}

# action -> (expected status under FAIL_CLOSE, under FAIL_OPEN, VM state afterwards)
REQUEST_CASES = {
    "trap": (503, 200, "failed"),
    "loop": (503, 200, "failed"),
    "bomb": (503, 200, "failed"),
    "exit": (503, 200, "failed"),
    "oob": (200, 200, "running"),
    "log": (200, 200, "running"),
    "reenter": (200, 200, "running"),
}


@pytest.mark.parametrize("strategy", ["FAIL_CLOSE", "FAIL_OPEN"])
@pytest.mark.parametrize("action", sorted(REQUEST_CASES))
def test_hostile_request_callback(upstream: Upstream, tmp_path: Path, action: str, strategy: str) -> None:
    wasm = hostile.write(tmp_path, action)
    proxy = ProxyThread([resource(tmp_path, action, wasm, strategy, **LIMITS)], upstream.url)
    try:
        started = time.monotonic()
        status, _, _ = request(proxy.port)
        elapsed = time.monotonic() - started
        after, _, _ = request(proxy.port)  # the proxy is still up and still applies the strategy
        info = plugin_info(proxy)
    finally:
        proxy.stop()
    close, open_, state = REQUEST_CASES[action]
    expected = close if strategy == "FAIL_CLOSE" else open_
    assert (status, after) == (expected, expected)
    assert info["state"] == state
    assert elapsed < 5  # the CPU deadline stops the infinite loop
    if action == "loop":
        assert "CPU deadline exceeded (100 ms)" in info["last_error"]
    if action == "exit":
        assert "proc_exit(7)" in info["last_error"]


# callback -> what the client sees under FAIL_CLOSE for the request during which it traps
CALLBACK_CASES = {
    "proxy_on_context_create": 503,
    "proxy_on_request_headers": 503,
    "proxy_on_request_body": 503,
    "proxy_on_response_headers": 503,
    "proxy_on_response_body": None,  # headers already sent: the stream is reset
    "proxy_on_log": 200,  # the response was complete; the VM fails after
    "proxy_on_done": 200,
    "proxy_on_delete": 200,
}


@pytest.mark.parametrize("callback", sorted(CALLBACK_CASES))
def test_trap_in_each_stream_callback(upstream: Upstream, tmp_path: Path, callback: str) -> None:
    wasm = hostile.write(tmp_path, "trap", callback)
    proxy = ProxyThread([resource(tmp_path, "p", wasm, "FAIL_CLOSE")], upstream.url)
    try:
        status: int | None
        try:
            status, _, _ = request(proxy.port, "POST", "/", {}, b"body")
        except (http.client.HTTPException, ConnectionError):
            status = None
        after, _, _ = request(proxy.port)
        info = plugin_info(proxy)
    finally:
        proxy.stop()
    assert status == CALLBACK_CASES[callback]
    assert after == 503
    assert info["state"] == "failed"
    assert callback in info["last_error"]
    assert info["errors"] == 1  # trapped, logged and counted once


def test_trap_in_tick_fails_vm(upstream: Upstream, tmp_path: Path) -> None:
    wasm = hostile.write(tmp_path, "trap", "proxy_on_tick")
    for strategy, expected in (("FAIL_CLOSE", 503), ("FAIL_OPEN", 200)):
        proxy = ProxyThread([resource(tmp_path, "ticker", wasm, strategy)], upstream.url)
        try:
            deadline = time.monotonic() + 5
            while plugin_info(proxy)["state"] != "failed" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert request(proxy.port)[0] == expected
            assert "proxy_on_tick" in plugin_info(proxy)["last_error"]
        finally:
            proxy.stop()


@pytest.mark.parametrize("callback", ["proxy_on_vm_start", "proxy_on_configure"])
def test_trap_at_start_refuses_plugin(tmp_path: Path, callback: str) -> None:
    from wasmgate.app import StartupError, load_chain

    wasm = hostile.write(tmp_path, "trap", callback)
    with pytest.raises(StartupError, match=f"plugin p: {callback}: wasm trap"):
        load_chain([resource(tmp_path, "p", wasm, "FAIL_OPEN")])


def test_fail_reload_gives_fresh_vm_then_stops_a_crash_loop(upstream: Upstream, tmp_path: Path) -> None:
    wasm = hostile.write(tmp_path, "trap")
    proxy = ProxyThread([resource(tmp_path, "reloader", wasm, "FAIL_RELOAD", reload_backoff_ms="20")],
                        upstream.url)
    try:
        statuses = []
        deadline = time.monotonic() + 20
        while plugin_info(proxy)["state"] != "crash-looping" and time.monotonic() < deadline:
            statuses.append(request(proxy.port)[0])
            time.sleep(0.01)
        info = plugin_info(proxy)
        assert request(proxy.port)[0] == 503
        text = stats(proxy)
    finally:
        proxy.stop()
    assert set(statuses) == {503}
    assert info["state"] == "crash-looping"
    assert info["reloads"] == 4  # 5 failures: the first VM and 4 reloads
    assert info["errors"] == 5
    assert 'wasmgate_plugin_errors_total{plugin="reloader"} 5.0' in text


def test_fail_reload_recovers(upstream: Upstream, tmp_path: Path) -> None:
    """A VM that fails once comes back fresh: a request later passes again."""
    wasm = hostile.write(tmp_path, "trap", "proxy_on_log")  # fails after answering
    proxy = ProxyThread([resource(tmp_path, "flaky", wasm, "FAIL_RELOAD", reload_backoff_ms="20")], upstream.url)
    try:
        assert request(proxy.port)[0] == 200  # answered; on_log traps; VM reloads
        deadline = time.monotonic() + 5
        while plugin_info(proxy)["reloads"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert request(proxy.port)[0] == 200  # served by the fresh VM
        assert plugin_info(proxy)["reloads"] >= 1
    finally:
        proxy.stop()


def test_memory_watchdog_recycles_leaking_vm(upstream: Upstream, tmp_path: Path) -> None:
    wasm = hostile.write(tmp_path, "leak")  # one 64 KiB page per request
    proxy = ProxyThread([resource(tmp_path, "leaky", wasm, "FAIL_CLOSE", memory_recycle_bytes=str(6 * 65536))],
                        upstream.url)
    try:
        statuses = [request(proxy.port)[0] for _ in range(20)]
        time.sleep(0.2)
        info = plugin_info(proxy)
        mem = [line for line in stats(proxy).splitlines() if line.startswith("wasmgate_plugin_memory_bytes")]
    finally:
        proxy.stop()
    assert set(statuses) == {200}
    assert info["recycles"] >= 2
    assert info["memory_bytes"] <= 6 * 65536 + 65536
    assert mem and float(mem[0].split()[-1]) == info["memory_bytes"]


def test_per_plugin_body_buffer_cap(upstream: Upstream, tmp_path: Path) -> None:
    wasm = hostile.write(tmp_path, "buffer")
    proxy = ProxyThread([resource(tmp_path, "hoarder", wasm, "FAIL_CLOSE", max_buffered_body_bytes="1000")],
                        upstream.url)
    try:
        small = request(proxy.port, "POST", "/", {}, b"x" * 500)  # buffered whole, then sent at end of stream
        big = request(proxy.port, "POST", "/", {}, b"x" * 4000)
        # The response headers went out before the body overflowed: the stream is reset.
        with pytest.raises(http.client.IncompleteRead):
            request(proxy.port, "GET", "/big/100000")
        info = plugin_info(proxy)
    finally:
        proxy.stop()
    assert small[0] == 200
    assert (big[0], big[2]) == (413, b"Payload Too Large")
    assert info["state"] == "running"  # over a buffer limit is not a VM failure
