"""Differential tests: the same plugins and requests through Envoy (V8) and wasmgate.

Compared on every request: status, body, the headers plugins set (on the response and on
what the upstream received), the upstream-received body, the plugins' own log lines
(Envoy's wasm log at debug), and the plugins' metrics on the admin /stats.

Every case runs against two Envoys: one with a static bootstrap (tests/envoy_harness.py) and
one configured by ``wasmgate envoy`` over ADS/ECDS from the same WasmPlugin files
(tests/xds_harness.py), so the same assertions hold for the Envoy wasmgate drives.
"""

from __future__ import annotations

import http.client
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from envoy_harness import Envoy, EnvoyPlugin
from plugin_checks import (
    PluginLogs,
    assert_same_logs,
    assert_same_metrics,
    envoy_messages,
    plugin_metrics,
    settled,
    stats,
)
from servers import ALLOW_HEADER_WASM, PLUGIN_BUILD, ProxyThread, Upstream, start_upstream, wasmplugin_yaml
from wasmgate.resources.config import XdsConfig
from xds_harness import GatewayThread

# "static": the harness's bootstrap; "xds": `wasmgate envoy`, Envoy configured over ADS.
ENVOY_KINDS = ["static", "xds"]


@pytest.fixture(params=ENVOY_KINDS)
def envoy_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass(frozen=True)
class Plugin:
    name: str
    wasm: Path
    config: dict[str, object] | None = None
    vm_id: str | None = None  # None: a VM of its own on both sides
    fail: str = ""  # failStrategy: FAIL_CLOSE (default), FAIL_OPEN


@dataclass
class Observed:
    status: int
    body: bytes
    headers: dict[str, str]  # response headers a plugin may have set
    upstream_headers: dict[str, str]  # request headers a plugin may have set, as the upstream saw them
    upstream_body: bytes | None


PLUGIN_HEADERS = ("x-wasmgate-denied", "x-chain-resp", "x-wasm", "content-type")
PLUGIN_REQUEST_HEADERS = ("x-chain", "x-resumed", "x-replace", "allow", "x-auth")


def _differences(ours: Observed, theirs: Observed) -> str:
    out = [f"{k}: {getattr(ours, k)!r} (Envoy: {getattr(theirs, k)!r})" for k in ("status", "body", "upstream_body")
           if getattr(ours, k) != getattr(theirs, k)]
    for name in ("headers", "upstream_headers"):
        a, b = getattr(ours, name), getattr(theirs, name)
        out += [f"{name}[{k}]: {a.get(k)!r} (Envoy: {b.get(k)!r})" for k in sorted({*a, *b}) if a.get(k) != b.get(k)]
    return "; ".join(out)


Connect = Callable[[int], http.client.HTTPConnection]


def _tls_options(tls: dict[str, Any] | None, upstream_tls: dict[str, Any] | None) -> dict[str, Any]:
    """RunOptions for wasmgate's ``tls`` and ``upstream_tls`` config sections."""
    out: dict[str, Any] = {}
    if tls is not None:
        out.update(tls_cert=tls["cert"], tls_key=tls["key"], tls_sni=list(tls.get("sni") or []),
                   tls_client_ca=tls.get("client_ca"),
                   tls_require_client_certificate=bool(tls.get("require_client_certificate")))
    if upstream_tls is not None:
        out.update(upstream_ca=upstream_tls.get("ca"), upstream_cert=upstream_tls.get("cert"),
                   upstream_key=upstream_tls.get("key"))
    return out


