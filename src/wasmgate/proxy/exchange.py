"""One request's life, top to bottom.

downstream request -> request Direction (plugins in chain order) -> upstream
upstream response  -> response Direction (plugins in reverse)    -> downstream

A local reply from a plugin in the request direction goes downstream through the
response callbacks of that plugin and the ones before it, as Envoy encodes a
local reply; one sent while the response is on its way replaces that response
without further callbacks.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final

from wasmgate.headers import HeaderMap, Pair
from wasmgate.plugin.chain import Direction, FilterCallbacks, Flow
from wasmgate.plugin.context import HttpContext, LocalReply, Stream, StreamHooks
from wasmgate.plugin.filter import PluginFilter, stream_filters
from wasmgate.proxy import http
from wasmgate.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from wasmgate.proxy.server import HttpConnection

_log: Final = logging.getLogger("wasmgate.http")

UPSTREAM_FAILURE_BODY: Final = b"upstream connect error or disconnect/reset before headers. reset reason: "


_NO_FILTERS: Final[list[PluginFilter]] = []
_local_heads: Final = http.HeadMemo()  # the last local reply's head (per process)
# C statics: an imported name is a dict lookup per use.
_monotonic: Final = time.monotonic
_monotonic_ns: Final = time.monotonic_ns
_time_ns: Final = time.time_ns


class Exchange(StreamHooks):
    # Per-exchange state starts at these class-level values; an instance gets its own
    # only when one changes (cheaper than setting ~20 attributes per request). Compiled
    # (mypyc), they are defaults of the instance's fields.
    request: Flow | None = None
    response: Flow | None = None
    upstream: UpstreamConnection | None = None
    _pending_upstream: list[bytes] | None = None  # written once connected
    _upstream_chunked = False
    # A plugin may change the body's length (proxy_set_buffer_bytes): the head waits for
    # the body (docs/abi-support.md, Body length). Per direction: may resize, head waiting.
    _req_may_resize = False
    _req_head_pending = False
    _resp_may_resize = False
    _resp_head_pending = False
    _req_held: _Held | None = None  # body bytes held while that head waits
    _resp_held: _Held | None = None
    _upstream_done = False  # request fully sent upstream
    _response_started = False  # response head written downstream
    _downstream_chunked = False
    _body_ok = True  # the response may have a body (not HEAD, 1xx, 204, 304)
    _response_eos_sent = False
    _finished = False
    _in_chain = 0  # inside a chain step: its own check sees local replies
    upgrade_ok = False  # the client asked to upgrade and no plugin needs the body, so we tunnel
    tunneling = False  # after 101: raw bytes both ways
    _upstream_upgrade = b""
    _upstream_sent_at = 0.0
    _replying = False  # the response is a local reply (its head may be _local_heads')
    status = 0

    def __init__(self, conn: HttpConnection, method: bytes, target: bytes, req: http.DownstreamRequest,
                 *, keep_alive: bool, http10: bool, upgrade: bytes | None = None):
        self.conn = conn
        self.filters = self._req_filters = _NO_FILTERS  # replaced, never changed in place
        self.method = method
        self.has_body = req.has_body
        self.keep_alive = keep_alive
        self.http10 = http10
        self.stream = stream = Stream()
        stream.request_headers = headers = req.header_map()
        stream.downstream_addr = conn.peer
        stream.local_addr = conn.local
        stream.start_ns = _time_ns()
        stream.connection_id = conn.id
        stream.downstream = conn
        if http10:
            stream.protocol = b"HTTP/1.0"
        # What Envoy's connection manager adds before the filters run. X-Forwarded-For
        # is added on the way upstream only, so plugins see Envoy's default header set.
        if not req.has_xfp:
            headers.pairs.append((b"x-forwarded-proto", req.scheme))
        if not req.has_request_id:
            headers.pairs.append((b"x-request-id", _ids.next()))
        self.upgrade = upgrade  # the client asked to switch protocols (Upgrade: ...)

    # ---- request side: fed by HttpConnection -----------------------------------------

    def start(self) -> None:
        stream = self.stream
        filters = self.filters = stream_filters(self.conn.app.http_plugins, stream)
        if not filters:  # no plugin: straight through, no per-stream plugin objects
            self.upgrade_ok = self.upgrade is not None
            sink = self.request = _UpstreamSink(self)
            self.response = _DownstreamSink(self)
            sink.headers(not self.has_body)  # no plugin can halt it: no _guard
            return
        # An upgraded connection carries no HTTP body a plugin could see: only tunnel
        # when no plugin in the chain has body callbacks.
        self.upgrade_ok = self.upgrade is not None and not any(f.wants_body() for f in filters)
        # A plugin with no callbacks for a direction is left out of it (a healthy VM only:
        # a failed one must still be met, to apply its fail strategy).
        req_filters: list[PluginFilter] = []
        sides: list[FilterCallbacks] = []
        for f in filters:  # loops, not comprehensions: each of those is a frame on Python 3.11
            if f.wants(True):
                req_filters.append(f)
                sides.append(f.request)
        self._req_filters = req_filters
        request: Flow = _UpstreamSink(self)
        if sides:
            self._req_may_resize = self.has_body and _may_resize(req_filters, True)
            request = Direction(sides, request, stream, True)
        self.request = request
        # The response direction is made when a response starts (_response_flow); a local
        # reply makes its own, through the sender and the plugins before it (_halted).
        stream.hooks = self  # a cycle, broken in _finish_filters
        self._in_chain += 1  # _guard, inline: no bound method and argument tuple per request
        try:
            if request.headers(not self.has_body):
                self._halted(True)
        finally:
            self._in_chain -= 1

    def _response_direction(self, filters: list[PluginFilter]) -> Flow:
        wanting: list[FilterCallbacks] = []
        for f in reversed(filters):
            if f.wants(False):
                wanting.append(f.response)
        if not wanting:
            return _DownstreamSink(self)
        self._resp_may_resize = _may_resize(filters, False)
        return Direction(wanting, _DownstreamSink(self), self.stream, False)

    def _response_flow(self) -> Flow:
        """The response direction, made on first use."""
        response = self.response
        if response is None:
            response = self.response = self._response_direction(self.filters)
        return response

    def request_body(self, data: bytes) -> None:
        request = self.request
        if request is None or self._finished:
            return
        self.stream.request_bytes += len(data)
        if isinstance(request, _Sink):
            request.data(data, False)
        else:
            self._guard(request.data, True, data, False)
        if (request.over_limit or request.buffered > self.conn.app.limits.max_buffered_body) \
                and not self._finished:
            # Envoy answers an over-full request buffer with 413.
            self._halt_with(LocalReply(413, b"Payload Too Large", [], "request_payload_too_large"), True)

    def request_end(self, trailers: list[Pair]) -> None:
        request = self.request
        if request is None or self._finished or not self.has_body:
            return
        if trailers:
            self.stream.request_trailers = HeaderMap((k.lower(), v) for k, v in trailers)
            self._guard(request.trailers, True)
        elif isinstance(request, _Sink):
            request.data(b"", True)
        else:
            self._guard(request.data, True, b"", True)

    def on_continue(self, ctx: HttpContext, stream_type: int) -> None:
        if self._finished:
            return
        request_side = stream_type == 0
        direction = self.request if request_side else self.response
        if direction is None:
            return
        for f in self.filters:
            if f.ctx is ctx:
                index = direction.index_of(f.request if request_side else f.response)
                if index < 0:
                    return
                if direction.in_call(index):
                    direction.continue_from(index)  # applied when the callback returns
                else:
                    # From another context's callback (a timer, a callout): resume
                    # after that VM call has returned, as Envoy defers it.
                    self.conn.app.defer(partial(self._guard, partial(direction.continue_from, index),
                                                request_side))
                return

    def on_end(self, ctx: HttpContext) -> None:
        """A local reply or reset from outside this stream's own callbacks is acted on
        once that VM call returns; inside one, the chain's check handles it."""
        if self._in_chain:
            return
        for i, f in enumerate(self.filters):
            if f.ctx is ctx:
                self.conn.app.defer(partial(self._ended_out_of_band, i))
                return

    def _ended_out_of_band(self, index: int) -> None:
        if self._finished or (self.stream.local_reply is None and not self.stream.reset):
            return
        request_side = not self._response_started and self.stream.response_headers is None
        if request_side and self.request is not None:
            sender = self.filters[index]
            if sender in self._req_filters:
                self.request.current = self._req_filters.index(sender)  # for the local reply's path
        self._halted(request_side)

    def _guard(self, step: Callable[..., bool], request_side: bool, *args: object) -> None:
        """Run a chain step; if the stream ended in it, send the local reply or reset."""
        self._in_chain += 1
        try:
            if step(*args):
                self._halted(request_side)
        finally:
            self._in_chain -= 1

    def _halt_with(self, reply: LocalReply, request_side: bool) -> None:
        if self.stream.local_reply is None:
            self.stream.local_reply = reply
        self._halted(request_side)

    def _halted(self, request_side: bool) -> None:
        if self._finished:
            return
        stream = self.stream
        if stream.reset:
            self.abort("reset by plugin")
            return
        reply = stream.local_reply
        assert reply is not None
        self._drop_upstream()
        if self._response_started:
            self.abort(f"local reply {reply.status} after response started")
            return
        if request_side and self.request is not None:
            # The sender and the plugins before it see the reply's response callbacks.
            sender = self.filters.index(self._req_filters[self.request.current]) \
                if 0 <= self.request.current < len(self._req_filters) else len(self.filters) - 1
            self.response = self._response_direction(self.filters[: sender + 1])
            self._local_reply_through_filters(reply)
        else:
            self._write_local_reply(reply)

    # ---- upstream --------------------------------------------------------------------

    def connect_upstream(self, eos: bool) -> None:
        req = self.stream.request_headers
        assert req is not None
        self._upstream_sent_at = _monotonic()
        conn = self.conn
        if not eos and self._req_may_resize:
            # Framed once the body's first bytes have passed every plugin (_frame_request).
            self._req_head_pending = True
            self._req_held = _Held()
            self._pending_upstream = []
        else:
            self._upstream_chunked = not eos and req.get(b"content-length") is None
            self._pending_upstream = [http.request_head(req, self._upstream_chunked,
                                                        self.upgrade if self.upgrade_ok else None,
                                                        conn.peer_ip_bytes)]
        self._upstream_done = eos
        self.stream.attempts = 1
        conn.app.cluster.acquire(self._connected)

    def _frame_request(self, body_length: int | None) -> None:
        """Write the held request head: with the body's exact length when it is whole
        (``body_length``), else chunked, since a plugin may still change later chunks."""
        self._req_head_pending = False
        req = self.stream.request_headers
        assert req is not None
        if body_length is not None:
            req = HeaderMap(req.pairs)  # on the wire only: plugins keep seeing the client's (as in Envoy)
            req.replace(b"content-length", b"%d" % body_length)
        self._upstream_chunked = body_length is None
        head = http.request_head(req, self._upstream_chunked, self.upgrade if self.upgrade_ok else None,
                                 self.conn.peer_ip_bytes)
        pending = self._pending_upstream
        if pending is None:
            return  # the upstream request was dropped meanwhile
        pending.insert(0, head)
        if self.upstream is not None:  # connected while the head waited
            self._pending_upstream = None
            self.upstream.write(b"".join(pending))

    def _hold(self, held: _Held | None, body: bytes, eos: bool, flush: Callable[[], None]) -> bytes | None:
        """Hold body bytes while the head waits: the whole body once it has ended, else
        None (what came in this event-loop step is flushed after it, framed as streaming)."""
        assert held is not None
        held.chunks.append(body)
        if eos:
            return held.take()
        if not held.scheduled:
            held.scheduled = True
            self.conn.app.defer(flush)
        return None

    def _flush_request(self) -> None:
        """The request body goes on streaming: send the head chunked, then what was held."""
        if not self._req_head_pending or self._finished:
            return
        self._frame_request(None)
        data = self._req_held.take() if self._req_held else b""
        if data:
            self.send_upstream(http.chunk(data))

    def send_upstream(self, data: bytes) -> None:
        pending = self._pending_upstream
        if pending is not None:
            pending.append(data)
            # Still connecting: stop reading the client rather than buffer without bound.
            if sum(map(len, pending)) > self.conn.app.limits.max_buffered_body:
                self.conn.pause_reading(True, "connect")
        elif self.upstream is not None:
            self.upstream.write(data)

    def _connected(self, conn: UpstreamConnection | None, error: str) -> None:
        if self._finished:
            if conn is not None:
                self.conn.app.cluster.release(conn)
            return
        if conn is None:
            _log.warning("upstream %s unavailable: %s", self.conn.app.cluster.url, error)
            self.conn.app.stats.upstream_failures += 1
            self.stream.response_flags |= 0x20  # Envoy's UF: upstream connection failure
            self._upstream_error(error)
            return
        self.upstream = conn
        self.stream.upstream_addr = conn.peer
        self.stream.upstream_conn = conn
        self.stream.upstream_tx_ns = _monotonic_ns()
        conn.start(self, self.method == b"HEAD", self.conn)
        if self._req_head_pending:
            return  # written by _frame_request
        pending, self._pending_upstream = self._pending_upstream or [], None
        conn.write(pending[0] if len(pending) == 1 else b"".join(pending))
        self.conn.pause_reading(False, "connect")

    def _upstream_error(self, reason: str) -> None:
        if self._response_started:
            self.abort(f"upstream {reason}")
            return
        # Envoy's wording, so users' existing alerts and tests keep matching.
        reply = LocalReply(503, UPSTREAM_FAILURE_BODY + reason.encode(), [], "upstream_reset_before_response_started")
        self._local_reply_through_filters(reply)

    def _drop_upstream(self) -> None:
        conn, self.upstream = self.upstream, None
        if self._pending_upstream is not None:
            self._pending_upstream = None
            self.conn.pause_reading(False, "connect")
        if conn is not None:
            conn.detach()
            conn.close()

    # ResponseHandler
    def upstream_tunnel(self, data: bytes) -> None:
        if self.tunneling:
            self.conn.write(data)

    def tunnel_from_client(self, data: bytes) -> None:
        self.send_upstream(data)  # raw, in order; held until the upstream is connected

    def upstream_head(self, status: int, headers: list[Pair], no_body: bool) -> None:
        """``headers`` have lower-case names (UpstreamConnection lower-cases them)."""
        if status == 101:
            self._upstream_upgrade = next((v for k, v in headers if k == b"upgrade"), b"")
        hop = http.HOP_BY_HOP
        pairs = [(b":status", http.status_bytes(status))]
        for kv in headers:
            if kv[0] not in hop:
                pairs.append(kv)
        # Envoy's router adds this before the response filters run; plugins count on it.
        pairs.append((b"x-envoy-upstream-service-time",
                      b"%d" % int((_monotonic() - self._upstream_sent_at) * 1000)))
        self.stream.response_headers = HeaderMap.of(pairs)
        self.stream.code_details = "via_upstream"
        if self._finished:
            return
        response = self._response_flow()
        if isinstance(response, _Sink):
            response.headers(no_body)
        else:
            self._guard(response.headers, False, no_body)

    def upstream_body(self, data: bytes) -> None:
        response = self.response
        if response is None or self._finished:
            return
        self.stream.response_bytes += len(data)
        if isinstance(response, _Sink):
            response.data(data, False)
            return
        self._guard(response.data, False, data, False)
        if (response.over_limit or response.buffered > self.conn.app.limits.max_buffered_body) \
                and not self._finished:
            # Envoy: 500 if the response has not started, else the stream is reset.
            self._halt_with(LocalReply(500, b"Internal Server Error", [], "response_payload_too_large"), False)

    def upstream_end(self, trailers: list[Pair]) -> None:
        self.stream.upstream_rx_ns = _monotonic_ns()
        if self.tunneling:  # the upstream closed the tunnel
            self.upstream = None
            self.keep_alive = False
            self.complete()
            return
        conn, self.upstream = self.upstream, None
        if conn is not None:
            if self._upstream_done:
                self.conn.app.cluster.release(conn)
            else:
                conn.close()  # the request was not fully sent; the connection is unusable
        if self.response is None or self._finished:
            return
        response = self.response
        if trailers:
            self.stream.response_trailers = HeaderMap((k.lower(), v) for k, v in trailers)
            self._guard(response.trailers, False)
        elif self.stream.response_headers is not None and not self._response_eos_sent:
            if isinstance(response, _Sink):
                response.data(b"", True)
            else:
                self._guard(response.data, False, b"", True)

    def upstream_failed(self, reason: str) -> None:
        self.upstream = None
        if not self._finished:
            self.conn.app.stats.upstream_failures += 1
            self.stream.response_flags |= 0x40  # Envoy's UC: upstream connection termination
            _log.warning("upstream %s: %s", self.conn.app.cluster.url, reason)
            self._upstream_error(reason)

    def upstream_pause(self, paused: bool) -> None:
        self.conn.pause_reading(paused)

    # ---- response side ---------------------------------------------------------------

    def _local_reply_through_filters(self, reply: LocalReply) -> None:
        self._replying = True
        stream = self.stream
        stream.response_headers = _local_reply_headers(reply)
        stream.code_details = reply.details
        stream.local_reply = None  # from here on a new reply would replace this one
        response = self._response_flow()
        if response.headers(not reply.body) or (reply.body and response.data(reply.body, True)):
            self._write_local_reply(self._latest_reply(reply))

    def _latest_reply(self, reply: LocalReply) -> LocalReply:
        """A reply sent by a response callback of ``reply`` replaces it. (A method, not
        ``stream.local_reply or reply`` after setting it to None: see wasmgate/compiled.py.)"""
        return self.stream.local_reply or reply

    def _write_local_reply(self, reply: LocalReply) -> None:
        if self._response_started:
            self.abort("local reply after response started")
            return
        self._replying = True
        self.stream.response_headers = _local_reply_headers(reply)
        self.stream.code_details = reply.details
        self.write_head(eos=not reply.body)
        if reply.body:
            self.write_body(reply.body, True)

    def write_head(self, eos: bool) -> None:
        headers = self.stream.response_headers
        assert headers is not None
        self._response_started = True
        raw_status = headers.get(b":status")
        if raw_status == b"101":
            if not self.upgrade_ok:
                self.abort("101 Switching Protocols for a request that did not upgrade")
                return
            self.status = 101
            self.tunneling = True
            self.conn.write(http.switching_protocols_head(headers, self._upstream_upgrade or self.upgrade or b""))
            return
        status = self.status = http.parse_status(raw_status)
        conn = self.conn
        if conn.closing or conn.draining:
            self.keep_alive = False
        body_ok = http.body_allowed(status, self.method)
        if not body_ok:
            self._body_ok = False
        if not eos and body_ok and self._resp_may_resize:
            self._resp_head_pending = True  # framed by _frame_response once the body comes
            self._resp_held = _Held()
            return
        self._write_head(headers, eos, body_ok, status)

    def _frame_response(self, body_length: int | None) -> None:
        """Write the held response head: with the body's exact length when it is whole
        (``body_length``), else chunked (HTTP/1.0: ended by closing the connection)."""
        self._resp_head_pending = False
        headers = self.stream.response_headers
        assert headers is not None
        headers = HeaderMap(headers.pairs)  # on the wire only: on_log sees the upstream's (as in Envoy)
        if body_length is not None:
            headers.replace(b"content-length", b"%d" % body_length)
        else:
            headers.remove(b"content-length")
        self._write_head(headers, False, True, self.status)

    def _flush_response(self) -> None:
        """The response body goes on streaming: send the head chunked, then what was held."""
        if not self._resp_head_pending or self._finished:
            return
        self._frame_response(None)
        data = self._resp_held.take() if self._resp_held else b""
        if data:
            self.write_body(data, False)

    def _write_head(self, headers: HeaderMap, eos: bool, body_ok: bool, status: int) -> None:
        chunked = False
        if body_ok and headers.get(b"content-length") is None:
            if eos:
                headers.add(b"content-length", b"0")
            elif self.http10:
                self.keep_alive = False  # HTTP/1.0 without a length: the body ends at close
            else:
                chunked = self._downstream_chunked = True
        if self._replying and status:
            head = _local_heads.response_head(headers, chunked, self.keep_alive, self.http10, status)
        else:
            head = http.response_head(headers, chunked=chunked, keep_alive=self.keep_alive, http10=self.http10,
                                      status=status or None)
        self.conn.write(head)
        if eos or not body_ok:
            self._response_eos_sent = eos
            if eos:
                self.complete()

    def write_body(self, data: bytes, eos: bool) -> None:
        if self._resp_head_pending:
            whole = self._hold(self._resp_held, data, eos, self._flush_response)
            if whole is None:
                return
            self._frame_response(len(whole))
            data = whole
        if not self._body_ok:
            if eos:
                self._response_eos_sent = True
                self.complete()
            return
        self.stream.bytes_sent += len(data)
        out = http.chunk(data) + (http.last_chunk() if eos else b"") if self._downstream_chunked else data
        if out:
            self.conn.write(out)
        if eos:
            self._response_eos_sent = True
            self.complete()

    def write_trailers(self) -> None:
        if self._resp_head_pending:
            self._flush_response()
        if self._downstream_chunked:
            self.conn.write(http.last_chunk(self.stream.response_trailers))
        self._response_eos_sent = True
        self.complete()

    # ---- end of the exchange ---------------------------------------------------------

    def complete(self) -> None:
        """The response is fully written downstream."""
        if self._finished:
            return
        self._finished = True
        self._finish_filters()
        self.conn.app.stats.response(self.status)
        self.conn.exchange_done(self, self.keep_alive and self._request_consumed())
        self.request = self.response = None  # they point back here: no cycle left for the collector

    def _request_consumed(self) -> bool:
        # A connection whose request body was not read to the end cannot be reused.
        return self.conn.current_request_complete(self)

    def abort(self, why: str) -> None:
        """End the exchange without a (complete) response: close both connections."""
        if self._finished:
            return
        if self._resp_head_pending:
            self._flush_response()  # its head had passed every plugin: the client sees it cut off, as in Envoy
        self._finished = True
        _log.debug("stream aborted: %s", why)
        self._drop_upstream()
        self._finish_filters()
        self.conn.app.stats.response(0)
        self.conn.exchange_done(self, False)
        self.request = self.response = None

    def _finish_filters(self) -> None:
        # Envoy: every plugin's on_log (in chain order), then on_done/on_delete each.
        self.stream.end_ns = _time_ns()
        self.stream.hooks = None
        for f in self.filters:
            f.log()
        for f in self.filters:
            f.finish()
        self.stream.downstream = self.stream.upstream_conn = None  # read by attributes until here


