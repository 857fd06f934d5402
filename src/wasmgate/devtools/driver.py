"""Drive one plugin's phases in-process, with the proxy's own machinery.

A ``PluginDriver`` loads a module as the proxy does (compile, instantiate, vm_start,
configure) into a ``PluginHandle``; ``run`` sends one request through a request
``Direction`` holding that plugin's ``PluginFilter``, then a response (the upstream's,
or the plugin's local reply) through the response ``Direction``, then ``on_log``,
``on_done`` and ``on_delete``. Nothing about filter iteration is re-implemented here:
only the two ends of the chain (what the upstream and the client receive) are recorded.

HTTP callouts (proxy_http_call) never leave the process: ``_CannedCallouts`` takes the
place of the proxy's ``Callouts``, records each call, and answers it from the run's
``Reply`` list, in order, once the callback that made it has returned (Envoy never
delivers inside the call), through ``PluginVM.deliver_http_call_response``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasmgate.abi.constants import Action
from wasmgate.headers import HeaderMap
from wasmgate.host import metrics as host_metrics
from wasmgate.log import wasm_log
from wasmgate.plugin.chain import Direction, FilterCallbacks, Flow
from wasmgate.plugin.context import Context, HttpContext, LocalReply, Stream, StreamHooks
from wasmgate.plugin.filter import PluginFilter
from wasmgate.plugin.manager import PluginHandle, compile_spec, engine
from wasmgate.plugin.metrics import MetricStore, VmMetrics
from wasmgate.plugin.spec import FailStrategy, PluginLimits, PluginSpec
from wasmgate.plugin.vm import PluginError, PluginStats, PluginVM
from wasmgate.proxy import http
from wasmgate.proxy.callout import Callouts, CallResponse, failure_response
from wasmgate.proxy.exchange import _local_reply_headers
from wasmgate.proxy.upstream import Cluster

ACTION_NAMES = {int(Action.CONTINUE): "continue", int(Action.PAUSE): "pause",
                int(Action.STOP_AND_WATERMARK): "stop_and_watermark", int(Action.STOP_NO_BUFFER): "stop_no_buffer"}
PHASES = ("request_headers", "request_body", "request_trailers",
          "response_headers", "response_body", "response_trailers")

Pairs = list[tuple[str, str]]


def action_name(action: int) -> str:
    return ACTION_NAMES.get(int(action), str(int(action)))


def config_bytes(config: object) -> bytes:
    """A plugin configuration as the host hands it over: text as is, anything else as JSON."""
    if config is None:
        return b""
    if isinstance(config, bytes):
        return config
    if isinstance(config, str):
        return config.encode()
    return json.dumps(config, separators=(",", ":")).encode()


def _pairs(headers: HeaderMap | None) -> Pairs:
    if headers is None:
        return []
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


@dataclass
class Reply:
    """A canned answer to one HTTP callout to ``cluster``; ``fail`` ("reset", "timeout"): the call
    fails, and the plugin gets what Envoy's async client makes of that: 503 (504 for a timeout)."""

    cluster: str
    status: int = 200
    headers: Pairs = field(default_factory=list)
    body: bytes = b""
    trailers: Pairs = field(default_factory=list)
    fail: str | None = None

    def response(self) -> CallResponse:
        if self.fail is not None:
            return failure_response("timeout" if self.fail == "timeout" else "connection termination")
        return CallResponse(http.response_map(self.status, [(k.encode("latin-1"), v.encode("latin-1"))
                                                            for k, v in self.headers]),
                            self.body, HeaderMap((k.encode("latin-1"), v.encode("latin-1"))
                                                 for k, v in self.trailers))


@dataclass
class Callout:
    """One HTTP callout the plugin made, and how it was answered."""

    cluster: str
    headers: Pairs  # including :method, :path, :authority
    body: bytes
    trailers: Pairs
    timeout: float  # seconds
    reply: Reply | None = None  # None: more calls than canned replies (answered as a failure)

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    @property
    def method(self) -> str:
        return self.header(":method") or ""

    @property
    def path(self) -> str:
        return self.header(":path") or ""