class Pair:
    """Envoy and wasmgate with the same plugin chain in front of one upstream.

    Plugins log at debug on both sides. Each ``compare`` checks the log lines the plugins
    wrote while serving that request (root-context lines written at startup are not
    compared: Envoy runs a copy of each VM per thread), and the plugin metrics.
    """

    def __init__(self, plugins: list[Plugin], workdir: Path, clusters: dict[str, Upstream] | None = None,
                 response_headers: tuple[str, ...] = (), xds: dict[str, Any] | None = None,
                 node: dict[str, Any] | None = None, tls: dict[str, Any] | None = None,
                 upstream: Upstream | None = None, upstream_tls: dict[str, Any] | None = None,
                 kind: str = "static"):
        """``tls`` and ``upstream_tls`` are wasmgate's config sections of those names (paths
        as strings); Envoy gets the same certificates. ``upstream`` (this pair's to stop)
        replaces the plain recording upstream, e.g. by an HTTPS one. ``kind`` "xds": the Envoy
        is `wasmgate envoy`, configured over ADS from the same WasmPlugin files."""
        self.response_headers = PLUGIN_HEADERS + response_headers  # compared on every response
        self.upstream = upstream or start_upstream()
        clusters = clusters or {}
        self.last_logs: list[str] = []
        self.logs = PluginLogs()
        # Priorities keep wasmgate's chain in list order, like Envoy's filter list.
        files = [wasmplugin_yaml(workdir, p.name, p.wasm, config=p.config, priority=100 - i,
                                 fail_strategy=p.fail, annotations={"wasmgate.io/vm-id": p.vm_id}
                                 if p.vm_id is not None else None)
                 for i, p in enumerate(plugins)]
        self.envoy: Envoy | GatewayThread
        if kind == "xds":  # the same WasmPlugin files, through `wasmgate envoy`
            ut = upstream_tls or {}
            self.envoy = GatewayThread(files, self.upstream.url, workdir / "xds", autostart=False, tls=tls,
                                       upstream_ca=ut.get("ca"), upstream_cert=ut.get("cert"),
                                       upstream_key=ut.get("key"),
                                       clusters={n: u.url for n, u in clusters.items()}, node=dict(node or {}),
                                       xds=XdsConfig(**(xds or {})).model_dump(exclude_none=True),
                                       envoy_component_log_level="wasm:debug")
        else:
            # As Istio translates a WasmPlugin: root_id from pluginName, config as JSON text.
            envoy_plugins = [EnvoyPlugin(p.name, p.wasm, json.dumps(p.config, separators=(",", ":"))
                                         if p.config is not None else "", root_id=p.name, vm_id=p.vm_id,
                                         fail_open=p.fail == "FAIL_OPEN") for p in plugins]
            self.envoy = Envoy(envoy_plugins, self.upstream.port, workdir / "envoy", log_level="debug",
                               clusters={n: u.port for n, u in clusters.items()}, xds=xds, node=node, tls=tls,
                               upstream_tls=upstream_tls)
            (workdir / "envoy").mkdir(exist_ok=True)
        try:
            self.envoy.start()
            self.wasmgate = ProxyThread(files, self.upstream.url, clusters={n: u.url for n, u in clusters.items()},
                                        node=dict(node or {}), xds=XdsConfig(**(xds or {})).info(),
                                        **_tls_options(tls, upstream_tls))
        except BaseException:
            self.envoy.stop()
            self._restore()
            raise

    def _restore(self) -> None:
        self.logs.close()
        self.upstream.server.shutdown()

    def stop(self) -> None:
        try:
            self.wasmgate.stop()
            self.envoy.stop()
        finally:
            self._restore()

    def observe(self, port: int, method: str, path: str, headers: dict[str, str], body: bytes | None,
                connect: Connect | None = None) -> Observed:
        before = len(self.upstream.seen)
        conn = connect(port) if connect is not None else http.client.HTTPConnection("127.0.0.1", port, timeout=20)
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

    def envoy_messages(self) -> list[str]:
        return envoy_messages(self.envoy)

    def compare(self, method: str = "GET", path: str = "/", headers: dict[str, str] | None = None,
                body: bytes | None = None, connect: Connect | None = None) -> Observed:
        """One request to each; ``connect`` makes the client connection to a port (default: plain HTTP)."""
        envoy_before, ours_before = len(self.envoy_messages()), len(self.logs.messages)
        expected = self.observe(self.envoy.port, method, path, headers or {}, body, connect)
        actual = self.observe(self.wasmgate.port, method, path, headers or {}, body, connect)
        assert actual == expected, f"wasmgate differs from Envoy for {method} {path} {headers}: " + _differences(
            actual, expected)
        ours, theirs = settled((lambda: self.logs.messages, ours_before), (self.envoy_messages, envoy_before))
        assert_same_logs(ours, theirs, f"{method} {path} {headers}")
        self.last_logs = ours
        self.compare_metrics()
        return actual

    def compare_metrics(self) -> None:
        """Plugin metrics on /stats/prometheus (histograms without values: Envoy shows them after its 5 s flush)."""
        assert_same_metrics(plugin_metrics(self.wasmgate.admin_port), plugin_metrics(self.envoy.admin_port), "")


