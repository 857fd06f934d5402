"""WASI preview1 host functions (also linked under ``wasi_unstable``)."""

from __future__ import annotations

import logging
import struct
import time
from pathlib import Path

import pytest

from wasmgate.engine.wasm import WasmTrap
from wasmgate.plugin.context import Stream
from wasmgate.plugin.vm import PluginError, PluginFailed
from wat_util import (
    MEMORY_SIZE,
    OOB,
    R2,
    R3,
    RP,
    RS,
    SENTINEL,
    WASI_UNSTABLE,
    Guest,
    module_wat,
    new_vm,
)

ESUCCESS = 0
EBADF = 8
EFAULT = 21
EINVAL = 28
ESPIPE = 70
WASM_LOGGER = "wasmgate.wasm"
MiB = 1 << 20


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest.new(tmp_path)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("wasmgate"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger=WASM_LOGGER)  # restored by caplog
    return caplog


def _wasm(logs: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in logs.records if r.name == WASM_LOGGER]


def _iovs(g: Guest, *chunks: bytes) -> tuple[int, int]:
    """An iovec array in guest memory pointing at ``chunks``."""
    ptrs = [g.put(c) if c else 0 for c in chunks]
    raw = b"".join(struct.pack("<II", p, len(c)) for p, c in zip(ptrs, chunks, strict=True))
    return (g.put(raw) if raw else 0x1000), len(chunks)


# ---- fd_write ------------------------------------------------------------------------


@pytest.mark.parametrize(("fd", "level"), [(1, logging.INFO), (2, logging.ERROR)])
def test_fd_write_goes_to_log(g: Guest, logs: pytest.LogCaptureFixture, fd: int, level: int) -> None:
    iovs, n = _iovs(g, b"hello ", b"", b"world\n")
    g.poison(RP)
    logs.clear()
    assert g.call("fd_write", fd, iovs, n, RP) == ESUCCESS
    assert g.u32(RP) == 12
    assert _wasm(logs) == [(level, "wasm log: hello world")]


def test_fd_write_empty(g: Guest, logs: pytest.LogCaptureFixture) -> None:
    g.poison(RP)
    logs.clear()
    assert g.call("fd_write", 1, 0x1000, 0, RP) == ESUCCESS
    assert g.u32(RP) == 0
    iovs, n = _iovs(g, b"\n")
    assert g.call("fd_write", 1, iovs, n, RP) == ESUCCESS
    assert g.u32(RP) == 1
    iovs, n = _iovs(g, b"two\n\n")
    assert g.call("fd_write", 1, iovs, n, RP) == ESUCCESS
    # As Envoy: nothing for an empty write; a line per write, one trailing newline dropped.
    assert _wasm(logs) == [(logging.INFO, "wasm log: "), (logging.INFO, "wasm log: two\n")]


def test_fd_write_invalid_utf8(g: Guest, logs: pytest.LogCaptureFixture) -> None:
    iovs, n = _iovs(g, b"\xffok")
    logs.clear()
    assert g.call("fd_write", 2, iovs, n, RP) == ESUCCESS
    assert _wasm(logs) == [(logging.ERROR, "wasm log: \ufffdok")]


@pytest.mark.parametrize("fd", [0, 3, 100, 0xFFFFFFFF])
def test_fd_write_other_fds(g: Guest, logs: pytest.LogCaptureFixture, fd: int) -> None:
    iovs, n = _iovs(g, b"x")
    g.poison(RP)
    logs.clear()
    assert g.call("fd_write", fd, iovs, n, RP) == EBADF
    assert g.u32(RP) == SENTINEL
    assert _wasm(logs) == []


@pytest.mark.parametrize(("iovs", "n"), [(OOB, 1), (MEMORY_SIZE - 4, 1), (0x1000, 0xFFFFFFFF)])
def test_fd_write_iovs_out_of_bounds(g: Guest, iovs: int, n: int) -> None:
    assert g.call("fd_write", 1, iovs, n, RP) == EFAULT


@pytest.mark.parametrize(("ptr", "size"), [(OOB, 4), (MEMORY_SIZE - 1, 2), (0x1000, 0xFFFFFFFF)])
def test_fd_write_data_out_of_bounds(g: Guest, logs: pytest.LogCaptureFixture, ptr: int, size: int) -> None:
    iov = g.put(struct.pack("<II", ptr, size))
    logs.clear()
    assert g.call("fd_write", 1, iov, 1, RP) == EFAULT
    assert _wasm(logs) == []


