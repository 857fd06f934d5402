"""proxy_call_foreign_function with Envoy's foreign functions, and proxy_on_foreign_function."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.abi.constants import BufferType, WasmResult
from wasmgate.plugin.context import HttpContext, Stream
from wat_util import OOB, RP, RS, Guest

R = WasmResult


@pytest.fixture
def g(tmp_path: Path) -> Iterator[Guest]:
    guest = Guest.new(tmp_path)
    yield guest
    guest.vm.shutdown()


@pytest.fixture
def ctx(g: Guest) -> HttpContext:
    return g.http(Stream())


def ff(g: Guest, name: bytes, arg: bytes) -> tuple[int, bytes | None]:
    np, ns = g.put_str(name)
    ap, asz = g.put_str(arg) if arg else (0, 0)
    g.poison(RP, RS)
    status = g.call("proxy_call_foreign_function", np, ns, ap, asz, RP, RS)
    return status, (g.out() if status == R.OK else None)


def proto(*fields: tuple[int, bytes | int]) -> bytes:
    out = b""
    for num, value in fields:
        if isinstance(value, int):
            out += bytes([num << 3]) + bytes([value])
        else:
            out += bytes([num << 3 | 2, len(value)]) + value
    return out


def test_compress_round_trip(g: Guest) -> None:
    data = b"hello hello hello hello " * 10
    status, packed = ff(g, b"compress", data)
    assert status == R.OK and packed is not None
    assert zlib.decompress(packed) == data
    assert ff(g, b"uncompress", packed) == (R.OK, data)


def test_uncompress_garbage(g: Guest) -> None:
    assert ff(g, b"uncompress", b"not zlib") == (R.SERIALIZATION_FAILURE, None)


def test_unknown_function(g: Guest) -> None:
    assert ff(g, b"no_such_function", b"") == (R.NOT_FOUND, None)


def test_set_envoy_filter_state(g: Guest, ctx: HttpContext) -> None:
    assert ff(g, b"set_envoy_filter_state", proto((1, b"my.state"), (2, b"value"), (3, 1))) == (R.OK, b"")
    assert ctx.stream.filter_state[b"my.state"] == b"value"
    assert ff(g, b"set_envoy_filter_state", b"\xff\xff") == (R.BAD_ARGUMENT, None)
    g.vm.effective = g.vm.root
    assert ff(g, b"set_envoy_filter_state", proto((1, b"x"), (2, b"y")))[0] == R.NOT_FOUND


def test_declare_property_once(g: Guest) -> None:
    arg = proto((1, b"my_prop"), (2, 1))  # name, readonly
    assert ff(g, b"declare_property", arg) == (R.OK, b"")
    assert ff(g, b"declare_property", arg) == (R.BAD_ARGUMENT, None)
    assert ff(g, b"declare_property", b"\xff\xff") == (R.BAD_ARGUMENT, None)


def test_declared_read_only_property_is_set_once(g: Guest, ctx: HttpContext) -> None:
    assert ff(g, b"declare_property", proto((1, b"ro"), (2, 1), (3, 1))) == (R.OK, b"")  # read-only string
    for value, status in ((b"v1", R.OK), (b"v2", R.BAD_ARGUMENT)):
        pp, ps = g.put_str(b"ro")
        vp, vs = g.put_str(value)
        assert g.call("proxy_set_property", pp, ps, vp, vs) == status
    assert ctx.stream.filter_state[b"wasm.ro"] == b"v1"


def test_clear_route_cache(g: Guest) -> None:
    assert ff(g, b"clear_route_cache", b"") == (R.OK, b"")


def test_bad_pointers(g: Guest) -> None:
    assert g.call("proxy_call_foreign_function", OOB, 8, 0, 0, RP, RS) == R.INVALID_MEMORY_ACCESS
    np, ns = g.put_str(b"compress")
    assert g.call("proxy_call_foreign_function", np, ns, OOB, 8, RP, RS) == R.INVALID_MEMORY_ACCESS
    ap, asz = g.put_str(b"data")
    assert g.call("proxy_call_foreign_function", np, ns, ap, asz, OOB, RS) == R.INVALID_MEMORY_ACCESS


def test_call_data_buffer_only_during_on_foreign_function(g: Guest) -> None:
    g.vm.effective = g.vm.root
    g.poison(RP, RS)
    assert g.call("proxy_get_buffer_bytes", BufferType.CALL_DATA, 0, 10, RP, RS) == R.NOT_FOUND
    assert g.vm.on_foreign_function(7, b"payload") is False  # the test module has no such export
    assert g.vm.call_data is None


ON_FOREIGN = """
(module
  (import "env" "proxy_get_buffer_bytes" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    (global.get $heap) (global.set $heap (i32.add (global.get $heap) (local.get 0))))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_foreign_function") (param $root i32) (param $id i32) (param $size i32)
    (i32.store (i32.const 100) (local.get $id))
    (i32.store (i32.const 104) (call $get (i32.const 8) (i32.const 0) (local.get $size) (i32.const 16)
                                          (i32.const 20))))
)
"""


def test_on_foreign_function_reads_call_data(tmp_path: Path) -> None:
    g = Guest.new(tmp_path, ON_FOREIGN)
    assert g.vm.on_foreign_function(7, b"payload") is True
    assert g.u32(100) == 7
    assert g.u32(104) == R.OK
    assert g.mem(g.u32(16), g.u32(20)) == b"payload"


# ---- CEL (expr_create / expr_evaluate / expr_delete) -------------------------------------------

def _create(g: Guest, expr: bytes) -> tuple[int, bytes | None]:
    return ff(g, b"expr_create", expr)


def test_cel_create_evaluate_delete(g: Guest, ctx: HttpContext) -> None:
    from wasmgate.headers import HeaderMap

    ctx.stream.request_headers = HeaderMap([(b":path", b"/x"), (b":method", b"GET")])
    ctx.open_maps = 1  # the request headers are readable
    assert _create(g, b"request.path + '!'") == (R.OK, b"\x00\x00\x00\x00")  # tokens count from 0
    assert _create(g, b"1u + 2u") == (R.OK, b"\x01\x00\x00\x00")
    assert _create(g, b"request.nope") == (R.OK, b"\x02\x00\x00\x00")
    assert _create(g, b"duration('1.000000001s')") == (R.OK, b"\x03\x00\x00\x00")
    assert _create(g, b"bad ((") == (R.BAD_ARGUMENT, None)
    assert ff(g, b"expr_evaluate", b"\x00\x00\x00\x00") == (R.OK, b"/x!")
    assert ff(g, b"expr_evaluate", b"\x01\x00\x00\x00") == (R.OK, (3).to_bytes(8, "little"))
    assert ff(g, b"expr_evaluate", b"\x02\x00\x00\x00") == (R.INTERNAL_FAILURE, None)  # no such attribute
    assert ff(g, b"expr_evaluate", b"\x03\x00\x00\x00") == (R.OK, (1_000_000_001).to_bytes(8, "little"))
    assert ff(g, b"expr_evaluate", b"\x00\x00") == (R.BAD_ARGUMENT, None)
    assert ff(g, b"expr_evaluate", b"\x09\x00\x00\x00") == (R.NOT_FOUND, None)
    assert ff(g, b"expr_delete", b"\x00\x00\x00\x00") == (R.OK, b"")
    assert ff(g, b"expr_evaluate", b"\x00\x00\x00\x00") == (R.NOT_FOUND, None)
    assert ff(g, b"expr_delete", b"\x00") == (R.BAD_ARGUMENT, None)


def test_cel_sees_plugin_properties(g: Guest, ctx: HttpContext) -> None:
    pp, ps = g.put_str(b"my_prop")
    vp, vs = g.put_str(b"\x00raw")
    assert g.call("proxy_set_property", pp, ps, vp, vs) == R.OK
    assert _create(g, b"my_prop") == (R.OK, b"\x00\x00\x00\x00")
    assert ff(g, b"expr_evaluate", b"\x00\x00\x00\x00") == (R.OK, b"\x00raw")  # bytes, NUL and all


# ---- sign / verify_signature ------------------------------------------------------------------

def _rsa() -> tuple[bytes, bytes]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _long(num: int, value: bytes) -> bytes:
    n = len(value)
    return bytes([num << 3 | 2, n & 0x7F | 0x80, n >> 7]) + value if n >= 128 else proto((num, value))


def test_sign_then_verify(g: Guest) -> None:
    priv, pub = _rsa()
    status, result = ff(g, b"sign", proto((1, b"sha256"), (3, b"text")) + _long(4, priv))
    assert status == R.OK and result is not None and result[:2] == b"\x08\x01"  # SignResult.result = true
    signature = result[5:]  # field 2: tag, two length bytes (128), then the signature
    assert result[2] == 0x12 and len(signature) == 128
    ok = ff(g, b"verify_signature", proto((1, b"sha256"), (4, b"text")) + _long(3, signature) + _long(5, pub))
    assert ok == (R.OK, b"\x08\x01")
    bad = ff(g, b"verify_signature", proto((1, b"sha256"), (4, b"other")) + _long(3, signature) + _long(5, pub))
    assert bad == (R.OK, b"\x12\x26Failed to verify digest. Error code: 0")
    assert ff(g, b"sign", proto((1, b"sha256"), (3, b"text"))) == (R.BAD_ARGUMENT, None)  # no key
    assert ff(g, b"sign", proto((1, b"md5"), (3, b"t")) + _long(4, priv)) == (R.OK, b"\x1a\x15md5 is not supported.")
