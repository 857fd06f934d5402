"""The ``new``, ``test`` and ``bench`` subcommands of ``wasmgate``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

COMMANDS = ("new", "test", "bench")


def register(sub: Any) -> None:
    """Add the subcommands to ``sub`` (an ``argparse`` subparsers action)."""
    n = sub.add_parser("new", help="scaffold a Go plugin project", description=(
        "Create directory NAME with a Go Proxy-Wasm plugin (main.go, raw ABI, no SDK needed), go.mod, "
        "a test spec (spec.yaml), a WasmPlugin resource (wasmplugin.yaml) and a README. "
        "`wasmgate build && wasmgate test spec.yaml` in it passes at once."))
    n.add_argument("name", metavar="NAME", help="plugin name and directory")

    t = sub.add_parser("test", help="run a plugin's test spec", description=(
        "Run the cases of SPEC.yaml against the plugin in-process (the proxy's own VM and filter "
        "chain). Exit status: 0 all passed, 1 some failed, 2 the spec or plugin is unusable."))
    t.add_argument("spec", type=Path, metavar="SPEC.yaml")
    t.add_argument("--against", choices=("envoy",), help="also run the cases through Envoy and report differences")
    t.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML results to FILE")
    t.add_argument("-v", "--verbose", action="store_true", help="show actions, responses and logs of every case")

    b = sub.add_parser("bench", help="per-phase latency and memory growth of a plugin", description=(
        "Send N requests through PLUGIN.wasm in-process (the cases of --spec in turn, or GET /), "
        "and report per-phase latency, linear-memory growth and a leak verdict. "
        "Exit status 1 when it leaks."))
    b.add_argument("plugin", type=Path, metavar="PLUGIN.wasm")
    b.add_argument("--spec", type=Path, metavar="SPEC.yaml", help="requests (and configuration) to replay")
    b.add_argument("-n", "--requests", type=int, default=50000, help="number of requests (default 50000)")
    b.add_argument("--config", help="plugin configuration (without --spec)")
    b.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if args.command == "new":
        return _new(args)
    if args.command == "test":
        return _test(args)
    return _bench(args)


def _new(args: argparse.Namespace) -> int:
    from wasmgate.devtools.scaffold import ScaffoldError, scaffold

    target = Path(args.name)
    try:
        files = scaffold(target, target.name)
    except ScaffoldError as e:
        print(f"wasmgate new: error: {e}", file=sys.stderr)
        return 2
    for f in files:
        print(f"created {f}")
    print(f"next: cd {target} && wasmgate build && wasmgate test spec.yaml")
    return 0


def _test(args: argparse.Namespace) -> int:
    from wasmgate.devtools.runner import report, run_spec, write_junit
    from wasmgate.devtools.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(f"wasmgate test: error: {e}", file=sys.stderr)
        return 2
    if not spec.wasm.is_file():
        print(f"wasmgate test: error: {spec.wasm}: no such module (run `wasmgate build` first?)", file=sys.stderr)
        return 2
    results = run_spec(spec)
    report(spec, results, verbose=args.verbose)
    if args.junit:
        write_junit(args.junit, spec, results)
    failed = any(not r.ok for r in results)
    if args.against == "envoy":
        from wasmgate.devtools.envoy import EnvoyUnavailable, compare, report_diff

        try:
            diffs = compare(spec, results)
        except EnvoyUnavailable as e:
            print(f"wasmgate test: error: --against envoy: {e}", file=sys.stderr)
            return 2
        report_diff(spec, diffs)
        failed = failed or any(diffs.values())
    return 1 if failed else 0


def _bench(args: argparse.Namespace) -> int:
    from wasmgate.devtools.bench import bench, print_report
    from wasmgate.devtools.spec import SpecError, load_spec
    from wasmgate.plugin.vm import PluginError

    try:
        spec = load_spec(args.spec) if args.spec else None
        result = bench(args.plugin, spec=spec, requests=args.requests, config=args.config)
    except (SpecError, PluginError) as e:
        print(f"wasmgate bench: error: {e}", file=sys.stderr)
        return 2
    print_report(result, as_json=args.json)
    return 1 if result.leak else 0
