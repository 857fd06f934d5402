"""Prometheus exposition of proxy and plugin figures, read at scrape time.

Metrics that plugins define (proxy_define_metric) follow wasmgate's own, named as
Envoy names them (plugin/metrics.py): a plugin's counter ``my_requests`` is exported
as ``my_requests``, with no prefix.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wasmgate.plugin import metrics
from wasmgate.proxy import tcp

if TYPE_CHECKING:
    from wasmgate.proxy.server import ProxyApp


# A snapshot is what one process reports; several workers' snapshots are summed.
Snapshot = dict[str, Any]


def snapshot(app: ProxyApp) -> Snapshot:
    s = app.stats
    return {
        "requests": s.requests,
        "responses": dict(s.responses),
        "protocol_errors": dict(s.downstream_errors),
        "connections": s.active_connections,
        "upstream_failures": s.upstream_failures,
        "plugins": {p.name: {"calls": p.stats.calls, "errors": p.stats.errors, "seconds": p.stats.seconds,
                             "failed_streams": p.stats.failed_streams,
                             "memory": p.vm.memory_bytes() if p.vm else 0,
                             "up": 1 if p.state == "running" else 0, "reloads": p.reloads,
                             "recycles": p.recycles} for p in app.chain.plugins},
        "metrics": metrics.STORE.snapshot(),
        "tcp": tcp.STATS.snapshot(),
    }


def _add(a: dict[Any, Any], b: dict[Any, Any]) -> dict[Any, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _add(out.get(k, {}), v) if isinstance(v, dict) else out.get(k, 0) + v
    return out


def merge(snaps: list[Snapshot]) -> Snapshot:
    """Sum the snapshots of several worker processes (gauges too: each worker's VMs are its own)."""
    out: Snapshot = {}
    for snap in snaps:
        out = _add(out, {k: v for k, v in snap.items() if k != "metrics"})
    out["metrics"] = metrics.merge([s["metrics"] for s in snaps])
    return out


class _Collector:
    def __init__(self, snap: Snapshot):
        self._snap = snap

    def collect(self) -> Iterator[Metric]:
        s = self._snap
        yield CounterMetricFamily("wasmgate_downstream_requests", "Requests received downstream.",
                                  value=s.get("requests", 0))
        by_code = CounterMetricFamily("wasmgate_downstream_responses", "Responses sent, by status code.",
                                      labels=["code"])
        for code, n in sorted(s.get("responses", {}).items()):
            by_code.add_metric([str(code) if code else "reset"], n)
        yield by_code
        errors = CounterMetricFamily("wasmgate_downstream_protocol_errors",
                                     "Requests rejected as malformed (400), slow (408) or too large (431).",
                                     labels=["code"])
        for code, n in sorted(s.get("protocol_errors", {}).items()):
            errors.add_metric([str(code)], n)
        yield errors
        yield GaugeMetricFamily("wasmgate_downstream_connections_active", "Open downstream connections.",
                                value=s.get("connections", 0))
        yield CounterMetricFamily("wasmgate_upstream_failures", "Upstream connect failures and resets.",
                                  value=s.get("upstream_failures", 0))
        yield from _tcp_metrics(s.get("tcp", {}))
        yield from _plugin_metrics(s.get("plugins", {}))


_TCP_FAMILIES = (
    ("connections", CounterMetricFamily, "wasmgate_tcp_connections", "TCP proxy connections accepted."),
    ("active", GaugeMetricFamily, "wasmgate_tcp_connections_active", "Open TCP proxy connections."),
    ("upstream_failures", CounterMetricFamily, "wasmgate_tcp_upstream_failures",
     "TCP proxy upstream connect failures and timeouts."),
    ("bytes_received", CounterMetricFamily, "wasmgate_tcp_received_bytes", "Bytes received from TCP clients."),
    ("bytes_sent", CounterMetricFamily, "wasmgate_tcp_sent_bytes", "Bytes sent to TCP clients."),
)


def _tcp_metrics(figures: dict[str, int]) -> Iterator[Metric]:
    for key, family, name, doc in _TCP_FAMILIES:
        yield family(name, doc, value=figures.get(key, 0))


_PLUGIN_FAMILIES = (
    ("calls", CounterMetricFamily, "wasmgate_plugin_calls", "Guest callbacks called."),
    ("errors", CounterMetricFamily, "wasmgate_plugin_errors", "Guest callbacks that trapped."),
    ("seconds", CounterMetricFamily, "wasmgate_plugin_call_seconds", "Time spent in guest callbacks."),
    ("failed_streams", CounterMetricFamily, "wasmgate_plugin_failed_streams",
     "Streams handled by the plugin's fail strategy."),
    ("memory", GaugeMetricFamily, "wasmgate_plugin_memory_bytes", "Linear memory of the plugin's VMs."),
    ("up", GaugeMetricFamily, "wasmgate_plugin_up", "VMs of the plugin that are running."),
    ("reloads", CounterMetricFamily, "wasmgate_plugin_reloads", "Fresh VMs started after a failure (FAIL_RELOAD)."),
    ("recycles", CounterMetricFamily, "wasmgate_plugin_recycles", "VMs replaced by the memory watchdog."),
)


def _plugin_metrics(plugins: dict[str, dict[str, float]]) -> Iterator[Metric]:
    for key, family, name, doc in _PLUGIN_FAMILIES:
        m = family(name, doc, labels=["plugin"])
        for plugin, values in plugins.items():
            m.add_metric([plugin], values.get(key, 0))
        yield m


def prometheus_text(snap: Snapshot) -> bytes:
    """The /stats body for a snapshot (one process's, or merged across workers)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snap))
    return generate_latest(registry) + metrics.prometheus_text(snap["metrics"])
