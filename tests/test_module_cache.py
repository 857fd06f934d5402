"""The compiled-module cache: a known module is never compiled twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import wasmtime

from servers import PLUGIN_BUILD
from wasmgate.engine import wasm
from wasmgate.plugin.manager import engine


def test_known_module_loads_from_cache_without_compiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = (PLUGIN_BUILD / "tag.wasm").read_bytes()
    first = wasm.compile_module(engine(), data, "tag.wasm", tmp_path)
    (cached,) = tmp_path.iterdir()
    assert cached.name.startswith(hashlib.sha256(data).hexdigest())
    assert wasm.ENGINE_SETTINGS in cached.name and cached.suffix == ".cwasm"

    def no_compiling(*_: object) -> None:
        raise AssertionError("compiled again")

    monkeypatch.setattr(wasmtime.Module, "__init__", no_compiling)
    again = wasm.compile_module(engine(), data, "tag.wasm", tmp_path)
    assert [e.name for e in again.exports] == [e.name for e in first.exports]


def test_corrupt_cache_entry_is_recompiled(tmp_path: Path) -> None:
    data = (PLUGIN_BUILD / "tag.wasm").read_bytes()
    wasm.compile_module(engine(), data, "tag.wasm", tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(b"not native code")
    module = wasm.compile_module(engine(), data, "tag.wasm", tmp_path)
    assert "proxy_on_configure" in [e.name for e in module.exports]
    assert cached.stat().st_size > 1000  # rewritten