class _Pending:
    def __init__(self, token: int, ctx: Context, reply: Reply | None):
        self.token, self.ctx, self.reply = token, ctx, reply
        self.cancelled = False

    def cancel(self) -> None:  # the calling context went away (PluginVM._cancel_calls)
        self.cancelled = True


class _CannedCallouts(Callouts):
    """``Callouts`` that answer from canned replies instead of sending anything."""

    def __init__(self, replies: Iterable[Reply]):
        self.replies = list(replies)
        # The host checks a called cluster exists; these never connect anywhere.
        super().__init__({r.cluster: Cluster(r.cluster, "http://127.0.0.1:9") for r in self.replies})
        self.calls: list[Callout] = []
        self.queue: list[_Pending] = []

    def start(self, vm: PluginVM, ctx: Context, cluster: str, headers: HeaderMap, body: bytes,
              trailers: HeaderMap, timeout: float) -> int:
        token = vm.next_call_token()
        reply = self.replies[len(self.calls)] if len(self.calls) < len(self.replies) else None
        self.calls.append(Callout(cluster, _pairs(headers), body, _pairs(trailers), timeout, reply))
        pending = _Pending(token, ctx, reply)
        vm.pending_calls[token] = pending
        self.queue.append(pending)
        return token

    def deliver(self, vm: PluginVM) -> None:
        """Answer every call made so far (and those the answers make)."""
        while self.queue:
            p = self.queue.pop(0)
            vm.pending_calls.pop(p.token, None)
            if not p.cancelled:
                vm.deliver_http_call_response(p.ctx, p.token, p.reply.response() if p.reply
                                              else failure_response("connection termination"))


@dataclass
class Outcome:
    """What one request did, as a test can see it."""

    actions: dict[str, list[str]] = field(default_factory=dict)  # phase -> each call's action
    local_reply: LocalReply | None = None  # the plugin answered itself
    reached_upstream: bool = False  # the request headers got past the plugin
    upstream_headers: Pairs = field(default_factory=list)  # as the upstream received them
    upstream_body: bytes = b""
    upstream_complete: bool = False  # the whole request got past the plugin
    status: int = 0  # what the client received
    headers: Pairs = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the client got a whole response (False: the plugin holds it)
    reset: bool = False  # the plugin reset the stream
    logs: list[str] = field(default_factory=list)  # "level message" per plugin log line
    metrics: dict[str, int] = field(default_factory=dict)  # counters and gauges by name
    failed: str | None = None  # the VM trapped
    callouts: list[Callout] = field(default_factory=list)  # HTTP callouts, in order

    def action(self, phase: str) -> str | None:
        calls = self.actions.get(phase)
        return calls[-1] if calls else None

    def header(self, name: str, *, upstream: bool = False) -> str | None:
        name = name.lower()
        for k, v in self.upstream_headers if upstream else self.headers:
            if k == name:
                return v
        return None


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=1)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("wasm log "):
            msg = msg.split(": ", 1)[1] if ": " in msg else msg
        self.lines.append(f"{record.levelname.lower()} {msg}")


@contextmanager
def _capture(level: int) -> Iterator[_LogCapture]:
    handler = _LogCapture()
    old = wasm_log.level
    wasm_log.setLevel(level)
    wasm_log.addHandler(handler)
    try:
        yield handler
    finally:
        wasm_log.removeHandler(handler)
        wasm_log.setLevel(old)


class _Recorder(FilterCallbacks):
    """A filter side whose every callback result is recorded by phase."""

    def __init__(self, side: FilterCallbacks, prefix: str, actions: dict[str, list[str]]):
        self.side = side
        self.prefix = prefix
        self.actions = actions
        self.seconds: dict[str, list[float]] | None = None  # per-call latency, when benchmarking

    def _note(self, phase: str, action: int, t0: float) -> int:
        if self.seconds is not None:
            self.seconds.setdefault(phase, []).append(time.perf_counter() - t0)
        self.actions.setdefault(phase, []).append(action_name(action))
        return action

    @property
    def buffer_limit(self) -> int:
        return self.side.buffer_limit

    def headers(self, count: int, eos: bool) -> int:
        t0 = time.perf_counter()
        return self._note(self.prefix + "_headers", self.side.headers(count, eos), t0)

    def data(self, body: bytearray, eos: bool) -> int:
        t0 = time.perf_counter()
        return self._note(self.prefix + "_body", self.side.data(body, eos), t0)

    def trailers(self, count: int) -> int:
        t0 = time.perf_counter()
        return self._note(self.prefix + "_trailers", self.side.trailers(count), t0)


