"""Filter iteration for one direction of a stream, with Envoy's semantics. Sans-IO.

Headers, data and trailers flow through the filters in order (the response
direction gets the filters reversed). What a stopped filter holds moves on when
the filter continues (a later callback returns Continue, or the plugin calls
``proxy_continue_stream``).

* A non-zero result from a headers callback is Envoy's StopAllIteration (Envoy's
  Wasm filter maps it so unless ``allow_on_headers_stop_iteration``): the filter
  gets no data callbacks until it continues; body data is buffered for it and
  handed to it, whole, when it does.
* A data callback returning 1 or 2 stops and buffers (every later data callback
  of that filter sees the whole buffer); 3 or more stops and drops the data.

The stream may end inside any callback (a local reply, a reset, a failure): every
entry point returns True then, and iteration stops where it was. (A flag, not an
exception: an exception through the compiled frames costs more than the rest of a
local reply; docs/performance.md.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from mypy_extensions import mypyc_attr

from wasmgate.abi.constants import Action
from wasmgate.plugin.context import Stream

# Base classes, not Protocols: compiled (mypyc), a call through a Protocol is a lookup by
# name, through a native base class a vtable call. Interpreted subclasses are allowed for
# devtools/driver.py.


@mypyc_attr(allow_interpreted_subclasses=True)
class FilterCallbacks:
    """One plugin's callbacks for one direction of a stream; they return the plugin's action."""

    @property
    def buffer_limit(self) -> int:  # most body bytes this filter may hold stopped; 0: no own limit
        return 0

    def headers(self, count: int, eos: bool) -> int:
        raise NotImplementedError

    def data(self, body: bytearray, eos: bool) -> int:
        raise NotImplementedError

    def trailers(self, count: int) -> int:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class Flow:
    """One direction of a stream as its exchange feeds it: a ``Direction``, or the sink
    alone when no plugin takes part. Entry points return whether the stream ended in a
    callback; a sink never ends it."""

    current = -1  # index of the filter whose callback runs (or ran last)
    buffered = 0  # bytes held by stopped filters
    over_limit = False  # a filter holds more than its own buffer_limit

    def headers(self, eos: bool) -> bool:
        raise NotImplementedError

    def data(self, body: bytes, eos: bool) -> bool:
        raise NotImplementedError

    def trailers(self) -> bool:
        raise NotImplementedError

    def index_of(self, cb: FilterCallbacks) -> int:
        return -1

    def in_call(self, index: int) -> bool:
        return False

    def continue_from(self, index: int) -> bool:
        return False


_CONTINUE_AND_END_STREAM: Final = 2  # a headers result Envoy treats as continue
# Plain ints: an Enum member lookup costs ~70 ns on Python 3.11, several times per callback.
_CONTINUE: Final = int(Action.CONTINUE)
_STOP_NO_BUFFER: Final = int(Action.STOP_NO_BUFFER)


class _Slot:
    __slots__ = ("cb", "stopped", "stopped_all", "held_headers", "held_headers_eos", "held_data",
                 "held_eos", "held_trailers", "in_call", "continue_requested")

    def __init__(self, cb: FilterCallbacks):
        self.cb = cb
        self.stopped = False
        self.stopped_all = False  # stopped on headers: data waits without callbacks
        self.held_headers = False
        self.held_headers_eos = False
        self.held_data: bytearray | None = None
        self.held_eos = False
        self.held_trailers = False
        self.in_call = False
        self.continue_requested = False


class Direction(Flow):
    def __init__(self, filters: list[FilterCallbacks], sink: Flow, stream: Stream, request: bool):
        slots: list[_Slot] = []
        self._slots = slots
        for f in filters:  # (a comprehension is one more frame per stream on Python 3.11)
            slots.append(_Slot(f))
        self._sink = sink
        self._stream = stream  # its header counts, and whether it ended (in the callback that just ran)
        self._request = request
        self.current = -1
        self.buffered = 0
        self.over_limit = False

    def _ended(self) -> bool:
        stream = self._stream
        return stream.local_reply is not None or stream.reset

    def _header_count(self) -> int:
        stream = self._stream
        return len((stream.request_headers if self._request else stream.response_headers) or ())

    def _trailer_count(self) -> int:
        stream = self._stream
        return len((stream.request_trailers if self._request else stream.response_trailers) or ())

    # ---- input ---------------------------------------------------------------------

    def headers(self, eos: bool) -> bool:
        """Returns whether the stream ended in a callback (so for all entry points)."""
        return self._flow_headers(0, eos)

    def data(self, body: bytes, eos: bool) -> bool:
        return self._flow_data(0, bytearray(body), eos)

    def trailers(self) -> bool:
        return self._flow_trailers(0)

    def index_of(self, cb: FilterCallbacks) -> int:
        for i, s in enumerate(self._slots):
            if s.cb is cb:
                return i
        return -1

    def in_call(self, index: int) -> bool:
        return self._slots[index].in_call

    def continue_from(self, index: int) -> bool:
        """proxy_continue_stream from filter ``index``.

        During that filter's own callback it takes effect when the callback returns
        (Envoy defers it the same way); otherwise at once. Nothing if not stopped.
        """
        slot = self._slots[index]
        if slot.in_call:
            slot.continue_requested = True
            return False
        return slot.stopped and self._resume(index)

    # ---- iteration -----------------------------------------------------------------

    def _call(self, index: int, fn: Callable[..., int], *args: object) -> int:
        """Run one callback; its action, or CONTINUE if it asked to continue meanwhile
        (the caller then checks ``_ended``)."""
        slot = self._slots[index]
        self.current = index
        slot.in_call = True
        slot.continue_requested = False
        try:
            action = fn(*args)
        finally:
            slot.in_call = False
        return _CONTINUE if slot.continue_requested else action

    def _flow_headers(self, start: int, eos: bool) -> bool:
        for i in range(start, len(self._slots)):
            slot = self._slots[i]
            # self._call inlined: once per plugin per request, the hottest step of a chain
            self.current = i
            slot.in_call = True
            slot.continue_requested = False
            try:
                action = slot.cb.headers(self._header_count(), eos)
            finally:
                slot.in_call = False
            if self._ended():
                return True
            if slot.continue_requested:
                action = _CONTINUE
            if action != _CONTINUE and action != _CONTINUE_AND_END_STREAM:
                slot.stopped = slot.stopped_all = True
                slot.held_headers = True
                slot.held_headers_eos = eos
                return False
        return self._sink.headers(eos)

    def _hold(self, slot: _Slot, body: bytearray, eos: bool) -> bytearray:
        held = slot.held_data
        if held is None:
            held = slot.held_data = bytearray()
        held += body
        self.buffered += len(body)
        slot.held_eos = eos
        if slot.cb.buffer_limit and len(held) > slot.cb.buffer_limit:
            self.over_limit = True
        return held

    def _flow_data(self, start: int, body: bytearray, eos: bool) -> bool:
        for i in range(start, len(self._slots)):
            slot = self._slots[i]
            if slot.stopped_all:
                self._hold(slot, body, eos)
                return False
            if slot.stopped:
                held = self._hold(slot, body, eos)
                action = self._call(i, slot.cb.data, held, eos)
                if self._ended():
                    return True
                if action == _CONTINUE:
                    return self._resume(i)
                if action >= _STOP_NO_BUFFER:
                    self.buffered -= len(held)
                    held.clear()
                return False
            action = self._call(i, slot.cb.data, body, eos)
            if self._ended():
                return True
            if action != _CONTINUE:
                slot.stopped = True
                if action < _STOP_NO_BUFFER:
                    self._hold(slot, body, eos)
                else:
                    slot.held_data = bytearray()
                    slot.held_eos = eos
                return False
        return self._sink.data(bytes(body), eos)

    def _flow_trailers(self, start: int) -> bool:
        for i in range(start, len(self._slots)):
            slot = self._slots[i]
            if slot.stopped_all:
                slot.held_trailers = True
                return False
            action = self._call(i, slot.cb.trailers, self._trailer_count())
            if self._ended():
                return True
            if slot.stopped:
                slot.held_trailers = True
                return action == _CONTINUE and self._resume(i)
            if action != _CONTINUE:
                slot.stopped = True
                slot.held_trailers = True
                return False
        return self._sink.trailers()

    def _resume(self, index: int) -> bool:
        """Filter ``index`` continues: pass on what it held, in order."""
        slot = self._slots[index]
        if not slot.stopped:
            return False
        stopped_all = slot.stopped_all
        slot.stopped = slot.stopped_all = False
        headers, headers_eos = slot.held_headers, slot.held_headers_eos
        data, data_eos = slot.held_data, slot.held_eos
        trailers = slot.held_trailers
        slot.held_headers = slot.held_trailers = False
        slot.held_data = None
        if data is not None:
            self.buffered -= len(data)
        if headers and self._flow_headers(index + 1, headers_eos):
            return True
        # After StopAll the filter itself has not seen the buffered body yet.
        start = index if stopped_all else index + 1
        if data is not None and (data or data_eos) and self._flow_data(start, data, data_eos):
            return True
        return trailers and self._flow_trailers(start)
