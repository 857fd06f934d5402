"""Connection upgrades (WebSocket and the like) are tunneled when no plugin needs the body."""

from __future__ import annotations

import socket
from pathlib import Path

from servers import ALLOW_HEADER_YAML, PLUGIN_BUILD, EchoUpgrade, ProxyThread, wasmplugin_yaml

UPGRADE = (b"GET /ws HTTP/1.1\r\nhost: x\r\nallow: true\r\nconnection: Upgrade\r\nupgrade: echo\r\n"
           b"sec-websocket-key: abc\r\n\r\n")


def read_until(s: socket.socket, needle: bytes) -> bytes:
    out = b""
    while needle not in out:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def test_upgrade_is_tunneled_through_header_only_plugins() -> None:
    echo = EchoUpgrade()
    proxy = ProxyThread([ALLOW_HEADER_YAML], echo.url)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(UPGRADE + b"early")
            head = read_until(s, b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
            assert b"upgrade: echo" in head.lower() and b"x-upstream: yes" in head
            got = head.split(b"\r\n\r\n", 1)[1]
            got += read_until(s, b"echo:early") if b"echo:early" not in got else b""
            assert b"echo:early" in got
            s.sendall(b"ping")
            assert read_until(s, b"echo:ping").endswith(b"echo:ping")
        assert b"upgrade: echo" in echo.requests[0].lower()
        assert b"allow: true" in echo.requests[0]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:  # the plugin still decides
            s.sendall(UPGRADE.replace(b"allow: true\r\n", b""))
            assert read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 403 ")
    finally:
        proxy.stop()
        echo.close()


def test_upgrade_refused_when_a_plugin_reads_bodies(tmp_path: Path) -> None:
    echo = EchoUpgrade()
    proxy = ProxyThread([wasmplugin_yaml(tmp_path, "pause", PLUGIN_BUILD / "pause.wasm")], echo.url)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            s.sendall(UPGRADE)
            out = read_until(s, b"\r\n\r\n")
        # forwarded without the upgrade; the upstream's 101 is not passed on
        assert not out.startswith(b"HTTP/1.1 101")
        assert echo.requests and b"upgrade:" not in echo.requests[0].lower()
    finally:
        proxy.stop()
        echo.close()
