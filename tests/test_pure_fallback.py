"""The ctypes path (no compiled glue) keeps working: the engine, host-function, fault and
end-to-end tests again, in a pytest run with WASMGATE_PURE_PYTHON=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wasmgate.engine import wasm

TESTS = ["test_engine_glue.py", "test_host_abi.py", "test_host_headers.py", "test_host_stream.py",
         "test_host_wasi.py", "test_faults.py", "test_sandbox.py", "test_e2e.py"]


@pytest.mark.skipif(bool(os.environ.get(wasm.PURE_PYTHON_ENV)), reason="this run is the ctypes path already")
def test_suites_pass_on_the_ctypes_path() -> None:
    here = Path(__file__).parent
    env = {**os.environ, wasm.PURE_PYTHON_ENV: "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        *(str(here / t) for t in TESTS)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
