"""Host functions in a TCP connection's context (network plugins), and the network
callbacks' arguments, on a tiny WAT module. Behaviour through real sockets is in
test_tcp_proxy.py; the same against Envoy in test_tcp_envoy_diff.py."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from wasmgate.abi.constants import PeerType, WasmResult
from wasmgate.plugin.context import NetConnection, NetworkContext
from wat_util import OOB, RP, RS, SENTINEL, Guest, module_wat, new_vm

R = WasmResult
DOWNSTREAM, UPSTREAM = 2, 3


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest(new_vm(tmp_path, name="net", root_id="net-root"))


@pytest.fixture
def calls() -> list[tuple[str, NetworkContext, int]]:
    return []


@pytest.fixture
def conn(calls: list[tuple[str, NetworkContext, int]]) -> NetConnection:
    c = NetConnection()
    c.downstream_addr = ("10.0.0.7", 40001)
    c.local_addr = ("127.0.0.1", 15000)
    c.connection_id = 42
    c.on_continue = lambda ctx: calls.append(("continue", ctx, 0))
    c.on_close = lambda ctx, stream_type: calls.append(("close", ctx, stream_type))
    return c


@pytest.fixture
def ctx(g: Guest, conn: NetConnection) -> NetworkContext:
    ctx = g.network(conn)
    ctx.downstream_data = bytearray(b"hello world")
    ctx.upstream_data = bytearray(b"from upstream")
    return ctx


def _get(g: Guest, buffer_type: int, start: int, length: int) -> tuple[int, bytes | None]:
    g.poison(RP, RS)
    status = g.call("proxy_get_buffer_bytes", buffer_type, start, length, RP, RS)
    return status, (g.out() if status == R.OK else None)


def _set(g: Guest, buffer_type: int, start: int, length: int, data: bytes) -> int:
    p, n = g.put_str(data)
    return g.call("proxy_set_buffer_bytes", buffer_type, start, length, p, n)


def _size(g: Guest, buffer_type: int) -> tuple[int, int]:
    status = g.call("proxy_get_buffer_status", buffer_type, RP, RS)
    return status, g.u32(RP)


# ---- DOWNSTREAM_DATA / UPSTREAM_DATA ---------------------------------------------------


@pytest.mark.parametrize(("start", "length", "expected"), [(0, 5, b"hello"), (6, 100, b"world"), (0, 0xFFFFFFFF,
                         b"hello world"), (11, 5, b""), (50, 5, b"")])
def test_get_downstream_data(g: Guest, ctx: NetworkContext, start: int, length: int, expected: bytes) -> None:
    assert _get(g, DOWNSTREAM, start, length) == (R.OK, expected)


def test_get_upstream_data_and_sizes(g: Guest, ctx: NetworkContext) -> None:
    assert _get(g, UPSTREAM, 0, 100) == (R.OK, b"from upstream")
    assert _size(g, DOWNSTREAM) == (R.OK, 11)
    assert _size(g, UPSTREAM) == (R.OK, 13)


@pytest.mark.parametrize(("start", "length", "data", "expected"), [
    (0, 11, b"REPLACED", b"REPLACED"),  # replace all
    (0, 0xFFFFFFFF, b"X", b"X"),
    (0, 0, b">>", b">>hello world"),  # prepend
    (0, 5, b"HOWDY-DO", b"HOWDY-DO world"),  # the first bytes
    (11, 0, b"<<", b"hello world<<"),  # append
    (0xFFFFFFFF, 0, b"!", b"hello world!"),
])
def test_set_downstream_data(g: Guest, ctx: NetworkContext, start: int, length: int, data: bytes,
                             expected: bytes) -> None:
    buf = ctx.downstream_data
    assert _set(g, DOWNSTREAM, start, length, data) == R.OK
    assert bytes(ctx.downstream_data or b"") == expected
    assert ctx.downstream_data is buf  # the connection's own buffer, changed in place


def test_set_upstream_data(g: Guest, ctx: NetworkContext) -> None:
    assert _set(g, UPSTREAM, 0, 13, b"[redacted]") == R.OK
    assert bytes(ctx.upstream_data or b"") == b"[redacted]"


@pytest.mark.parametrize("start", [1, 10])
def test_set_inside_the_data_is_bad_argument(g: Guest, ctx: NetworkContext, start: int) -> None:
    assert _set(g, DOWNSTREAM, start, 1, b"x") == R.BAD_ARGUMENT
    assert bytes(ctx.downstream_data or b"") == b"hello world"


@pytest.mark.parametrize("context", ["network", "root", "http"])
def test_data_without_a_buffer_reads_empty_and_refuses_writes(g: Guest, conn: NetConnection, context: str) -> None:
    # Envoy: any context gets an empty, read-only buffer when there is no connection data.
    if context == "network":
        g.network(conn)
    elif context == "root":
        g.vm.effective = g.vm.root
    else:
        g.http()
    for buffer_type in (DOWNSTREAM, UPSTREAM):
        assert _get(g, buffer_type, 0, 10) == (R.OK, b"")
        assert _size(g, buffer_type) == (R.OK, 0)
        assert _set(g, buffer_type, 0, 0, b"x") == R.BAD_ARGUMENT


def test_data_after_the_connection_ended(g: Guest, ctx: NetworkContext) -> None:
    ctx.alive = False
    assert _get(g, DOWNSTREAM, 0, 10) == (R.OK, b"")
    assert _set(g, DOWNSTREAM, 0, 0, b"x") == R.BAD_ARGUMENT


def test_get_data_return_pointer_out_of_bounds(g: Guest, ctx: NetworkContext) -> None:
    assert g.call("proxy_get_buffer_bytes", DOWNSTREAM, 0, 5, OOB, RS) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_set_buffer_bytes", DOWNSTREAM, 0, 0, OOB, 4) == R.INVALID_MEMORY_ACCESS
    assert bytes(ctx.downstream_data or b"") == b"hello world"


# ---- proxy_continue_stream / proxy_close_stream -----------------------------------------


def test_continue_downstream(g: Guest, ctx: NetworkContext, calls: list[tuple[str, NetworkContext, int]]) -> None:
    assert g.call("proxy_continue_stream", 2) == R.OK
    assert calls == [("continue", ctx, 0)]


def test_continue_upstream_is_unimplemented(g: Guest, ctx: NetworkContext,
                                            calls: list[tuple[str, NetworkContext, int]]) -> None:
    assert g.call("proxy_continue_stream", 3) == R.UNIMPLEMENTED
    assert calls == []


@pytest.mark.parametrize("name", ["proxy_continue_request", "proxy_continue_response"])
def test_http_continues_do_nothing_on_a_connection(g: Guest, ctx: NetworkContext,
                                                   calls: list[tuple[str, NetworkContext, int]], name: str) -> None:
    assert g.call(name) == R.OK  # ABI 0.1.0's: Envoy answers OK, nothing happens
    assert g.call("proxy_continue_stream", 0) == R.OK
    assert g.call("proxy_continue_stream", 1) == R.OK
    assert calls == []


@pytest.mark.parametrize("stream_type", [2, 3])
def test_close_either_side_closes_the_connection(g: Guest, ctx: NetworkContext,
                                                 calls: list[tuple[str, NetworkContext, int]],
                                                 stream_type: int) -> None:
    assert g.call("proxy_close_stream", stream_type) == R.OK
    assert calls == [("close", ctx, stream_type)]


@pytest.mark.parametrize("stream_type", [0, 1])
def test_close_http_types_do_nothing_on_a_connection(g: Guest, ctx: NetworkContext,
                                                     calls: list[tuple[str, NetworkContext, int]],
                                                     stream_type: int) -> None:
    assert g.call("proxy_close_stream", stream_type) == R.OK
    assert calls == []


@pytest.mark.parametrize("name", ["proxy_continue_stream", "proxy_close_stream"])
def test_bad_stream_type(g: Guest, ctx: NetworkContext, calls: list[tuple[str, NetworkContext, int]],
                         name: str) -> None:
    assert g.call(name, 4) == R.BAD_ARGUMENT
    assert g.call(name, 0xFFFFFFFF) == R.BAD_ARGUMENT
    assert calls == []


def test_stream_calls_after_the_connection_ended(g: Guest, ctx: NetworkContext,
                                                 calls: list[tuple[str, NetworkContext, int]]) -> None:
    ctx.alive = False
    assert g.call("proxy_continue_stream", 2) == R.BAD_ARGUMENT
    assert g.call("proxy_close_stream", 2) == R.BAD_ARGUMENT
    assert calls == []


def test_local_response_on_a_connection_does_nothing(g: Guest, ctx: NetworkContext) -> None:
    p, n = g.put_str(b"nope")
    assert g.call("proxy_send_local_response", 403, 0, 0, p, n, 0, 0, 0xFFFFFFFF) == R.OK
    assert g.call("proxy_send_local_response", 403, 0, 0, OOB, 4, 0, 0, 0) == R.INVALID_MEMORY_ACCESS


def test_header_maps_are_not_available(g: Guest, ctx: NetworkContext) -> None:
    k, kn = g.put_str(b":path")
    assert g.call("proxy_get_header_map_value", 0, k, kn, RP, RS) == R.BAD_ARGUMENT
    assert g.call("proxy_add_header_map_value", 0, k, kn, k, kn) == R.BAD_ARGUMENT


# ---- properties ------------------------------------------------------------------------


def _prop(g: Guest, dotted: bytes) -> tuple[int, bytes | None]:
    pp, ps = g.put_str(dotted.replace(b".", b"\0"))
    g.poison(RP, RS)
    status = g.call("proxy_get_property", pp, ps, RP, RS)
    return status, (g.out() if status == R.OK else None)


def _i64(v: int) -> bytes:
    return struct.pack("<q", v)


def test_connection_properties(g: Guest, ctx: NetworkContext, conn: NetConnection) -> None:
    assert _prop(g, b"source.address") == (R.OK, b"10.0.0.7:40001")
    assert _prop(g, b"source.port") == (R.OK, _i64(40001))
    assert _prop(g, b"destination.address") == (R.OK, b"127.0.0.1:15000")
    assert _prop(g, b"destination.port") == (R.OK, _i64(15000))
    assert _prop(g, b"connection.id") == (R.OK, struct.pack("<Q", 42))
    assert _prop(g, b"connection.mtls") == (R.OK, b"\x00")
    assert _prop(g, b"connection.requested_server_name") == (R.OK, b"")
    assert _prop(g, b"plugin_name") == (R.OK, b"net")
    assert _prop(g, b"plugin_root_id") == (R.OK, b"net-root")
    assert _prop(g, b"upstream.address") == (R.NOT_FOUND, None)  # not connected yet
    conn.upstream_addr = ("127.0.0.1", 9000)
    assert _prop(g, b"upstream.address") == (R.OK, b"127.0.0.1:9000")
    assert _prop(g, b"upstream.port") == (R.OK, _i64(9000))


@pytest.mark.parametrize("path", [b"request.path", b"request.duration", b"response.code", b"no.such.thing"])
def test_http_properties_are_not_found(g: Guest, ctx: NetworkContext, path: bytes) -> None:
    assert _prop(g, path) == (R.NOT_FOUND, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


def test_connection_sizes_and_empty_maps(g: Guest, ctx: NetworkContext, conn: NetConnection) -> None:
    conn.bytes_received, conn.bytes_sent = 10, 7
    assert _prop(g, b"request.size") == (R.OK, _i64(10))
    assert _prop(g, b"request.total_size") == (R.OK, _i64(10))
    assert _prop(g, b"response.size") == (R.OK, _i64(7))
    assert _prop(g, b"request.headers") == (R.OK, b"\0\0\0\0")  # an empty map
    assert _prop(g, b"response.flags") == (R.OK, _i64(0))
    assert _prop(g, b"upstream.request_attempt_count") == (R.OK, struct.pack("<Q", 0))
    assert _prop(g, b"xds.cluster_name") == (R.NOT_FOUND, None)
    conn.upstream_cluster = "db"
    assert _prop(g, b"upstream.request_attempt_count") == (R.OK, struct.pack("<Q", 1))
    assert _prop(g, b"xds.cluster_name") == (R.OK, b"db")


def test_filter_state_on_the_connection(g: Guest, ctx: NetworkContext, conn: NetConnection) -> None:
    pp, ps = g.put_str(b"my_state")
    vp, vs = g.put_str(b"v1")
    assert g.call("proxy_set_property", pp, ps, vp, vs) == R.OK
    assert conn.filter_state == {b"wasm.my_state": b"v1"}  # as Envoy keys a CelState
    assert _prop(g, b"my_state") == (R.OK, b"v1")
    other = g.network(NetConnection())  # another connection has its own
    assert other is not ctx
    assert _prop(g, b"my_state") == (R.NOT_FOUND, None)


# ---- the callbacks' arguments ------------------------------------------------------------

_RECORDING = """
  (func (export "proxy_on_new_connection") (param i32) (result i32)
    (i32.store (i32.const 0x160) (local.get 0)) (i32.const 1))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32)
    (i32.store (i32.const 0x164) (local.get 1)) (i32.store (i32.const 0x168) (local.get 2)) (i32.const 0))
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32)
    (i32.store (i32.const 0x16C) (local.get 1)) (i32.store (i32.const 0x170) (local.get 2)) (i32.const 1))
  (func (export "proxy_on_downstream_connection_close") (param i32 i32)
    (i32.store (i32.const 0x174) (local.get 1)))
  (func (export "proxy_on_upstream_connection_close") (param i32 i32)
    (i32.store (i32.const 0x178) (local.get 1)))
  (func (export "proxy_on_done") (param i32) (result i32)
    (i32.store (i32.const 0x17C) (i32.add (i32.load (i32.const 0x17C)) (i32.const 1))) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)
    (i32.store (i32.const 0x180) (i32.add (i32.load (i32.const 0x17C)) (i32.const 10))))
