"""gRPC callouts at the ABI: argument handling, tokens, and the callbacks against a real
gRPC server (tests/grpc_server.py). The plugin-level flow is in test_grpc_callout.py.

The WAT test module has no proxy_on_grpc_* exports, so the VM's callback entry points
are replaced by recorders that read what a plugin could read at that moment, through the
module's host-function wrappers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from grpc_server import GrpcServer
from wasmgate.abi.constants import WasmResult
from wasmgate.host.grpc import parse_grpc_service
from wasmgate.plugin.context import Context, Stream
from wasmgate.proxy.callout import Callouts
from wasmgate.proxy.grpc_callout import TIMEOUT_MESSAGE
from wasmgate.proxy.upstream import Cluster
from wat_util import OOB, R2, R3, RP, RS, Guest, pairs_bytes

R = WasmResult
SERVICE = b"test.Echo"


@pytest.fixture(scope="module")
def server() -> Iterator[GrpcServer]:
    s = GrpcServer()
    yield s
    s.stop()


class Recorder:
    """Stands in for the plugin's proxy_on_grpc_* exports."""

    def __init__(self, g: Guest):
        self.g = g
        self.events: list[tuple[Any, ...]] = []
        vm = g.vm
        vm.on_grpc_receive_initial_metadata = self.initial  # type: ignore[method-assign,assignment]
        vm.on_grpc_receive = self.receive  # type: ignore[method-assign]
        vm.on_grpc_receive_trailing_metadata = self.trailing  # type: ignore[method-assign,assignment]
        vm.on_grpc_close = self.close  # type: ignore[method-assign]
        self.hooks: dict[str, Callable[[int], None]] = {}

    def _pairs(self, map_type: int) -> list[tuple[bytes, bytes]]:
        assert self.g.call("proxy_get_header_map_pairs", map_type, RP, RS) == R.OK
        raw = self.g.out()
        if not raw:
            return []
        count = int.from_bytes(raw[:4], "little")
        sizes = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "little") for i in range(2 * count)]
        pos, out = 4 + 8 * count, []
        for i in range(count):
            k = raw[pos: pos + sizes[2 * i]]
            pos += sizes[2 * i] + 1
            v = raw[pos: pos + sizes[2 * i + 1]]
            pos += sizes[2 * i + 1] + 1
            out.append((k, v))
        return out

    def _status(self) -> tuple[int, bytes]:
        assert self.g.call("proxy_get_status", R2, RP, RS) == R.OK
        return self.g.u32(R2), self.g.out()

    def _other_map(self, map_type: int) -> int:
        kp, ks = self.g.put_str(b"x-init")
        return self.g.call("proxy_get_header_map_value", map_type, kp, ks, RP, RS)

    def initial(self, ctx: Context | None, token: int, count: int) -> bool:
        self.events.append(("initial", ctx, token, count, self._pairs(4), self._other_map(5)))
        if "initial" in self.hooks:
            self.hooks["initial"](token)
        return True

    def receive(self, ctx: Context | None, token: int, size: int) -> bool:
        assert self.g.call("proxy_get_buffer_bytes", 5, 0, size, RP, RS) == R.OK
        self.events.append(("receive", ctx, token, self.g.out(), self._status(), self._other_map(4)))
        if "receive" in self.hooks:
            self.hooks["receive"](token)
        return True

    def trailing(self, ctx: Context | None, token: int, count: int) -> bool:
        self.events.append(("trailing", ctx, token, count, self._pairs(5)))
        return True

    def close(self, ctx: Context | None, token: int, status: int) -> bool:
        self.events.append(("close", ctx, token, status, self._status()))
        return True

    def kinds(self) -> list[str]:
        return [e[0] for e in self.events]

    async def wait(self, kind: str, timeout: float = 10) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while kind not in self.kinds():
            assert loop.time() < deadline, f"no {kind} callback; got {self.kinds()}"
            await asyncio.sleep(0.01)


@pytest.fixture
def g(tmp_path: Path, server: GrpcServer) -> Iterator[Guest]:
    guest = Guest.new(tmp_path)
    guest.vm.callouts = Callouts({"grpc": Cluster("grpc", f"http://127.0.0.1:{server.port}"),
                                  "dead": Cluster("dead", "http://127.0.0.1:1")})
    guest.vm.effective = guest.vm.root
    yield guest
    guest.vm.shutdown()


