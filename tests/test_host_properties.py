"""proxy_get_property: plugin attributes and the stream attributes of the first subset."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from wasmgate.abi.constants import WasmResult
from wasmgate.abi.pairs import decode_pairs
from wasmgate.headers import HeaderMap
from wasmgate.host.attributes import XdsInfo
from wasmgate.plugin.context import HttpContext, Stream
from wat_util import MEMORY_SIZE, OOB, RP, RS, SENTINEL, Guest, new_vm, pairs_bytes

R = WasmResult
REQUEST = [(b":method", b"POST"), (b":path", b"/p/q?x=1&y"), (b":authority", b"svc.local"), (b":scheme", b"https"),
           (b"user-agent", b"curl/8"), (b"referer", b"http://r/"), (b"x-request-id", b"abc-123")]


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest(new_vm(tmp_path, name="props", root_id="root-x", vm_id="vm-y"))


@pytest.fixture
def ctx(g: Guest) -> HttpContext:
    s = Stream()
    s.request_headers = HeaderMap(REQUEST)
    s.response_headers = HeaderMap([(b":status", b"503"), (b"server", b"up")])
    s.downstream_addr = ("10.1.2.3", 54321)
    s.local_addr = ("127.0.0.1", 8080)
    s.code_details = "upstream reset  before"
    return g.http(s)  # every header map reachable


def _prop(g: Guest, *segments: bytes, trailing_nul: bool = False) -> tuple[int, bytes | None]:
    path = b"\0".join(segments) + (b"\0" if trailing_nul else b"")
    pp, ps = g.put_str(path)
    g.poison(RP, RS)
    status = g.call("proxy_get_property", pp, ps, RP, RS)
    return status, (g.out() if status == R.OK else None)


def _i64(v: int) -> bytes:
    return struct.pack("<q", v)


@pytest.mark.parametrize(("path", "value"), [
    (b"plugin_name", b"props"),
    (b"plugin_root_id", b"root-x"),
    (b"plugin_vm_id", b"vm-y"),
])
def test_plugin_properties_in_any_context(g: Guest, path: bytes, value: bytes) -> None:
    g.vm.effective = g.vm.root
    assert _prop(g, path) == (R.OK, value)
    g.http(Stream())
    assert _prop(g, path) == (R.OK, value)


def test_empty_plugin_property(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path))
    assert _prop(g, b"plugin_vm_id") == (R.OK, b"")
    assert (g.u32(RP), g.u32(RS)) == (0, 0)


@pytest.mark.parametrize(("segments", "value"), [
    ((b"request", b"path"), b"/p/q?x=1&y"),
    ((b"request", b"url_path"), b"/p/q"),
    ((b"request", b"query"), b"x=1&y"),
    ((b"request", b"host"), b"svc.local"),
    ((b"request", b"scheme"), b"https"),
    ((b"request", b"method"), b"POST"),
    ((b"request", b"referer"), b"http://r/"),
    ((b"request", b"useragent"), b"curl/8"),
    ((b"request", b"id"), b"abc-123"),
    ((b"request", b"protocol"), b"HTTP/1.1"),
    ((b"request", b"headers"), pairs_bytes(REQUEST)),
    ((b"response", b"code"), _i64(503)),
    ((b"response", b"headers"), pairs_bytes([(b":status", b"503"), (b"server", b"up")])),
    ((b"response", b"code_details"), b"upstream_reset__before"),
    ((b"source", b"address"), b"10.1.2.3:54321"),
    ((b"source", b"port"), _i64(54321)),
    ((b"destination", b"address"), b"127.0.0.1:8080"),
    ((b"destination", b"port"), _i64(8080)),
])
def test_stream_properties(g: Guest, ctx: HttpContext, segments: tuple[bytes, ...], value: bytes) -> None:
    assert _prop(g, *segments) == (R.OK, value)


def test_trailing_nul_is_ignored(g: Guest, ctx: HttpContext) -> None:
    assert _prop(g, b"request", b"method", trailing_nul=True) == (R.OK, b"POST")


def test_query_without_question_mark_is_empty(g: Guest, ctx: HttpContext) -> None:
    assert ctx.stream.request_headers is not None
    ctx.stream.request_headers.replace(b":path", b"/plain")
    assert _prop(g, b"request", b"query") == (R.OK, b"")
    assert _prop(g, b"request", b"url_path") == (R.OK, b"/plain")


@pytest.mark.parametrize("segments", [
    (b"request", b"nope"),
    (b"nope",),
    (b"request", b"referer", b"x"),
    (b"node", b"id"),  # Envoy 1.40 has the node under xds
    (b"cluster_name",),
])
def test_unknown_or_absent_is_not_found(g: Guest, ctx: HttpContext, segments: tuple[bytes, ...]) -> None:
    assert _prop(g, *segments) == (R.NOT_FOUND, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


def test_stream_properties_absent_before_the_stream_has_them(g: Guest) -> None:
    g.http(Stream())
    for segments in [(b"request", b"path"), (b"response", b"code"), (b"source", b"address"),
                     (b"destination", b"port"), (b"response", b"code_details"), (b"request", b"duration"),
                     (b"upstream", b"address"), (b"upstream", b"transport_failure_reason"),
                     (b"upstream_filter_state",)]:
        assert _prop(g, *segments) == (R.NOT_FOUND, None), segments


def test_stream_property_in_root_context_is_not_found(g: Guest, ctx: HttpContext) -> None:
    g.vm.effective = g.vm.root
    assert _prop(g, b"request", b"path") == (R.NOT_FOUND, None)


@pytest.mark.parametrize(("pp", "ps"), [(OOB, 8), (MEMORY_SIZE, 1), (0x1000, 0xFFFFFFFF)])
def test_path_out_of_bounds(g: Guest, ctx: HttpContext, pp: int, ps: int) -> None:
    assert g.call("proxy_get_property", pp, ps, RP, RS) == R.INVALID_MEMORY_ACCESS


@pytest.mark.parametrize(("rp", "rs"), [(OOB, RS), (RP, OOB), (MEMORY_SIZE - 2, RS)])
def test_return_pointer_out_of_bounds(g: Guest, ctx: HttpContext, rp: int, rs: int) -> None:
    pp, ps = g.put_str(b"plugin_name")
    assert g.call("proxy_get_property", pp, ps, rp, rs) == R.INVALID_MEMORY_ACCESS


def _set(g: Guest, path: bytes, value: bytes) -> int:
    pp, ps = g.put_str(path)
    vp, vs = g.put_str(value)
    return g.call("proxy_set_property", pp, ps, vp, vs)


def test_filter_state_round_trip(g: Guest, ctx: HttpContext) -> None:
    assert _prop(g, b"my_key") == (R.NOT_FOUND, None)
    assert _set(g, b"my_key", b"\x00binary\xff") == R.OK
    assert _prop(g, b"my_key") == (R.OK, b"\x00binary\xff")
    assert _set(g, b"my_key", b"v2") == R.OK
    assert _prop(g, b"my_key") == (R.OK, b"v2")
    assert ctx.stream.filter_state == {b"wasm.my_key": b"v2"}  # Envoy's CelState key
    assert _prop(g, b"filter_state", b"wasm.my_key") == (R.OK, b"v2")
    assert _prop(g, b"my_key", b"sub") == (R.NOT_FOUND, None)  # bytes have no fields


def test_filter_state_is_per_stream(g: Guest, ctx: HttpContext) -> None:
    assert _set(g, b"k", b"one") == R.OK
    g.http(Stream())
    assert _prop(g, b"k") == (R.NOT_FOUND, None)


def test_set_property_needs_a_stream(g: Guest) -> None:
    g.vm.effective = g.vm.root
    assert _set(g, b"k", b"v") == R.NOT_FOUND


def test_set_property_bad_pointers(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_set_property", OOB, 4, 0, 0) == R.INVALID_MEMORY_ACCESS
    pp, ps = g.put_str(b"k")
    assert g.call("proxy_set_property", pp, ps, OOB, 4) == R.INVALID_MEMORY_ACCESS


def test_request_timing_and_sizes(g: Guest, ctx: HttpContext) -> None:
    ctx.stream.start_ns = 1_700_000_000_000_000_000
    ctx.stream.request_bytes = 42
    ctx.stream.bytes_sent = 7
    assert _prop(g, b"request", b"time") == (R.OK, _i64(1_700_000_000_000_000_000))
    assert _prop(g, b"request", b"size") == (R.OK, _i64(42))  # no content-length: bytes received
    headers = sum(len(k) + len(v) for k, v in REQUEST)
    assert _prop(g, b"request", b"total_size") == (R.OK, _i64(42 + headers))
    assert _prop(g, b"response", b"size") == (R.OK, _i64(7))  # body bytes sent downstream
    assert _prop(g, b"request", b"duration") == (R.NOT_FOUND, None)  # until the stream completes
    ctx.stream.end_ns = ctx.stream.start_ns + 1500
    assert _prop(g, b"request", b"duration") == (R.OK, _i64(1500))
    assert ctx.stream.request_headers is not None
    ctx.stream.request_headers.add(b"content-length", b"100")
    assert _prop(g, b"request", b"size") == (R.OK, _i64(100))  # Envoy prefers content-length
    ctx.stream.request_headers.replace(b"content-length", b"x")
    assert _prop(g, b"request", b"size") == (R.NOT_FOUND, None)


def test_connection_and_upstream(g: Guest, ctx: HttpContext) -> None:
    ctx.stream.connection_id = 9
    assert _prop(g, b"connection", b"id") == (R.OK, struct.pack("<Q", 9))
    assert _prop(g, b"connection_id") == (R.OK, struct.pack("<Q", 9))
    assert _prop(g, b"connection", b"mtls") == (R.OK, b"\x00")
    assert _prop(g, b"connection", b"requested_server_name") == (R.OK, b"")
    assert _prop(g, b"connection", b"tls_version") == (R.NOT_FOUND, None)  # plain TCP
    assert _prop(g, b"upstream", b"request_attempt_count") == (R.OK, struct.pack("<Q", 0))
    ctx.stream.attempts = 1
    assert _prop(g, b"upstream", b"request_attempt_count") == (R.OK, struct.pack("<Q", 1))
    assert _prop(g, b"upstream", b"transport_failure_reason") == (R.OK, b"")
    assert _prop(g, b"upstream", b"address") == (R.NOT_FOUND, None)  # not connected yet
    ctx.stream.upstream_addr = ("127.0.0.1", 9000)
    assert _prop(g, b"upstream", b"address") == (R.OK, b"127.0.0.1:9000")
    assert _prop(g, b"upstream", b"port") == (R.OK, _i64(9000))
    assert _prop(g, b"upstream", b"locality") == (R.OK, b"")  # an empty Locality message
    assert _prop(g, b"upstream_filter_state") == (R.SERIALIZATION_FAILURE, None)


@pytest.mark.parametrize("top", [b"request", b"response", b"connection", b"upstream", b"source", b"destination",
                                 b"xds", b"filter_state"])
def test_wrapper_maps_cannot_be_read_whole(g: Guest, ctx: HttpContext, top: bytes) -> None:
    ctx.stream.attempts = 1
    assert _prop(g, top) == (R.SERIALIZATION_FAILURE, None)


def test_response_attributes(g: Guest, ctx: HttpContext) -> None:
    assert _prop(g, b"response", b"flags") == (R.OK, _i64(0))
    assert _prop(g, b"response", b"grpc_status") == (R.OK, _i64(14))  # from HTTP 503
    assert ctx.stream.response_headers is not None
    ctx.stream.response_headers.add(b"grpc-status", b"5")
    assert _prop(g, b"response", b"grpc_status") == (R.OK, _i64(5))
    ctx.stream.response_headers.replace(b"grpc-status", b"99")
    assert _prop(g, b"response", b"grpc_status") == (R.OK, _i64(-1))
    assert _prop(g, b"response", b"trailers") == (R.OK, struct.pack("<I", 0))  # an empty map
    ctx.stream.response_flags = 0x20
    assert _prop(g, b"response", b"flags") == (R.OK, _i64(0x20))


def test_header_map_attributes(g: Guest, ctx: HttpContext) -> None:
    """Each name once, repeated values joined by ',', as Envoy's CEL header maps."""
    assert ctx.stream.request_headers is not None
    ctx.stream.request_headers.add(b"x-dup", b"a")
    ctx.stream.request_headers.add(b"x-dup", b"b")
    status, value = _prop(g, b"request", b"headers")
    assert status == R.OK and value is not None
    assert decode_pairs(value) == [*REQUEST, (b"x-dup", b"a,b")]
    assert _prop(g, b"request", b"headers", b"x-dup") == (R.OK, b"a,b")
    assert _prop(g, b"request", b"headers", b"User-Agent") == (R.OK, b"curl/8")
    assert _prop(g, b"request", b"headers", b"bad name") == (R.NOT_FOUND, None)
    assert _prop(g, b"request", b"headers", b"x-missing") == (R.NOT_FOUND, None)


