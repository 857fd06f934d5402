"""Real servers for end-to-end tests: a recording upstream and wasmgate in a thread."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvloop

from wasmgate.app import Running, RunOptions, start

REPO = Path(__file__).resolve().parents[1]
PLUGIN_BUILD = REPO / "tests" / "plugins" / "build"
ALLOW_HEADER_WASM = REPO / "examples" / "allow-header" / "plugin.wasm"
ALLOW_HEADER_YAML = REPO / "examples" / "allow-header" / "wasmplugin.yaml"


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    peer_port: int
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class Upstream:
    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)
    scheme: str = "http"

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        self.trailers: list[tuple[str, str]] = []
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while (line := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                        k, _, v = line.decode("latin-1").partition(":")
                        self.trailers.append((k.strip().lower(), v.strip()))
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self) -> None:
        body = self._body()
        seen = Seen(self.command, self.path, list(self.headers.items()), body, self.client_address[1],
                    self.trailers)
        self.server.upstream.seen.append(seen)
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.send_header("x-remove-me", "yes")
            self.end_headers()
            for part in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path.startswith("/big/"):
            n = int(self.path.split("/")[2])
            payload = bytes(i % 251 for i in range(n))
            self.send_response(200)
            self.send_header("content-length", str(n))
            self.end_headers()
            self.wfile.write(payload)
            return
        if self.path.startswith("/auth/"):  # a tiny auth service for callout tests
            user = self.path.split("/")[2]
            if user == "slow":
                time.sleep(3)
            reply = f"ok:{user}".encode()
            self.send_response(403 if user == "mallory" else 200)
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        if self.path.startswith("/slow/"):
            time.sleep(int(self.path.split("/")[2]) / 1000)
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2])
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        reply = json.dumps({"method": self.command, "path": self.path, "body_len": len(body)}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(reply)))
        self.send_header("x-remove-me", "yes")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


def start_upstream(tls: ssl.SSLContext | None = None) -> Upstream:
    """The recording upstream; with ``tls`` (a server context) it speaks HTTPS."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    if tls is not None:  # a failed handshake is an OSError the server drops
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    up = Upstream(server, scheme="https" if tls is not None else "http")
    server.upstream = up  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


class ProxyThread:
    """wasmgate running on uvloop in a background thread, on ephemeral ports."""

    def __init__(self, plugins: list[Path], upstream: str | None, **opts: Any):
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        options = RunOptions(listen="127.0.0.1:0", admin="127.0.0.1:0", upstream=upstream, plugins=plugins,
                             **opts)
        try:
            self.running: Running = self.call(start(options))
        except BaseException:
            self._shutdown()
            raise

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def admin_port(self) -> int:
        return self.running.admin_port

    def stop(self) -> None:
        self.call(self.running.stop(drain_seconds=2))
        self._shutdown()

    def _shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def wasmplugin_yaml(directory: Path, name: str, wasm: Path, *, config: Any = None, phase: str = "",
                    priority: int | None = None, fail_strategy: str = "", env: dict[str, str] | None = None,
                    annotations: dict[str, str] | None = None, plugin_type: str = "",
                    match: list[dict[str, Any]] | None = None) -> Path:
    """Write one WasmPlugin resource and return its path."""
    spec: dict[str, Any] = {"url": f"file://{wasm}", "pluginName": name}
    if plugin_type:
        spec["type"] = plugin_type
    if match is not None:
        spec["match"] = match
    if config is not None:
        spec["pluginConfig"] = config
    if phase:
        spec["phase"] = phase
    if priority is not None:
        spec["priority"] = priority
    if fail_strategy:
        spec["failStrategy"] = fail_strategy
    if env:
        spec["vmConfig"] = {"env": [{"name": k, "value": v} for k, v in env.items()]}
    metadata: dict[str, Any] = {"name": name}
    if annotations:
        metadata["annotations"] = annotations
    doc = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": metadata, "spec": spec}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps(doc))
    return path


def iter_lines(text: str, needle: str) -> Iterator[str]:
    return (ln for ln in text.splitlines() if needle in ln)


class EchoUpgrade:
    """An upstream that accepts any Upgrade with 101 and then echoes bytes, prefixed "echo:"."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.requests: list[bytes] = []
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
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            self.requests.append(head)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: echo\r\n"
                         b"x-upstream: yes\r\n\r\n")
            if rest:
                conn.sendall(b"echo:" + rest)
            while data := conn.recv(65536):
                conn.sendall(b"echo:" + data)

    def close(self) -> None:
        self.sock.close()


class TcpEcho:
    """A TCP echo upstream that records, per connection, every byte it received and
    whether the peer ended its stream. It closes a connection once the peer has, or
    (after answering) when it receives ``bye``."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.received: list[bytearray] = []  # per connection, in accept order
        self.ended: list[bool] = []  # the peer shut down its side (or closed)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.received.append(bytearray())
            self.ended.append(False)
            threading.Thread(target=self._serve, args=(conn, len(self.received) - 1), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    self.ended[index] = True
                    return
                self.received[index] += data
                try:
                    conn.sendall(data)
                except OSError:
                    return
                if b"bye" in data:
                    time.sleep(0.1)
                    return

    def close(self) -> None:
        self.sock.close()


Step = tuple[str, bytes] | tuple[str]


def tcp_session(port: int, steps: list[Step], *, pause: float = 0.2, timeout: float = 3.0) -> list[object]:
    """Run a scripted TCP client against ``port``; returns what each reading step saw.

    Steps: ``("send", data)`` (then waits ``pause`` so each send is read on its own),
    ``("recv",)`` one read (``"timeout"`` if nothing came), ``("shut",)`` shutdown of
    writing, ``("eof",)`` read to the end (``("eof", data)``, or ``("reset", data)``,
    ``("timeout", data)``), ``("close",)``.
    """
    seen: list[object] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        for step in steps:
            kind = step[0]
            if kind == "send":
                s.sendall(step[1])  # type: ignore[misc]
                time.sleep(pause)
            elif kind == "recv":
                try:
                    seen.append(s.recv(65536))
                except TimeoutError:
                    seen.append("timeout")
            elif kind == "shut":
                s.shutdown(socket.SHUT_WR)
            elif kind == "eof":
                data = b""
                try:
                    while chunk := s.recv(65536):
                        data += chunk
                    seen.append(("eof", data))
                except TimeoutError:
                    seen.append(("timeout", data))
                except ConnectionResetError:
                    seen.append(("reset", data))
            elif kind == "close":
                break
    return seen
