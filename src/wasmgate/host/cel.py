"""Envoy's CEL foreign functions: ``expr_create``, ``expr_evaluate``, ``expr_delete``.

Expressions run on cel-expr-python, the Python binding of cel-cpp, the CEL runtime Envoy
itself uses, so parsing, operators and errors are the same. As in Envoy (foreign.cc):
``expr_create`` takes the expression text and returns a uint32 token (little-endian),
counting from 0 per root context; it is parsed only, not type-checked (a syntax error is
BAD_ARGUMENT). ``expr_evaluate`` takes the 4-byte token (another size: BAD_ARGUMENT, an
unknown token: NOT_FOUND) and returns the value encoded as properties are; an evaluation
error (e.g. an absent attribute) is INTERNAL_FAILURE. ``expr_delete`` forgets a token.

The activation is the attribute model of host/attributes.py; only the top-level names an
expression mentions are computed, when it is evaluated.
"""

from __future__ import annotations

import logging
import re
import struct
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import TYPE_CHECKING, Any

from wasmgate.abi.constants import WasmResult
from wasmgate.host import attributes as A
from wasmgate.host.foreign import ForeignError, foreign

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult
_log = logging.getLogger("wasmgate.wasm")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@cache
def _env() -> Any:
    from cel_expr_python import cel  # type: ignore[import-not-found, import-untyped, unused-ignore]

    return cel.NewEnv()


class _Expr:
    __slots__ = ("compiled", "names", "text", "as_string")

    def __init__(self, text: str, compiled: Any):
        self.text = text
        self.compiled = compiled
        self.names = set(_IDENT.findall(text))
        self.as_string: Any = None  # string(<expr>), for durations and timestamps to the nanosecond


class _Table(dict[int, _Expr]):
    next_token = 0


def _table(vm: PluginVM) -> _Table:
    """The expressions of the current context's root context (Envoy keeps them there)."""
    ctx = vm.effective
    if ctx is None:
        raise ForeignError(R.NOT_FOUND)
    root = ctx.id if ctx.root_id == 0 else ctx.root_id
    tables: dict[int, _Table] = vm.foreign_data.setdefault("cel", {})
    return tables.setdefault(root, _Table())


def _token(arg: bytes) -> int:
    if len(arg) != 4:
        raise ForeignError(R.BAD_ARGUMENT)
    return int(struct.unpack("<I", arg)[0])


@foreign("expr_create")
def _expr_create(vm: PluginVM, arg: bytes) -> bytes:
    text = arg.decode("utf-8", "replace")
    try:
        compiled = _env().compile(text, disable_check=True)
    except Exception as e:  # cel-expr-python reports parse errors as RuntimeError
        _log.info("expr_create parse error: %s", str(e).splitlines()[0] if str(e) else e)
        raise ForeignError(R.BAD_ARGUMENT) from None
    table = _table(vm)
    token = table.next_token
    while token in table:
        token = (token + 1) & 0xFFFFFFFF
    table.next_token = (token + 1) & 0xFFFFFFFF
    table[token] = _Expr(text, compiled)
    return struct.pack("<I", token)


@foreign("expr_delete")
def _expr_delete(vm: PluginVM, arg: bytes) -> bytes:
    _table(vm).pop(_token(arg), None)
    return b""


@foreign("expr_evaluate")
def _expr_evaluate(vm: PluginVM, arg: bytes) -> bytes:
    token = _token(arg)
    expr = _table(vm).get(token)
    if expr is None:
        raise ForeignError(R.NOT_FOUND)
    data = {}
    for name in expr.names:
        value = A.find(vm, name.encode())
        if value is not None:
            data[name] = _to_cel(value)
    result = expr.compiled.eval(data=data)
    kind = result.type().name()
    if kind == "ERROR":
        _log.debug("expr_evaluate value error: %s", result.value())
        raise ForeignError(R.INTERNAL_FAILURE)
    if kind in ("DURATION", "TIMESTAMP"):
        if expr.as_string is None:
            expr.as_string = _env().compile(f"string({expr.text})", disable_check=True)
        text = expr.as_string.eval(data=data).value()
        ns = _duration_ns(text) if kind == "DURATION" else _timestamp_ns(text)
        return struct.pack("<q", ns)
    try:
        return A.serialize(_from_cel(result))
    except A.SerializationFailure:
        raise ForeignError(R.SERIALIZATION_FAILURE) from None


