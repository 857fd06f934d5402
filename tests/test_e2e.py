"""End to end through real sockets: client -> wasmgate (+ Go plugins) -> real upstream."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import (
    ALLOW_HEADER_YAML,
    PLUGIN_BUILD,
    ProxyThread,
    Upstream,
    wasmplugin_yaml,
)


@pytest.fixture(scope="module")
def allow_proxy(upstream: Upstream) -> Iterator[ProxyThread]:
    p = ProxyThread([ALLOW_HEADER_YAML], upstream.url)
    yield p
    p.stop()


def request(port: int, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        out: dict[str, str] = {}
        for k, v in r.getheaders():  # repeated headers joined, as in one comma list
            out[k.lower()] = f"{out[k.lower()]}, {v}" if k.lower() in out else v
        return r.status, out, r.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, expect_close: bool = True, timeout: float = 5.0) -> bytes:
    """Send raw bytes; read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        if expect_close:
            assert time.monotonic() < deadline, "server did not close the connection"
        return out


# ---- the reference example -----------------------------------------------------------


def test_allow_header_denies_without_header(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    before = len(upstream.seen)
    status, headers, body = request(allow_proxy.port, headers={"x-probe": "deny"})
    assert status == 403
    assert body == b"access denied\n"
    assert headers["x-wasmgate-denied"] == "allow-header"
    assert headers["content-type"] == "text/plain"
    assert len(upstream.seen) == before  # never reached the upstream


@pytest.mark.parametrize("value", ["false", "TRUE", ""])
def test_allow_header_denies_other_values(allow_proxy: ProxyThread, value: str) -> None:
    status, _, _ = request(allow_proxy.port, headers={"allow": value})
    assert status == 403


def test_allow_header_allows_with_header(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    status, _, body = request(allow_proxy.port, path="/hello?x=1", headers={"allow": "true"})
    assert status == 200
    assert json.loads(body)["path"] == "/hello?x=1"
    seen = upstream.seen[-1]
    assert seen.header("allow") == "true"
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("host") == f"127.0.0.1:{allow_proxy.port}"


def test_keep_alive_reuses_connections(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", allow_proxy.port, timeout=10)
    ports = []
    for i in range(5):
        conn.request("GET", f"/k{i}", headers={"allow": "true"})
        r = conn.getresponse()
        assert r.status == 200
        r.read()
        ports.append(conn.sock.getsockname()[1])
        assert upstream.seen[-1].path == f"/k{i}"
    conn.request("GET", "/denied")
    r = conn.getresponse()
    assert r.status == 403
    r.read()
    ports.append(conn.sock.getsockname()[1])
    conn.close()
    assert len(set(ports)) == 1, "downstream connection was not kept alive"
    upstream_ports = {s.peer_port for s in upstream.seen[-5:]}
    assert len(upstream_ports) == 1, "upstream connection was not reused"


def test_pipelined_requests_answered_in_order(allow_proxy: ProxyThread) -> None:
    reqs = (b"GET /p1 HTTP/1.1\r\nhost: x\r\nallow: true\r\n\r\n"
            b"GET /p2 HTTP/1.1\r\nhost: x\r\n\r\n"
            b"POST /p3 HTTP/1.1\r\nhost: x\r\nallow: true\r\ncontent-length: 5\r\n\r\nhello"
            b"GET /p4 HTTP/1.1\r\nhost: x\r\nallow: true\r\nconnection: close\r\n\r\n")
    out = raw_exchange(allow_proxy.port, reqs)
    assert re.findall(rb"HTTP/1\.1 (\d{3})", out) == [b"200", b"403", b"200", b"200"]
    bodies = [json.loads(m) for m in re.findall(rb'\{"method".*?\}', out)]
    assert [(b["path"], b["body_len"]) for b in bodies] == [("/p1", 0), ("/p3", 5), ("/p4", 0)]


def test_chunked_request_and_response_stream_through(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    def gen() -> Iterator[bytes]:
        yield b"abc"
        yield b"defg"

    conn = http.client.HTTPConnection("127.0.0.1", allow_proxy.port, timeout=10)
    conn.request("POST", "/chunked", body=gen(), headers={"allow": "true"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 200
    assert r.getheader("transfer-encoding") == "chunked"
    assert r.read() == b"first,second,third"
    conn.close()
    assert upstream.seen[-1].body == b"abcdefg"
    assert upstream.seen[-1].header("transfer-encoding") == "chunked"


def test_large_bodies_stream_both_ways(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    payload = bytes(range(256)) * 16384  # 4 MiB, beyond any buffer limit: must stream
    status, _, _ = request(allow_proxy.port, "POST", "/upload", {"allow": "true"}, payload)
    assert status == 200
    assert upstream.seen[-1].body == payload
    status, headers, body = request(allow_proxy.port, "GET", f"/big/{3 << 20}", {"allow": "true"})
    assert status == 200
    assert headers["content-length"] == str(3 << 20)
    assert body == bytes(i % 251 for i in range(3 << 20))


def test_head_request(allow_proxy: ProxyThread) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", allow_proxy.port, timeout=10)
    for _ in range(2):  # the connection stays usable after a bodiless HEAD response
        conn.request("HEAD", "/h", headers={"allow": "true"})
        r = conn.getresponse()
        assert r.status == 200
        assert r.read() == b""
    conn.close()


# ---- errors ----------------------------------------------------------------------------


def test_malformed_request_gets_400(allow_proxy: ProxyThread) -> None:
    out = raw_exchange(allow_proxy.port, b"GARBAGE\x00 / HTTP/1.1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    out = raw_exchange(allow_proxy.port, b"GET / HTTP/1.1\r\ncontent-length: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")


def test_headers_too_large_gets_431(allow_proxy: ProxyThread) -> None:
    big = b"x-big: " + b"a" * 70000 + b"\r\n"
    out = raw_exchange(allow_proxy.port, b"GET / HTTP/1.1\r\nhost: x\r\n" + big + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(150))
    out = raw_exchange(allow_proxy.port, b"GET / HTTP/1.1\r\nhost: x\r\n" + many + b"\r\n")
    assert out.startswith(b"HTTP/1.1 431 ")


def test_proxy_survives_bad_input(allow_proxy: ProxyThread) -> None:
    raw_exchange(allow_proxy.port, b"\xff" * 1000)
    with socket.create_connection(("127.0.0.1", allow_proxy.port)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\nallow: true\r\ncontent-length: 100\r\n\r\nshort")
    status, _, _ = request(allow_proxy.port, headers={"allow": "true"})
    assert status == 200


def test_upstream_down_gives_503(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, never listening: connection refused
        proxy = ProxyThread([ALLOW_HEADER_YAML], f"http://127.0.0.1:{dead}")
        try:
            with caplog.at_level(logging.WARNING, logger="wasmgate.upstream"):
                status, _, body = request(proxy.port, headers={"allow": "true"})
                status2, _, _ = request(proxy.port)
        finally:
            proxy.stop()
    assert status == 503
    assert body.startswith(b"upstream connect error or disconnect/reset before headers. reset reason: ")
    assert status2 == 403  # the plugin still answers first
    assert [r for r in caplog.records if "unavailable" in r.getMessage()]


# ---- plugins: pause/resume, bodies, chains, lifecycle -----------------------------------


@pytest.fixture(scope="module")
def pause_proxy(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    d = tmp_path_factory.mktemp("pause")
    p = ProxyThread([wasmplugin_yaml(d, "pause", PLUGIN_BUILD / "pause.wasm")], upstream.url)
    yield p
    p.stop()


def test_pause_and_resume_from_timer(pause_proxy: ProxyThread, upstream: Upstream) -> None:
    status, _, _ = request(pause_proxy.port, headers={"x-pause": "1"})
    assert status == 200
    assert upstream.seen[-1].header("x-resumed") == "tick"
    status, _, _ = request(pause_proxy.port, path="/no-pause")
    assert status == 200
    assert upstream.seen[-1].header("x-resumed") is None


def test_paused_request_with_body_is_buffered_then_forwarded(pause_proxy: ProxyThread, upstream: Upstream) -> None:
    def gen() -> Iterator[bytes]:
        yield b"hello "
        time.sleep(0.05)
        yield b"world"

    conn = http.client.HTTPConnection("127.0.0.1", pause_proxy.port, timeout=10)
    conn.request("POST", "/body", body=gen(), headers={"x-pause": "1"}, encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()
    seen = upstream.seen[-1]
    assert seen.header("x-resumed") == "tick"
    assert seen.body == b"HELLO WORLD"  # buffered whole, then rewritten by the plugin


def test_body_buffered_and_rewritten(pause_proxy: ProxyThread, upstream: Upstream) -> None:
    status, _, _ = request(pause_proxy.port, "POST", "/cl", {}, b"content length body")
    assert status == 200
    assert upstream.seen[-1].body == b"CONTENT LENGTH BODY"
    assert upstream.seen[-1].header("content-length") == "19"


def test_request_buffer_limit_gives_413(upstream: Upstream, tmp_path: Path) -> None:
    from wasmgate.proxy.server import Limits

    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "pause", PLUGIN_BUILD / "pause.wasm")], upstream.url,
                        limits=Limits(max_buffered_body=1024))
    try:
        status, _, body = request(proxy.port, "POST", "/", {}, b"x" * 4096)
    finally:
        proxy.stop()
    assert status == 413
    assert body == b"Payload Too Large"


def test_chain_order_request_forward_response_reverse(upstream: Upstream, tmp_path: Path) -> None:
    tag = PLUGIN_BUILD / "tag.wasm"
    files = [
        wasmplugin_yaml(tmp_path, "c-stats", tag, config={"tag": "STATS"}, phase="STATS"),
        wasmplugin_yaml(tmp_path, "a-low", tag, config={"tag": "AUTHN-low"}, phase="AUTHN", priority=1),
        wasmplugin_yaml(tmp_path, "b-high", tag, config={"tag": "AUTHN-high"}, phase="AUTHN", priority=10),
        wasmplugin_yaml(tmp_path, "d-unspecified", tag, config={"tag": "LAST"}),
    ]
    proxy = ProxyThread(files, upstream.url)
    try:
        status, headers, _ = request(proxy.port)
    finally:
        proxy.stop()
    assert status == 200
    assert upstream.seen[-1].header_all("x-chain") == ["AUTHN-high", "AUTHN-low", "STATS", "LAST"]
    assert headers["x-chain-resp"] == "LAST, STATS, AUTHN-low, AUTHN-high"


def test_local_reply_goes_through_earlier_plugins_only(upstream: Upstream, tmp_path: Path) -> None:
    """Envoy: the sender and the plugins before it see the local reply's response headers."""
    tag = PLUGIN_BUILD / "tag.wasm"
    files = [
        wasmplugin_yaml(tmp_path, "first", tag, config={"tag": "first"}, phase="AUTHN", priority=5),
        wasmplugin_yaml(tmp_path, "allow", PLUGIN_BUILD.parent.parent.parent / "examples" / "allow-header"
                        / "plugin.wasm", phase="AUTHN", priority=3),
        wasmplugin_yaml(tmp_path, "after", tag, config={"tag": "after"}, phase="AUTHZ"),
    ]
    proxy = ProxyThread(files, upstream.url)
    try:
        status, headers, body = request(proxy.port)
    finally:
        proxy.stop()
    assert status == 403
    assert body == b"access denied\n"
    assert headers["x-chain-resp"] == "first"


def test_response_header_mutation(upstream: Upstream, tmp_path: Path) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "mutate", PLUGIN_BUILD / "mutate.wasm")], upstream.url)
    try:
        status, headers, _ = request(proxy.port, headers={"x-replace": "original"})
        status2, headers2, body2 = request(proxy.port, path="/chunked")
    finally:
        proxy.stop()
    assert status == 200
    assert headers["x-wasm"] == "hello"
    assert "x-remove-me" not in headers
    assert upstream.seen[-2].header("x-replace") == "replaced"
    assert status2 == 200 and headers2["x-wasm"] == "hello" and body2 == b"first,second,third"


def test_stream_lifecycle_order(upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "lifecycle", PLUGIN_BUILD / "lifecycle.wasm")], upstream.url)
    try:
        with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
            status, _, _ = request(proxy.port, "POST", "/", {}, b"12345")
            time.sleep(0.1)
    finally:
        proxy.stop()
    assert status == 200
    calls = [r.getMessage().split("lifecycle: ", 2)[-1].split()[0] for r in caplog.records
             if "ctx=2" in r.getMessage()]
    assert calls == ["on_context_create", "on_request_headers", "on_request_body", "on_request_body",
                     "on_response_headers", "on_response_body", "on_response_body", "on_log", "on_done",
                     "on_delete"]


def test_request_trailers_reach_plugin_and_upstream(upstream: Upstream, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "lifecycle", PLUGIN_BUILD / "lifecycle.wasm")], upstream.url)
    try:
        with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
            out = raw_exchange(proxy.port, b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
                               b"connection: close\r\n\r\n5\r\nhello\r\n0\r\nx-checksum: abc\r\n\r\n")
    finally:
        proxy.stop()
    assert out.startswith(b"HTTP/1.1 200 ")
    assert upstream.seen[-1].body == b"hello"
    assert upstream.seen[-1].trailers == [("x-checksum", "abc")]
    assert any("on_request_trailers ctx=2" in r.getMessage() for r in caplog.records)


def test_half_closed_client_still_gets_its_response(allow_proxy: ProxyThread) -> None:
    with socket.create_connection(("127.0.0.1", allow_proxy.port), timeout=5) as s:
        s.sendall(b"GET /half HTTP/1.1\r\nhost: x\r\nallow: true\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b'"path": "/half"' in out


@pytest.mark.parametrize(("version", "connection", "kept"), [
    ("1.1", None, True), ("1.1", "close", False), ("1.1", "keep-alive", True), ("1.1", "upgrade", True),
    ("1.0", None, False), ("1.0", "keep-alive", True), ("1.0", "close", False),
])
def test_http_version_and_connection_header(allow_proxy: ProxyThread, version: str, connection: str | None,
                                            kept: bool) -> None:
    """The response's version, its keep-alive and the 100 Continue follow each request's
    version and Connection header. The second request closes, so a kept connection
    answers both and a closed one only the first."""
    head = f"POST /v HTTP/{version}\r\nhost: x\r\nallow: true\r\ncontent-length: 2\r\nexpect: 100-continue\r\n"
    if connection is not None:
        head += f"connection: {connection}\r\n"
    out = raw_exchange(allow_proxy.port, (head + "\r\nhi").encode()
                       + b"GET /second HTTP/1.1\r\nhost: x\r\nallow: true\r\nconnection: close\r\n\r\n")
    responses = [r for r in out.split(b"HTTP/1.")[1:] if not r.startswith(b"1 100 ")]
    assert out.startswith(f"HTTP/{version} 200 ".encode() if version == "1.0" else b"HTTP/1.1 100 Continue\r\n\r\n")
    assert len(responses) == (2 if kept else 1)
    if version == "1.0":
        assert responses[0].startswith(b"0 200 ")
        assert (b"connection: keep-alive\r\n" in responses[0]) == kept
    else:
        assert responses[0].startswith(b"1 200 ")
        assert (b"connection: close\r\n" in responses[0]) == (not kept)


def test_expect_100_continue_answered_by_the_proxy(allow_proxy: ProxyThread, upstream: Upstream) -> None:
    with socket.create_connection(("127.0.0.1", allow_proxy.port), timeout=5) as s:
        s.sendall(b"POST /upload HTTP/1.1\r\nhost: x\r\nallow: true\r\ncontent-length: 5\r\n"
                  b"expect: 100-continue\r\n\r\n")
        interim = s.recv(65536)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # before any body was sent
        s.sendall(b"hello")
        final = s.recv(65536)
    assert final.startswith(b"HTTP/1.1 200 ")
    assert upstream.seen[-1].body == b"hello"
    assert upstream.seen[-1].header("expect") is None
