"""Body length: when a plugin changes a body's size (proxy_set_buffer_bytes), what leaves
wasmgate is still valid HTTP/1.1, upstream and downstream.

The resize test plugin appends, prepends, replaces or shrinks bodies (buffered whole,
with the headers held or not, or chunk by chunk). A raw upstream and a raw client parse
every message strictly (framing, exact lengths, nothing left over on a kept-alive
connection). Envoy never fixes Content-Length (tests/test_envoy_diff.py compares the
cases where Envoy's answer is well-defined); see docs/abi-support.md, Body length.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from servers import PLUGIN_BUILD, ProxyThread, wasmplugin_yaml

RESIZE = PLUGIN_BUILD / "resize.wasm"
TAG = PLUGIN_BUILD / "tag.wasm"
UPSTREAM_BODY = b"hello world, this is the upstream"
REQUEST_BODY = b"0123456789"

EXPECTED: dict[str, Callable[[bytes], bytes]] = {  # what each operation makes of a body
    "append": lambda b: b + b"+appended",
    "prepend": lambda b: b"prepended+" + b,
    "replace": lambda b: b"replaced",
    "shrink": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
}


class BadMessage(Exception):
    pass


@dataclass
class Message:
    start: bytes  # request or status line
    headers: list[tuple[bytes, bytes]]
    body: bytes
    framing: str  # "length", "chunked" or "close"

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        if len(values) > 1:
            raise BadMessage(f"{name!r} repeated")
        return values[0] if values else None


class Reader:
    """Strict HTTP/1.1 message reading from a socket (RFC 9112 framing)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def message(self, *, response: bool = False, head_request: bool = False) -> Message:
        start = self._line()
        headers = []
        while line := self._line():
            k, sep, v = line.partition(b":")
            if not sep or k != k.strip():
                raise BadMessage(f"bad header line {line!r}")
            headers.append((k.lower(), v.strip()))
        msg = Message(start, headers, b"", "length")
        te, cl = msg.header(b"transfer-encoding"), msg.header(b"content-length")
        if te is not None and cl is not None:
            raise BadMessage("both transfer-encoding and content-length")
        status = int(start.split()[1]) if response else 0
        if head_request or status in (204, 304) or 100 <= status < 200:
            return msg
        if te is not None:
            if te.lower() != b"chunked":
                raise BadMessage(f"transfer-encoding {te!r}")
            msg.framing = "chunked"
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass  # trailers
                    return msg
                msg.body += self._exactly(size)
                if self._line() != b"":
                    raise BadMessage("chunk data longer than its size")
        if cl is not None:
            msg.body = self._exactly(int(cl))
            return msg
        if response:  # delimited by the connection's close
            msg.framing = "close"
            try:
                while True:
                    self._more()
            except EOFError:
                msg.body, self.buf = self.buf, b""
        return msg


@dataclass
class RawUpstream:
    """Parses every request strictly; answers with UPSTREAM_BODY (sent in two parts, 200 ms
    apart, for paths starting /split)."""

    sock: socket.socket = field(default_factory=socket.socket)
    seen: list[Message] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        reader = Reader(conn)
        with conn:
            while True:
                try:
                    msg = reader.message()
                except EOFError:
                    if reader.buf:
                        self.errors.append(f"connection closed inside a request: {reader.buf!r}")
                    return
                except (BadMessage, ValueError, TimeoutError) as e:
                    self.errors.append(f"{type(e).__name__}: {e} (left: {reader.buf[:80]!r})")
                    return
                self.seen.append(msg)
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(UPSTREAM_BODY)
                if msg.start.split()[1].startswith(b"/split"):
                    conn.sendall(head + UPSTREAM_BODY[:10])
                    time.sleep(0.2)
                    conn.sendall(UPSTREAM_BODY[10:])
                else:
                    conn.sendall(head + (b"" if msg.start.startswith(b"HEAD") else UPSTREAM_BODY))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    yield up
    up.close()


@pytest.fixture
def proxy(tmp_path: Path, raw_upstream: RawUpstream) -> Iterator[ProxyThread]:
    p = ProxyThread([wasmplugin_yaml(tmp_path, "resize", RESIZE)], raw_upstream.url)
    yield p
    p.stop()


