"""Envoy's attribute model: what ``proxy_get_property`` reads and CEL expressions see.

As in Envoy 1.40 (``filters/common/expr/context.cc`` and the Wasm context's
``findValue``), a top-level name is one of ``request``, ``response``, ``connection``,
``upstream``, ``source``, ``destination``, ``metadata``, ``filter_state``,
``upstream_filter_state``, ``xds``, then ``plugin_name``, ``plugin_root_id``,
``plugin_vm_id``, ``connection_id``; any other name is a property the plugin set
(filter state ``wasm.<name>``). Values are computed when asked, never per request.

Values are plain Python objects tagged with CEL's types: ``bytes`` is a CEL string,
:class:`Raw` CEL bytes, ``int`` int64, :class:`U64` uint64, :class:`Duration` and
:class:`Timestamp` nanoseconds, ``dict``/``list`` maps and lists, :class:`Attrs` one of
Envoy's wrapper maps (keys looked up one by one, never listed), :data:`NULL` CEL null,
and protobuf messages (see envoy_pb.py). ``None`` means absent: Envoy's NotFound.
"""

from __future__ import annotations

import re
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wasmgate.abi.constants import MapType
from wasmgate.host import envoy_pb
from wasmgate.plugin.context import HttpContext, NetConnection, NetworkContext, Stream

if TYPE_CHECKING:
    from wasmgate.headers import HeaderMap
    from wasmgate.plugin.vm import PluginVM


class U64(int):
    """A CEL uint64."""


class Raw(bytes):
    """CEL bytes (plain ``bytes`` values are CEL strings)."""


class Duration(int):
    """Nanoseconds."""


class Timestamp(int):
    """Nanoseconds since the Unix epoch."""


class _Null:
    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()


class Attrs:
    """One of Envoy's wrapper maps: its keys are looked up one at a time. It cannot be
    listed, so reading it whole fails (SerializationFailure), as in Envoy."""

    __slots__ = ("_lookup", "keys")

    def __init__(self, lookup: Callable[[bytes], Any], keys: tuple[bytes, ...] = ()):
        self._lookup = lookup
        self.keys = keys  # every key it may answer (for CEL, which needs them up front)

    def get(self, key: bytes) -> Any:
        return self._lookup(key)


class SerializationFailure(Exception):
    pass


# ---- header maps ---------------------------------------------------------------------------

_HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z:]+")


def header_dict(h: HeaderMap | None) -> dict[bytes, bytes]:
    """A header map as Envoy's CEL sees it: each name once, repeated values joined by ','."""
    out: dict[bytes, bytes] = {}
    for k, v in h.pairs if h is not None else ():
        out[k] = out[k] + b"," + v if k in out else v
    return out


class Headers(dict[bytes, bytes]):
    """A header map attribute: lookups lower-case the name and refuse invalid names."""

    def lookup(self, key: bytes) -> bytes | None:
        if not _HEADER_NAME.fullmatch(key):
            return None
        return self.get(key.lower())


# ---- serialization (Envoy's serializeValue) -------------------------------------------------

def _pairs(items: list[tuple[bytes, bytes]]) -> bytes:
    sizes: list[int] = []
    for k, v in items:
        sizes += (len(k), len(v))
    return struct.pack(f"<{1 + len(sizes)}I", len(items), *sizes) + b"".join(k + b"\0" + v + b"\0" for k, v in items)


def serialize(value: Any) -> bytes:
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, U64):
        return struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
    if isinstance(value, int):
        return struct.pack("<q", value)
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, dict):
        return _pairs([(serialize(k), serialize(v)) for k, v in value.items()])
    if isinstance(value, list):
        return _pairs([(serialize(v), b"") for v in value])
    if hasattr(value, "SerializeToString"):
        return bytes(value.SerializeToString())
    raise SerializationFailure(type(value).__name__)  # NULL, Attrs


# ---- protobuf messages as CEL sees them ------------------------------------------------------

