"""Envoy's header-pair serialization, used by get/set_header_map_pairs and local replies.

Layout (little endian): u32 count, count * (u32 key_len, u32 value_len), then each
key and value followed by a NUL byte.
"""

from __future__ import annotations

import struct

Pairs = list[tuple[bytes, bytes]]



class PairsError(ValueError):
    pass


def encode_pairs(pairs: Pairs) -> bytes:
    count = len(pairs)
    sizes: list[int] = []
    for k, v in pairs:
        sizes += (len(k), len(v))
    head = struct.pack(f"<{1 + 2 * count}I", count, *sizes)
    return head + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)


def _u32(data: bytes, at: int) -> int:
    # Byte indexing: typed ints only, so compiled (mypyc) it is a few machine instructions.
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24


def decode_pairs(data: bytes) -> Pairs:
    n = len(data)
    if n == 0:
        return []
    if n < 4:
        raise PairsError("pairs buffer shorter than its count")
    count = _u32(data, 0)
    pos = 4 + 8 * count
    if pos > n:
        raise PairsError(f"pairs buffer too short for {count} entries")
    out: Pairs = []
    for i in range(count):
        klen = _u32(data, 4 + 8 * i)
        vlen = _u32(data, 8 + 8 * i)
        vpos = pos + klen + 1
        end = vpos + vlen
        if end >= n:  # each of key and value is followed by a NUL
            raise PairsError("pairs buffer truncated")
        out.append((data[pos : vpos - 1], data[vpos:end]))
        pos = end + 1
    return out