def run(g: Guest, body: Callable[[Recorder], Awaitable[None]]) -> Recorder:
    """Run ``body`` on a uvloop event loop (as wasmgate serves), then close the channels."""
    rec = Recorder(g)

    async def main() -> None:
        try:
            await body(rec)
        finally:
            g.vm._cancel_calls()
            assert g.vm.callouts is not None
            g.vm.callouts.close()

    uvloop.run(main())
    return rec


def grpc_service(cluster: bytes, authority: bytes = b"") -> bytes:
    """A serialized envoy.config.core.v3.GrpcService {envoy_grpc {cluster_name, authority}}."""
    inner = b"\x0a" + bytes([len(cluster)]) + cluster
    if authority:
        inner += b"\x12" + bytes([len(authority)]) + authority
    return b"\x0a" + bytes([len(inner)]) + inner


def call(g: Guest, method: bytes = b"Echo", message: bytes = b"hi", *, service: bytes = b"grpc",
         metadata: list[tuple[bytes, bytes]] | None = None, timeout_ms: int = 5000, token_ptr: int = R3) -> int:
    sp, ss = g.put_str(service)
    np, ns = g.put_str(SERVICE)
    mp, ms = g.put_str(method)
    ip, is_ = g.put_str(pairs_bytes(metadata or []))
    qp, qs = g.put_str(message)
    return g.call("proxy_grpc_call", sp, ss, np, ns, mp, ms, ip, is_, qp, qs, timeout_ms, token_ptr)


def stream(g: Guest, method: bytes = b"Bidi", *, service: bytes = b"grpc",
           metadata: list[tuple[bytes, bytes]] | None = None, token_ptr: int = R3) -> int:
    sp, ss = g.put_str(service)
    np, ns = g.put_str(SERVICE)
    mp, ms = g.put_str(method)
    ip, is_ = g.put_str(pairs_bytes(metadata or []))
    return g.call("proxy_grpc_stream", sp, ss, np, ns, mp, ms, ip, is_, token_ptr)


def send(g: Guest, token: int, message: bytes, end: bool = False) -> int:
    p, s = g.put_str(message)
    return g.call("proxy_grpc_send", token, p, s, int(end))


# ---- the service argument --------------------------------------------------------------


def test_service_plain_names_do_not_parse_as_grpc_service() -> None:
    for name in (b"grpc", b"echo", b"outbound|50051||svc.ns.svc.cluster.local", b"backend", b"dead"):
        assert parse_grpc_service(name) is None, name


def test_service_as_grpc_service() -> None:
    t = parse_grpc_service(grpc_service(b"grpc", b"svc.example"))
    assert t is not None and t.envoy_grpc and (t.cluster, t.authority) == ("grpc", "svc.example")
    # initial_metadata {key: "x-a", value: "1"} after the target
    t = parse_grpc_service(grpc_service(b"c") + b"\x2a\x08\x0a\x03x-a\x12\x011")
    assert t is not None and t.metadata == [(b"x-a", b"1")]
    # google_grpc replaces envoy_grpc (a oneof); an empty message has no target
    t = parse_grpc_service(grpc_service(b"c") + b"\x12\x00")
    assert t is not None and not t.envoy_grpc
    t = parse_grpc_service(b"")
    assert t is not None and not t.envoy_grpc
    # "hi" is a valid message (field 13, varint 0x69): Envoy sees no target in it
    t = parse_grpc_service(b"hi")
    assert t is not None and not t.envoy_grpc


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\x0a\x03\x0a\x01\xff", b"\x0b", b"\x0c", b"\x07", b"\x00\x00",
                                  b"\x08\x80"])
def test_service_malformed_is_a_cluster_name(data: bytes) -> None:
    assert parse_grpc_service(data) is None


# ---- argument errors ---------------------------------------------------------------------


