"""Envoy's header-pair serialization, used by get/set_header_map_pairs and local replies.

Layout (little endian): u32 count, count * (u32 key_len, u32 value_len), then each
key and value followed by a NUL byte.
"""

from __future__ import annotations

import struct

Pairs = list[tuple[bytes, bytes]]

_U32 = struct.Struct("<I")


class PairsError(ValueError):
    pass


def encode_pairs(pairs: Pairs) -> bytes:
    count = len(pairs)
    sizes: list[int] = []
    for k, v in pairs:
        sizes += (len(k), len(v))
    head = struct.pack(f"<{1 + 2 * count}I", count, *sizes)
    return head + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)


def decode_pairs(data: bytes) -> Pairs:
    if not data:
        return []
    if len(data) < 4:
        raise PairsError("pairs buffer shorter than its count")
    (count,) = _U32.unpack_from(data, 0)
    end_of_sizes = 4 + 8 * count
    if end_of_sizes > len(data):
        raise PairsError(f"pairs buffer too short for {count} entries")
    sizes = iter(struct.unpack_from(f"<{2 * count}I", data, 4))
    pos = end_of_sizes
    n = len(data)
    out: Pairs = []
    for klen, vlen in zip(sizes, sizes, strict=True):  # (key length, value length) per entry
        vpos = pos + klen + 1
        end = vpos + vlen
        if end >= n:  # each of key and value is followed by a NUL
            raise PairsError("pairs buffer truncated")
        out.append((data[pos : vpos - 1], data[vpos:end]))
        pos = end + 1
    return out
