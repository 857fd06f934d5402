"""gRPC callouts end to end: the Go plugin tests/plugins/grpccall in wasmgate, a real gRPC
server (tests/grpc_server.py) and an HTTP upstream. The plugin pauses the request, calls or
streams, and on the answer adds what it got to the request (or answers 503 on an error);
x-grpc-trace lists every step with the statuses the host returned.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from grpc_server import GrpcServer
from servers import PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml
from test_e2e import request

WASM = PLUGIN_BUILD / "grpccall.wasm"


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[GrpcServer]:
    s = GrpcServer()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = start_upstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def proxy(upstream: Upstream, grpc_server: GrpcServer,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyThread]:
    d = tmp_path_factory.mktemp("grpccall")
    p = ProxyThread([wasmplugin_yaml(d, "grpccall", WASM)], upstream.url,
                    clusters={"grpc": f"http://127.0.0.1:{grpc_server.port}", "dead": "http://127.0.0.1:1"})
    yield p
    p.stop()


def forwarded(proxy: ProxyThread, upstream: Upstream, headers: dict[str, str]) -> dict[str, str]:
    """Send a request that reaches the upstream; the x-grpc-* headers it got there."""
    before = len(upstream.seen)
    status, _, body = request(proxy.port, headers=headers)
    assert status == 200, body
    seen = upstream.seen[before:]
    assert seen
    return {k: v for k, v in seen[-1].headers if k.startswith("x-grpc-") and k not in headers}


def test_unary_call_resumes_with_the_answer(proxy: ProxyThread, upstream: Upstream, grpc_server: GrpcServer) -> None:
    got = forwarded(proxy, upstream, {"x-grpc-call": "hello", "x-grpc-md": "from-plugin"})
    assert bytes.fromhex(got["x-grpc-response"]) == b"echo:hello"
    assert got["x-grpc-status"] == "0"
    assert got["x-grpc-trace"] == "call=0 kind=1 receive@root=echo:hello/0 status=0/"
    seen = grpc_server.calls("Echo")[-1]
    assert seen.messages == [b"hello"]  # the plugin's bytes, unchanged
    assert seen.metadata["x-md"] == "from-plugin"


def test_unary_call_as_grpc_service(proxy: ProxyThread, upstream: Upstream) -> None:
    got = forwarded(proxy, upstream, {"x-grpc-call": "proto", "x-grpc-proto": "1"})
    assert bytes.fromhex(got["x-grpc-response"]) == b"echo:proto"


@pytest.mark.parametrize(("method", "code", "message"), [
    ("Fail", 7, "no access for bob{via_upstream}"),
    ("Nope", 12, "Method not found!{via_upstream}"),
])
def test_unary_error_answers_503(proxy: ProxyThread, method: str, code: int, message: str) -> None:
    status, headers, body = request(proxy.port, headers={"x-grpc-call": "bob", "x-grpc-method": method})
    assert (status, body) == (503, f"grpc error {code}: {message}\n".encode())
    assert headers["x-grpc-status"] == str(code)
    assert headers["x-grpc-trace"] == f"call=0 kind=1 close@root={code} status={code}/{message}"


def test_unary_timeout(proxy: ProxyThread) -> None:
    t0 = time.monotonic()
    status, _, body = request(proxy.port, headers={"x-grpc-call": "x", "x-grpc-method": "Slow",
                                                   "x-grpc-timeout": "300"})
    assert time.monotonic() - t0 < 0.9
    assert (status, body) == (503, b"grpc error 14: upstream request timeout{response_timeout}\n")


def test_unreachable_cluster(proxy: ProxyThread) -> None:
    status, _, body = request(proxy.port, headers={"x-grpc-call": "x", "x-grpc-cluster": "dead"})
    assert status == 503
    assert body.startswith(b"grpc error 14: upstream connect error or disconnect/reset before headers.")


def test_unknown_cluster(proxy: ProxyThread) -> None:
    status, headers, body = request(proxy.port, headers={"x-grpc-call": "x", "x-grpc-cluster": "nope"})
    assert (status, body, headers["x-grpc-trace"]) == (500, b"grpc_call failed: 4\n", "call=4")


def test_stream(proxy: ProxyThread, upstream: Upstream, grpc_server: GrpcServer) -> None:
    got = forwarded(proxy, upstream, {"x-grpc-stream": "a,b,c"})
    assert bytes.fromhex(got["x-grpc-response"]) == b"echo:aecho:becho:c"
    assert got["x-grpc-trace"] == (
        "stream=0 kind=2 send=0 send=0 send=0 initial@root=1/0 receive@root=echo:a/0 receive@root=echo:b/0 "
        "receive@root=echo:c/0 halfclose=0 sendafter=0 trailing@root=2/0 close@root=0 status=0/via_upstream")
    assert grpc_server.calls("Bidi")[-1].messages == [b"a", b"b", b"c"]


def test_stream_metadata_maps(proxy: ProxyThread, upstream: Upstream) -> None:
    got = forwarded(proxy, upstream, {"x-grpc-stream": "a", "x-grpc-dump": "1"})
    trace = got["x-grpc-trace"]
    assert "initial-pairs=3::status=200;content-type=application/grpc;x-init=1 " in trace
    assert "trailing-pairs=3:grpc-status=0;grpc-message=;x-trail=2 " in trace


def test_stream_errors(proxy: ProxyThread) -> None:
    status, headers, body = request(proxy.port, headers={"x-grpc-stream": "a,b", "x-grpc-method": "BidiFail"})
    assert (status, body) == (503, b"grpc error 8: enough{via_upstream}\n")
    assert headers["x-grpc-trace"] == ("stream=0 kind=2 send=0 send=0 initial@root=/1 receive@root=echo:a/0 "
                                       "trailing@root=/1 close@root=8 status=8/enough{via_upstream}")
    status, headers, body = request(proxy.port, headers={"x-grpc-stream": "a", "x-grpc-method": "Nope",
                                                         "x-grpc-dump": "1"})
    assert status == 503
    assert headers["x-grpc-trace"] == (
        "stream=0 kind=2 send=0 initial@root=/1 initial-pairs=0: trailing@root=/1 trailing-pairs=4::status=200;"
        "content-type=application/grpc;grpc-status=12;grpc-message=Method not found! close@root=12 "
        "status=12/Method not found!{via_upstream}")


def test_stream_cancel(proxy: ProxyThread, upstream: Upstream) -> None:
    got = forwarded(proxy, upstream, {"x-grpc-stream": "a,b,c", "x-grpc-cancel": "1"})
    assert got["x-grpc-trace"].endswith("receive@root=echo:a/0 cancel=0 again=1")


def test_tokens_and_dropped_calls(proxy: ProxyThread, upstream: Upstream) -> None:
    trace = forwarded(proxy, upstream, {"x-grpc-op": "tokens"})["x-grpc-trace"]
    assert trace.split(" ")[1:] == ["close5=1", "cancel5=1", "close6=1", "cancel6=1", "send6=1", "send5=2",
                                    "close4=2", "cancel3=2", "send7=2",
                                    # outside the callbacks (as Envoy): buffer 5 empty, maps 4/5 unavailable
                                    "buffer5=0/0", "map4=2/", "map5=2/", "pairs4="]
    forwarded(proxy, upstream, {"x-grpc-op": "strays"})
    assert forwarded(proxy, upstream, {"x-grpc-op": "close-call"})["x-grpc-trace"] == \
        "call=0 kind=1 close=0 again=1"
    assert forwarded(proxy, upstream, {"x-grpc-op": "cancel-call"})["x-grpc-trace"] == \
        "call=0 kind=1 cancel=0 again=1"
    # A call the request did not wait for still answers, to the root context.
    assert forwarded(proxy, upstream, {"x-grpc-op": "call-only"})["x-grpc-trace"] == "call=0 kind=1"
    time.sleep(1.3)  # the dropped Slow calls would have answered by now
    assert forwarded(proxy, upstream, {"x-grpc-op": "strays"})["x-grpc-trace"] == "strays: receive:1"


def test_concurrent_calls(proxy: ProxyThread, upstream: Upstream) -> None:
    results: dict[str, tuple[int, bytes]] = {}

    def one(i: int) -> None:
        status, _, body = request(proxy.port, path=f"/c/{i}", headers={"x-grpc-call": f"m{i}"})
        results[f"/c/{i}"] = (status, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert all(s == 200 for s, _ in results.values()) and len(results) == 16
    seen = {s.path: s.header("x-grpc-response") for s in upstream.seen if s.path.startswith("/c/")}
    assert seen == {f"/c/{i}": f"echo:m{i}".encode().hex() for i in range(16)}
