"""What every differential test compares besides the HTTP exchanges: the plugins' own log
lines (Envoy's wasm log at debug, wasmgate's ``wasmgate.wasm`` logger in this process) and
the plugins' metrics on the admin ``/stats/prometheus`` of each.

Usage: a :class:`PluginLogs` while wasmgate runs in this process; marks taken with
``len(...)`` before some traffic; :func:`settled` for what each wrote since;
:func:`assert_same_logs` and :func:`assert_same_metrics` to compare.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from collections.abc import Callable

from envoy_harness import Envoy
from wasmgate.plugin import metrics
from xds_harness import GatewayThread


def plugin_message(line: str) -> str | None:
    """The message of a plugin's log line ("... wasm log <name> <root_id> <vm_id>: <message>")."""
    _, sep, rest = line.partition("wasm log ")
    return rest.split(": ", 1)[1] if sep and ": " in rest else None


def envoy_messages(envoy: Envoy | GatewayThread) -> list[str]:
    """The plugin log lines in Envoy's log so far (Envoy must log wasm at debug for all of them)."""
    return [m for m in map(plugin_message, envoy.log_text().splitlines()) if m is not None]


class PluginLogs(logging.Handler):
    """The plugin log lines wasmgate writes in this process, from creation to ``close()``.

    It also gives this process an empty plugin metric store for that time: metrics are
    process-wide here and per Envoy process there.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._saved_store, metrics.STORE = metrics.STORE, metrics.MetricStore()
        self._logger = logging.getLogger("wasmgate.wasm")
        self._saved_level = self._logger.level
        self._logger.setLevel(logging.DEBUG)
        self._logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        msg = plugin_message(record.getMessage())
        if msg is not None:
            self.messages.append(msg)

    def close(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved_level)
        metrics.STORE = self._saved_store
        super().close()


def settled(*sources: tuple[Callable[[], list[str]], int], quiet: float = 0.3,
            timeout: float = 5) -> list[list[str]]:
    """What each (lines, mark) source holds past its mark, once none has grown for ``quiet``
    seconds (Envoy writes its log asynchronously; wasmgate calls on_log after the response)."""
    last: list[int] = []
    quiet_since = time.monotonic()
    deadline = quiet_since + timeout
    while True:
        now_lines = [lines()[mark:] for lines, mark in sources]
        now = time.monotonic()
        sizes = [len(x) for x in now_lines]
        if sizes != last:
            last, quiet_since = sizes, now
        elif now - quiet_since >= quiet or now > deadline:
            return now_lines
        time.sleep(0.05)


def assert_same_logs(ours: list[str], theirs: list[str], what: str) -> None:
    if ours == theirs:
        return
    diffs = [f"{a!r} (Envoy: {b!r})" for a, b in zip(ours, theirs, strict=False) if a != b]
    if len(ours) != len(theirs):
        diffs.append(f"{len(ours)} lines (Envoy: {len(theirs)}); the first extra: "
                     f"{(ours[len(theirs):] or theirs[len(ours):])[0]!r}")
    raise AssertionError(f"plugin log lines differ for {what}: " + "; ".join(diffs[:5]))


def stats(admin_port: int, path: str = "/stats") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}{path}", timeout=10) as r:
        return str(r.read().decode("latin-1"))


def plugin_metric_lines(text: str) -> list[str]:
    """The lines of plugin-defined metrics: neither Envoy's (envoy_*) nor wasmgate's own.

    A metric with an empty name is ``envoy_wasmcustom``, like one of Envoy's own.
    """
    own = ("envoy_", "# TYPE envoy_", "wasmgate_", "# TYPE wasmgate_", "# HELP")
    empty_name = ("envoy_wasmcustom{", "# TYPE envoy_wasmcustom ")
    return [line for line in text.splitlines() if line and (not line.startswith(own) or line.startswith(empty_name))]


def without_histogram_values(lines: list[str]) -> list[str]:
    """Histogram series without their values: Envoy shows those only after a stats flush
    (every 5 s; zeros before), so only their names and buckets are compared."""
    names = {line.split()[2] for line in lines if line.startswith("# TYPE ") and line.endswith(" histogram")}
    series = {f"{n}{suffix}" for n in names for suffix in ("_bucket", "_sum", "_count")}
    return [line.rsplit(" ", 1)[0] if line.split("{", 1)[0] in series else line for line in lines]


def plugin_metrics(admin_port: int) -> list[str]:
    """A proxy's plugin metrics, as Prometheus lines (histograms without values)."""
    return without_histogram_values(plugin_metric_lines(stats(admin_port, "/stats/prometheus")))


def assert_same_metrics(ours: list[str], theirs: list[str], what: str) -> None:
    if ours != theirs:
        only_ours, only_theirs = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        raise AssertionError(f"plugin metrics differ {what}: wasmgate only {only_ours[:8]}, "
                             f"Envoy only {only_theirs[:8]}" + ("" if only_ours or only_theirs else " (order)"))