class _Sink(Flow):
    """One end of the chain: records what passes it."""

    def __init__(self, stream: Stream, request: bool):
        self.stream = stream
        self.request = request
        self.headers_seen: HeaderMap | None = None
        self.body = bytearray()
        self.complete = False

    def headers(self, eos: bool) -> bool:
        h = self.stream.request_headers if self.request else self.stream.response_headers
        self.headers_seen = HeaderMap(list(h or ()))
        self.complete = eos
        return False  # (a sink never ends the stream)

    def data(self, body: bytes, eos: bool) -> bool:
        self.body += body
        self.complete = self.complete or eos
        return False

    def trailers(self) -> bool:
        self.complete = True
        return False


@dataclass
class Request:
    method: str = "GET"
    path: str = "/"
    authority: str = "example.com"
    headers: Pairs = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)  # chunks; empty: no body


@dataclass
class Response:
    status: int = 200
    headers: Pairs = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)


class PluginDriver:
    """One plugin, loaded as the proxy loads it, driven one request at a time.

    Metrics go to a store of this driver's own, so values are those of its requests only.
    """

    def __init__(self, wasm: str | Path, config: object = None, *, name: str = "plugin", root_id: str = "",
                 vm_config: object = None, env: dict[str, str] | None = None,
                 fail_strategy: str = "FAIL_CLOSE", log_level: int = logging.DEBUG,
                 limits: PluginLimits | None = None):
        self.spec = PluginSpec(name, Path(wasm).resolve(), root_id=root_id, plugin_config=config_bytes(config),
                               vm_config=config_bytes(vm_config), env=dict(env or {}),
                               fail_strategy=FailStrategy(fail_strategy), limits=limits or PluginLimits())
        self.log_level = log_level
        self.store = MetricStore()
        self.start_logs: list[str] = []
        with _capture(log_level) as cap:
            try:
                module = compile_spec(self.spec)
                vm = PluginVM(self.spec, engine(), module.compiled, PluginStats())
                host_metrics._by_vm[vm.shared] = VmMetrics(self.store)  # this driver's metrics only
                vm.start()
            finally:
                self.start_logs = cap.lines
        self.handle = PluginHandle(self.spec, module, vm)

    @property
    def vm(self) -> PluginVM:
        vm = self.handle.vm
        assert vm is not None
        return vm

    def memory_bytes(self) -> int:
        return self.vm.memory_bytes()

    def metrics(self) -> dict[str, int]:
        snap = self.store.snapshot()
        out = {k.decode(errors="replace").removeprefix("wasmcustom."): v for k, v in snap["counters"].items()}
        out.update({k.decode(errors="replace").removeprefix("wasmcustom."): v for k, v in snap["gauges"].items()})
        return out

    def close(self) -> None:
        self.handle.replaced()

    def __enter__(self) -> PluginDriver:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def run(self, request: Request | None = None, response: Response | None = None,
            seconds: dict[str, list[float]] | None = None, replies: Iterable[Reply] = ()) -> Outcome:
        """One request through the plugin; ``response`` is what the upstream answers, ``replies``
        what its HTTP callouts get, in order (clusters not named there do not exist)."""
        request = request or Request()
        response = response or Response()
        canned = _CannedCallouts(replies)
        old, self.vm.callouts = self.vm.callouts, canned
        try:
            with _capture(self.log_level) as cap:
                out = self._run(request, response, seconds, canned)
        finally:
            self.vm.callouts = old
        out.callouts = canned.calls
        out.logs = cap.lines
        out.metrics = self.metrics()
        out.failed = self.vm.failed
        return out

    def _run(self, request: Request, response: Response, seconds: dict[str, list[float]] | None,
             canned: _CannedCallouts) -> Outcome:
        out = Outcome()
        stream = Stream()
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
        if not any(k.lower() == b"host" for k, _ in raw):
            raw.insert(0, (b"host", request.authority.encode()))
        req = http.request_map(request.method.encode(), request.path.encode(), raw)
        # What Envoy's connection manager adds before filters run, as Exchange does.
        if req.get(b"x-forwarded-proto") is None:
            req.add(b"x-forwarded-proto", b"http")
        if req.get(b"x-request-id") is None:
            req.add(b"x-request-id", b"00000000-0000-4000-8000-000000000000")
        stream.request_headers = req
        stream.downstream_addr = ("127.0.0.1", 40000)
        stream.local_addr = ("127.0.0.1", 8080)
        stream.start_ns = time.time_ns()
        f = PluginFilter(self.handle, stream)

        def ended() -> bool:
            return stream.local_reply is not None or stream.reset

        req_rec = _Recorder(f.request, "request", out.actions)
        resp_rec = _Recorder(f.response, "response", out.actions)
        req_rec.seconds = resp_rec.seconds = seconds
        up = _Sink(stream, True)
        down = _Sink(stream, False)
        req_dir = Direction([req_rec], up, stream, True)
        resp_dir = Direction([resp_rec], down, stream, False)
        class Hooks(StreamHooks):
            def on_continue(self, ctx: HttpContext, stream_type: int) -> None:
                d = req_dir if stream_type == 0 else resp_dir
                d.continue_from(0)

        def settle(step_ended: bool) -> None:  # after each step: answer the callouts it made
            if step_ended:
                raise _Ended
            canned.deliver(self.vm)
            if ended():
                raise _Ended

        stream.hooks = Hooks()
        with contextlib.suppress(_Ended):  # a local reply or reset: handled below
            _feed(req_dir, request.body, settle)
        out.reached_upstream = up.headers_seen is not None
        out.upstream_headers = _pairs(up.headers_seen)
        out.upstream_body = bytes(up.body)
        out.upstream_complete = up.complete
        if stream.reset:
            out.reset = True
        elif stream.local_reply is not None:
            out.local_reply = reply = stream.local_reply
            # Envoy: the local reply goes back through the sender's response callbacks.
            self._reply_through(stream, resp_dir, reply, down, settle)
        elif up.complete:
            stream.response_headers = http.response_map(
                response.status, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers])
            try:
                _feed(resp_dir, response.body, settle)
            except _Ended:
                if stream.reset:
                    out.reset = True
                elif stream.local_reply is not None:
                    out.local_reply = stream.local_reply
                    _write(stream, down, stream.local_reply)
        if down.headers_seen is not None:
            out.status = int(down.headers_seen.get(b":status") or b"0")
            out.headers = _pairs(down.headers_seen)
        out.body = bytes(down.body)
        out.complete = down.complete
        stream.hooks = None
        f.log()
        f.finish()
        return out

    @staticmethod
    def _reply_through(stream: Stream, resp_dir: Direction, reply: LocalReply, down: _Sink,
                       settle: Callable[[bool], None]) -> None:
        stream.response_headers = _local_reply_headers(reply)
        stream.code_details = reply.details
        stream.local_reply = None
        try:
            settle(resp_dir.headers(not reply.body))
            if reply.body:
                settle(resp_dir.data(reply.body, True))
        except _Ended:
            _write(stream, down, stream.local_reply or reply)


class _Ended(Exception):
    """The stream ended in a callback (a local reply or a reset)."""


def _feed(d: Direction, body: Iterable[bytes], settle: Callable[[bool], None]) -> None:
    chunks = list(body)
    settle(d.headers(not chunks))
    for i, chunk in enumerate(chunks):
        settle(d.data(chunk, i == len(chunks) - 1))


def _write(stream: Stream, down: _Sink, reply: LocalReply) -> None:
    """A local reply sent while the response was under way replaces it, without callbacks."""
    stream.response_headers = _local_reply_headers(reply)
    down.body = bytearray()
    down.headers(not reply.body)
    if reply.body:
        down.data(reply.body, True)


def load(wasm: str | Path, config: object = None, **kw: Any) -> PluginDriver:
    """Load a plugin for driving; raises ``PluginError`` if it does not start."""
    return PluginDriver(wasm, config, **kw)


__all__ = ["Callout", "Outcome", "PluginDriver", "PluginError", "Reply", "Request", "Response", "load"]
