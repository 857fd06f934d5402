"""The hot-path modules setup.py compiles with mypyc, and the way back to their source.

The .py files are the source of truth and the fallback: without a C compiler (or with
WASMGATE_PURE_PYTHON=1 at build time) they are installed as they are, and
WASMGATE_PURE_PYTHON=1 at run time imports them from source even where compiled (it
also selects the ctypes glue in engine/wasm.py). docs/performance.md has the numbers.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PURE_PYTHON_ENV = "WASMGATE_PURE_PYTHON"  # set (non-empty): no compiled code at all

# Only typed, self-contained modules of the request path; no module here may be
# monkeypatched or subclassed from interpreted code (mypyc binds calls between them).
# One trap: mypy keeps an attribute narrowed across calls that may change it
# (`x.a = None; f(); x.a or y` is typed None), and mypyc checks that type at run time:
# read such an attribute through a method (HttpConnection._is_active).
MODULES = (
    "wasmgate.abi.pairs",
    "wasmgate.headers",
    "wasmgate.proxy.http",
    "wasmgate.proxy.batch",
    "wasmgate.proxy.server",
    "wasmgate.proxy.exchange",
    "wasmgate.proxy.upstream",
    "wasmgate.plugin.context",
    "wasmgate.plugin.chain",
    "wasmgate.plugin.filter",
    "wasmgate.plugin.vm",
    "wasmgate.host.headers",
    "wasmgate.host.general",
    "wasmgate.host.stream",
)


class Referable:
    """A base for a compiled class that must support weak references: mypyc gives one
    only to classes with an interpreted base (this module is never compiled)."""


def pure_python() -> bool:
    return bool(os.environ.get(PURE_PYTHON_ENV))


def is_compiled(module: ModuleType) -> bool:
    return not (module.__file__ or "").endswith(".py")


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Finds the .py of a compiled module, so the extension beside it is not used."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MODULES:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or sys.path:
            source = Path(entry) / leaf
            if source.is_file():
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def stale() -> list[str]:
    """Compiled modules whose .py changed after they were built: mypyc binds the compiled
    modules to one another, so then none of them may run (an edit would be ignored)."""
    root = Path(__file__).resolve().parents[1]
    out = []
    for name in MODULES:
        source = root.joinpath(*name.split(".")).with_suffix(".py")
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            ext = source.with_name(source.stem + suffix)
            if ext.exists():
                if ext.stat().st_mtime < source.stat().st_mtime:
                    out.append(name)
                break
    return out


def use_source_if_asked() -> None:
    """Import the compiled modules from source under WASMGATE_PURE_PYTHON=1, or when a
    build is older than its source (with a warning: ``make setup`` rebuilds)."""
    if any(isinstance(f, _SourceFirst) for f in sys.meta_path):
        return
    if not pure_python():
        old = stale()
        if not old:
            return
        print(f"wasmgate: compiled modules older than their source ({', '.join(old)}): running all of them "
              "from source; `make setup` rebuilds them", file=sys.stderr)
    sys.meta_path.insert(0, _SourceFirst())
