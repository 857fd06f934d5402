"""wrk runs and their figures."""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

SUMMARY_LUA = Path(__file__).with_name("summary.lua")
_MARK = "WRK_SUMMARY "


@dataclass(frozen=True)
class LoadSpec:
    threads: int = 1
    connections: int = 32
    duration_s: int = 5
    headers: tuple[str, ...] = ()  # e.g. ("allow: true",)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    socket_errors: int  # connect + read + write + timeout
    non_2xx: int  # responses with a status >= 400 (wrk counts them as "status" errors)
    cpu_seconds: float = 0.0  # wrk's own CPU time (user + system): the load shares the CPUs

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class Round:
    result: WrkResult
    cpu_us_per_request: float  # the proxy's CPU time (user + system, all processes) per request


@dataclass(frozen=True)
class Median:
    """Medians over the rounds of one proxy in one case."""

    rps: float
    p50_us: float
    p99_us: float
    cpu_us: float
    rounds: list[Round]
    load_cpu_us: float = 0.0  # wrk's CPU time per request


    @classmethod
    def of(cls, rounds: list[Round]) -> Median:
        def med(values: list[float]) -> float:
            return statistics.median(values)

        return cls(med([r.result.rps for r in rounds]), med([r.result.p50_us for r in rounds]),
                   med([r.result.p99_us for r in rounds]), med([r.cpu_us_per_request for r in rounds]), rounds,
                   med([r.result.cpu_us_per_request for r in rounds]))

    @property
    def spread(self) -> float:
        """(max - min) / median of requests/sec over the rounds: how noisy they were."""
        values = [r.result.rps for r in self.rounds]
        return (max(values) - min(values)) / self.rps if self.rps and len(values) > 1 else 0.0


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def wrk_command(url: str, spec: LoadSpec, duration_s: int | None = None) -> list[str]:
    cmd = [wrk_binary() or "wrk", f"-t{spec.threads}", f"-c{spec.connections}",
           f"-d{duration_s or spec.duration_s}s", "--latency", "-s", str(SUMMARY_LUA)]
    for h in spec.headers:
        cmd += ["-H", h]
    return [*cmd, url]


def run_wrk(url: str, spec: LoadSpec, duration_s: int | None = None) -> WrkResult:
    """One wrk run (bounded: wrk stops itself after the duration; we give it 30 s more)."""
    cmd = wrk_command(url, spec, duration_s)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk's share is added once it is waited for
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=(duration_s or spec.duration_s) + 30,
                         check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in out.stdout.splitlines():
        if line.startswith(_MARK):
            d = json.loads(line[len(_MARK):])
            return WrkResult(
                requests=d["requests"], seconds=d["duration_us"] / 1e6, p50_us=d["p50"], p90_us=d["p90"],
                p99_us=d["p99"], max_us=d["max"], socket_errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                non_2xx=d["status"], cpu_seconds=cpu)
    raise RuntimeError(f"wrk gave no summary (exit {out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