@pytest.fixture(scope="module", params=ENVOY_KINDS)
def allow_pair(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Pair]:
    pair = Pair([Plugin("allow-header", ALLOW_HEADER_WASM, {"header": "allow", "value": "true"})],
                tmp_path_factory.mktemp("allow"), kind=request.param)
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


def test_pause_resume_and_body_rewrite_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    pair = Pair([Plugin("pause", PLUGIN_BUILD / "pause.wasm")], tmp_path, kind=envoy_kind)
    try:
        got = pair.compare(headers={"x-pause": "1"})
        assert got.upstream_headers.get("x-resumed") == "tick"
        # Envoy: a body read in a header callback is empty (OK), a write there BAD_ARGUMENT,
        # and a local reply asked for from the root context (on_tick) is OK and does nothing.
        for what in ("request", "response"):
            assert (f"pause: {what} body in headers status=0 size=0 bytes status=0 len=0 set status=2 "
                    "setempty status=2") in pair.last_logs
        assert "pause: local reply from root status=0" in pair.last_logs
        got = pair.compare("POST", "/b", {"x-pause": "1"}, b"some body")
        assert got.upstream_body == b"SOME BODY"
        pair.compare("POST", "/b", {}, b"no pause here")
    finally:
        pair.stop()


def test_chain_and_local_reply_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    pair = Pair([Plugin("first", PLUGIN_BUILD / "tag.wasm", {"tag": "first"}),
                 Plugin("allow", ALLOW_HEADER_WASM),
                 Plugin("after", PLUGIN_BUILD / "tag.wasm", {"tag": "after"}),
                 Plugin("mutate", PLUGIN_BUILD / "mutate.wasm")], tmp_path, kind=envoy_kind)
    try:
        denied = pair.compare()
        assert denied.headers["x-chain-resp"] == "first"
        allowed = pair.compare(headers={"allow": "true", "x-replace": "x"})
        assert allowed.headers["x-chain-resp"] == "after, first"
        assert allowed.upstream_headers["x-chain"] == "first, after"
        assert allowed.upstream_headers["x-replace"] == "replaced"
    finally:
        pair.stop()


def test_http_callout_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    auth = start_upstream()
    pair = Pair([Plugin("callout", PLUGIN_BUILD / "callout.wasm")], tmp_path, clusters={"auth": auth},
                kind=envoy_kind)
    try:
        assert pair.compare(headers={"x-user": "alice"}).upstream_headers["x-auth"] == "ok:alice"
        assert "callout: local reply from root status=0" in pair.last_logs  # OK, nothing happens
        assert pair.compare(headers={"x-user": "mallory"}).status == 403
        assert pair.compare(headers={"x-user": "slow"}).body == b"denied: 504\n"  # the plugin's 2 s timeout
        assert pair.compare().status == 200
        assert pair.compare("POST", "/p", {"x-user": "bob"}, b"request body").upstream_body == b"request body"
    finally:
        pair.stop()
        auth.server.shutdown()


