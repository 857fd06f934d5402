"""Per-context state: root contexts and the HTTP stream contexts they own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mypy_extensions import mypyc_attr

from wasmgate.abi.constants import BufferType, MapType, Word
from wasmgate.headers import HeaderMap

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM


class LocalReply:
    """A reply the proxy sends itself (a plugin's, or for an error). A plain class, not
    a dataclass: compiled, a dataclass keeps an interpreted __init__ (one per 403).

    ``headers`` is never changed in place: a plugin's replies share one list while its
    headers repeat (host/stream.py), and the exchange keys what it builds from them on
    that list (proxy/exchange.py)."""

    __slots__ = ("body", "details", "grpc_status", "headers", "status")

    def __init__(self, status: int, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
                 details: str = "", grpc_status: int = -1):
        self.status = status
        self.body = body
        self.headers: list[tuple[bytes, bytes]] = headers if headers is not None else []
        self.details = details
        self.grpc_status = grpc_status

    def _key(self) -> tuple[int, bytes, list[tuple[bytes, bytes]], str, int]:
        return self.status, self.body, self.headers, self.details, self.grpc_status

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocalReply) and self._key() == other._key()

    def __repr__(self) -> str:
        return f"LocalReply{self._key()!r}"


@mypyc_attr(allow_interpreted_subclasses=True)
class StreamHooks:
    """What the stream's owner (the exchange; devtools' driver) does when a plugin acts on
    the stream from outside the chain's own step. A native base, not callables: a method
    call through the vtable, no bound method per stream."""

    def on_continue(self, ctx: HttpContext, stream_type: int) -> None:
        """(context, stream_type): resume that direction."""

    def on_end(self, ctx: HttpContext) -> None:
        """A local reply or reset was requested (maybe from a callback of another
        context, e.g. an HTTP-call response)."""


class Stream:
    """One HTTP exchange as the plugins see it; shared by every plugin in the chain.

    Header maps are ``None`` until that part of the exchange exists; body buffers are
    set only while a body callback runs (Envoy's buffer is likewise per callback).
    """

    __slots__ = ("request_headers", "request_trailers", "response_headers", "response_trailers",
                 "request_body", "response_body", "local_reply", "reset", "hooks",
                 "downstream_addr", "local_addr", "code_details", "start_ns", "request_bytes",
                 "response_bytes", "upstream_addr", "connection_id", "_filter_state", "protocol",
                 "downstream", "upstream_conn", "attempts", "end_ns", "bytes_sent", "response_flags",
                 "upstream_tx_ns", "upstream_rx_ns")

    def __init__(self) -> None:
        self.request_headers: HeaderMap | None = None
        self.request_trailers: HeaderMap | None = None
        self.response_headers: HeaderMap | None = None
        self.response_trailers: HeaderMap | None = None
        self.request_body: bytearray | None = None
        self.response_body: bytearray | None = None
        self.local_reply: LocalReply | None = None
        self.reset = False
        self.hooks: StreamHooks | None = None  # set while the owner runs the stream
        self.downstream_addr: tuple[str, int] = ("", 0)  # the client
        self.local_addr: tuple[str, int] = ("", 0)  # our listener
        self.code_details = ""  # why a local reply was sent (Envoy's response code details)
        self.start_ns = 0  # wall clock when the request started
        self.request_bytes = 0  # request body bytes received
        self.response_bytes = 0  # response body bytes received from upstream
        self.upstream_addr: tuple[str, int] = ("", 0)
        self.connection_id = 0
        self._filter_state: dict[bytes, bytes] | None = None  # see filter_state
        self.protocol = b"HTTP/1.1"
        # For attributes, read only when a plugin asks (see host/attributes.py):
        self.downstream: Any = None  # the client connection (its transport: TLS details)
        self.upstream_conn: Any = None  # the upstream connection, once there is one
        self.attempts = 0  # upstream requests started (Envoy's upstream.request_attempt_count)
        self.end_ns = 0  # wall clock when the stream completed (request.duration)
        self.bytes_sent = 0  # body bytes sent downstream (response.size)
        self.response_flags = 0  # Envoy's legacy response flags (response.flags)
        self.upstream_tx_ns = 0  # monotonic: request sent upstream / response end received
        self.upstream_rx_ns = 0

    @property
    def filter_state(self) -> dict[bytes, bytes]:
        """proxy_set_property values under b"wasm." + path (Envoy's CelState keys), and
        set_envoy_filter_state objects under their own name. Made on first use: most
        streams never have any."""
        state = self._filter_state
        if state is None:
            state = self._filter_state = {}
        return state

    def header_map(self, map_type: int) -> HeaderMap | None:
        if map_type == 0:  # MapType.REQUEST_HEADERS (a plain int: no Enum lookup per call)
            return self.request_headers
        if map_type == 2:  # MapType.RESPONSE_HEADERS
            return self.response_headers
        if map_type == MapType.REQUEST_TRAILERS:
            if self.request_trailers is None and self.request_headers is not None:
                self.request_trailers = HeaderMap()  # Envoy lets plugins add trailers
            return self.request_trailers
        if map_type == MapType.RESPONSE_TRAILERS:
            if self.response_trailers is None and self.response_headers is not None:
                self.response_trailers = HeaderMap()
            return self.response_trailers
        return None

    def body(self, buffer_type: int) -> bytearray | None:
        if buffer_type == BufferType.HTTP_REQUEST_BODY:
            return self.request_body
        if buffer_type == BufferType.HTTP_RESPONSE_BODY:
            return self.response_body
        return None


class Context:
    __slots__ = ("id", "vm", "root_id")

    def __init__(self, vm: PluginVM, context_id: int, root_id: int):
        self.id = context_id
        self.vm = vm
        self.root_id = root_id

    @property
    def stream(self) -> Stream | None:
        return None


class RootContext(Context):
    __slots__ = ("done_pending",)

    def __init__(self, vm: PluginVM, context_id: int):
        super().__init__(vm, context_id, 0)
        self.done_pending = False


class HttpContext(Context):
    """A stream context. Like Envoy, a filter may touch a header map only while
    that map is in front of it: during its headers callback, and afterwards only if
    it stopped there. In ``on_log`` every map is readable.
    """

    __slots__ = ("_stream", "alive", "key", "open_maps", "logging")

    def __init__(self, vm: PluginVM, context_id: int, root_id: int, stream: Stream):
        self.id = context_id  # Context.__init__'s three, inline: one per request
        # The id as one int object, made here: compiled code would box ``id`` anew for
        # every guest call and dict operation of the stream (abi/constants.py, Word).
        self.key: Word = context_id
        self.vm = vm
        self.root_id = root_id
        self._stream = stream
        self.alive = True
        self.open_maps = 0  # bit per MapType
        self.logging = False

    @property
    def stream(self) -> Stream:
        return self._stream

    def header_map(self, map_type: int) -> HeaderMap | None:
        if self.logging or self.open_maps & (1 << map_type):
            return self._stream.header_map(map_type)
        return None


class NetConnection:
    """One proxied TCP connection as network plugins see it (Envoy's connection stream
    info): addresses, the connection id, filter state, and the hooks of its filter chain."""

    __slots__ = ("downstream_addr", "local_addr", "upstream_addr", "upstream_local", "upstream_cluster",
                 "connection_id", "filter_state", "start_ns", "bytes_received", "bytes_sent", "on_continue",
                 "on_close")

    def __init__(self) -> None:
        self.downstream_addr: tuple[str, int] = ("", 0)  # the client
        self.local_addr: tuple[str, int] = ("", 0)  # our listener
        self.upstream_cluster = ""  # set when tcp_proxy starts connecting
        self.upstream_addr: tuple[str, int] = ("", 0)  # set once the upstream is connected
        self.upstream_local: tuple[str, int] = ("", 0)  # our end of the upstream connection
        self.connection_id = 0
        self.filter_state: dict[bytes, bytes] = {}
        self.start_ns = 0
        self.bytes_received = 0  # from the client
        self.bytes_sent = 0  # to the client
        # Set by the network filter chain: proxy_continue_stream / proxy_close_stream.
        self.on_continue: Callable[[NetworkContext], None] | None = None
        self.on_close: Callable[[NetworkContext, int], None] | None = None


class NetworkContext(Context):
    """A TCP connection's context. ``downstream_data``/``upstream_data`` are the
    connection's buffers while this plugin's data callback runs, and for as long as it
    holds them paused (Envoy keeps the pointer until the plugin continues)."""

    __slots__ = ("conn", "alive", "downstream_data", "upstream_data")

    def __init__(self, vm: PluginVM, context_id: int, root_id: int, conn: NetConnection):
        super().__init__(vm, context_id, root_id)
        self.conn = conn
        self.alive = True
        self.downstream_data: bytearray | None = None
        self.upstream_data: bytearray | None = None
