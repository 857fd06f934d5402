"""Proxy-Wasm ABI enumerations (spec 0.2.1, with 0.1.0/0.2.0 differences noted)."""

from __future__ import annotations

from enum import IntEnum
from typing import Any

# An i32/i64 argument that is only handed on (a guest pointer or size passed to
# PluginVM.read/copy_out, a context id passed to a guest call). Any, not int: compiled
# (mypyc), an int is unboxed on entry and boxed into a new object for each such call;
# Any keeps the one int object (docs/performance.md).
Word = Any


class WasmResult(IntEnum):
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    BAD_EXPRESSION = 5
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    RESULT_MISMATCH = 9
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class MapType(IntEnum):
    REQUEST_HEADERS = 0
    REQUEST_TRAILERS = 1
    RESPONSE_HEADERS = 2
    RESPONSE_TRAILERS = 3
    GRPC_RECEIVE_INITIAL_METADATA = 4
    GRPC_RECEIVE_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class BufferType(IntEnum):
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_RECEIVE_BUFFER = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    CALL_DATA = 8


class StreamType(IntEnum):
    REQUEST = 0
    RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class PeerType(IntEnum):
    """Who closed a TCP connection (proxy_on_*_connection_close); Envoy's CloseType."""

    UNKNOWN = 0
    LOCAL = 1
    REMOTE = 2


class Action(IntEnum):
    """Return value of stream callbacks: headers use 0/1, bodies also 2/3."""

    CONTINUE = 0
    PAUSE = 1  # StopIteration for headers, StopIterationAndBuffer for data
    STOP_AND_WATERMARK = 2
    STOP_NO_BUFFER = 3


class LogLevel(IntEnum):
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5

    @classmethod
    def parse(cls, name: str) -> LogLevel:
        """Accept Envoy's level names (``warning``, ``err``, ``off``) as well as ours."""
        key = name.strip().upper()
        aliases = {"WARNING": "WARN", "ERR": "ERROR", "OFF": "CRITICAL", "FATAL": "CRITICAL"}
        try:
            return cls[aliases.get(key, key)]
        except KeyError:
            raise ValueError(f"unknown log level {name!r}") from None


class AbiVersion(IntEnum):
    V0_1_0 = 10
    V0_2_0 = 20
    V0_2_1 = 21

    @property
    def label(self) -> str:
        return {10: "0.1.0", 20: "0.2.0", 21: "0.2.1"}[self.value]


# Exported marker function -> ABI version; newest first so it wins when several exist.
ABI_MARKERS: tuple[tuple[str, AbiVersion], ...] = (
    ("proxy_abi_version_0_2_1", AbiVersion.V0_2_1),
    ("proxy_abi_version_0_2_0", AbiVersion.V0_2_0),
    ("proxy_abi_version_0_1_0", AbiVersion.V0_1_0),
)

PSEUDO_HEADERS = (b":method", b":path", b":authority", b":scheme", b":status")