def test_fd_write_nwritten_out_of_bounds(g: Guest) -> None:
    iovs, n = _iovs(g, b"x")
    assert g.call("fd_write", 1, iovs, n, OOB) == EFAULT


@pytest.mark.parametrize("n", [0x20000001, 0x80000000])
def test_fd_write_huge_iovs_len_is_efault(g: Guest, n: int) -> None:
    iovs, _ = _iovs(g, b"x")
    assert g.call("fd_write", 1, iovs, n, RP) == EFAULT


# ---- fd_read, fd_fdstat_*, fd_close, fd_seek, fd_prestat_* ---------------------------


def test_fd_read_stdin_is_empty(g: Guest) -> None:
    g.poison(RP)
    assert g.call("fd_read", 0, 0x1000, 1, RP) == ESUCCESS
    assert g.u32(RP) == 0


@pytest.mark.parametrize("fd", [1, 2, 3])
def test_fd_read_other_fds(g: Guest, fd: int) -> None:
    g.poison(RP)
    assert g.call("fd_read", fd, 0x1000, 1, RP) == EBADF
    assert g.u32(RP) == SENTINEL


def test_fd_read_out_of_bounds(g: Guest) -> None:
    assert g.call("fd_read", 0, 0x1000, 1, OOB) == EFAULT


@pytest.mark.parametrize("fd", [0, 1, 2])
def test_fd_fdstat_get(g: Guest, fd: int) -> None:
    g.put(b"\xee" * 32)
    ptr = 0x1000
    assert g.call("fd_fdstat_get", fd, ptr) == ESUCCESS
    # filetype CHARACTER_DEVICE, no flags, no rights; 24 bytes, the rest untouched
    assert g.mem(ptr, 32) == b"\x02" + b"\0" * 23 + b"\xee" * 8


@pytest.mark.parametrize("fd", [3, 0xFFFFFFFF])
def test_fd_fdstat_get_bad_fd(g: Guest, fd: int) -> None:
    assert g.call("fd_fdstat_get", fd, 0x1000) == EBADF


def test_fd_fdstat_get_out_of_bounds(g: Guest) -> None:
    assert g.call("fd_fdstat_get", 1, MEMORY_SIZE - 8) == EFAULT


@pytest.mark.parametrize(("name", "args"), [("fd_fdstat_set_flags", (1,)), ("fd_close", ())])
@pytest.mark.parametrize(("fd", "expected"), [(0, ESUCCESS), (1, ESUCCESS), (2, ESUCCESS), (3, EBADF), (9, EBADF)])
def test_fd_flags_and_close(g: Guest, name: str, args: tuple[int, ...], fd: int, expected: int) -> None:
    assert g.call(name, fd, *args) == expected


@pytest.mark.parametrize(("fd", "expected"), [(0, ESPIPE), (1, ESPIPE), (2, ESPIPE), (3, EBADF)])
def test_fd_seek(g: Guest, fd: int, expected: int) -> None:
    g.poison(RP)
    assert g.call("fd_seek", fd, 1 << 40, 0, RP) == expected
    assert g.u32(RP) == SENTINEL


@pytest.mark.parametrize("fd", [0, 1, 3, 4])
def test_fd_prestat_get_is_ebadf(g: Guest, fd: int) -> None:
    g.poison(RP, RS)
    assert g.call("fd_prestat_get", fd, RP) == EBADF
    assert g.call("fd_prestat_dir_name", fd, RP, 4) == EBADF
    assert (g.u32(RP), g.u32(RS)) == (SENTINEL, SENTINEL)


# ---- environ and args ----------------------------------------------------------------


def test_environ_from_spec(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, env={"A": "1", "PATH_X": "/x y"}))
    g.poison(RP, RS)
    assert g.call("environ_sizes_get", RP, RS) == ESUCCESS
    assert (g.u32(RP), g.u32(RS)) == (2, len(b"A=1\0PATH_X=/x y\0"))
    ptrs, buf = 0x2000, 0x3000
    assert g.call("environ_get", ptrs, buf) == ESUCCESS
    assert (g.u32(ptrs), g.u32(ptrs + 4)) == (buf, buf + 4)
    assert g.mem(buf, 16) == b"A=1\0PATH_X=/x y\0"


def test_environ_empty(g: Guest) -> None:
    g.poison(RP, RS, 0x2000)
    assert g.call("environ_sizes_get", RP, RS) == ESUCCESS
    assert (g.u32(RP), g.u32(RS)) == (0, 0)
    assert g.call("environ_get", 0x2000, 0x3000) == ESUCCESS
    assert g.u32(0x2000) == SENTINEL