class _Held:
    """Body bytes held while their direction's head waits for its framing."""

    __slots__ = ("chunks", "scheduled")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.scheduled = False  # a flush after this event-loop step

    def take(self) -> bytes:
        self.scheduled = False
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def _may_resize(filters: list[PluginFilter], request: bool) -> bool:
    """Whether a plugin among ``filters`` has body callbacks for that direction, so may
    change the body's length with proxy_set_buffer_bytes."""
    for f in filters:
        p = f.plugin
        if p is not None and (p.vm.has_request_body_callbacks if request else p.vm.has_response_body_callbacks):
            return True
    return False


_islower: Final = bytes.islower  # called unbound: no method lookup per header
_TEXT_PLAIN: Final = (b"content-type", b"text/plain")
_REPLY_SET: Final = frozenset({b"content-length", b"content-type"})  # what a local reply may set itself


class _ReplyPairs:
    """The last local reply's header list as _local_reply_headers built it, kept with what
    it was built from: the plugin's header list (by identity: LocalReply.headers is never
    changed in place, and this reference keeps it alive), the status and the body length."""

    __slots__ = ("body_len", "pairs", "source", "status")

    def __init__(self) -> None:
        self.source: list[Pair] | None = None
        self.status = 0
        self.body_len = 0
        self.pairs: list[Pair] = []


