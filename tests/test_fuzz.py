"""Property-based fuzzing (hypothesis) of the HTTP parsing path and host-function arguments."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from servers import ALLOW_HEADER_YAML, ProxyThread, Upstream
from test_e2e import request
from wasmgate.headers import HeaderMap
from wasmgate.plugin.context import Stream
from wat_util import ENV, HOST_IMPORTS, Guest


@pytest.fixture(scope="module")
def proxy(upstream: Upstream) -> Iterator[ProxyThread]:
    from wasmgate.proxy.server import Limits

    p = ProxyThread([ALLOW_HEADER_YAML], upstream.url, limits=Limits(header_timeout=0.3, request_timeout=0.5))
    errors: list[object] = []
    p.loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    p.loop_errors = errors  # type: ignore[attr-defined]
    yield p
    p.stop()


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


_TOKENS = [b"GET", b"POST", b"HEAD", b" ", b"/", b"/a?b=c", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"\r\n",
           b"\n", b":", b"host: x", b"allow: true", b"content-length: ", b"transfer-encoding: chunked",
           b"0", b"5", b"ff", b"-1", b"99999999999999999999", b"hello", b"\x00", b"\xff", b"connection: close",
           b"expect: 100-continue", b"upgrade: websocket", b"connection: upgrade", b"\t", b";ext=1"]

http_ish = st.lists(st.sampled_from(_TOKENS), max_size=40).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(http_ish, st.binary(max_size=300)))
def test_http_parser_never_breaks_the_proxy(proxy: ProxyThread, data: bytes) -> None:
    out = exchange(proxy.port, data)
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:80]
        status = int(out[9:12])
        assert status in (200, 400, 403, 408, 413, 431, 503), out[:80]
    assert proxy.loop_errors == []  # type: ignore[attr-defined]


def test_proxy_still_serves_after_fuzzing(proxy: ProxyThread) -> None:
    assert request(proxy.port, headers={"allow": "true"})[0] == 200
    assert request(proxy.port)[0] == 403


_u32 = st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0x10000, 0x1000]),
                 st.integers(0, 0xFFFFFFFF))
_imports = [i for i in HOST_IMPORTS if i[1] != "proc_exit"]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    g = Guest.new(tmp_path_factory.mktemp("fuzz"))
    yield g
    g.vm.shutdown()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(0, len(_imports) - 1), args=st.lists(_u32, min_size=12, max_size=12),
       context=st.sampled_from(["root", "http", "logging"]))
def test_host_functions_answer_any_arguments(guest: Guest, index: int, args: list[int], context: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    module, name, params, _ = _imports[index]
    if context == "root":
        guest.vm.effective = guest.vm.root
    else:
        s = Stream()
        s.request_headers = HeaderMap([(b":path", b"/"), (b"a", b"b")])
        s.request_body = bytearray(b"body")
        guest.http(s, logging=context == "logging")
    with caplog.at_level(logging.CRITICAL):
        status = guest.call(name, *[a if p == "i" else a * 7 for a, p in zip(args, params, strict=False)])
    assert 0 <= status <= (12 if module == ENV else 76), (name, args, status)
    assert guest.vm.failed is None  # a status, never a trap
