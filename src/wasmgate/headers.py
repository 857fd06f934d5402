"""The header map shared by the proxy and the host functions.

Keys are stored lower-cased; pseudo-headers (``:method`` ...) stay in front, as in
Envoy's header maps, so ``get_header_map_pairs`` returns them first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

Pair = tuple[bytes, bytes]

# Called unbound: compiled, a by-name method call looks the method up each time.
_lower: Final = bytes.lower
_islower: Final = bytes.islower


class HeaderMap:
    __slots__ = ("pairs",)

    def __init__(self, pairs: Iterable[Pair] = (), *, _taken: list[Pair] | None = None):
        self.pairs: list[Pair] = _taken if _taken is not None else list(pairs)

    @staticmethod
    def of(pairs: list[Pair]) -> HeaderMap:
        """A map over ``pairs`` (lower-case keys, pseudo-headers first), taken as is."""
        # (not a classmethod: compiled, cls() is a generic call; _taken: no list made to
        # be thrown away)
        return HeaderMap(_taken=pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def __repr__(self) -> str:
        return f"HeaderMap({self.pairs!r})"

    def get(self, key: bytes) -> bytes | None:
        """First value for ``key`` (Envoy returns the first of repeated headers)."""
        for k, v in self.pairs:
            if k == key:
                return v
        if _islower(key):
            return None  # already lower-case: that was the whole search
        key = _lower(key)
        for k, v in self.pairs:
            if k == key:
                return v
        return None

    def get_all(self, key: bytes) -> list[bytes]:
        key = _lower(key)
        return [v for k, v in self.pairs if k == key]

    def add(self, key: bytes, value: bytes) -> None:
        key = _lower(key)
        if key.startswith(b":"):
            # Keep pseudo-headers ahead of regular ones.
            i = 0
            while i < len(self.pairs) and self.pairs[i][0].startswith(b":"):
                i += 1
            self.pairs.insert(i, (key, value))
        else:
            self.pairs.append((key, value))

    def replace(self, key: bytes, value: bytes) -> None:
        """Set ``key`` to ``value``: the first entry keeps its place, repeats go."""
        key = _lower(key)
        pairs = self.pairs
        for i in range(len(pairs)):
            if pairs[i][0] == key:
                self.pairs = [*pairs[:i], (key, value), *(p for p in pairs[i + 1:] if p[0] != key)]
                return
        self.add(key, value)

    def remove(self, key: bytes) -> None:
        key = _lower(key)
        self.pairs = [p for p in self.pairs if p[0] != key]

    def set_all(self, pairs: Iterable[Pair]) -> None:
        self.pairs = []
        for k, v in pairs:
            self.add(k, v)

    def byte_size(self) -> int:
        return sum(len(k) + len(v) for k, v in self.pairs)
