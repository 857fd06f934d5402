"""Differential tests: the same plugins and requests through Envoy (V8) and wasmgate.

Compared: status, body, the headers plugins set (on the response and on what the
upstream received), and the upstream-received body.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from envoy_harness import Envoy, EnvoyPlugin
from servers import ALLOW_HEADER_WASM, PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml


@dataclass(frozen=True)
class Plugin:
    name: str
    wasm: Path
    config: dict[str, object] | None = None


@dataclass
class Observed:
    status: int
    body: bytes
    headers: dict[str, str]  # response headers a plugin may have set
    upstream_headers: dict[str, str]  # request headers a plugin may have set, as the upstream saw them
    upstream_body: bytes | None


PLUGIN_HEADERS = ("x-wasmgate-denied", "x-chain-resp", "x-wasm", "content-type")
PLUGIN_REQUEST_HEADERS = ("x-chain", "x-resumed", "x-replace", "allow", "x-auth")


class Pair:
    """Envoy and wasmgate with the same plugin chain in front of one upstream."""

    def __init__(self, plugins: list[Plugin], workdir: Path, clusters: dict[str, Upstream] | None = None,
                 response_headers: tuple[str, ...] = ()):
        self.response_headers = PLUGIN_HEADERS + response_headers  # compared on every response
        self.upstream = start_upstream()
        clusters = clusters or {}
        # As Istio translates a WasmPlugin: root_id from pluginName, config as JSON text.
        envoy_plugins = [EnvoyPlugin(p.name, p.wasm, json.dumps(p.config, separators=(",", ":"))
                                     if p.config is not None else "", root_id=p.name) for p in plugins]
        self.envoy = Envoy(envoy_plugins, self.upstream.port, workdir / "envoy",
                           clusters={n: u.port for n, u in clusters.items()})
        (workdir / "envoy").mkdir(exist_ok=True)
        self.envoy.start()
        # Priorities keep wasmgate's chain in list order, like Envoy's filter list.
        files = [wasmplugin_yaml(workdir, p.name, p.wasm, config=p.config, priority=100 - i)
                 for i, p in enumerate(plugins)]
        try:
            self.wasmgate = ProxyThread(files, self.upstream.url, clusters={n: u.url for n, u in clusters.items()})
        except BaseException:
            self.envoy.stop()
            raise

    def stop(self) -> None:
        self.wasmgate.stop()
        self.envoy.stop()
        self.upstream.server.shutdown()

    def observe(self, port: int, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Observed:
        before = len(self.upstream.seen)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        got = {k.lower(): ", ".join(r.msg.get_all(k) or []) for k in {k for k, _ in r.getheaders()}}
        conn.close()
        seen = self.upstream.seen[before:]
        up_headers = {}
        up_body = None
        if seen:
            up_headers = {h: ", ".join(seen[-1].header_all(h)) for h in PLUGIN_REQUEST_HEADERS
                          if seen[-1].header_all(h)}
            up_body = seen[-1].body
        return Observed(r.status, data, {h: got[h] for h in self.response_headers if h in got}, up_headers,
                        up_body)

    def compare(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Observed:
        expected = self.observe(self.envoy.port, method, path, headers or {}, body)
        actual = self.observe(self.wasmgate.port, method, path, headers or {}, body)
        assert actual == expected, f"wasmgate differs from Envoy for {method} {path} {headers}"
        return actual


@pytest.fixture(scope="module")
def allow_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    pair = Pair([Plugin("allow-header", ALLOW_HEADER_WASM, {"header": "allow", "value": "true"})],
                tmp_path_factory.mktemp("allow"))
    yield pair
    pair.stop()


@pytest.mark.parametrize("headers", [{}, {"allow": "true"}, {"allow": "false"}, {"allow": "TRUE"},
                                     {"Allow": "true"}, {"allow": ""}])
def test_allow_header_same_as_envoy(allow_pair: Pair, headers: dict[str, str]) -> None:
    got = allow_pair.compare(headers=headers)
    assert got.status == (200 if headers.get("allow", headers.get("Allow")) == "true" else 403)


def test_allow_header_post_same_as_envoy(allow_pair: Pair) -> None:
    assert allow_pair.compare("POST", "/submit", {"allow": "true"}, b"payload").status == 200
    assert allow_pair.compare("POST", "/submit", {}, b"payload").status == 403


def test_pause_resume_and_body_rewrite_same_as_envoy(tmp_path: Path) -> None:
    pair = Pair([Plugin("pause", PLUGIN_BUILD / "pause.wasm")], tmp_path)
    try:
        got = pair.compare(headers={"x-pause": "1"})
        assert got.upstream_headers.get("x-resumed") == "tick"
        got = pair.compare("POST", "/b", {"x-pause": "1"}, b"some body")
        assert got.upstream_body == b"SOME BODY"
        pair.compare("POST", "/b", {}, b"no pause here")
    finally:
        pair.stop()


def test_chain_and_local_reply_same_as_envoy(tmp_path: Path) -> None:
    pair = Pair([Plugin("first", PLUGIN_BUILD / "tag.wasm", {"tag": "first"}),
                 Plugin("allow", ALLOW_HEADER_WASM),
                 Plugin("after", PLUGIN_BUILD / "tag.wasm", {"tag": "after"}),
                 Plugin("mutate", PLUGIN_BUILD / "mutate.wasm")], tmp_path)
    try:
        denied = pair.compare()
        assert denied.headers["x-chain-resp"] == "first"
        allowed = pair.compare(headers={"allow": "true", "x-replace": "x"})
        assert allowed.headers["x-chain-resp"] == "after, first"
        assert allowed.upstream_headers["x-chain"] == "first, after"
        assert allowed.upstream_headers["x-replace"] == "replaced"
    finally:
        pair.stop()


def test_http_callout_same_as_envoy(tmp_path: Path) -> None:
    auth = start_upstream()
    pair = Pair([Plugin("callout", PLUGIN_BUILD / "callout.wasm")], tmp_path, clusters={"auth": auth})
    try:
        assert pair.compare(headers={"x-user": "alice"}).upstream_headers["x-auth"] == "ok:alice"
        assert pair.compare(headers={"x-user": "mallory"}).status == 403
        assert pair.compare(headers={"x-user": "slow"}).body == b"denied: 504\n"  # the plugin's 2 s timeout
        assert pair.compare().status == 200
        assert pair.compare("POST", "/p", {"x-user": "bob"}, b"request body").upstream_body == b"request body"
    finally:
        pair.stop()
        auth.server.shutdown()


STABLE_PROPERTIES = ["request.path", "request.url_path", "request.query", "request.method",
                     "request.scheme", "request.protocol", "request.useragent", "request.referer",
                     "response.code", "plugin_name", "plugin_root_id", "connection.mtls",
                     "source.address.missing", "no.such.attribute"]


def test_properties_same_as_envoy(tmp_path: Path) -> None:
    headers = (*(f"x-prop-{p}" for p in STABLE_PROPERTIES), *(f"x-prop-req-{p}" for p in STABLE_PROPERTIES),
               "x-prop-filter-state")
    pair = Pair([Plugin("props", PLUGIN_BUILD / "props.wasm", {"paths": STABLE_PROPERTIES})], tmp_path,
                response_headers=headers)
    try:
        got = pair.compare(path="/a/b?x=1&y=2", headers={"user-agent": "diff/1", "referer": "http://r/"})
        # read in on_response_headers: request headers are gone there, in Envoy too
        assert got.headers["x-prop-request.path"] == "status:1"
        assert got.headers["x-prop-request.protocol"] == b"HTTP/1.1".hex()
        assert got.headers["x-prop-req-request.path"] == b"/a/b?x=1&y=2".hex()
        assert got.headers["x-prop-req-request.url_path"] == b"/a/b".hex()
        assert got.headers["x-prop-response.code"] == (200).to_bytes(8, "little").hex()
        assert got.headers["x-prop-filter-state"] == b"set-by-plugin".hex()
        pair.compare("POST", "/", {}, b"body")
    finally:
        pair.stop()


def test_callback_sequence_and_plugin_logs_same_as_envoy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plugin's own log lines (every callback with its arguments) match Envoy's, in order."""
    import logging
    import re
    import time

    pair = Pair([Plugin("lifecycle", PLUGIN_BUILD / "lifecycle.wasm")], tmp_path)
    try:
        with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
            pair.compare("POST", "/p", {}, b"some body")
            pair.compare("GET", "/g")
            time.sleep(0.5)  # Envoy writes its log asynchronously
        envoy_log = pair.envoy.log_text()
    finally:
        pair.stop()

    def stream_lines(messages: list[str]) -> list[str]:
        # stream contexts only (2, 3): root callbacks run once per VM copy in Envoy
        return [m for m in messages if re.search(r"lifecycle: \w+ ctx=[23]\b", m)]

    ours = stream_lines([r.getMessage().split(": ", 1)[-1] for r in caplog.records
                         if r.name == "wasmgate.wasm" and "lifecycle: " in r.getMessage()])
    theirs = stream_lines([line.split(": ", 1)[-1] for line in envoy_log.splitlines() if "lifecycle: " in line])
    assert len(ours) > 10
    assert ours == theirs