"""


def test_network_callbacks_get_their_arguments(tmp_path: Path) -> None:
    wat = module_wat().rstrip().removesuffix(")") + _RECORDING + ")"
    g = Guest(new_vm(tmp_path, wat))
    vm = g.vm
    ctx = vm.create_network_context(NetConnection())
    assert ctx.id in vm.contexts
    assert vm.on_new_connection(ctx) == 1
    assert g.u32(0x160) == ctx.id
    assert vm.on_downstream_data(ctx, 123, True) == 0
    assert (g.u32(0x164), g.u32(0x168)) == (123, 1)
    assert vm.on_upstream_data(ctx, 7, False) == 1
    assert (g.u32(0x16C), g.u32(0x170)) == (7, 0)
    vm.on_downstream_connection_close(ctx, PeerType.REMOTE)
    vm.on_upstream_connection_close(ctx, PeerType.UNKNOWN)
    assert (g.u32(0x174), g.u32(0x178)) == (2, 0)
    vm.finish_connection(ctx)
    assert g.u32(0x180) == 11  # on_delete ran after on_done
    assert ctx.id not in vm.contexts and not ctx.alive
    vm.finish_connection(ctx)  # once only
    assert g.u32(0x17C) == 1


def test_network_callbacks_missing_are_continue(g: Guest) -> None:
    ctx = g.vm.create_network_context(NetConnection())
    assert g.vm.on_new_connection(ctx) == 0
    assert g.vm.on_downstream_data(ctx, 5, False) == 0
    assert g.vm.on_upstream_data(ctx, 5, True) == 0
    g.vm.on_downstream_connection_close(ctx, PeerType.LOCAL)
    g.vm.finish_connection(ctx)


def test_network_callbacks_in_abi_0_1_0(tmp_path: Path) -> None:
    """The network callbacks are the same in every ABI version."""
    wat = module_wat(markers=("proxy_abi_version_0_1_0",)).rstrip().removesuffix(")") + _RECORDING + ")"
    g = Guest(new_vm(tmp_path, wat))
    ctx = g.vm.create_network_context(NetConnection())
    assert g.vm.on_new_connection(ctx) == 1
    assert g.vm.on_downstream_data(ctx, 9, False) == 0
    assert (g.u32(0x164), g.u32(0x168)) == (9, 0)
    g.vm.effective = ctx
    assert g.call("proxy_continue_request") == R.OK  # 0.1.0's continue: nothing on a connection
