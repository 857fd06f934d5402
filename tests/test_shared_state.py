"""Metrics, shared data and shared queues end to end, with the sharedstate Go plugin
(tests/plugins/sharedstate), through wasmgate alone and side by side with Envoy 1.40.

The plugin counts requests in a counter metric and in the shared-data key ``hits``
(compare-and-swap, retried on CAS_MISMATCH), enqueues an item per request to a queue
its proxy_on_queue_ready drains, and reports what it saw in response headers. Requests
with ``x-ops`` run scripts of raw host calls instead (see the plugin's comment).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from envoy_harness import Envoy, EnvoyPlugin
from plugin_checks import (
    PluginLogs,
    assert_same_logs,
    assert_same_metrics,
    envoy_messages,
    plugin_metric_lines,
    plugin_metrics,
    settled,
    stats,
)
from servers import PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml
from wasmgate.plugin import metrics, shared

WASM = PLUGIN_BUILD / "sharedstate.wasm"


@pytest.fixture
def fresh_state() -> Iterator[None]:
    """This process's metric and shared-data stores, empty for the test."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "STORE", metrics.MetricStore())
        mp.setattr(shared, "STORE", shared.LocalStore())
        mp.setattr(shared, "LISTENERS", shared.QueueListeners())
        yield


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.server.shutdown()


