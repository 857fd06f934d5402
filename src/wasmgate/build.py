"""``wasmgate build``: compile a Go Proxy-Wasm plugin to a Wasm module.

- Go >= 1.24 (the default): ``GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared``, the
  form Go's ``//go:wasmexport`` needs (a reactor module with ``_initialize``).
- TinyGo (``--tinygo``): ``tinygo build -target=wasip1 -buildmode=c-shared -scheduler=none``
  (TinyGo >= 0.34; older TinyGo gets ``-target=wasi`` without ``-buildmode``, the form the
  TinyGo-era proxy-wasm-go-sdk used). ``--tinygo-gc custom`` selects the nottinygc-style
  allocator: ``-gc=custom -tags="custommalloc nottinygc_envoy"``; the plugin must also import
  ``github.com/wasilibs/nottinygc``. Other values (``leaking``, ``conservative``, ``precise``)
  are passed as ``-gc=VALUE``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIN_GO = (1, 24)
TINYGO_GCS = ("custom", "leaking", "conservative", "precise", "none")
NOTTINYGC_TAGS = ("custommalloc", "nottinygc_envoy")

INSTALL_GO = ("install Go >= 1.24 (https://go.dev/dl) and put `go` on PATH, "
              "or install TinyGo (https://tinygo.org/getting-started/install/) and pass --tinygo")
INSTALL_TINYGO = ("install TinyGo (https://tinygo.org/getting-started/install/) and put `tinygo` on PATH, "
                  "or build with Go >= 1.24 (drop --tinygo)")


class BuildError(Exception):
    """The plugin could not be built; the message says why and what to install."""


@dataclass(frozen=True)
class Toolchain:
    kind: str  # "go" or "tinygo"
    exe: str
    version: tuple[int, ...]


def _version(text: str) -> tuple[int, ...]:
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return ()
    return tuple(int(g) for g in m.groups() if g is not None)


def find_go() -> Toolchain:
    exe = shutil.which("go")
    if exe is None:
        raise BuildError(f"no Go toolchain found: {INSTALL_GO}")
    try:
        out = subprocess.run([exe, "env", "GOVERSION"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{exe} does not work ({type(e).__name__}): {INSTALL_GO}") from None
    version = _version(out.stdout)
    if version[:2] < MIN_GO:
        found = out.stdout.strip() or "unknown version"
        raise BuildError(f"Go {found} is too old: go:wasmexport needs Go >= 1.24; {INSTALL_GO}")
    return Toolchain("go", exe, version)


def find_tinygo() -> Toolchain:
    exe = shutil.which("tinygo")
    if exe is None:
        raise BuildError(f"TinyGo was asked for (--tinygo) but is not installed: {INSTALL_TINYGO}")
    try:
        out = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{exe} does not work ({type(e).__name__}): {INSTALL_TINYGO}") from None
    return Toolchain("tinygo", exe, _version(out.stdout.replace("tinygo version", "")))


def go_command(tc: Toolchain, out: Path) -> tuple[list[str], dict[str, str]]:
    env = {"GOOS": "wasip1", "GOARCH": "wasm", "CGO_ENABLED": "0"}
    return [tc.exe, "build", "-trimpath", "-buildmode=c-shared", "-o", str(out), "."], env


def tinygo_command(tc: Toolchain, out: Path, gc: str = "", tags: tuple[str, ...] = ()) -> list[str]:
    cmd = [tc.exe, "build", "-o", str(out)]
    if tc.version[:2] >= (0, 34):
        cmd += ["-target=wasip1", "-buildmode=c-shared"]
    else:
        cmd += ["-target=wasi"]
    cmd += ["-scheduler=none"]
    all_tags = list(tags)
    if gc == "custom":
        all_tags = [*NOTTINYGC_TAGS, *[t for t in tags if t not in NOTTINYGC_TAGS]]
        cmd.append("-gc=custom")
    elif gc:
        if gc not in TINYGO_GCS:
            raise BuildError(f"--tinygo-gc: unknown collector {gc!r} (one of {', '.join(TINYGO_GCS)})")
        cmd.append(f"-gc={gc}")
    if all_tags:
        cmd.append("-tags=" + " ".join(all_tags))
    cmd.append(".")
    return cmd


def build(src: Path, out: Path | None = None, *, tinygo: bool = False, tinygo_gc: str = "",
          tags: tuple[str, ...] = (), verbose: bool = False) -> Path:
    """Build the Go main package in ``src``; returns the module path (default ``src/plugin.wasm``)."""
    src = src.resolve()
    if not src.is_dir():
        raise BuildError(f"{src}: not a directory")
    if not any(src.glob("*.go")):
        raise BuildError(f"{src}: no Go files (expected a Go main package with the plugin)")
    out = (out if out is not None else src / "plugin.wasm").resolve()
    if tinygo_gc and not tinygo:
        raise BuildError("--tinygo-gc needs --tinygo")
    env = dict(os.environ)
    if tinygo:
        tc = find_tinygo()
        cmd = tinygo_command(tc, out, tinygo_gc, tags)
    else:
        tc = find_go()
        cmd, extra = go_command(tc, out)
        if tags:
            cmd[2:2] = ["-tags=" + ",".join(tags)]
        env.update(extra)
    out.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print("+ " + " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True, check=False)
    except OSError as e:
        raise BuildError(f"cannot run {tc.exe}: {e.strerror}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise BuildError(f"{tc.kind} build of {src} failed (exit {proc.returncode}):\n{detail}")
    if not out.is_file() or out.read_bytes()[:4] != b"\0asm":
        raise BuildError(f"{tc.kind} build of {src} produced no WebAssembly module at {out}")
    return out
