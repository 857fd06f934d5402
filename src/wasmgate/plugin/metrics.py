"""Metrics defined by plugins (proxy_define_metric and friends), as Envoy keeps them.

Two layers, as in Envoy:

* ``MetricStore``: the process-wide metrics, one per (type, stat name). Envoy puts
  every plugin metric in its server-wide stats store under the custom namespace
  ``wasmcustom``, so plugins (and VMs) that define the same name share one metric.
* ``VmMetrics``: one VM's metric ids. Ids are per VM: a counter's are 4, 8, 12...,
  a gauge's 5, 9..., a histogram's 6, 10... (the low two bits are the type), and every
  define call takes a new id, even for a name defined before (Envoy 1.40 does so).

The export works from a ``Snapshot``, a plain dict of ints keyed by stat name, so the
figures of several worker processes can be summed (``merge``) before rendering
(``prometheus_text``) as Envoy's ``/stats/prometheus`` renders plugin metrics.
"""

from __future__ import annotations

import re
import threading
from enum import IntEnum
from typing import TypedDict, TypeVar

from wasmgate.abi.constants import WasmResult

R = WasmResult
U64 = (1 << 64) - 1

NAMESPACE = b"wasmcustom"  # Envoy's custom stat namespace for plugin metrics

# Envoy's default histogram buckets (Stats::HistogramSettingsImpl::defaultBuckets).
BUCKETS: tuple[float, ...] = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                              300000, 600000, 1800000, 3600000)

_T = TypeVar("_T")
Tags = list[tuple[bytes, bytes]]  # Prometheus labels

_TYPE_MASK = 0x3
_ID_STEP = 0x4


