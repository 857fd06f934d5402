"""Prometheus exposition of proxy and plugin figures, read at scrape time.

Metrics that plugins define (proxy_define_metric) follow wasmgate's own, named as
Envoy names them (plugin/metrics.py): a plugin's counter ``my_requests`` is exported
as ``my_requests``, with no prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wasmgate.plugin import metrics

if TYPE_CHECKING:
    from wasmgate.plugin.manager import Chain
    from wasmgate.proxy.server import ProxyApp


class _Collector:
    def __init__(self, app: Callable[[], ProxyApp]):
        self._app = app

    def collect(self) -> Iterator[Metric]:
        app = self._app()
        s = app.stats
        yield CounterMetricFamily("wasmgate_downstream_requests", "Requests received downstream.",
                                  value=s.requests)
        by_code = CounterMetricFamily("wasmgate_downstream_responses", "Responses sent, by status code.",
                                      labels=["code"])
        for code, n in sorted(s.responses.items()):
            by_code.add_metric([str(code) if code else "reset"], n)
        yield by_code
        errors = CounterMetricFamily("wasmgate_downstream_protocol_errors",
                                     "Requests rejected as malformed (400) or too large (431).", labels=["code"])
        for code, n in sorted(s.downstream_errors.items()):
            errors.add_metric([str(code)], n)
        yield errors
        yield GaugeMetricFamily("wasmgate_downstream_connections_active", "Open downstream connections.",
                                value=s.active_connections)
        yield CounterMetricFamily("wasmgate_upstream_failures", "Upstream connect failures and resets.",
                                  value=s.upstream_failures)
        yield from _plugin_metrics(app.chain)


def _plugin_metrics(chain: Chain) -> Iterator[Metric]:
    calls = CounterMetricFamily("wasmgate_plugin_calls", "Guest callbacks called.", labels=["plugin"])
    errors = CounterMetricFamily("wasmgate_plugin_errors", "Guest callbacks that trapped.", labels=["plugin"])
    seconds = CounterMetricFamily("wasmgate_plugin_call_seconds", "Time spent in guest callbacks.",
                                  labels=["plugin"])
    failed = CounterMetricFamily("wasmgate_plugin_failed_streams",
                                 "Streams handled by the plugin's fail strategy.", labels=["plugin"])
    memory = GaugeMetricFamily("wasmgate_plugin_memory_bytes", "Linear memory of the plugin's VM.",
                               labels=["plugin"])
    up = GaugeMetricFamily("wasmgate_plugin_up", "1 if the plugin's VM is running.", labels=["plugin"])
    reloads = CounterMetricFamily("wasmgate_plugin_reloads", "Fresh VMs started after a failure (FAIL_RELOAD).",
                                  labels=["plugin"])
    recycles = CounterMetricFamily("wasmgate_plugin_recycles",
                                   "VMs replaced by the memory watchdog.", labels=["plugin"])
    for p in chain.plugins:
        st = p.stats
        calls.add_metric([p.name], st.calls)
        errors.add_metric([p.name], st.errors)
        seconds.add_metric([p.name], st.seconds)
        failed.add_metric([p.name], st.failed_streams)
        memory.add_metric([p.name], p.vm.memory_bytes() if p.vm else 0)
        up.add_metric([p.name], 1 if p.state == "running" else 0)
        reloads.add_metric([p.name], p.reloads)
        recycles.add_metric([p.name], p.recycles)
    yield from (calls, errors, seconds, failed, memory, up, reloads, recycles)


def prometheus_text(app: ProxyApp, plugin_metrics: metrics.Snapshot | None = None) -> bytes:
    """The /stats body. ``plugin_metrics`` defaults to this process's; with several
    worker processes, pass ``metrics.merge`` of every worker's snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(lambda: app))
    snap = plugin_metrics if plugin_metrics is not None else metrics.STORE.snapshot()
    return generate_latest(registry) + metrics.prometheus_text(snap)
