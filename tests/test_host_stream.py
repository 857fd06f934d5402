"""Stream control host functions: local replies, continue, close, clear_route_cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasmgate.abi.constants import WasmResult
from wasmgate.plugin.context import HttpContext, LocalReply, Stream, StreamHooks
from wat_util import MEMORY_SIZE, OOB, Guest, pairs_bytes

R = WasmResult


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest.new(tmp_path)


@pytest.fixture
def calls() -> list[tuple[HttpContext, int]]:
    return []


@pytest.fixture
def ctx(g: Guest, calls: list[tuple[HttpContext, int]]) -> HttpContext:
    class Hooks(StreamHooks):
        def on_continue(self, ctx: HttpContext, stream_type: int) -> None:
            calls.append((ctx, stream_type))

    s = Stream()
    s.hooks = Hooks()
    return g.http(s)


def _reply(g: Guest, status: int, details: bytes = b"", body: bytes = b"", headers: bytes = b"",
           grpc_status: int = 0xFFFFFFFF) -> int:
    dp, ds = g.put_str(details)
    bp, bs = g.put_str(body)
    hp, hs = g.put_str(headers)
    return g.call("proxy_send_local_response", status, dp, ds, bp, bs, hp, hs, grpc_status)


# ---- proxy_send_local_response -------------------------------------------------------


def test_local_response_stored(g: Guest, ctx: HttpContext) -> None:
    headers = pairs_bytes([(b"X-Reason", b"Policy"), (b"content-type", b"text/plain")])
    assert _reply(g, 403, b"denied_by_wasm", b"nope\n", headers) == R.OK
    assert ctx.stream.local_reply == LocalReply(
        403, b"nope\n", [(b"x-reason", b"Policy"), (b"content-type", b"text/plain")], "denied_by_wasm", -1)


def test_local_response_headers_on_later_streams(g: Guest) -> None:
    """A plugin's next replies, on new streams, carry their own headers: the same bytes
    again, different ones, none, and bad ones (refused, then the good ones still work)."""
    a = pairs_bytes([(b"X-Reason", b"Policy")])
    b = pairs_bytes([(b"x-reason", b"other"), (b"x-more", b"1")])
    for raw, want, result in [(a, [(b"x-reason", b"Policy")], R.OK), (a, [(b"x-reason", b"Policy")], R.OK),
                              (b, [(b"x-reason", b"other"), (b"x-more", b"1")], R.OK), (b"", [], R.OK),
                              (b"\x01\x00", None, R.BAD_ARGUMENT), (a, [(b"x-reason", b"Policy")], R.OK)]:
        ctx = g.http(Stream())
        assert _reply(g, 403, headers=raw) == result
        reply = ctx.stream.local_reply
        assert (reply.headers if reply is not None else None) == want


def test_local_response_empty_parts(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_send_local_response", 200, 0, 0, 0, 0, 0, 0, 14) == R.OK
    assert ctx.stream.local_reply == LocalReply(200, b"", [], "", 14)


def test_local_response_first_one_wins(g: Guest, ctx: HttpContext) -> None:
    assert _reply(g, 401, body=b"first") == R.OK
    assert _reply(g, 500, body=b"second") == R.OK
    assert ctx.stream.local_reply == LocalReply(401, b"first", [], "", -1)


def test_local_response_invalid_utf8_details(g: Guest, ctx: HttpContext) -> None:
    assert _reply(g, 418, details=b"bad\xff") == R.OK
    assert ctx.stream.local_reply is not None
    assert ctx.stream.local_reply.details == "bad\ufffd"


@pytest.mark.parametrize("headers", [
    b"\x01\x00",  # shorter than the count
    b"\x03\x00\x00\x00",  # sizes missing
    b"\x01\x00\x00\x00\x04\x00\x00\x00\x04\x00\x00\x00ab",  # strings truncated
])
def test_local_response_bad_pairs(g: Guest, ctx: HttpContext, headers: bytes) -> None:
    assert _reply(g, 403, headers=headers) == R.BAD_ARGUMENT
    assert ctx.stream.local_reply is None


@pytest.mark.parametrize("status", [0, 99, 1000, 0xFFFFFFFF])
def test_local_response_bad_status(g: Guest, ctx: HttpContext, status: int) -> None:
    assert _reply(g, status) == R.BAD_ARGUMENT
    assert ctx.stream.local_reply is None


@pytest.mark.parametrize("status", [100, 999])
def test_local_response_status_bounds(g: Guest, ctx: HttpContext, status: int) -> None:
    assert _reply(g, status) == R.OK
    assert ctx.stream.local_reply is not None
    assert ctx.stream.local_reply.status == status


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize(("ptr", "size"), [(OOB, 0x100), (MEMORY_SIZE, 1), (0x1000, 0xFFFFFFFF)])
def test_local_response_out_of_bounds(g: Guest, ctx: HttpContext, which: int, ptr: int, size: int) -> None:
    args = [0x1000, 1, 0x1000, 1, 0x1000, 0]
    args[2 * which], args[2 * which + 1] = ptr, size
    assert g.call("proxy_send_local_response", 403, *args, 0) == R.INVALID_MEMORY_ACCESS
    assert ctx.stream.local_reply is None


def test_local_response_in_root_context(g: Guest) -> None:
    # Envoy: OK and nothing happens (test_envoy_diff.py, the pause plugin's on_tick).
    g.vm.effective = g.vm.root
    assert _reply(g, 403) == R.OK
    dp, ds = g.put_str(b"")
    assert g.call("proxy_send_local_response", 403, dp, ds, 0xFFFFFF00, 8, dp, ds, 0) == R.INVALID_MEMORY_ACCESS


def test_local_response_after_stream_finished(g: Guest, ctx: HttpContext) -> None:
    ctx.alive = False
    assert _reply(g, 403) == R.BAD_ARGUMENT
    assert ctx.stream.local_reply is None


# ---- proxy_continue_stream / proxy_continue_request / proxy_continue_response ---------


@pytest.mark.parametrize("stream_type", [0, 1])
def test_continue_http_direction(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]],
                                 stream_type: int) -> None:
    assert g.call("proxy_continue_stream", stream_type) == R.OK
    assert calls == [(ctx, stream_type)]


def test_continue_downstream_is_ok(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]]) -> None:
    assert g.call("proxy_continue_stream", 2) == R.OK
    assert calls == []


def test_continue_upstream_is_unimplemented(g: Guest, ctx: HttpContext,
                                            calls: list[tuple[HttpContext, int]]) -> None:
    assert g.call("proxy_continue_stream", 3) == R.UNIMPLEMENTED
    assert calls == []


@pytest.mark.parametrize("stream_type", [4, 100, 0xFFFFFFFF])
def test_continue_bad_stream_type(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]],
                                  stream_type: int) -> None:
    assert g.call("proxy_continue_stream", stream_type) == R.BAD_ARGUMENT
    assert calls == []


def test_continue_without_hook_is_ok(g: Guest) -> None:
    g.http(Stream())
    assert g.call("proxy_continue_stream", 0) == R.OK


@pytest.mark.parametrize("stream_type", [0, 1, 2, 3])
def test_continue_in_root_context(g: Guest, stream_type: int) -> None:
    g.vm.effective = g.vm.root
    assert g.call("proxy_continue_stream", stream_type) == R.BAD_ARGUMENT


def test_continue_after_stream_finished(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]]) -> None:
    ctx.alive = False
    assert g.call("proxy_continue_stream", 0) == R.BAD_ARGUMENT
    assert calls == []


@pytest.mark.parametrize(("name", "stream_type"), [("proxy_continue_request", 0), ("proxy_continue_response", 1)])
def test_continue_abi_0_1_0(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]], name: str,
                            stream_type: int) -> None:
    assert g.call(name) == R.OK
    assert calls == [(ctx, stream_type)]
    g.vm.effective = g.vm.root
    assert g.call(name) == R.BAD_ARGUMENT
    assert len(calls) == 1


# ---- proxy_close_stream --------------------------------------------------------------


@pytest.mark.parametrize("stream_type", [0, 1])
def test_close_resets_stream(g: Guest, ctx: HttpContext, calls: list[tuple[HttpContext, int]],
                             stream_type: int) -> None:
    assert g.call("proxy_close_stream", stream_type) == R.OK
    assert ctx.stream.reset is True
    assert calls == []


@pytest.mark.parametrize("stream_type", [2, 3])
def test_close_connection_types_do_nothing_in_http(g: Guest, ctx: HttpContext, stream_type: int) -> None:
    # Envoy: an HTTP filter has no network filter callbacks; OK and nothing happens.
    assert g.call("proxy_close_stream", stream_type) == R.OK
    assert ctx.stream.reset is False


@pytest.mark.parametrize("stream_type", [4, 0xFFFFFFFF])
def test_close_bad_stream_type(g: Guest, ctx: HttpContext, stream_type: int) -> None:
    assert g.call("proxy_close_stream", stream_type) == R.BAD_ARGUMENT
    assert ctx.stream.reset is False


def test_close_in_root_context(g: Guest, ctx: HttpContext) -> None:
    g.vm.effective = g.vm.root
    assert g.call("proxy_close_stream", 0) == R.BAD_ARGUMENT
    assert ctx.stream.reset is False


# ---- proxy_clear_route_cache ---------------------------------------------------------


def test_clear_route_cache(g: Guest, ctx: HttpContext) -> None:
    assert g.call("proxy_clear_route_cache") == R.OK
    g.vm.effective = g.vm.root
    assert g.call("proxy_clear_route_cache") == R.OK
