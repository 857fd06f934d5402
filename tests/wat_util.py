"""A tiny Proxy-Wasm test module, written in WAT, and helpers to drive it.

``module_wat`` renders one module that imports every host function with the
signature the Proxy-Wasm ABI / WASI preview1 gives it, and exports a wrapper
``t_<name>`` per import that passes its arguments straight through and returns
the status. Tests put inputs into linear memory, call a wrapper and read the
outputs back. Lifecycle callbacks and the allocator are parameters.

Memory layout (20 pages, so a 1 MiB random_get fits):

* ``0x100`` .. ``0x1ff``: records written by the lifecycle callbacks (``REC_*``)
* ``0x800`` .. ``0xfff``: return slots (``RP``, ``RS``, ``R2``, ``R3``)
* ``0x1000`` .. ``0xffff``: scratch inputs, handed out by ``Guest.put``
* ``0x10000``: heap of ``proxy_on_memory_allocate``; ``0x18000``: heap of ``malloc``
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from wasmgate.engine.wasm import compile_module, wat_to_wasm
from wasmgate.plugin.context import HttpContext, NetConnection, NetworkContext, Stream
from wasmgate.plugin.manager import engine
from wasmgate.plugin.spec import PluginSpec
from wasmgate.plugin.vm import PluginVM

ENV = "env"
WASI = "wasi_snapshot_preview1"
WASI_UNSTABLE = "wasi_unstable"

PAGES = 20
MEMORY_SIZE = PAGES * 65536
HEAP = 0x10000
MALLOC_HEAP = 0x18000
SCRATCH = 0x1000
RP, RS, R2, R3 = 0x800, 0x804, 0x808, 0x80C
OOB = 0xFFFFFFF0  # a pointer far beyond linear memory
SENTINEL = 0xA5A5A5A5

# Records of the default lifecycle callbacks (i32 each).
REC_VM_START_GET = 0x100  # status of get_buffer_bytes(VM_CONFIGURATION, 0, size)
REC_VM_START_PTR = 0x104
REC_VM_START_SIZE = 0x108
REC_VM_START_STATUS = 0x10C  # status of get_buffer_status(VM_CONFIGURATION)
REC_VM_START_LEN = 0x110
REC_VM_START_SET = 0x118  # status of set_buffer_bytes(VM_CONFIGURATION, 0, 0, "")
REC_VM_START_OTHER = 0x11C  # status of get_buffer_status(PLUGIN_CONFIGURATION) in vm_start
REC_CONF_GET = 0x120
REC_CONF_PTR = 0x124
REC_CONF_SIZE = 0x128
REC_CONF_STATUS = 0x12C
REC_CONF_LEN = 0x130
REC_CONF_SET = 0x138
REC_CONF_OTHER = 0x13C  # status of get_buffer_status(VM_CONFIGURATION) in on_configure
REC_HEADERS_ARGS = 0x140  # proxy_on_request_headers: context id, count, end_of_stream
REC_TICKS = 0x150  # proxy_on_tick calls

Import = tuple[str, str, str, str]  # module, name, params ('i' i32, 'I' i64), results

# Every host function with its signature as the Proxy-Wasm ABI and WASI preview1 define it.
HOST_IMPORTS: tuple[Import, ...] = (
    (ENV, "proxy_log", "iii", "i"),
    (ENV, "proxy_get_log_level", "i", "i"),
    (ENV, "proxy_get_current_time_nanoseconds", "i", "i"),
    (ENV, "proxy_get_status", "iii", "i"),
    (ENV, "proxy_set_tick_period_milliseconds", "i", "i"),
    (ENV, "proxy_done", "", "i"),
    (ENV, "proxy_set_effective_context", "i", "i"),
    (ENV, "proxy_get_buffer_bytes", "iiiii", "i"),
    (ENV, "proxy_get_buffer_status", "iii", "i"),
    (ENV, "proxy_set_buffer_bytes", "iiiii", "i"),
    (ENV, "proxy_get_header_map_value", "iiiii", "i"),
    (ENV, "proxy_get_header_map_pairs", "iii", "i"),
    (ENV, "proxy_set_header_map_pairs", "iii", "i"),
    (ENV, "proxy_get_header_map_size", "ii", "i"),
    (ENV, "proxy_add_header_map_value", "iiiii", "i"),
    (ENV, "proxy_replace_header_map_value", "iiiii", "i"),
    (ENV, "proxy_remove_header_map_value", "iii", "i"),
    (ENV, "proxy_send_local_response", "iiiiiiii", "i"),
    (ENV, "proxy_continue_stream", "i", "i"),
    (ENV, "proxy_close_stream", "i", "i"),
    (ENV, "proxy_continue_request", "", "i"),
    (ENV, "proxy_continue_response", "", "i"),
    (ENV, "proxy_clear_route_cache", "", "i"),
    (ENV, "proxy_get_configuration", "ii", "i"),
    (ENV, "proxy_get_property", "iiii", "i"),
    (ENV, "proxy_set_property", "iiii", "i"),
    (ENV, "proxy_http_call", "iiiiiiiiii", "i"),
    (ENV, "proxy_grpc_call", "iiiiiiiiiiii", "i"),
    (ENV, "proxy_grpc_stream", "iiiiiiiii", "i"),
    (ENV, "proxy_grpc_send", "iiii", "i"),
    (ENV, "proxy_grpc_cancel", "i", "i"),
    (ENV, "proxy_grpc_close", "i", "i"),
    (ENV, "proxy_call_foreign_function", "iiiiii", "i"),
    (ENV, "proxy_get_shared_data", "iiiii", "i"),
    (ENV, "proxy_set_shared_data", "iiiii", "i"),
    (ENV, "proxy_register_shared_queue", "iii", "i"),
    (ENV, "proxy_resolve_shared_queue", "iiiii", "i"),
    (ENV, "proxy_enqueue_shared_queue", "iii", "i"),
    (ENV, "proxy_dequeue_shared_queue", "iii", "i"),
    (ENV, "proxy_define_metric", "iiii", "i"),
    (ENV, "proxy_increment_metric", "iI", "i"),
    (ENV, "proxy_record_metric", "iI", "i"),
    (ENV, "proxy_get_metric", "ii", "i"),
    (WASI, "fd_write", "iiii", "i"),
    (WASI, "fd_read", "iiii", "i"),
    (WASI, "fd_fdstat_get", "ii", "i"),
    (WASI, "fd_fdstat_set_flags", "ii", "i"),
    (WASI, "fd_close", "i", "i"),
    (WASI, "fd_seek", "iIii", "i"),
    (WASI, "fd_prestat_get", "ii", "i"),
    (WASI, "fd_prestat_dir_name", "iii", "i"),
    (WASI, "environ_sizes_get", "ii", "i"),
    (WASI, "environ_get", "ii", "i"),
    (WASI, "args_sizes_get", "ii", "i"),
    (WASI, "args_get", "ii", "i"),
    (WASI, "clock_time_get", "iIi", "i"),
    (WASI, "clock_res_get", "ii", "i"),
    (WASI, "random_get", "ii", "i"),
    (WASI, "sched_yield", "", "i"),
    (WASI, "poll_oneoff", "iiii", "i"),
    (WASI, "proc_exit", "i", ""),
)

_WAT_TYPE = {"i": "i32", "I": "i64"}

# Default lifecycle bodies: each records what the configuration buffers look like.
_VM_START = """
    (i32.store (i32.const 0x100)
      (call $proxy_get_buffer_bytes (i32.const 6) (i32.const 0) (local.get 1) (i32.const 0x104) (i32.const 0x108)))
    (i32.store (i32.const 0x10C) (call $proxy_get_buffer_status (i32.const 6) (i32.const 0x110) (i32.const 0x114)))
    (i32.store (i32.const 0x118)
      (call $proxy_set_buffer_bytes (i32.const 6) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 0x11C) (call $proxy_get_buffer_status (i32.const 7) (i32.const 0x7F0) (i32.const 0x7F4)))
    (i32.const 1)"""

_CONFIGURE = """
    (i32.store (i32.const 0x120)
      (call $proxy_get_buffer_bytes (i32.const 7) (i32.const 0) (local.get 1) (i32.const 0x124) (i32.const 0x128)))
    (i32.store (i32.const 0x12C) (call $proxy_get_buffer_status (i32.const 7) (i32.const 0x130) (i32.const 0x134)))
    (i32.store (i32.const 0x138)
      (call $proxy_set_buffer_bytes (i32.const 7) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)))
    (i32.store (i32.const 0x13C) (call $proxy_get_buffer_status (i32.const 6) (i32.const 0x7F0) (i32.const 0x7F4)))
    (i32.const 1)"""

_REQUEST_HEADERS_3 = """
    (i32.store (i32.const 0x140) (local.get 0))
    (i32.store (i32.const 0x144) (local.get 1))
    (i32.store (i32.const 0x148) (local.get 2))
    (i32.const 0)"""

_REQUEST_HEADERS_2 = """
    (i32.store (i32.const 0x140) (local.get 0))
    (i32.store (i32.const 0x144) (local.get 1))
    (i32.store (i32.const 0x148) (i32.const -1))
    (i32.const 0)"""


def _params(sig: str) -> str:
    return f"(param {' '.join(_WAT_TYPE[c] for c in sig)})" if sig else ""


def _results(sig: str) -> str:
    return f"(result {' '.join(_WAT_TYPE[c] for c in sig)})" if sig else ""


def module_wat(
    *,
    omit: Iterable[str] = (),
    extra_imports: Iterable[Import] = (),
    markers: Sequence[str] = ("proxy_abi_version_0_2_1",),
    allocators: Sequence[str] = ("proxy_on_memory_allocate",),
    init: str | None = "",
    vm_start: str | None = _VM_START,
    configure: str | None = _CONFIGURE,
    request_headers_params: int = 3,
    request_headers: str | None = None,
) -> str:
    """The test module: HOST_IMPORTS but ``omit`` (names), plus ``extra_imports``.

    A ``None`` body leaves that export out altogether.
    """
    skip = set(omit)
    imps = [imp for imp in HOST_IMPORTS if imp[1] not in skip] + list(extra_imports)
    out = ["(module"]
    for mod, name, params, results in imps:
        out.append(f'  (import "{mod}" "{name}" (func ${name} {_params(params)} {_results(results)}))')
    out.append(f'  (memory (export "memory") {PAGES})')
    out.append(f"  (global $heap (mut i32) (i32.const {HEAP}))")
    out.append(f"  (global $mheap (mut i32) (i32.const {MALLOC_HEAP}))")
    out.extend(f'  (func (export "{m}"))' for m in markers)
    heaps = {"proxy_on_memory_allocate": "$heap", "malloc": "$mheap"}
    for alloc in allocators:
        g = heaps[alloc]
        out.append(
            f'  (func (export "{alloc}") (param $n i32) (result i32) (local $p i32)\n'
            f"    (local.set $p (global.get {g}))\n"
            f"    (global.set {g} (i32.add (global.get {g}) (local.get $n)))\n"
            "    (local.get $p))"
        )
    out.append('  (func (export "t_set_heap") (param i32) (global.set $heap (local.get 0)))')
    out.append('  (func (export "t_heap") (result i32) (global.get $heap))')
    for _mod, name, params, results in imps:
        args = " ".join(f"(local.get {i})" for i in range(len(params)))
        out.append(f'  (func (export "t_{name}") {_params(params)} {_results(results)} (call ${name} {args}))')
    if init is not None:
        out.append(f'  (func (export "_initialize") {init})')
    out.append('  (func (export "proxy_on_context_create") (param i32 i32))')
    if vm_start is not None:
        out.append(f'  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) {vm_start})')
    if configure is not None:
        out.append(f'  (func (export "proxy_on_configure") (param i32 i32) (result i32) {configure})')
    default_headers = _REQUEST_HEADERS_3 if request_headers_params == 3 else _REQUEST_HEADERS_2
    out.append(
        f'  (func (export "proxy_on_request_headers") {_params("i" * request_headers_params)} (result i32)'
        f" {request_headers if request_headers is not None else default_headers})"
    )
    out.append(
        '  (func (export "proxy_on_tick") (param i32)\n'
        f"    (i32.store (i32.const {REC_TICKS}) (i32.add (i32.load (i32.const {REC_TICKS})) (i32.const 1))))"
    )
    out.append(")")
    return "\n".join(out)


_modules: dict[bytes, wasmtime.Module] = {}


def write_module(tmp_path: Path, wat: str, name: str = "test.wasm") -> Path:
    path = tmp_path / name
    path.write_bytes(wat_to_wasm(wat))
    return path


def load_module(path: Path) -> wasmtime.Module:
    """Compile once per distinct module (compiling is the slow part of a test)."""
    wasm = path.read_bytes()
    module = _modules.get(wasm)
    if module is None:
        module = _modules[wasm] = compile_module(engine(), wasm, str(path))
    return module


def new_vm(tmp_path: Path, wat: str | None = None, *, name: str = "test-plugin", start: bool = True,
           plugin_config: bytes = b"", vm_config: bytes = b"", env: dict[str, str] | None = None,
           root_id: str = "", vm_id: str = "") -> PluginVM:
    path = write_module(tmp_path, wat if wat is not None else module_wat())
    spec = PluginSpec(name, module_path=path, root_id=root_id, vm_id=vm_id, plugin_config=plugin_config,
                      vm_config=vm_config, env=env or {})
    vm = PluginVM(spec, engine(), load_module(path))
    if start:
        vm.start()
    return vm


def pairs_bytes(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """Envoy's header-pair serialization, written out independently of wasmgate.abi.pairs."""
    out = struct.pack("<I", len(pairs))
    for k, v in pairs:
        out += struct.pack("<II", len(k), len(v))
    for k, v in pairs:
        out += k + b"\0" + v + b"\0"
    return out


