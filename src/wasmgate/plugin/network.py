"""Network (TCP) plugins on one connection: Envoy's network Wasm filter in front of
tcp_proxy. Sans-IO: ``proxy/tcp.py`` feeds bytes and socket events in and does what
the chain asks through ``ConnectionIO``.

Envoy's network filter manager, which this follows:

* Read filters (client to upstream) run in chain order. Each read starts again at the
  first filter with the whole read buffer: the bytes nobody has taken yet. A filter met
  for the first time first gets ``proxy_on_new_connection``. Pause from a filter stops
  iteration and the bytes stay in the buffer, so its next ``proxy_on_downstream_data``
  sees them again with the new ones (the size grows); ``proxy_continue_stream(DOWNSTREAM)``
  resumes from the filter after it. Past the last plugin, tcp_proxy connects upstream on
  its first turn (reading waits until it is connected) and afterwards takes the buffer.
* Write filters (upstream to client) run in reverse order, and Pause likewise holds the
  bytes. That direction has no continue (``proxy_continue_stream(UPSTREAM)`` is
  UNIMPLEMENTED in Envoy): a later ``proxy_on_upstream_data`` returning Continue sends all.
* ``proxy_on_upstream_connection_close(UNKNOWN)`` follows the ``proxy_on_upstream_data``
  that carried the upstream's end of stream. When the client connection closes, each
  plugin in order gets ``proxy_on_downstream_connection_close(peer)``, then on_done,
  on_log and on_delete.
* ``proxy_continue_stream``/``proxy_close_stream`` act once the VM call that asked returns.
* Fail strategy (proxy-wasm-cpp-host's CHECK_FAIL_NET): once the VM has failed, FAIL_OPEN
  lets the bytes through; otherwise the client connection is closed and nothing more is
  called. A plugin whose VM failed before the connection began is left out (FAIL_OPEN),
  or closes the connection at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Protocol

from wasmgate.abi.constants import Action, PeerType
from wasmgate.plugin.context import NetConnection, NetworkContext
from wasmgate.plugin.spec import FailStrategy
from wasmgate.plugin.vm import PluginFailed

if TYPE_CHECKING:
    from wasmgate.plugin.manager import PluginHandle
    from wasmgate.plugin.vm import Plugin, PluginVM

_log = logging.getLogger("wasmgate.wasm")

CONTINUE = Action.CONTINUE
PAUSE = Action.PAUSE


class ConnectionIO(Protocol):
    """What the chain asks of the TCP proxy."""

    @property
    def open(self) -> bool: ...  # the client connection is not closed

    def connect(self) -> None: ...  # tcp_proxy's first turn: connect upstream
    def send_upstream(self, buf: bytearray, eos: bool) -> None: ...  # take (drain) buf once connected
    def write_downstream(self, buf: bytearray, eos: bool) -> None: ...  # take (drain) buf to the client
    def close_downstream(self) -> None: ...  # close the client connection (flushing); raises the close event
    def defer(self, fn: Callable[[], None]) -> None: ...  # run soon, after the current VM call


class NetworkFilter:
    """One plugin on one connection (Envoy's network ``Context``)."""

    __slots__ = ("after", "chain", "closed", "created", "ctx", "downstream_closed", "handle", "in_call",
                 "index", "initialized", "plugin", "stream_failed")

    def __init__(self, handle: PluginHandle, plugin: Plugin | None, chain: NetworkChain, index: int):
        self.handle = handle
        self.plugin = plugin  # this connection's VM, kept to its end
        self.chain = chain
        self.index = index
        self.ctx: NetworkContext | None = None
        self.initialized = False  # the chain has called new_connection
        self.created = False  # Envoy's in_vm_context_created_
        self.stream_failed = False
        self.downstream_closed = False
        self.closed = False  # on_done/on_log/on_delete have run
        self.in_call = False
        self.after: list[Callable[[], None]] = []  # continue/close asked during this plugin's callback

    def _vm(self) -> PluginVM | None:
        plugin = self.plugin
        return plugin.vm if plugin is not None and plugin.vm.failed is None else None

    def _fail(self) -> int:
        if self.handle.spec.fail_strategy == FailStrategy.FAIL_OPEN:
            return CONTINUE
        if not self.stream_failed:
            self.stream_failed = True
            self.handle.stats.failed_streams += 1
            _log.debug("plugin %s failed connection %d: closing it", self.handle.name, self.chain.conn.connection_id)
            self.chain.io.close_downstream()
        return PAUSE

    def _run(self, call: Callable[[PluginVM, NetworkContext], int]) -> int:
        """One stream callback with CHECK_FAIL_NET around it; Continue or Pause."""
        vm, ctx = self._vm(), self.ctx
        if vm is None or ctx is None:
            return self._fail()
        self.in_call = True
        try:
            result = call(vm, ctx)
        except PluginFailed:
            result = 0
        finally:
            self.in_call = False
        action = self._fail() if self._vm() is None else (CONTINUE if result == 0 else PAUSE)
        self._run_after()
        return action

    def _notify(self, call: Callable[[PluginVM, NetworkContext], None]) -> None:
        """A close callback: no fail strategy, only skipped once the VM has failed."""
        vm, ctx = self._vm(), self.ctx
        if vm is None or ctx is None:
            return
        self.in_call = True
        try:
            call(vm, ctx)
        except PluginFailed:
            pass
        finally:
            self.in_call = False
        self._run_after()

    def _run_after(self) -> None:
        while self.after:
            self.after.pop(0)()

    def request(self, action: Callable[[], None]) -> None:
        """Run ``action`` when the VM call asking for it returns (Envoy defers both
        continue and close so)."""
        if self.in_call:
            self.after.append(action)
        else:
            self.chain.io.defer(action)  # asked from a root callback (a tick, a callout)

    # ---- the callbacks, as the chain calls them --------------------------------------

    def new_connection(self) -> int:
        vm = self._vm()
        if vm is not None:
            with contextlib.suppress(PluginFailed):  # the failure is handled by _run's check
                self.ctx = vm.create_network_context(self.chain.conn)
        self.created = True
        return self._run(lambda vm, ctx: vm.on_new_connection(ctx))

    def downstream_data(self, buf: bytearray, eos: bool) -> int:
        if not self.created:
            return CONTINUE
        ctx = self.ctx
        if ctx is not None:
            ctx.downstream_data = buf
        action = self._run(lambda vm, c: vm.on_downstream_data(c, len(buf), eos))
        if action == CONTINUE and ctx is not None:
            ctx.downstream_data = None
        return action

    def upstream_data(self, buf: bytearray, eos: bool) -> int:
        if not self.created:
            return CONTINUE
        ctx = self.ctx
        if ctx is not None:
            ctx.upstream_data = buf
        action = self._run(lambda vm, c: vm.on_upstream_data(c, len(buf), eos))
        if action == CONTINUE and ctx is not None:
            ctx.upstream_data = None
        if eos:
            # Envoy reports the upstream's close here, on its end of stream.
            self._notify(lambda vm, c: vm.on_upstream_connection_close(c, PeerType.UNKNOWN))
            if self.downstream_closed:
                self._close_tcp()
        return action

    def downstream_close(self, peer: PeerType) -> None:
        if not self.created:
            return
        self._notify(lambda vm, c: vm.on_downstream_connection_close(c, peer))
        self.downstream_closed = True
        self._close_tcp()

    def _close_tcp(self) -> None:
        if self.closed:
            return
        self.closed = True
        plugin, ctx = self.plugin, self.ctx
        if plugin is not None and ctx is not None:
            plugin.vm.finish_connection(ctx)  # skips the calls if the VM has failed

    def finish(self) -> None:
        plugin, self.plugin = self.plugin, None
        if plugin is not None:
            self.handle.checkin(plugin)


class NetworkChain:
    """The network plugins of one connection, with the buffers Envoy keeps for it."""

    def __init__(self, handles: list[PluginHandle], conn: NetConnection, io: ConnectionIO):
        self.conn = conn
        self.io = io
        self.filters: list[NetworkFilter] = []
        for h in handles:
            plugin = h.checkout()
            if plugin is None and h.spec.fail_strategy == FailStrategy.FAIL_OPEN:
                continue  # Envoy adds no filter for a failed VM that fails open
            self.filters.append(NetworkFilter(h, plugin, self, len(self.filters)))
        self.read_buffer = bytearray()  # from the client, not yet taken by tcp_proxy
        self.read_eos = False
        self.write_buffer = bytearray()  # from the upstream, not yet written to the client
        self.upstream_started = False
        self.finished = False
        conn.on_continue = self._on_continue
        conn.on_close = self._on_close

    # ---- from the TCP proxy ----------------------------------------------------------

    def start(self) -> None:
        self.continue_reading(0)

    def on_read(self, data: bytes, eos: bool) -> None:
        self.read_buffer += data
        self.conn.bytes_received += len(data)
        self.read_eos = self.read_eos or eos
        self.continue_reading(0)

    def upstream_connected(self) -> None:
        # Envoy re-enables reading and dispatches what waited in the buffer from the top.
        if self.read_buffer or self.read_eos:
            self.continue_reading(0)

    def on_upstream_data(self, data: bytes, eos: bool) -> None:
        self.write_buffer += data
        if not self.io.open:
            return
        for f in reversed(self.filters):
            if f.upstream_data(self.write_buffer, eos) != CONTINUE:
                return
        self.io.write_downstream(self.write_buffer, eos)

    def on_downstream_closed(self, peer: PeerType) -> None:
        if self.finished:
            return
        self.finished = True
        for f in self.filters:
            f.downstream_close(peer)
        for f in self.filters:
            f.finish()

    # ---- iteration -------------------------------------------------------------------

    def continue_reading(self, start: int) -> None:
        io = self.io
        for f in self.filters[start:]:
            if not io.open:
                return
            if not f.initialized:
                f.initialized = True
                if f.new_connection() != CONTINUE or not io.open:
                    return
            if (self.read_buffer or self.read_eos) and \
                    (f.downstream_data(self.read_buffer, self.read_eos) != CONTINUE or not io.open):
                return
        if not io.open:
            return
        if not self.upstream_started:
            self.upstream_started = True
            io.connect()
            return
        if self.read_buffer or self.read_eos:
            io.send_upstream(self.read_buffer, self.read_eos)

    def _filter_of(self, ctx: NetworkContext) -> NetworkFilter | None:
        for f in self.filters:
            if f.ctx is ctx:
                return f
        return None

    def _on_continue(self, ctx: NetworkContext) -> None:
        f = self._filter_of(ctx)
        if f is not None:
            f.request(partial(self._continue_after, f))

    def _continue_after(self, f: NetworkFilter) -> None:
        if self.io.open and not self.finished:
            self.continue_reading(f.index + 1)

    def _on_close(self, ctx: NetworkContext, stream_type: int) -> None:
        f = self._filter_of(ctx)
        if f is not None:
            f.request(self._close)

    def _close(self) -> None:
        if self.io.open:
            self.io.close_downstream()
