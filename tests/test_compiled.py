"""The request path compiled with mypyc (wasmgate/compiled.py, setup.py), and the ways
back to its Python source: WASMGATE_PURE_PYTHON=1, and a build older than its source."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wasmgate import compiled

SRC = Path(compiled.__file__).resolve().parents[1]
WHICH = "import wasmgate.proxy.server as s, wasmgate.plugin.chain as c; print(s.__file__); print(c.__file__)"


def test_request_path_is_compiled_when_built() -> None:
    modules = [importlib.import_module(m) for m in compiled.MODULES]
    if compiled.pure_python():
        assert not any(compiled.is_compiled(m) for m in modules)
        return
    missing = [m.__name__ for m in modules if not compiled.is_compiled(m)]
    assert not missing, f"make setup should have compiled these with mypyc: {missing}"


def _which(env: dict[str, str], path: Path = SRC) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WHICH], env={**env, "PYTHONPATH": str(path)}, cwd=path,
                          capture_output=True, text=True, timeout=60, check=True)


def test_pure_python_imports_the_source() -> None:
    r = _which({**os.environ, compiled.PURE_PYTHON_ENV: "1"})
    assert [Path(line).suffix for line in r.stdout.split()] == [".py", ".py"]


def test_a_build_older_than_its_source_is_not_used(tmp_path: Path) -> None:
    if compiled.pure_python() or not compiled.is_compiled(importlib.import_module("wasmgate.proxy.server")):
        pytest.skip("not compiled")
    tree = tmp_path / "src"
    shutil.copytree(SRC, tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_PYTHON_ENV}
    assert all(line.endswith(".so") for line in _which(env, tree).stdout.split())
    chain = tree / "wasmgate" / "plugin" / "chain.py"
    chain.write_text(chain.read_text() + "\n# edited after the build\n")  # newer than its .so now
    r = _which(env, tree)
    # Every compiled module then runs from source (mypyc binds them to one another).
    assert [Path(line).suffix for line in r.stdout.split()] == [".py", ".py"]
    assert "wasmgate.plugin.chain" in r.stderr and "make setup" in r.stderr

