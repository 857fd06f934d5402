"""proxy_http_call argument handling (the end-to-end flow is in test_callout.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.abi.constants import WasmResult
from wasmgate.proxy.callout import Callouts
from wasmgate.proxy.upstream import Cluster
from wat_util import OOB, RP, Guest, pairs_bytes

R = WasmResult
GOOD = [(b":method", b"GET"), (b":path", b"/x"), (b":authority", b"svc")]


@pytest.fixture
def g(tmp_path: Path) -> Iterator[Guest]:
    guest = Guest.new(tmp_path)
    guest.vm.callouts = Callouts({"svc": Cluster("svc", "http://127.0.0.1:9")})
    guest.vm.effective = guest.vm.root
    yield guest
    guest.vm.shutdown()


def call(g: Guest, cluster: bytes, headers: list[tuple[bytes, bytes]], *, token_ptr: int = RP) -> int:
    cp, cs = g.put_str(cluster)
    hp, hs = g.put_str(pairs_bytes(headers))
    return g.call("proxy_http_call", cp, cs, hp, hs, 0, 0, 0, 0, 1000, token_ptr)


def test_unknown_cluster_is_bad_argument(g: Guest) -> None:
    assert call(g, b"nope", GOOD) == R.BAD_ARGUMENT


@pytest.mark.parametrize("missing", [b":method", b":path", b":authority"])
def test_required_headers(g: Guest, missing: bytes) -> None:
    assert call(g, b"svc", [p for p in GOOD if p[0] != missing]) == R.BAD_ARGUMENT


def test_bad_pointers(g: Guest) -> None:
    assert g.call("proxy_http_call", OOB, 64, 0, 0, 0, 0, 0, 0, 1000, RP) == R.INVALID_MEMORY_ACCESS
    cp, cs = g.put_str(b"svc")
    assert g.call("proxy_http_call", cp, cs, OOB, 64, 0, 0, 0, 0, 1000, RP) == R.INVALID_MEMORY_ACCESS
    assert call(g, b"svc", GOOD, token_ptr=OOB) == R.INVALID_MEMORY_ACCESS
    assert g.vm.pending_calls == {}  # nothing was sent


def test_malformed_pairs(g: Guest) -> None:
    cp, cs = g.put_str(b"svc")
    hp, hs = g.put_str(b"\xff\xff\xff\x00garbage")
    assert g.call("proxy_http_call", cp, cs, hp, hs, 0, 0, 0, 0, 1000, RP) == R.BAD_ARGUMENT


def test_without_callouts_configured(g: Guest) -> None:
    g.vm.callouts = None
    assert call(g, b"svc", GOOD) == R.INTERNAL_FAILURE
