"""Small pieces of the HTTP/1 codec (proxy/http.py) with exact expectations."""

from __future__ import annotations

import pytest

from wasmgate.proxy import http


def _as_int(raw: bytes | None) -> int:
    try:
        return int(raw or b"0")
    except ValueError:
        return 0


@pytest.mark.parametrize("raw", [b"200", b"403", b"099", b"000", b"999", b"20a", b"2 0", b" 20", b"2_0", b"-20",
                                 b"+20", b"\xd9\xa220"[:3], b"", None, b"1000", b"20", b"2", b" 200 ", b"abc"])
def test_parse_status_is_ints_reading(raw: bytes | None) -> None:
    """The three-digit fast path gives what int() gives (0 where int() refuses)."""
    assert http.parse_status(raw) == _as_int(raw)


def test_parse_status_every_three_digit_value() -> None:
    assert [http.parse_status(b"%03d" % n) for n in range(1000)] == list(range(1000))


def test_request_ids_are_uuid4_shaped_and_follow_the_sequence() -> None:
    import re

    from wasmgate.proxy import exchange

    ids = exchange._RequestIds()
    last = ids.last
    seen = set()
    for _ in range(5000):
        rid = ids.next()
        assert re.fullmatch(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", rid), rid
        last = (last + exchange._ID_STEP) & exchange._ID_MASK
        assert rid[:8] + rid[9:13] == b"%012x" % last
        seen.add(rid)
    assert len(seen) == 5000


def test_request_ids_lead_with_what_varies() -> None:
    """Envoy takes an x-request-id's first 8 hex digits as its integer (random_sampling,
    runtime_fraction): over consecutive ids of one process, that integer modulo 100 must
    fall in every bucket about equally, as with Envoy's random UUIDs."""
    from collections import Counter

    from wasmgate.proxy import exchange

    ids = exchange._RequestIds()
    buckets = Counter(int(ids.next()[:8], 16) % 100 for _ in range(100_000))
    assert len(buckets) == 100
    assert max(buckets.values()) < 1300 and min(buckets.values()) > 700  # 1000 each, give or take


def test_response_counts_by_status() -> None:
    from wasmgate.proxy.server import ProxyStats

    stats = ProxyStats()
    for status in (200, 403, 200, 0, 999, 1000, 12345, 403, 200):
        stats.response(status)
    assert stats.responses == {0: 1, 200: 3, 403: 2, 999: 1, 1000: 1, 12345: 1}


def test_status_bytes_and_lines_for_every_status() -> None:
    for status in range(1200):
        assert http.status_bytes(status) == str(status).encode()
        for http10, version in ((True, b"1.0"), (False, b"1.1")):
            line = http._status_line(status, http10)
            assert line == b"HTTP/%s %d %s\r\n" % (version, status, http.reason(status)), line


def test_head_memo_gives_what_response_head_gives() -> None:
    """The memo returns its last head only for equal inputs: any change to the status,
    the flags, the header list (also edited in place) or a header's bytes builds anew."""
    from wasmgate.headers import HeaderMap

    memo = http.HeadMemo()
    shared = HeaderMap([(b":status", b"403"), (b"x-denied", b"a"), (b"content-length", b"3")])
    cases: list[tuple[HeaderMap, bool, bool, bool, int]] = [
        (shared, False, True, False, 403),
        (shared, False, True, False, 403),  # equal: reused
        (shared, False, False, False, 403),  # keep-alive differs
        (shared, False, False, True, 403),  # HTTP/1.0
        (shared, True, False, True, 403),  # chunked
        (HeaderMap([(b":status", b"429"), (b"x-denied", b"a"), (b"content-length", b"3")]), True, False, True, 429),
        (HeaderMap([(b":status", b"429"), (b"x-denied", b"b"), (b"content-length", b"3")]), True, False, True, 429),
        (HeaderMap([(b":status", b"429"), (b"x-denied", b"b")]), True, False, True, 429),
    ]
    for headers, chunked, keep_alive, http10, status in cases:
        want = http.response_head(headers, chunked=chunked, keep_alive=keep_alive, http10=http10, status=status)
        assert memo.response_head(headers, chunked, keep_alive, http10, status) == want
    # The same map object, edited in place after its head was memoised.
    memo.response_head(shared, False, True, False, 403)
    shared.pairs[1] = (b"x-denied", b"changed")
    want = http.response_head(shared, chunked=False, keep_alive=True, http10=False, status=403)
    assert b"x-denied: changed" in want
    assert memo.response_head(shared, False, True, False, 403) == want
    shared.pairs.append((b"x-more", b"1"))
    assert memo.response_head(shared, False, True, False, 403) == \
        http.response_head(shared, chunked=False, keep_alive=True, http10=False, status=403)


def test_local_reply_headers_for_replies_sharing_a_header_list() -> None:
    """Replies sharing one header list (a plugin's repeated reply) get the headers of their
    own status and body; a map changed after it was made does not leak into the next one."""
    from wasmgate.plugin.context import LocalReply
    from wasmgate.proxy.exchange import _local_reply_headers

    def want(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
        length = [(b"content-length", b"%d" % len(body)), (b"content-type", b"text/plain")] if body else []
        return [(b":status", b"%d" % status), *headers, *length]

    shared = [(b"x-denied", b"yes")]
    other = [(b"x-denied", b"no")]
    for status, headers, body in [(403, shared, b"no\n"), (403, shared, b"no\n"), (429, shared, b"no\n"),
                                  (429, shared, b"slow down\n"), (429, shared, b""), (403, other, b"no\n"),
                                  (403, shared, b"no\n"), (403, [], b"")]:
        got = _local_reply_headers(LocalReply(status, body, headers))
        assert got.pairs == want(status, headers, body)
        got.add(b"x-added-later", b"1")
        got.pairs[0] = (b":status", b"500")
    assert _local_reply_headers(LocalReply(403, b"no\n", shared)).pairs == want(403, shared, b"no\n")
