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
        assert rid[-12:] == b"%012x" % last
        seen.add(rid)
    assert len(seen) == 5000


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
