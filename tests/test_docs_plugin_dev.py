"""docs/plugin-dev.md: every command of its first shell block runs and succeeds."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugin-dev.md"


def test_walkthrough_commands(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed")
    pytest.importorskip("envoy")
    block = re.search(r"```sh\n(.*?)```", DOC.read_text(), re.S)
    assert block is not None
    cwd = tmp_path
    for line in block.group(1).splitlines():
        argv = shlex.split(line)
        if argv[0] == "cd":
            cwd = cwd / argv[1]
            continue
        assert argv[0] == "wasmgate", line
        r = subprocess.run([sys.executable, "-m", "wasmgate", *argv[1:]], cwd=cwd, capture_output=True,
                           text=True, timeout=300, env=dict(os.environ))
        assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