_reply_pairs: Final = _ReplyPairs()


def _local_reply_headers(reply: LocalReply) -> HeaderMap:
    """As Envoy builds them: the plugin's headers, then length and type if there is a body."""
    memo = _reply_pairs
    if reply.headers is memo.source and reply.status == memo.status and len(reply.body) == memo.body_len:
        return HeaderMap.of(memo.pairs[:])  # a copy: the stream's map may be changed
    pairs = [(b":status", http.status_bytes(reply.status))]
    for kv in reply.headers:  # the common case: plain lower-case names, none of ours
        k = kv[0]
        if not k or k[0] == 58 or k in _REPLY_SET or not _islower(k):  # 58: b":"
            break
        pairs.append(kv)
    else:
        if reply.body:
            pairs.append((b"content-length", b"%d" % len(reply.body)))
            pairs.append(_TEXT_PLAIN)
        memo.source = reply.headers
        memo.status = reply.status
        memo.body_len = len(reply.body)
        memo.pairs = pairs[:]
        return HeaderMap.of(pairs)
    headers = HeaderMap.of([(b":status", http.status_bytes(reply.status))])
    for k, v in reply.headers:
        headers.add(k, v)
    if reply.body:
        headers.replace(b"content-length", b"%d" % len(reply.body))
        if headers.get(b"content-type") is None:
            headers.pairs.append((b"content-type", b"text/plain"))
    return headers


