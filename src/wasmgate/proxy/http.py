"""HTTP/1.1 framing decisions and encodings as pure functions (no I/O)."""

from __future__ import annotations

from http import HTTPStatus

from wasmgate.headers import HeaderMap, Pair

# Connection-scoped headers: never forwarded, never shown to plugins as end-to-end.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"upgrade", b"trailer", b"proxy-authenticate", b"proxy-authorization",
})

CRLF = b"\r\n"


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def request_map(method: bytes, target: bytes, raw: list[Pair], scheme: bytes = b"http") -> HeaderMap:
    """Downstream request headers as Envoy's HTTP/1 codec presents them to filters.

    Host becomes ``:authority``; pseudo-headers come first.
    """
    authority = b""
    regular: list[Pair] = []
    for k, v in raw:
        k = k.lower()
        if k == b"host":
            if not authority:
                authority = v
        elif k not in HOP_BY_HOP or k == b"te":
            regular.append((k, v))
    pairs: list[Pair] = [(b":authority", authority), (b":path", target), (b":method", method),
                         (b":scheme", scheme)]
    pairs += regular
    return HeaderMap(pairs)


def response_map(status: int, raw: list[Pair]) -> HeaderMap:
    pairs: list[Pair] = [(b":status", str(status).encode())]
    pairs += [(k.lower(), v) for k, v in raw if k.lower() not in HOP_BY_HOP]
    return HeaderMap(pairs)


def _regular(headers: HeaderMap) -> list[bytes]:
    return [k + b": " + v for k, v in headers.pairs if not k.startswith(b":") and k not in HOP_BY_HOP]


def request_head(headers: HeaderMap, chunked: bool, upgrade: bytes | None = None,
                 client_ip: bytes = b"") -> bytes:
    """Upstream request line and headers. ``chunked`` replaces any Content-Length;
    ``upgrade`` asks the upstream to switch protocols (WebSocket and the like);
    ``client_ip`` is appended to X-Forwarded-For."""
    method = headers.get(b":method") or b"GET"
    path = headers.get(b":path") or b"/"
    lines = [method + b" " + path + b" HTTP/1.1", b"host: " + (headers.get(b":authority") or b"")]
    lines += (ln for ln in _regular(headers) if not (chunked and ln[:15].lower() == b"content-length:")
              and not (client_ip and ln[:16].lower() == b"x-forwarded-for:"))
    if client_ip:
        xff = headers.get(b"x-forwarded-for")
        lines.append(b"x-forwarded-for: " + (xff + b", " if xff else b"") + client_ip)
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    if upgrade is not None:
        lines += [b"connection: upgrade", b"upgrade: " + upgrade]
    return CRLF.join(lines) + CRLF + CRLF


def switching_protocols_head(headers: HeaderMap, upgrade: bytes) -> bytes:
    """A 101 response head: the upstream's headers plus the hop-by-hop pair it needs."""
    lines = [b"HTTP/1.1 101 Switching Protocols", *_regular(headers), b"connection: upgrade", b"upgrade: " + upgrade]
    return CRLF.join(lines) + CRLF + CRLF


def response_head(headers: HeaderMap, *, chunked: bool, keep_alive: bool, http10: bool = False) -> bytes:
    status_raw = headers.get(b":status") or b"200"
    try:
        status = int(status_raw)
    except ValueError:
        status = 502
    version = b"HTTP/1.0 " if http10 else b"HTTP/1.1 "
    lines = [version + str(status).encode() + b" " + reason(status)]
    lines += (ln for ln in _regular(headers) if not (chunked and ln[:15].lower() == b"content-length:"))
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    if not keep_alive:
        lines.append(b"connection: close")
    elif http10:
        lines.append(b"connection: keep-alive")
    return CRLF.join(lines) + CRLF + CRLF


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + CRLF if data else b""


def last_chunk(trailers: HeaderMap | None = None) -> bytes:
    tail = b"".join(k + b": " + v + CRLF for k, v in (trailers.pairs if trailers else ()))
    return b"0\r\n" + tail + CRLF


def body_allowed(status: int, method: bytes) -> bool:
    return not (method == b"HEAD" or 100 <= status < 200 or status in (204, 304))


def simple_response(status: int, body: bytes, *, content_type: bytes = b"text/plain",
                    close: bool = False) -> bytes:
    """A complete response the proxy writes itself (errors before any plugin ran)."""
    headers = HeaderMap([(b":status", str(status).encode()), (b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())])
    return response_head(headers, chunked=False, keep_alive=not close) + body
