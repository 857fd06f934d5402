"""proxy_http_call end to end: a paused request waits on a callout, then resumes or is answered."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml
from test_e2e import request


@pytest.fixture(scope="module")
def auth() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, auth: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    d = tmp_path_factory.mktemp("callout")
    p = ProxyThread([wasmplugin_yaml(d, "callout", PLUGIN_BUILD / "callout.wasm")], upstream.url,
                    clusters={"auth": auth.url})
    yield p
    p.stop()


def test_callout_allows_and_resumes(proxy: ProxyThread, upstream: Upstream, auth: Upstream) -> None:
    status, _, _ = request(proxy.port, path="/app", headers={"x-user": "alice"})
    assert status == 200
    assert auth.seen[-1].path == "/auth/alice"
    assert auth.seen[-1].header("host") == "auth.internal"
    assert upstream.seen[-1].path == "/app"
    assert upstream.seen[-1].header("x-auth") == "ok:alice"


def test_callout_denies(proxy: ProxyThread) -> None:
    status, _, body = request(proxy.port, headers={"x-user": "mallory"})
    assert (status, body) == (403, b"denied: 403\n")


def test_callout_timeout_reports_failure(proxy: ProxyThread) -> None:
    """As Envoy's async client: a timed-out call comes back as a 504 response."""
    status, _, body = request(proxy.port, headers={"x-user": "slow"})  # the plugin's timeout is 2 s
    assert (status, body) == (403, b"denied: 504\n")


def test_concurrent_callouts(proxy: ProxyThread, upstream: Upstream) -> None:
    results: dict[str, int] = {}

    def one(user: str) -> None:
        results[user] = request(proxy.port, path=f"/c/{user}", headers={"x-user": user})[0]

    users = [f"u{i}" for i in range(12)]
    threads = [threading.Thread(target=one, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert results == dict.fromkeys(users, 200)
    seen = {s.path: s.header("x-auth") for s in upstream.seen if s.path.startswith("/c/")}
    assert seen == {f"/c/{u}": f"ok:{u}" for u in users}


def test_no_callout_without_header(proxy: ProxyThread) -> None:
    assert request(proxy.port)[0] == 200


def test_unreachable_cluster(upstream: Upstream, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        p = ProxyThread([wasmplugin_yaml(tmp_path, "callout", PLUGIN_BUILD / "callout.wasm")], upstream.url,
                        clusters={"auth": f"http://127.0.0.1:{dead}"})
        try:
            status, _, body = request(p.port, headers={"x-user": "bob"})
        finally:
            p.stop()
    assert (status, body) == (403, b"denied: 503\n")  # a connect error is a 503 response, as in Envoy


def test_unknown_cluster_is_bad_argument(upstream: Upstream, tmp_path: Path) -> None:
    p = ProxyThread([wasmplugin_yaml(tmp_path, "callout", PLUGIN_BUILD / "callout.wasm")], upstream.url)
    try:
        status, _, body = request(p.port, headers={"x-user": "bob"})
    finally:
        p.stop()
    assert (status, body) == (500, b"callout error\n")
