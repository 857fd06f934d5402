"""Where wasmgate spends its time under load: py-spy samples while wrk runs.

Run alone (starts its own nginx and wasmgate, 1 worker)::

    .venv/bin/python benchmarks/hotspots.py [--case allow|deny|none] [--duration S] [--native]

or through ``benchmarks/run.py --profile``. Needs ``py-spy`` (``.venv/bin/pip install py-spy``).
Idle samples (the event loop waiting) are left out, so percentages are of busy time.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from load import LoadSpec, run_wrk
from proxies import Processes, Server, start_nginx, start_wasmgate

_FRAME_LINE = re.compile(r":\d+\)$")  # "fn (file.py:123)" -> "fn (file.py)"
CASE_HEADERS = {"none": (), "allow": ("allow: true",), "deny": ()}


@dataclass
class Profile:
    case: str
    samples: int  # busy samples of the main thread
    busy_pct: float  # main thread busy samples / samples taken: roughly its CPU use
    other_threads: list[tuple[str, float]]  # busy % of other threads (relative to the main thread's samples)
    self_pct: list[tuple[str, float]]  # function -> % of busy samples spent in it (leaf)
    total_pct: list[tuple[str, float]]  # function -> % of busy samples with it on the stack
    file_pct: list[tuple[str, float]]  # source file -> % of busy samples in it (leaf)
    rps: float


def py_spy_binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _short(frame: str) -> str:
    frame = _FRAME_LINE.sub(")", frame.strip())
    for marker in ("/site-packages/", "/src/", "/lib/python3.11/"):
        if marker in frame:
            fn, _, path = frame.partition(" (")
            return f"{fn} ({path.split(marker, 1)[1]}"
    return frame


def parse_raw(text: str, thread: str = "MainThread") -> tuple[int, Counter[str], Counter[str], Counter[str],
                                                              Counter[str]]:
    """py-spy ``--format raw --threads`` (collapsed stacks) of one thread.

    Returns (samples, self, inclusive, by file) for ``thread`` and busy samples by thread.
    """
    total, self_, incl, files, threads = 0, Counter[str](), Counter[str](), Counter[str](), Counter[str]()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        head, _, rest = stack.partition(";")
        name = head.partition("): ")[2] or head
        threads[name] += n
        if name != thread:
            continue
        frames = [_short(f) for f in rest.split(";") if f]
        if not frames:
            continue
        total += n
        self_[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        leaf_file = frames[-1].rpartition(" (")[2].rstrip(")") or frames[-1]
        files[leaf_file] += n
    return total, self_, incl, files, threads


def _pct(counter: Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    return [(k, 100.0 * v / total) for k, v in counter.most_common(top)] if total else []


def profile(server: Server, case: str, duration: int, workdir: Path, *, native: bool = False,
            rate: int = 250, top: int = 20, connections: int = 32) -> Profile:
    """Sample ``server`` (its main process) while wrk loads it for about ``duration`` seconds."""
    spy = py_spy_binary()
    if spy is None:
        raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
    out = workdir / f"py-spy-{case}.txt"
    cmd = [spy, "record", "--pid", str(server.proc.pid), "--format", "raw", "--output", str(out),
           "--duration", str(duration + 1), "--rate", str(rate), "--threads"]
    if not native:
        cmd.append("--nonblocking")  # native stacks need the process paused per sample
    if native:
        cmd.append("--native")
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(0.5)
        result = run_wrk(server.url, LoadSpec(connections=connections, headers=CASE_HEADERS[case]), duration)
        _, err = spy_proc.communicate(timeout=duration + 30)
    finally:
        if spy_proc.poll() is None:
            spy_proc.kill()
            spy_proc.wait()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace').strip()}")
    total, self_, incl, files, threads = parse_raw(out.read_text())
    expected = rate * (duration + 1)
    others = [(k, 100.0 * v / expected) for k, v in threads.most_common() if k != "MainThread"]
    return Profile(case, total, 100.0 * total / expected, others, _pct(self_, total, top), _pct(incl, total, top),
                   _pct(files, total, top), result.rps)


def format_profile(p: Profile, top: int = 15) -> str:
    lines = [f"wasmgate hot spots, case {p.case}: {p.rps:,.0f} req/s under py-spy; main thread busy in "
             f"{p.busy_pct:.0f}% of samples ({p.samples}); percentages below are of its busy samples"]
    if p.other_threads:
        lines.append("  other threads, busy % of samples: " +
                     ", ".join(f"{name} {pct:.1f}%" for name, pct in p.other_threads))
    lines.append("  self time (function itself, callees excluded):")
    lines += [f"    {pct:5.1f}%  {name}" for name, pct in p.self_pct[:top]]
    lines.append("  by source file (self time):")
    lines += [f"    {pct:5.1f}%  {name}" for name, pct in p.file_pct[:10]]
    lines.append("  inclusive time (function and its callees):")
    lines += [f"    {pct:5.1f}%  {name}" for name, pct in p.total_pct[:top]]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASE_HEADERS), action="append",
                    help="none, allow or deny (repeatable; default allow and deny)")
    ap.add_argument("--duration", type=int, default=8, help="seconds of load per case (default 8)")
    ap.add_argument("--native", action="store_true", help="include native frames (C extensions, wasmtime)")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="wasmgate-hotspots-") as tmp:
        workdir = Path(tmp)
        try:
            nginx = start_nginx(procs, workdir)
            for case in args.case or ["allow", "deny"]:
                wg = start_wasmgate(procs, workdir, nginx.port, plugin=case != "none", workers=1)
                run_wrk(wg.url, LoadSpec(headers=CASE_HEADERS[case]), 1)  # warm up
                print(format_profile(profile(wg, case, args.duration, workdir, native=args.native), args.top))
                print()
                procs.stop(wg)
        except KeyboardInterrupt:
            return 130
        finally:
            procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
