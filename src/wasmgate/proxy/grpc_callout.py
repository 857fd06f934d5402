"""gRPC callouts from plugins (proxy_grpc_call, proxy_grpc_stream) to named clusters.

Envoy's semantics (source/extensions/common/wasm/context.cc and its gRPC async
client), which wasmgate follows:

* A call or stream belongs to the plugin's root context, whichever context started
  it: every ``proxy_on_grpc_*`` callback runs on the root context, and a stream
  context that ends does not cancel it (the VM going away does).
* Tokens: calls 5, 9, 13, ...; streams 6, 10, 14, ... (HTTP calls 4, 8, ...).
* A unary call gets exactly one callback: ``proxy_on_grpc_receive`` with the answer
  (buffer type 5), or ``proxy_on_grpc_close`` with a non-OK status. A stream gets
  ``proxy_on_grpc_receive_initial_metadata`` (map type 4), one ``proxy_on_grpc_receive``
  per message, ``proxy_on_grpc_receive_trailing_metadata`` (map type 5), then
  ``proxy_on_grpc_close``. During ``proxy_on_grpc_close`` ``proxy_get_status`` returns
  the status code and message.
* Status messages carry Envoy's response code details: ``msg{via_upstream}`` for a
  status from the server (just ``via_upstream`` for an empty one), ``upstream request
  timeout{response_timeout}`` (code 14) when the call's timeout fires.

Bytes pass through unchanged: messages are neither parsed nor serialized. The client
is grpc.aio on the proxy's event loop: it works under uvloop (tests/test_grpc_callout.py
runs it there), needs no thread per stream, and cancelling is one ``cancel()``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from wasmgate.headers import HeaderMap, Pair
from wasmgate.proxy.upstream import Cluster

if TYPE_CHECKING:
    from wasmgate.plugin.context import Context
    from wasmgate.plugin.vm import PluginVM

_log = logging.getLogger("wasmgate.upstream")

UNAVAILABLE = 14
INTERNAL = 13
DEADLINE_EXCEEDED = 4
VIA_UPSTREAM = "via_upstream"
TIMEOUT_MESSAGE = "upstream request timeout{response_timeout}"
_CONNECT_FAILURE = "upstream connect error or disconnect/reset before headers. reset reason: remote connection failure"
_METADATA_KEY = re.compile(rb"[0-9a-z_.\-]+")
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]*")


@dataclass
class GrpcReceive:
    """What the running ``proxy_on_grpc_*`` callback may read."""

    initial: HeaderMap | None = None  # map type 4, in on_grpc_receive_initial_metadata
    trailing: HeaderMap | None = None  # map type 5, in on_grpc_receive_trailing_metadata
    message: bytearray | None = None  # buffer type 5, in on_grpc_receive


def request_metadata(pairs: list[Pair]) -> list[tuple[str, str | bytes]]:
    """The plugin's initial metadata as grpcio takes it.

    Keys are lower-cased (as Envoy's header map does). ``-bin`` values are raw bytes,
    base64-encoded on the wire (Envoy does the same). Entries gRPC cannot carry
    (pseudo-headers, illegal characters) are left out.
    """
    out: list[tuple[str, str | bytes]] = []
    for k, v in pairs:
        key = k.lower()
        if not _METADATA_KEY.fullmatch(key):
            _log.debug("grpc callout: metadata key %r left out", key)
            continue
        if key.endswith(b"-bin"):
            out.append((key.decode(), v))
        elif _METADATA_VALUE.fullmatch(v):
            out.append((key.decode(), v.decode()))
        else:
            _log.debug("grpc callout: metadata %r left out (value not printable ASCII)", key)
    return out


def _pairs(metadata: Any) -> list[Pair]:
    """grpcio metadata as header pairs (``-bin`` values base64 again, as on the wire)."""
    out: list[Pair] = []
    for k, v in metadata or ():
        if isinstance(v, bytes):
            out.append((k.encode(), base64.b64encode(v).rstrip(b"=")))
        else:
            out.append((k.encode(), v.encode()))
    return out


def _status_message(code: int, details: str) -> str:
    """The message Envoy reports for a status grpcio gives us."""
    if code == UNAVAILABLE and details.startswith("failed to connect to all addresses"):
        why = "remote_connection_failure"
        if "Connection refused" in details:
            why += "|delayed_connect_error:_Connection_refused"
        return f"{_CONNECT_FAILURE}{{upstream_reset_before_response_started{{{why}}}}}"
    raw = _percent_encode(details).decode()  # Envoy does not decode grpc-message
    return f"{raw}{{{VIA_UPSTREAM}}}" if raw else VIA_UPSTREAM


async def _send(call: Any, message: bytes) -> None:
    """Write one message on a stream, as Envoy does: once the stream has ended, nothing.

    grpc.aio's ``write()`` turns a write that loses the race with the server's end of
    the stream into status INTERNAL "Internal error from Core", hiding the server's
    status (1 in 7 tries against a method that answers at once). The Cython call under
    it reports the lost race without touching the status; use it when it is there.
    """
    raw = getattr(call, "_cython_call", None)
    sent = getattr(call, "_metadata_sent", None)
    if raw is None or not isinstance(sent, asyncio.Event) or not hasattr(raw, "send_serialized_message"):
        await call.write(message)
        return
    if not sent.is_set():
        await sent.wait()
    if call.done():
        return
    try:
        await raw.send_serialized_message(message)
    except Exception as e:  # cygrpc.InternalError: the stream is over; the reader reports how
        _log.debug("grpc stream write after its end: %r", e)


def _percent_encode(message: str) -> bytes:
    """grpc-message as on the wire: grpcio hands it over decoded, Envoy passes it on raw."""
    return "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                   for b in message.encode()).encode()


def _code(status: grpc.StatusCode | None) -> int:
    return int(status.value[0]) if status is not None else 2  # UNKNOWN


class GrpcCallouts:
    """One grpc.aio channel per (cluster, authority), opened on first use."""

    def __init__(self, clusters: dict[str, Cluster]):
        self.clusters = clusters
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}

    def channel(self, cluster: str, authority: str) -> grpc.aio.Channel:
        key = (cluster, authority)
        ch = self._channels.get(key)
        if ch is None:
            c = self.clusters[cluster]
            host = f"[{c.host}]" if ":" in c.host else c.host
            ch = self._channels[key] = grpc.aio.insecure_channel(
                f"{host}:{c.port}",
                options=[
                    ("grpc.default_authority", authority or cluster),  # Envoy's :authority
                    ("grpc.max_receive_message_length", -1),
                    ("grpc.max_send_message_length", -1),
                ])
        return ch

    def call(self, vm: PluginVM, cluster: str, authority: str, path: str, metadata: list[Pair], message: bytes,
             timeout_ms: int) -> int:
        """Start a unary call; returns its token. ``cluster`` exists."""
        token = vm.next_grpc_token(stream=False)
        call = UnaryCall(vm, token, self.channel(cluster, authority), path, metadata, message, timeout_ms)
        vm.pending_calls[token] = call
        call.begin()
        return token

    def stream(self, vm: PluginVM, cluster: str, authority: str, path: str, metadata: list[Pair]) -> int:
        """Open a bidirectional stream; returns its token. ``cluster`` exists."""
        token = vm.next_grpc_token(stream=True)
        s = StreamCall(vm, token, self.channel(cluster, authority), path, metadata)
        vm.pending_calls[token] = s
        s.begin()
        return token

    def unavailable(self, vm: PluginVM, stream: bool) -> int:
        """Envoy's answer to a GrpcService naming a cluster it does not have: the
        token is spent, the host call fails, and proxy_on_grpc_close(14) follows."""
        token = vm.next_grpc_token(stream)
        asyncio.get_running_loop().call_soon(deliver_close, vm, token, UNAVAILABLE, "Cluster not available")
        return token

    def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            # Channel.close() without a grace period never suspends: run it to the end here.
            coro = ch.close()
            try:
                coro.send(None)
            except StopIteration:
                continue
            except RuntimeError:  # no event loop any more
                coro.close()
                continue
            coro.close()


# ---- delivery into the plugin ----------------------------------------------------------


def _deliver(vm: PluginVM, receive: GrpcReceive, callback: Callable[[Context, int, int], bool], token: int,
             count: int) -> None:
    """Run a proxy_on_grpc_* callback on the root context with ``receive`` readable meanwhile."""
    vm.grpc_receive = receive
    try:
        callback(vm.root, token, count)
    finally:
        vm.grpc_receive = None


def deliver_close(vm: PluginVM, token: int, code: int, message: str) -> None:
    """proxy_on_grpc_close, with proxy_get_status answering (code, message) meanwhile."""
    vm.status_code = code
    vm.status_message = message.encode()
    try:
        vm.on_grpc_close(vm.root, token, code)
    finally:
        vm.status_message = b""


class _Callout:
    """What UnaryCall and StreamCall share: the VM, the token, the task."""

    kind = "call"

    def __init__(self, vm: PluginVM, token: int, channel: grpc.aio.Channel, path: str, metadata: list[Pair]):
        self.vm = vm
        self.ctx = vm.root  # the owner: cancelled with the VM, not with a stream
        self.token = token
        self.channel = channel
        self.path = path
        self.metadata = request_metadata(metadata)
        self.dropped = False  # cancelled or finished: no more callbacks
        self._task: asyncio.Task[None] | None = None

    def begin(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        """proxy_grpc_cancel, or the VM going away: drop it without a callback."""
        self.dropped = True
        self.vm.pending_calls.pop(self.token, None)
        self._abort()

    def _abort(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()

    def _alive(self) -> bool:
        return not self.dropped and self.vm.failed is None


class UnaryCall(_Callout):
    def __init__(self, vm: PluginVM, token: int, channel: grpc.aio.Channel, path: str, metadata: list[Pair],
                 message: bytes, timeout_ms: int):
        super().__init__(vm, token, channel, path, metadata)
        self.message = message
        self.timeout = timeout_ms / 1000
        self._call: Any = None  # grpc.aio.UnaryUnaryCall
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0

    def begin(self) -> None:
        loop = asyncio.get_running_loop()
        if self.timeout > 0:  # Envoy's timer; 0 sends grpc-timeout 0 and arms none
            self._timer = loop.call_later(self.timeout, self._timed_out)
            self._deadline = loop.time() + self.timeout
        self._call = self.channel.unary_unary(self.path)(self.message, timeout=self.timeout,
                                                          metadata=self.metadata or None)
        super().begin()

    async def _run(self) -> None:
        assert self._call is not None
        try:
            response = await self._call
        except asyncio.CancelledError:
            return
        except grpc.aio.AioRpcError as e:
            code = _code(e.code())
            if (code == DEADLINE_EXCEEDED and self._timer is not None
                    and asyncio.get_running_loop().time() >= self._deadline - 0.05):
                self._timed_out()  # grpcio's own deadline (the same one) beat our timer to it
            else:
                self._close(code, _status_message(code, e.details() or ""))
            return
        except Exception as e:  # grpcio refused the call itself
            _log.debug("plugin %s: grpc call %d failed: %r", self.vm.name, self.token, e)
            self._close(INTERNAL, VIA_UPSTREAM)
            return
        if not self._alive():
            return
        self._finish()
        _deliver(self.vm, GrpcReceive(message=bytearray(response)), self.vm.on_grpc_receive, self.token,
                 len(response))

    def _timed_out(self) -> None:
        self._timer = None
        if self._call is not None:
            self._call.cancel()
        self._close(UNAVAILABLE, TIMEOUT_MESSAGE)

    def _finish(self) -> None:
        self.dropped = True
        self.vm.pending_calls.pop(self.token, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close(self, code: int, message: str) -> None:
        if not self._alive():
            return
        self._finish()
        _log.debug("plugin %s: grpc call %d %s: %d %s", self.vm.name, self.token, self.path, code, message)
        deliver_close(self.vm, self.token, code, message)

    def _abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._call is not None:
            self._call.cancel()
        super()._abort()


class StreamCall(_Callout):
    """A bidirectional stream. Sends are queued and written in order."""

    def __init__(self, vm: PluginVM, token: int, channel: grpc.aio.Channel, path: str, metadata: list[Pair]):
        super().__init__(vm, token, channel, path, metadata)
        self._call: Any = None  # grpc.aio.StreamStreamCall
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.local_closed = False  # the plugin called proxy_grpc_close
        self.remote_closed = False  # proxy_on_grpc_close has been delivered
        self._write_ended = False

    def begin(self) -> None:
        self._call = self.channel.stream_stream(self.path)(metadata=self.metadata or None)
        self._writer = asyncio.get_running_loop().create_task(self._write())
        super().begin()

    # -- the plugin's side
    def send(self, message: bytes, end_stream: bool) -> None:
        """proxy_grpc_send. After the end of the stream (ours or theirs) it does nothing."""
        if self._write_ended or self.remote_closed:
            return
        self._outbox.put_nowait(message)
        if end_stream:
            self._end_writes()

    def close_local(self) -> None:
        """proxy_grpc_close: half-close. Forgotten once both sides are closed."""
        if not self.remote_closed:
            self._end_writes()
        if self.remote_closed:
            self.vm.pending_calls.pop(self.token, None)
        else:
            self.local_closed = True

    def _end_writes(self) -> None:
        if not self._write_ended:
            self._write_ended = True
            self._outbox.put_nowait(None)

    async def _write(self) -> None:
        assert self._call is not None
        try:
            while (message := await self._outbox.get()) is not None:
                await _send(self._call, message)
            await self._call.done_writing()
        except asyncio.CancelledError:
            return
        except Exception as e:  # the stream has ended: the reader reports how
            _log.debug("plugin %s: grpc stream %d: write failed: %r", self.vm.name, self.token, e)

    def _abort(self) -> None:
        if self._call is not None:
            self._call.cancel()
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        super()._abort()

    # -- the server's side
    async def _run(self) -> None:
        call = self._call
        assert call is not None
        vm, token = self.vm, self.token
        try:
            initial = await call.initial_metadata()
            # A response that is only trailers (an error before any message) comes as
            # an empty initial map, then trailers holding the whole response head.
            trailers_only = not initial and call.done()
            head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
            imap = HeaderMap() if trailers_only else HeaderMap(head + _pairs(initial))
            if not self._alive():
                return
            _deliver(vm, GrpcReceive(initial=imap), vm.on_grpc_receive_initial_metadata, token, len(imap))
            while self._alive():
                try:
                    message = await call.read()
                except grpc.aio.AioRpcError:
                    break
                if message is grpc.aio.EOF:
                    break
                assert isinstance(message, bytes)
                if not self._alive():
                    return
                _deliver(vm, GrpcReceive(message=bytearray(message)), vm.on_grpc_receive, token, len(message))
            code = _code(await call.code())
            details = await call.details() or ""
            trailing = await call.trailing_metadata()
        except asyncio.CancelledError:
            return
        if not self._alive():
            return
        message = _status_message(code, details)
        grpc_message = details
        if message.startswith(_CONNECT_FAILURE):  # Envoy's local reply: a trailers-only response
            trailers_only = True
            grpc_message = _CONNECT_FAILURE
        status = [(b"grpc-status", str(code).encode()), (b"grpc-message", _percent_encode(grpc_message))]
        tmap = HeaderMap((head if trailers_only else []) + status + _pairs(trailing))
        _deliver(vm, GrpcReceive(trailing=tmap), vm.on_grpc_receive_trailing_metadata, token, len(tmap))
        if not self._alive():
            return
        self.remote_closed = True
        self.dropped = True
        if self.local_closed:
            vm.pending_calls.pop(token, None)
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
        deliver_close(vm, token, code, message)