# Attributes whose values are the same in both proxies for the same request.
STABLE_PROPERTIES = [
    "request.path", "request.url_path", "request.query", "request.method", "request.scheme", "request.protocol",
    "request.useragent", "request.referer", "request.size", "request", "request.nope",
    "response.code", "response.code_details", "response.flags", "response.grpc_status", "response.size",
    "response.trailers", "response",
    "connection.mtls", "connection.requested_server_name", "connection.tls_version",
    "connection.termination_details", "connection.transport_failure_reason",
    "connection.sha256_peer_certificate_digest",
    "upstream.request_attempt_count", "upstream.transport_failure_reason", "upstream.locality", "upstream.tls_version",
    "upstream.connection_pool_ready_duration", "source", "source.nope", "destination",
    "metadata", "metadata.filter_metadata", "filter_state", "upstream_filter_state",
    "xds", "xds.cluster_name", "xds.route_name", "xds.virtual_host_name", "xds.filter_chain_name",
    "xds.listener_direction", "xds.route_metadata", "xds.cluster_metadata", "xds.listener_metadata",
    "xds.upstream_host_metadata", "xds.node.id", "xds.node.cluster",
    "xds.node.metadata", "xds.node.metadata.WORKLOAD_NAME", "xds.node.nope", "xds.nope",
    "plugin_name", "plugin_root_id", "wasmgate_test", "wasmgate_test.x", "no.such.attribute",
    "node", "node.id", "cluster_name", "route_name", "listener_metadata", "upstream_host_metadata",
]
# Attributes whose values differ per run (times, ports, ids): only their encoding is compared.
# (Not request.headers or request.total_size: in on_log Envoy's request map also holds the
# x-envoy-expected-rq-timeout-ms its router added, which wasmgate does not send.)
SHAPES = ["request.time", "request.duration", "request.id", "request.host",
          "response.backend_latency", "connection.id", "connection_id", "source.address", "source.port",
          "destination.address", "destination.port", "upstream.address", "upstream.port", "upstream.local_address",
          "xds.virtual_host_metadata"]  # several keys: Envoy serializes maps in hash order
SEGMENTS = [["request", "headers", "user-agent"], ["request", "headers", "User-Agent"],
            ["request", "headers", "x-dup"], ["request", "headers", ":method"], ["request", "headers", "x-missing"],
            ["request", "headers", "bad name"], ["response", "headers", ":status"],
            ["filter_state", "wasm.wasmgate_test"], ["filter_state", "nope"],
            ["xds", "route_metadata", "filter_metadata"], ["xds", "route_metadata", "filter_metadata", "ns.a"],
            ["xds", "route_metadata", "filter_metadata", "ns.a", "s"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "n"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "t"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "l"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "l", "1"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "l", "7"],
            ["xds", "virtual_host_metadata", "filter_metadata", "ns.b", "z"],
            ["xds", "cluster_metadata", "filter_metadata", "istio", "name"],
            ["xds", "upstream_host_metadata", "filter_metadata", "envoy.lb", "canary"]]
XDS = {"cluster_name": "outbound|80||web.ns.svc.cluster.local", "route_name": "default",
       "virtual_host_name": "web.ns.svc.cluster.local:80", "filter_chain_name": "fc0",
       "listener_direction": "OUTBOUND",
       "route_metadata": {"filter_metadata": {"ns.a": {"s": "v"}}},
       # (a float would reach Envoy as a string: its YAML loader's doing)
       "virtual_host_metadata": {"filter_metadata": {"ns.b": {"n": 2, "t": True, "l": [1, "x"], "z": None}}},
       "cluster_metadata": {"filter_metadata": {"istio": {"name": "web"}}},
       "listener_metadata": {"filter_metadata": {"l": {"k": "v"}}},
       "upstream_host_metadata": {"filter_metadata": {"envoy.lb": {"canary": True}}}}
