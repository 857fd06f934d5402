"""TCP proxy listeners: bytes between a client and a named cluster, through the network
plugins (Envoy's network Wasm filters in front of ``tcp_proxy``).

The plugin side is ``plugin/network.py``; this module owns the sockets. What it does
as Envoy's tcp_proxy and connection code do:

* The client is not read until the upstream is connected, and the upstream connection
  is made once the plugins have let the connection through ``proxy_on_new_connection``.
  A connect failure or timeout closes the client connection.
* Both directions half-close: the client's end of stream reaches the upstream as a
  shutdown of writing and the other way round. A connection whose two directions are
  closed is closed.
* The client connection closing closes the upstream one (at once after a local close,
  after flushing after a remote one); the upstream closing closes the client connection
  after flushing what was sent to it.
* Reading stops while the other side cannot take more, or while paused plugins hold more
  than the plugin's buffer limit (Envoy's per-connection buffer watermark).
* ``idle_timeout`` without bytes in either direction closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from wasmgate.abi.constants import PeerType
from wasmgate.plugin.context import NetConnection
from wasmgate.plugin.network import NetworkChain
from wasmgate.proxy.server import next_connection_id

if TYPE_CHECKING:
    from collections.abc import Callable

    from wasmgate.plugin.manager import PluginHandle, PluginManager
    from wasmgate.proxy.upstream import Cluster

_log = logging.getLogger("wasmgate.tcp")


@dataclass
class TcpStats:
    """This process's TCP proxy figures (summed across workers on /stats)."""

    connections: int = 0  # accepted
    active: int = 0
    upstream_failures: int = 0  # connect failures and timeouts
    bytes_received: int = 0  # from clients
    bytes_sent: int = 0  # to clients

    def snapshot(self) -> dict[str, int]:
        return {"connections": self.connections, "active": self.active, "upstream_failures": self.upstream_failures,
                "bytes_received": self.bytes_received, "bytes_sent": self.bytes_sent}


STATS = TcpStats()


class TcpListener:
    """One TCP proxy listener: a listen port in front of one cluster."""

    def __init__(self, name: str, port: int, cluster: Cluster, plugins: PluginManager, *,
                 buffer_limit: int = 1 << 20, connect_timeout: float = 5.0, idle_timeout: float = 3600.0):
        self.name = name
        self.port = port  # as configured (0: ephemeral), matched by WasmPlugin match[].ports
        self.cluster = cluster
        self.plugins = plugins
        self.buffer_limit = buffer_limit  # bytes held for paused plugins before reading stops
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.connections: set[TcpConnection] = set()
        self.server: asyncio.Server | None = None

    def handles(self) -> list[PluginHandle]:
        """The network plugins of the chain now in place that apply to this listener."""
        return [h for h in self.plugins.chain.network if h.spec.applies_to_port(self.port)]

    async def serve(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: TcpConnection(self), host, port, reuse_port=reuse_port or None)
        return self.server

    @property
    def bound_port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def close_all(self) -> None:
        """Close every connection (plugins get their close callbacks now)."""
        for c in list(self.connections):
            c.close_downstream()


class _Upstream(asyncio.Protocol):
    """The upstream side of one proxied connection."""

    def __init__(self, owner: TcpConnection):
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.closed:
            self.owner.upstream_data(data)

    def eof_received(self) -> bool:
        if not self.closed:
            self.owner.upstream_eof()
        return True  # keep writing until our side is done too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.owner.upstream_closed()

    def pause_writing(self) -> None:
        self.owner.pause("upstream-full")

    def resume_writing(self) -> None:
        self.owner.resume("upstream-full")

    def close(self, flush: bool) -> None:
        self.closed = True
        if self.transport is not None:
            if flush:
                self.transport.close()
            else:
                self.transport.abort()


