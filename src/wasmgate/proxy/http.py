"""HTTP/1.1 framing decisions and encodings as pure functions (no I/O)."""

from __future__ import annotations

from http import HTTPStatus
from typing import Final

from wasmgate.headers import HeaderMap, Pair

# Connection-scoped headers: never forwarded, never shown to plugins as end-to-end.
HOP_BY_HOP: Final = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
    b"upgrade", b"trailer", b"proxy-authenticate", b"proxy-authorization",
})

CRLF: Final = b"\r\n"


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


# Indexed by status (0-999): a list lookup boxes no key and hashes nothing.
_STATUS_BYTES: Final = [b"%d" % i for i in range(1000)]


def _status_lines(version: bytes) -> list[bytes | None]:
    """Status lines with their CRLF; None where the status has no reason phrase of its own."""
    lines: list[bytes | None] = [None] * 1000
    for s in HTTPStatus:
        lines[s.value] = b"HTTP/%s %d %s\r\n" % (version, s.value, s.phrase.encode())
    return lines


_STATUS_LINES_10: Final = _status_lines(b"1.0")
_STATUS_LINES_11: Final = _status_lines(b"1.1")


def status_bytes(status: int) -> bytes:
    return _STATUS_BYTES[status] if 0 <= status < 1000 else str(status).encode()


def _status_line(status: int, http10: bool) -> bytes:
    if 0 <= status < 1000:
        line = (_STATUS_LINES_10 if http10 else _STATUS_LINES_11)[status]
        if line is not None:
            return line
    return (b"HTTP/1.0 " if http10 else b"HTTP/1.1 ") + str(status).encode() + b" " + reason(status) + CRLF


_NO_AUTHORITY: Final = (b":authority", b"")
# Downstream request headers that need more than passing on (see DownstreamRequest).
_REQUEST_SPECIAL: Final = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-proto", b"x-request-id"}


class DownstreamRequest:
    """What one pass over a request's (lower-cased) headers tells the proxy: the
    headers plugins see (``pairs``: pseudo-headers first, as Envoy's HTTP/1 codec
    presents them, then the rest without Host and hop-by-hop headers), whether a body
    follows, and the headers Envoy acts on."""

    # Flags default at class level: a request sets only what it has.
    has_body = False
    expect_continue = False
    has_xfp = False
    has_request_id = False
    has_connection = False  # Connection or Proxy-Connection: llhttp's keep-alive reads them
    upgrade: bytes | None = None

    def __init__(self, lowered: list[Pair], scheme: bytes, method: bytes, target: bytes):
        self.scheme = scheme
        authority = b""
        # Built in place: :authority is set once Host is found (below).
        regular: list[Pair] = [_NO_AUTHORITY, (b":path", target), (b":method", method), (b":scheme", scheme)]
        has_body = expect = xfp = rid = conn = False
        upgrade = None
        special = _REQUEST_SPECIAL
        for kv in lowered:
            k = kv[0]
            if k in special:
                if k == b"host":
                    if not authority:
                        authority = kv[1]
                    continue
                if k == b"content-length":
                    if kv[1].strip() != b"0":
                        has_body = True
                elif k == b"x-forwarded-proto":
                    xfp = True
                elif k == b"x-request-id":
                    rid = True
                elif k == b"expect":
                    expect = expect or kv[1].strip().lower() == b"100-continue"
                elif k == b"transfer-encoding":
                    has_body = True
                    continue
                elif k == b"upgrade":
                    if upgrade is None:
                        upgrade = kv[1]
                    continue
                elif k != b"te":
                    if k == b"connection" or k == b"proxy-connection":
                        conn = True
                    continue  # other hop-by-hop headers
            regular.append(kv)
        if expect:
            regular = [kv for kv in regular if kv[0] != b"expect"]  # we answer 100 ourselves
            self.expect_continue = True
        if authority:
            regular[0] = (b":authority", authority)
        self.pairs = regular
        if has_body:
            self.has_body = True
        if xfp:
            self.has_xfp = True
        if rid:
            self.has_request_id = True
        if conn:
            self.has_connection = True
        if upgrade is not None:
            self.upgrade = upgrade

    def header_map(self) -> HeaderMap:
        return HeaderMap.of(self.pairs)


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
    return [k + b": " + v for k, v in headers.pairs if k[:1] != b":" and k not in HOP_BY_HOP]


_SKIP_CHUNKED: Final = HOP_BY_HOP | {b"content-length"}
_SKIP_XFF: Final = HOP_BY_HOP | {b"x-forwarded-for"}
_SKIP_CHUNKED_XFF: Final = _SKIP_XFF | {b"content-length"}