# ---- attribute values -> CEL values ------------------------------------------------------------

def _to_cel(v: Any) -> Any:
    from google.protobuf import duration_pb2, timestamp_pb2, wrappers_pb2  # type: ignore[import-untyped]

    if isinstance(v, A.Raw):
        return wrappers_pb2.BytesValue(value=bytes(v))  # plain bytes lose everything after a NUL
    if isinstance(v, bytes):
        s = v.decode("utf-8", "replace")
        return wrappers_pb2.StringValue(value=s) if "\0" in s else s
    if isinstance(v, bool):
        return v
    if isinstance(v, A.Duration):
        d = duration_pb2.Duration()
        d.FromNanoseconds(int(v))
        return d
    if isinstance(v, A.Timestamp):
        t = timestamp_pb2.Timestamp()
        t.FromNanoseconds(int(v))
        return t
    if isinstance(v, A.U64):
        return wrappers_pb2.UInt64Value(value=int(v))
    if isinstance(v, int | float):
        return v
    if isinstance(v, A.Attrs):
        out = {}
        for k in v.keys:
            item = v.get(k)
            if item is not None:
                out[k.decode()] = _to_cel(item)
        return out
    if isinstance(v, dict):
        return {_key(k): _to_cel(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_to_cel(x) for x in v]
    if v is A.NULL:
        return None
    return v  # a protobuf message


def _key(k: Any) -> Any:
    return k.decode("utf-8", "replace") if isinstance(k, bytes) else k


# ---- CEL results -> attribute values ----------------------------------------------------------

def _from_cel(value: Any) -> Any:
    kind = value.type().name()
    v = value.value()
    if kind == "STRING":
        return str(v).encode()
    if kind == "BYTES":
        return A.Raw(bytes(v))
    if kind == "BOOL":
        return bool(v)
    if kind == "INT":
        return int(v)
    if kind == "UINT":
        return A.U64(v)
    if kind == "DOUBLE":
        return float(v)
    if kind == "DURATION":
        return A.Duration(_td_ns(v))
    if kind == "TIMESTAMP":
        return A.Timestamp(_td_ns(v - _EPOCH))
    if kind.startswith("LIST"):
        return [_from_cel(x) for x in v]
    if kind.startswith("MAP"):
        return {_plain(k): _from_cel(x) for k, x in v.items()}
    if kind == "NULL":
        return A.NULL
    if hasattr(v, "SerializeToString"):
        return v
    return A.NULL  # types and the like: not serializable, as in Envoy


def _plain(k: Any) -> Any:
    if isinstance(k, str):
        return k.encode()
    if isinstance(k, bool) or not isinstance(k, int):
        return k
    return k


def _td_ns(td: timedelta) -> int:
    return (td.days * 86400 + td.seconds) * 1_000_000_000 + td.microseconds * 1000


def _duration_ns(text: str) -> int:
    """CEL's string(duration): seconds with up to 9 decimals, then 's'."""
    sign = -1 if text.startswith("-") else 1
    whole, _, frac = text.strip("-s").partition(".")
    return sign * (int(whole or 0) * 1_000_000_000 + int((frac + "000000000")[:9]))


def _timestamp_ns(text: str) -> int:
    """CEL's string(timestamp): RFC 3339 in UTC with up to 9 decimals."""
    main, _, frac = text.rstrip("Z").partition(".")
    secs = int((datetime.fromisoformat(main).replace(tzinfo=UTC) - _EPOCH).total_seconds())
    return secs * 1_000_000_000 + int((frac + "000000000")[:9])