class TcpConnection(asyncio.Protocol):
    """One client connection: the downstream socket, and the ``ConnectionIO`` of its chain."""

    def __init__(self, listener: TcpListener):
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.conn = NetConnection()
        self.chain: NetworkChain | None = None
        self.upstream: _Upstream | None = None
        self._connecting: asyncio.Task[None] | None = None
        self.closed = False  # the close event has been raised
        self.read_eof = False
        self.write_eof = False
        self.upstream_read_eof = False
        self.upstream_write_eof = False
        self._paused: set[str] = set()  # why the client is not being read
        self._unread = bytearray()  # arrived while reading was paused (uvloop may deliver one more read)
        self._unread_eof = False
        self._upstream_paused: set[str] = set()  # why the upstream is not being read
        self._idle: asyncio.TimerHandle | None = None
        self._limit = listener.buffer_limit
        self._loop = asyncio.get_running_loop()

    # ---- asyncio.Protocol (the client) -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        conn = self.conn
        conn.downstream_addr = (peer[0], peer[1]) if peer else ("", 0)
        conn.local_addr = (local[0], local[1]) if local else ("", 0)
        conn.connection_id = next_connection_id()
        conn.start_ns = time.time_ns()
        self.listener.connections.add(self)
        STATS.connections += 1
        STATS.active += 1
        self._touch()
        # tcp_proxy disables reading as it is created, before any plugin runs, until it
        # has an upstream (so a plugin paused in proxy_on_new_connection sees no data).
        self.pause("connecting")
        handles = self.listener.handles()
        # Bytes held for paused plugins: the proxy's limit, or a plugin's own smaller one.
        self._limit = min([self.listener.buffer_limit] + [h.spec.limits.max_buffered_body for h in handles
                                                          if h.spec.limits.max_buffered_body])
        self.chain = NetworkChain(handles, conn, self)
        self.chain.start()

    def data_received(self, data: bytes) -> None:
        STATS.bytes_received += len(data)
        self._touch()
        self._read(data)

    def _read(self, data: bytes) -> None:
        if self.closed or self.chain is None:
            return
        if self._paused:
            self._unread += data  # as if still in the socket: read once reading resumes
            return
        self.chain.on_read(data, False)
        self._watermarks()

    def eof_received(self) -> bool:
        if self.closed or self.chain is None:
            return False
        if self.read_eof or self._unread_eof:
            return True  # uvloop may report it again after reading resumes
        if self._paused:
            self._unread_eof = True
            return True
        self.read_eof = True
        self.chain.on_read(b"", True)
        if not self.closed and self.write_eof:
            self._close_event(PeerType.REMOTE)  # both directions done, the client's last
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_event(PeerType.REMOTE)

    def pause_writing(self) -> None:
        self._pause_upstream("client-full")

    def resume_writing(self) -> None:
        self._resume_upstream("client-full")

    # ---- ConnectionIO (asked by the chain) -----------------------------------------------

    @property
    def open(self) -> bool:
        return not self.closed

    def connect(self) -> None:
        self.conn.upstream_cluster = self.listener.cluster.name
        self._connecting = self._loop.create_task(self._connect())

    def send_upstream(self, buf: bytearray, eos: bool) -> None:
        up = self.upstream
        if up is None or up.transport is None or up.closed:
            return  # not connected yet: the bytes wait in the buffer
        if buf:
            up.transport.write(bytes(buf))
            del buf[:]
            self._touch()
        if eos and not self.upstream_write_eof:
            self.upstream_write_eof = True
            if up.transport.can_write_eof():
                up.transport.write_eof()
            if self.upstream_read_eof:
                # Both directions of the upstream are done; Envoy notices once the write
                # has gone out, after the event at hand.
                self._loop.call_soon(self._upstream_done)
        self._watermarks()

    def write_downstream(self, buf: bytearray, eos: bool) -> None:
        transport = self.transport
        if self.closed or self.write_eof or transport is None:
            return
        if buf:
            transport.write(bytes(buf))
            self.conn.bytes_sent += len(buf)
            STATS.bytes_sent += len(buf)
            del buf[:]
            self._touch()
        if eos:
            self.write_eof = True
            if transport.can_write_eof():
                transport.write_eof()
            if self.read_eof:
                self._loop.call_soon(self._both_done)
        self._watermarks()

    def close_downstream(self) -> None:
        """Envoy's close(FlushWrite): what was written goes out, then the socket closes."""
        if self.closed:
            return
        if self.transport is not None:
            self.transport.close()
        self._close_event(PeerType.LOCAL)

    def defer(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon(fn)

    # ---- the upstream ----------------------------------------------------------------

    async def _connect(self) -> None:
        cluster = self.listener.cluster
        try:
            _, proto = await asyncio.wait_for(
                self._loop.create_connection(lambda: _Upstream(self), cluster.host, cluster.port, ssl=cluster.tls,
                                             server_hostname=cluster.host if cluster.tls is not None else None),
                self.listener.connect_timeout)
        except (OSError, TimeoutError) as e:
            STATS.upstream_failures += 1
            _log.debug("tcp %s: connection %d: upstream %s: %s", self.listener.name, self.conn.connection_id,
                       cluster.name, "connect timeout" if isinstance(e, TimeoutError) else e)
            self.close_downstream()
            return
        finally:
            self._connecting = None
        if self.closed:
            proto.close(False)
            return
        self.upstream = proto
        assert proto.transport is not None
        peer = proto.transport.get_extra_info("peername")
        local = proto.transport.get_extra_info("sockname")
        self.conn.upstream_addr = (peer[0], peer[1]) if peer else ("", 0)
        self.conn.upstream_local = (local[0], local[1]) if local else ("", 0)
        if self._upstream_paused:
            proto.transport.pause_reading()
        self.resume("connecting")
        if self.chain is not None:
            self.chain.upstream_connected()

    def upstream_data(self, data: bytes) -> None:
        if self.closed or self.chain is None:
            return
        self._touch()
        self.chain.on_upstream_data(data, False)
        self._watermarks()

    def upstream_eof(self) -> None:
        self.upstream_read_eof = True
        if not self.closed and self.chain is not None:
            self.chain.on_upstream_data(b"", True)
        if self.upstream_write_eof:
            self._upstream_done()

    def upstream_closed(self) -> None:
        """The upstream connection is gone (both directions done, or reset): tcp_proxy
        closes the client connection, flushing what it was sent."""
        up = self.upstream
        if up is not None:
            up.close(True)
        self.close_downstream()

    def _upstream_done(self) -> None:
        if self.upstream is not None and not self.upstream.closed:
            self.upstream_closed()

    def _both_done(self) -> None:
        if not self.closed:
            self.close_downstream()  # both directions of the client connection done, ours last

    # ---- closing ---------------------------------------------------------------------

    def _close_event(self, peer: PeerType) -> None:
        """The client connection closed: the plugins hear of it, then the upstream goes."""
        if self.closed:
            return
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.listener.connections.discard(self)
        STATS.active -= 1
        if self.chain is not None:
            self.chain.on_downstream_closed(peer)
        if self._connecting is not None:
            self._connecting.cancel()
        up = self.upstream
        if up is not None and not up.closed:
            up.close(flush=peer == PeerType.REMOTE)  # Envoy: NoFlush after a local close
        _log.debug("tcp %s: connection %d closed (%s)", self.listener.name, self.conn.connection_id, peer.name.lower())

    def _touch(self) -> None:
        timeout = self.listener.idle_timeout
        if timeout <= 0 or self.closed:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(timeout, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle = None
        _log.debug("tcp %s: connection %d idle for %.0fs", self.listener.name, self.conn.connection_id,
                   self.listener.idle_timeout)
        if self.transport is not None:
            self.transport.abort()  # Envoy: close(NoFlush)
        self._close_event(PeerType.LOCAL)

    # ---- flow control ------------------------------------------------------------------

    def pause(self, reason: str) -> None:
        """Stop reading the client."""
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            if self._unread or self._unread_eof:
                self._loop.call_soon(self._read_unread)

    def _read_unread(self) -> None:
        data, eof = bytes(self._unread), self._unread_eof
        self._unread.clear()
        self._unread_eof = False
        if data:
            self._read(data)
        if eof:
            self.eof_received()

    def _pause_upstream(self, reason: str) -> None:
        up = self.upstream
        if not self._upstream_paused and up is not None and up.transport is not None and not up.closed:
            up.transport.pause_reading()
        self._upstream_paused.add(reason)

    def _resume_upstream(self, reason: str) -> None:
        if reason not in self._upstream_paused:
            return
        self._upstream_paused.discard(reason)
        up = self.upstream
        if not self._upstream_paused and up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    def _watermarks(self) -> None:
        """Held bytes over the limit stop reading that side until they drain."""
        chain = self.chain
        if chain is None or self.closed:
            return
        limit = self._limit
        if len(chain.read_buffer) > limit:
            self.pause("held")
        else:
            self.resume("held")
        if len(chain.write_buffer) > limit:
            self._pause_upstream("held")
        else:
            self._resume_upstream("held")