# x-request-id: a UUID4 as Envoy adds, made of a 48-bit Weyl sequence (a random start
# plus an odd step, mod 2**48) and a random per-process suffix (74 random bits): unique
# for 2**48 requests, random-looking, and several times cheaper than formatting 128 fresh
# random bits per request. The sequence comes first: Envoy reads the first 8 hex digits
# as the id's integer (random_sampling, runtime_fraction), so they must vary per request.
# Kept below 2**63 so compiled it is plain machine arithmetic. Not for secrets.
_ID_STEP: Final = 0x9E3779B97F4B  # odd: the sequence visits every 48-bit value once
_ID_MASK: Final = (1 << 48) - 1
_HEX3: Final = [b"%03x" % i for i in range(4096)]  # 12 bits as three hex digits
_HEX2: Final = [b"%02x" % i for i in range(256)]
_HEX2_DASH: Final = [b"%02x-" % i for i in range(256)]  # the end of the first group


class _RequestIds:
    def __init__(self) -> None:
        self.suffix = b""
        self.last = 0
        self.reseed()

    def reseed(self) -> None:
        r = random.getrandbits
        self.suffix = b"-4%03x-%04x-%012x" % (r(12), r(14) | 0x8000, r(48))
        self.last = r(48)

    def next(self) -> bytes:
        """xxxxxxxx-xxxx from the sequence, then the suffix: table lookups joined once."""
        n = self.last = (self.last + _ID_STEP) & _ID_MASK
        return b"".join((_HEX3[n >> 36], _HEX3[(n >> 24) & 0xFFF], _HEX2_DASH[(n >> 16) & 0xFF],
                         _HEX2[(n >> 8) & 0xFF], _HEX2[n & 0xFF], self.suffix))