def get(port: int, headers: dict[str, str] | None = None, path: str = "/abc") -> dict[str, str]:
    """The x-* response headers a plugin may have set (repeats joined with ', ')."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        out: dict[str, str] = {}
        for k, v in r.getheaders():
            k = k.lower()
            if k.startswith("x-") and k not in ("x-remove-me", "x-envoy-upstream-service-time"):
                out[k] = f"{out[k]}, {v}" if k in out else v
        return out
    finally:
        conn.close()


def ops(port: int, script: str) -> str:
    return get(port, {"x-ops": script})["x-ops-result"]


# ---- wasmgate alone --------------------------------------------------------------------


def test_counters_shared_data_and_queue(tmp_path: Path, upstream: Upstream, fresh_state: None) -> None:
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "sharedstate", WASM)], upstream.url)
    try:
        for n in range(1, 6):
            assert get(proxy.port) == {"x-hits": str(n), "x-requests": str(n), "x-drained": str(n),
                                       "x-last-item": f"hit {n}"}
        text = stats(proxy.admin_port)
        assert "# TYPE sharedstate_requests counter\nsharedstate_requests{} 5\n" in text
        assert 'sharedstate_path_length_bucket{le="5"} 5\n' in text  # "/abc"
        assert "sharedstate_path_length_sum{} 20\nsharedstate_path_length_count{} 5\n" in text
    finally:
        proxy.stop()


def test_plugins_with_one_vm_id_share_data_metrics_and_queues(tmp_path: Path, upstream: Upstream,
                                                              fresh_state: None) -> None:
    # Istio sets no vm_id, so every WasmPlugin is in the empty vm_id's scope.
    files = [wasmplugin_yaml(tmp_path, name, WASM, priority=prio) for name, prio in (("first", 2), ("second", 1))]
    proxy = ProxyThread(files, upstream.url)
    try:
        for n in range(1, 4):
            got = get(proxy.port)
            # The response runs the chain backwards: "second" adds its headers first.
            assert got["x-hits"] == f"{2 * n}, {2 * n - 1}"
            assert got["x-requests"] == f"{2 * n}, {2 * n - 1}"
            # Both registered the queue; the one that registered last owns it and drains it.
            # Same vm_id and module: one VM, so both read the same `drained` global, as
            # Envoy shows for Istio's translation (vm_id "") of these two plugins.
            assert got["x-drained"] == f"{2 * n}, {2 * n}"
        assert "sharedstate_requests{} 6\n" in stats(proxy.admin_port)
    finally:
        proxy.stop()


def test_cas_increment_from_many_clients(tmp_path: Path, upstream: Upstream, fresh_state: None) -> None:
    """Concurrent clients: every increment lands once, and the counter ends at the total."""
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "sharedstate", WASM)], upstream.url)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            seen = list(pool.map(lambda _: int(get(proxy.port)["x-hits"]), range(80)))
        assert sorted(seen) == list(range(1, 81))
        assert ops(proxy.port, "sget hits").startswith("0=80/")
    finally:
        proxy.stop()


# ---- against Envoy ---------------------------------------------------------------------


class Pair:
    """The sharedstate plugin in Envoy and in wasmgate, in front of one upstream. Each
    ``compare`` also checks the plugin's log lines and its counters and gauges
    (tests/plugin_checks.py, as test_envoy_diff.py's Pair)."""

    def __init__(self, workdir: Path, upstream: Upstream):
        self.envoy = Envoy([EnvoyPlugin("sharedstate", WASM, root_id="sharedstate")], upstream.port,
                           workdir / "envoy", log_level="debug")
        self.logs = PluginLogs()
        try:
            self.envoy.start()
            self.wasmgate = ProxyThread([wasmplugin_yaml(workdir, "sharedstate", WASM)], upstream.url)
        except BaseException:
            self.envoy.stop()
            self.logs.close()
            raise

    def stop(self) -> None:
        try:
            self.wasmgate.stop()
            self.envoy.stop()
        finally:
            self.logs.close()

    def compare(self, headers: dict[str, str] | None = None, path: str = "/abc") -> dict[str, str]:
        marks = len(self.logs.messages), len(envoy_messages(self.envoy))
        expected = get(self.envoy.port, headers, path)
        actual = get(self.wasmgate.port, headers, path)
        assert actual == expected, f"wasmgate differs from Envoy for {headers}"
        ours, theirs = settled((lambda: self.logs.messages, marks[0]), (lambda: envoy_messages(self.envoy), marks[1]))
        assert_same_logs(ours, theirs, str(headers))
        assert_same_metrics(plugin_metrics(self.wasmgate.admin_port), plugin_metrics(self.envoy.admin_port),
                            f"after {headers}")
        return actual

    def ops(self, script: str) -> str:
        return self.compare({"x-ops": script})["x-ops-result"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Pair]:
    # Envoy's stores start empty with its process; so do this process's, for the module.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "STORE", metrics.MetricStore())
        mp.setattr(shared, "STORE", shared.LocalStore())
        mp.setattr(shared, "LISTENERS", shared.QueueListeners())
        p = Pair(tmp_path_factory.mktemp("sharedstate"), upstream)
        try:
            yield p
        finally:
            p.stop()


# The tests below share one Envoy and one wasmgate and run in order: shared data and
# metric ids carry over from one to the next, in both.


def test_requests_same_as_envoy(pair: Pair) -> None:
    for n in range(1, 4):
        assert pair.compare() == {"x-hits": str(n), "x-requests": str(n), "x-drained": str(n),
                                  "x-last-item": f"hit {n}"}


def test_metric_calls_same_as_envoy(pair: Pair) -> None:
    assert pair.ops("define 0 ctr,define 0 ctr,define 1 gg,define 2 hist,define 3 bad,define 0 ctr2") == \
        "0=8,0=12,0=5,0=10,2=0,0=16"
    assert pair.ops("get 4,get 8,get 12,get 16,get 5,get 6,get 7,get 1000,get 1001,get 1002,get 1003") == \
        "0=3,0=0,0=0,0=0,0=0,2=0,2=0,1=0,1=0,2=0,2=0"
    assert pair.ops("inc 4 0,inc 4 -1,inc 4 5,get 4,inc 6 1,inc 1000 1,inc 1001 1,inc 1002 1,inc 1003 1,"
                    "rec 1000 1,rec 1001 1,rec 1002 1,rec 1003 1") == "2,2,0,0=8,2,1,1,2,2,1,1,1,1"
    assert pair.ops("define 0 ctr,rec @0 10,get @0,define 1 gg,inc @3 5,inc @3 -7,get @3,rec @3 3,get @3,"
                    "inc @3 -9223372036854775808,get @3") == \
        "0=20,0,0=10,0=9,0,0,0=18446744073709551614,0,0=3,0,0=9223372036854775811"
    pair.ops("define 2 hh,rec @0 1000,rec @0 1005,rec @0 1099,rec @0 1100,rec @0 26,rec @0 5,rec @0 6,"
             "rec @0 99,rec @0 100,rec @0 101")
    pair.ops("define 0 a.b,define 0 x:y,define 0 1abc,define 0 dash-name,define 0 UPPER,define 0 trailing.,"
             "define 0 .lead,define 0 foo_rq_200,define 0 bar_rq_2xx,define 1 cluster.foo.bar,define 0 -,"
             "inc @0 1,inc @1 2,inc @2 3,inc @3 4,inc @4 5,inc @5 6,inc @6 7,inc @7 8,inc @8 9,rec @9 10,inc @10 11")


def test_shared_data_calls_same_as_envoy(pair: Pair) -> None:
    assert pair.ops("sget k,sset k v1 0,sget k,sset k v2 999,sset k v2 @2,sget k,sset newkey x 5,sget newkey,"
                    "sset k - 0,sget k,sset k v3 @2,sget -,sset - e 0,sget -") == \
        "1,0,0=v1/4,8,0,0=v2/5,0,0=x/6,0,0=/7,8,1,0,0=e/8"  # hits took CAS values 1 to 3
    assert pair.ops("sget hits") == "0=3/3"


def test_queue_calls_same_as_envoy(pair: Pair) -> None:
    assert pair.ops("resolve - nosuch,reg q1,reg q1,resolve - q1,resolve other q1,resolve - sharedstate_events,"
                    "enq @1 hello,enq @1 world,deq @1,deq @1,deq @1,deq 9999,enq 9999 x,deq 0,enq 0 x,"
                    "reg -,resolve - -") == "1=0,0=2,0=2,0=2,1=0,0=1,0,0,0=hello,0=world,7,1,1,1,1,0=3,0=3"
    # proxy_on_queue_ready ran after that request's callback, so the queue was still there
    # to dequeue from; the next request sees the plugin's own queue drained as usual.
    assert pair.compare() == {"x-hits": "4", "x-requests": "9", "x-drained": "4", "x-last-item": "hit 4"}


def test_stats_same_as_envoy(pair: Pair) -> None:
    """Plugin metrics on /stats/prometheus, histograms included once Envoy has merged them."""
    deadline = time.monotonic() + 20
    while True:  # Envoy merges histograms at each stats flush (every 5 s)
        envoy = plugin_metric_lines(stats(pair.envoy.admin_port, "/stats/prometheus"))
        if "hh_count{} 10" in envoy or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ours = plugin_metric_lines(stats(pair.wasmgate.admin_port, "/stats/prometheus"))
    # Envoy's histogram sums are approximations from its log-linear bins; ours are exact.
    assert [line for line in ours if "_sum{" not in line] == [line for line in envoy if "_sum{" not in line]
    assert "hh_sum{} 4541" in ours
    assert "sharedstate_requests{} 9" in ours
    assert 'foo_rq{envoy_response_code="200"} 8' in ours
    assert "envoy_wasmcustom{} 11" in ours