def from_message_field(msg: Any, name: bytes) -> Any:
    """Field ``name`` of a message, converted as CEL converts it; None if there is no such field."""
    try:
        fd = msg.DESCRIPTOR.fields_by_name.get(name.decode())
    except UnicodeDecodeError:
        return None
    if fd is None:
        return None
    value = getattr(msg, fd.name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        vfd = fd.message_type.fields_by_name["value"]
        return {_scalar(k, fd.message_type.fields_by_name["key"]): _field_value(v, vfd) for k, v in value.items()}
    if fd.is_repeated:
        return [_field_value(v, fd) for v in value]
    return _field_value(value, fd)


def _field_value(value: Any, fd: Any) -> Any:
    if fd.message_type is not None:
        return unwrap(value)
    return _scalar(value, fd)


def _scalar(value: Any, fd: Any) -> Any:
    t = fd.type
    if t == fd.TYPE_STRING:
        return str(value).encode()
    if t == fd.TYPE_BYTES:
        return Raw(value)
    if t == fd.TYPE_BOOL:
        return bool(value)
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return float(value)
    if t in (fd.TYPE_UINT32, fd.TYPE_UINT64, fd.TYPE_FIXED32, fd.TYPE_FIXED64):
        return U64(value)
    return int(value)  # signed integers and enums


def unwrap(msg: Any) -> Any:
    """Well-known types become CEL values (Struct a map, Value its content, ...)."""
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        return {k.encode(): unwrap(v) for k, v in msg.fields.items()}
    if name == "google.protobuf.ListValue":
        return [unwrap(v) for v in msg.values]
    if name == "google.protobuf.Value":
        kind = msg.WhichOneof("kind")
        if kind == "number_value":
            return float(msg.number_value)
        if kind == "string_value":
            return msg.string_value.encode()
        if kind == "bool_value":
            return bool(msg.bool_value)
        if kind in ("struct_value", "list_value"):
            return unwrap(getattr(msg, kind))
        return NULL
    if name == "google.protobuf.Duration":
        return Duration(msg.ToNanoseconds())
    if name == "google.protobuf.Timestamp":
        return Timestamp(msg.ToNanoseconds())
    return msg


# ---- path traversal (Envoy's getProperty) -----------------------------------------------------

def select(value: Any, key: bytes) -> Any:
    """One path step below ``value``; None when Envoy answers NotFound."""
    if isinstance(value, Attrs):
        return value.get(key)
    if isinstance(value, Headers):
        return value.lookup(key)
    if isinstance(value, dict):
        return value.get(key)
    if isinstance(value, list):
        try:
            i = int(key)
        except ValueError:
            return None
        return value[i] if 0 <= i < len(value) and key.strip() == key else None
    if hasattr(value, "DESCRIPTOR"):
        return from_message_field(value, key)
    return None


# ---- the attributes of a stream ---------------------------------------------------------------

class _Stream:
    """The attributes of one HTTP stream, as seen from one plugin's context."""

    def __init__(self, ctx: HttpContext):
        self.ctx = ctx
        self.s: Stream = ctx.stream

    def map(self, t: MapType) -> HeaderMap | None:
        return self.ctx.header_map(t)

    # request.*
    def request(self, key: bytes) -> Any:
        s = self.s
        h = self.map(MapType.REQUEST_HEADERS)
        if key == b"headers":
            return Headers(header_dict(h))
        if key == b"time":
            return Timestamp(s.start_ns) if s.start_ns else None
        if key == b"size":
            if h is not None and (cl := h.get(b"content-length")) is not None:
                return int(cl) if cl.isdigit() else None
            return s.request_bytes
        if key == b"total_size":
            return s.request_bytes + (h.byte_size() if h is not None else 0)
        if key == b"duration":
            return Duration(s.end_ns - s.start_ns) if s.end_ns and s.start_ns else None
        if key == b"protocol":
            return s.protocol
        if h is None:
            return None
        if key in _REQUEST_HEADERS:
            return h.get(_REQUEST_HEADERS[key])
        if key in (b"url_path", b"query"):
            path = h.get(b":path") or b""
            before, q, after = path.partition(b"?")
            return before if key == b"url_path" else after.split(b"#", 1)[0] if q else b""
        return None

    # response.*
    def response(self, key: bytes) -> Any:
        s = self.s
        if key == b"code":
            return self.code()
        if key == b"code_details":
            return re.sub(rb"\s", b"_", s.code_details.encode()) if s.code_details else None
        if key == b"flags":
            return s.response_flags
        if key == b"size":
            return s.bytes_sent
        h = self.map(MapType.RESPONSE_HEADERS)
        t = self.map(MapType.RESPONSE_TRAILERS)
        if key == b"headers":
            return Headers(header_dict(h))
        if key == b"trailers":
            return Headers(header_dict(t))
        if key == b"total_size":
            return s.bytes_sent + (h.byte_size() if h is not None else 0) + (t.byte_size() if t is not None else 0)
        if key == b"grpc_status":
            return self.grpc_status(h, t)
        if key == b"backend_latency":
            if s.upstream_tx_ns and s.upstream_rx_ns:
                return Duration(s.upstream_rx_ns - s.upstream_tx_ns)
            return None
        return None

    def code(self) -> int | None:
        h = self.s.response_headers
        code = h.get(b":status") if h is not None else None
        return int(code) if code and code.isdigit() else None

    def grpc_status(self, h: HeaderMap | None, t: HeaderMap | None) -> int | None:
        for m in (t, h):
            v = m.get(b"grpc-status") if m is not None else None
            if v:  # Envoy: a code above 16 (or not a number) is InvalidCode, -1
                return int(v) if v.isdigit() and int(v) <= 16 else -1
        code = self.code()
        return None if code is None else _HTTP_TO_GRPC.get(code, 2)

    # connection.*
    def connection(self, key: bytes) -> Any:
        s = self.s
        if key == b"id":
            return U64(s.connection_id) if s.connection_id else None
        tls = _tls(s.downstream)
        if key == b"mtls":
            return tls is not None and tls.peer is not None
        if key == b"requested_server_name":
            return tls.sni.encode() if tls is not None else b""
        if tls is None:
            return None  # termination_details, transport_failure_reason: never set here
        return tls.attribute(key)

    # upstream.*
    def upstream(self, key: bytes) -> Any:
        s = self.s
        if key == b"request_attempt_count":
            return U64(s.attempts)
        if not s.attempts:
            return None
        if key == b"transport_failure_reason":
            return b""
        host, port = s.upstream_addr
        if not host:
            return None
        if key == b"address":
            return f"{host}:{port}".encode()
        if key == b"port":
            return port
        if key == b"locality":
            return envoy_pb.locality()
        conn = s.upstream_conn
        if key == b"local_address":
            local = getattr(conn, "local", None)
            return f"{local[0]}:{local[1]}".encode() if local and local[0] else None
        tls = _tls(conn)
        return tls.attribute(key) if tls is not None else None

    def peer(self, addr: tuple[str, int], key: bytes) -> Any:
        if not addr[0]:
            return None
        if key == b"address":
            return f"{addr[0]}:{addr[1]}".encode()
        if key == b"port":
            return addr[1]
        return None


_REQUEST_HEADERS = {b"path": b":path", b"host": b":authority", b"scheme": b":scheme", b"method": b":method",
                    b"referer": b"referer", b"id": b"x-request-id", b"useragent": b"user-agent"}
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}