_ids: Final = _RequestIds()
os.register_at_fork(after_in_child=_ids.reseed)


class _Sink(Flow):
    """A direction's sink; alone, the direction of an exchange no plugin takes part in."""

    __slots__ = ("ex",)

    def __init__(self, ex: Exchange):
        self.ex = ex


class _UpstreamSink(_Sink):
    """End of the request direction: forward to the upstream cluster."""

    __slots__ = ()

    def headers(self, eos: bool) -> bool:
        self.ex.connect_upstream(eos)
        return False

    def data(self, body: bytes, eos: bool) -> bool:
        ex = self.ex
        if ex._req_head_pending:
            whole = ex._hold(ex._req_held, body, eos, ex._flush_request)
            if whole is None:
                return False
            ex._frame_request(len(whole))
            body = whole
        if ex._upstream_chunked:
            ex.send_upstream(http.chunk(body) + (http.last_chunk() if eos else b""))
        elif body:
            ex.send_upstream(body)
        if eos:
            ex._upstream_done = True
        return False

    def trailers(self) -> bool:
        ex = self.ex
        if ex._req_head_pending:
            ex._flush_request()
        if ex._upstream_chunked:
            ex.send_upstream(http.last_chunk(ex.stream.request_trailers))
        ex._upstream_done = True
        return False


class _DownstreamSink(_Sink):
    """End of the response direction: write to the client."""

    __slots__ = ()

    def headers(self, eos: bool) -> bool:
        self.ex.write_head(eos)
        return False

    def data(self, body: bytes, eos: bool) -> bool:
        self.ex.write_body(body, eos)
        return False

    def trailers(self) -> bool:
        self.ex.write_trailers()
        return False