@pytest.mark.parametrize(("ptrs", "buf"), [(OOB, 0x3000), (0x2000, OOB), (0x2000, MEMORY_SIZE - 3)])
def test_environ_get_out_of_bounds(tmp_path: Path, ptrs: int, buf: int) -> None:
    g = Guest(new_vm(tmp_path, env={"KEY": "value"}))
    assert g.call("environ_get", ptrs, buf) == EFAULT


@pytest.mark.parametrize(("cp", "sp"), [(OOB, RS), (RP, OOB)])
def test_environ_sizes_out_of_bounds(g: Guest, cp: int, sp: int) -> None:
    assert g.call("environ_sizes_get", cp, sp) == EFAULT


def test_args_are_empty(g: Guest) -> None:
    g.poison(RP, RS, 0x2000, 0x3000)
    assert g.call("args_sizes_get", RP, RS) == ESUCCESS
    assert (g.u32(RP), g.u32(RS)) == (0, 0)
    assert g.call("args_get", 0x2000, 0x3000) == ESUCCESS
    assert (g.u32(0x2000), g.u32(0x3000)) == (SENTINEL, SENTINEL)
    assert g.call("args_sizes_get", OOB, RS) == EFAULT


# ---- clocks --------------------------------------------------------------------------


def test_clock_realtime(g: Guest) -> None:
    before = time.time_ns()
    assert g.call("clock_time_get", 0, 1, R2) == ESUCCESS
    assert before <= g.u64(R2) <= time.time_ns()


def test_clock_monotonic(g: Guest) -> None:
    before = time.monotonic_ns()
    assert g.call("clock_time_get", 1, 1000, R2) == ESUCCESS
    first = g.u64(R2)
    assert before <= first <= time.monotonic_ns()
    assert g.call("clock_time_get", 1, 1000, R2) == ESUCCESS
    assert g.u64(R2) >= first


@pytest.mark.parametrize("clock_id", [2, 3])
def test_clock_cputime(g: Guest, clock_id: int) -> None:
    before = time.process_time_ns()
    assert g.call("clock_time_get", clock_id, 0, R2) == ESUCCESS
    assert before <= g.u64(R2) <= time.process_time_ns()


@pytest.mark.parametrize("clock_id", [4, 0xFFFFFFFF])
def test_clock_bad_id(g: Guest, clock_id: int) -> None:
    g.poison(R2, R3)
    assert g.call("clock_time_get", clock_id, 0, R2) == EINVAL
    assert g.call("clock_res_get", clock_id, R2) == EINVAL
    assert (g.u32(R2), g.u32(R3)) == (SENTINEL, SENTINEL)


@pytest.mark.parametrize("ptr", [OOB, MEMORY_SIZE - 4])
def test_clock_out_of_bounds(g: Guest, ptr: int) -> None:
    assert g.call("clock_time_get", 0, 0, ptr) == EFAULT
    assert g.call("clock_res_get", 0, ptr) == EFAULT


@pytest.mark.parametrize("clock_id", [0, 1, 2, 3])
def test_clock_res(g: Guest, clock_id: int) -> None:
    g.poison(R2, R3)
    assert g.call("clock_res_get", clock_id, R2) == ESUCCESS
    assert g.u64(R2) == 1000


# ---- random_get ----------------------------------------------------------------------


def test_random_get_fills_exactly(g: Guest) -> None:
    ptr = g.put(b"\0" * 80)
    assert g.call("random_get", ptr, 64) == ESUCCESS
    first = g.mem(ptr, 64)
    assert first != b"\0" * 64
    assert g.mem(ptr + 64, 16) == b"\0" * 16
    assert g.call("random_get", ptr, 64) == ESUCCESS
    assert g.mem(ptr, 64) != first


def test_random_get_limits(g: Guest) -> None:
    assert g.call("random_get", 0x1000, 0) == ESUCCESS
    assert g.call("random_get", 0x20000, MiB) == ESUCCESS
    assert g.mem(0x20000 + MiB - 64, 64) != b"\0" * 64
    ptr = g.put(b"\0" * 16)
    assert g.call("random_get", ptr, MiB + 1) == EINVAL
    assert g.call("random_get", ptr, 0xFFFFFFFF) == EINVAL
    assert g.mem(ptr, 16) == b"\0" * 16