NODE = {"id": "sidecar~10.0.0.1~web.ns~ns.svc.cluster.local", "cluster": "web.ns",
        "metadata": {"WORKLOAD_NAME": "web"}}


def istio_only(kind: str, items: list[str]) -> list[str]:
    """Through `wasmgate envoy`, plugin_name is Istio's ("<namespace>.<name>", while wasmgate's own
    proxy says "<name>"): not compared there; tests/test_xds_envoy.py checks Istio's value."""
    return [i for i in items if kind == "static" or i != "plugin_name"]


def test_properties_same_as_envoy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, envoy_kind: str) -> None:
    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)  # a header per attribute read
    stable = istio_only(envoy_kind, STABLE_PROPERTIES)
    config = {"paths": stable, "shapes": SHAPES, "segments": SEGMENTS}
    headers = (*(f"x-{kind}{req}{p}" for kind, paths in (("prop-", stable), ("shape-", SHAPES))
                 for req in ("", "req-") for p in paths),
               *(f"x-seg-{req}{i}" for req in ("", "req-") for i in range(len(SEGMENTS))), "x-prop-filter-state")
    pair = Pair([Plugin("props", PLUGIN_BUILD / "props.wasm", config)], tmp_path, response_headers=headers,
                xds=XDS, node=NODE, kind=envoy_kind)
    try:
        got = pair.compare(path="/a/b?x=1&y=2", headers={"user-agent": "diff/1", "referer": "http://r/",
                                                           "x-dup": "a"})
        # read in on_response_headers: request headers are gone there, in Envoy too
        assert got.headers["x-prop-request.path"] == "status:1"
        assert got.headers["x-prop-request.protocol"] == b"HTTP/1.1".hex()
        assert got.headers["x-prop-req-request.path"] == b"/a/b?x=1&y=2".hex()
        assert got.headers["x-prop-req-request.url_path"] == b"/a/b".hex()
        assert got.headers["x-prop-response.code"] == (200).to_bytes(8, "little").hex()
        assert got.headers["x-prop-filter-state"] == b"set-by-plugin".hex()
        assert got.headers["x-prop-xds.route_name"] == b"default".hex()
        assert got.headers["x-prop-xds.node.id"] == NODE["id"].encode().hex()  # type: ignore[attr-defined]
        assert got.headers["x-shape-request.duration"] == "status:1"  # set when the stream completes
        assert "props: log shape request.duration = len:8" in pair.last_logs
        pair.compare("POST", "/", {"content-length": "4"}, b"body")
        pair.compare("POST", "/", {"x-dup": "b"}, b"chunked body")  # http.client sends it chunked
    finally:
        pair.stop()


EXPRESSIONS = ["request.path", "1 + 2", "request.method == 'GET'", "response.code", "bad ((", "xds.cluster_name",
               "request.headers['user-agent']", "size(request.headers) > 2", "plugin_name", "wasmgate_test",
               "connection.mtls", "xds.route_metadata", "xds.route_metadata.filter_metadata['ns.a'].s",
               "[1, 'a', true]", "{'k': 2u}", "duration('1.5s')", "timestamp('2020-01-01T00:00:00.123456789Z')",
               "b'\\x00\\x01'", "null", "1.5", "upstream.request_attempt_count", "connection_id > 0u",
               "request.time > timestamp('2020-01-01T00:00:00Z')", "no_such_ident", "'a' + 'b'", "int('x')",
               "xds.node.metadata.WORKLOAD_NAME", "request.size + 1"]