REQUEST_KEYS = (b"headers", b"time", b"size", b"total_size", b"duration", b"protocol", *_REQUEST_HEADERS,
                b"url_path", b"query")
RESPONSE_KEYS = (b"code", b"code_details", b"flags", b"size", b"headers", b"trailers", b"total_size",
                 b"grpc_status", b"backend_latency")
TLS_KEYS = (b"tls_version", b"subject_local_certificate", b"subject_peer_certificate",
            b"uri_san_local_certificate", b"uri_san_peer_certificate", b"dns_san_local_certificate",
            b"dns_san_peer_certificate", b"sha256_peer_certificate_digest")
CONNECTION_KEYS = (b"id", b"mtls", b"requested_server_name", *TLS_KEYS)
UPSTREAM_KEYS = (b"request_attempt_count", b"transport_failure_reason", b"address", b"port", b"locality",
                 b"local_address", *TLS_KEYS)
PEER_KEYS = (b"address", b"port")
XDS_KEYS = (b"node", b"cluster_name", b"cluster_metadata", b"route_name", b"route_metadata", b"virtual_host_name",
            b"virtual_host_metadata", b"upstream_host_metadata", b"filter_chain_name", b"listener_metadata",
            b"listener_direction")


class _Tls:
    """TLS details of one connection (downstream or upstream), from its ssl object."""

    def __init__(self, obj: Any):
        from wasmgate.proxy import tls

        self.version = obj.version() or ""
        der = obj.getpeercert(binary_form=True)
        self.peer = tls.cert_info(der) if der else None
        ctx = obj.context
        local_der = getattr(ctx, "local_der", b"")
        self.local = tls.cert_info(local_der) if local_der else None
        self.sni = tls.requested_server_name(obj) if obj.server_side else ""

    def attribute(self, key: bytes) -> Any:
        local, peer = self.local, self.peer
        if key == b"tls_version":
            return self.version.encode()
        if key == b"subject_local_certificate":
            return local.subject.encode() if local else b""
        if key == b"subject_peer_certificate":
            return peer.subject.encode() if peer else b""
        if key == b"sha256_peer_certificate_digest":
            return peer.sha256.encode() if peer else None
        sans = {b"uri_san_local_certificate": local.uri_sans if local else (),
                b"uri_san_peer_certificate": peer.uri_sans if peer else (),
                b"dns_san_local_certificate": local.dns_sans if local else (),
                b"dns_san_peer_certificate": peer.dns_sans if peer else ()}.get(key)
        return sans[0].encode() if sans else None