@pytest.mark.parametrize(("ptr", "size"), [(OOB, 16), (MEMORY_SIZE - 8, 16), (MEMORY_SIZE, 1)])
def test_random_get_out_of_bounds(g: Guest, ptr: int, size: int) -> None:
    assert g.call("random_get", ptr, size) == EFAULT


# ---- sched_yield, poll_oneoff --------------------------------------------------------


def test_sched_yield(g: Guest) -> None:
    assert g.call("sched_yield") == ESUCCESS


def _subscription(userdata: int, tag: int) -> bytes:
    return struct.pack("<QB", userdata, tag).ljust(48, b"\x77")


def test_poll_oneoff_reports_every_subscription_ready(g: Guest) -> None:
    subs = g.put(_subscription(0x1122334455667788, 0) + _subscription(7, 1))
    out = g.put(b"\xee" * 80)
    g.poison(RP)
    assert g.call("poll_oneoff", subs, out, 2, RP) == ESUCCESS
    assert g.u32(RP) == 2
    assert g.mem(out, 80) == (
        struct.pack("<QHB", 0x1122334455667788, 0, 0).ljust(32, b"\0")
        + struct.pack("<QHB", 7, 0, 1).ljust(32, b"\0")
        + b"\xee" * 16
    )


@pytest.mark.parametrize("n", [0, 0xFFFFFFFF])
def test_poll_oneoff_no_subscriptions(g: Guest, n: int) -> None:
    g.poison(RP)
    assert g.call("poll_oneoff", 0x1000, 0x2000, n, RP) == EINVAL
    assert g.u32(RP) == SENTINEL


@pytest.mark.parametrize(("subs", "out", "nev"), [(OOB, 0x3000, RP), (0x2000, OOB, RP), (0x2000, 0x3000, OOB),
                                                  (MEMORY_SIZE - 40, 0x3000, RP)])
def test_poll_oneoff_out_of_bounds(g: Guest, subs: int, out: int, nev: int) -> None:
    assert g.call("poll_oneoff", subs, out, 1, nev) == EFAULT


def test_poll_oneoff_huge_count_is_efault(g: Guest) -> None:
    assert g.call("poll_oneoff", 0x2000, 0x3000, 0x05555556, RP) == EFAULT


# ---- proc_exit -----------------------------------------------------------------------


def test_proc_exit_traps_with_exit_code(g: Guest) -> None:
    with pytest.raises(WasmTrap) as e:
        g.call("proc_exit", 3)
    assert e.value.exit_code == 3
    assert "proc_exit(3)" in e.value.message


def test_proc_exit_in_callback_fails_the_vm(tmp_path: Path) -> None:
    wat = module_wat(request_headers="(call $proc_exit (i32.const 7)) (i32.const 0)")
    vm = new_vm(tmp_path, wat)
    ctx = vm.create_http_context(Stream())
    with pytest.raises(PluginFailed, match=r"^proc_exit\(7\) in proxy_on_request_headers$"):
        vm.on_request_headers(ctx, 1, True)
    assert vm.failed == "proc_exit(7) in proxy_on_request_headers"
    assert vm.stats.errors == 1
    calls = vm.stats.calls
    with pytest.raises(PluginFailed, match=r"proc_exit\(7\)"):
        vm.on_request_headers(ctx, 1, True)
    with pytest.raises(PluginFailed):
        vm.create_http_context(Stream())
    assert vm.stats.calls == calls  # never entered the guest again
    vm.finish_stream(ctx)  # does not raise


def test_proc_exit_during_initialize(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, module_wat(init="(call $proc_exit (i32.const 0))"), name="exits", start=False)
    with pytest.raises(PluginError, match=r"^plugin exits: proc_exit\(0\) in _initialize$"):
        vm.start()
    assert vm.failed == "proc_exit(0) in _initialize"


# ---- wasi_unstable -------------------------------------------------------------------


def test_wasi_unstable_is_linked(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    wat = module_wat(omit={"fd_write", "random_get"},
                     extra_imports=[(WASI_UNSTABLE, "fd_write", "iiii", "i"),
                              (WASI_UNSTABLE, "random_get", "ii", "i")])
    g = Guest(new_vm(tmp_path, wat))
    iovs, n = _iovs(g, b"unstable\n")
    logs.clear()
    assert g.call("fd_write", 1, iovs, n, RP) == ESUCCESS
    assert _wasm(logs) == [(logging.INFO, "wasm log: unstable")]
    assert g.call("random_get", 0x1000, MiB + 1) == EINVAL
