"""YAML read as kubectl reads it, so a manifest means the same here as on a cluster.

kubectl turns YAML into JSON with sigs.k8s.io/yaml (go-yaml v2) before sending it; PyYAML
alone reads some plain scalars differently (``y``, ``1:20``, ``1e3``, ``0o17``, ``=``, ...).
This loader keeps PyYAML's parser and resolves and converts scalars and keys as kubectl
does, refusing what kubectl refuses (docs/configuration.md, "YAML as kubectl reads it").
The results are JSON values: str keys; int only in the int64 range, as the API server keeps
numbers; no NaN or infinity.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from datetime import date
from decimal import Decimal
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_Y = "tag:yaml.org,2002:"
STR, BOOL, INT, FLOAT, NULL, MERGE, TIMESTAMP = (_Y + t for t in
                                                 ("str", "bool", "int", "float", "null", "merge", "timestamp"))
_INT64 = (-(1 << 63), (1 << 63) - 1)

# go-yaml's table of words: looked up for plain scalars whose first character hints at one.
_WORDS: dict[str, tuple[str, Any]] = {
    **{w: (BOOL, True) for w in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{w: (BOOL, False) for w in ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")},
    **{w: (NULL, None) for w in ("", "~", "null", "Null", "NULL")},
    **{w: (FLOAT, math.nan) for w in (".nan", ".NaN", ".NAN")},
    **{s + w: (FLOAT, math.inf) for s in ("", "+") for w in (".inf", ".Inf", ".INF")},
    **{"-" + w: (FLOAT, -math.inf) for w in (".inf", ".Inf", ".INF")},
    "<<": (MERGE, "<<"),
}
# What go-yaml takes as a float after an int failed (underscores already removed).
_YAML_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
# Go's ParseFloat on decimal text: underscores only between digits.
_GO_FLOAT = re.compile(r"[-+]?(?:[0-9](?:_?[0-9])*(?:\.(?:[0-9](?:_?[0-9])*)?)?|\.[0-9](?:_?[0-9])*)"
                       r"(?:[eE][-+]?[0-9](?:_?[0-9])*)?")
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdef"}
# go-yaml's timestamp layouts (2006-1-2T15:4:5.999999999Z07:00, with t or a space, or a date).
_TIMESTAMP = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})(?:(?:[Tt](\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.\d+)?"
                        r"(?:Z|[+-]\d{2}:\d{2}))|(?: (\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.\d+)?))?", re.ASCII)


def _go_uint(text: str, base: int = 0) -> int | None:
    """Go's strconv.ParseUint(text, base, 64): base 0 reads 0x, 0o, 0b and a leading 0 (octal)."""
    digits = text
    if base == 0:
        base = 10
        if text[:1] == "0":
            prefix = {"b": 2, "o": 8, "x": 16}.get(text[1:2].lower()) if len(text) >= 3 else None
            base, digits = (prefix, text[2:]) if prefix else (8, text[1:] or "0")
    if not digits or any(c not in _DIGITS[base] for c in digits.lower()):
        return None
    value = int(digits, base)
    return value if value < 1 << 64 else None


def _go_int(text: str, base: int = 0) -> int | None:
    """Go's strconv.ParseInt(text, base, 64)."""
    sign = -1 if text[:1] == "-" else 1
    magnitude = _go_uint(text[1:] if text[:1] in "+-" else text, base)
    if magnitude is None or not _INT64[0] <= sign * magnitude <= _INT64[1]:
        return None
    return sign * magnitude


def _go_float(text: str) -> float | None:
    """Go's strconv.ParseFloat(text, 64) on decimal text; out of range is an error there."""
    if not _GO_FLOAT.fullmatch(text):
        return None
    value = float(text.replace("_", ""))
    return None if math.isinf(value) else value


def _number(text: str) -> tuple[str, Any]:
    """go-yaml's reading of a plain scalar starting with a digit or a sign."""
    plain = text.replace("_", "")
    for parse in (_go_int, _go_uint):
        if (n := parse(plain)) is not None:
            return INT, n
    if _YAML_FLOAT.fullmatch(plain) and (f := _go_float(plain)) is not None:
        return FLOAT, f
    if plain.startswith("0b"):
        for parse in (_go_int, _go_uint):
            if (n := parse(plain[2:], 2)) is not None:
                return INT, n
    if plain.startswith("-0b") and (n := _go_int("-" + plain[3:], 2)) is not None:
        return INT, n
    return STR, text


