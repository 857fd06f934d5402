"""docs/abi-support.md is checked against the code: every host function and callback is in it."""

from __future__ import annotations

import re
from pathlib import Path

from wasmgate.host import REGISTRY
from wasmgate.host.registry import ENV

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "abi-support.md").read_text()


def mentioned(name: str) -> bool:
    return f"`{name}`" in DOC or re.search(rf"`[^`]*\b{re.escape(name)}\b[^`]*`", DOC) is not None


def test_every_host_function_is_in_the_matrix() -> None:
    missing = sorted({name for (module, name) in REGISTRY if not mentioned(name)})
    assert missing == [], f"add these to docs/abi-support.md: {missing}"


def test_every_callback_is_in_the_matrix() -> None:
    source = (REPO / "src" / "wasmgate" / "plugin" / "vm.py").read_text()
    callbacks = set(re.findall(r'f\("(proxy_on_[a-z_]+)"\)', source))
    assert len(callbacks) > 15
    missing = sorted(c for c in callbacks if not mentioned(c))
    assert missing == [], f"add these to docs/abi-support.md: {missing}"


def test_matrix_names_only_real_functions() -> None:
    """A proxy_* name in the matrix that the host neither provides nor calls is a stale row."""
    source = (REPO / "src" / "wasmgate" / "plugin" / "vm.py").read_text()
    known = {name for (module, name) in REGISTRY if module == ENV} | set(re.findall(r'"(proxy_[a-z_0-9]+)"', source))
    known |= {"proxy_abi_version_0_1_0", "proxy_abi_version_0_2_0", "proxy_abi_version_0_2_1"}
    named = set(re.findall(r"\b(proxy_[a-z_0-9]+)\b", DOC))
    stale = sorted(n for n in named - known if not n.startswith("proxy_on_") and n != "proxy_abi_version_")
    assert stale == [], f"docs/abi-support.md names functions the host does not have: {stale}"
