"""Stream control: local replies, continue and close."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from wasmgate.abi.constants import StreamType, WasmResult, Word
from wasmgate.abi.pairs import PairsError, decode_pairs
from wasmgate.host.registry import hostcall
from wasmgate.plugin.context import HttpContext, LocalReply, NetworkContext

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult
_OK: Final = int(R.OK)  # a plain int: an Enum member lookup costs ~70 ns
_lower: Final = bytes.lower  # called unbound: no method lookup per header


def _http(vm: PluginVM) -> HttpContext | None:
    ctx = vm.effective
    return ctx if isinstance(ctx, HttpContext) and ctx.alive else None


@hostcall("iiiiiiii")
def proxy_send_local_response(vm: PluginVM, status: int, detp: Word, dets: Word, bodyp: Word, bodys: Word,
                              hp: Word, hs: Word, grpc_status: int) -> int:
    ctx = _http(vm)
    if ctx is None and isinstance(vm.effective, HttpContext):
        return R.BAD_ARGUMENT  # a stream that has ended
    details = vm.read(detp, dets)
    body = vm.read(bodyp, bodys)
    raw_headers = vm.read(hp, hs)
    if details is None or body is None or raw_headers is None:
        return R.INVALID_MEMORY_ACCESS
    if ctx is None:
        # Envoy: a root context or TCP connection has no HTTP reply to send; OK, nothing happens.
        return R.OK
    if raw_headers == vm.reply_raw:  # the plugin's last reply headers: decoded then
        headers = vm.reply_headers
    else:
        try:
            headers = [(_lower(k), v) for k, v in decode_pairs(raw_headers)]
        except PairsError:
            return R.BAD_ARGUMENT
        vm.reply_raw = raw_headers
        vm.reply_headers = headers
    if not 100 <= status <= 999:
        return R.BAD_ARGUMENT
    stream = ctx.stream
    if stream.local_reply is None:  # the first reply wins, as in Envoy
        stream.local_reply = LocalReply(status, body, headers, details.decode("utf-8", "replace"), grpc_status)
        hooks = stream.hooks
        if hooks is not None:
            hooks.on_end(ctx)
    return _OK


def _network(vm: PluginVM) -> NetworkContext | None:
    ctx = vm.effective
    return ctx if isinstance(ctx, NetworkContext) and ctx.alive else None


def _continue(vm: PluginVM, stream_type: int) -> int:
    net = _network(vm)
    if net is not None:
        return _continue_network(net, stream_type)
    ctx = _http(vm)
    if ctx is None or not 0 <= stream_type <= StreamType.UPSTREAM:
        return R.BAD_ARGUMENT
    if stream_type == StreamType.DOWNSTREAM:
        return R.OK  # Envoy accepts it; there is no TCP filter to continue
    if stream_type == StreamType.UPSTREAM:
        return R.UNIMPLEMENTED
    hooks = ctx.stream.hooks
    if hooks is not None:
        hooks.on_continue(ctx, stream_type)
    return R.OK  # Envoy returns OK even when nothing was stopped


def _continue_network(ctx: NetworkContext, stream_type: int) -> int:
    # Envoy: the request/response kinds do nothing on a connection; upstream has no continue.
    if stream_type == StreamType.DOWNSTREAM:
        if ctx.conn.on_continue is not None:
            ctx.conn.on_continue(ctx)
        return R.OK
    if stream_type == StreamType.UPSTREAM:
        return R.UNIMPLEMENTED
    return R.OK if 0 <= stream_type < StreamType.DOWNSTREAM else R.BAD_ARGUMENT


@hostcall("i")
def proxy_continue_stream(vm: PluginVM, stream_type: int) -> int:
    return _continue(vm, stream_type)


@hostcall("")
def proxy_continue_request(vm: PluginVM) -> int:  # ABI 0.1.0
    return _continue(vm, StreamType.REQUEST)


@hostcall("")
def proxy_continue_response(vm: PluginVM) -> int:  # ABI 0.1.0
    return _continue(vm, StreamType.RESPONSE)


def _close(vm: PluginVM, stream_type: int) -> int:
    net = _network(vm)
    if net is not None:
        if not 0 <= stream_type <= StreamType.UPSTREAM:
            return R.BAD_ARGUMENT
        # Either side closes the client connection (Envoy's read and write filter
        # callbacks share it); tcp_proxy then closes the upstream one.
        if stream_type >= StreamType.DOWNSTREAM and net.conn.on_close is not None:
            net.conn.on_close(net, stream_type)
        return R.OK
    ctx = _http(vm)
    if ctx is None or not 0 <= stream_type <= StreamType.UPSTREAM:
        return R.BAD_ARGUMENT
    if stream_type >= StreamType.DOWNSTREAM:
        return R.OK  # Envoy: an HTTP filter has no connection of its own to close
    ctx.stream.reset = True  # Envoy resets the stream; on HTTP/1.1 that closes the connection
    hooks = ctx.stream.hooks
    if hooks is not None:
        hooks.on_end(ctx)
    return R.OK


@hostcall("i")
def proxy_close_stream(vm: PluginVM, stream_type: int) -> int:
    return _close(vm, stream_type)


@hostcall("")
def proxy_clear_route_cache(vm: PluginVM) -> int:  # ABI 0.1.0; one route, nothing cached
    return R.OK
