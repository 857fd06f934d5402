"""Socket writes of one event-loop turn, sent together at its end.

A send() on a connection whose peer waits in epoll wakes the peer at once; on a VM
that wake-up is an inter-processor interrupt, several microseconds of the sender's
system time. Answering each connection as soon as its bytes are ready wakes the
peer once per response when the peer is faster than the proxy (wrk, nginx). Held
until every connection that was readable this turn has been served, the sends
wake it about once per turn (docs/performance.md, "Writes per loop turn").
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Flushable(Protocol):
    def flush(self) -> None: ...


class WriteBatch:
    """Connections with bytes to send; ``flush`` runs for each once the turn's
    callbacks have run (a ``call_soon`` scheduled by the first one queued)."""

    def __init__(self) -> None:
        self._queued: list[Flushable] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: each lookup costs a getpid()

    def add(self, conn: Flushable) -> None:
        """Queue ``conn`` (the caller queues a connection once until it is flushed)."""
        queued = self._queued
        queued.append(conn)
        if len(queued) == 1:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._run)

    def _run(self) -> None:
        queued, self._queued = self._queued, []
        for conn in queued:
            conn.flush()