_TLS: weakref.WeakKeyDictionary[Any, _Tls] = weakref.WeakKeyDictionary()


def _tls(conn: Any) -> _Tls | None:
    """TLS details of a connection (None: plain TCP), computed once per connection."""
    transport = getattr(conn, "transport", None)
    try:
        obj = transport.get_extra_info("ssl_object") if transport is not None else None
    except (AttributeError, OSError):
        return None
    if obj is None:
        return None
    info = _TLS.get(obj)
    if info is None:
        info = _TLS[obj] = _Tls(obj)
    return info


@dataclass
class XdsInfo:
    """What the ``xds.*`` attributes report: the proxy's node, and names and metadata of
    wasmgate's one listener, route and upstream cluster (the config file's ``xds:``).
    Metadata is Envoy's JSON form, ``{filter_metadata: {namespace: {...}}}``."""

    node: dict[str, Any] = field(default_factory=dict)
    cluster_name: str = "upstream"
    cluster_metadata: dict[str, Any] | None = None
    route_name: str = ""
    route_metadata: dict[str, Any] | None = None
    virtual_host_name: str = ""
    virtual_host_metadata: dict[str, Any] | None = None
    upstream_host_metadata: dict[str, Any] | None = None  # None: the host has none (Envoy: null)
    listener_metadata: dict[str, Any] | None = None
    listener_direction: int = 0  # envoy.config.core.v3.TrafficDirection: 1 INBOUND, 2 OUTBOUND
    filter_chain_name: str = ""
    _messages: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def message(self, name: str) -> Any:
        msg = self._messages.get(name)
        if msg is None:
            msg = self._messages[name] = envoy_pb.metadata(getattr(self, name))
        return msg

    def node_message(self) -> Any:
        msg = self._messages.get("node")
        if msg is None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                v = version("wasmgate")
            except PackageNotFoundError:
                v = ""
            msg = self._messages["node"] = envoy_pb.node(self.node, v)
        return msg


