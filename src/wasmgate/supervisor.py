"""Several worker processes behind one listener, with one admin API and one shared store.

Each worker is a whole proxy (its own VMs) bound to the listen address with
SO_REUSEPORT, so the kernel spreads connections. The supervisor:

* serves the admin API, gathering /stats and /plugins from every worker and sending
  /logging changes to all of them;
* holds the shared data and queues of every worker's plugins (a ``LocalStore``), which
  workers reach synchronously over a Unix socket, so CAS works across processes;
* restarts a worker that dies, and drains all of them on SIGTERM.

Two connections per worker: ``rpc`` (worker asks, supervisor answers: store operations)
and ``control`` (supervisor asks: stats, plugins, log levels; and it pushes queue-ready
notices for queues a plugin in that worker owns).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from wasmgate.admin import stats
from wasmgate.admin.server import AdminState, serve_admin, set_levels
from wasmgate.app import (
    RunOptions,
    StartupError,
    check_tcp_proxies,
    default_plugins,
    kube_chain,
    load_chain,
    tls_contexts,
)
from wasmgate.plugin.shared import LocalStore
from wasmgate.proxy.demo import start_demo_upstream
from wasmgate.resources.config import parse_address
from wasmgate.resources.wasmplugin import Scope

_log = logging.getLogger("wasmgate")

OWNER_BITS = 24  # a queue owner is (worker index << OWNER_BITS) | the worker's own owner id
RESTART_BACKOFF_MAX = 10.0


def owner_worker(owner: int) -> int:
    return owner >> OWNER_BITS


class StoreServer:
    """The shared store and the control channels, served from threads."""

    def __init__(self, path: str, authkey: bytes):
        self.store = LocalStore()
        self.listener = Listener(path, family="AF_UNIX", authkey=authkey)
        self.controls: dict[int, tuple[Connection, threading.Lock]] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="store-accept", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
                kind, index = conn.recv()
            except (OSError, EOFError):
                return  # closed
            except Exception:
                continue
            if kind == "control":
                with self._lock:
                    self.controls[index] = (conn, threading.Lock())
            else:
                threading.Thread(target=self._serve, args=(conn, index), name=f"store-{index}", daemon=True).start()

    def _serve(self, conn: Connection, index: int) -> None:
        store = self.store
        while True:
            try:
                op, args = conn.recv()
            except (EOFError, OSError):
                return
            if op == "enqueue":
                owner = store.enqueue(*args)
                if owner is not None and owner_worker(owner) != index:
                    self.notify(owner_worker(owner), owner & ((1 << OWNER_BITS) - 1), args[0])
                    owner = 0  # nobody to tell in the caller's process
                elif owner is not None:
                    owner &= (1 << OWNER_BITS) - 1
                result: Any = owner
            else:
                result = getattr(store, op)(*args)
            try:
                conn.send(result)
            except OSError:
                return

    def notify(self, index: int, owner: int, token: int) -> None:
        entry = self.controls.get(index)
        if entry is not None:
            with entry[1], contextlib.suppress(OSError):
                entry[0].send(("queue_ready", owner, token))

    def ask(self, index: int, message: tuple[Any, ...]) -> Any:
        entry = self.controls.get(index)
        if entry is None:
            raise LookupError(f"worker {index} is not connected")
        with entry[1]:
            entry[0].send(message)
            if not entry[0].poll(10):
                raise TimeoutError(f"worker {index} did not answer")
            return entry[0].recv()

    def forget(self, index: int) -> None:
        with self._lock:
            entry = self.controls.pop(index, None)
        if entry is not None:
            with contextlib.suppress(OSError):
                entry[0].close()

    def close(self) -> None:
        self.listener.close()


class WorkersAdmin(AdminState):
    """The admin API over every worker."""

    def __init__(self, supervisor: Supervisor):
        super().__init__(None)
        self.sup = supervisor

    def _each(self, message: tuple[Any, ...]) -> list[Any]:
        out = []
        for i in range(self.sup.count):
            try:
                out.append(self.sup.server.ask(i, message))
            except (LookupError, TimeoutError, OSError, EOFError) as e:
                _log.warning("admin: worker %d: %s", i, e)
        return out

    def ready(self) -> bool:
        return not self.draining and len(self.sup.server.controls) == self.sup.count

    def stats(self) -> stats.Snapshot:
        snaps = self._each(("stats",))
        return stats.merge(snaps) if snaps else stats.merge([{"metrics": {"counters": {}, "gauges": {},
                                                                            "histograms": {}}}])

    def plugins(self) -> dict[str, object]:
        per_worker = self._each(("plugins",))
        first = per_worker[0] if per_worker else {"plugins": [], "resource_errors": {}}
        return {**first, "workers": per_worker}

    def set_levels(self, query: list[tuple[str, str]]) -> None:
        set_levels(query)  # validates, and the supervisor's own log follows
        self._each(("levels", query))


class Supervisor:
    def __init__(self, opts: RunOptions, count: int, levels: dict[str, str]):
        self.opts = opts
        self.count = count
        self.levels = levels  # log setup for workers: {"": root level, component: level}
        self.dir = Path(tempfile.mkdtemp(prefix="wasmgate-"))
        self.authkey = secrets.token_bytes(32)
        self.server = StoreServer(str(self.dir / "store.sock"), self.authkey)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.restarts = [0] * count
        self.stopping = False
        self._admin = WorkersAdmin(self)

    def _worker_config(self, index: int) -> bytes:
        opts = dataclasses.asdict(self.opts)
        opts["plugins"] = [str(p) for p in self.opts.plugins] if self.opts.plugins is not None else None
        return json.dumps({"index": index, "socket": str(self.dir / "store.sock"), "authkey": self.authkey.hex(),
                           "levels": self.levels, "opts": opts}).encode()

    def _spawn(self, index: int) -> None:
        self.server.forget(index)
        proc = subprocess.Popen([sys.executable, "-m", "wasmgate", "_worker"], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(self._worker_config(index))
        proc.stdin.close()
        self.procs[index] = proc

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        servers = []
        if self.opts.upstream is None:
            demo = await start_demo_upstream()
            servers.append(demo)
            self.opts = dataclasses.replace(self.opts, upstream=f"http://127.0.0.1:{demo.sockets[0].getsockname()[1]}")
        if self.opts.plugins is None and not self.opts.kube:
            self.opts = dataclasses.replace(self.opts, plugins=default_plugins())
        try:
            ahost, aport = parse_address(self.opts.admin, "--admin")
            _, lport = parse_address(self.opts.listen, "--listen")
        except ValueError as e:
            raise StartupError(str(e)) from None
        # Check the plugins once here, so a bad file or module stops startup with its
        # error instead of sending every worker into a restart loop.
        tls_contexts(self.opts)
        check_tcp_proxies(self.opts)
        scope = Scope(self.opts.plugin_limits, dict(self.opts.labels), lport)
        if self.opts.kube:  # each worker then lists and watches the API itself
            chain, kube = await kube_chain(self.opts, scope)
            await kube.client.close()
        else:
            assert self.opts.plugins is not None
            chain = await loop.run_in_executor(None, load_chain, self.opts.plugins, scope)
        for h in chain.plugins:
            h.replaced()
        try:
            servers.append(await serve_admin(self._admin, ahost, aport))
        except (OSError, ValueError) as e:
            raise StartupError(f"cannot listen: {e}") from None
        for i in range(self.count):
            self._spawn(i)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _log.info("supervisor: %d workers on %s, admin on %s", self.count, self.opts.listen, self.opts.admin)
        while not stop.is_set():
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self.stopping:
                    self.restarts[i] += 1
                    delay = min(0.1 * 2 ** self.restarts[i], RESTART_BACKOFF_MAX)
                    _log.error("worker %d exited with status %s; restarting in %.1fs", i, proc.returncode, delay)
                    self.procs[i] = None
                    loop.call_later(delay, self._spawn, i)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        self.stopping = True
        self._admin.draining = True
        await self._stop_workers()
        for s in servers:
            s.close()
        self.server.close()

    async def _stop_workers(self) -> None:
        procs = [p for p in self.procs if p is not None]
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_seconds + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.kill()


def connect(socket_path: str, authkey: bytes, kind: str, index: int) -> Connection:
    conn = Client(socket_path, family="AF_UNIX", authkey=authkey)
    conn.send((kind, index))
    return conn


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
