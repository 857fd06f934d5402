"""``wasmgate envoy`` in a background thread: a real Envoy configured over ADS by wasmgate.

Everything on 127.0.0.1 with ephemeral ports (Envoy's listener and admin included: their
ports are read back from Envoy), and a module cache of its own (other tests purge the shared
one). Example::

    gw = GatewayThread([plugins_dir], upstream.url, tmp_path)
    urllib.request.urlopen(f"http://127.0.0.1:{gw.port}/")
    gw.stop()
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wasmgate.xds.gateway import EnvoyOptions, Gateway


class GatewayThread:
    def __init__(self, resources: list[Path], upstream: str | None, workdir: Path, *, autostart: bool = True,
                 **opts: Any):
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "envoy.log"
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        options = EnvoyOptions(listen="127.0.0.1:0", admin="127.0.0.1:0", envoy_admin="127.0.0.1:0",
                               upstream=upstream, plugins=resources, envoy_log=self.log_path, concurrency=1,
                               module_cache=workdir / "modules", **opts)
        self.gateway = Gateway(options)
        if autostart:
            self.start()

    def start(self) -> None:
        try:
            self.call(self.gateway.start(), timeout=120)
        except BaseException:
            self._shutdown()
            raise

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def tcp_ports(self) -> list[int]:
        """Envoy's TCP proxy listener ports, in the order of ``tcp_proxies``."""
        return self.gateway.tcp_ports

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_port(self) -> int:
        """Envoy's admin port (wasmgate's status API is on ``gateway.admin_port``)."""
        assert self.gateway.envoy is not None
        return int(self.gateway.envoy.admin_url().rsplit(":", 1)[1])

    def status(self) -> dict[str, Any]:
        """GET /plugins from wasmgate's status API."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway.admin_port}/plugins", timeout=10) as r:
            return dict(json.loads(r.read()))

    def plugin(self, name: str) -> dict[str, Any]:
        return next(p for p in self.status()["plugins"] if p["name"] == name)

    def envoy_admin(self, path: str) -> bytes:
        assert self.gateway.envoy is not None
        with urllib.request.urlopen(self.gateway.envoy.admin_url() + path, timeout=10) as r:
            body: bytes = r.read()
            return body

    def envoy_pid(self) -> int:
        assert self.gateway.envoy is not None and self.gateway.envoy.proc is not None
        return int(self.gateway.envoy.proc.pid)

    def restart_xds(self) -> None:
        """Stop wasmgate's ADS server and start it again on its port, with its state: Envoy, still
        running, loses its stream and connects again."""
        server = self.gateway.server
        connected = server.status.connected
        self.call(server.stop())
        self.call(server.start(port=server.port))
        self.wait_for(lambda: server.status.connected == connected, what="Envoy connected again")

    def restart_envoy(self) -> None:
        """Stop Envoy and start a new process (new bootstrap) against the same ADS server."""
        assert self.gateway.envoy is not None
        self.call(self.gateway.envoy.stop())
        self.call(self.gateway.start_envoy(), timeout=120)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for(self, check: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"{what} not reached in {timeout:g}s; status: " \
                                                 f"{json.dumps(self.status(), indent=1)}"
            time.sleep(0.05)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return  # start() failed and already shut the loop down
        try:
            self.call(self.gateway.stop())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def distinct_module(src: Path, dst: Path, label: str) -> Path:
    """A copy of ``src`` with a custom section naming ``label``: the same code, other bytes.

    Envoy keys Wasm VMs by vm_id, VM configuration and code, and Istio sets no vm_id, so
    WasmPlugins with the same module share one VM in Envoy, as in wasmgate (plugins that keep
    their configuration in globals then see the last one). A distinct copy gets a VM of its own.
    """
    name = b"wasmgate-test"
    payload = bytes([len(name)]) + name + label.encode()
    size, leb = len(payload), bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        leb.append(byte | (0x80 if size else 0))
        if not size:
            break
    dst.write_bytes(src.read_bytes() + b"\x00" + bytes(leb) + payload)
    return dst
