"""Linking and module-level behaviour: registered signatures, unknown imports, ABI detection,
allocator choice, lifecycle errors, and host functions that raise."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.abi.constants import AbiVersion, WasmResult
from wasmgate.engine.wasm import WasmError, WasmTrap, compile_module
from wasmgate.headers import HeaderMap
from wasmgate.host.registry import REGISTRY
from wasmgate.plugin.context import Stream
from wasmgate.plugin.manager import engine, load_handle
from wasmgate.plugin.spec import PluginSpec
from wasmgate.plugin.vm import PluginError, PluginFailed, detect_abi
from wat_util import (
    ENV,
    HEAP,
    HOST_IMPORTS,
    MALLOC_HEAP,
    OOB,
    R2,
    REC_HEADERS_ARGS,
    RP,
    RS,
    WASI,
    WASI_UNSTABLE,
    Guest,
    Import,
    load_module,
    module_wat,
    new_vm,
    write_module,
)

R = WasmResult
ENOSYS = 52
WASM_LOGGER = "wasmgate.wasm"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setattr(logging.getLogger("wasmgate"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger=WASM_LOGGER)
    return caplog


def _messages(logs: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in logs.records if r.name == WASM_LOGGER and r.levelno == level]


# ---- the registry against the ABI ----------------------------------------------------


@pytest.mark.parametrize("imp", HOST_IMPORTS, ids=lambda i: f"{i[0]}.{i[1]}")
def test_registered_signature_matches_abi(imp: Import) -> None:
    module, name, params, results = imp
    entry = REGISTRY[(module, name)]
    assert (entry.params, entry.results) == (params, results)
    assert len(inspect.signature(entry.fn).parameters) == 1 + len(params)  # vm + the i32/i64 arguments


def test_every_registered_host_function_is_tested_here() -> None:
    """A guard: a host function added to the registry needs an entry in HOST_IMPORTS (and tests)."""
    tested = {(m, n) for m, n, _, _ in HOST_IMPORTS}
    registered = {(WASI if m == WASI_UNSTABLE else m, n) for m, n in REGISTRY}
    assert registered == tested


@pytest.mark.parametrize("imp", [i for i in HOST_IMPORTS if i[0] == WASI], ids=lambda i: i[1])
def test_wasi_functions_also_under_wasi_unstable(imp: Import) -> None:
    assert REGISTRY[(WASI_UNSTABLE, imp[1])].fn is REGISTRY[(WASI, imp[1])].fn


_PATTERNS = [0, OOB, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x1000]


@pytest.mark.parametrize("imp", [i for i in HOST_IMPORTS if i[1] != "proc_exit"], ids=lambda i: f"{i[0]}.{i[1]}")
@pytest.mark.parametrize("context", ["root", "http", "logging", "network"])
def test_hostile_arguments_never_raise(tmp_path: Path, imp: Import, context: str) -> None:
    """Every host function answers garbage arguments with a status, never a trap."""
    g = Guest.new(tmp_path)
    if context == "network":
        g.network().downstream_data = bytearray(b"data")
    elif context != "root":
        s = Stream()
        s.request_headers = HeaderMap([(b":path", b"/")])
        s.request_body = bytearray(b"body")
        g.http(s, logging=context == "logging")
    limit = 12 if imp[0] == ENV else 76
    for value in _PATTERNS:
        args = [value] * len(imp[2])
        status = g.call(imp[1], *args)
        assert 0 <= status <= limit, (imp[1], hex(value), status)
    g.vm.shutdown()


# ---- imports we don't implement ------------------------------------------------------


_UNKNOWN: list[Import] = [
    (ENV, "proxy_not_a_thing", "i", "i"),
    (ENV, "proxy_future_call", "iiiiiiiiii", "i"),
    (ENV, "proxy_unknown_i64", "I", "I"),
    (ENV, "proxy_unknown_void", "ii", ""),
    (WASI, "path_open", "iiiiiIIii", "i"),
    (WASI_UNSTABLE, "sock_accept", "iii", "i"),
]


@pytest.fixture
def unknown(tmp_path: Path) -> Guest:
    return Guest(new_vm(tmp_path, module_wat(extra_imports=_UNKNOWN)))


@pytest.mark.parametrize(
    ("name", "expected"),
    [("proxy_not_a_thing", R.UNIMPLEMENTED), ("proxy_future_call", R.UNIMPLEMENTED),
     ("proxy_unknown_i64", R.UNIMPLEMENTED), ("path_open", ENOSYS), ("sock_accept", ENOSYS)],
)
def test_unknown_import_returns_status(unknown: Guest, name: str, expected: int) -> None:
    fn = unknown.vm.instance.func(f"t_{name}")
    assert fn is not None
    assert unknown.call(name, *([1] * fn.nparams)) == expected


def test_unknown_import_without_result(unknown: Guest) -> None:
    assert unknown.call("proxy_unknown_void", 1, 2) == 0


def test_unknown_import_logged_once_each(unknown: Guest, logs: pytest.LogCaptureFixture) -> None:
    logs.clear()
    for _ in range(3):
        assert unknown.call("proxy_not_a_thing", 5) == R.UNIMPLEMENTED
        assert unknown.call("path_open", 0, 0, 0, 0, 0, 0, 0, 0, 0) == ENOSYS
    assert _messages(logs, logging.WARNING) == [
        "plugin test-plugin called unimplemented import env.proxy_not_a_thing",
        "plugin test-plugin called unimplemented import wasi_snapshot_preview1.path_open",
    ]


def test_unknown_import_not_logged_until_called(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    logs.clear()
    new_vm(tmp_path, module_wat(extra_imports=_UNKNOWN))
    assert _messages(logs, logging.WARNING) == []


def test_known_name_with_wrong_signature_is_unimplemented(tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    wat = module_wat(omit={"proxy_log", "random_get"},
                     extra_imports=[(ENV, "proxy_log", "ii", "i"), (WASI, "random_get", "iii", "i")])
    g = Guest(new_vm(tmp_path, wat))
    logs.clear()
    assert g.call("proxy_log", 2, 0) == R.UNIMPLEMENTED
    assert g.call("random_get", 0x1000, 4, 0) == ENOSYS
    assert _messages(logs, logging.WARNING) == [
        "plugin test-plugin called unimplemented import env.proxy_log",
        "plugin test-plugin called unimplemented import wasi_snapshot_preview1.random_get",
    ]


def _raw_vm(tmp_path: Path, body: str, name: str = "raw") -> None:
    wat = f"""(module {body}
      (memory (export "memory") 1)
      (func (export "proxy_abi_version_0_2_1"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 1024)))"""
    new_vm(tmp_path, wat, name=name)


def test_import_with_float_types_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin raw: import env\.proxy_f uses value types other than i32/i64$"):
        _raw_vm(tmp_path, '(import "env" "proxy_f" (func (param f32) (result i32)))')


def test_non_function_import_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin raw: unsupported non-function import env\.table"):
        _raw_vm(tmp_path, '(import "env" "table" (table 1 funcref))')


def test_duplicate_import_links_once(tmp_path: Path) -> None:
    # Go may import one function twice; both imports reach the same host function.
    first = '(import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))'
    second = '(import "env" "proxy_log" (func $proxy_log2 (param i32 i32 i32) (result i32)))'
    wrapper = ('(func (export "t_proxy_log2") (param i32 i32 i32) (result i32) '
               '(call $proxy_log2 (local.get 0) (local.get 1) (local.get 2)))')
    wat = module_wat().replace(first, first + "\n" + second, 1)
    wat = wat[: wat.rindex(")")] + wrapper + ")"
    g = Guest(new_vm(tmp_path, wat))
    assert g.call("proxy_log", 9, 0, 0) == R.BAD_ARGUMENT
    assert g.call("proxy_log2", 9, 0, 0) == R.BAD_ARGUMENT
    assert g.call("proxy_log2", 2, OOB, 4) == R.INVALID_MEMORY_ACCESS


# ---- ABI detection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markers", "abi"),
    [
        (("proxy_abi_version_0_2_1",), AbiVersion.V0_2_1),
        (("proxy_abi_version_0_2_0",), AbiVersion.V0_2_0),
        (("proxy_abi_version_0_1_0",), AbiVersion.V0_1_0),
        (("proxy_abi_version_0_1_0", "proxy_abi_version_0_2_1"), AbiVersion.V0_2_1),
        (("proxy_abi_version_0_1_0", "proxy_abi_version_0_2_0"), AbiVersion.V0_2_0),
    ],
)
def test_abi_detected_from_marker(tmp_path: Path, markers: tuple[str, ...], abi: AbiVersion) -> None:
    path = write_module(tmp_path, module_wat(markers=markers))
    assert detect_abi(load_module(path)) is abi
    assert new_vm(tmp_path, module_wat(markers=markers)).abi is abi


@pytest.mark.parametrize("markers", [(), ("proxy_abi_version_0_3_0",), ("proxy_abi_version",)])
def test_no_abi_marker_is_an_error(tmp_path: Path, markers: tuple[str, ...]) -> None:
    with pytest.raises(WasmError, match=r"exports no proxy_abi_version_\* marker"):
        new_vm(tmp_path, module_wat(markers=markers))


def test_no_abi_marker_through_load_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMGATE_CACHE_DIR", "off")
    path = write_module(tmp_path, module_wat(markers=()), "nomarker.wasm")
    with pytest.raises(PluginError, match=r"plugin no-marker: module exports no proxy_abi_version_\* marker") as e:
        load_handle(PluginSpec("no-marker", module_path=path))
    assert str(path) in str(e.value)


# ---- the allocator -------------------------------------------------------------------


def _copied_to(g: Guest) -> int:
    s = Stream()
    s.request_headers = HeaderMap([(b":path", b"/x")])
    g.http(s, open_maps=1)
    kp, ks = g.put_str(b":path")
    assert g.call("proxy_get_header_map_value", 0, kp, ks, RP, RS) == R.OK
    assert g.out() == b"/x"
    return g.u32(RP)


@pytest.mark.parametrize(
    ("allocators", "heap"),
    [
        (("proxy_on_memory_allocate",), HEAP),
        (("malloc",), MALLOC_HEAP),
        (("proxy_on_memory_allocate", "malloc"), MALLOC_HEAP),  # malloc preferred, as in proxy-wasm-cpp-host
    ],
)
def test_allocator_choice(tmp_path: Path, allocators: tuple[str, ...], heap: int) -> None:
    g = Guest(new_vm(tmp_path, module_wat(allocators=allocators)))
    assert _copied_to(g) == heap


def test_no_allocator_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin test-plugin: module exports neither "
                                          r"proxy_on_memory_allocate nor malloc$"):
        new_vm(tmp_path, module_wat(allocators=()))


# ---- ABI 0.1.0 differences -----------------------------------------------------------


def test_abi_0_1_0_two_argument_on_request_headers(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, module_wat(markers=("proxy_abi_version_0_1_0",), request_headers_params=2))
    g = Guest(vm)
    ctx = vm.create_http_context(Stream())
    assert vm.on_request_headers(ctx, 5, True) == 0
    assert (g.u32(REC_HEADERS_ARGS), g.u32(REC_HEADERS_ARGS + 4), g.i32(REC_HEADERS_ARGS + 8)) == (ctx.id, 5, -1)


@pytest.mark.parametrize("eos", [False, True])
def test_abi_0_2_1_three_argument_on_request_headers(tmp_path: Path, eos: bool) -> None:
    vm = new_vm(tmp_path)
    g = Guest(vm)
    ctx = vm.create_http_context(Stream())
    assert vm.on_request_headers(ctx, 7, eos) == 0
    assert (g.u32(REC_HEADERS_ARGS), g.u32(REC_HEADERS_ARGS + 4), g.i32(REC_HEADERS_ARGS + 8)) == (ctx.id, 7, eos)


@pytest.mark.parametrize(
    ("marker", "status", "value"),
    [
        ("proxy_abi_version_0_1_0", R.OK, b""),
        ("proxy_abi_version_0_2_0", R.NOT_FOUND, None),
        ("proxy_abi_version_0_2_1", R.NOT_FOUND, None),
    ],
)
def test_missing_header_by_abi(tmp_path: Path, marker: str, status: int, value: bytes | None) -> None:
    g = Guest(new_vm(tmp_path, module_wat(markers=(marker,))))
    s = Stream()
    s.request_headers = HeaderMap([(b"present", b"yes")])
    g.http(s, open_maps=1)
    g.poison(RP, RS)
    kp, ks = g.put_str(b"absent")
    assert g.call("proxy_get_header_map_value", 0, kp, ks, RP, RS) == status
    if value is not None:
        assert (g.u32(RP), g.u32(RS)) == (0, 0)
    kp, ks = g.put_str(b"present")
    assert g.call("proxy_get_header_map_value", 0, kp, ks, RP, RS) == R.OK
    assert g.out() == b"yes"


def test_abi_0_1_0_missing_header_with_bad_return_pointer(tmp_path: Path) -> None:
    g = Guest(new_vm(tmp_path, module_wat(markers=("proxy_abi_version_0_1_0",))))
    s = Stream()
    s.request_headers = HeaderMap()
    g.http(s, open_maps=1)
    kp, ks = g.put_str(b"absent")
    assert g.call("proxy_get_header_map_value", 0, kp, ks, OOB, RS) == R.INVALID_MEMORY_ACCESS


# ---- lifecycle errors ----------------------------------------------------------------


def test_initialize_trap_names_plugin(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, module_wat(init="(unreachable)"), name="trappy", start=False)
    with pytest.raises(PluginError, match=r"^plugin trappy: _initialize: .*unreachable"):
        vm.start()
    assert vm.failed is not None
    assert vm.failed.startswith("_initialize: ")
    with pytest.raises(PluginFailed):
        vm.create_http_context(Stream())


def test_initialize_trap_through_load_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMGATE_CACHE_DIR", "off")
    path = write_module(tmp_path, module_wat(init="(unreachable)"), "trap.wasm")
    with pytest.raises(PluginError, match=r"plugin trap-init: _initialize: .*unreachable"):
        load_handle(PluginSpec("trap-init", module_path=path))


def test_on_configure_false(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin conf: proxy_on_configure returned false$"):
        new_vm(tmp_path, module_wat(configure="(i32.const 0)"), name="conf")


def test_on_vm_start_false(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin vmstart: proxy_on_vm_start returned false$"):
        new_vm(tmp_path, module_wat(vm_start="(i32.const 0)"), name="vmstart")


def test_optional_lifecycle_exports(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, module_wat(init=None, vm_start=None, configure=None))
    assert vm.root.id == 1
    assert vm.contexts == {1: vm.root}
    assert vm.effective is vm.root
    assert vm.create_http_context(Stream()).id == 2


def test_start_order_and_flags(tmp_path: Path) -> None:
    vm = new_vm(tmp_path, plugin_config=b"pc", vm_config=b"vc")
    assert (vm.starting, vm.configuring, vm.failed) == (False, False, None)
    assert vm.stats.calls == 4  # _initialize, on_context_create, on_vm_start, on_configure


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", r"^bad\.wasm: not a WebAssembly module \(missing \\0asm magic\)$"),
        (b"MZ\x90\x00", r"^bad\.wasm: not a WebAssembly module"),
        (b"\0asm\x01\0\0\0garbage", r"^bad\.wasm: invalid WebAssembly module: "),
        (b"\0asm\x09\0\0\0", r"^bad\.wasm: invalid WebAssembly module: "),
    ],
)
def test_invalid_module_bytes(data: bytes, message: str) -> None:
    with pytest.raises(WasmError, match=message):
        compile_module(engine(), data, "bad.wasm")


def test_invalid_module_through_load_handle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMGATE_CACHE_DIR", "off")
    path = tmp_path / "broken.wasm"
    path.write_bytes(b"\0asm\x01\0\0\0\x01\xff")
    with pytest.raises(PluginError, match=r"plugin broken: .*broken\.wasm: invalid WebAssembly module"):
        load_handle(PluginSpec("broken", module_path=path))


# ---- a host function that raises -----------------------------------------------------


@pytest.fixture
def broken_log_level(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    key = (ENV, "proxy_get_log_level")

    def boom(vm: object, *args: int) -> int:
        raise RuntimeError("kaput")

    monkeypatch.setitem(REGISTRY, key, dataclasses.replace(REGISTRY[key], fn=boom))  # restored afterwards
    yield


def test_host_exception_becomes_trap(tmp_path: Path, broken_log_level: None) -> None:
    g = Guest.new(tmp_path)
    with pytest.raises(WasmTrap) as e:
        g.call("proxy_get_log_level", RP)
    assert e.value.message == "t_proxy_get_log_level: host function env.proxy_get_log_level failed: kaput"
    assert e.value.exit_code is None
    assert g.vm.instance.host_error is None
    # the instance stays usable
    assert g.call("proxy_get_status", R2, RP, RS) == R.OK


def test_host_exception_in_callback_fails_vm(tmp_path: Path, broken_log_level: None) -> None:
    vm = new_vm(tmp_path, module_wat(request_headers="(call $proxy_get_log_level (i32.const 0x800))"))
    ctx = vm.create_http_context(Stream())
    expected = "proxy_on_request_headers: host function env.proxy_get_log_level failed: kaput"
    with pytest.raises(PluginFailed, match=f"^{expected}$"):
        vm.on_request_headers(ctx, 0, False)
    assert vm.failed == expected
    with pytest.raises(PluginFailed):
        vm.on_request_headers(ctx, 0, False)


def test_registry_restored_after_monkeypatch(tmp_path: Path) -> None:
    g = Guest.new(tmp_path)
    assert g.call("proxy_get_log_level", RP) == R.OK