def resolve_plain(text: str) -> tuple[str, Any]:
    """The tag and value go-yaml gives a plain (unquoted, untagged) scalar. Timestamps are
    text: kubectl sends them as written."""
    if text in _WORDS:  # each word starts with one of go-yaml's hints for its table
        return _WORDS[text]
    first = text[:1]
    if first == ".":
        f = _go_float(text)
        return (STR, text) if f is None else (FLOAT, f)
    if first and first in "+-0123456789":
        return _number(text)
    return STR, text


def _is_timestamp(text: str) -> bool:
    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        return False
    try:
        date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return False
    hms = [int(g) for g in (m[4], m[5], m[6]) if g] or [int(g) for g in (m[7], m[8], m[9]) if g]
    return not hms or (hms[0] < 24 and hms[1] < 60 and hms[2] < 60)


def _text(node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise ConstructorError(None, None, f"expected a scalar, found {type(node).__name__}", node.start_mark)
    return str(node.value)


def _short(tag: str) -> str:
    return "!!" + tag[len(_Y):] if tag.startswith(_Y) else tag


def _float32_text(f: float) -> str:
    """Go's strconv.FormatFloat(f, 'g', -1, 32), as sigs.k8s.io/yaml writes a float key."""
    try:
        x = struct.unpack("f", struct.pack("f", f))[0]
    except OverflowError:
        x = math.copysign(math.inf, f)
    if math.isnan(x) or math.isinf(x):
        return ".nan" if math.isnan(x) else ("-.inf" if x < 0 else ".inf")
    if x == 0:
        return "-0" if math.copysign(1, x) < 0 else "0"
    e = next(t for t in (f"{abs(x):.{p}e}" for p in range(9))  # the shortest that reads back the same
             if struct.unpack("f", struct.pack("f", float(t)))[0] == abs(x))
    mantissa, exp = e.split("e")
    digits, point = mantissa.replace(".", ""), int(exp)
    sign = "-" if x < 0 else ""
    if point < -4 or point >= 6:
        frac = f".{digits[1:]}" if len(digits) > 1 else ""
        return f"{sign}{digits[0]}{frac}e{'-' if point < 0 else '+'}{abs(point):02d}"
    if point < 0:
        return f"{sign}0.{'0' * (-point - 1)}{digits}"
    whole = digits[:point + 1].ljust(point + 1, "0")
    return f"{sign}{whole}{'.' + digits[point + 1:] if len(digits) > point + 1 else ''}"


def json_key(value: object) -> str | None:
    """A map key as sigs.k8s.io/yaml writes it into JSON; None where kubectl refuses it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if _INT64[0] <= value <= _INT64[1] else None  # a uint64 key: refused
    if isinstance(value, float):
        return _float32_text(value)
    return None


def json_value(value: object) -> object:
    """A number as the API server keeps it, after kubectl wrote it as Go's JSON does: a whole
    float below 1e21 in its shortest digits, an int if that fits int64; an int past int64 a
    float. NaN and infinity are refused (ValueError)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError
        if value.is_integer() and abs(value) < 1e21:
            whole = int(Decimal(repr(value)))
            return whole if _INT64[0] <= whole <= _INT64[1] else value
    elif isinstance(value, int) and not isinstance(value, bool) and value > _INT64[1]:
        return float(value)
    return value


class KubeLoader(yaml.SafeLoader):
    """PyYAML's parser with go-yaml's scalars, keys and merges, as kubectl applies a file."""

    def resolve(self, kind: type[Node], value: str | None, implicit: tuple[bool, bool]) -> str:
        if kind is ScalarNode and implicit[0] and value is not None:
            return resolve_plain(value)[0]
        return str(super().resolve(kind, value, implicit))  # type: ignore[no-untyped-call]

    def _scalar(self, node: Node) -> Any:
        """A scalar tagged (implicitly or not) bool, int, float, null or timestamp: go-yaml
        reads the text as if plain and refuses a tag the reading does not give."""
        text = _text(node)
        tag, value = resolve_plain(text)
        if node.tag == TIMESTAMP and _is_timestamp(text):
            return text
        if node.tag == FLOAT and tag == INT and _INT64[0] <= value <= _INT64[1]:
            return float(value)
        if tag != node.tag:
            raise ConstructorError(None, None, f"cannot decode {_short(tag)} `{text}` as a {_short(node.tag)} "
                                   "(kubectl refuses it)", node.start_mark)
        return value

    def _binary(self, node: Node) -> str:
        text = _text(node)
        try:
            data = base64.b64decode(text.replace("\n", "").replace("\r", ""), validate=True)
        except (binascii.Error, ValueError):
            raise ConstructorError(None, None, "!!binary value contains invalid base64 data (kubectl refuses it)",
                                   node.start_mark) from None
        # Go's JSON writes each byte that is not UTF-8 as U+FFFD.
        return re.sub("[\udc80-\udcff]", "\ufffd", data.decode("utf-8", "surrogateescape"))

    def _other(self, suffix: str, node: Node) -> Any:
        """A tag go-yaml does not know: the text of a scalar, else the sequence or mapping."""
        if isinstance(node, SequenceNode):
            return self.construct_sequence(node)
        if isinstance(node, MappingNode):
            return self.construct_mapping(node)
        return _text(node)

    def _value(self, node: Node) -> Any:
        value = self.construct_object(node, deep=True)
        try:
            return json_value(value)
        except ValueError:
            written = node.value if isinstance(node, ScalarNode) else value
            raise ConstructorError(None, None, f"{written} is not a JSON number (kubectl refuses it)",
                                   node.start_mark) from None

    def construct_sequence(self, node: Node, deep: bool = False) -> list[Any]:
        if not isinstance(node, SequenceNode):
            raise ConstructorError(None, None, f"expected a sequence, found {type(node).__name__}", node.start_mark)
        return [self._value(child) for child in node.value]

    def construct_mapping(self, node: Node, deep: bool = False) -> dict[str, Any]:  # type: ignore[override]
        """Entries in order, the last of equal keys winning, as go-yaml fills a map: a merge
        (``<<``) sets its mapping's keys over earlier ones; of a list of mappings the first wins."""
        if not isinstance(node, MappingNode):
            raise ConstructorError(None, None, f"expected a mapping, found {type(node).__name__}", node.start_mark)
        out: dict[str, Any] = {}
        origins: dict[str, tuple[type, object]] = {}  # the YAML key each JSON key came from
        for key_node, value_node in node.value:
            if isinstance(key_node, ScalarNode) and key_node.tag == MERGE and key_node.value == "<<":
                sources = value_node.value if isinstance(value_node, SequenceNode) else [value_node]
                if not all(isinstance(s, MappingNode) for s in sources):
                    raise ConstructorError(None, None, "map merge requires map or sequence of maps as the value "
                                           "(kubectl refuses it)", value_node.start_mark)
                for source in reversed(sources):
                    out.update(self.construct_mapping(source))
                continue
            raw = self.construct_object(key_node, deep=True) if isinstance(key_node, ScalarNode) else None
            key = json_key(raw)
            if key is None:
                raise ConstructorError(None, None, "a map key with no JSON form: null, a sequence, a mapping or an "
                                       "integer past int64 (kubectl refuses it)", key_node.start_mark)
            # Two different YAML keys with one JSON form (1 and "1", true and "true"): kubectl
            # keeps one of the two values, which one depends on Go's map order, so it differs
            # from one run to the next. Refused: the file has no one meaning.
            seen = origins.setdefault(key, (type(raw), raw))
            if seen != (type(raw), raw):
                raise ConstructorError(None, None, f"keys {seen[1]!r} and {raw!r} are both {key!r} in JSON; kubectl "
                                       "keeps either value at random", key_node.start_mark)
            out[key] = self._value(value_node)
        return out


for _tag in (BOOL, INT, FLOAT, NULL, TIMESTAMP):
    KubeLoader.add_constructor(_tag, KubeLoader._scalar)
KubeLoader.add_constructor(_Y + "binary", KubeLoader._binary)
KubeLoader.add_constructor(MERGE, lambda _, node: _text(node))  # `<<` as a value is text
for _tag in ("set", "omap", "pairs"):  # go-yaml keeps these as the plain mapping or sequence
    KubeLoader.add_constructor(_Y + _tag, lambda loader, node: KubeLoader._other(loader, "", node))  # type: ignore
KubeLoader.add_multi_constructor("", KubeLoader._other)


class KubeDumper(yaml.SafeDumper):
    """Writes a string plain only where kubectl reads it back as that string, and PyYAML too
    (for other tools); else quoted."""

    def resolve(self, kind: type[Node], value: str | None, implicit: tuple[bool, bool]) -> str:
        pyyaml = str(super().resolve(kind, value, implicit))  # type: ignore[no-untyped-call]
        if kind is ScalarNode and implicit[0] and value is not None and pyyaml == STR:
            return resolve_plain(value)[0]
        return pyyaml


def load_all(text: str) -> list[Any]:
    """The documents of ``text`` as kubectl reads them (empty documents left out)."""
    return [d for d in yaml.load_all(text, Loader=KubeLoader) if d is not None]
