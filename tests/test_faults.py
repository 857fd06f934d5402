"""A broken plugin never takes the proxy down: its fail strategy decides."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import pytest

from servers import ProxyThread, Upstream, wasmplugin_yaml
from test_e2e import request
from wasmgate.engine.wasm import wat_to_wasm

# Traps in on_request_headers; proc_exit in on_response_headers.
CRASHER = """
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    (global.get $heap) (global.set $heap (i32.add (global.get $heap) (local.get 0))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $explode (unreachable))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (i32.const MODE) (i32.const 1)) (then (call $explode)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $exit (i32.const 3))
    (i32.const 0))
)
"""


def crasher(tmp_path: Path, mode: int) -> Path:
    wasm = tmp_path / f"crasher{mode}.wasm"
    wasm.write_bytes(wat_to_wasm(CRASHER.replace("MODE", str(mode))))
    return wasm


def plugins_json(p: ProxyThread) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/plugins", timeout=10) as r:
        return list(json.loads(r.read())["plugins"])


@pytest.mark.parametrize(("strategy", "expected"), [("FAIL_CLOSE", 503), ("FAIL_OPEN", 200)])
def test_trap_applies_fail_strategy(upstream: Upstream, tmp_path: Path, strategy: str, expected: int) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "crasher", crasher(tmp_path, 1), fail_strategy=strategy)],
                        upstream.url)
    try:
        first = request(proxy.port)
        again = request(proxy.port)  # the VM stays failed; no new call into it
        (info,) = plugins_json(proxy)
    finally:
        proxy.stop()
    assert first[0] == expected and again[0] == expected
    if expected == 503:
        assert first[2] == b""
    assert info["state"] == "failed"
    assert "unreachable" in str(info["last_error"])
    assert info["errors"] == 1


def test_proc_exit_fails_vm(upstream: Upstream, tmp_path: Path) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "exiter", crasher(tmp_path, 0))], upstream.url)
    try:
        status, _, _ = request(proxy.port)  # response headers: proc_exit -> 503 replaces the response
        (info,) = plugins_json(proxy)
        after = request(proxy.port)
    finally:
        proxy.stop()
    assert status == 503
    assert info["state"] == "failed" and "proc_exit(3)" in str(info["last_error"])
    assert after[0] == 503


def test_trap_report_names_wasm_functions(upstream: Upstream, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "crasher", crasher(tmp_path, 1))], upstream.url)
    try:
        with caplog.at_level(logging.ERROR, logger="wasmgate.wasm"):
            assert request(proxy.port)[0] == 503
    finally:
        proxy.stop()
    (report,) = [r.getMessage() for r in caplog.records if "failed:" in r.getMessage()]
    assert "plugin crasher failed: proxy_on_request_headers: wasm trap: wasm `unreachable`" in report
    assert "wasm backtrace:" in report and "explode" in report  # the function's name from the name section