def test_bad_pointers(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        sp, ss = g.put_str(b"grpc")
        good = [sp, ss, sp, ss, sp, ss, 0, 0, sp, ss]
        for i in range(0, 10, 2):
            args = list(good)
            args[i] = OOB
            assert g.call("proxy_grpc_call", *args, 1000, R3) == R.INVALID_MEMORY_ACCESS
            if i < 8:
                assert g.call("proxy_grpc_stream", *args[:8], R3) == R.INVALID_MEMORY_ACCESS
        assert call(g, token_ptr=OOB) == R.INVALID_MEMORY_ACCESS
        assert stream(g, token_ptr=OOB) == R.INVALID_MEMORY_ACCESS
        assert g.call("proxy_grpc_send", 6, OOB, 4, 0) == R.INVALID_MEMORY_ACCESS
        assert g.vm.pending_calls == {}  # nothing was started

    run(g, body)


def test_unknown_cluster_name_is_parse_failure(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, service=b"nope") == R.PARSE_FAILURE
        assert stream(g, service=b"nope") == R.PARSE_FAILURE

    run(g, body)


def test_grpc_service_without_envoy_grpc_is_bad_argument(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, service=b"") == R.BAD_ARGUMENT
        assert stream(g, service=b"\x12\x00") == R.BAD_ARGUMENT

    run(g, body)


def test_grpc_service_unknown_cluster_fails_then_closes(g: Guest) -> None:
    """As Envoy: the token is spent, INTERNAL_FAILURE, then on_grpc_close(14) for it."""
    async def body(rec: Recorder) -> None:
        assert call(g, service=grpc_service(b"nope")) == R.INTERNAL_FAILURE
        assert stream(g, service=grpc_service(b"nope")) == R.INTERNAL_FAILURE
        assert rec.events == []  # not during the host call
        await asyncio.sleep(0.05)
        assert [(e[0], e[2], e[3], e[4]) for e in rec.events] == [
            ("close", 5, 14, (14, b"Cluster not available")),
            ("close", 6, 14, (14, b"Cluster not available")),
        ]
        assert all(e[1] is g.vm.root for e in rec.events)
        assert call(g, service=grpc_service(b"grpc")) == R.OK
        assert g.u32(R3) == 9

    run(g, body)


def test_not_serving(g: Guest) -> None:
    assert call(g) == R.INTERNAL_FAILURE  # no event loop: VM start-up (on_vm_start, on_configure)
    g.vm.callouts = None

    async def body() -> None:
        assert call(g) == R.INTERNAL_FAILURE
        assert stream(g) == R.INTERNAL_FAILURE

    uvloop.run(body())
    assert g.vm.pending_calls == {}


def test_tokens(g: Guest) -> None:
    assert [g.vm.next_call_token() for _ in range(3)] == [4, 8, 12]  # HTTP calls
    for token in (5, 6, 9, 10):
        assert g.call("proxy_grpc_close", token) == R.NOT_FOUND
        assert g.call("proxy_grpc_cancel", token) == R.NOT_FOUND
    assert send(g, 6, b"x") == R.NOT_FOUND
    for token in (0, 3, 4, 7, 8, 0xFFFFFFFF):
        assert g.call("proxy_grpc_close", token) == R.BAD_ARGUMENT
        assert g.call("proxy_grpc_cancel", token) == R.BAD_ARGUMENT
    for token in (5, 4, 7):
        assert send(g, token, b"x") == R.BAD_ARGUMENT


def test_maps_and_buffer_outside_callbacks(g: Guest) -> None:
    kp, ks = g.put_str(b"x-init")
    for map_type in (4, 5):
        assert g.call("proxy_get_header_map_value", map_type, kp, ks, RP, RS) == R.BAD_ARGUMENT
        assert g.call("proxy_get_header_map_pairs", map_type, RP, RS) == R.OK
        assert g.out() == b""
        assert g.call("proxy_get_header_map_size", map_type, RP) == R.BAD_ARGUMENT
        assert g.call("proxy_add_header_map_value", map_type, kp, ks, kp, ks) == R.BAD_ARGUMENT
    assert g.call("proxy_get_buffer_status", 5, RP, RS) == R.OK  # Envoy: an empty buffer
    assert g.u32(RP) == 0
    assert g.call("proxy_get_buffer_bytes", 5, 0, 10, RP, RS) == R.OK
    assert g.u32(RS) == 0
    p, n = g.put_str(b"x")
    assert g.call("proxy_set_buffer_bytes", 5, 0, 0, p, n) == R.BAD_ARGUMENT  # Envoy: not settable
    assert g.call("proxy_get_status", R2, RP, RS) == R.OK
    assert (g.u32(R2), g.out()) == (0, b"")


# ---- against the server -------------------------------------------------------------------


def test_unary_call(g: Guest, server: GrpcServer) -> None:
    async def body(rec: Recorder) -> None:
        g.http(Stream())  # started from a stream context: still the root context's call
        before = len(server.calls("Echo"))
        assert call(g, message=b"\x00raw\xffbytes", metadata=[(b"X-MD", b"v1"), (b"x-nl", b"a\nb"),
                                                               (b"x-blob-bin", b"\x00\xff"), (b":bad", b"1")]) == R.OK
        assert g.u32(R3) == 5
        await rec.wait("receive")
        await asyncio.sleep(0.1)
        assert rec.kinds() == ["receive"]  # a unary call gets nothing else
        _, ctx, token, data, status, other = rec.events[0]
        assert (ctx, token, data, status, other) == (g.vm.root, 5, b"echo:\x00raw\xffbytes", (0, b""),
                                                     R.BAD_ARGUMENT)
        seen = server.calls("Echo")[before]
        assert seen.messages == [b"\x00raw\xffbytes"]
        assert seen.metadata["x-md"] == "v1"
        assert seen.metadata["x-blob-bin"] == b"\x00\xff"
        assert "x-nl" not in seen.metadata and ":bad" not in seen.metadata  # not carried by gRPC
        assert g.vm.pending_calls == {}
        assert g.call("proxy_grpc_close", 5) == R.NOT_FOUND

    run(g, body)


def test_unary_failure(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, b"Fail", b"bob") == R.OK
        assert call(g, b"Nope", b"x") == R.OK
        await asyncio.sleep(0.5)
        closes = sorted((e[2], e[3], e[4]) for e in rec.events)
        assert closes == [(5, 7, (7, b"no access for bob{via_upstream}")),
                          (9, 12, (12, b"Method not found!{via_upstream}"))]
        assert rec.kinds() == ["close", "close"]
        # After the callback the code stays, the message goes (Envoy's root context).
        assert g.call("proxy_get_status", R2, RP, RS) == R.OK
        assert g.u32(R2) in (7, 12) and g.out() == b""

    run(g, body)


def test_unreachable_cluster(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, service=b"dead") == R.OK
        await rec.wait("close")
        _, _, _, status, (code, message) = rec.events[0]
        assert (status, code) == (14, 14)
        assert message.startswith(b"upstream connect error or disconnect/reset before headers. reset reason: "
                                  b"remote connection failure{upstream_reset_before_response_started{")

    run(g, body)


def test_unary_timeout(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, b"Slow", timeout_ms=200) == R.OK
        await rec.wait("close")
        assert rec.events[0][3:] == (14, (14, TIMEOUT_MESSAGE.encode()))
        rec.events.clear()
        assert call(g, b"Slow", timeout_ms=0) == R.OK  # Envoy: grpc-timeout 0, no timer of its own
        await rec.wait("close")
        assert rec.events[0][3:] == (4, (4, b"Deadline Exceeded{via_upstream}"))

    run(g, body)


def test_close_and_cancel_a_call_in_flight(g: Guest, server: GrpcServer) -> None:
    async def body(rec: Recorder) -> None:
        assert call(g, b"Slow") == R.OK
        assert g.call("proxy_grpc_close", 5) == R.OK
        assert g.call("proxy_grpc_close", 5) == R.NOT_FOUND
        assert call(g, b"Slow") == R.OK
        assert g.call("proxy_grpc_cancel", 9) == R.OK
        assert g.call("proxy_grpc_cancel", 9) == R.NOT_FOUND
        await asyncio.sleep(1.3)
        assert rec.events == []

    run(g, body)


def test_stream(g: Guest, server: GrpcServer) -> None:
    async def body(rec: Recorder) -> None:
        before = len(server.calls("Bidi"))
        assert stream(g, metadata=[(b"x-md", b"s")]) == R.OK
        token = g.u32(R3)
        assert token == 6
        for m in (b"a", b"b", b"c"):
            assert send(g, token, m) == R.OK
        received: list[bytes] = []

        def got(token: int) -> None:
            received.append(rec.events[-1][3])
            if len(received) == 3:
                assert g.call("proxy_grpc_close", token) == R.OK  # half-close: the answers still come
                assert send(g, token, b"late") == R.OK  # after closing: nothing, but OK

        rec.hooks["receive"] = got
        await rec.wait("close")
        assert rec.kinds() == ["initial", "receive", "receive", "receive", "trailing", "close"]
        assert all(e[1] is g.vm.root and e[2] == token for e in rec.events)
        _, _, _, count, pairs, other = rec.events[0]
        assert pairs == [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-init", b"1")]
        assert (count, other) == (3, R.BAD_ARGUMENT)
        assert received == [b"echo:a", b"echo:b", b"echo:c"]
        _, _, _, count, pairs = rec.events[4]
        assert pairs == [(b"grpc-status", b"0"), (b"grpc-message", b""), (b"x-trail", b"2")] and count == 3
        assert rec.events[5][3:] == (0, (0, b"via_upstream"))
        assert token not in g.vm.pending_calls  # both sides closed
        assert g.call("proxy_grpc_close", token) == R.NOT_FOUND
        seen = server.calls("Bidi")[before]
        assert seen.messages == [b"a", b"b", b"c"] and seen.metadata["x-md"] == "s"

    run(g, body)


def test_stream_failure_and_trailers_only(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert stream(g, b"BidiFail") == R.OK
        assert send(g, 6, b"a") == R.OK
        await rec.wait("close")
        assert rec.kinds() == ["initial", "receive", "trailing", "close"]
        assert rec.events[0][4] == [(b":status", b"200"), (b"content-type", b"application/grpc")]
        assert rec.events[2][4] == [(b"grpc-status", b"8"), (b"grpc-message", b"enough")]
        assert rec.events[3][3:] == (8, (8, b"enough{via_upstream}"))
        # Closed by the server only: the stream is kept until the plugin closes it too.
        assert send(g, 6, b"more") == R.OK
        assert g.call("proxy_grpc_close", 6) == R.OK
        assert g.call("proxy_grpc_close", 6) == R.NOT_FOUND
        rec.events.clear()
        assert stream(g, b"Nope") == R.OK  # an error before any message: a trailers-only answer
        await rec.wait("close")
        assert rec.kinds() == ["initial", "trailing", "close"]
        assert rec.events[0][3:5] == (0, [])
        assert rec.events[1][4] == [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                    (b"grpc-status", b"12"), (b"grpc-message", b"Method not found!")]
        assert rec.events[2][3] == 12

    run(g, body)


def test_stream_cancel(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        assert stream(g) == R.OK
        def cancel(token: int) -> None:
            assert g.call("proxy_grpc_cancel", token) == R.OK

        rec.hooks["receive"] = cancel
        assert send(g, 6, b"a") == R.OK
        assert send(g, 6, b"b") == R.OK
        await rec.wait("receive")
        await asyncio.sleep(0.3)
        assert rec.kinds() == ["initial", "receive"]  # nothing after the cancel
        assert g.vm.pending_calls == {}
        assert send(g, 6, b"c") == R.NOT_FOUND

    run(g, body)


def test_calls_outlive_the_stream_context_not_the_vm(g: Guest) -> None:
    async def body(rec: Recorder) -> None:
        ctx = g.http(Stream())
        assert call(g, b"Slow") == R.OK
        assert stream(g) == R.OK
        g.vm.log_stream(ctx)
        g.vm.finish_stream(ctx)
        assert set(g.vm.pending_calls) == {5, 6}  # owned by the root context, as in Envoy
        g.vm._cancel_calls()  # what shutting the VM down does
        assert g.vm.pending_calls == {}
        await asyncio.sleep(1.2)
        assert rec.events == []

    run(g, body)
