"""A real gRPC server for callout tests: grpcio with generic handlers on raw bytes.

Service ``test.Echo``:

* ``Echo`` (unary): answers ``echo:<request>``; initial metadata ``x-init: 1``,
  trailing metadata ``x-trail: 2``
* ``Fail`` (unary): aborts with PERMISSION_DENIED "no access for <request>"
* ``Slow`` (unary): answers after 1 s
* ``Bidi`` (bidi streaming): ``x-init: 1`` first, echoes every message as
  ``echo:<message>``, ends with ``x-trail: 2`` and OK when the client half-closes
* ``BidiFail`` (bidi streaming): echoes the first message, then aborts with
  RESOURCE_EXHAUSTED "enough" ("100% enough" if the message was ``%``)

Every call is recorded in ``GrpcServer.seen`` (method, invocation metadata, messages).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc

SERVICE = "test.Echo"


@dataclass
class SeenCall:
    method: str
    metadata: dict[str, str | bytes]
    messages: list[bytes] = field(default_factory=list)


class GrpcServer:
    def __init__(self) -> None:
        self.seen: list[SeenCall] = []
        self._lock = threading.Lock()
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self._fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "BidiFail": grpc.stream_stream_rpc_method_handler(self._bidi_fail),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)

    def _record(self, method: str, ctx: grpc.ServicerContext) -> SeenCall:
        call = SeenCall(method, dict(ctx.invocation_metadata()))
        with self._lock:
            self.seen.append(call)
        return call

    def calls(self, method: str) -> list[SeenCall]:
        with self._lock:
            return [c for c in self.seen if c.method == method]

    def _echo(self, request: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._record("Echo", ctx).messages.append(request)
        ctx.send_initial_metadata((("x-init", "1"),))
        ctx.set_trailing_metadata((("x-trail", "2"),))
        return b"echo:" + request

    def _fail(self, request: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._record("Fail", ctx).messages.append(request)
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, f"no access for {request.decode(errors='replace')}")
        raise AssertionError("abort() raises")

    def _slow(self, request: bytes, ctx: grpc.ServicerContext) -> bytes:
        self._record("Slow", ctx).messages.append(request)
        time.sleep(1)
        return b"slow:" + request

    def _bidi(self, requests: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._record("Bidi", ctx)
        ctx.send_initial_metadata((("x-init", "1"),))
        for m in requests:
            call.messages.append(m)
            yield b"echo:" + m
        ctx.set_trailing_metadata((("x-trail", "2"),))

    def _bidi_fail(self, requests: Iterator[bytes], ctx: grpc.ServicerContext) -> Iterator[bytes]:
        call = self._record("BidiFail", ctx)
        for m in requests:
            call.messages.append(m)
            yield b"echo:" + m
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "enough" if m != b"%" else "100% enough")
