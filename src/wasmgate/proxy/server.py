"""The downstream side: one asyncio Protocol per client connection.

httptools parses; each request becomes an ``Exchange``. Requests on one
connection are answered in order, so pipelining clients are safe: a request that
arrives while another is in flight waits, with its body held, until its turn.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

import httptools

from wasmgate.headers import Pair
from wasmgate.proxy import http
from wasmgate.proxy.batch import WriteBatch
from wasmgate.proxy.exchange import Exchange

if TYPE_CHECKING:
    from wasmgate.plugin.manager import Chain, PluginHandle, PluginManager
    from wasmgate.proxy.upstream import Cluster

_log: Final = logging.getLogger("wasmgate.http")


@dataclass
class Limits:
    """Envoy's defaults for sizes: 60 KiB of request headers, 100 headers, 1 MiB buffers.

    Timeouts (seconds, 0 = none): ``header_timeout`` bounds reading a request's line
    and headers (slowloris; 408), ``request_timeout`` reading the whole request (408),
    ``idle_timeout`` a keep-alive connection with no request.
    """

    max_header_bytes: int = 60 * 1024
    max_headers: int = 100
    max_buffered_body: int = 1024 * 1024
    header_timeout: float = 10.0
    request_timeout: float = 0.0
    idle_timeout: float = 60.0


@dataclass
class ProxyStats:
    requests: int = 0
    upstream_failures: int = 0
    downstream_errors: dict[int, int] = field(default_factory=dict)
    active_connections: int = 0
    # Responses by status (0: none sent): one counter per status below 1000, indexed,
    # so counting a response boxes no key and hashes nothing; the rest in a dict.
    _counts: list[int] = field(default_factory=lambda: [0] * 1000)
    _other: dict[int, int] = field(default_factory=dict)

    def response(self, status: int) -> None:
        if 0 <= status < 1000:
            self._counts[status] += 1
        else:
            self._other[status] = self._other.get(status, 0) + 1

    @property
    def responses(self) -> dict[int, int]:
        """Responses by status, statuses never sent left out."""
        counts = {status: n for status, n in enumerate(self._counts) if n}
        counts.update(self._other)
        return counts


class ProxyApp:
    """What every connection shares: the plugin chain, the upstream, limits, stats,
    and the listener's TLS context (None: plain HTTP)."""

    def __init__(self, plugins: PluginManager, cluster: Cluster, limits: Limits | None = None,
                 tls: ssl.SSLContext | None = None):
        self.plugins = plugins
        self.cluster = cluster
        self.limits = limits or Limits()
        self.tls = tls
        self.scheme = b"https" if tls is not None else b"http"  # :scheme and x-forwarded-proto
        self.stats = ProxyStats()
        self.connections: set[HttpConnection] = set()
        self.loop: asyncio.AbstractEventLoop | None = None  # looked up once (a getpid() a lookup)
        self.batch = WriteBatch()  # downstream and upstream writes of one loop turn
        if cluster.batch is None:
            cluster.batch = self.batch
        self.http_plugins: list[PluginHandle] = plugins.chain.http  # a new request starts on these
        plugins.on_swap.append(self._swapped)

    def _swapped(self, chain: Chain) -> None:
        self.http_plugins = chain.http  # a swap takes effect for the next request

    @property
    def chain(self) -> Chain:
        return self.plugins.chain

    def defer(self, fn: Callable[[], None]) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        self.loop.call_soon(fn)

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)


class _Pending:
    """A pipelined request waiting for its turn, with the body events it received."""

    __slots__ = ("exchange", "events")

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.events: list[bytes | list[Pair]] = []  # body chunks, then the trailers at the end


_connection_ids: Final = itertools.count(1)
_NO_TRAILERS: Final[list[Pair]] = []  # shared by requests without trailers (most): never appended to


_lower: Final = bytes.lower  # called unbound: no method lookup per header


def _no_write(data: bytes) -> None:
    pass


def _closed() -> bool:
    return True  # no transport yet


def next_connection_id() -> int:
    """Envoy's connection ids: one sequence per process, for HTTP and TCP listeners alike."""
    return next(_connection_ids)


