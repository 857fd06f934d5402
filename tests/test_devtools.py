"""wasmgate new / test / bench and the pytest plugin (wasmgate.devtools)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from wasmgate.devtools.bench import bench
from wasmgate.devtools.pytest_plugin import WasmPlugin

ROOT = Path(__file__).resolve().parent.parent
LEAKY = ROOT / "tests" / "plugins" / "build" / "leaky.wasm"
ALLOW = ROOT / "examples" / "allow-header" / "plugin.wasm"
WASMGATE = [sys.executable, "-m", "wasmgate"]


def wasmgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WASMGATE, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`wasmgate new demo && cd demo && wasmgate build`, once for the module."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed")
    base = tmp_path_factory.mktemp("new")
    r = wasmgate("new", "demo", cwd=base)
    assert r.returncode == 0, r.stderr
    d = base / "demo"
    assert sorted(p.name for p in d.iterdir()) == [".gitignore", "README.md", "go.mod", "main.go", "spec.yaml",
                                                    "wasmplugin.yaml"]
    r = wasmgate("build", cwd=d)
    assert r.returncode == 0, r.stderr
    return d


def test_new_builds_and_passes_its_spec(demo: Path) -> None:
    r = wasmgate("test", "spec.yaml", cwd=demo)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 cases: 3 passed, 0 failed" in r.stdout


def test_new_refuses_existing_dir_and_bad_names(demo: Path) -> None:
    assert wasmgate("new", "demo", cwd=demo.parent).returncode == 2
    assert "plugin name" in wasmgate("new", "Bad_Name", cwd=demo.parent).stderr


def test_failing_case_shows_diff_and_exit_code(demo: Path, tmp_path: Path) -> None:
    spec = (demo / "spec.yaml").read_text().replace("status: 403, body: \"forbidden", "status: 401, body: \"nope")
    (tmp_path / "spec.yaml").write_text(spec.replace("plugin: plugin.wasm", f"plugin: {demo / 'plugin.wasm'}"))
    junit = tmp_path / "out.xml"
    r = wasmgate("test", "spec.yaml", "--junit", str(junit), cwd=tmp_path)
    assert r.returncode == 1
    assert "FAIL answers 403 under the deny prefix" in r.stdout
    assert "immediate response status: expected 401, got 403" in r.stdout
    assert "immediate response body: expected 'nope by demo\\n', got 'forbidden by demo\\n'" in r.stdout
    assert "1 failed" in r.stdout
    assert "<failure" in junit.read_text()


def test_spec_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / "spec.yaml").write_text(
        "plugin: x.wasm\ncases:\n  - name: a\n    expect: {actions: {bogus: continue}}\n")
    r = wasmgate("test", "spec.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert "cases.0.expect.actions" in r.stderr and "unknown phase 'bogus'" in r.stderr


def test_fixture_drives_phases(wasm_plugin: Callable[..., WasmPlugin]) -> None:
    p = wasm_plugin(ALLOW, {"header": "allow", "value": "true"}, name="allow-header")
    out = p.run()
    assert out.status == 403 and out.body == b"access denied\n" and not out.reached_upstream
    p.expect(out, {"actions": {"request_headers": "pause"}, "logs": ["allow=<missing>"]})
    out = p.run(headers={"allow": "true"}, body=["a", "b"], response_body="hi")
    assert out.upstream_body == b"ab" and out.body == b"hi"
    assert out.actions["request_headers"] == ["continue"]
    with pytest.raises(pytest.fail.Exception, match="response status: expected 500, got 200"):
        p.expect(out, {"response": {"status": 500}})


def test_bench_flags_leak_and_passes_clean() -> None:
    leaky = bench(LEAKY, requests=4000)
    assert leaky.leak and leaky.still_growing and leaky.growth_per_1k > 512 * 1024
    assert "LEAK" in leaky.verdict
    assert set(leaky.phases) >= {"request_headers"}
    clean = bench(LEAKY, requests=4000, config="clean")
    assert not clean.leak, clean.samples
    assert clean.verdict.startswith("OK")


def test_bench_command_exit_codes(tmp_path: Path) -> None:
    r = wasmgate("bench", str(LEAKY), "-n", "6000", "--json", cwd=tmp_path)
    assert r.returncode == 1
    assert json.loads(r.stdout)["leak"] is True
    r = wasmgate("bench", str(LEAKY), "-n", "3000", "--config", "clean", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert "verdict: OK" in r.stdout and "request_headers" in r.stdout


@pytest.mark.parametrize("spec", [ROOT / "examples" / "allow-header" / "spec.yaml", "demo"])
def test_against_envoy_agrees(spec: Path | str, request: pytest.FixtureRequest) -> None:
    pytest.importorskip("envoy")
    path = request.getfixturevalue("demo") / "spec.yaml" if spec == "demo" else Path(spec)
    r = wasmgate("test", str(path), "--against", "envoy", cwd=path.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 differ" in r.stdout


CALLOUT_SPEC = ROOT / "tests" / "plugins" / "callout" / "spec.yaml"


def test_callouts_answered_from_spec(tmp_path: Path) -> None:
    r = wasmgate("test", str(CALLOUT_SPEC), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 cases: 4 passed, 0 failed" in r.stdout


def test_callout_mismatch_is_reported(tmp_path: Path) -> None:
    spec = CALLOUT_SPEC.read_text().replace("plugin: ../build/callout.wasm",
                                            f"plugin: {CALLOUT_SPEC.parent.parent / 'build' / 'callout.wasm'}")
    spec = spec.replace("path: /auth/alice", "path: /auth/bob").replace("callouts: []", "callouts:\n"
                        "        - {cluster: auth, respond: {status: 200}}")
    (tmp_path / "spec.yaml").write_text(spec)
    r = wasmgate("test", "spec.yaml", cwd=tmp_path)
    assert r.returncode == 1
    assert "callout 1 path: expected '/auth/bob', got '/auth/alice'" in r.stdout
    assert "callout 1: expected a call to 'auth', the plugin made none" in r.stdout
    (tmp_path / "bad.yaml").write_text("plugin: x.wasm\ncases:\n  - name: a\n    expect:\n"
                                       "      callouts: [{cluster: auth}]\n")
    r = wasmgate("test", "bad.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "exactly one of `respond`" in r.stderr + r.stdout


def test_fixture_callouts(wasm_plugin: Callable[..., WasmPlugin]) -> None:
    p = wasm_plugin(ROOT / "tests" / "plugins" / "build" / "callout.wasm")
    out = p.run(headers={"x-user": "carol"}, callouts=[{"cluster": "auth", "respond": {"body": "ok"}}])
    assert out.reached_upstream and out.header("x-auth", upstream=True) == "ok"
    (call,) = out.callouts
    assert (call.cluster, call.method, call.path, call.timeout) == ("auth", "GET", "/auth/carol", 2.0)
    out = p.run(headers={"x-user": "dave"}, callouts=[{"cluster": "auth", "fail": "timeout"}])
    assert (out.status, out.body) == (403, b"denied: 504\n")  # Envoy's 504 for a timed-out call
    out = p.run(headers={"x-user": "erin"})  # no such cluster: proxy_http_call fails, as in Envoy
    assert out.status == 500 and out.callouts == []
    p.expect(out, {"callouts": [], "logs": ["http_call failed status=2"]})


def test_callouts_against_envoy() -> None:
    """Answered and failed calls agree: a reset comes back as a 503 response in both."""
    pytest.importorskip("envoy")
    r = wasmgate("test", str(CALLOUT_SPEC), "--against", "envoy", cwd=CALLOUT_SPEC.parent)
    assert "SAME allowed, the auth answer becomes a request header" in r.stdout, r.stdout + r.stderr
    assert "SAME denied, another status answers 403" in r.stdout
    assert "SAME no x-user means no callout" in r.stdout
    assert "SAME the call fails, Envoy answers it with 503" in r.stdout
    assert "4 cases: 4 agree with envoy" in r.stdout
