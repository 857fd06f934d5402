"""gRPC callouts: proxy_grpc_call, proxy_grpc_stream, proxy_grpc_send, proxy_grpc_cancel,
proxy_grpc_close. The client and the callbacks are in proxy/grpc_callout.py.

Statuses as Envoy returns them (exports.cc and Context::grpc* in Envoy's wasm context):

* a bad pointer: INVALID_MEMORY_ACCESS, before anything else;
* ``service`` is a serialized ``envoy.config.core.v3.GrpcService`` naming a cluster in
  ``envoy_grpc.cluster_name``, or else (it does not parse as one) a cluster name. An
  unknown cluster name is PARSE_FAILURE. A GrpcService naming an unknown cluster spends a
  token, returns INTERNAL_FAILURE, and ``proxy_on_grpc_close(14)`` follows. A GrpcService
  without ``envoy_grpc`` is BAD_ARGUMENT (``google_grpc`` is not supported; Envoy aborts
  the process on a GrpcService with no target at all);
* malformed initial metadata is read as none (Envoy's pairs parser);
* tokens: not of a gRPC call (odd) or stream (even, not a multiple of 4) BAD_ARGUMENT,
  unknown or finished NOT_FOUND; send takes streams only;
* ``proxy_grpc_close`` on a call cancels it; on a stream it half-closes (the answers
  still come); ``proxy_grpc_cancel`` drops either without further callbacks;
* sending on a stream after closing it does nothing and returns OK.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wasmgate.abi.constants import WasmResult
from wasmgate.abi.pairs import Pairs, PairsError, decode_pairs
from wasmgate.host.registry import hostcall

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

R = WasmResult

_CALL = 1  # token & 3
_STREAM = 2


# ---- envoy.config.core.v3.GrpcService, as protobuf's parser would take it -------------


@dataclass
class GrpcTarget:
    envoy_grpc: bool = False  # target_specifier is envoy_grpc (else google_grpc or unset)
    cluster: str = ""
    authority: str = ""
    metadata: Pairs = field(default_factory=list)  # initial_metadata


class _Invalid(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(10):
        if pos >= len(data):
            raise _Invalid
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            return value, pos
    raise _Invalid


def _fields(data: bytes, group: int = 0, start: int = 0) -> tuple[list[tuple[int, int, bytes]], int]:
    """(field, wire type, payload) of every field; payloads of length-delimited fields."""
    out: list[tuple[int, int, bytes]] = []
    pos = start
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0 or key > 0xFFFFFFFF:
            raise _Invalid
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > len(data):
                raise _Invalid
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > len(data):
                raise _Invalid
            out.append((number, wire, data[pos:pos + size]))
            pos += size
        elif wire == 3:
            _, pos = _fields(data, number, pos)
        elif wire == 4:
            if number != group:
                raise _Invalid
            return out, pos
        else:
            raise _Invalid
    if group:
        raise _Invalid  # a group left open
    return out, pos


def _string(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")  # proto3 strings must be UTF-8 or the parse fails
    except UnicodeDecodeError:
        raise _Invalid from None


def _message(payload: bytes) -> list[tuple[int, int, bytes]]:
    return _fields(payload)[0]


def parse_grpc_service(data: bytes) -> GrpcTarget | None:
    """The GrpcService in ``data``, or None when it does not parse as one."""
    target = GrpcTarget()
    try:
        for number, wire, payload in _message(data):
            if wire != 2:
                continue  # a known field with another wire type is kept as an unknown one
            if number == 1:  # envoy_grpc
                if not target.envoy_grpc:
                    target = GrpcTarget(True, metadata=target.metadata)
                for n, w, p in _message(payload):
                    if w == 2 and n == 1:
                        target.cluster = _string(p)
                    elif w == 2 and n == 2:
                        target.authority = _string(p)
                    elif w == 2 and n in (3, 4):  # retry_policy, max_receive_message_length
                        _message(p)
            elif number == 2:  # google_grpc
                _message(payload)
                target = GrpcTarget(False, metadata=target.metadata)
            elif number == 5:  # initial_metadata: HeaderValue {key, value, raw_value}
                key = value = b""
                for n, w, p in _message(payload):
                    if w == 2 and n == 1:
                        key = _string(p).encode()
                    elif w == 2 and n == 2:
                        value = _string(p).encode()
                    elif w == 2 and n == 3:
                        value = p
                target.metadata.append((key, value))
            elif number in (3, 6):  # timeout, retry_policy
                _message(payload)
    except _Invalid:
        return None
    return target


# ---- host functions ----------------------------------------------------------------


def _open(vm: PluginVM, service: bytes, service_name: bytes, method: bytes, raw_metadata: bytes,
          message: bytes | None, timeout_ms: int, ret_token: int) -> int:
    callouts = vm.callouts
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        callouts = None  # not serving yet (on_vm_start, on_configure)
    if callouts is None:
        return R.INTERNAL_FAILURE
    try:
        metadata = decode_pairs(raw_metadata)
    except PairsError:
        metadata = []  # Envoy's parser hands over no pairs at all
    stream = message is None
    target = parse_grpc_service(service)
    if target is None:  # not a GrpcService: the name of a cluster
        cluster, authority = service.decode("utf-8", "replace"), ""
        if cluster not in callouts.clusters:
            return R.PARSE_FAILURE
    elif not target.envoy_grpc:
        return R.BAD_ARGUMENT
    else:
        cluster, authority = target.cluster, target.authority
        metadata = target.metadata + metadata
        if cluster not in callouts.clusters:
            callouts.grpc.unavailable(vm, stream)
            return R.INTERNAL_FAILURE
    if not vm.instance.write_u32(ret_token, 0):
        return R.INVALID_MEMORY_ACCESS
    path = f"/{service_name.decode('utf-8', 'replace')}/{method.decode('utf-8', 'replace')}"
    grpc = callouts.grpc
    if message is None:
        token = grpc.stream(vm, cluster, authority, path, metadata)
    else:
        token = grpc.call(vm, cluster, authority, path, metadata, message, timeout_ms)
    vm.instance.write_u32(ret_token, token)
    return R.OK


@hostcall("iiiiiiiiiiii")
def proxy_grpc_call(vm: PluginVM, sp: int, ss: int, np: int, ns: int, mp: int, ms: int, ip: int, is_: int,
                    rp: int, rs: int, timeout_ms: int, ret_token: int) -> int:
    inst = vm.instance
    service, name, method, metadata, message = (inst.read(sp, ss), inst.read(np, ns), inst.read(mp, ms),
                                                inst.read(ip, is_), inst.read(rp, rs))
    if service is None or name is None or method is None or metadata is None or message is None:
        return R.INVALID_MEMORY_ACCESS
    return _open(vm, service, name, method, metadata, message, timeout_ms & 0xFFFFFFFF, ret_token)


@hostcall("iiiiiiiii")
def proxy_grpc_stream(vm: PluginVM, sp: int, ss: int, np: int, ns: int, mp: int, ms: int, ip: int, is_: int,
                      ret_token: int) -> int:
    inst = vm.instance
    service, name, method, metadata = inst.read(sp, ss), inst.read(np, ns), inst.read(mp, ms), inst.read(ip, is_)
    if service is None or name is None or method is None or metadata is None:
        return R.INVALID_MEMORY_ACCESS
    return _open(vm, service, name, method, metadata, None, 0, ret_token)


@hostcall("iiii")
def proxy_grpc_send(vm: PluginVM, token: int, ptr: int, size: int, end_stream: int) -> int:
    message = vm.read(ptr, size)
    if message is None:
        return R.INVALID_MEMORY_ACCESS
    token &= 0xFFFFFFFF
    if token & 3 != _STREAM:
        return R.BAD_ARGUMENT
    stream = vm.pending_calls.get(token)
    if stream is None:
        return R.NOT_FOUND
    stream.send(message, end_stream != 0)
    return R.OK


def _callout(vm: PluginVM, token: int) -> tuple[int, Any]:
    """(status, the call or stream of ``token``): BAD_ARGUMENT for a token that is not a
    gRPC one, NOT_FOUND for an unknown or finished one."""
    token &= 0xFFFFFFFF
    if token & 3 not in (_CALL, _STREAM):
        return R.BAD_ARGUMENT, None
    callout = vm.pending_calls.get(token)
    return (R.OK, callout) if callout is not None else (R.NOT_FOUND, None)


@hostcall("i")
def proxy_grpc_cancel(vm: PluginVM, token: int) -> int:
    status, callout = _callout(vm, token)
    if callout is not None:
        callout.cancel()
    return status


@hostcall("i")
def proxy_grpc_close(vm: PluginVM, token: int) -> int:
    status, callout = _callout(vm, token)
    if callout is not None:
        if token & 3 == _CALL:
            callout.cancel()
        else:
            callout.close_local()
    return status
