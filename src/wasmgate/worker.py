"""One worker process of a multi-worker proxy (started by the supervisor, not by users)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from wasmgate import log
from wasmgate.abi.constants import WasmResult
from wasmgate.admin import stats
from wasmgate.admin.server import set_levels
from wasmgate.app import Running, RunOptions, start
from wasmgate.plugin import shared
from wasmgate.plugin.spec import PluginLimits
from wasmgate.proxy.server import Limits
from wasmgate.supervisor import OWNER_BITS, connect

_log = logging.getLogger("wasmgate")


class RemoteStore(shared.SharedStore):
    """The supervisor's store, over a Unix socket; one request at a time."""

    def __init__(self, conn: Connection, index: int):
        self.conn = conn
        self.index = index
        self.lock = threading.Lock()  # VMs start in executor threads too

    def _call(self, op: str, *args: Any) -> Any:
        with self.lock:
            self.conn.send((op, args))
            return self.conn.recv()

    def get(self, vm_id: bytes, key: bytes) -> tuple[bytes, int] | None:
        result: tuple[bytes, int] | None = self._call("get", vm_id, key)
        return result

    def set(self, vm_id: bytes, key: bytes, value: bytes, cas: int) -> WasmResult:
        return WasmResult(self._call("set", vm_id, key, value, cas))

    def register_queue(self, vm_id: bytes, name: bytes, owner: int) -> int:
        return int(self._call("register_queue", vm_id, name, (self.index << OWNER_BITS) | owner))

    def resolve_queue(self, vm_id: bytes, name: bytes) -> int:
        return int(self._call("resolve_queue", vm_id, name))

    def enqueue(self, token: int, value: bytes) -> int | None:
        owner: int | None = self._call("enqueue", token, value)  # 0: another worker was told
        return owner

    def dequeue(self, token: int) -> tuple[WasmResult, bytes]:
        status, value = self._call("dequeue", token)
        return WasmResult(status), value


def _control(conn: Connection, loop: asyncio.AbstractEventLoop, running: Running) -> None:
    """Answer the supervisor: stats, plugins, log levels; take queue notices."""
    def on_loop(fn: Any) -> Any:
        async def run() -> Any:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=10)

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        try:
            if kind == "queue_ready":
                loop.call_soon_threadsafe(shared.LISTENERS.notify, message[1], message[2])
                continue
            if kind == "stats":
                reply: Any = on_loop(lambda: stats.snapshot(running.app))
            elif kind == "plugins":
                reply = on_loop(lambda: {"plugins": [p.describe() for p in running.app.chain.plugins],
                                         "resource_errors": running.app.plugins.resource_errors})
            elif kind == "levels":
                reply = on_loop(lambda query=message[1]: set_levels(query))
            else:
                reply = None
        except Exception as e:
            reply = {"error": str(e)}
        try:
            conn.send(reply)
        except OSError:
            return


def _options(raw: dict[str, Any]) -> RunOptions:
    raw = dict(raw)
    raw["plugins"] = [Path(p) for p in raw["plugins"]] if raw.get("plugins") is not None else None
    raw["limits"] = Limits(**raw["limits"])
    raw["plugin_limits"] = PluginLimits(**raw["plugin_limits"])
    return RunOptions(**raw)


async def _run(cfg: dict[str, Any]) -> None:
    index = int(cfg["index"])
    authkey = bytes.fromhex(cfg["authkey"])
    shared.use_store(RemoteStore(connect(cfg["socket"], authkey, "rpc", index), index))
    opts = _options(cfg["opts"])
    opts.admin = ""  # the supervisor serves the admin API
    opts.reuse_port = True
    running = await start(opts)
    loop = asyncio.get_running_loop()
    control = connect(cfg["socket"], authkey, "control", index)
    threading.Thread(target=_control, args=(control, loop, running), name="control", daemon=True).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop(opts.drain_seconds)


def main() -> int:
    cfg = json.loads(sys.stdin.buffer.read())
    levels = dict(cfg.get("levels") or {})
    log.setup(levels.pop("", "info"), levels, prefix=f"w{cfg['index']}")
    import uvloop

    try:
        uvloop.run(_run(cfg))
    except Exception:
        _log.exception("worker %s failed", cfg.get("index"))
        return 1
    return 0
