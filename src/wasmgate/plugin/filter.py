"""One plugin in one stream: calls into its VM and applies the fail strategy."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from wasmgate.abi.constants import Action, MapType
from wasmgate.plugin.chain import FilterCallbacks
from wasmgate.plugin.context import HttpContext, LocalReply, Stream
from wasmgate.plugin.spec import FailStrategy
from wasmgate.plugin.vm import PluginFailed

if TYPE_CHECKING:
    from wasmgate.plugin.manager import PluginHandle
    from wasmgate.plugin.vm import Plugin

_log: Final = logging.getLogger("wasmgate.wasm")

# Envoy's reply when a Wasm filter fails a stream (failStream with fail_open=false).
FAIL_STATUS: Final = 503
FAIL_DETAILS: Final = "wasm_fail_stream"
NO_MODULE_DETAILS: Final = "wasm_module_unavailable"

# Bits of HttpContext.open_maps, as literals: compiled (mypyc), a class attribute's
# default must be a constant. Checked against the ABI's map types right here.
_REQ_HEADERS: Final = 1
_REQ_TRAILERS: Final = 2
_RESP_HEADERS: Final = 4
_RESP_TRAILERS: Final = 8
assert [1 << t for t in (MapType.REQUEST_HEADERS, MapType.REQUEST_TRAILERS, MapType.RESPONSE_HEADERS,
                         MapType.RESPONSE_TRAILERS)] == [_REQ_HEADERS, _REQ_TRAILERS, _RESP_HEADERS, _RESP_TRAILERS]
_CONTINUE: Final = int(Action.CONTINUE)  # a plain int: no Enum lookup per callback


def stream_filters(handles: list[PluginHandle], stream: Stream) -> list[PluginFilter]:
    """One filter per HTTP plugin of the chain (``Chain.http``) for a new stream."""
    out = []
    for h in handles:  # a loop: a comprehension is one more frame on Python 3.11
        out.append(PluginFilter(h, stream))
    return out


class PluginFilter:
    """Request and response callbacks of one plugin for one stream.

    The stream context is created on first use, as Envoy does: a plugin after
    one that answered locally first hears of the stream in ``on_log``.
    """

    __slots__ = ("_response", "ctx", "handle", "plugin", "request", "skip", "stream")

    def __init__(self, handle: PluginHandle, stream: Stream):
        self.handle = handle
        self.stream = stream
        cur = handle.current  # PluginHandle.checkout, inline: per plugin per stream
        self.plugin: Plugin | None = cur if cur is not None and cur.checkout() else None  # kept to the stream's end
        self.ctx: HttpContext | None = None
        self.skip = False
        self.request = _Side(self)
        self._response: _ResponseSide | None = None  # made when a response starts

    @property
    def response(self) -> _ResponseSide:
        side = self._response
        if side is None:
            side = self._response = _ResponseSide(self)
        return side

    def wants(self, request: bool) -> bool:
        """Whether this plugin needs to see that direction of the stream."""
        plugin = self.plugin
        if plugin is None or plugin.vm.failed is not None:
            return True  # its fail strategy must be applied
        return plugin.vm.has_request_callbacks if request else plugin.vm.has_response_callbacks

    def wants_body(self) -> bool:
        """Whether this plugin reads bodies (then a connection upgrade is not tunneled)."""
        plugin = self.plugin
        return plugin is not None and plugin.vm.has_body_callbacks

    def context(self) -> HttpContext | None:
        """The stream context, created on first use; None once the plugin is skipped."""
        if self.ctx is not None or self.skip:
            return self.ctx
        plugin = self.plugin
        if plugin is None or plugin.vm.failed is not None:
            vm = plugin.vm if plugin else self.handle.vm
            self.fail((vm.failed if vm else None) or self.handle.error or "plugin has no VM")
            return None
        try:
            self.ctx = plugin.vm.create_http_context(self.stream)
        except PluginFailed as e:
            self.fail(str(e))
        return self.ctx

    def fail(self, why: str) -> int:
        """Apply the fail strategy; returns the action the chain should see."""
        self.skip = True
        self.handle.stats.failed_streams += 1
        if self.handle.spec.fail_strategy == FailStrategy.FAIL_OPEN:
            return Action.CONTINUE
        if self.stream.local_reply is None:
            if self.handle.module is None:
                # No version at all (the module could not be fetched): Istio 1.25+ puts a
                # deny-all RBAC filter in its place.
                self.stream.local_reply = LocalReply(403, b"RBAC: access denied", [], NO_MODULE_DETAILS)
            else:
                self.stream.local_reply = LocalReply(FAIL_STATUS, b"", [], FAIL_DETAILS)
        _log.debug("plugin %s failed stream: %s", self.handle.name, why)
        return Action.PAUSE

    def without_context(self) -> int:
        """The action when the plugin has no context: its fail strategy has been applied, so
        go on unless that strategy answered the stream."""
        return Action.CONTINUE if self.skip and self.stream.local_reply is None else Action.PAUSE

    def log(self) -> None:
        ctx = self.context() if not self.skip else self.ctx
        if ctx is not None:
            ctx.logging = True
            ctx.vm.log_stream(ctx)
            ctx.logging = False

    def finish(self) -> None:
        if self.ctx is not None:
            self.ctx.vm.finish_stream(self.ctx)
        plugin, self.plugin = self.plugin, None
        if plugin is not None and plugin.checkin():
            self.handle.released(plugin)
        # The sides point back here: unlink them so the stream's objects are freed by
        # reference counting instead of waiting for the cycle collector.
        self.request.unlink()
        if self._response is not None:
            self._response.unlink()


class _Side(FilterCallbacks):
    """The chain's view of one direction of a ``PluginFilter``."""

    __slots__ = ("f",)
    __deletable__ = ("f",)  # mypyc: unlink() deletes it
    is_request = True  # _ResponseSide overrides these three
    headers_bit = _REQ_HEADERS
    trailers_bit = _REQ_TRAILERS

    def __init__(self, f: PluginFilter):
        self.f = f

    @property
    def buffer_limit(self) -> int:
        return self.f.handle.spec.limits.max_buffered_body

    def unlink(self) -> None:
        try:  # noqa: SIM105 (contextlib.suppress runs interpreted: several times the cost)
            del self.f
        except AttributeError:  # finished already
            pass

    def headers(self, count: int, eos: bool) -> int:
        f = self.f
        ctx = f.context()
        if ctx is None:
            return f.without_context()
        ctx.open_maps |= self.headers_bit
        try:
            if self.is_request:
                action = ctx.vm.on_request_headers(ctx, count, eos)
            else:
                action = ctx.vm.on_response_headers(ctx, count, eos)
        except PluginFailed as e:
            return f.fail(str(e))
        if action == _CONTINUE:
            ctx.open_maps &= ~self.headers_bit
        return action

    def data(self, body: bytearray, eos: bool) -> int:
        f = self.f
        ctx = f.context()
        if ctx is None:
            return f.without_context()
        stream = f.stream
        if eos:
            ctx.open_maps |= self.trailers_bit  # the last data callback may add trailers
        try:
            if self.is_request:
                stream.request_body = body
                return ctx.vm.on_request_body(ctx, len(body), eos)
            stream.response_body = body
            return ctx.vm.on_response_body(ctx, len(body), eos)
        except PluginFailed as e:
            return f.fail(str(e))
        finally:
            if self.is_request:
                stream.request_body = None
            else:
                stream.response_body = None

    def trailers(self, count: int) -> int:
        f = self.f
        ctx = f.context()
        if ctx is None:
            return f.without_context()
        ctx.open_maps |= self.trailers_bit
        try:
            if self.is_request:
                return ctx.vm.on_request_trailers(ctx, count)
            return ctx.vm.on_response_trailers(ctx, count)
        except PluginFailed as e:
            return f.fail(str(e))


class _ResponseSide(_Side):
    __slots__ = ()
    is_request = False
    headers_bit = _RESP_HEADERS
    trailers_bit = _RESP_TRAILERS
