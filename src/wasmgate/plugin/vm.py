"""Plugin VMs: a module instance (``SharedVM``) and, per plugin on it, a root context
with its stream contexts (``PluginVM``).

Plugins with the same VM key share one instance, as in Envoy; each has its own root
context, configuration, timer and callouts. Lifecycle (as proxy-wasm-cpp-host does it):
instantiate and ``_initialize`` (or ``_start``) once per instance; per plugin
``proxy_on_context_create(root, 0)``, ``proxy_on_vm_start``, ``proxy_on_configure`` on
its own root context. Streams: ``proxy_on_context_create(id, root)``, the
header/body/trailer callbacks, then ``proxy_on_done``, ``proxy_on_log``,
``proxy_on_delete``. A trap fails the instance, so every plugin on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import wasmtime

from wasmgate import host
from wasmgate.abi.constants import ABI_MARKERS, AbiVersion, LogLevel, WasmResult, Word
from wasmgate.compiled import Referable
from wasmgate.engine.wasm import CallStats, GuestFunc, HostFunc, Instance, WasmError, WasmTrap, exports_of
from wasmgate.host.attributes import XdsInfo
from wasmgate.log import PY_LEVEL, wasm_log
from wasmgate.plugin import shared
from wasmgate.plugin.context import Context, HttpContext, NetConnection, NetworkContext, RootContext, Stream
from wasmgate.plugin.spec import PluginSpec

if TYPE_CHECKING:
    from wasmgate.plugin.manager import PluginHandle
    from wasmgate.proxy.callout import Callouts, CallResponse
    from wasmgate.proxy.grpc_callout import GrpcReceive

_log: Final = logging.getLogger("wasmgate.wasm")

_WASI_ENOSYS: Final = 52
_INVALID_MEMORY_ACCESS: Final = int(WasmResult.INVALID_MEMORY_ACCESS)


class PluginError(Exception):
    """A plugin could not be loaded or started (message names the plugin)."""


class PluginFailed(Exception):
    """A callback trapped; the VM is now failed and must not be called again."""


def detect_abi(module: wasmtime.Module) -> AbiVersion:
    names = set(exports_of(module))
    for marker, version in ABI_MARKERS:
        if marker in names:
            return version
    raise WasmError("module exports no proxy_abi_version_* marker; it is not a Proxy-Wasm module")


PluginStats = CallStats  # calls, errors, seconds, failed_streams of one plugin

_serials: Final = itertools.count(1)


class SharedVM(Referable):  # held weakly by host/metrics.py
    """One module instance and what belongs to it rather than to a plugin: context ids,
    callout tokens, the failure. Host functions act for ``current``, the plugin whose
    context is the effective one."""

    # (__weakref__ comes from Referable)
    __slots__ = ("call_token", "current", "failed", "grpc_call_token", "grpc_stream_token", "initialized",
                 "instance", "key", "next_id", "plugins", "contexts", "retiring", "serial")

    def __init__(self, current: PluginVM, key: str = ""):
        self.serial = next(_serials)  # tells instances apart on /plugins (a key outlives its instances)
        self.key = key  # the VM key it is shared under (the manager's pool); "" when not pooled
        self.current = current
        self.instance: Instance | None = None
        self.contexts: dict[int, Context] = {}  # every context of every plugin: ids are per instance
        self.plugins: list[PluginVM] = []  # plugins with a live root context here
        self.initialized = False  # _initialize/_start ran
        self.failed: str | None = None
        self.retiring = False  # being replaced (memory watchdog): no new plugins join it
        self.next_id = 1
        # Callout tokens as Envoy numbers them, per instance: the low two bits tell the kind
        # apart (0 HTTP call, 1 gRPC call, 2 gRPC stream), each kind counting up by 4.
        self.call_token = 0
        self.grpc_call_token = 1
        self.grpc_stream_token = 2

    def names(self) -> list[str]:
        """The plugins on this instance, once each."""
        return list(dict.fromkeys(p.name for p in self.plugins))


class PluginVM(Referable):  # held weakly by plugin/shared.py
    """One plugin on a module instance: its root context, stream contexts and callbacks."""

    def __init__(self, spec: PluginSpec, engine: wasmtime.Engine, module: wasmtime.Module,
                 stats: PluginStats | None = None, *, shared: SharedVM | None = None):
        self.spec = spec
        self.abi = detect_abi(module)
        self.stats = stats or PluginStats()
        self.failed: str | None = None
        self.contexts: dict[int, Context] = {}
        self.effective: Context | None = None
        # This plugin's last local-reply headers, raw and decoded (host/stream.py): a plugin
        # usually answers with the same ones, decoded once and shared (never changed in place).
        self.reply_raw: bytes | None = None
        self.reply_headers: list[tuple[bytes, bytes]] = []
        self.callouts: Callouts | None = None  # clusters for proxy_http_call, set by the manager
        self.xds = XdsInfo()  # the proxy's node, listener, route, cluster (xds.* attributes); set by the manager
        # declare_property: name -> (WasmType, readonly)
        self.declared_properties: dict[bytes, tuple[int, bool]] = {}
        self.foreign_data: dict[str, Any] = {}  # state kept by foreign functions (CEL expressions)
        self.call_data: bytes | None = None  # buffer type 8, during proxy_on_foreign_function
        self.pending_calls: dict[int, Any] = {}  # token -> callout in flight
        self.call_response: CallResponse | None = None  # readable during on_http_call_response
        self.grpc_receive: GrpcReceive | None = None  # map types 4/5, buffer 5 during proxy_on_grpc_*
        # proxy_get_status, as Envoy's root context keeps it: the code of the last gRPC
        # close stays; its message is there only during proxy_on_grpc_close.
        self.status_code = 0
        self.status_message = b""
        self.configuring = False  # plugin configuration is readable only in on_configure
        self.starting = False  # VM configuration is readable only in on_vm_start
        self._unknown_logged: set[str] = set()
        # Envoy's log prefixes: "<name> <root_id> <vm_id>" in stream contexts, "<root_id> <vm_id>"
        # in root contexts; empty parts left out.
        self._log_prefix = "".join(" " + p for p in (spec.name, spec.root_id, spec.vm_id) if p)
        self._root_log_prefix = "".join(" " + p for p in (spec.root_id, spec.vm_id) if p)
        self.wasi_env = [f"{k}={v}".encode() for k, v in spec.env.items()]
        self.on_failed: Callable[[PluginVM], None] | None = None  # set by the plugin's handle
        self.on_recycle: Callable[[PluginVM], None] | None = None  # likewise: the memory watchdog's
        if shared is None or shared.instance is None:
            shared = SharedVM(self)
            limits = spec.limits
            try:
                shared.instance = Instance(engine, module, host.bind(shared), self._unknown_import,
                                           max_memory_bytes=limits.max_memory_bytes,
                                           deadline=limits.start_deadline)
            except WasmError as e:
                raise PluginError(f"plugin {spec.name}: {e}") from None
        elif shared.current.wasi_env != self.wasi_env:
            # As Envoy: the environment is the instance's (vmConfig.env is not in the VM key).
            _log.warning("plugin %s: its vmConfig.env is not applied: it shares the VM of %s, started with "
                         "another environment", spec.name, shared.current.name)
            self.wasi_env = shared.current.wasi_env
        assert shared.instance is not None
        self.shared = shared
        self.instance: Instance = shared.instance
        # Bound once: a by-name method call looks the method up each time.
        self._call_args = self.instance.call_args
        self.read = self.instance.read  # guest bytes, or None when outside linear memory
        self.memory_size = self.instance.memory_size  # bytes of linear memory
        self.contexts = shared.contexts
        f = self.instance.func
        alloc = f("malloc") or f("proxy_on_memory_allocate")  # cpp-host's lookup order
        if alloc is None:
            raise PluginError(f"plugin {spec.name}: module exports neither proxy_on_memory_allocate nor malloc")
        self._alloc = alloc
        self._on_context_create = f("proxy_on_context_create")
        self._on_vm_start = f("proxy_on_vm_start")
        self._on_configure = f("proxy_on_configure")
        self._on_request_headers = f("proxy_on_request_headers")
        self._on_request_body = f("proxy_on_request_body")
        self._on_request_trailers = f("proxy_on_request_trailers")
        self._on_response_headers = f("proxy_on_response_headers")
        self._on_response_body = f("proxy_on_response_body")
        self._on_response_trailers = f("proxy_on_response_trailers")
        self._on_done = f("proxy_on_done")
        self._on_log = f("proxy_on_log")
        self._on_delete = f("proxy_on_delete")
        self._on_tick = f("proxy_on_tick")
        self.has_request_callbacks = any((self._on_request_headers, self._on_request_body,
                                          self._on_request_trailers))
        self.has_response_callbacks = any((self._on_response_headers, self._on_response_body,
                                           self._on_response_trailers))
        self.has_request_body_callbacks = self._on_request_body is not None  # may resize the request body
        self.has_response_body_callbacks = self._on_response_body is not None
        self.has_body_callbacks = bool(self._on_request_body or self._on_response_body)
        self._on_http_call_response = f("proxy_on_http_call_response")
        self._on_queue_ready = f("proxy_on_queue_ready")
        self._on_foreign_function = f("proxy_on_foreign_function")
        self._on_grpc_receive_initial_metadata = f("proxy_on_grpc_receive_initial_metadata")
        self._on_grpc_receive = f("proxy_on_grpc_receive")
        self._on_grpc_receive_trailing_metadata = f("proxy_on_grpc_receive_trailing_metadata")
        self._on_grpc_close = f("proxy_on_grpc_close")
        # Network (TCP) plugins: the same callbacks in every ABI version.
        self._on_new_connection = f("proxy_on_new_connection")
        self._on_downstream_data = f("proxy_on_downstream_data")
        self._on_upstream_data = f("proxy_on_upstream_data")
        self._on_downstream_connection_close = f("proxy_on_downstream_connection_close")
        self._on_upstream_connection_close = f("proxy_on_upstream_connection_close")
        self._tick_handle: asyncio.TimerHandle | None = None
        self.tick_period = 0.0  # seconds; 0 = no timer
        self.root = RootContext(self, 0)

    @property
    def name(self) -> str:
        return self.spec.name

    # ---- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Run the module's init (once per instance), then context_create, vm_start and
        configure on this plugin's new root context (as Envoy does for each plugin)."""
        sv = self.shared
        if sv.failed is not None:
            raise PluginError(f"plugin {self.name}: its VM has failed: {sv.failed}")
        sv.current = self
        self.instance.set_deadline(self.spec.limits.start_deadline)
        try:
            if not sv.initialized:
                for init in ("_initialize", "_start"):
                    fn = self.instance.func(init)
                    if fn is not None:
                        self._call(fn, None)
                        break
                sv.initialized = True
            self.root = RootContext(self, self._new_id())
            self.contexts[self.root.id] = self.root
            sv.plugins.append(self)  # from here a trap fails this plugin with the others
            self._start_root()
        except (PluginError, PluginFailed) as e:
            self._leave()
            if isinstance(e, PluginError):
                raise
            raise PluginError(f"plugin {self.name}: {e}") from None
        finally:
            self.instance.set_deadline(self.spec.limits.callback_deadline)

    def _start_root(self) -> None:
        if self._on_context_create:
            self._call(self._on_context_create, self.root, self.root.id, 0)
        if self._on_vm_start:
            self.starting = True
            ok = self._call(self._on_vm_start, self.root, self.root.id, len(self.spec.vm_config))
            self.starting = False
            if not ok:
                raise PluginError(f"plugin {self.name}: proxy_on_vm_start returned false")
        if self._on_configure:
            self.configuring = True
            ok = self._call(self._on_configure, self.root, self.root.id, len(self.spec.plugin_config))
            self.configuring = False
            if not ok:
                raise PluginError(f"plugin {self.name}: proxy_on_configure returned false")

    def activate(self) -> None:
        """Start serving on the running event loop (arms the tick timer, takes queue notifications)."""
        self.instance.keep_gil()
        self._schedule_tick()
        shared.LISTENERS.activate(self)

    def shutdown(self) -> None:
        """Retire this plugin: stop its timer and callouts, then on_done/on_delete of its
        root context. The instance lives on while other plugins use it."""
        self.tick_period = 0.0
        self._schedule_tick()
        self._cancel_calls()
        if self.failed is None:
            with contextlib.suppress(PluginFailed):
                if self._on_done is not None:
                    self._call(self._on_done, self.root, self.root.id)
                if self._on_delete is not None:
                    self._call(self._on_delete, self.root, self.root.id)
        self.failed = self.failed or "shut down"
        self._leave()

    def discard(self) -> None:
        """Drop a canary without calling into it (Envoy kills its canary VM likewise)."""
        self.tick_period = 0.0
        self._schedule_tick()
        self._cancel_calls()
        self.failed = self.failed or "discarded"
        self._leave()

    def _leave(self) -> None:
        """Take this plugin's contexts off the instance."""
        sv = self.shared
        with contextlib.suppress(ValueError):
            sv.plugins.remove(self)
        for cid in [cid for cid, ctx in self.contexts.items() if ctx.vm is self]:
            del self.contexts[cid]
        if sv.current is self and sv.plugins:
            sv.current = sv.plugins[0]

    def _new_id(self) -> int:
        sv = self.shared
        cid = sv.next_id
        sv.next_id += 1
        return cid

    def create_http_context(self, stream: Stream) -> HttpContext:
        ctx = HttpContext(self, self._new_id(), self.root.id, stream)
        self.contexts[ctx.key] = ctx
        if self._on_context_create:
            self._call(self._on_context_create, ctx, ctx.key, self.root.id)
        return ctx

    def on_request_headers(self, ctx: HttpContext, count: int, eos: bool) -> int:
        fn = self._on_request_headers
        return self._call(fn, ctx, ctx.key, count, eos) if fn else 0

    def on_request_body(self, ctx: HttpContext, size: int, eos: bool) -> int:
        fn = self._on_request_body
        return self._call(fn, ctx, ctx.key, size, eos) if fn else 0

    def on_request_trailers(self, ctx: HttpContext, count: int) -> int:
        fn = self._on_request_trailers
        return self._call(fn, ctx, ctx.key, count) if fn else 0

    def on_response_headers(self, ctx: HttpContext, count: int, eos: bool) -> int:
        fn = self._on_response_headers
        return self._call(fn, ctx, ctx.key, count, eos) if fn else 0

    def on_response_body(self, ctx: HttpContext, size: int, eos: bool) -> int:
        fn = self._on_response_body
        return self._call(fn, ctx, ctx.key, size, eos) if fn else 0

    def on_response_trailers(self, ctx: HttpContext, count: int) -> int:
        fn = self._on_response_trailers
        return self._call(fn, ctx, ctx.key, count) if fn else 0

    # ---- network (TCP) connections: see plugin/network.py -------------------------------

    def create_network_context(self, conn: NetConnection) -> NetworkContext:
        ctx = NetworkContext(self, self._new_id(), self.root.id, conn)
        self.contexts[ctx.id] = ctx
        if self._on_context_create:
            self._call(self._on_context_create, ctx, ctx.id, self.root.id)
        return ctx

    def on_new_connection(self, ctx: NetworkContext) -> int:
        fn = self._on_new_connection
        return self._call(fn, ctx, ctx.id) if fn else 0

    def on_downstream_data(self, ctx: NetworkContext, size: int, eos: bool) -> int:
        fn = self._on_downstream_data
        return self._call(fn, ctx, ctx.id, size, eos) if fn else 0

    def on_upstream_data(self, ctx: NetworkContext, size: int, eos: bool) -> int:
        fn = self._on_upstream_data
        return self._call(fn, ctx, ctx.id, size, eos) if fn else 0

    def on_downstream_connection_close(self, ctx: NetworkContext, peer: int) -> None:
        fn = self._on_downstream_connection_close
        if fn is not None:
            self._call(fn, ctx, ctx.id, peer)

    def on_upstream_connection_close(self, ctx: NetworkContext, peer: int) -> None:
        fn = self._on_upstream_connection_close
        if fn is not None:
            self._call(fn, ctx, ctx.id, peer)

    def finish_connection(self, ctx: NetworkContext) -> None:
        """on_done, on_log, on_delete: Envoy's order when a TCP connection closes."""
        if not ctx.alive:
            return
        try:
            if self.failed is None:
                for fn in (self._on_done, self._on_log, self._on_delete):
                    if fn is not None:
                        self._call(fn, ctx, ctx.id)
        except PluginFailed:
            pass
        finally:
            ctx.alive = False  # after: the connection's buffers stay readable in these callbacks
            self.contexts.pop(ctx.id, None)

    # ---- root-context callbacks for callouts, queues and foreign functions ----------------
    # Each runs on the context that asked (the root context unless a stream did) and
    # returns False when the VM has failed or lacks the export.

    def _root_callback(self, fn: GuestFunc | None, ctx: Context | None, *args: int) -> bool:
        if fn is None or self.failed is not None:
            return False
        try:
            self._call(fn, ctx or self.root, *args)
        except PluginFailed:
            return False
        return True

    def on_http_call_response(self, ctx: Context | None, token: int, headers: int, body_size: int,
                              trailers: int) -> bool:
        cid = (ctx or self.root).id
        return self._root_callback(self._on_http_call_response, ctx, cid, token, headers, body_size, trailers)

    def next_call_token(self) -> int:
        """The token of a new HTTP call: 4, 8, 12, ... (per instance, as in Envoy)."""
        sv = self.shared
        sv.call_token = (sv.call_token + 4) & 0xFFFFFFFF or 4
        return sv.call_token

    def next_grpc_token(self, stream: bool) -> int:
        """The token of a new gRPC call (5, 9, 13, ...) or stream (6, 10, 14, ...)."""
        sv = self.shared
        if stream:
            sv.grpc_stream_token = (sv.grpc_stream_token + 4) & 0xFFFFFFFF
            return sv.grpc_stream_token
        sv.grpc_call_token = (sv.grpc_call_token + 4) & 0xFFFFFFFF
        return sv.grpc_call_token

    def deliver_http_call_response(self, ctx: Context, token: int, response: CallResponse) -> None:
        """Run proxy_on_http_call_response with the response readable meanwhile."""
        if isinstance(ctx, HttpContext) and not ctx.alive:
            return
        self.call_response = response
        try:
            self.on_http_call_response(ctx, token, len(response.headers), len(response.body),
                                       len(response.trailers))
        finally:
            self.call_response = None

    def _cancel_calls(self) -> None:
        for call in list(self.pending_calls.values()):
            call.cancel()

    def on_queue_ready(self, queue_id: int) -> bool:
        return self._root_callback(self._on_queue_ready, self.root, self.root.id, queue_id)

    def on_foreign_function(self, function_id: int, data: bytes) -> bool:
        """Host-initiated call into the plugin; ``data`` is readable as buffer type 8."""
        self.call_data = data
        try:
            return self._root_callback(self._on_foreign_function, self.root, self.root.id, function_id, len(data))
        finally:
            self.call_data = None

    def on_grpc_receive_initial_metadata(self, ctx: Context | None, token: int, headers: int) -> bool:
        cid = (ctx or self.root).id
        return self._root_callback(self._on_grpc_receive_initial_metadata, ctx, cid, token, headers)

    def on_grpc_receive(self, ctx: Context | None, token: int, size: int) -> bool:
        cid = (ctx or self.root).id
        return self._root_callback(self._on_grpc_receive, ctx, cid, token, size)

    def on_grpc_receive_trailing_metadata(self, ctx: Context | None, token: int, trailers: int) -> bool:
        cid = (ctx or self.root).id
        return self._root_callback(self._on_grpc_receive_trailing_metadata, ctx, cid, token, trailers)

    def on_grpc_close(self, ctx: Context | None, token: int, status: int) -> bool:
        cid = (ctx or self.root).id
        return self._root_callback(self._on_grpc_close, ctx, cid, token, status)

    def log_stream(self, ctx: HttpContext) -> None:
        if ctx.alive and self._on_log is not None and self.failed is None:
            try:  # noqa: SIM105 (contextlib.suppress runs interpreted: per request, several times the cost)
                self._call(self._on_log, ctx, ctx.key)
            except PluginFailed:  # already logged and counted
                pass

    def finish_stream(self, ctx: HttpContext) -> None:
        """on_done then on_delete (Envoy runs every plugin's on_log before these)."""
        if not ctx.alive:
            return
        ctx.alive = False
        try:
            if self.failed is None:  # two ifs, not a loop over a tuple: one per request
                if self._on_done is not None:
                    self._call(self._on_done, ctx, ctx.key)
                if self._on_delete is not None:
                    self._call(self._on_delete, ctx, ctx.key)
        except PluginFailed:
            pass
        finally:
            contexts = self.contexts
            if ctx.key in contexts:  # not dict.pop: a method call by name, compiled
                del contexts[ctx.key]

    # ---- timers ----------------------------------------------------------------------

    def set_tick_period(self, millis: int) -> None:
        """proxy_set_tick_period_milliseconds: on_tick every period on the event loop."""
        self.tick_period = max(millis, 0) / 1000.0
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        if self.tick_period <= 0 or self.failed is not None or self._on_tick is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a unit test driving the VM by hand): no timer
        self._tick_handle = loop.call_later(self.tick_period, self._tick)

    def _tick_scheduled(self) -> bool:
        # A method, not `self._tick_handle is None` after setting it: see wasmgate/compiled.py.
        return self._tick_handle is not None

    def _tick(self) -> None:
        self._tick_handle = None
        if self._on_tick is None or self.failed is not None:
            return
        with contextlib.suppress(PluginFailed):  # fail() has logged it; the timer stops
            self._call(self._on_tick, self.root, self.root.id)
        if not self._tick_scheduled():  # on_tick may have set a new period (and scheduled it)
            self._schedule_tick()

    # ---- guest calls ---------------------------------------------------------------

    def _call(self, fn: GuestFunc, ctx: Context | None, *args: Word) -> int:
        if self.failed is not None:
            raise PluginFailed(self.failed)
        self.effective = ctx
        self.shared.current = self
        try:
            return self._call_args(fn, args, self.stats)  # counts the call and its time
        except WasmTrap as trap:
            self.stats.errors += 1
            raise PluginFailed(self.fail(trap)) from None

    def fail(self, trap: WasmTrap) -> str:
        """Mark the instance failed (once), and with it every plugin on it, as Envoy fails
        the whole VM; each plugin's handle applies its own fail strategy from here. Returns
        why it failed."""
        callback = trap.message.split(":", 1)[0]
        if trap.exit_code is not None:
            failed = f"proc_exit({trap.exit_code}) in {callback}"
        elif trap.message.endswith("interrupt"):
            failed = f"{callback}: CPU deadline exceeded ({self.spec.limits.callback_deadline * 1000:.0f} ms)"
        else:
            failed = trap.message
        sv = self.shared
        sv.failed = failed
        victims = [self, *(p for p in sv.plugins if p is not self and p.failed is None)]
        for p in victims:
            p.failed = failed
            p.tick_period = 0.0
            p._schedule_tick()
        _log.error("plugin %s failed: %s", self.name, trap.describe() if trap.exit_code is None else failed)
        if len(victims) > 1:
            _log.error("plugins %s failed with it: they share its VM",
                       ", ".join(dict.fromkeys(p.name for p in victims[1:])))
        for p in victims:
            if p.on_failed is not None:
                p.on_failed(p)
        return failed

    def copy_out(self, data: bytes, ptr_ptr: Word, size_ptr: Word) -> int:
        """Copy ``data`` into guest-allocated memory; write its pointer and size."""
        ok = self.instance.copy_out(self._alloc, data, ptr_ptr, size_ptr)
        return 0 if ok else _INVALID_MEMORY_ACCESS  # WasmResult.OK, as plain ints (no Enum lookup)

    # ---- logging -------------------------------------------------------------------

    def log(self, level: LogLevel, message: str) -> None:
        prefix = self._log_prefix if isinstance(self.effective, HttpContext) else self._root_log_prefix
        wasm_log.log(PY_LEVEL[level], "wasm log%s: %s", prefix, message)

    def _unknown_import(self, module: str, name: str, params: str, results: str) -> HostFunc:
        """Imports we don't provide still link; they fail softly and are logged once."""
        label = f"{module}.{name}"
        ret = _WASI_ENOSYS if module in host.registry.WASI_MODULES else WasmResult.UNIMPLEMENTED

        def unimplemented(*_: Any) -> int:
            if label not in self._unknown_logged:
                self._unknown_logged.add(label)
                _log.warning("plugin %s called unimplemented import %s", self.name, label)
            return ret

        return HostFunc(module, name, params, results, unimplemented)

    def memory_bytes(self) -> int:
        return self.memory_size()


class Plugin:
    """One VM generation of a plugin: its handle's ``current`` until replaced, and in use
    by the streams that checked it out (compiled, as every stream does)."""

    __slots__ = ("active", "handle", "recycle_limit", "retired", "vm")

    def __init__(self, handle: PluginHandle, vm: PluginVM):
        self.handle = handle
        self.vm = vm
        self.active = 0  # streams using this VM
        self.retired = False
        self.recycle_limit = handle.spec.limits.memory_recycle_bytes  # 0: none

    @property
    def name(self) -> str:
        return self.handle.name

    def checkout(self) -> bool:
        """A new stream takes this VM, unless it failed."""
        if self.vm.failed is not None:
            return False
        self.active += 1
        return True

    def checkin(self) -> bool:
        """A stream is done with it. True when the handle must act (PluginHandle.released):
        retired and now unused, or linear memory over the recycle limit."""
        self.active -= 1
        if self.retired:
            return self.active == 0
        limit = self.recycle_limit
        return limit > 0 and self.vm.failed is None and self.vm.memory_bytes() > limit
