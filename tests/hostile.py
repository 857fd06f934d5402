"""Hostile Proxy-Wasm modules in WAT, one misbehaviour each.

``module(action)`` misbehaves on every request; ``module(action, callback=...)``
in one chosen callback. Actions: trap, loop (CPU), bomb (memory), leak (one page a
request), exit (proc_exit), oob (out-of-bounds pointers to every kind of host call),
log (a 16 MiB log line), reenter (the allocator calls back into the host), buffer
(body callbacks hold the whole body).
"""

from __future__ import annotations

from pathlib import Path

from wasmgate.engine.wasm import wat_to_wasm

CALLBACKS = {
    # export: (params, has result)
    "proxy_on_vm_start": (2, True),
    "proxy_on_configure": (2, True),
    "proxy_on_context_create": (2, False),
    "proxy_on_request_headers": (3, True),
    "proxy_on_request_body": (3, True),
    "proxy_on_response_headers": (3, True),
    "proxy_on_response_body": (3, True),
    "proxy_on_log": (1, False),
    "proxy_on_done": (1, True),
    "proxy_on_delete": (1, False),
    "proxy_on_tick": (1, False),
}

ACTIONS = {
    "trap": "(unreachable)",
    "loop": "(loop $spin (br $spin))",
    "bomb": "(block $full (loop $grow (br_if $full (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))"
            " (br $grow))) (unreachable)",
    "leak": "(drop (memory.grow (i32.const 1)))",
    "exit": "(call $proc_exit (i32.const 7))",
    "oob": "(drop (call $get_header (i32.const 0) (i32.const 0xFFFFFFF0) (i32.const 64) (i32.const 16)"
           " (i32.const 20)))"
           "(drop (call $get_header (i32.const 0) (i32.const 100) (i32.const 1) (i32.const 0x7FFFFFF0)"
           " (i32.const 20)))"
           "(drop (call $log (i32.const 2) (i32.const 0xFFFFFF00) (i32.const 0x7FFFFFFF)))"
           "(drop (call $send_local_response (i32.const 200) (i32.const -1) (i32.const -1) (i32.const -1)"
           " (i32.const 8) (i32.const 0) (i32.const 0x10000000) (i32.const -1)))",
    "log": "(drop (memory.grow (i32.const 256))) (drop (call $log (i32.const 2) (i32.const 65536)"
           " (i32.const 16777216)))",
    # asks for :path, so the host calls the allocator, which calls the host again
    "reenter": "(drop (call $get_header (i32.const 0) (i32.const 100) (i32.const 5) (i32.const 16)"
               " (i32.const 20)))",
}

_TEMPLATE = """
(module
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $send_local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) ":path")
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32) (local $p i32)
    REENTER
    (global.get $heap) (local.set $p)
    (global.set $heap (i32.and (i32.add (global.get $heap) (i32.add (local.get $n) (i32.const 7)))
                               (i32.const 0xFFFFFFF8)))
    (if (i32.gt_u (global.get $heap) (i32.const 60000)) (then (global.set $heap (i32.const 4096))))
    (local.get $p))
  BODIES
)
"""


def _body(export: str, action: str | None, buffer: bool = False) -> str:
    params, result = CALLBACKS[export]
    ps = " ".join("i32" for _ in range(params))
    code = ACTIONS[action] if action else ""
    if export == "proxy_on_context_create" and code:
        code = f"(if (local.get 1) (then {code}))"  # stream contexts only, not the root
    if export == "proxy_on_vm_start":
        code = "(drop (call $tick (i32.const 20)))" + code  # so on_tick runs too
    ret = "(result i32)" if result else ""
    value = "(i32.const 1)" if export in ("proxy_on_vm_start", "proxy_on_configure", "proxy_on_done") else \
        "(i32.const 0)"
    if buffer and export in ("proxy_on_request_body", "proxy_on_response_body"):
        # StopIterationAndBuffer until the end of the stream, then Continue with it all
        value = "(select (i32.const 0) (i32.const 1) (local.get 2))"
    return f'(func (export "{export}") (param {ps}) {ret} {code} {value if result else ""})'


def module(action: str, callback: str = "proxy_on_request_headers") -> bytes:
    """A module doing ``action`` in ``callback`` and behaving everywhere else.

    Action "buffer" makes both body callbacks buffer the whole body before continuing.
    """
    buffer = action == "buffer"
    bodies = "\n  ".join(_body(cb, action if cb == callback and not buffer else None, buffer)
                         for cb in CALLBACKS)
    reentry = "(drop (call $log (i32.const 1) (i32.const 100) (i32.const 5)))" if action == "reenter" else ""
    return wat_to_wasm(_TEMPLATE.replace("REENTER", reentry).replace("BODIES", bodies))


def write(directory: Path, action: str, callback: str = "proxy_on_request_headers") -> Path:
    path = directory / f"{action}-{callback}.wasm"
    path.write_bytes(module(action, callback))
    return path
