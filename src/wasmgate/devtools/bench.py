"""``wasmgate bench``: per-phase latency and linear-memory growth over N requests, with a leak verdict.

Requests run in-process through the same driver as ``wasmgate test``. After a warm-up
(a tenth of the requests, at least 200: allocators and garbage collectors settle), linear
memory is sampled; a plugin leaks when memory grew by at least one 64 KiB page per 1k
requests over the second half of the run and was still growing in its last quarter.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wasmgate.devtools.driver import PluginDriver, Reply, Request, Response
from wasmgate.devtools.spec import Spec

PAGE = 65536


@dataclass
class PhaseStats:
    calls: int
    mean_us: float
    p50_us: float
    p99_us: float


@dataclass
class BenchResult:
    plugin: str
    requests: int
    warmup: int
    seconds: float
    phases: dict[str, PhaseStats]
    memory_start: int  # bytes after loading
    memory_after_warmup: int
    memory_end: int
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests done, memory bytes)
    growth_per_1k: float = 0.0  # bytes per 1000 requests over the second half of the run
    still_growing: bool = False
    leak: bool = False
    failed: str | None = None

    @property
    def verdict(self) -> str:
        if self.failed:
            return f"FAILED: the plugin trapped: {self.failed}"
        if self.leak:
            return (f"LEAK: linear memory grows {self.growth_per_1k / 1024:.1f} KiB per 1k requests "
                    "and is still growing at the end")
        if self.still_growing:
            return "OK (memory still grows slightly, below one page per 1k requests)"
        return "OK: no leak (memory is flat after warm-up)"


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench(wasm: Path, *, spec: Spec | None = None, requests: int = 50000, config: object = None,
          warmup: int | None = None) -> BenchResult:
    if requests < 1:
        raise ValueError("requests: at least 1")
    pairs: list[tuple[Request, Response, list[Reply]]] = [(Request(), Response(), [])]
    name = wasm.stem
    root_id = ""
    if spec is not None:
        cases = [(c.request.build(), c.response.build(), c.expect.replies()) for c in spec.cases]
        pairs = cases or pairs
        config = spec.config if config is None else config
        name, root_id = spec.name, spec.root_id
    warm = warmup if warmup is not None else min(requests // 2, max(200, requests // 10))
    driver = PluginDriver(wasm, config, name=name, root_id=root_id, log_level=logging.WARNING)
    seconds: dict[str, list[float]] = {}
    samples: list[tuple[int, int]] = []
    every = max(1, (requests - warm) // 100)
    mem_start = driver.memory_bytes()
    mem_warm = mem_start
    failed = None
    t0 = time.perf_counter()
    with driver:
        for i in range(requests):
            req, resp, replies = pairs[i % len(pairs)]
            out = driver.run(req, resp, seconds if i >= warm else None, replies)
            if out.failed:
                failed = out.failed
                break
            done = i + 1
            if done == warm:
                mem_warm = driver.memory_bytes()
            if done >= warm and (done - warm) % every == 0:
                samples.append((done, driver.memory_bytes()))
        mem_end = driver.memory_bytes()
    elapsed = time.perf_counter() - t0
    phases = {p: PhaseStats(len(xs), statistics.fmean(xs) * 1e6, _quantile(xs, 0.5) * 1e6, _quantile(xs, 0.99) * 1e6)
              for p, xs in seconds.items() if xs}
    # The slope over the second half of the run: a collector's heap settling early is not a leak.
    half = samples[len(samples) // 2] if samples else (warm, mem_warm)
    growth = (mem_end - half[1]) / max(1, (samples[-1][0] if samples else warm) - half[0]) * 1000
    q = len(samples) // 4
    still = bool(q) and samples[-1][1] > samples[-q - 1][1]
    leak = failed is None and still and growth >= PAGE
    return BenchResult(str(wasm), requests, warm, elapsed, phases, mem_start, mem_warm, mem_end, samples,
                       growth, still, leak, failed)


def print_report(r: BenchResult, as_json: bool = False) -> None:
    if as_json:
        d = asdict(r)
        d["verdict"] = r.verdict
        print(json.dumps(d, indent=2))
        return
    print(f"{r.plugin}: {r.requests} requests in {r.seconds:.2f}s ({r.requests / r.seconds:.0f}/s), "
          f"warm-up {r.warmup}")
    print(f"  {'phase':<20}{'calls':>8}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}")
    for name, p in r.phases.items():
        print(f"  {name:<20}{p.calls:>8}{p.mean_us:>10.1f}{p.p50_us:>10.1f}{p.p99_us:>10.1f}")
    print(f"  linear memory: {r.memory_start / 1024:.0f} KiB at load, {r.memory_after_warmup / 1024:.0f} KiB "
          f"after warm-up, {r.memory_end / 1024:.0f} KiB at the end")
    print(f"  growth over the second half: {r.growth_per_1k / 1024:.1f} KiB per 1k requests; "
          f"still growing in the last quarter: {'yes' if r.still_growing else 'no'}")
    print(f"  verdict: {r.verdict}")
