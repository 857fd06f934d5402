"""The `wasmgate run` command as a user runs it: a real process, real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from envoy_harness import free_port
from servers import ALLOW_HEADER_WASM, Upstream, wasmplugin_yaml
from servers import ALLOW_HEADER_YAML as ALLOW_HEADER_YAML_PATH
from test_e2e import request

WASMGATE = [sys.executable, "-m", "wasmgate"]


def run_fails(*args: str) -> str:
    r = subprocess.run([*WASMGATE, "run", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


@contextmanager
def running(*args: str) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port, admin = free_port(), free_port()
    proc = subprocess.Popen([*WASMGATE, "run", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
                             *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on" in line:
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError(f"wasmgate exited with {proc.wait()}")
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)


def test_default_run_serves_example_with_demo_upstream() -> None:
    with running() as (port, proc):
        assert request(port)[0] == 403
        status, _, body = request(port, headers={"allow": "true"})
        assert status == 200
        assert b"hello from the wasmgate demo upstream" in body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_run_plugins_and_upstream(upstream: Upstream, tmp_path: Path) -> None:
    yaml_path = wasmplugin_yaml(tmp_path, "gate", ALLOW_HEADER_WASM, config={"header": "x-key", "value": "s3cret"})
    with running("--plugins", str(yaml_path), "--upstream", upstream.url) as (port, _):
        assert request(port, headers={"allow": "true"})[0] == 403
        assert request(port, path="/via-cli", headers={"x-key": "s3cret"})[0] == 200
        assert upstream.seen[-1].path == "/via-cli"


def test_config_file(upstream: Upstream, tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    wasmplugin_yaml(tmp_path / "plugins", "gate", ALLOW_HEADER_WASM)
    port, admin = free_port(), free_port()
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nupstream: {upstream.url}\n"
                   "plugins: [plugins]\n")
    proc = subprocess.Popen([*WASMGATE, "run", "-c", str(cfg)], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on" in line:
                break
        assert request(port)[0] == 403
        assert request(port, headers={"allow": "true"})[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nspec: [unclosed\n")
    err = run_fails("--plugins", str(bad))
    assert str(bad) in err and "line" in err and "invalid YAML" in err


@pytest.mark.parametrize(("spec", "field"), [
    ("url: file://x.wasm\n  phase: LATE", "spec.phase"),
    ("url: file://x.wasm\n  failStrategy: MAYBE", "spec.failStrategy"),
    ("url: file://x.wasm\n  priorty: 3", "spec.priorty"),
    ("pluginName: x", "spec.url"),
    ("url: ftp://registry/x.wasm", "spec.url"),
])
def test_bad_field_names_file_and_field(tmp_path: Path, spec: str, field: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: broken}\n"
                   f"spec:\n  {spec}\n")
    err = run_fails("--plugins", str(bad))
    assert str(bad) in err and "WasmPlugin broken" in err and field in err


def test_invalid_wasm_names_module(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wasm"
    junk.write_bytes(b"\0asm\x01\0\0\0garbage")
    err = run_fails("--plugins", str(wasmplugin_yaml(tmp_path, "junk", junk)))
    assert str(junk) in err and "invalid WebAssembly module" in err
    notwasm = tmp_path / "notwasm.wasm"
    notwasm.write_text("hello")
    err = run_fails("--plugins", str(wasmplugin_yaml(tmp_path, "notwasm", notwasm)))
    assert str(notwasm) in err and "not a WebAssembly module" in err
    missing = tmp_path / "missing.wasm"
    err = run_fails("--plugins", str(wasmplugin_yaml(tmp_path, "missing", missing)))
    assert str(missing) in err


def test_bad_config_file_field(tmp_path: Path) -> None:
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text("listen: nowhere\n")
    err = run_fails("-c", str(cfg))
    assert str(cfg) in err and "listen" in err


def test_http2_clusters_must_name_clusters(tmp_path: Path) -> None:
    """http2_clusters (wasmgate envoy's) is checked when the file is read, by any command."""
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text("clusters: {grpc: 'http://127.0.0.1:1'}\nhttp2_clusters: [grpc, nope]\n")
    err = run_fails("-c", str(cfg))
    assert f"{cfg}: http2_clusters[1]: no cluster named 'nope' in clusters" in err


@pytest.mark.parametrize(("args", "error"), [
    (["--tcp-proxy", "127.0.0.1:1"], "--tcp-proxy: expected LISTEN=CLUSTER, got '127.0.0.1:1'"),
    (["--tcp-proxy", "127.0.0.1:1=nope"], "tcp_proxies[0].cluster: no cluster named 'nope' (clusters: none)"),
    (["--cluster", "db=127.0.0.1:1", "--tcp-proxy", "nohost=db"], "tcp_proxies[0].listen must be HOST:PORT"),
])
def test_bad_tcp_proxy_flags(args: list[str], error: str) -> None:
    assert error in run_fails("--plugins", str(ALLOW_HEADER_YAML_PATH), *args)


def test_help_lists_run_options() -> None:
    out = subprocess.run([*WASMGATE, "run", "--help"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "COLUMNS": "200"}).stdout
    for flag in ("--listen", "--admin", "--upstream", "--plugins", "--workers", "--log-level"):
        assert flag in out


def test_wasm_debug_logging_from_startup(upstream: Upstream) -> None:
    with running("--plugins", str(ALLOW_HEADER_WASM.parent / "wasmplugin.yaml"), "--upstream", upstream.url,
                 "--workers", "1", "--log-level", "wasm=debug") as (port, proc):
        assert request(port)[0] == 403
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert proc.stderr is not None
        rest = proc.stderr.read()
    assert "[DEBUG][wasmgate.wasm] wasm log allow-header allow-header: allow-header: denied request" in rest
