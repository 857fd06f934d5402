"""Buffer host functions: proxy_get_buffer_bytes, proxy_get_buffer_status, proxy_set_buffer_bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from wasmgate.abi.constants import BufferType, WasmResult
from wasmgate.plugin.context import HttpContext, Stream
from wat_util import (
    MEMORY_SIZE,
    OOB,
    R2,
    R3,
    REC_CONF_GET,
    REC_CONF_LEN,
    REC_CONF_OTHER,
    REC_CONF_PTR,
    REC_CONF_SET,
    REC_CONF_SIZE,
    REC_CONF_STATUS,
    REC_VM_START_GET,
    REC_VM_START_LEN,
    REC_VM_START_OTHER,
    REC_VM_START_PTR,
    REC_VM_START_SET,
    REC_VM_START_SIZE,
    REC_VM_START_STATUS,
    RP,
    RS,
    SENTINEL,
    Guest,
    module_wat,
    new_vm,
)

R = WasmResult
REQ_BODY = BufferType.HTTP_REQUEST_BODY
RESP_BODY = BufferType.HTTP_RESPONSE_BODY
VM_CONF = BufferType.VM_CONFIGURATION
PLUGIN_CONF = BufferType.PLUGIN_CONFIGURATION
BODY = b"hello world"


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest.new(tmp_path)


@pytest.fixture
def ctx(g: Guest) -> HttpContext:
    s = Stream()
    s.request_body = bytearray(BODY)
    s.response_body = bytearray(b"RESPONSE")
    return g.http(s)


def _get(g: Guest, buffer_type: int, start: int, length: int) -> tuple[int, bytes | None]:
    g.poison(RP, RS)
    status = g.call("proxy_get_buffer_bytes", buffer_type, start, length, RP, RS)
    return status, (g.out() if status == R.OK else None)


def _set(g: Guest, buffer_type: int, start: int, length: int, data: bytes) -> int:
    p, n = g.put_str(data)
    return g.call("proxy_set_buffer_bytes", buffer_type, start, length, p, n)


def _status(g: Guest, buffer_type: int) -> tuple[int, int, int]:
    g.poison(R2, R3)
    return g.call("proxy_get_buffer_status", buffer_type, R2, R3), g.u32(R2), g.u32(R3)


# ---- proxy_get_buffer_bytes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "length", "expected"),
    [
        (0, 5, b"hello"),
        (6, 5, b"world"),
        (0, 11, BODY),
        (6, 100, b"world"),  # clamped to the end
        (0, 0xFFFFFFFF, BODY),
        (10, 1, b"d"),
    ],
)
def test_get_bytes(g: Guest, ctx: HttpContext, start: int, length: int, expected: bytes) -> None:
    assert _get(g, REQ_BODY, start, length) == (R.OK, expected)


def test_get_bytes_response_body(g: Guest, ctx: HttpContext) -> None:
    assert _get(g, RESP_BODY, 0, 100) == (R.OK, b"RESPONSE")


@pytest.mark.parametrize(("start", "length"), [(11, 5), (12, 1), (1000, 1000), (0xFFFFFFFF, 1), (0, 0), (3, 0)])
def test_get_bytes_empty_read_is_ok_with_null_pointer(g: Guest, ctx: HttpContext, start: int, length: int) -> None:
    heap = g.call("heap")
    assert _get(g, REQ_BODY, start, length) == (R.OK, b"")
    assert (g.u32(RP), g.u32(RS)) == (0, 0)
    assert g.call("heap") == heap  # nothing allocated


def test_get_bytes_allocates_exactly(g: Guest, ctx: HttpContext) -> None:
    heap = g.call("heap")
    assert _get(g, REQ_BODY, 2, 3) == (R.OK, b"llo")
    assert g.u32(RP) == heap
    assert g.call("heap") == heap + 3


@pytest.mark.parametrize("buffer_type", [9, 100, 0xFFFFFFFF])
def test_get_bytes_bad_buffer_type(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _get(g, buffer_type, 0, 5) == (R.BAD_ARGUMENT, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


# Buffer 5 (gRPC message) reads as empty outside proxy_on_grpc_receive, as in Envoy
# (test_host_grpc.py, test_grpc_envoy_diff.py); so do 2 and 3, a connection's data
# (test_host_network.py).
@pytest.mark.parametrize("buffer_type", [4, 8])
def test_get_bytes_buffers_without_source_are_not_found(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _get(g, buffer_type, 0, 5) == (R.NOT_FOUND, None)
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


# Envoy reads a body buffer with no body in it as empty (test_envoy_diff.py, the pause
# plugin's header callbacks); writing there is BAD_ARGUMENT.
def test_get_bytes_outside_body_callback_is_empty(g: Guest) -> None:
    g.http(Stream())
    assert _get(g, REQ_BODY, 0, 5) == (R.OK, b"")
    assert _get(g, RESP_BODY, 0, 5) == (R.OK, b"")
    dp, ds = g.put_str(b"x")
    assert g.call("proxy_set_buffer_bytes", REQ_BODY, 0, 0, dp, ds) == R.BAD_ARGUMENT
    assert g.call("proxy_set_buffer_bytes", RESP_BODY, 0, 0, dp, 0) == R.BAD_ARGUMENT


def test_get_bytes_in_root_context_is_empty(g: Guest) -> None:
    g.vm.effective = g.vm.root
    assert _get(g, REQ_BODY, 0, 5) == (R.OK, b"")


def test_get_bytes_without_effective_context_is_empty(g: Guest) -> None:
    g.vm.effective = None
    assert _get(g, REQ_BODY, 0, 5) == (R.OK, b"")


@pytest.mark.parametrize(("rp", "rs"), [(OOB, RS), (RP, OOB), (MEMORY_SIZE - 2, RS), (RP, MEMORY_SIZE)])
@pytest.mark.parametrize("start", [0, 100])  # a real copy and an empty read
def test_get_bytes_return_pointer_out_of_bounds(g: Guest, ctx: HttpContext, rp: int, rs: int, start: int) -> None:
    assert g.call("proxy_get_buffer_bytes", REQ_BODY, start, 5, rp, rs) == R.INVALID_MEMORY_ACCESS


@pytest.mark.parametrize("heap", [0, MEMORY_SIZE - 4, OOB])
def test_get_bytes_bad_allocation(g: Guest, ctx: HttpContext, heap: int) -> None:
    g.call("set_heap", heap)
    assert g.call("proxy_get_buffer_bytes", REQ_BODY, 0, 11, RP, RS) == R.INVALID_MEMORY_ACCESS


# ---- proxy_get_buffer_status ---------------------------------------------------------


def test_status_ok(g: Guest, ctx: HttpContext) -> None:
    assert _status(g, REQ_BODY) == (R.OK, 11, 0)
    assert _status(g, RESP_BODY) == (R.OK, 8, 0)


def test_status_empty_body(g: Guest) -> None:
    s = Stream()
    s.request_body = bytearray()
    g.http(s)
    assert _status(g, REQ_BODY) == (R.OK, 0, 0)


@pytest.mark.parametrize("buffer_type", [4, 6, 7, 8])  # 2, 3, 5: see above
def test_status_not_found(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _status(g, buffer_type) == (R.NOT_FOUND, SENTINEL, SENTINEL)


def test_status_outside_body_callback_is_empty(g: Guest) -> None:
    g.http(Stream())
    assert _status(g, REQ_BODY) == (R.OK, 0, 0)
    assert _status(g, RESP_BODY) == (R.OK, 0, 0)


@pytest.mark.parametrize("buffer_type", [9, 0xFFFFFFFF])
def test_status_bad_buffer_type(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _status(g, buffer_type) == (R.BAD_ARGUMENT, SENTINEL, SENTINEL)


@pytest.mark.parametrize(("lp", "fp"), [(OOB, R3), (R2, OOB), (MEMORY_SIZE - 2, R3), (R2, MEMORY_SIZE)])
def test_status_out_of_bounds(g: Guest, ctx: HttpContext, lp: int, fp: int) -> None:
    assert g.call("proxy_get_buffer_status", REQ_BODY, lp, fp) == R.INVALID_MEMORY_ACCESS


# ---- proxy_set_buffer_bytes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "length", "data", "expected"),
    [
        (0, 0, b">> ", b">> hello world"),  # (0, 0) prepends
        (0, 5, b"HOWDY", b"HOWDY world"),  # replaces the first `length` bytes
        (0, 5, b"Hi", b"Hi world"),
        (0, 11, b"bye", b"bye"),  # (0, size) replaces all
        (0, 1000, b"bye", b"bye"),
        (0, 0xFFFFFFFF, b"", b""),
        (11, 0, b"!", b"hello world!"),  # start >= size appends
        (11, 99, b"!", b"hello world!"),
        (500, 0, b"!", b"hello world!"),
        (0xFFFFFFFF, 0, b"!", b"hello world!"),
    ],
)
def test_set_bytes(g: Guest, ctx: HttpContext, start: int, length: int, data: bytes, expected: bytes) -> None:
    body = ctx.stream.request_body
    assert _set(g, REQ_BODY, start, length, data) == R.OK
    assert ctx.stream.request_body is body  # changed in place
    assert bytes(body or b"") == expected
    assert _get(g, REQ_BODY, 0, 1000) == (R.OK, expected)


def test_set_bytes_response_body(g: Guest, ctx: HttpContext) -> None:
    assert _set(g, RESP_BODY, 0, 8, b"replaced") == R.OK
    assert ctx.stream.response_body == bytearray(b"replaced")
    assert ctx.stream.request_body == bytearray(BODY)


def test_set_bytes_into_empty_body(g: Guest) -> None:
    s = Stream()
    s.request_body = bytearray()
    g.http(s)
    assert _set(g, REQ_BODY, 0, 0, b"new") == R.OK
    assert _set(g, REQ_BODY, 3, 0, b"er") == R.OK
    assert s.request_body == bytearray(b"newer")


@pytest.mark.parametrize("start", [1, 5, 10])
def test_set_bytes_start_inside_buffer_is_bad_argument(g: Guest, ctx: HttpContext, start: int) -> None:
    assert _set(g, REQ_BODY, start, 1, b"x") == R.BAD_ARGUMENT
    assert ctx.stream.request_body == bytearray(BODY)


@pytest.mark.parametrize("buffer_type", [9, 0xFFFFFFFF])
def test_set_bytes_bad_buffer_type(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _set(g, buffer_type, 0, 0, b"x") == R.BAD_ARGUMENT


@pytest.mark.parametrize("buffer_type", [4, 6, 7, 8])  # 2, 3, 5: BAD_ARGUMENT (test_host_network/grpc.py)
def test_set_bytes_not_found(g: Guest, ctx: HttpContext, buffer_type: int) -> None:
    assert _set(g, buffer_type, 0, 0, b"x") == R.NOT_FOUND


def test_set_bytes_outside_body_callback_is_refused(g: Guest) -> None:
    s = Stream()
    g.http(s)
    assert _set(g, REQ_BODY, 0, 0, b"x") == R.BAD_ARGUMENT  # as Envoy (test_envoy_diff.py)
    assert s.request_body is None


@pytest.mark.parametrize(("p", "n"), [(OOB, 0x100), (MEMORY_SIZE, 1), (MEMORY_SIZE - 1, 2), (0x1000, 0xFFFFFFFF)])
def test_set_bytes_data_out_of_bounds(g: Guest, ctx: HttpContext, p: int, n: int) -> None:
    assert g.call("proxy_set_buffer_bytes", REQ_BODY, 0, 0, p, n) == R.INVALID_MEMORY_ACCESS
    assert ctx.stream.request_body == bytearray(BODY)


# ---- plugin and VM configuration -----------------------------------------------------


def test_vm_configuration_readable_only_in_on_vm_start(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, vm_config=b'{"vm": 1}', plugin_config=b"plugin-conf"))
    assert g.i32(REC_VM_START_GET) == R.OK
    assert g.mem(g.u32(REC_VM_START_PTR), g.u32(REC_VM_START_SIZE)) == b'{"vm": 1}'
    assert g.i32(REC_VM_START_STATUS) == R.OK
    assert g.u32(REC_VM_START_LEN) == 9
    assert g.i32(REC_VM_START_SET) == R.BAD_ARGUMENT  # read-only
    assert g.i32(REC_VM_START_OTHER) == R.NOT_FOUND  # plugin configuration is not offered in vm_start
    assert g.i32(REC_CONF_OTHER) == R.NOT_FOUND  # nor the VM configuration in on_configure
    assert _get(g, VM_CONF, 0, 100) == (R.NOT_FOUND, None)
    assert _status(g, VM_CONF) == (R.NOT_FOUND, SENTINEL, SENTINEL)
    assert not g.vm.starting


def test_plugin_configuration_readable_only_in_on_configure(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, vm_config=b"vm-conf", plugin_config=b"plugin-conf"))
    assert g.i32(REC_CONF_GET) == R.OK
    assert g.mem(g.u32(REC_CONF_PTR), g.u32(REC_CONF_SIZE)) == b"plugin-conf"
    assert g.i32(REC_CONF_STATUS) == R.OK
    assert g.u32(REC_CONF_LEN) == 11
    assert g.i32(REC_CONF_SET) == R.BAD_ARGUMENT
    assert _get(g, PLUGIN_CONF, 0, 100) == (R.NOT_FOUND, None)
    assert _set(g, PLUGIN_CONF, 0, 0, b"x") == R.NOT_FOUND
    assert not g.vm.configuring


def test_empty_configuration_reads_as_empty(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path))
    assert g.i32(REC_CONF_GET) == R.OK
    assert (g.u32(REC_CONF_PTR), g.u32(REC_CONF_SIZE)) == (0, 0)
    assert g.i32(REC_CONF_STATUS) == R.OK
    assert g.u32(REC_CONF_LEN) == 0
    assert g.i32(REC_VM_START_GET) == R.OK
    assert (g.u32(REC_VM_START_PTR), g.u32(REC_VM_START_SIZE)) == (0, 0)


def test_configuration_slices(tmp_path: Path) -> None:
    # With the flag PluginVM.start sets around on_configure, reads clamp like body reads.
    g = Guest(new_vm(tmp_path, plugin_config=b"0123456789"))
    g.vm.configuring = True
    assert _get(g, PLUGIN_CONF, 2, 3) == (R.OK, b"234")
    assert _get(g, PLUGIN_CONF, 8, 100) == (R.OK, b"89")
    assert _get(g, PLUGIN_CONF, 10, 1) == (R.OK, b"")
    assert _status(g, PLUGIN_CONF) == (R.OK, 10, 0)
    assert _set(g, PLUGIN_CONF, 0, 0, b"x") == R.BAD_ARGUMENT
    assert _get(g, VM_CONF, 0, 1) == (R.NOT_FOUND, None)


# ---- proxy_get_configuration (ABI 0.1.0) ---------------------------------------------

_GET_CONFIGURATION = """
    (i32.store (i32.const 0x160) (call $proxy_get_configuration (i32.const 0x164) (i32.const 0x168)))
    (i32.const 1)"""


def test_get_configuration_in_on_configure(tmp_path: Path) -> None:
    wat = module_wat(markers=("proxy_abi_version_0_1_0",), configure=_GET_CONFIGURATION)
    g = Guest(new_vm(tmp_path, wat, plugin_config=b'{"deny": ["/admin"]}', vm_config=b"vm"))
    assert g.i32(0x160) == R.OK
    assert g.mem(g.u32(0x164), g.u32(0x168)) == b'{"deny": ["/admin"]}'


def test_get_configuration_empty(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, module_wat(configure=_GET_CONFIGURATION)))
    assert g.i32(0x160) == R.OK
    assert (g.u32(0x164), g.u32(0x168)) == (0, 0)


def test_get_configuration_outside_on_configure(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, plugin_config=b"conf"))
    g.poison(RP, RS)
    assert g.call("proxy_get_configuration", RP, RS) == R.NOT_FOUND
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


@pytest.mark.parametrize(("rp", "rs"), [(OOB, RS), (RP, OOB), (MEMORY_SIZE - 2, RS)])
def test_get_configuration_out_of_bounds(tmp_path: Path, rp: int, rs: int) -> None:
    g = Guest(new_vm(tmp_path, plugin_config=b"conf"))
    g.vm.configuring = True
    assert g.call("proxy_get_configuration", rp, rs) == R.INVALID_MEMORY_ACCESS
