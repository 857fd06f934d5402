"""Metrics: proxy_define/increment/record/get_metric, and their Prometheus export.

Status codes, ids and values are Envoy 1.40's, as observed with the sharedstate test
plugin's x-ops scripts (see test_shared_state.py for the differential run).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.abi.constants import WasmResult
from wasmgate.plugin import metrics
from wasmgate.plugin.metrics import MetricStore, Snapshot
from wat_util import OOB, RP, SENTINEL, Guest, new_vm

R = WasmResult
U64 = (1 << 64) - 1
COUNTER, GAUGE, HISTOGRAM = 0, 1, 2


@pytest.fixture(autouse=True)
def store(monkeypatch: pytest.MonkeyPatch) -> MetricStore:
    """A fresh process-wide metric store for each test."""
    fresh = MetricStore()
    monkeypatch.setattr(metrics, "STORE", fresh)
    return fresh


@pytest.fixture
def g(tmp_path: Path) -> Iterator[Guest]:
    guest = Guest.new(tmp_path)
    yield guest
    guest.vm.shutdown()


def define(g: Guest, mtype: int, name: bytes) -> tuple[int, int]:
    p, n = g.put_str(name)
    g.poison(RP)
    return g.call("proxy_define_metric", mtype, p, n, RP), g.u32(RP)


def get(g: Guest, mid: int) -> tuple[int, int | None]:
    g.poison(RP, RP + 4)
    st = g.call("proxy_get_metric", mid, RP)
    return st, (g.u64(RP) if st == R.OK else None)


def stat(store: MetricStore, name: bytes) -> int | None:
    snap = store.snapshot()
    return snap["counters"].get(name, snap["gauges"].get(name))


# ---- proxy_define_metric -------------------------------------------------------------


def test_define_ids_per_type(g: Guest) -> None:
    assert define(g, COUNTER, b"c") == (R.OK, 4)
    assert define(g, GAUGE, b"g") == (R.OK, 5)
    assert define(g, HISTOGRAM, b"h") == (R.OK, 6)
    assert define(g, COUNTER, b"c2") == (R.OK, 8)
    assert define(g, GAUGE, b"g2") == (R.OK, 9)
    assert define(g, HISTOGRAM, b"h2") == (R.OK, 10)


def test_redefinition_takes_a_new_id_for_the_same_metric(g: Guest, store: MetricStore) -> None:
    _, first = define(g, COUNTER, b"requests")
    _, again = define(g, COUNTER, b"requests")
    assert (first, again) == (4, 8)
    assert g.call("proxy_increment_metric", first, 2) == R.OK
    assert g.call("proxy_increment_metric", again, 3) == R.OK
    assert get(g, first) == (R.OK, 5)
    assert get(g, again) == (R.OK, 5)
    assert stat(store, b"wasmcustom.requests") == 5


@pytest.mark.parametrize("mtype", [3, 4, 100, 0xFFFFFFFF])
def test_define_bad_type(g: Guest, mtype: int) -> None:
    assert define(g, mtype, b"x") == (R.BAD_ARGUMENT, SENTINEL)
    assert define(g, COUNTER, b"x") == (R.OK, 4)


def test_define_bad_pointers(g: Guest, store: MetricStore) -> None:
    assert g.call("proxy_define_metric", COUNTER, OOB, 4, RP) == R.INVALID_MEMORY_ACCESS
    p, n = g.put_str(b"c")
    assert g.call("proxy_define_metric", COUNTER, p, n, OOB) == R.INVALID_MEMORY_ACCESS
    # As in Envoy, the metric exists and its id is used even though it could not be written.
    assert stat(store, b"wasmcustom.c") == 0
    assert define(g, COUNTER, b"c") == (R.OK, 8)


def test_metrics_are_shared_across_vms(tmp_path: Path, store: MetricStore) -> None:
    a = Guest(new_vm(tmp_path, name="a", vm_id="one"))
    b = Guest(new_vm(tmp_path, name="b", vm_id="two"))
    assert define(a, COUNTER, b"shared") == (R.OK, 4)
    assert define(b, GAUGE, b"other") == (R.OK, 5)
    assert define(b, COUNTER, b"shared") == (R.OK, 4)  # ids are per VM
    assert a.call("proxy_increment_metric", 4, 1) == R.OK
    assert b.call("proxy_increment_metric", 4, 2) == R.OK
    assert get(a, 4) == (R.OK, 3)
    assert get(a, 5) == (R.NOT_FOUND, None)  # b's gauge id means nothing in a
    assert stat(store, b"wasmcustom.shared") == 3


# ---- counters ------------------------------------------------------------------------


def test_counter(g: Guest) -> None:
    _, c = define(g, COUNTER, b"c")
    assert get(g, c) == (R.OK, 0)
    assert g.call("proxy_increment_metric", c, 5) == R.OK
    assert g.call("proxy_increment_metric", c, 0) == R.BAD_ARGUMENT
    assert g.call("proxy_increment_metric", c, -1) == R.BAD_ARGUMENT
    assert g.call("proxy_record_metric", c, 10) == R.OK  # recording a counter adds
    assert get(g, c) == (R.OK, 15)


def test_counter_wraps_at_64_bits(g: Guest) -> None:
    _, c = define(g, COUNTER, b"c")
    assert g.call("proxy_record_metric", c, -1) == R.OK  # u64 max
    assert g.call("proxy_increment_metric", c, 2) == R.OK
    assert get(g, c) == (R.OK, 1)


# ---- gauges --------------------------------------------------------------------------


def test_gauge(g: Guest) -> None:
    _, m = define(g, GAUGE, b"g")
    assert g.call("proxy_increment_metric", m, 5) == R.OK
    assert g.call("proxy_increment_metric", m, -2) == R.OK
    assert get(g, m) == (R.OK, 3)
    assert g.call("proxy_increment_metric", m, 0) == R.OK
    assert g.call("proxy_record_metric", m, 42) == R.OK  # recording a gauge sets it
    assert get(g, m) == (R.OK, 42)


def test_gauge_below_zero_wraps(g: Guest) -> None:
    _, m = define(g, GAUGE, b"g")
    assert g.call("proxy_increment_metric", m, 5) == R.OK
    assert g.call("proxy_increment_metric", m, -7) == R.OK
    assert get(g, m) == (R.OK, U64 - 1)
    assert g.call("proxy_record_metric", m, 3) == R.OK
    assert g.call("proxy_increment_metric", m, -(1 << 63)) == R.OK
    assert get(g, m) == (R.OK, (1 << 63) + 3)


# ---- histograms ----------------------------------------------------------------------


def test_histogram(g: Guest, store: MetricStore) -> None:
    _, h = define(g, HISTOGRAM, b"h")
    for v in (7, 3000, 0):
        assert g.call("proxy_record_metric", h, v) == R.OK
    assert g.call("proxy_increment_metric", h, 1) == R.BAD_ARGUMENT
    assert get(g, h) == (R.BAD_ARGUMENT, None)
    count, total, *buckets = store.snapshot()["histograms"][b"wasmcustom.h"]
    assert (count, total) == (3, 3007)
    assert buckets[0] == 1 and buckets[3] == 1 and buckets[11] == 1  # le 0.5, 10, 5000


# ---- unknown ids and pointers --------------------------------------------------------


def test_unknown_ids(g: Guest) -> None:
    define(g, COUNTER, b"c")
    define(g, GAUGE, b"g")
    define(g, HISTOGRAM, b"h")
    unknown = 4000
    assert g.call("proxy_increment_metric", unknown, 1) == R.NOT_FOUND
    assert g.call("proxy_increment_metric", unknown + 1, 1) == R.NOT_FOUND
    assert g.call("proxy_increment_metric", unknown + 2, 1) == R.BAD_ARGUMENT
    assert g.call("proxy_increment_metric", unknown + 3, 1) == R.BAD_ARGUMENT
    assert g.call("proxy_increment_metric", 7, 1) == R.BAD_ARGUMENT  # type bits 3 are no type
    for t in range(4):
        assert g.call("proxy_record_metric", unknown + t, 1) == R.NOT_FOUND
    assert get(g, unknown) == (R.NOT_FOUND, None)
    assert get(g, unknown + 1) == (R.NOT_FOUND, None)
    assert get(g, unknown + 2) == (R.BAD_ARGUMENT, None)
    assert get(g, unknown + 3) == (R.BAD_ARGUMENT, None)
    assert get(g, 0) == (R.NOT_FOUND, None)


def test_get_metric_bad_pointer(g: Guest) -> None:
    _, c = define(g, COUNTER, b"c")
    assert g.call("proxy_get_metric", c, OOB) == R.INVALID_MEMORY_ACCESS
    assert g.call("proxy_get_metric", 4000, OOB) == R.NOT_FOUND  # the id is checked first


# ---- names and the Prometheus export -------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stat_name"),
    [(b"c", b"wasmcustom.c"), (b"a.b", b"wasmcustom.a.b"), (b"t..", b"wasmcustom.t"),
     (b"u...v.", b"wasmcustom.u...v"), (b".lead", b"wasmcustom..lead"), (b"", b"wasmcustom"),
     (b".", b"wasmcustom")],
)
def test_stat_names(g: Guest, store: MetricStore, name: bytes, stat_name: bytes) -> None:
    _, c = define(g, COUNTER, name)
    g.call("proxy_increment_metric", c, 1)
    assert store.snapshot()["counters"] == {stat_name: 1}


def snap(counters: dict[bytes, int] | None = None, gauges: dict[bytes, int] | None = None,
         histograms: dict[bytes, list[int]] | None = None) -> Snapshot:
    return {"counters": counters or {}, "gauges": gauges or {}, "histograms": histograms or {}}


@pytest.mark.parametrize(
    ("stat_name", "line"),
    [
        (b"wasmcustom.requests", b"requests{} 1"),
        (b"wasmcustom.a.b", b"a_b{} 1"),
        (b"wasmcustom.a..b", b"a__b{} 1"),
        (b"wasmcustom..lead", b"_lead{} 1"),
        (b"wasmcustom.UPPER", b"UPPER{} 1"),
        (b"wasmcustom.dash-name", b"dash_name{} 1"),
        (b"wasmcustom.x:y", b"x_y{} 1"),
        (b"wasmcustom.n!\"#$%&'()*+/;<=>?@[\\]^`{|}~z", b"n" + b"_" * 27 + b"z{} 1"),
        (b"wasmcustom.h\xc3\xa9z", b"h_z{} 1"),  # a UTF-8 character is one character
        (b"wasmcustom.h\x80z", b"h_z{} 1"),  # bytes that are not UTF-8 too (Envoy passes them through)
        (b"wasmcustom.foo_rq_200", b'foo_rq{envoy_response_code="200"} 1'),
        (b"wasmcustom.foo_rq_2xx", b'foo_rq_xx{envoy_response_code_class="2"} 1'),
        (b"wasmcustom", b"envoy_wasmcustom{} 1"),  # the empty name: an ordinary Envoy stat
        (b"wasmcustom.9", None),  # not a Prometheus name: left out
        (b"wasmcustom.1abc", None),
    ],
)
def test_prometheus_names(stat_name: bytes, line: bytes | None) -> None:
    text = metrics.prometheus_text(snap(counters={stat_name: 1}))
    if line is None:
        assert text == b""
    else:
        name = line.split(b"{")[0]
        assert text == b"# TYPE " + name + b" counter\n" + line + b"\n"


def test_prometheus_families_in_envoys_order() -> None:
    text = metrics.prometheus_text(snap(
        counters={b"wasmcustom.zeta": 3, b"wasmcustom.alpha": 1, b"wasmcustom.a_rq_404": 2,
                  b"wasmcustom.a_rq_200": 5},
        gauges={b"wasmcustom.cluster.foo.bar": U64 - 1},
    ))
    assert text == (
        b"# TYPE a_rq counter\n"
        b'a_rq{envoy_response_code="200"} 5\n'
        b'a_rq{envoy_response_code="404"} 2\n'
        b"# TYPE alpha counter\nalpha{} 1\n"
        b"# TYPE zeta counter\nzeta{} 3\n"
        b"# TYPE cluster_foo_bar gauge\ncluster_foo_bar{} 18446744073709551614\n"
    )


def test_prometheus_histogram(g: Guest, store: MetricStore) -> None:
    _, h = define(g, HISTOGRAM, b"hh")
    # Envoy's histogram keeps two significant digits and counts a value in every bucket
    # at or above its bin's lower edge: 101 is in le="100" and 1005, 1099 in le="1000".
    for v in (1000, 1005, 1099, 1100, 26, 5, 6, 99, 100, 101):
        assert g.call("proxy_record_metric", h, v) == R.OK
    text = metrics.prometheus_text(store.snapshot())
    cumulative = [0, 0, 1, 2, 2, 3, 6, 6, 6, 9, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    expected = b"# TYPE hh histogram\n" + b"".join(
        b'hh_bucket{le="%s"} %d\n' % (le, n)
        for le, n in zip((b"0.5", b"1", b"5", b"10", b"25", b"50", b"100", b"250", b"500", b"1000", b"2500",
                          b"5000", b"10000", b"30000", b"60000", b"300000", b"600000", b"1800000", b"3600000"),
                         cumulative, strict=True)
    ) + b'hh_bucket{le="+Inf"} 10\nhh_sum{} 4541\nhh_count{} 10\n'
    assert text == expected


def test_histogram_takes_values_as_int64(g: Guest, store: MetricStore) -> None:
    _, h = define(g, HISTOGRAM, b"h")
    assert g.call("proxy_record_metric", h, -1) == R.OK  # u64 max, which Envoy reads as -1
    count, total, first, *_ = store.snapshot()["histograms"][b"wasmcustom.h"]
    assert (count, total, first) == (1, -1, 1)


def test_defined_metrics_are_exported_at_zero(g: Guest, store: MetricStore) -> None:
    define(g, COUNTER, b"c")
    define(g, HISTOGRAM, b"h")
    text = metrics.prometheus_text(store.snapshot())
    assert b"# TYPE c counter\nc{} 0\n" in text
    assert b'h_bucket{le="+Inf"} 0\nh_sum{} 0\nh_count{} 0\n' in text


def test_merge_sums_workers() -> None:
    one = snap(counters={b"wasmcustom.c": 2}, gauges={b"wasmcustom.g": 1},
               histograms={b"wasmcustom.h": [1, 7, 0, 0, 0, 1] + [0] * 16})
    two = snap(counters={b"wasmcustom.c": 3, b"wasmcustom.d": 1}, gauges={b"wasmcustom.g": 4},
               histograms={b"wasmcustom.h": [2, 3, 1, 1] + [0] * 18})
    merged = metrics.merge([one, two])
    assert merged["counters"] == {b"wasmcustom.c": 5, b"wasmcustom.d": 1}
    assert merged["gauges"] == {b"wasmcustom.g": 5}
    assert merged["histograms"] == {b"wasmcustom.h": [3, 10, 1, 1, 0, 1] + [0] * 16}
    assert metrics.merge([]) == snap()