# HttpConnection._deadline_of: which timeout the connection's deadline is.
_NO_DEADLINE: Final = 0
_HEADER_DEADLINE: Final = 1  # reading a request's line and headers (408), or idle before its first byte
_REQUEST_DEADLINE: Final = 2  # reading the whole request (408)
_IDLE_DEADLINE: Final = 3  # a keep-alive connection with no request


class HttpConnection(asyncio.Protocol):
    def __init__(self, app: ProxyApp):
        self.app = app
        self.id = next(_connection_ids)  # Envoy's connection.id
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.peer_ip_bytes = b""
        self.peer: tuple[str, int] = ("", 0)
        self.local: tuple[str, int] = ("", 0)
        self.closing = False
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[Pair] = []
        self._trailers: list[Pair] = _NO_TRAILERS  # a list of its own once a trailer comes
        self._header_bytes = 0
        self._in_body = False
        self._too_large = False
        self._active: Exchange | None = None
        self._active_complete = False  # the active request was read to its end
        self._queue: deque[_Pending] = deque()
        self._receiving: _Pending | Exchange | None = None  # where body events go
        self._read_paused_by: set[str] = set()
        # One lazy timer per connection: arming only moves the deadline; the timer, when
        # it fires early, re-arms itself for what is left (see _arm).
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._deadline_of = _NO_DEADLINE  # whose deadline: a constant below (no bound method per arming)
        limits = app.limits
        self._timer_step = min((t for t in (limits.header_timeout, limits.request_timeout, limits.idle_timeout)
                                if t > 0), default=0.0)
        self._max_header_bytes = limits.max_header_bytes
        self._max_headers = limits.max_headers
        self._out: list[bytes] = []  # written, not yet sent
        self._queued = False  # in the app's write batch
        self._corked = 0  # inside an event handler: its writes are queued when it returns
        self._loop = loop = asyncio.get_running_loop()  # once: each lookup costs a getpid() syscall
        # Bound once: a by-name method call looks the method up each time.
        self._now = loop.time
        self._get_method = self._parser.get_method
        self._should_keep_alive = self._parser.should_keep_alive
        self._write: Callable[[bytes], object] = _no_write
        self._write_closed: Callable[[], bool] = _closed
        self._tunnel: Exchange | None = None  # an upgraded (e.g. WebSocket) exchange
        self._reading_head = False  # between a request's first byte and its last header
        self._last_read = False  # a request that closes the connection was read to its end
        self.draining = False

    # ---- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._write = self.transport.write
        self._write_closed = self.transport.is_closing
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        self.local = (local[0], local[1]) if local else ("", 0)
        self.peer_ip = self.peer[0]
        self.peer_ip_bytes = self.peer_ip.encode()
        self.app.connections.add(self)
        self.app.stats.active_connections += 1
        self._arm(self.app.limits.header_timeout, _HEADER_DEADLINE)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self._tunnel is not None:
            self._tunnel.tunnel_from_client(data)
            return
        self._corked += 1
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            rest = data[int(e.args[0]):] if e.args else b""
            active = self._active
            if active is not None and active.upgrade_ok:
                self._tunnel = active  # from here on, bytes for the upgraded protocol
                if rest:
                    active.tunnel_from_client(rest)
            else:
                self.draining = True  # upgrade refused: answer the request, then close
        except httptools.HttpParserError as e:
            cause = e.__context__
            if self._last_read and cause is None:
                # Bytes after a request that closes the connection (llhttp refuses them): not
                # processed (RFC 9112 9.6), while that request is still answered, as Envoy does.
                self.pause_reading(True, "closing")
            elif self._too_large:
                self._reject(431, b"Request Header Fields Too Large")
            elif cause is not None and not isinstance(cause, httptools.HttpParserError):
                # Raised by our own handling of the request, not by its bytes: a bug to see.
                _log.error("internal error handling a request from %s", self.peer_ip, exc_info=cause)
                self._reject(500, b"Internal Server Error")
            else:
                _log.debug("bad request from %s: %s", self.peer_ip, e)
                self._reject(400, b"Bad Request")
        finally:
            self.uncork()

    def eof_received(self) -> bool:
        """The client half-closed: answer what it sent, then close."""
        self.flush()  # a response finished this loop turn is still only queued
        if self._active is None and not self._queue:
            return False  # nothing to answer: let the transport close
        self.draining = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._arm(0, _NO_DEADLINE)
        self.app.connections.discard(self)
        self.app.stats.active_connections -= 1
        active, self._active = self._active, None
        if active is not None:
            active.abort("downstream connection closed")
        self._queue.clear()

    def pause_writing(self) -> None:
        ex = self._active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading(True)

    def resume_writing(self) -> None:
        ex = self._active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading(False)

    # ---- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._active is None:
            self._arm(self.app.limits.header_timeout, _HEADER_DEADLINE)
        self._reading_head = True
        self._url = b""
        self._headers = []
        self._trailers = _NO_TRAILERS
        self._header_bytes = 0
        self._in_body = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self.app.limits.max_header_bytes:
            self._too_large = True
            raise httptools.HttpParserError("request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            trailers = self._trailers
            if trailers is _NO_TRAILERS:
                trailers = self._trailers = []
            trailers.append((name, value))
            return
        headers = self._headers
        headers.append((_lower(name), value))  # lower-cased once, here
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > self._max_header_bytes or len(headers) > self._max_headers:
            self._too_large = True
            raise httptools.HttpParserError("headers too large")

    def on_headers_complete(self) -> None:
        self._reading_head = False
        if self.app.limits.request_timeout > 0:
            self._arm(self.app.limits.request_timeout, _REQUEST_DEADLINE)
        else:
            self._deadline_of = _NO_DEADLINE  # the header timeout ends here; the lazy timer lets it go
        p = self._parser
        self._in_body = True
        self.app.stats.requests += 1
        method = self._get_method()
        req = http.DownstreamRequest(self._headers, self.app.scheme, method, self._url)
        keep_alive = self._should_keep_alive()
        # Without Connection headers llhttp keeps exactly HTTP/1.1 alive (0.9, 1.0 and 2.0 are
        # the versions it also accepts): this spares formatting the version string per request.
        version = "1.1" if keep_alive and not req.has_connection else p.get_http_version()
        # Expect: 100-continue, as Envoy does by default: answer 100 ourselves and drop
        # Expect, so the client sends its body while plugins and the upstream see a plain request.
        if req.expect_continue and req.has_body and version == "1.1" and self._active is None:
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        upgrade = req.upgrade if req.upgrade is not None and p.should_upgrade() else None
        ex = Exchange(self, method, self._url, req, keep_alive=keep_alive, http10=version == "1.0",
                      upgrade=upgrade)
        if self._active is None:
            self._start(ex)
            self._receiving = ex
        else:
            pending = _Pending(ex)
            self._queue.append(pending)
            self._receiving = pending
            self.pause_reading(True, "pipeline")  # one request ahead is enough

    def on_body(self, body: bytes) -> None:
        target = self._receiving
        if isinstance(target, Exchange):
            target.request_body(body)
        elif target is not None:
            target.events.append(body)

    def on_message_complete(self) -> None:
        if self._deadline_of != _NO_DEADLINE and self._receiving is self._active:
            self._arm(0, _NO_DEADLINE)  # the whole request is in
        target, self._receiving = self._receiving, None
        trailers = self._trailers
        if target is not None and not (target if isinstance(target, Exchange) else target.exchange).keep_alive:
            self._last_read = True
        if isinstance(target, Exchange):
            if target is self._active:
                self._active_complete = True
            target.request_end(trailers)
        elif target is not None:
            target.events.append(trailers)

    # ---- used by Exchange ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``: what one loop turn writes goes out in one send(), at the
        turn's end (proxy/batch.py)."""
        if self.transport is None or self.closing:
            return
        self._out.append(data)
        if not self._corked and not self._queued:
            self._queued = True
            self.app.batch.add(self)

    def cork(self) -> None:
        """An event handler that may write to this connection starts (see uncork)."""
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        if not self._corked and self._out and not self._queued:
            self._queued = True
            self.app.batch.add(self)

    def flush(self) -> None:
        self._queued = False
        out = self._out
        if out and not self._write_closed():
            self._write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def pause_reading(self, paused: bool, reason: str = "upstream") -> None:
        if self.transport is None or self.closing or (not paused and not self._read_paused_by):
            return
        was = bool(self._read_paused_by)
        if paused:
            self._read_paused_by.add(reason)
        else:
            self._read_paused_by.discard(reason)
        now = bool(self._read_paused_by)
        if now and not was:
            self.transport.pause_reading()
        elif was and not now:
            self.transport.resume_reading()

    def current_request_complete(self, ex: Exchange) -> bool:
        return ex is not self._active or self._active_complete or not ex.has_body

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        if ex is not self._active:
            return
        self._active = None
        if self._read_paused_by:
            for reason in ("upstream", "connect"):  # back-pressure of the finished exchange
                self.pause_reading(False, reason)
        if not keep_alive or (self.draining and not self._queue):
            self._close()
        elif not self._queue:
            self._arm(self.app.limits.idle_timeout, _IDLE_DEADLINE)
        else:
            # Not from inside this exchange's callbacks: start the next one afresh.
            self._loop.call_soon(self._next)

    def _next(self) -> None:
        if self.closing or self._active is not None or not self._queue:
            return
        pending = self._queue.popleft()
        ex = pending.exchange
        self._start(ex)
        if self._receiving is pending:
            self._receiving = ex
        for event in pending.events:
            if isinstance(event, bytes):
                ex.request_body(event)
            else:
                if self._is_active(ex):  # (not `ex is self._active`: see wasmgate/compiled.py)
                    self._active_complete = True
                ex.request_end(event)
        if not self._queue:
            self.pause_reading(False, "pipeline")

    def _is_active(self, ex: Exchange) -> bool:
        return ex is self._active

    def _start(self, ex: Exchange) -> None:
        self._active = ex
        self._active_complete = False
        ex.start()

    # ---- errors ----------------------------------------------------------------------

    def _reject(self, status: int, body: bytes) -> None:
        """A protocol error: answer (if nothing was sent for this request yet) and close."""
        stats = self.app.stats
        stats.downstream_errors[status] = stats.downstream_errors.get(status, 0) + 1
        active = self._active
        if active is None or not active._response_started:
            stats.response(status)
            self.write(http.simple_response(status, body, close=True))
        if active is not None:
            active.abort("downstream protocol error")
        self._close()

    # ---- timeouts and drain ------------------------------------------------------------

    def _arm(self, seconds: float, which: int) -> None:
        """One deadline per connection: the phase it is in decides which (0: none).

        Cancelling and re-creating a loop timer several times a request is costly, so
        the timer is lazy: it is created only when none is pending or the new deadline
        comes before it, and when it fires before the deadline it re-arms itself, at
        most one shortest timeout ahead (so a later, shorter deadline never has to
        cancel it).
        """
        if seconds <= 0 or which == _NO_DEADLINE or self.closing:
            self._deadline_of = _NO_DEADLINE
            if self.closing and self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        deadline = self._now() + seconds
        self._deadline = deadline
        self._deadline_of = which
        if self._timer is None or deadline < self._timer_at:
            self._set_timer(deadline)

    def _set_timer(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        which = self._deadline_of
        if which == _NO_DEADLINE or self.closing:
            return
        now = self._now()
        if now < self._deadline:
            self._set_timer(min(self._deadline, now + self._timer_step))
            return
        self._deadline_of = _NO_DEADLINE
        if which == _HEADER_DEADLINE:
            self._header_timeout()
        elif which == _REQUEST_DEADLINE:
            self._request_timeout()
        else:
            self._close()  # idle

    def _header_timeout(self) -> None:
        if self._reading_head:
            self._reject(408, b"request header read timeout")  # Envoy's words
        else:
            self._close()  # idle before any byte of a request

    def _request_timeout(self) -> None:
        active = self._active
        if active is not None and active._response_started:
            active.abort("request timeout")
        else:
            self._reject(408, b"request timeout")

    def drain(self) -> None:
        """Shutdown: finish the request in flight (its response says close), take no more."""
        self.draining = True
        if self._active is None:
            self._close()

    def _close(self) -> None:
        self.flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()


async def serve(app: ProxyApp, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    if app.tls is None:
        return await loop.create_server(app.protocol, host, port, reuse_port=reuse_port, backlog=1024)
    # The handshake is bounded like reading a request's headers (slowloris).
    return await loop.create_server(app.protocol, host, port, reuse_port=reuse_port, backlog=1024, ssl=app.tls,
                                    ssl_handshake_timeout=app.limits.header_timeout or None)
