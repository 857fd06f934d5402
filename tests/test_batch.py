"""proxy/batch.py: writes of one loop turn are flushed together, once, after the turn."""

from __future__ import annotations

import asyncio

from wasmgate.proxy.batch import WriteBatch


class _Conn:
    def __init__(self, name: str, log: list[str], batch: WriteBatch, again: bool = False):
        self.name, self.log, self.batch, self.again = name, log, batch, again

    def flush(self) -> None:
        self.log.append(self.name)
        if self.again:  # a flush that queues more (e.g. a write from inside it) waits for the next turn
            self.again = False
            self.batch.add(self)


def test_flushes_after_the_turn_in_order() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        batch = WriteBatch()
        batch.add(_Conn("a", log, batch))
        batch.add(_Conn("b", log, batch, again=True))
        log.append("turn")  # nothing was flushed while the turn's callbacks ran
        await asyncio.sleep(0)
        log.append("next")
        await asyncio.sleep(0)
        return log

    assert asyncio.run(main()) == ["turn", "a", "b", "next", "b"]
