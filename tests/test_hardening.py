"""Downstream hardening: timeouts, slow clients, limits, graceful drain."""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import ALLOW_HEADER_YAML, ProxyThread, Upstream
from test_cli import WASMGATE, running
from test_e2e import request
from wasmgate.proxy.server import Limits


@pytest.fixture(scope="module")
def proxy(upstream: Upstream) -> Iterator[ProxyThread]:
    p = ProxyThread([ALLOW_HEADER_YAML], upstream.url,
                    limits=Limits(header_timeout=0.5, request_timeout=1.0, idle_timeout=0.5))
    yield p
    p.stop()


def read_all(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    s.settimeout(timeout)
    start = time.monotonic()
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out, time.monotonic() - start


def test_slowloris_headers_get_408(proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        for _ in range(3):
            time.sleep(0.2)
            try:
                s.sendall(b"x-slow: 1\r\n")  # never finishing the headers
            except OSError:
                break
        out, _ = read_all(s, 3)
    assert out.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in out


def test_many_slow_clients_do_not_block_others(proxy: ProxyThread) -> None:
    slow = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(50)]
    try:
        for s in slow:
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n")
        assert request(proxy.port, headers={"allow": "true"})[0] == 200
    finally:
        for s in slow:
            s.close()


def test_idle_keepalive_connection_closed(proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        out, waited = read_all(s, 5)
    assert out.startswith(b"HTTP/1.1 403 ")
    assert waited < 3  # closed by the idle timeout (0.5 s), not by our read timeout


def test_incomplete_body_gets_408(proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\nallow: true\r\ncontent-length: 100\r\n\r\nonly-some")
        out, _ = read_all(s, 5)
    assert out.startswith(b"HTTP/1.1 408 ")


def test_graceful_drain_on_sigterm_loses_no_request(upstream: Upstream) -> None:
    with running("--plugins", str(ALLOW_HEADER_YAML), "--upstream", upstream.url) as (port, proc):
        result: dict[str, int] = {}
        t = threading.Thread(target=lambda: result.update(
            status=request(port, path="/slow/800", headers={"allow": "true"})[0]))
        t.start()
        time.sleep(0.3)  # the request is at the upstream
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=10)
        assert proc.wait(timeout=20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert result == {"status": 200}


def test_config_rejects_bad_timeout(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("limits: {header_timeout: soon}\n")
    r = subprocess.run([*WASMGATE, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "limits.header_timeout" in r.stderr