class _Connection:
    """The attributes of one TCP proxy connection (a network plugin's context), as Envoy
    answers them from the connection's stream info: no headers, byte counts for sizes,
    the tcp_proxy's cluster once it has started and its host once connected."""

    def __init__(self, ctx: NetworkContext):
        self.c: NetConnection = ctx.conn

    def request(self, key: bytes) -> Any:
        c = self.c
        if key == b"headers":
            return Headers()
        if key == b"time":
            return Timestamp(c.start_ns) if c.start_ns else None
        if key in (b"size", b"total_size"):
            return c.bytes_received
        return None

    def response(self, key: bytes) -> Any:
        if key in (b"headers", b"trailers"):
            return Headers()
        if key == b"flags":
            return 0
        if key in (b"size", b"total_size"):
            return self.c.bytes_sent
        return None

    def connection(self, key: bytes) -> Any:
        if key == b"id":
            return U64(self.c.connection_id) if self.c.connection_id else None
        if key == b"mtls":
            return False
        if key == b"requested_server_name":
            return b""
        return None  # plain TCP: no TLS attributes

    def upstream(self, key: bytes) -> Any:
        c = self.c
        if key == b"request_attempt_count":
            return U64(1 if c.upstream_cluster else 0)
        if key == b"transport_failure_reason":
            return b""
        if key == b"locality":
            return envoy_pb.locality() if c.upstream_addr[0] else None
        if key == b"local_address":
            return self.peer(c.upstream_local, b"address")
        return self.peer(c.upstream_addr, key)

    @staticmethod
    def peer(addr: tuple[str, int], key: bytes) -> Any:
        if not addr[0]:
            return None
        if key == b"address":
            return f"{addr[0]}:{addr[1]}".encode()
        if key == b"port":
            return addr[1]
        return None

    def xds(self, vm: PluginVM, key: bytes) -> Any:
        c = self.c
        if key == b"node":
            return vm.xds.node_message()
        if key == b"filter_chain_name":
            return b""
        if key == b"listener_direction":
            return 0
        if key == b"listener_metadata":
            return envoy_pb.metadata(None)
        if not c.upstream_cluster:
            return None
        if key == b"cluster_name":
            return c.upstream_cluster.encode()
        if key == b"cluster_metadata":
            return envoy_pb.metadata(None)
        if key == b"upstream_host_metadata":
            return NULL if c.upstream_addr[0] else None
        return None  # no route or virtual host on a TCP connection


def _connection_top(vm: PluginVM, cn: _Connection, name: bytes) -> Any:
    c = cn.c
    if name == b"request":
        return Attrs(cn.request, REQUEST_KEYS)
    if name == b"response":
        return Attrs(cn.response, RESPONSE_KEYS)
    if name == b"connection":
        return Attrs(cn.connection, CONNECTION_KEYS)
    if name == b"upstream":
        return Attrs(cn.upstream, UPSTREAM_KEYS)
    if name in (b"source", b"destination"):
        addr = c.downstream_addr if name == b"source" else c.local_addr
        return Attrs(lambda k: cn.peer(addr, k), PEER_KEYS)
    if name == b"metadata":
        return envoy_pb.metadata(None)
    if name == b"filter_state":
        return Attrs(lambda k: filter_state_value(vm, c, k), tuple(c.filter_state))
    if name == b"upstream_filter_state":
        return Attrs(lambda k: None) if c.upstream_cluster else None
    if name == b"xds":
        return Attrs(lambda k: cn.xds(vm, k), XDS_KEYS)
    return None


# ---- top level -----------------------------------------------------------------------------

STREAM_TOP = (b"request", b"response", b"connection", b"upstream", b"source", b"destination", b"metadata",
              b"filter_state", b"upstream_filter_state")