def send(port: int, headers: dict[str, str], body: bytes = REQUEST_BODY, *, method: str = "POST",
         path: str = "/", parts: int = 1, version: str = "HTTP/1.1", repeat: int = 2) -> list[Message]:
    """``repeat`` requests on one connection (the body in ``parts`` sends, 200 ms apart);
    each response read strictly, so a wrong length shows as a broken next response."""
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        reader = Reader(s)
        for _ in range(repeat):
            lines = [f"{method} {path} {version}", "host: x", f"content-length: {len(body)}",
                     *(f"{k}: {v}" for k, v in headers.items())]
            s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            step = -(-len(body) // parts) if body else 1
            for i in range(0, len(body), step):
                if i:
                    time.sleep(0.2)
                s.sendall(body[i : i + step])
            msg = reader.message(response=True, head_request=method == "HEAD")
            out.append(msg)
            if msg.framing == "close":
                break
    return out


def check_upstream(up: RawUpstream, count: int) -> list[Message]:
    deadline = time.monotonic() + 5
    while len(up.seen) < count and not up.errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert up.errors == []
    assert len(up.seen) == count
    return up.seen


@pytest.mark.parametrize("op", sorted(EXPECTED))
@pytest.mark.parametrize("hold", [False, True])
def test_request_body_changed_whole_gets_its_exact_length(proxy: ProxyThread, raw_upstream: RawUpstream,
                                                          op: str, hold: bool) -> None:
    headers = {"x-resize-req": op, **({"x-resize-hold": "headers"} if hold else {})}
    responses = send(proxy.port, headers, parts=2)  # the plugin buffers it whole either way
    assert [r.body for r in responses] == [UPSTREAM_BODY] * 2
    for seen in check_upstream(raw_upstream, 2):
        assert seen.body == EXPECTED[op](REQUEST_BODY)
        assert (seen.framing, seen.header(b"content-length")) == ("length", str(len(seen.body)).encode())


def test_request_body_changed_while_streaming_goes_chunked(proxy: ProxyThread, raw_upstream: RawUpstream) -> None:
    # Chunk by chunk: the first chunk leaves before the body has ended, so its length is
    # unknown: chunked, whatever the client's content-length said.
    send(proxy.port, {"x-resize-req": "append", "x-resize-mode": "stream"}, parts=2)
    for seen in check_upstream(raw_upstream, 2):
        assert seen.framing == "chunked" and seen.header(b"content-length") is None
        assert seen.body == b"01234+appended56789+appended"


def test_request_body_arriving_whole_keeps_a_length(proxy: ProxyThread, raw_upstream: RawUpstream) -> None:
    # All of it in one read: framed with its (changed) length, not chunked.
    send(proxy.port, {"x-resize-req": "append", "x-resize-mode": "stream"})
    for seen in check_upstream(raw_upstream, 2):
        assert (seen.framing, seen.body) == ("length", b"0123456789+appended")
        assert seen.header(b"content-length") == b"19"


def test_plugin_without_body_callbacks_keeps_the_clients_length(tmp_path: Path, raw_upstream: RawUpstream) -> None:
    p = ProxyThread([wasmplugin_yaml(tmp_path, "tag", TAG, config={"tag": "t"})], raw_upstream.url)
    try:
        send(p.port, {}, parts=2)
    finally:
        p.stop()
    for seen in check_upstream(raw_upstream, 2):
        assert (seen.framing, seen.header(b"content-length"), seen.body) == ("length", b"10", REQUEST_BODY)


@pytest.mark.parametrize("op", sorted(EXPECTED))
@pytest.mark.parametrize("hold", [False, True])
def test_response_body_changed_whole_gets_its_exact_length(proxy: ProxyThread, op: str, hold: bool) -> None:
    headers = {"x-resize-resp": op, **({"x-resize-hold": "headers"} if hold else {})}
    for r in send(proxy.port, headers, path="/split"):  # the plugin buffers it whole either way
        assert r.start.startswith(b"HTTP/1.1 200")
        assert r.body == EXPECTED[op](UPSTREAM_BODY)
        assert (r.framing, r.header(b"content-length")) == ("length", str(len(r.body)).encode())


def test_response_body_changed_while_streaming_goes_chunked(proxy: ProxyThread) -> None:
    for r in send(proxy.port, {"x-resize-resp": "append", "x-resize-mode": "stream"}, path="/split"):
        assert r.framing == "chunked" and r.header(b"content-length") is None
        assert r.body == UPSTREAM_BODY[:10] + b"+appended" + UPSTREAM_BODY[10:] + b"+appended"


def test_response_arriving_whole_keeps_a_length(proxy: ProxyThread) -> None:
    for r in send(proxy.port, {"x-resize-resp": "prepend", "x-resize-mode": "stream"}):
        assert (r.framing, r.body) == ("length", b"prepended+" + UPSTREAM_BODY)


def test_streamed_response_to_http10_client_ends_at_close(proxy: ProxyThread) -> None:
    [r] = send(proxy.port, {"x-resize-resp": "append", "x-resize-mode": "stream"}, path="/split", version="HTTP/1.0")
    assert (r.framing, r.header(b"content-length"), r.header(b"transfer-encoding")) == ("close", None, None)
    assert r.body == UPSTREAM_BODY[:10] + b"+appended" + UPSTREAM_BODY[10:] + b"+appended"


def test_head_response_keeps_the_upstreams_length(proxy: ProxyThread) -> None:
    for r in send(proxy.port, {"x-resize-resp": "append"}, method="HEAD", body=b""):
        assert r.header(b"content-length") == str(len(UPSTREAM_BODY)).encode() and r.body == b""


def test_both_directions_at_once(proxy: ProxyThread, raw_upstream: RawUpstream) -> None:
    responses = send(proxy.port, {"x-resize-req": "shrink", "x-resize-resp": "replace", "x-resize-hold": "headers"},
                     parts=2, path="/split")
    assert [(r.framing, r.body) for r in responses] == [("length", b"replaced")] * 2
    assert [s.body for s in check_upstream(raw_upstream, 2)] == [b"01234"] * 2
