"""Header map host functions: proxy_{get,add,replace,remove}_header_map_value, *_pairs, *_size."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasmgate.abi.constants import MapType, WasmResult
from wasmgate.headers import HeaderMap
from wasmgate.host import headers as host_headers
from wasmgate.plugin.context import HttpContext, Stream
from wat_util import MEMORY_SIZE, OOB, R2, RP, RS, SENTINEL, Guest, pairs_bytes

R = WasmResult
REQ = MapType.REQUEST_HEADERS
REQ_TRAILERS = MapType.REQUEST_TRAILERS
RESP = MapType.RESPONSE_HEADERS

REQUEST = [
    (b":method", b"GET"),
    (b":path", b"/a?b=1"),
    (b":authority", b"example.com"),
    (b":scheme", b"http"),
    (b"x-multi", b"one"),
    (b"accept", b"*/*"),
    (b"x-multi", b"two"),
    (b"x-empty", b""),
]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


def _stream(response: bool = True) -> Stream:
    s = Stream()
    s.request_headers = HeaderMap(REQUEST)
    if response:
        s.response_headers = HeaderMap(RESPONSE)
    return s


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest.new(tmp_path)


@pytest.fixture
def ctx(g: Guest) -> HttpContext:
    return g.http(_stream())


def _get(g: Guest, map_type: int, key: bytes) -> tuple[int, bytes | None]:
    kp, ks = g.put_str(key)
    g.poison(RP, RS)
    status = g.call("proxy_get_header_map_value", map_type, kp, ks, RP, RS)
    return status, (g.out() if status == R.OK else None)


def _kv_call(g: Guest, name: str, map_type: int, key: bytes, value: bytes) -> int:
    kp, ks = g.put_str(key)
    vp, vs = g.put_str(value)
    return g.call(name, map_type, kp, ks, vp, vs)


def _pairs(ctx: HttpContext, map_type: int = REQ) -> list[tuple[bytes, bytes]]:
    hmap = ctx.stream.header_map(map_type)
    assert hmap is not None
    return list(hmap.pairs)


# ---- proxy_get_header_map_value ------------------------------------------------------


@pytest.mark.parametrize(
    ("map_type", "key", "value"),
    [
        (REQ, b":method", b"GET"),
        (REQ, b":path", b"/a?b=1"),
        (REQ, b":authority", b"example.com"),
        (REQ, b":scheme", b"http"),
        (REQ, b"accept", b"*/*"),
        (RESP, b":status", b"200"),
        (RESP, b"content-type", b"text/plain"),
    ],
)
def test_get_value_ok(g: Guest, ctx: HttpContext, map_type: int, key: bytes, value: bytes) -> None:
    assert _get(g, map_type, key) == (R.OK, value)


def test_get_value_is_case_insensitive(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, REQ, b"Content-Type") == (R.NOT_FOUND, None)
    assert _get(g, RESP, b"Content-TYPE") == (R.OK, b"text/plain")
    assert _get(g, REQ, b"ACCEPT") == (R.OK, b"*/*")


def test_get_value_returns_first_of_repeated(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, REQ, b"x-multi") == (R.OK, b"one")


@pytest.mark.parametrize("key", [b"host", b"Host", b"HOST"])
def test_get_value_host_answers_from_authority(g: Guest, ctx: HttpContext, key: bytes) -> None:
    assert _get(g, REQ, key) == (R.OK, b"example.com")


def test_get_value_empty_value_is_ok_with_null_pointer(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, REQ, b"x-empty") == (R.OK, b"")
    assert (g.u32(RP), g.u32(RS)) == (0, 0)


def test_get_value_copies_into_guest_allocated_memory(g: Guest, ctx: HttpContext) -> None:
    heap = g.call("heap")
    assert _get(g, REQ, b":authority") == (R.OK, b"example.com")
    assert g.u32(RP) == heap
    assert g.call("heap") == heap + len(b"example.com")


def test_get_value_missing_is_not_found_and_leaves_outputs(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, REQ, b"x-nope") == (R.NOT_FOUND, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


@pytest.mark.parametrize("map_type", [8, 9, 0x7FFFFFFF, 0xFFFFFFFF])
def test_get_value_bad_map_type(g: Guest, ctx: HttpContext, map_type: int) -> None:
    assert _get(g, map_type, b":path") == (R.BAD_ARGUMENT, None)


def test_get_value_unavailable_map_is_bad_argument(g: Guest) -> None:
    g.http(_stream(), open_maps=1 << RESP)  # request headers no longer in front of the filter
    assert _get(g, REQ, b":path") == (R.BAD_ARGUMENT, None)
    assert _get(g, RESP, b":status") == (R.OK, b"200")


def test_get_value_map_not_yet_received_is_bad_argument(g: Guest) -> None:
    g.http(_stream(response=False))
    assert _get(g, RESP, b":status") == (R.BAD_ARGUMENT, None)


@pytest.mark.parametrize("map_type", [4, 5, 6, 7])
def test_get_value_maps_without_source_are_bad_argument(g: Guest, ctx: HttpContext, map_type: int) -> None:
    assert _get(g, map_type, b"grpc-status") == (R.BAD_ARGUMENT, None)


def test_get_value_in_root_context_is_bad_argument(g: Guest) -> None:
    g.vm.effective = g.vm.root
    assert _get(g, REQ, b":path") == (R.BAD_ARGUMENT, None)


def test_get_value_while_logging_reads_every_map(g: Guest) -> None:
    g.http(_stream(), open_maps=0, logging=True)
    assert _get(g, REQ, b":path") == (R.OK, b"/a?b=1")
    assert _get(g, RESP, b":status") == (R.OK, b"200")


def test_get_value_while_logging_missing_map_is_not_found(g: Guest) -> None:
    g.http(_stream(response=False), open_maps=0, logging=True)
    assert _get(g, RESP, b":status") == (R.NOT_FOUND, None)


def test_get_value_while_logging_bad_map_type_is_bad_argument(g: Guest) -> None:
    g.http(_stream(), open_maps=0, logging=True)
    assert _get(g, 8, b":path") == (R.BAD_ARGUMENT, None)


def test_get_value_request_trailers_exist_empty_once_headers_do(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, REQ_TRAILERS, b"grpc-status") == (R.NOT_FOUND, None)
    assert ctx.stream.request_trailers is not None
    assert ctx.stream.request_trailers.pairs == []


@pytest.mark.parametrize(("kp", "ks"), [(OOB, 4), (MEMORY_SIZE, 1), (MEMORY_SIZE - 2, 4), (0x1000, 0xFFFFFFFF)])
def test_get_value_key_out_of_bounds(g: Guest, ctx: HttpContext, kp: int, ks: int) -> None:
    g.poison(RP, RS)
    assert g.call("proxy_get_header_map_value", REQ, kp, ks, RP, RS) == R.INVALID_MEMORY_ACCESS
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


@pytest.mark.parametrize(("rp", "rs"), [(OOB, RS), (RP, OOB), (MEMORY_SIZE - 2, RS), (RP, MEMORY_SIZE)])
def test_get_value_return_pointer_out_of_bounds(g: Guest, ctx: HttpContext, rp: int, rs: int) -> None:
    kp, ks = g.put_str(b":method")
    assert g.call("proxy_get_header_map_value", REQ, kp, ks, rp, rs) == R.INVALID_MEMORY_ACCESS


@pytest.mark.parametrize("heap", [0, MEMORY_SIZE - 2, OOB])
def test_get_value_bad_allocation_is_invalid_memory_access(g: Guest, ctx: HttpContext, heap: int) -> None:
    g.call("set_heap", heap)  # the allocator now returns a null or out-of-bounds pointer
    kp, ks = g.put_str(b":method")
    assert g.call("proxy_get_header_map_value", REQ, kp, ks, RP, RS) == R.INVALID_MEMORY_ACCESS


# ---- proxy_get_header_map_pairs ------------------------------------------------------


def _get_pairs(g: Guest, map_type: int) -> tuple[int, bytes | None]:
    g.poison(RP, RS)
    status = g.call("proxy_get_header_map_pairs", map_type, RP, RS)
    return status, (g.out() if status == R.OK else None)


def test_get_pairs_request_exact_bytes(g: Guest, ctx: HttpContext) -> None:
    status, data = _get_pairs(g, REQ)
    assert status == R.OK
    assert data == pairs_bytes(REQUEST)
    assert data[:4] == b"\x08\x00\x00\x00"
    assert data[4:12] == b"\x07\x00\x00\x00\x03\x00\x00\x00"  # len(":method"), len("GET")
    assert data.endswith(b"x-empty\0\0")


def test_get_pairs_response_exact_bytes(g: Guest, ctx: HttpContext) -> None:
    expected = (b"\x02\x00\x00\x00" + b"\x07\x00\x00\x00\x03\x00\x00\x00" + b"\x0c\x00\x00\x00\x0a\x00\x00\x00"
                + b":status\x00200\x00content-type\x00text/plain\x00")
    assert _get_pairs(g, RESP) == (R.OK, expected)


def test_get_pairs_reflects_mutations(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", RESP, b"X-Added", b"yes") == R.OK
    assert _get_pairs(g, RESP) == (R.OK, pairs_bytes([*RESPONSE, (b"x-added", b"yes")]))


def test_get_pairs_empty_map_is_ok_with_null_pointer(g: Guest, ctx: HttpContext) -> None:
    assert _get_pairs(g, REQ_TRAILERS) == (R.OK, b"")
    assert (g.u32(RP), g.u32(RS)) == (0, 0)


def test_get_pairs_unavailable_map_reads_as_empty(g: Guest) -> None:
    g.http(_stream(), open_maps=0)
    assert _get_pairs(g, REQ) == (R.OK, b"")
    assert (g.u32(RP), g.u32(RS)) == (0, 0)


def test_get_pairs_while_logging(g: Guest) -> None:
    g.http(_stream(response=False), open_maps=0, logging=True)
    assert _get_pairs(g, REQ) == (R.OK, pairs_bytes(REQUEST))
    assert _get_pairs(g, RESP) == (R.NOT_FOUND, None)


@pytest.mark.parametrize("map_type", [8, 0xFFFFFFFF])
def test_get_pairs_bad_map_type(g: Guest, ctx: HttpContext, map_type: int) -> None:
    assert _get_pairs(g, map_type) == (R.BAD_ARGUMENT, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


@pytest.mark.parametrize(("rp", "rs"), [(OOB, RS), (RP, OOB), (MEMORY_SIZE - 3, RS)])
def test_get_pairs_return_pointer_out_of_bounds(g: Guest, ctx: HttpContext, rp: int, rs: int) -> None:
    assert g.call("proxy_get_header_map_pairs", REQ, rp, rs) == R.INVALID_MEMORY_ACCESS


def test_get_pairs_empty_with_return_pointer_out_of_bounds(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_get_header_map_pairs", REQ_TRAILERS, OOB, RS) == R.INVALID_MEMORY_ACCESS


@pytest.mark.parametrize("heap", [0, MEMORY_SIZE - 16])
def test_get_pairs_bad_allocation(g: Guest, ctx: HttpContext, heap: int) -> None:
    g.call("set_heap", heap)
    assert g.call("proxy_get_header_map_pairs", REQ, RP, RS) == R.INVALID_MEMORY_ACCESS


# ---- proxy_set_header_map_pairs ------------------------------------------------------


def _set_pairs(g: Guest, map_type: int, data: bytes) -> int:
    p, n = g.put_str(data)
    return g.call("proxy_set_header_map_pairs", map_type, p, n)


def test_set_pairs_replaces_map(g: Guest, ctx: HttpContext) -> None:
    new = [(b"X-A", b"1"), (b":Path", b"/new"), (b"x-a", b"2"), (b":method", b"POST")]
    assert _set_pairs(g, REQ, pairs_bytes(new)) == R.OK
    assert _pairs(ctx) == [(b":path", b"/new"), (b":method", b"POST"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert _get_pairs(g, REQ) == (R.OK, pairs_bytes(_pairs(ctx)))


def test_set_pairs_on_trailers(g: Guest, ctx: HttpContext) -> None:
    assert _set_pairs(g, REQ_TRAILERS, pairs_bytes([(b"Grpc-Status", b"0")])) == R.OK
    assert _pairs(ctx, REQ_TRAILERS) == [(b"grpc-status", b"0")]


@pytest.mark.parametrize("data", [b"", b"\0\0\0\0"])
def test_set_pairs_empty_clears_map(g: Guest, ctx: HttpContext, data: bytes) -> None:
    assert _set_pairs(g, RESP, data) == R.OK
    assert _pairs(ctx, RESP) == []


@pytest.mark.parametrize(
    "data",
    [
        b"\x01\x00",  # shorter than the count
        b"\x02\x00\x00\x00\x01\x00\x00\x00",  # sizes missing
        b"\x01\x00\x00\x00\x05\x00\x00\x00\x05\x00\x00\x00abc\0",  # strings truncated
    ],
)
def test_set_pairs_malformed_is_bad_argument(g: Guest, ctx: HttpContext, data: bytes) -> None:
    assert _set_pairs(g, REQ, data) == R.BAD_ARGUMENT
    assert _pairs(ctx) == REQUEST


@pytest.mark.parametrize(("p", "n"), [(OOB, 0x100), (MEMORY_SIZE - 4, 8), (0x1000, 0xFFFFFFFF)])
def test_set_pairs_out_of_bounds(g: Guest, ctx: HttpContext, p: int, n: int) -> None:
    assert g.call("proxy_set_header_map_pairs", REQ, p, n) == R.INVALID_MEMORY_ACCESS
    assert _pairs(ctx) == REQUEST


# ---- proxy_get_header_map_size -------------------------------------------------------


def test_get_size_host_function(g: Guest, ctx: HttpContext) -> None:
    # The Python implementation, called directly (the import signature is tested below).
    vm = g.vm
    expected = sum(len(k) + len(v) for k, v in REQUEST)
    assert host_headers.proxy_get_header_map_size(vm, REQ, R2) == R.OK
    assert g.u32(R2) == expected == 89
    assert host_headers.proxy_get_header_map_size(vm, REQ_TRAILERS, R2) == R.OK
    assert g.u32(R2) == 0
    assert host_headers.proxy_get_header_map_size(vm, 8, R2) == R.BAD_ARGUMENT
    assert host_headers.proxy_get_header_map_size(vm, REQ, OOB) == R.INVALID_MEMORY_ACCESS
    ctx.open_maps = 0
    assert host_headers.proxy_get_header_map_size(vm, REQ, R2) == R.BAD_ARGUMENT


def test_get_size_through_abi_import(g: Guest, ctx: HttpContext) -> None:
    g.poison(RS)
    assert g.call("proxy_get_header_map_size", RESP, RS) == R.OK
    assert g.u32(RS) == len(b":status200content-typetext/plain")


def test_get_size_through_abi_import_bad_map_type(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_get_header_map_size", 8, RS) == R.BAD_ARGUMENT


# ---- proxy_add_header_map_value ------------------------------------------------------


def test_add_appends_lower_cased(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", REQ, b"X-New", b"Value") == R.OK
    assert _pairs(ctx) == [*REQUEST, (b"x-new", b"Value")]


def test_add_existing_key_keeps_both(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", REQ, b"accept", b"text/html") == R.OK
    assert _pairs(ctx)[-2:] == [(b"x-empty", b""), (b"accept", b"text/html")]
    assert _get(g, REQ, b"accept") == (R.OK, b"*/*")


def test_add_pseudo_header_stays_in_front(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", RESP, b"x-a", b"1") == R.OK
    assert _kv_call(g, "proxy_add_header_map_value", RESP, b":Custom", b"c") == R.OK
    assert _pairs(ctx, RESP) == [(b":status", b"200"), (b":custom", b"c"), *RESPONSE[1:], (b"x-a", b"1")]


def test_add_empty_value(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", RESP, b"x-e", b"") == R.OK
    assert _pairs(ctx, RESP) == [*RESPONSE, (b"x-e", b"")]


def test_add_to_trailers(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_add_header_map_value", MapType.RESPONSE_TRAILERS, b"X-T", b"t") == R.OK
    assert _pairs(ctx, MapType.RESPONSE_TRAILERS) == [(b"x-t", b"t")]


# ---- proxy_replace_header_map_value --------------------------------------------------


def test_replace_keeps_first_position_and_drops_repeats(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_replace_header_map_value", REQ, b"X-Multi", b"three") == R.OK
    assert _pairs(ctx) == [*REQUEST[:4], (b"x-multi", b"three"), (b"accept", b"*/*"), (b"x-empty", b"")]


def test_replace_pseudo_header(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_replace_header_map_value", REQ, b":path", b"/rewritten") == R.OK
    assert _get(g, REQ, b":path") == (R.OK, b"/rewritten")
    assert _pairs(ctx)[1] == (b":path", b"/rewritten")
    assert len(_pairs(ctx)) == len(REQUEST)


def test_replace_missing_adds(g: Guest, ctx: HttpContext) -> None:
    assert _kv_call(g, "proxy_replace_header_map_value", RESP, b"X-Fresh", b"1") == R.OK
    assert _pairs(ctx, RESP) == [*RESPONSE, (b"x-fresh", b"1")]


def test_replace_missing_pseudo_header_goes_in_front(g: Guest, ctx: HttpContext) -> None:
    ctx.stream.request_headers = HeaderMap([(b"accept", b"*/*")])
    assert _kv_call(g, "proxy_replace_header_map_value", REQ, b":method", b"PUT") == R.OK
    assert _pairs(ctx) == [(b":method", b"PUT"), (b"accept", b"*/*")]


# ---- proxy_remove_header_map_value ---------------------------------------------------


def _remove(g: Guest, map_type: int, key: bytes) -> int:
    kp, ks = g.put_str(key)
    return g.call("proxy_remove_header_map_value", map_type, kp, ks)


def test_remove_removes_every_value(g: Guest, ctx: HttpContext) -> None:
    assert _remove(g, REQ, b"X-MULTI") == R.OK
    assert _pairs(ctx) == [p for p in REQUEST if p[0] != b"x-multi"]
    assert _get(g, REQ, b"x-multi") == (R.NOT_FOUND, None)


def test_remove_pseudo_header(g: Guest, ctx: HttpContext) -> None:
    assert _remove(g, RESP, b":status") == R.OK
    assert _pairs(ctx, RESP) == [(b"content-type", b"text/plain")]


def test_remove_missing_is_ok(g: Guest, ctx: HttpContext) -> None:
    assert _remove(g, REQ, b"x-nope") == R.OK
    assert _pairs(ctx) == REQUEST


def test_remove_key_out_of_bounds(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_remove_header_map_value", REQ, OOB, 0x100) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_remove_header_map_value", REQ, MEMORY_SIZE, 1) == R.INVALID_MEMORY_ACCESS
    assert _pairs(ctx) == REQUEST


# ---- shared argument checks of the mutating functions --------------------------------


def _mutate(g: Guest, name: str, map_type: int) -> int:
    if name == "proxy_remove_header_map_value":
        return _remove(g, map_type, b"accept")
    if name == "proxy_set_header_map_pairs":
        return _set_pairs(g, map_type, pairs_bytes([(b"a", b"b")]))
    return _kv_call(g, name, map_type, b"accept", b"x")


MUTATORS = ["proxy_add_header_map_value", "proxy_replace_header_map_value", "proxy_remove_header_map_value",
            "proxy_set_header_map_pairs"]


@pytest.mark.parametrize("name", MUTATORS)
@pytest.mark.parametrize("map_type", [8, 0xFFFFFFFF])
def test_mutate_bad_map_type(g: Guest, ctx: HttpContext, name: str, map_type: int) -> None:
    assert _mutate(g, name, map_type) == R.BAD_ARGUMENT
    assert _pairs(ctx) == REQUEST


@pytest.mark.parametrize("name", MUTATORS)
def test_mutate_unavailable_map(g: Guest, name: str) -> None:
    ctx = g.http(_stream(), open_maps=1 << RESP)
    assert _mutate(g, name, REQ) == R.BAD_ARGUMENT
    assert _pairs(ctx) == REQUEST


@pytest.mark.parametrize("name", MUTATORS)
def test_mutate_while_logging_is_refused(g: Guest, name: str) -> None:
    ctx = g.http(_stream(), open_maps=0xFF, logging=True)
    assert _mutate(g, name, REQ) == R.BAD_ARGUMENT
    assert _pairs(ctx) == REQUEST


@pytest.mark.parametrize("name", MUTATORS)
def test_mutate_in_root_context(g: Guest, name: str) -> None:
    g.vm.effective = g.vm.root
    assert _mutate(g, name, REQ) == R.BAD_ARGUMENT


@pytest.mark.parametrize("name", ["proxy_add_header_map_value", "proxy_replace_header_map_value"])
@pytest.mark.parametrize(("kp", "ks", "vp", "vs"), [
    (OOB, 0x100, 0x1000, 1),
    (0x1000, 1, OOB, 0x100),
    (MEMORY_SIZE, 1, 0x1000, 1),
    (0x1000, 1, MEMORY_SIZE - 1, 2),
])
def test_kv_out_of_bounds(g: Guest, ctx: HttpContext, name: str, kp: int, ks: int, vp: int, vs: int) -> None:
    assert g.call(name, REQ, kp, ks, vp, vs) == R.INVALID_MEMORY_ACCESS
    assert _pairs(ctx) == REQUEST
