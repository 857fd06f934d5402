"""Housekeeping host functions: logging, time, status, tick period, proxy_done, effective context."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate import log as wlog
from wasmgate.abi.constants import WasmResult
from wasmgate.plugin.context import Context, HttpContext, Stream
from wat_util import MEMORY_SIZE, OOB, R2, REC_TICKS, RP, RS, SENTINEL, Guest, new_vm

R = WasmResult
WASM_LOGGER = "wasmgate.wasm"


@pytest.fixture
def g(tmp_path: Path) -> Guest:
    return Guest.new(tmp_path)


@pytest.fixture
def wasm_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    """The wasm logger, restored afterwards; records reach caplog even after log.setup()."""
    logger = logging.getLogger(WASM_LOGGER)
    monkeypatch.setattr(logging.getLogger("wasmgate"), "propagate", True)
    saved = logger.level
    try:
        yield logger
    finally:
        logger.setLevel(saved)


def _log(g: Guest, level: int, message: bytes) -> int:
    p, n = g.put_str(message)
    return g.call("proxy_log", level, p, n)


def _wasm_records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == WASM_LOGGER]


# ---- proxy_log -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "py_level"),
    [(0, wlog.TRACE), (1, logging.DEBUG), (2, logging.INFO), (3, logging.WARNING), (4, logging.ERROR),
     (5, logging.CRITICAL)],
)
def test_log_each_level(g: Guest, wasm_logger: logging.Logger, caplog: pytest.LogCaptureFixture, level: int,
                        py_level: int) -> None:
    wlog.set_level("wasm", "trace")
    caplog.clear()
    assert _log(g, level, b"hello from wasm") == R.OK
    assert _wasm_records(caplog) == [(py_level, "wasm log: hello from wasm")]


def test_log_prefix_names_plugin_root_and_vm(tmp_path: Path, wasm_logger: logging.Logger,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # Envoy's prefixes: the root context's names its root id and vm id; a stream
    # context's also the plugin (several plugins may share the root id's VM).
    g = Guest(new_vm(tmp_path, name="my-plugin", root_id="my-root", vm_id="my-vm"))
    wlog.set_level("wasm", "info")
    caplog.clear()
    assert _log(g, 2, b"from root") == R.OK
    g.vm.effective = g.vm.create_http_context(Stream())
    assert _log(g, 2, b"from stream") == R.OK
    assert _wasm_records(caplog) == [(logging.INFO, "wasm log my-root my-vm: from root"),
                                     (logging.INFO, "wasm log my-plugin my-root my-vm: from stream")]


def test_log_empty_and_invalid_utf8(g: Guest, wasm_logger: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    wlog.set_level("wasm", "info")
    caplog.clear()
    assert g.call("proxy_log", 3, 0, 0) == R.OK
    assert _log(g, 3, b"caf\xc3\xa9 \xff") == R.OK
    assert _wasm_records(caplog) == [(logging.WARNING, "wasm log: "),
                                     (logging.WARNING, "wasm log: caf\u00e9 \ufffd")]


@pytest.mark.parametrize("level", [6, 7, 100, 0xFFFFFFFF])
def test_log_bad_level(g: Guest, wasm_logger: logging.Logger, caplog: pytest.LogCaptureFixture, level: int) -> None:
    wlog.set_level("wasm", "trace")
    caplog.clear()
    assert _log(g, level, b"x") == R.BAD_ARGUMENT
    assert _wasm_records(caplog) == []


@pytest.mark.parametrize(("p", "n"), [(OOB, 0x100), (MEMORY_SIZE, 1), (MEMORY_SIZE - 4, 8), (0x1000, 0xFFFFFFFF)])
def test_log_out_of_bounds(g: Guest, wasm_logger: logging.Logger, caplog: pytest.LogCaptureFixture,
                           p: int, n: int) -> None:
    wlog.set_level("wasm", "trace")
    caplog.clear()
    assert g.call("proxy_log", 4, p, n) == R.INVALID_MEMORY_ACCESS
    assert _wasm_records(caplog) == []


def test_log_suppressed_below_wasm_level(g: Guest, wasm_logger: logging.Logger,
                                         caplog: pytest.LogCaptureFixture) -> None:
    wlog.set_level("wasm", "error")
    caplog.clear()
    for level in range(6):
        assert _log(g, level, f"level {level}".encode()) == R.OK
    assert _wasm_records(caplog) == [(logging.ERROR, "wasm log: level 4"),
                                     (logging.CRITICAL, "wasm log: level 5")]
    # Each level change applies to the next line (nothing remembers the previous level).
    for name, shown in [("debug", [1]), ("error", []), ("trace", [1])]:
        wlog.set_level("wasm", name)
        caplog.clear()
        assert _log(g, 1, b"debug line") == R.OK
        assert [r[1] for r in _wasm_records(caplog)] == ["wasm log: debug line"] * len(shown)
    wlog.set_level("wasm", "error")
    logging.getLogger("wasmgate.wasm").disabled = True
    try:
        caplog.clear()
        assert _log(g, 5, b"to a disabled logger") == R.OK
        assert _wasm_records(caplog) == []
    finally:
        logging.getLogger("wasmgate.wasm").disabled = False


# ---- proxy_get_log_level -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "level"),
    [("trace", 0), ("debug", 1), ("info", 2), ("warn", 3), ("warning", 3), ("error", 4), ("critical", 5),
     ("off", 5)],
)
def test_get_log_level_follows_wasm_logger(g: Guest, wasm_logger: logging.Logger, name: str, level: int) -> None:
    wlog.set_level("wasm", name)
    g.poison(RP)
    assert g.call("proxy_get_log_level", RP) == R.OK
    assert g.u32(RP) == level


def test_get_log_level_inherits_from_parent(g: Guest, wasm_logger: logging.Logger) -> None:
    parent = logging.getLogger("wasmgate")
    saved = parent.level
    wasm_logger.setLevel(logging.NOTSET)
    parent.setLevel(logging.DEBUG)
    try:
        assert g.call("proxy_get_log_level", RP) == R.OK
        assert g.u32(RP) == 1
    finally:
        parent.setLevel(saved)


@pytest.mark.parametrize("ptr", [OOB, MEMORY_SIZE, MEMORY_SIZE - 3])
def test_get_log_level_out_of_bounds(g: Guest, ptr: int) -> None:
    assert g.call("proxy_get_log_level", ptr) == R.INVALID_MEMORY_ACCESS


# ---- proxy_get_current_time_nanoseconds ----------------------------------------------


def test_current_time(g: Guest) -> None:
    g.poison(RP, RS)
    before = time.time_ns()
    assert g.call("proxy_get_current_time_nanoseconds", RP) == R.OK
    after = time.time_ns()
    assert before <= g.u64(RP) <= after


@pytest.mark.parametrize("ptr", [OOB, MEMORY_SIZE, MEMORY_SIZE - 4])
def test_current_time_out_of_bounds(g: Guest, ptr: int) -> None:
    assert g.call("proxy_get_current_time_nanoseconds", ptr) == R.INVALID_MEMORY_ACCESS


# ---- proxy_get_status ----------------------------------------------------------------


def test_get_status_is_ok_without_message(g: Guest) -> None:
    g.poison(R2, RP, RS)
    heap = g.call("heap")
    assert g.call("proxy_get_status", R2, RP, RS) == R.OK
    assert (g.u32(R2), g.u32(RP), g.u32(RS)) == (0, 0, 0)
    assert g.call("heap") == heap


@pytest.mark.parametrize(("cp", "mp", "ms"), [(OOB, RP, RS), (R2, OOB, RS), (R2, RP, OOB), (MEMORY_SIZE - 2, RP, RS)])
def test_get_status_out_of_bounds(g: Guest, cp: int, mp: int, ms: int) -> None:
    assert g.call("proxy_get_status", cp, mp, ms) == R.INVALID_MEMORY_ACCESS


# ---- proxy_set_tick_period_milliseconds ----------------------------------------------


def test_tick_period_in_root_context(g: Guest) -> None:
    g.vm.effective = g.vm.root
    assert g.call("proxy_set_tick_period_milliseconds", 250) == R.OK
    assert g.vm.tick_period == 0.25
    assert g.call("proxy_set_tick_period_milliseconds", 0) == R.OK
    assert g.vm.tick_period == 0.0


def test_tick_period_from_stream_context_sets_root_timer(g: Guest) -> None:
    g.http(Stream())
    assert g.call("proxy_set_tick_period_milliseconds", 1500) == R.OK
    assert g.vm.tick_period == 1.5


def test_tick_period_is_unsigned(g: Guest) -> None:
    assert g.call("proxy_set_tick_period_milliseconds", 0x80000000) == R.OK
    assert g.vm.tick_period == 0x80000000 / 1000
    g.vm.shutdown()
    assert g.vm.tick_period == 0


def test_tick_period_drives_on_tick(g: Guest) -> None:
    async def run() -> tuple[int, int]:
        g.vm.effective = g.vm.root
        assert g.call("proxy_set_tick_period_milliseconds", 5) == R.OK
        await asyncio.sleep(0.2)
        g.vm.effective = g.vm.root
        assert g.call("proxy_set_tick_period_milliseconds", 0) == R.OK
        ticks = g.u32(REC_TICKS)
        await asyncio.sleep(0.05)
        return ticks, g.u32(REC_TICKS)

    try:
        ticks, later = asyncio.run(run())
    finally:
        g.vm.shutdown()
    assert ticks >= 3
    assert later == ticks


# ---- proxy_done ----------------------------------------------------------------------


def test_done_without_pending_done_is_not_found(g: Guest) -> None:
    g.vm.effective = g.vm.root
    assert g.call("proxy_done") == R.NOT_FOUND


def test_done_with_pending_done(g: Guest) -> None:
    g.vm.effective = g.vm.root
    g.vm.root.done_pending = True
    assert g.call("proxy_done") == R.OK
    assert g.vm.root.done_pending is False
    assert g.call("proxy_done") == R.NOT_FOUND


def test_done_in_stream_context_is_not_found(g: Guest) -> None:
    g.vm.root.done_pending = True
    g.http(Stream())
    assert g.call("proxy_done") == R.NOT_FOUND
    assert g.vm.root.done_pending is True


# ---- proxy_set_effective_context -----------------------------------------------------


@pytest.mark.parametrize("context_id", [999, 0x7FFFFFFF, 0xFFFFFFFF])
def test_set_effective_context_unknown_id(g: Guest, context_id: int) -> None:
    ctx = g.http(Stream())
    assert g.call("proxy_set_effective_context", context_id) == R.BAD_ARGUMENT
    assert g.vm.effective is ctx


def test_set_effective_context_zero_keeps_current(g: Guest) -> None:
    ctx = g.http(Stream())
    assert g.call("proxy_set_effective_context", 0) == R.OK
    assert g.vm.effective is ctx


def _effective(g: Guest) -> Context | None:
    return g.vm.effective


def test_set_effective_context_switches(g: Guest) -> None:
    first = g.http(Stream())
    second = g.http(Stream())
    assert _effective(g) is second
    assert g.call("proxy_set_effective_context", first.id) == R.OK
    assert _effective(g) is first
    assert g.call("proxy_set_effective_context", g.vm.root.id) == R.OK
    assert _effective(g) is g.vm.root


def test_set_effective_context_then_act_on_it(g: Guest) -> None:
    ctx: HttpContext = g.http(Stream())
    g.vm.effective = g.vm.root
    assert g.call("proxy_close_stream", 0) == R.BAD_ARGUMENT
    assert g.call("proxy_set_effective_context", ctx.id) == R.OK
    assert g.call("proxy_close_stream", 0) == R.OK
    assert ctx.stream.reset is True


def test_set_effective_context_finished_stream(g: Guest) -> None:
    ctx = g.http(Stream())
    g.vm.finish_stream(ctx)
    g.vm.effective = g.vm.root
    assert g.call("proxy_set_effective_context", ctx.id) == R.BAD_ARGUMENT
    assert g.vm.effective is g.vm.root


def test_sentinel_is_not_a_valid_status() -> None:
    # The poisoned return slots in these tests can never be mistaken for a real value.
    assert SENTINEL not in {int(r) for r in R}