TOP = (*STREAM_TOP, b"xds", b"plugin_name", b"plugin_root_id", b"plugin_vm_id", b"connection_id")


def find(vm: PluginVM, name: bytes) -> Any:
    """The value of top-level attribute ``name`` for the VM's current (effective) context."""
    ctx = vm.effective
    st = _Stream(ctx) if isinstance(ctx, HttpContext) else None
    if isinstance(ctx, NetworkContext):
        cn = _Connection(ctx)
        if name in STREAM_TOP or name == b"xds":
            return _connection_top(vm, cn, name)
        if name == b"connection_id":
            return cn.connection(b"id")
        if name not in TOP:
            return filter_state_value(vm, cn.c, b"wasm." + name)
    if name == b"xds":
        return Attrs(lambda k: _xds(vm, st, k), XDS_KEYS)
    if st is not None and name in STREAM_TOP:
        return _stream_top(vm, st, name)
    if name == b"plugin_name":
        return vm.spec.name.encode()
    if name == b"plugin_root_id":
        return vm.spec.root_id.encode()
    if name == b"plugin_vm_id":
        return vm.spec.vm_id.encode()
    if name == b"connection_id":
        return U64(st.s.connection_id) if st is not None and st.s.connection_id else None
    if st is None:
        return None
    return filter_state_value(vm, st.s, b"wasm." + name)


def filter_state_value(vm: PluginVM, s: Stream | NetConnection, key: bytes) -> Any:
    value = s.filter_state.get(key)
    if value is None:
        return None
    if key.startswith(b"wasm."):
        declared = vm.declared_properties.get(key[5:])
        if declared is not None and declared[0] == 1:  # WasmType String
            return bytes(value)
    return Raw(value)


def _stream_top(vm: PluginVM, st: _Stream, name: bytes) -> Any:
    s = st.s
    if name == b"request":
        return Attrs(st.request, REQUEST_KEYS)
    if name == b"response":
        return Attrs(st.response, RESPONSE_KEYS)
    if name == b"connection":
        return Attrs(st.connection, CONNECTION_KEYS)
    if name == b"upstream":
        return Attrs(st.upstream, UPSTREAM_KEYS)
    if name == b"source":
        return Attrs(lambda k: st.peer(s.downstream_addr, k), PEER_KEYS)
    if name == b"destination":
        return Attrs(lambda k: st.peer(s.local_addr, k), PEER_KEYS)
    if name == b"metadata":
        return envoy_pb.metadata(None)  # dynamic metadata: nothing in wasmgate sets any
    if name == b"filter_state":
        return Attrs(lambda k: filter_state_value(vm, s, k), tuple(s.filter_state))
    # upstream_filter_state: exists (and is empty) once an upstream request started
    return Attrs(lambda k: None) if s.attempts else None


def _xds(vm: PluginVM, st: _Stream | None, key: bytes) -> Any:
    info = vm.xds
    if key == b"node":
        return info.node_message()
    if st is None:
        return None
    if key == b"cluster_name":
        return info.cluster_name.encode()
    if key == b"upstream_host_metadata":
        if not st.s.upstream_addr[0]:
            return None
        return info.message("upstream_host_metadata") if info.upstream_host_metadata is not None else NULL
    if key in (b"cluster_metadata", b"route_metadata", b"virtual_host_metadata", b"listener_metadata"):
        return info.message(key.decode())
    if key in (b"route_name", b"virtual_host_name", b"filter_chain_name"):
        return str(getattr(info, key.decode())).encode()
    if key == b"listener_direction":
        return info.listener_direction
    return None


def lookup_path(vm: PluginVM, path: bytes) -> Any:
    """Envoy's getProperty walk: the first segment names a top-level attribute, each
    further one selects below it. None: NotFound."""
    parts = path.split(b"\0")
    value = find(vm, parts[0])
    for part in parts[1:]:
        if value is None:
            return None
        value = select(value, part)
    return value

