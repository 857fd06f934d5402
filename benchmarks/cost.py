"""Per-request cost of wasmgate, 1 worker, as figures that are stable on a busy machine.

    .venv/bin/python benchmarks/cost.py [--case none,allow,deny] [--mode cpu|callgrind]

* ``cpu``: wrk (-c32) against wasmgate in front of nginx; the CPU time (user + system)
  wasmgate's process spends per request, median over rounds. Includes system calls.
* ``callgrind``: wasmgate runs under ``valgrind --tool=callgrind`` with instrumentation
  switched on only while wrk (-c4) loads it: user-space instructions per request. Slow
  but deterministic to a few tenths of a percent; system calls are not counted.

Used to decide on hot-path changes (docs/performance.md); ``benchmarks/run.py`` is the
report against Envoy.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import proxies
from load import LoadSpec, run_wrk
from proxies import HOST, PLUGIN_YAML, Processes, Server

from envoy_harness import free_port

CASE_HEADERS = {"none": (), "allow": ("allow: true",), "deny": ()}


def start(procs: Processes, workdir: Path, upstream: int, case: str, callgrind: Path | None) -> Server:
    plugins = PLUGIN_YAML
    if case == "none":
        plugins = workdir / "no-plugins"
        plugins.mkdir(exist_ok=True)
    port, admin = free_port(), free_port()
    command = [sys.executable, "-m", "wasmgate", "run", "--plugins", str(plugins), "--upstream",
               f"http://{HOST}:{upstream}", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}",
               "--workers", "1"]
    if callgrind is not None:
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={callgrind}",
                   *command]
    proc, log_path, t0 = proxies._spawn(f"wasmgate-{case}", command, workdir, dict(os.environ))
    server = procs.add(Server("wasmgate", proc, port, command, log_path, admin_port=admin))
    proxies.START_TIMEOUT = 300.0
    proxies._wait_first_response(server, t0)
    return server


def _callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _total_ir(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"(totals):\s+(\d+)", line)
        if m:
            return int(m.group(2))
    raise RuntimeError(f"no totals in {path}")


def callgrind_case(procs: Processes, workdir: Path, upstream: int, case: str, seconds: int, rounds: int,
                   keep: Path | None = None) -> list[float]:
    out = workdir / f"callgrind.{case}.out"
    server = start(procs, workdir, upstream, case, out)
    spec = LoadSpec(1, 4, seconds, CASE_HEADERS[case])
    run_wrk(server.url, LoadSpec(1, 4, 2, CASE_HEADERS[case]))  # warm up
    pid = str(server.proc.pid)
    results = []
    for _ in range(rounds):
        for f in workdir.glob(f"callgrind.{case}.out*"):
            f.unlink()
        _callgrind_control("-i", "on", pid)
        r = run_wrk(server.url, spec)
        _callgrind_control("-d", pid)
        _callgrind_control("-i", "off", pid)
        dumps = sorted(workdir.glob(f"callgrind.{case}.out*"), key=lambda p: p.stat().st_mtime)
        ir = sum(_total_ir(d) for d in dumps)
        results.append(ir / r.requests)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for d in dumps:
                d.rename(keep / d.name)
        print(f"  {case}: {r.requests} requests, {ir / r.requests:,.0f} instructions/request", file=sys.stderr)
    procs.stop(server)
    return results


def _user_system(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_case(procs: Processes, workdir: Path, upstream: int, case: str, seconds: int, rounds: int) -> list[float]:
    server = start(procs, workdir, upstream, case, None)
    spec = LoadSpec(1, 32, seconds, CASE_HEADERS[case])
    run_wrk(server.url, LoadSpec(1, 32, 1, CASE_HEADERS[case]))
    results = []
    for _ in range(rounds):
        u0, s0 = _user_system(server.proc.pid)
        r = run_wrk(server.url, spec)
        u1, s1 = _user_system(server.proc.pid)
        results.append((u1 - u0 + s1 - s0) / r.requests * 1e6)
        print(f"  {case}: {r.rps:,.0f} req/s, {results[-1]:.1f} us CPU/request "
              f"(user {(u1 - u0) / r.requests * 1e6:.1f}, system {(s1 - s0) / r.requests * 1e6:.1f})",
              file=sys.stderr)
    procs.stop(server)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="none,allow,deny")
    ap.add_argument("--mode", choices=("cpu", "callgrind"), default="cpu")
    ap.add_argument("--duration", type=int, default=0, help="seconds per round (default 3 cpu, 5 callgrind)")
    ap.add_argument("--keep", type=Path, help="callgrind: keep the profiles in this directory")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per case (default 5 cpu, 1 callgrind)")
    args = ap.parse_args()
    callgrind = args.mode == "callgrind"
    seconds = args.duration or (5 if callgrind else 3)
    rounds = args.rounds or (1 if callgrind else 5)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="wasmgate-cost-") as tmp:
            workdir = Path(tmp)
            nginx = proxies.start_nginx(procs, workdir)
            for case in args.case.split(","):
                if callgrind:
                    values = callgrind_case(procs, workdir, nginx.port, case, seconds, rounds, args.keep)
                else:
                    values = cpu_case(procs, workdir, nginx.port, case, seconds, rounds)
                unit = "instructions/request" if callgrind else "us CPU/request"
                print(f"{case:6s} {statistics.median(values):12,.1f} {unit}  "
                      f"(rounds: {' '.join(f'{v:,.1f}' for v in values)})", flush=True)
    finally:
        procs.stop_all()
    time.sleep(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