def _signing_calls() -> list[dict[str, str]]:
    """sign / verify_signature arguments (serialized protobuf, hex) for good and bad cases."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    def msg(*fields: tuple[int, bytes]) -> str:
        out = b""
        for n, v in fields:
            out += bytes([n << 3 | 2, len(v)]) if len(v) < 128 else bytes([n << 3 | 2, len(v) & 0x7F | 0x80,
                                                                              len(v) >> 7])
            out += v
        return out.hex()

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    der = rsa_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    pub_pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_der = rsa_key.public_key().public_bytes(serialization.Encoding.DER,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    good = rsa_key.sign(b"hello", padding.PKCS1v15(), hashes.SHA256())
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pub = ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    ec_sig = ec_key.sign(b"hello", ec.ECDSA(hashes.SHA384()))
    calls = [("sign", msg((1, b"sha256"), (3, b"hello"), (4, pem))),  # RSA PKCS#1 v1.5: deterministic
             ("sign", msg((1, b"SHA512"), (2, der), (3, b"hello"))),
             ("sign", msg((1, b"md5"), (3, b"hello"), (4, pem))),
             ("sign", msg((1, b"sha256"), (3, b"hello"))),  # no key
             ("sign", msg((1, b"sha256"), (2, der), (3, b"hello"), (4, pem))),  # both
             ("sign", msg((1, b"sha256"), (3, b"hello"), (4, b"not a key"))),
             ("verify_signature", msg((1, b"sha256"), (3, good), (4, b"hello"), (5, pub_pem))),
             ("verify_signature", msg((1, b"sha256"), (2, pub_der), (3, good), (4, b"hello"))),
             ("verify_signature", msg((1, b"sha256"), (3, good), (4, b"tampered"), (5, pub_pem))),
             ("verify_signature", msg((1, b"sha1"), (3, good), (4, b"hello"), (5, pub_pem))),
             ("verify_signature", msg((1, b"sha384"), (3, ec_sig), (4, b"hello"), (5, ec_pub))),
             ("verify_signature", msg((1, b"nope"), (3, good), (4, b"hello"), (5, pub_pem))),
             ("verify_signature", msg((1, b"sha256"), (3, good), (4, b"hello"), (5, b"garbage"))),
             ("verify_signature", msg((1, b"sha256"), (3, good), (4, b"hello")))]
    return [{"name": n, "arg": a} for n, a in calls]


def test_cel_and_signing_same_as_envoy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, envoy_kind: str) -> None:
    """expr_create/expr_evaluate (every expression in every phase) and sign/verify_signature."""
    calls = _signing_calls()
    exprs = istio_only(envoy_kind, EXPRESSIONS)
    config = {"exprs": exprs, "foreign": calls}
    headers = (*(f"x-expr-{req}{i}" for req in ("", "req-") for i in range(len(exprs))),
               *(f"x-foreign-req-{i}" for i in range(len(calls))))
    pair = Pair([Plugin("props", PLUGIN_BUILD / "props.wasm", config)], tmp_path, response_headers=headers,
                xds=XDS, node=NODE, kind=envoy_kind)
    try:
        got = pair.compare(path="/a?b=1", headers={"user-agent": "diff/1"})
        assert got.headers["x-expr-req-0"] == b"/a?b=1".hex()
        assert got.headers["x-expr-req-4"] == "not-created"  # the syntax error
        assert got.headers["x-expr-0"] == "status:10"  # request.path in on_response_headers: an error
        assert got.headers["x-foreign-req-0"].startswith("0801")  # SignResult{result: true, ...}
        assert got.headers["x-foreign-req-6"] == "0801"  # VerifySignatureResult{result: true}
        pair.compare("POST", "/p", {"content-length": "3"}, b"abc")
    finally:
        pair.stop()


def test_callback_sequence_and_plugin_logs_same_as_envoy(tmp_path: Path, envoy_kind: str) -> None:
    """The plugin's own log lines (every callback with its arguments) match Envoy's, in
    order, and so do its metrics (compare() checks both)."""
    pair = Pair([Plugin("lifecycle", PLUGIN_BUILD / "lifecycle.wasm")], tmp_path, kind=envoy_kind)
    try:
        pair.compare("POST", "/p", {}, b"some body")
        assert len(pair.last_logs) > 5
        assert any(m.startswith("lifecycle: on_request_body ctx=2 size=9 ") for m in pair.last_logs)
        pair.compare("GET", "/g")
        metrics_text = stats(pair.wasmgate.admin_port, "/stats/prometheus")
        assert "lifecycle_requests{} 2" in metrics_text
        assert "lifecycle_body_bytes{}" in metrics_text
        assert "lifecycle_active{} 0" in metrics_text
    finally:
        pair.stop()


def test_vm_sharing_same_as_envoy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two plugins with one vm_id and module share a VM (its Go globals show it), each with
    its own root context and timer; a trap fails the VM for both; a third plugin with
    another vm_id is on a VM of its own. Same headers, statuses and plugin log lines."""
    import re

    wasm = PLUGIN_BUILD / "vmshare.wasm"
    with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
        pair = Pair([Plugin("a", wasm, {"tag": "a", "tick": 10}, vm_id="shared"),
                     Plugin("b", wasm, {"tag": "b"}, vm_id="shared", fail="FAIL_OPEN"),
                     Plugin("c", wasm, {"tag": "c"}, vm_id="own")], tmp_path,
                    response_headers=("x-vmshare-a", "x-vmshare-b", "x-vmshare-c"))
        try:
            time.sleep(0.3)  # a's timer has ticked on both sides
            first = pair.compare()
            assert first.headers["x-vmshare-a"] == ("vm_starts=2 configures=2 roots=2 vm_requests=2 "
                                                    "own_requests=1 ticking=yes ctx=3 root=1")
            assert first.headers["x-vmshare-b"].endswith("ticking=no ctx=4 root=2")
            assert first.headers["x-vmshare-c"].startswith("vm_starts=1 configures=1 roots=1 vm_requests=1")
            pair.compare("POST", "/p", {}, b"body")
            assert pair.compare(headers={"x-vmshare-trap": "b"}).status == 503
            assert pair.compare().status == 503  # a fails closed: its VM failed with b's trap
            ours = [r.getMessage() for r in caplog.records if "vmshare: " in r.getMessage()]
            time.sleep(0.5)  # Envoy writes its log asynchronously
            envoy_log = pair.envoy.log_text()
        finally:
            pair.stop()
    # Envoy also runs each plugin in a canary VM and on its main thread: compare its
    # worker's lines, the thread that served the requests.
    worker = re.search(r"\]\[(\d+)\]\[info\]\[wasm\].*vmshare: trapping", envoy_log)
    assert worker is not None
    theirs = [line.split("] ", 2)[-1] for line in envoy_log.splitlines()
              if f"][{worker.group(1)}][" in line and "vmshare: " in line]
    assert ours[0] == "wasm log a shared: vmshare: root_create ctx=1 roots=1"
    assert "wasm log b b shared: vmshare: trapping tag=b" in ours
    assert ours == theirs


@pytest.mark.parametrize("hold", [False, True])
def test_body_resize_without_content_length_same_as_envoy(tmp_path: Path, hold: bool) -> None:
    """A plugin that changes body sizes and removes content-length first, as the SDK
    examples advise: well-defined in Envoy too (chunked there; wasmgate frames a whole
    body with its length). Envoy never fixes a content-length left in place: see
    tests/test_body_length.py and docs/abi-support.md, Body length."""
    pair = Pair([Plugin("resize", PLUGIN_BUILD / "resize.wasm")], tmp_path)
    base = {"x-resize-drop-length": "1", **({"x-resize-hold": "headers"} if hold else {})}
    try:
        for op, want in (("append", b"0123456789+appended"), ("shrink", b"01234"), ("replace", b"replaced")):
            assert pair.compare("POST", "/r", {"x-resize-req": op, **base}, b"0123456789").upstream_body == want
            body = pair.compare("POST", "/r", {"x-resize-resp": op, **base}, b"0123456789").body
            assert body == b"replaced" if op == "replace" else body.endswith(b"+appended") if op == "append" else \
                body.startswith(b'{"method"') and not body.endswith(b"}")
    finally:
        pair.stop()
