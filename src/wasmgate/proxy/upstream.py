"""Upstream HTTP/1.1 client: a keep-alive connection pool per cluster."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import httptools

from wasmgate.proxy.batch import WriteBatch

_log: Final = logging.getLogger("wasmgate.upstream")
_lower: Final = bytes.lower  # called unbound: no method lookup per header


class Corkable(Protocol):
    """A downstream connection whose writes wait until ``uncork`` (see HttpConnection)."""

    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class ResponseHandler(Protocol):
    """Gets one response; header names come lower-cased."""

    def upstream_head(self, status: int, headers: list[tuple[bytes, bytes]], no_body: bool) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_end(self, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_failed(self, reason: str) -> None: ...
    def upstream_pause(self, paused: bool) -> None: ...
    def upstream_tunnel(self, data: bytes) -> None: ...


class Cluster:
    """A named upstream: ``http://host:port`` or ``https://host:port``.

    For https, ``tls`` is the client context (default: verify against the system CA
    store); the certificate must match the URL's host.
    """

    def __init__(self, name: str, url: str, *, connect_timeout: float = 5.0, max_idle: int = 64,
                 tls: ssl.SSLContext | None = None):
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream {name}: unsupported URL {url!r} (expected http(s)://host:port)")
        self.name = name
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.tls = tls or ssl.create_default_context()
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        # Set by the ProxyApp this cluster serves: request bytes then go out at the end of
        # the loop turn, with its other writes (proxy/batch.py). None: at once.
        self.batch: WriteBatch | None = None

    def acquire(self, ready: Callable[[UpstreamConnection | None, str], None]) -> None:
        """Call ``ready(conn, "")`` with a pooled or new connection, or ``ready(None, why)``."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                ready(conn, "")
                return
        asyncio.get_running_loop().create_task(self._connect(ready))

    async def _connect(self, ready: Callable[[UpstreamConnection | None, str], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls,
                                       server_hostname=self.host if self.tls is not None else None),
                self.connect_timeout)
        except (TimeoutError, OSError) as e:
            if isinstance(e, ssl.SSLError):
                why = f"TLS error: {e.reason or e}"
            else:
                why = "connection timeout" if isinstance(e, asyncio.TimeoutError) else (e.strerror or str(e))
            ready(None, f"connection failure: {why}")
            return
        ready(proto, "")

    def release(self, conn: UpstreamConnection) -> None:
        if conn.usable() and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


class UpstreamConnection(asyncio.Protocol):
    """One connection; carries one request at a time for a ``ResponseHandler``."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)  # our end (the upstream.local_address attribute)
        self.handler: ResponseHandler | None = None
        self.downstream: Corkable | None = None  # corked while a response is parsed
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] = []
        self._in_body = False
        self._head_request = False
        self._head_done = False
        self._interim = False
        self._close_delimited = False
        self._reusable = True
        self._closed = False
        self._out: list[bytes] = []  # written, not yet sent (batched)
        self.tunnel = False  # after a 101: raw bytes both ways

    # ---- used by the exchange --------------------------------------------------------

    def usable(self) -> bool:
        return not self._closed and self._reusable and self.transport is not None \
            and not self.transport.is_closing()

    def start(self, handler: ResponseHandler, head_request: bool, downstream: Corkable | None = None) -> None:
        self.handler = handler
        self.downstream = downstream
        self._head_request = head_request
        self._headers = []
        self._trailers = []
        self._in_body = False
        self._head_done = False
        self._interim = False
        self._close_delimited = False

    def write(self, data: bytes) -> None:
        if self.transport is None or self._closed:
            return
        batch = self.cluster.batch
        if batch is None:
            self.transport.write(data)
            return
        out = self._out
        out.append(data)
        if len(out) == 1:
            batch.add(self)

    def flush(self) -> None:
        out = self._out
        if out and self.transport is not None and not self._closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def detach(self) -> None:
        self.handler = None
        self.downstream = None

    def close(self) -> None:
        self._closed = True
        self._reusable = False
        if self.transport is not None:
            self.transport.close()

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self._closed:
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        local = transport.get_extra_info("sockname")
        self.local = (local[0], local[1]) if local else ("", 0)

    def data_received(self, data: bytes) -> None:
        if self.handler is None:
            self.close()  # bytes nobody asked for: the connection is out of sync
            return
        if self.tunnel:
            self.handler.upstream_tunnel(data)
            return
        # What the response writes downstream during this call goes out in one send().
        downstream = self.downstream
        if downstream is not None:
            downstream.cork()
        try:
            self._feed(data)
        finally:
            if downstream is not None:
                downstream.uncork()

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # 101 Switching Protocols: from here on the bytes are the new protocol's.
            self.tunnel = True
            self._reusable = False
            rest = data[int(e.args[0]):] if e.args else b""
            if rest and self.handler is not None:
                self.handler.upstream_tunnel(rest)
            return
        except httptools.HttpParserError as e:
            handler, self.handler = self.handler, None
            self.close()
            if handler is not None:
                handler.upstream_failed(f"protocol error: {e}")
            return
        if self._head_done:  # a HEAD response has no body whatever its headers say
            self._parser = httptools.HttpResponseParser(self)
            self._head_done = False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.tunnel and self.handler is not None:
            tunneled, self.handler = self.handler, None
            tunneled.upstream_end([])  # the tunnel's upstream side closed
            return
        if self._close_delimited and self.handler is not None:
            self._finish()  # the body ran to EOF, which is how this response ends
            return
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.upstream_failed("connection termination")

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_pause(True)

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_pause(False)

    # ---- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        (self._trailers if self._in_body else self._headers).append((_lower(name), value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue and friends; the final response follows
            self._headers = []
            return
        self._in_body = True
        self._reusable = self._parser.should_keep_alive()
        no_body = self._head_request or status in (204, 304)
        framed = False
        for k, v in self._headers:
            if k == b"content-length":
                framed = True
                no_body = no_body or v.strip() == b"0"
            elif k == b"transfer-encoding":
                framed = True
        self._close_delimited = not no_body and not framed
        if self._close_delimited:
            self._reusable = False
        if self.handler is not None:
            self.handler.upstream_head(status, self._headers, no_body)
        if self._head_request:
            self._head_done = True
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self.handler is not None:
            self.handler.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._parser.get_status_code() == 101:
            return  # not the end: the connection becomes a tunnel
        if self._interim:
            self._interim = False
        elif not self._head_done:
            self._finish()

    def _finish(self) -> None:
        self._close_delimited = False
        self.downstream = None
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.upstream_end(self._trailers)
