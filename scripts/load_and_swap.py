"""Load-and-swap: swap a plugin N times under load and count what clients saw.

    .venv/bin/python scripts/load_and_swap.py [--swaps 100] [--clients 4]

Starts an upstream, wasmgate (a separate process) watching a plugins directory, and a
load generator (another process) on loopback. It rewrites the WasmPlugin file N times,
alternating two plugin versions (the `tag` test plugin configured "v1" or "v2", which
marks every response), and for each swap measures the time from the file change to
the first response from the new version. Exit status 0 only if no request failed or
was reset and every response came from one of the two versions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG_WASM = REPO / "tests" / "plugins" / "build" / "tag.wasm"

LOADGEN = r"""
import http.client, sys, threading, time
port, clients, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stop = threading.Event()
lines = []
def run():
    conn = None
    while not stop.is_set():
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/")
            r = conn.getresponse(); r.read()
            lines.append(f"{time.time():.6f} {r.status} {r.getheader('x-chain-resp', '-')}")
        except Exception as e:
            lines.append(f"{time.time():.6f} ERR {type(e).__name__}")
            conn = None
threads = [threading.Thread(target=run) for _ in range(clients)]
for t in threads: t.start()
sys.stdin.readline()  # run until told to stop
stop.set()
for t in threads: t.join()
open(out, "w").write("\n".join(lines) + "\n")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_plugin(directory: Path, tag: str) -> float:
    doc = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": "tag"},
           "spec": {"url": f"file://{TAG_WASM}", "pluginConfig": {"tag": tag}}}
    tmp = directory / ".tag.yaml.tmp"
    tmp.write_text(json.dumps(doc))
    when = time.time()
    tmp.replace(directory / "tag.yaml")  # atomic, as config management tools write
    return when


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each swap")
    args = ap.parse_args()
    if not TAG_WASM.exists():
        print(f"{TAG_WASM} is missing: run `bash scripts/build-plugins.sh`", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="wasmgate-swap-"))
    plugins = work / "plugins"
    plugins.mkdir()
    write_plugin(plugins, "v1")
    port, admin = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(work / "wasmgate.log", "wb") as log:
            wasmgate = subprocess.Popen(
                [sys.executable, "-m", "wasmgate", "run", "--listen", f"127.0.0.1:{port}", "--admin",
                 f"127.0.0.1:{admin}", "--plugins", str(plugins)], stderr=log, cwd=REPO)
        procs.append(wasmgate)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or wasmgate.poll() is not None:
                    print((work / "wasmgate.log").read_text(), file=sys.stderr)
                    return 2
                time.sleep(0.05)
        out = work / "load.txt"
        load = subprocess.Popen([sys.executable, "-c", LOADGEN, str(port), str(args.clients), str(out)],
                                stdin=subprocess.PIPE)
        procs.append(load)
        time.sleep(0.5)
        swaps: list[tuple[float, str]] = []
        probes: list[tuple[float, str]] = []  # the probe's own responses count as observations too
        tag = "v1"
        for _ in range(args.swaps):
            tag = "v2" if tag == "v1" else "v1"
            swaps.append((write_plugin(plugins, tag), tag))
            # the next swap only once the new version serves
            seen = time.monotonic() + args.timeout
            while time.monotonic() < seen:
                got = _served_tag(port)
                probes.append((time.time(), got))
                if got == tag:
                    break
                time.sleep(0.005)
            time.sleep(0.05)
        time.sleep(0.3)
        assert load.stdin is not None
        load.stdin.write(b"\n")
        load.stdin.close()
        load.wait(timeout=60)
        return report(out.read_text().split("\n"), swaps, args.clients, probes)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


def _served_tag(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/probe")
        r = conn.getresponse()
        r.read()
        return r.getheader("x-chain-resp", "")
    finally:
        conn.close()


def report(lines: list[str], swaps: list[tuple[float, str]], clients: int,
           probes: list[tuple[float, str]]) -> int:
    records = [ln.split() for ln in lines if ln.strip()]
    ok = sorted([(float(t), tag) for t, status, tag in records if status == "200"] + probes)
    failed = [r for r in records if r[1] != "200"]
    foreign = [r for r in records if r[1] == "200" and r[2] not in ("v1", "v2")]
    latencies = []
    for i, (when, tag) in enumerate(swaps):
        until = swaps[i + 1][0] if i + 1 < len(swaps) else float("inf")
        first = next((t for t, got in ok if when <= t < until and got == tag), None)
        if first is not None:
            latencies.append(first - when)
    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(f"swaps: {len(swaps)}  clients: {clients}  requests: {len(records)}  failed or reset: {len(failed)}  "
          f"responses from neither version: {len(foreign)}")
    if latencies:
        print(f"swap latency (file change -> first response from the new version): "
              f"median {statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms, "
              f"observed for {len(latencies)}/{len(swaps)} swaps")
    for r in failed[:10]:
        print("  failed:", " ".join(r))
    good = not failed and not foreign and len(latencies) == len(swaps)
    print("result: PASS" if good else "result: FAIL")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
