"""proxy_http_call: an HTTP request from a plugin to a named cluster."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wasmgate.abi.constants import WasmResult
from wasmgate.abi.pairs import PairsError, decode_pairs
from wasmgate.headers import HeaderMap
from wasmgate.host.registry import hostcall

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult


@hostcall("iiiiiiiiii")
def proxy_http_call(vm: PluginVM, up: int, ups: int, hp: int, hs: int, bp: int, bs: int, tp: int, ts: int,
                    timeout_ms: int, ret_token: int) -> int:
    inst = vm.instance
    cluster, raw_headers, body, raw_trailers = inst.read(up, ups), inst.read(hp, hs), inst.read(bp, bs), \
        inst.read(tp, ts)
    if cluster is None or raw_headers is None or body is None or raw_trailers is None:
        return R.INVALID_MEMORY_ACCESS
    try:
        headers = HeaderMap((k.lower(), v) for k, v in decode_pairs(raw_headers))
        trailers = HeaderMap((k.lower(), v) for k, v in decode_pairs(raw_trailers))
    except PairsError:
        return R.BAD_ARGUMENT
    callouts = vm.callouts
    name = cluster.decode("utf-8", "replace")
    if callouts is None or vm.effective is None:
        return R.INTERNAL_FAILURE
    if name not in callouts.clusters:
        return R.BAD_ARGUMENT  # Envoy: no such cluster
    # Envoy requires these three; Host is :authority.
    if any(headers.get(k) is None for k in (b":method", b":path", b":authority")):
        return R.BAD_ARGUMENT
    if not inst.write_u32(ret_token, 0):
        return R.INVALID_MEMORY_ACCESS
    # As in Envoy, the call belongs to the root context, whichever context made it: the
    # answer comes to the root context and outlives the stream that asked.
    token = callouts.start(vm, vm.root, name, headers, body, trailers, (timeout_ms & 0xFFFFFFFF) / 1000)
    inst.write_u32(ret_token, token)
    return R.OK
