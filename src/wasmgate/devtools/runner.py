"""``wasmgate test``: run a spec's cases in-process (and, with ``--against envoy``, through Envoy)."""

from __future__ import annotations

import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from wasmgate.devtools.driver import Outcome, PluginDriver
from wasmgate.devtools.spec import Case, Spec, check
from wasmgate.plugin.vm import PluginError


@dataclass
class CaseResult:
    case: Case
    failures: list[str] = field(default_factory=list)
    outcome: Outcome | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def run_case(spec: Spec, case: Case) -> CaseResult:
    """One case on a fresh VM, so its metrics and state are its own."""
    t0 = time.perf_counter()
    res = CaseResult(case)
    try:
        driver = PluginDriver(spec.wasm, spec.case_config(case), name=spec.name, root_id=spec.root_id,
                              vm_config=spec.vm_config, env=spec.env)
    except PluginError as e:
        res.failures = [f"the plugin did not start: {e}"]
        res.seconds = time.perf_counter() - t0
        return res
    with driver:
        out = driver.run(case.request.build(), case.response.build(), replies=case.expect.replies())
    out.logs[:0] = driver.start_logs  # on_configure's lines count too
    res.outcome = out
    res.failures = check(case.expect, out)
    res.seconds = time.perf_counter() - t0
    return res


def run_spec(spec: Spec) -> list[CaseResult]:
    return [run_case(spec, c) for c in spec.cases]


def _color(stream: TextIO) -> tuple[str, str, str]:
    if stream.isatty():
        return "\033[32m", "\033[31m", "\033[0m"
    return "", "", ""


def report(spec: Spec, results: list[CaseResult], stream: TextIO = sys.stdout, verbose: bool = False) -> None:
    green, red, reset = _color(stream)
    print(f"{spec.path.name}: plugin {spec.name} ({spec.plugin})", file=stream)
    for r in results:
        mark = f"{green}PASS{reset}" if r.ok else f"{red}FAIL{reset}"
        print(f"  {mark} {r.case.name} ({r.seconds * 1000:.1f} ms)", file=stream)
        for line in r.failures:
            print(f"       {line}", file=stream)
        if verbose and r.outcome is not None:
            o = r.outcome
            print(f"       actions: {o.actions}", file=stream)
            print(f"       client got: {o.status} {o.body!r}", file=stream)
            for line in o.logs:
                print(f"       log: {line}", file=stream)
    failed = sum(not r.ok for r in results)
    summary = f"{len(results)} cases: {len(results) - failed} passed, {failed} failed"
    print(f"{red if failed else green}{summary}{reset}", file=stream)


def write_junit(path: Path, spec: Spec, results: list[CaseResult]) -> None:
    suite = ET.Element("testsuite", name=f"{spec.path.name}", tests=str(len(results)),
                       failures=str(sum(not r.ok for r in results)),
                       time=f"{sum(r.seconds for r in results):.3f}")
    for r in results:
        tc = ET.SubElement(suite, "testcase", classname=spec.name, name=r.case.name, time=f"{r.seconds:.3f}")
        if not r.ok:
            fail = ET.SubElement(tc, "failure", message=r.failures[0])
            fail.text = "\n".join(r.failures)
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
