"""The built-in demo upstream: answers every request with 200 and what it received."""

from __future__ import annotations

import asyncio
import json
from typing import cast

import httptools


class DemoUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_len = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body_len = b"", [], 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body_len += len(body)

    def on_message_complete(self) -> None:
        info = {
            "message": "hello from the wasmgate demo upstream",
            "method": self.parser.get_method().decode(),
            "path": self.url.decode("latin-1"),
            "headers": {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.headers},
            "body_bytes": self.body_len,
        }
        body = json.dumps(info, indent=2).encode() + b"\n"
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        if self.transport is not None:
            self.transport.write(head + body)
            if not self.parser.should_keep_alive():
                self.transport.close()


async def start_demo_upstream(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(DemoUpstream, host, port)