def request_head(headers: HeaderMap, chunked: bool, upgrade: bytes | None = None,
                 client_ip: bytes = b"") -> bytes:
    """Upstream request line and headers. ``chunked`` replaces any Content-Length;
    ``upgrade`` asks the upstream to switch protocols (WebSocket and the like);
    ``client_ip`` is appended to X-Forwarded-For."""
    skip = (_SKIP_CHUNKED_XFF if chunked else _SKIP_XFF) if client_ip else (_SKIP_CHUNKED if chunked else HOP_BY_HOP)
    method = path = authority = xff = None
    out = [b""]  # the request line and host, filled in below
    for k, v in headers.pairs:  # one loop: faster than comprehensions plus lookups here
        if k[:1] == b":":
            if k == b":method":
                if method is None:
                    method = v
            elif k == b":path":
                if path is None:
                    path = v
            elif k == b":authority" and authority is None:
                authority = v
        elif k in skip:
            if k == b"x-forwarded-for" and xff is None:
                xff = v
        else:
            out.append(k + b": " + v)
    out[0] = (method or b"GET") + b" " + (path or b"/") + b" HTTP/1.1\r\nhost: " + (authority or b"")
    if client_ip:
        out.append(b"x-forwarded-for: " + (xff + b", " if xff else b"") + client_ip)
    if chunked:
        out.append(b"transfer-encoding: chunked")
    if upgrade is not None:
        out += [b"connection: upgrade", b"upgrade: " + upgrade]
    out.append(CRLF)
    return CRLF.join(out)


def switching_protocols_head(headers: HeaderMap, upgrade: bytes) -> bytes:
    """A 101 response head: the upstream's headers plus the hop-by-hop pair it needs."""
    lines = [b"HTTP/1.1 101 Switching Protocols", *_regular(headers), b"connection: upgrade", b"upgrade: " + upgrade]
    return CRLF.join(lines) + CRLF + CRLF


def response_head(headers: HeaderMap, *, chunked: bool, keep_alive: bool, http10: bool = False,
                  status: int | None = None) -> bytes:
    """``status``: the value of ``:status`` when the caller has parsed it already."""
    if status is None:
        status_raw = headers.get(b":status") or b"200"
        try:
            status = int(status_raw)
        except ValueError:
            status = 502
    skip = _SKIP_CHUNKED if chunked else HOP_BY_HOP
    # One flat list joined once: concatenating each line would allocate twice per header.
    out = [_status_line(status, http10)]
    for k, v in headers.pairs:
        if (not k or k[0] != 58) and k not in skip:  # 58: b":", without slicing
            out.append(k)
            out.append(b": ")
            out.append(v)
            out.append(CRLF)
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive:
        out.append(b"connection: close\r\n")
    elif http10:
        out.append(b"connection: keep-alive\r\n")
    out.append(CRLF)
    return b"".join(out)


class HeadMemo:
    """The last response head built, reused while the next one's inputs are equal. For
    local replies: a plugin usually answers with the same status and headers request
    after request (a deny, a rate limit), and comparing the header list costs a fraction
    of building the head again (docs/performance.md)."""

    __slots__ = ("flags", "head", "pairs")

    def __init__(self) -> None:
        self.pairs: list[Pair] = []
        self.flags = -1
        self.head = b""

    def response_head(self, headers: HeaderMap, chunked: bool, keep_alive: bool, http10: bool,
                      status: int) -> bytes:
        """``response_head(headers, ...)``, built only when the inputs differ from the last."""
        flags = (status << 3) | (chunked << 2) | (keep_alive << 1) | http10
        pairs = headers.pairs
        if flags == self.flags and pairs == self.pairs:
            return self.head
        head = response_head(headers, chunked=chunked, keep_alive=keep_alive, http10=http10, status=status)
        self.pairs = pairs[:]  # a copy: the stream's map may change after this (tuples of bytes are not)
        self.flags = flags
        self.head = head
        return head


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + CRLF if data else b""


def last_chunk(trailers: HeaderMap | None = None) -> bytes:
    tail = b"".join(k + b": " + v + CRLF for k, v in (trailers.pairs if trailers else ()))
    return b"0\r\n" + tail + CRLF


def parse_status(raw: bytes | None) -> int:
    """A :status value as an int, 0 when it is not one; three digits without int()'s parsing."""
    if raw is not None and len(raw) == 3:
        a = raw[0] - 48
        b = raw[1] - 48
        c = raw[2] - 48
        if 0 <= a <= 9 and 0 <= b <= 9 and 0 <= c <= 9:
            return a * 100 + b * 10 + c
    try:
        return int(raw or b"0")
    except ValueError:
        return 0


def body_allowed(status: int, method: bytes) -> bool:
    return not (method == b"HEAD" or 100 <= status < 200 or status in (204, 304))


def simple_response(status: int, body: bytes, *, content_type: bytes = b"text/plain",
                    close: bool = False) -> bytes:
    """A complete response the proxy writes itself (errors before any plugin ran)."""
    headers = HeaderMap([(b":status", str(status).encode()), (b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())])
    return response_head(headers, chunked=False, keep_alive=not close) + body