class MetricType(IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


def stat_name(name: bytes) -> bytes:
    """The stat a plugin's metric name becomes: ``wasmcustom.<name>``.

    Envoy's symbol table drops trailing dots; an empty name leaves the bare namespace.
    """
    name = name.rstrip(b".")
    return NAMESPACE + b"." + name if name else NAMESPACE


class Histogram:
    """Samples as Envoy's Prometheus export sees them: a count per bucket, count and sum."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)  # non-cumulative; the last is above every bucket
        self.count = 0
        self.sum = 0

    def record(self, value: int) -> None:
        if value > U64 >> 1:
            value -= 1 << 64  # Envoy's histogram takes the u64 as an int64
        edge = _bin_edge(value)
        i = 0
        while i < len(BUCKETS) and edge > BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.count += 1
        self.sum += value


def _bin_edge(value: int) -> int:
    """The lower edge of the value's bin in Envoy's log-linear histogram (circllhist).

    Bins keep two significant digits, and Envoy counts a bin in every bucket at or
    above its lower edge, so 1005 falls in the ``le="1000"`` bucket as it does there.
    """
    mag = abs(value)
    if mag < 100:
        return value
    unit: int = 10 ** (len(str(mag)) - 2)
    edge = mag - mag % unit
    return edge if value > 0 else -edge


class Metric:
    __slots__ = ("type", "name", "value", "histogram")

    def __init__(self, mtype: MetricType, name: bytes):
        self.type = mtype
        self.name = name  # the stat name, wasmcustom.<plugin's name>
        self.value = 0  # counters and gauges: an unsigned 64-bit value
        self.histogram = Histogram() if mtype == MetricType.HISTOGRAM else None


class Snapshot(TypedDict):
    """Plugin metrics by stat name; histograms as [count, sum, bucket counts...]."""

    counters: dict[bytes, int]
    gauges: dict[bytes, int]
    histograms: dict[bytes, list[int]]


class MetricStore:
    """The process's plugin metrics, shared by every VM.

    ``lock`` guards definitions and updates (Envoy's stats are atomics): VMs start, and
    may define and update metrics, in executor threads while the event loop serves.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._metrics: dict[tuple[MetricType, bytes], Metric] = {}

    def define(self, mtype: MetricType, name: bytes) -> Metric:
        key = (mtype, stat_name(name))
        with self.lock:
            metric = self._metrics.get(key)
            if metric is None:
                metric = self._metrics[key] = Metric(mtype, key[1])
            return metric

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {"counters": {}, "gauges": {}, "histograms": {}}
        with self.lock:
            for m in self._metrics.values():
                if m.histogram is not None:
                    h = m.histogram
                    snap["histograms"][m.name] = [h.count, h.sum, *h.buckets]
                else:
                    snap["counters" if m.type == MetricType.COUNTER else "gauges"][m.name] = m.value
        return snap


STORE = MetricStore()


class VmMetrics:
    """One VM's metric ids, and the ABI operations on them with Envoy's status codes."""

    __slots__ = ("_by_id", "_next", "_store")

    def __init__(self, store: MetricStore | None = None) -> None:
        self._store = store or STORE
        self._by_id: dict[int, Metric] = {}
        self._next = {t: int(t) for t in MetricType}

    def define(self, mtype: int, name: bytes) -> tuple[WasmResult, int]:
        if mtype not in (0, 1, 2):
            return R.BAD_ARGUMENT, 0
        t = MetricType(mtype)
        metric = self._store.define(t, name)
        mid = self._next[t] = self._next[t] + _ID_STEP
        self._by_id[mid] = metric
        return R.OK, mid

    def increment(self, mid: int, offset: int) -> WasmResult:
        kind = mid & _TYPE_MASK
        if kind == MetricType.HISTOGRAM or kind == _TYPE_MASK:
            return R.BAD_ARGUMENT
        metric = self._by_id.get(mid)
        if metric is None:
            return R.NOT_FOUND
        if kind == MetricType.COUNTER and offset <= 0:
            return R.BAD_ARGUMENT  # counters only go up; Envoy refuses 0 too
        with self._store.lock:
            metric.value = (metric.value + offset) & U64  # a gauge wraps below 0, as Envoy's u64
        return R.OK

    def record(self, mid: int, value: int) -> WasmResult:
        metric = self._by_id.get(mid)
        if metric is None:
            return R.NOT_FOUND
        value &= U64
        with self._store.lock:
            if metric.histogram is not None:
                metric.histogram.record(value)
            elif metric.type == MetricType.COUNTER:
                metric.value = (metric.value + value) & U64  # recording a counter adds
            else:
                metric.value = value
        return R.OK

    def get(self, mid: int) -> tuple[WasmResult, int]:
        kind = mid & _TYPE_MASK
        if kind == MetricType.HISTOGRAM or kind == _TYPE_MASK:
            return R.BAD_ARGUMENT, 0
        metric = self._by_id.get(mid)
        if metric is None:
            return R.NOT_FOUND, 0
        return R.OK, metric.value


# ---- aggregation and export ------------------------------------------------------------


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Sum the snapshots of several worker processes (gauges too: Envoy's Accumulate mode)."""
    out: Snapshot = {"counters": {}, "gauges": {}, "histograms": {}}
    for snap in snapshots:
        for src, acc in ((snap["counters"], out["counters"]), (snap["gauges"], out["gauges"])):
            for name, value in src.items():
                acc[name] = (acc.get(name, 0) + value) & U64
        for name, h in snap["histograms"].items():
            prev = out["histograms"].get(name)
            out["histograms"][name] = list(h) if prev is None else [a + b for a, b in zip(prev, h, strict=True)]
    return out


# Envoy's default tag extractors that can match a plugin metric's name; the others are
# anchored at Envoy's own prefixes (cluster., http., listener., ...). The first group is
# cut from the name, the second is the tag's value.
_TAG_EXTRACTORS = (
    (b"envoy_response_code", re.compile(rb"_rq(_([0-9]{3}))$")),
    (b"envoy_response_code_class", re.compile(rb"_rq_(([0-9]))xx$")),
)
_NOT_NAME_CHAR = re.compile(r"[^a-zA-Z0-9_]")


def _extract_tags(name: bytes) -> tuple[bytes, Tags]:
    tags: Tags = []
    for tag, rx in _TAG_EXTRACTORS:
        m = rx.search(name)
        if m:
            tags.append((tag, m.group(2)))
            name = name[:m.start(1)] + name[m.end(1):]
    return name, tags


def _sanitize(name: bytes) -> bytes:
    """Envoy's Prometheus name rule: each character outside [a-zA-Z0-9_] becomes '_'.

    Characters are UTF-8's. Envoy lets bytes that are not valid UTF-8 through, which
    makes /stats unreadable to Prometheus; here each such byte becomes '_' too.
    """
    text = name.decode("utf-8", "surrogateescape")
    return _NOT_NAME_CHAR.sub("_", text).encode("utf-8", "surrogateescape")


def prometheus_name(stat: bytes) -> bytes | None:
    """A (tag-extracted) stat name as Envoy's /stats/prometheus names it; None: left out."""
    ns, dot, rest = stat.partition(b".")
    if not dot or ns != NAMESPACE:
        return b"envoy_" + _sanitize(stat)  # not in the custom namespace: an ordinary Envoy stat
    name = _sanitize(rest)
    if not name or name[:1].isdigit():
        return None  # Envoy omits custom metrics whose names are not valid Prometheus names
    return name


def _labels(tags: Tags, extra: bytes = b"") -> bytes:
    parts = [k + b'="' + v + b'"' for k, v in tags]
    if extra:
        parts.append(extra)
    return b"{" + b",".join(parts) + b"}"


def _le(bound: float) -> bytes:
    return (str(int(bound)) if bound == int(bound) else str(bound)).encode()


def prometheus_text(snap: Snapshot) -> bytes:
    """Plugin metrics in the Prometheus text format, as Envoy 1.40 writes them.

    Names: ``wasmcustom.<name>`` is exported as ``<name>`` with every character outside
    ``[a-zA-Z0-9_]`` replaced by ``_`` (no ``envoy_`` prefix, no ``_total`` suffix); names
    that would start with a digit are left out. Families sort by stat name: counters,
    then gauges, then histograms with Envoy's default buckets.
    """
    out: list[bytes] = []
    for typ, values in ((b"counter", snap["counters"]), (b"gauge", snap["gauges"])):
        for pname, samples in _families(values):
            out.append(b"# TYPE " + pname + b" " + typ + b"\n")
            out.extend(pname + _labels(tags) + b" %d\n" % value for tags, value in samples)
    for pname, hists in _families(snap["histograms"]):
        out.append(b"# TYPE " + pname + b" histogram\n")
        for tags, (count, total, *buckets) in hists:
            cumulative = 0
            for bound, n in zip(BUCKETS, buckets, strict=False):
                cumulative += n
                out.append(pname + b"_bucket" + _labels(tags, b'le="' + _le(bound) + b'"') + b" %d\n" % cumulative)
            out.append(pname + b"_bucket" + _labels(tags, b'le="+Inf"') + b" %d\n" % count)
            out.append(pname + b"_sum" + _labels(tags) + b" %d\n" % total)
            out.append(pname + b"_count" + _labels(tags) + b" %d\n" % count)
    return b"".join(out)


def _families(values: dict[bytes, _T]) -> list[tuple[bytes, list[tuple[Tags, _T]]]]:
    """Group stats by Prometheus name (stats differing only in tags share one), in Envoy's order."""
    families: dict[bytes, tuple[bytes, list[tuple[Tags, _T]]]] = {}
    for stat, value in values.items():
        extracted, tags = _extract_tags(stat)
        pname = prometheus_name(extracted)
        if pname is not None:
            families.setdefault(pname, (extracted, []))[1].append((tags, value))
    ordered = sorted(families.items(), key=lambda item: (item[1][0], item[0]))
    return [(pname, sorted(samples, key=lambda s: s[0])) for pname, (_, samples) in ordered]
