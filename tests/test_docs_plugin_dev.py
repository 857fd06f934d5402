"""docs/plugin-dev.md: every `sh` block runs, in order, as one bash script, and succeeds.

The line marked ``# ports`` gets free ports and the address of a real (anonymous) registry on
127.0.0.1; the script runs in its own process group, which is killed when it ends, so the
proxy it starts never outlives the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oci_harness import shared_registry

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugin-dev.md"
PORTS_LINE = "export REGISTRY=127.0.0.1:5000 PORT=8080 ADMIN=9901  # ports"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def script(registry: str, port: int, admin: int) -> str:
    blocks = re.findall(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    text = "".join(blocks)
    assert text.count(PORTS_LINE) == 1, "the walkthrough must keep its marked ports line"
    return "set -euo pipefail\n" + text.replace(
        PORTS_LINE, f"export REGISTRY={registry} PORT={port} ADMIN={admin}  # substituted by the docs test")


def test_walkthrough_commands(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    for tool in ("go", "curl", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    pytest.importorskip("envoy")
    registry = shared_registry("open", tmp_path_factory.getbasetemp())
    text = script(registry.host, free_port(), free_port())
    bindir = tmp_path / "bin"  # `wasmgate` is this interpreter's
    bindir.mkdir()
    (bindir / "wasmgate").write_text(f"#!/bin/sh\nexec {sys.executable} -m wasmgate \"$@\"\n")
    (bindir / "wasmgate").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "NO_COLOR": "1",
           "DOCKER_CONFIG": str(tmp_path / "no-docker-config")}
    proc = subprocess.Popen(["bash", "-c", text], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the walkthrough did not finish in 600s:\n{out[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything it left running
    log = work / "demo" / "wasmgate.log"
    tail = log.read_text()[-4000:] if log.exists() else ""
    assert proc.returncode == 0, f"{out[-6000:]}\n--- wasmgate.log ---\n{tail}"
    assert "demo: allowed /hello" in out  # the debug line, found by the walkthrough's grep
    assert f"oci://{registry.host}/demo:v2" in out  # /plugins: v2 is the one serving
