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