@dataclass
class Guest:
    """A started VM of the test module and a scratch allocator for inputs."""

    vm: PluginVM
    scratch: int = SCRATCH

    @classmethod
    def new(cls, tmp_path: Path, wat: str | None = None) -> Guest:
        return cls(new_vm(tmp_path, wat))

    def call(self, name: str, *args: int) -> int:
        """Call the guest export ``t_<name>`` (or ``name`` itself when it has no wrapper)."""
        fn = self.vm.instance.func(f"t_{name}") or self.vm.instance.func(name)
        assert fn is not None, f"no export for {name}"
        return self.vm.instance.call(fn, *args)

    def put(self, data: bytes) -> int:
        """Write ``data`` into the scratch area; returns its pointer."""
        ptr = self.scratch
        assert ptr + len(data) <= HEAP, "scratch area exhausted"
        assert self.vm.instance.write(ptr, data)
        self.scratch = (ptr + len(data) + 15) & ~15
        return ptr

    def put_str(self, data: bytes) -> tuple[int, int]:
        return self.put(data), len(data)

    def mem(self, ptr: int, size: int) -> bytes:
        data = self.vm.instance.read(ptr, size)
        assert data is not None
        return data

    def u32(self, ptr: int) -> int:
        return int(struct.unpack("<I", self.mem(ptr, 4))[0])

    def i32(self, ptr: int) -> int:
        return int(struct.unpack("<i", self.mem(ptr, 4))[0])

    def u64(self, ptr: int) -> int:
        return int(struct.unpack("<Q", self.mem(ptr, 8))[0])

    def set_u32(self, ptr: int, value: int) -> None:
        assert self.vm.instance.write_u32(ptr, value)

    def poison(self, *ptrs: int) -> None:
        """Fill return slots with a sentinel so a test can tell they were written."""
        for p in ptrs:
            self.set_u32(p, SENTINEL)

    def out(self, rp: int = RP, rs: int = RS) -> bytes:
        """The bytes a host function returned through (``*rp``, ``*rs``)."""
        return self.mem(self.u32(rp), self.u32(rs))

    def http(self, stream: Stream | None = None, open_maps: int = 0xFF, *, logging: bool = False) -> HttpContext:
        """A new stream context, made the effective context, with ``open_maps`` available."""
        ctx = self.vm.create_http_context(stream or Stream())
        ctx.open_maps = open_maps
        ctx.logging = logging
        self.vm.effective = ctx
        return ctx

    def network(self, conn: NetConnection | None = None) -> NetworkContext:
        """A new TCP connection context, made the effective context."""
        ctx = self.vm.create_network_context(conn or NetConnection())
        self.vm.effective = ctx
        return ctx
