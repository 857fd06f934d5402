"""HTTP callouts from plugins (proxy_http_call) to named upstream clusters.

The response is handed to the root context's ``proxy_on_http_call_response``; while
that callback runs, its headers, body and trailers are readable through map types 6/7
and buffer type 4. A failure comes back as Envoy's async client reports it: a 503
local reply for a connect error or reset, a 504 for a timeout.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from wasmgate.headers import HeaderMap, Pair
from wasmgate.proxy import http
from wasmgate.proxy.upstream import Cluster, UpstreamConnection

if TYPE_CHECKING:
    from wasmgate.plugin.context import Context
    from wasmgate.plugin.vm import PluginVM
    from wasmgate.proxy.grpc_callout import GrpcCallouts

_log = logging.getLogger("wasmgate.upstream")


@dataclass
class CallResponse:
    """What proxy_on_http_call_response may read."""

    headers: HeaderMap = field(default_factory=HeaderMap)
    body: bytes = b""
    trailers: HeaderMap = field(default_factory=HeaderMap)


UPSTREAM_FAILURE = b"upstream connect error or disconnect/reset before headers. reset reason: "


def failure_response(reason: str) -> CallResponse:
    """The local reply Envoy's async client hands a plugin whose call failed."""
    status, body = (b"504", b"upstream request timeout") if reason == "timeout" else \
        (b"503", UPSTREAM_FAILURE + reason.encode())
    return CallResponse(HeaderMap([(b":status", status), (b"content-length", str(len(body)).encode()),
                                   (b"content-type", b"text/plain")]), body)


class Callouts:
    """The clusters plugins may call, by name (Envoy's cluster names)."""

    def __init__(self, clusters: dict[str, Cluster] | None = None):
        self.clusters = clusters or {}
        self._grpc: GrpcCallouts | None = None

    @property
    def grpc(self) -> GrpcCallouts:
        """gRPC callouts to the same clusters (grpcio is imported on first use)."""
        if self._grpc is None:
            from wasmgate.proxy.grpc_callout import GrpcCallouts

            self._grpc = GrpcCallouts(self.clusters)
        return self._grpc

    def start(self, vm: PluginVM, ctx: Context, cluster: str, headers: HeaderMap, body: bytes,
              trailers: HeaderMap, timeout: float) -> int:
        """Send the call; returns its token. The caller has checked ``cluster`` exists."""
        token = vm.next_call_token()
        call = _Call(vm, ctx, token, self.clusters[cluster], headers, body, trailers, timeout)
        vm.pending_calls[token] = call
        call.begin()
        return token

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()
        if self._grpc is not None:
            self._grpc.close()


class _Call:
    """One callout; also the ResponseHandler of its upstream connection."""

    def __init__(self, vm: PluginVM, ctx: Context, token: int, cluster: Cluster, headers: HeaderMap,
                 body: bytes, trailers: HeaderMap, timeout: float):
        self.vm = vm
        self.ctx = ctx
        self.token = token
        self.cluster = cluster
        self.headers = headers
        self.body = body
        self.trailers = trailers
        self.response = CallResponse()
        self._conn: UpstreamConnection | None = None
        self._done = False
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timeout) if timeout > 0 else None

    def begin(self) -> None:
        self.cluster.acquire(self._connected)

    def _connected(self, conn: UpstreamConnection | None, error: str) -> None:
        if self._done:
            if conn is not None:
                self.cluster.release(conn)
            return
        if conn is None:
            self._finish(False, error)
            return
        self._conn = conn
        conn.start(self, self.headers.get(b":method") == b"HEAD")
        chunked = bool(self.trailers.pairs)
        if self.body and not chunked:
            self.headers.replace(b"content-length", str(len(self.body)).encode())
        out = http.request_head(self.headers, chunked)
        out += (http.chunk(self.body) + http.last_chunk(self.trailers)) if chunked else self.body
        conn.write(out)

    # ResponseHandler
    def upstream_head(self, status: int, headers: list[Pair], no_body: bool) -> None:
        self.response.headers = http.response_map(status, headers)

    def upstream_body(self, data: bytes) -> None:
        self.response.body += data

    def upstream_end(self, trailers: list[Pair]) -> None:
        self.response.trailers = HeaderMap((k.lower(), v) for k, v in trailers)
        conn, self._conn = self._conn, None
        if conn is not None:
            self.cluster.release(conn)
        self._finish(True, "")

    def upstream_failed(self, reason: str) -> None:
        self._conn = None
        self._finish(False, reason)

    def upstream_pause(self, paused: bool) -> None:
        pass  # the whole request is written at once

    def upstream_tunnel(self, data: bytes) -> None:
        pass  # callouts never upgrade

    def _timeout(self) -> None:
        self._timer = None
        self._finish(False, "timeout")

    def cancel(self) -> None:
        """The calling context went away: drop the call without a callback (as Envoy)."""
        self._done = True
        self._cleanup()

    def _cleanup(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.detach()
            conn.close()
        self.vm.pending_calls.pop(self.token, None)

    def _finish(self, ok: bool, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._cleanup()
        if not ok:
            _log.debug("plugin %s: http call %d to %s failed: %s", self.vm.name, self.token, self.cluster.name,
                       reason)
            self.response = failure_response(reason)
        self.vm.deliver_http_call_response(self.ctx, self.token, self.response)
