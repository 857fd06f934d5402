"""Several worker processes: one listener, one admin API, shared data that is right across them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from envoy_harness import free_port
from servers import ALLOW_HEADER_YAML, PLUGIN_BUILD, TcpEcho, Upstream, tcp_session, wasmplugin_yaml
from test_e2e import request

WASMGATE = [sys.executable, "-m", "wasmgate"]


def admin_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return str(r.read().decode())


def ready(port: int) -> bool:
    try:
        return admin_get(port, "/ready") == "LIVE\n"
    except OSError:  # HTTPError 503 while a worker is missing, or not listening yet
        return False


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /stats")


@contextmanager
def workers(*args: str, count: int = 2) -> Iterator[tuple[int, int, subprocess.Popen[str]]]:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([*WASMGATE, "run", "--workers", str(count), "--listen", f"127.0.0.1:{port}",
                             "--admin", f"127.0.0.1:{admin}", *args], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not ready(admin):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        yield port, admin, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


def worker_pids(supervisor: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_two_workers_serve_and_report_together(upstream: Upstream) -> None:
    with workers("--plugins", str(ALLOW_HEADER_YAML), "--upstream", upstream.url) as (port, admin, proc):
        statuses = [request(port, headers={"allow": "true"} if i % 2 else {})[0] for i in range(40)]
        assert statuses == [403, 200] * 20
        stats = admin_get(admin, "/stats")
        assert metric(stats, "wasmgate_downstream_requests_total") == 40
        assert metric(stats, 'wasmgate_downstream_responses_total{code="403"}') == 20
        info = json.loads(admin_get(admin, "/plugins"))
        assert len(info["workers"]) == 2
        assert [p["state"] for w in info["workers"] for p in w["plugins"]] == ["running", "running"]
        assert len(worker_pids(proc.pid)) == 2


def test_shared_data_cas_is_exact_across_workers(upstream: Upstream, tmp_path: Path) -> None:
    plugin = wasmplugin_yaml(tmp_path, "sharedstate", PLUGIN_BUILD / "sharedstate.wasm")
    with workers("--plugins", str(plugin), "--upstream", upstream.url) as (port, admin, _):
        # The first set of a missing key ignores CAS (as in Envoy), so two first writers
        # could both win: create the key before the race.
        _, headers, _ = request(port)
        results: list[int] = [int(headers["x-hits"])]

        def client() -> None:
            for _ in range(33):
                status, headers, _ = request(port)
                assert status == 200
                results.append(int(headers["x-hits"]))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        # every increment landed exactly once, whichever worker made it
        assert sorted(results) == list(range(1, 101))
        stats = admin_get(admin, "/stats")
        counter = [ln for ln in stats.splitlines() if ln.startswith("sharedstate_requests")]
        assert counter and float(counter[0].split()[-1]) == 100  # the plugin's counter, summed over workers


def test_tcp_proxy_in_every_worker(upstream: Upstream, tmp_path: Path) -> None:
    echo = TcpEcho()
    tcp_port = free_port()
    plugin = wasmplugin_yaml(tmp_path, "netfilter", PLUGIN_BUILD / "netfilter.wasm", plugin_type="NETWORK")
    try:
        with workers("--plugins", str(plugin), "--upstream", upstream.url, "--cluster", f"echo=127.0.0.1:{echo.port}",
                     "--tcp-proxy", f"127.0.0.1:{tcp_port}=echo") as (_, admin, _):
            for i in range(10):
                got = tcp_session(tcp_port, [("send", b"upper:%d" % i), ("recv",), ("shut",), ("eof",)], pause=0.05)
                assert got == [b"UPPER:%d" % i, ("eof", b"")]
            deadline = time.monotonic() + 10
            while True:  # the last close may still be on its way through a worker
                stats = admin_get(admin, "/stats")
                if metric(stats, "wasmgate_tcp_connections_active") == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert metric(stats, "wasmgate_tcp_connections_total") == 10
            assert metric(stats, "tcp_connections{}") == 10  # the plugin's counter, summed over workers
            assert metric(stats, "tcp_downstream_bytes{}") == 70
    finally:
        echo.close()


def test_crashed_worker_is_restarted(upstream: Upstream) -> None:
    with workers("--plugins", str(ALLOW_HEADER_YAML), "--upstream", upstream.url) as (port, admin, proc):
        victim = worker_pids(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)  # connections queued on the dead worker's socket are reset with it
        assert [request(port)[0] for _ in range(5)] == [403] * 5  # the other worker serves meanwhile
        deadline = time.monotonic() + 30
        while not (len(worker_pids(proc.pid)) == 2 and victim not in worker_pids(proc.pid)
                   and ready(admin)):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert [request(port, headers={"allow": "true"})[0] for _ in range(10)] == [200] * 10


def test_sigterm_stops_every_worker(upstream: Upstream) -> None:
    with workers("--plugins", str(ALLOW_HEADER_YAML), "--upstream", upstream.url) as (_, _, proc):
        pids = worker_pids(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