def test_xds_attributes(g: Guest, ctx: HttpContext) -> None:
    g.vm.xds = XdsInfo(node={"id": "sidecar~10.0.0.1~pod.ns", "cluster": "gateway",
                             "metadata": {"WORKLOAD_NAME": "web", "N": 3}},
                       route_name="r1", route_metadata={"filter_metadata": {"ns": {"k": "v"}}},
                       listener_direction=2)
    assert _prop(g, b"xds", b"cluster_name") == (R.OK, b"upstream")
    assert _prop(g, b"xds", b"route_name") == (R.OK, b"r1")
    assert _prop(g, b"xds", b"virtual_host_name") == (R.OK, b"")
    assert _prop(g, b"xds", b"listener_direction") == (R.OK, _i64(2))
    # messages: serialized protobuf whole, fields by name below
    assert _prop(g, b"xds", b"route_metadata") == (  # Metadata{filter_metadata: {ns: Struct{k: "v"}}}
        R.OK, b"\x0a\x10\x0a\x02ns\x12\x0a\x0a\x08\x0a\x01k\x12\x03\x1a\x01v")
    assert _prop(g, b"xds", b"route_metadata", b"filter_metadata", b"ns", b"k") == (R.OK, b"v")
    assert _prop(g, b"xds", b"cluster_metadata") == (R.OK, b"")  # none configured: empty
    assert _prop(g, b"xds", b"upstream_host_metadata") == (R.NOT_FOUND, None)  # no upstream yet
    ctx.stream.upstream_addr = ("127.0.0.1", 1)
    assert _prop(g, b"xds", b"upstream_host_metadata") == (R.SERIALIZATION_FAILURE, None)  # Envoy: null
    assert _prop(g, b"xds", b"node", b"id") == (R.OK, b"sidecar~10.0.0.1~pod.ns")
    assert _prop(g, b"xds", b"node", b"metadata", b"WORKLOAD_NAME") == (R.OK, b"web")
    assert _prop(g, b"xds", b"node", b"metadata", b"N") == (R.OK, struct.pack("<d", 3.0))
    assert _prop(g, b"xds", b"node", b"metadata", b"MISSING") == (R.NOT_FOUND, None)
    assert _prop(g, b"xds", b"node", b"nope") == (R.NOT_FOUND, None)
    assert _prop(g, b"metadata") == (R.OK, b"")  # dynamic metadata: none
    assert _prop(g, b"metadata", b"filter_metadata") == (R.OK, struct.pack("<I", 0))
    g.vm.effective = g.vm.root  # no stream: only the node
    assert _prop(g, b"xds", b"node", b"cluster") == (R.OK, b"gateway")
    assert _prop(g, b"xds", b"route_name") == (R.NOT_FOUND, None)


def test_header_attributes_follow_map_reachability(g: Guest, ctx: HttpContext) -> None:
    """As Envoy: once the request headers have moved on, request.path is NotFound and
    request.headers an empty map."""
    ctx.open_maps = 0
    assert _prop(g, b"request", b"path") == (R.NOT_FOUND, None)
    assert _prop(g, b"request", b"headers") == (R.OK, struct.pack("<I", 0))
    assert _prop(g, b"request", b"protocol") == (R.OK, b"HTTP/1.1")
    assert _prop(g, b"response", b"code") == (R.OK, _i64(503))
    ctx.logging = True  # on_log sees everything again
    assert _prop(g, b"request", b"path") == (R.OK, b"/p/q?x=1&y")
