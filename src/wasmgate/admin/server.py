"""The admin API, with Envoy's paths: /ready, /stats, /logging; plus /plugins."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import cast
from urllib.parse import parse_qsl, urlsplit

import httptools

from wasmgate import log
from wasmgate.admin import stats
from wasmgate.proxy import http
from wasmgate.proxy.server import ProxyApp

_log = logging.getLogger("wasmgate.admin")

Response = tuple[int, bytes, bytes]  # status, content type, body

HELP = b"""wasmgate admin
  GET  /ready                 LIVE once serving (DRAINING while shutting down)
  GET  /stats                 Prometheus text format (also /stats/prometheus)
  GET  /logging               current log levels
  POST /logging?level=L       set every logger; ?wasm=debug sets one (as Envoy)
  POST /logging?paths=wasm:debug,http:info
  GET  /plugins               loaded plugins as JSON
"""


class AdminState:
    """What the admin API reports and changes. This process's own proxy; the supervisor
    of several workers overrides these to gather from, and fan out to, its workers."""

    def __init__(self, app: ProxyApp | None):
        self.app = app
        self.draining = False

    def ready(self) -> bool:
        return not self.draining

    def stats(self) -> stats.Snapshot:
        assert self.app is not None
        return stats.snapshot(self.app)

    def plugins(self) -> dict[str, object]:
        assert self.app is not None
        return {"plugins": [p.describe() for p in self.app.chain.plugins],
                "resource_errors": self.app.plugins.resource_errors}

    def set_levels(self, query: list[tuple[str, str]]) -> None:
        set_levels(query)


def handle(state: AdminState, method: bytes, target: bytes) -> Response:
    url = urlsplit(target.decode("latin-1"))
    path = url.path.rstrip("/") or "/"
    query = parse_qsl(url.query, keep_blank_values=True)
    text = b"text/plain; charset=utf-8"
    if path == "/ready":
        return (200, text, b"LIVE\n") if state.ready() else (503, text, b"DRAINING\n")
    if path in ("/stats", "/stats/prometheus"):
        return 200, b"text/plain; version=0.0.4; charset=utf-8", stats.prometheus_text(state.stats())
    if path == "/plugins":
        return 200, b"application/json", json.dumps(state.plugins(), indent=2).encode() + b"\n"
    if path == "/logging":
        if method == b"POST":
            try:
                state.set_levels(query)
            except ValueError as e:
                return 400, text, f"{e}\n".encode()
        elif query:
            return 405, text, b"use POST to change log levels\n"
        lines = "".join(f"  {k}: {v}\n" for k, v in log.levels().items())
        return 200, text, ("active loggers:\n" + lines).encode()
    if path == "/":
        return 200, text, HELP
    return 404, text, b"unknown admin path; see /\n"


def set_levels(query: list[tuple[str, str]]) -> None:
    for key, value in query:
        if key == "level":
            for comp in log.COMPONENTS:
                log.set_level(comp, value)
        elif key == "paths":
            for item in value.split(","):
                comp, _, lvl = item.partition(":")
                log.set_level(comp.strip(), lvl.strip())
        else:
            log.set_level(key, value)  # Envoy's /logging?wasm=debug form
        _log.info("log level changed: %s=%s", key, value)


class AdminProtocol(asyncio.Protocol):
    def __init__(self, state: AdminState):
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.write(http.simple_response(400, b"Bad Request\n", close=True))
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        try:
            status, ctype, body = handle(self.state, self.parser.get_method(), self.url)
        except Exception:
            _log.exception("admin handler failed")
            status, ctype, body = 500, b"text/plain", b"internal error\n"
        keep = self.parser.should_keep_alive()
        if self.transport is not None:
            self.transport.write(http.simple_response(status, body, content_type=ctype, close=not keep))
            if not keep:
                self.transport.close()


async def serve_admin(state: AdminState, host: str, port: int) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: AdminProtocol(state), host, port)
