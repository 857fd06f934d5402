"""VM sharing: plugins with the same VM key (vm_id, VM configuration, module) run in one
module instance, each with its own root context, as Envoy runs them in one VM per worker.

The vmshare test plugin reports its VM's Go globals (how often proxy_on_vm_start and
proxy_on_configure ran, requests seen, root contexts alive) in `x-vmshare-<tag>`;
tests/test_envoy_diff.py runs the same setups through Envoy.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import hostile
from servers import PLUGIN_BUILD, ProxyThread, Upstream, wasmplugin_yaml
from test_e2e import request
from test_live import wait_for
from wasmgate.plugin.context import HttpContext, Stream
from wasmgate.plugin.manager import engine
from wasmgate.plugin.spec import PluginSpec
from wasmgate.plugin.vm import PluginError, PluginVM
from wat_util import SCRATCH, load_module, module_wat, write_module

VMSHARE = PLUGIN_BUILD / "vmshare.wasm"


def plugin_file(directory: Path, name: str, *, tick: int = 0, wasm: Path = VMSHARE, fail: str = "",
                vm_id: str = "shared", tag: str | None = None, annotations: dict[str, str] | None = None) -> Path:
    config: dict[str, Any] = {"tag": tag or name}
    if tick:
        config["tick"] = tick
    return wasmplugin_yaml(directory, name, wasm, config=config, fail_strategy=fail,
                           annotations={"wasmgate.io/vm-id": vm_id, **(annotations or {})})


def state(headers: dict[str, str], tag: str) -> dict[str, str]:
    """The plugin's `x-vmshare-<tag>` header as a dict."""
    return dict(kv.split("=", 1) for kv in headers[f"x-vmshare-{tag}"].split())


def plugins(p: ProxyThread) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/plugins", timeout=10) as r:
        return {d["name"]: d for d in json.loads(r.read())["plugins"]}


def other_module(tmp_path: Path) -> Path:
    """vmshare.wasm with a custom section appended: same code, another sha256."""
    path = tmp_path / "vmshare-b.wasm"
    payload = b"\x05other" + b"v2"
    path.write_bytes(VMSHARE.read_bytes() + b"\x00" + bytes([len(payload)]) + payload)
    return path


def test_same_vm_id_and_module_share_one_vm(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyThread([plugin_file(tmp_path, "a", tick=10), plugin_file(tmp_path, "b")], upstream.url)
    try:
        status, headers, _ = request(proxy.port)
        assert status == 200
        # One VM: initialized once, then each plugin's root context got
        # context_create, vm_start and configure (Envoy calls vm_start per root context).
        a, b = state(headers, "a"), state(headers, "b")
        for s in (a, b):
            assert (s["vm_starts"], s["configures"], s["roots"], s["vm_requests"]) == ("2", "2", "2", "2")
            assert s["own_requests"] == "1"
        assert (a["root"], b["root"], a["ctx"], b["ctx"]) == ("1", "2", "3", "4")  # ids per VM, as in Envoy
        wait_for(lambda: state(request(proxy.port)[1], "a")["ticking"] == "yes")  # a's timer only
        status, headers, _ = request(proxy.port)
        assert state(headers, "b")["ticking"] == "no"
        assert int(state(headers, "b")["vm_requests"]) == 2 * int(state(headers, "b")["own_requests"])
        info = plugins(proxy)
        assert info["a"]["vm_key"] == info["b"]["vm_key"]
        assert info["a"]["vm_instance"] == info["b"]["vm_instance"]
        assert (info["a"]["vm_shared_with"], info["b"]["vm_shared_with"]) == (["b"], ["a"])
        assert (info["a"]["root_context_id"], info["b"]["root_context_id"]) == (1, 2)
    finally:
        proxy.stop()


@pytest.mark.parametrize("what", ["vm_id", "module", "limits"])
def test_another_vm_key_gets_its_own_vm(tmp_path: Path, upstream: Upstream, what: str) -> None:
    b = {"vm_id": plugin_file(tmp_path, "b", vm_id="other"),
         "module": plugin_file(tmp_path, "b", wasm=other_module(tmp_path)),
         "limits": plugin_file(tmp_path, "b", annotations={"wasmgate.io/max-memory-bytes": str(64 << 20)})}[what]
    proxy = ProxyThread([plugin_file(tmp_path, "a"), b], upstream.url)
    try:
        _, headers, _ = request(proxy.port)
        for tag in "ab":
            s = state(headers, tag)
            assert (s["vm_starts"], s["roots"], s["vm_requests"], s["root"]) == ("1", "1", "1", "1")
        info = plugins(proxy)
        assert info["a"]["vm_instance"] != info["b"]["vm_instance"]
        assert info["a"]["vm_shared_with"] == info["b"]["vm_shared_with"] == []
    finally:
        proxy.stop()


def test_istio_plugins_of_one_module_share_a_vm(tmp_path: Path, upstream: Upstream) -> None:
    """Istio sets no vm_id: WasmPlugins with the same module share one VM, as in Envoy."""
    files = [wasmplugin_yaml(tmp_path, n, VMSHARE, config={"tag": n}) for n in "ab"]
    proxy = ProxyThread(files, upstream.url)
    try:
        _, headers, _ = request(proxy.port)
        assert state(headers, "a")["roots"] == state(headers, "b")["roots"] == "2"
    finally:
        proxy.stop()


def test_config_only_swap_keeps_the_vm_with_a_new_root_context(tmp_path: Path, upstream: Upstream,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    proxy = ProxyThread([plugin_file(tmp_path, "a"), plugin_file(tmp_path, "b")], upstream.url)
    try:
        request(proxy.port)
        before = plugins(proxy)["b"]
        with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
            plugin_file(tmp_path, "b", tag="b2")  # same module and VM config: only pluginConfig changes
            wait_for(lambda: "x-vmshare-b2" in request(proxy.port)[1])
            _, headers, _ = request(proxy.port)
            wait_for(lambda: "vmshare: delete root=2 tag=b roots=2" in caplog.text)
        after = plugins(proxy)["b"]
        b2, a = state(headers, "b2"), state(headers, "a")
        # The VM kept its globals: a third root context was started and configured on it
        # (the canary ran in a VM of its own), then b's old root context was done and deleted.
        assert (b2["vm_starts"], b2["configures"], b2["roots"]) == ("3", "3", "2")
        assert int(b2["root"]) > 2 and a["root"] == "1"
        assert after["vm_instance"] == before["vm_instance"] == plugins(proxy)["a"]["vm_instance"]
        assert after["root_context_id"] == int(b2["root"])
        lines = [r.getMessage() for r in caplog.records if "vmshare: done root=2" in r.getMessage()]
        assert lines == ["wasm log b shared: vmshare: done root=2 tag=b"]
    finally:
        proxy.stop()


def test_module_change_moves_the_plugin_to_a_new_vm(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ProxyThread([plugin_file(tmp_path, "a"), plugin_file(tmp_path, "b")], upstream.url)
    try:
        request(proxy.port)
        plugin_file(tmp_path, "b", wasm=other_module(tmp_path))
        wait_for(lambda: state(request(proxy.port)[1], "b")["vm_starts"] == "1")
        wait_for(lambda: state(request(proxy.port)[1], "a")["roots"] == "1")  # b's old root deleted
        _, headers, _ = request(proxy.port)
        assert state(headers, "a")["vm_starts"] == "2"  # a stayed on its VM
        info = plugins(proxy)
        assert info["a"]["vm_instance"] != info["b"]["vm_instance"]
    finally:
        proxy.stop()


def test_an_instance_no_plugin_runs_on_is_forgotten(tmp_path: Path, upstream: Upstream) -> None:
    """After a module change the old instance's key is never looked up again: the pool must not keep it."""
    proxy = ProxyThread([plugin_file(tmp_path, "a")], upstream.url)
    try:
        request(proxy.port)
        first = plugins(proxy)["a"]["vm_instance"]
        plugin_file(tmp_path, "a", wasm=other_module(tmp_path))
        wait_for(lambda: plugins(proxy)["a"]["vm_instance"] != first)
        assert len(proxy.running.app.chain.pool.keys()) == 1
    finally:
        proxy.stop()


def test_removing_one_plugin_keeps_the_vm_for_the_others(tmp_path: Path, upstream: Upstream,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "plugins"
    directory.mkdir()
    plugin_file(directory, "a")
    b = plugin_file(directory, "b")
    proxy = ProxyThread([directory], upstream.url)
    try:
        request(proxy.port)
        instance = plugins(proxy)["a"]["vm_instance"]
        with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
            b.unlink()
            wait_for(lambda: "x-vmshare-b" not in request(proxy.port)[1])
            wait_for(lambda: "vmshare: delete root=2 tag=b roots=1" in caplog.text)
        _, headers, _ = request(proxy.port)
        a = state(headers, "a")
        assert (a["vm_starts"], a["roots"], a["root"]) == ("2", "1", "1")
        assert int(a["vm_requests"]) >= 3  # the same VM's count goes on
        assert plugins(proxy)["a"]["vm_instance"] == instance
        assert plugins(proxy)["a"]["vm_shared_with"] == []
    finally:
        proxy.stop()


def test_trap_fails_every_plugin_on_the_vm(tmp_path: Path, upstream: Upstream) -> None:
    # a fails closed, b (which traps) open; c has a VM of its own and is unaffected.
    files = [plugin_file(tmp_path, "a", fail="FAIL_CLOSE"), plugin_file(tmp_path, "b", fail="FAIL_OPEN"),
             plugin_file(tmp_path, "c", vm_id="own")]
    proxy = ProxyThread(files, upstream.url)
    try:
        assert request(proxy.port)[0] == 200
        assert request(proxy.port, headers={"x-vmshare-trap": "b"})[0] == 503
        status = request(proxy.port)[0]
        info = plugins(proxy)
        assert status == 503  # a never trapped: its VM did
        assert (info["a"]["state"], info["b"]["state"], info["c"]["state"]) == ("failed", "failed", "running")
        assert info["a"]["last_error"] == info["b"]["last_error"]
        assert "proxy_on_request_headers" in info["a"]["last_error"]
    finally:
        proxy.stop()


def test_fail_open_plugins_on_a_failed_vm_are_skipped(tmp_path: Path, upstream: Upstream) -> None:
    files = [plugin_file(tmp_path, "a", fail="FAIL_OPEN"), plugin_file(tmp_path, "b", fail="FAIL_OPEN"),
             plugin_file(tmp_path, "c", vm_id="own")]
    proxy = ProxyThread(files, upstream.url)
    try:
        request(proxy.port, headers={"x-vmshare-trap": "b"})
        status, headers, _ = request(proxy.port)
        assert status == 200
        assert "x-vmshare-a" not in headers and "x-vmshare-b" not in headers
        assert state(headers, "c")["vm_requests"] == "2"  # it saw both requests
    finally:
        proxy.stop()


def test_fail_reload_recreates_the_shared_vm(tmp_path: Path, upstream: Upstream) -> None:
    fast = {"wasmgate.io/reload-backoff-ms": "20"}
    files = [plugin_file(tmp_path, n, fail="FAIL_RELOAD", annotations=fast) for n in "ab"]
    proxy = ProxyThread(files, upstream.url)
    try:
        request(proxy.port)
        before = plugins(proxy)["a"]["vm_instance"]
        assert request(proxy.port, headers={"x-vmshare-trap": "b"})[0] == 503
        wait_for(lambda: all(p["state"] == "running" and p["reloads"] == 1 for p in plugins(proxy).values()))
        status, headers, _ = request(proxy.port)
        assert status == 200
        # Both plugins are back on one fresh VM: its globals start over.
        for tag in "ab":
            s = state(headers, tag)
            assert (s["vm_starts"], s["configures"], s["roots"], s["vm_requests"]) == ("2", "2", "2", "2")
        info = plugins(proxy)
        assert info["a"]["vm_instance"] == info["b"]["vm_instance"] != before
    finally:
        proxy.stop()


def test_fail_reload_next_to_fail_close(tmp_path: Path, upstream: Upstream) -> None:
    """Envoy's answer too: the reloading plugin gets a fresh VM of its own; the other stays failed."""
    files = [plugin_file(tmp_path, "a", fail="FAIL_RELOAD", annotations={"wasmgate.io/reload-backoff-ms": "20"}),
             plugin_file(tmp_path, "b", fail="FAIL_CLOSE")]
    proxy = ProxyThread(files, upstream.url)
    try:
        request(proxy.port, headers={"x-vmshare-trap": "b"})
        wait_for(lambda: plugins(proxy)["a"]["state"] == "running")
        status, headers, _ = request(proxy.port)
        assert status == 503  # b
        s = state(headers, "a")  # a ran on the local reply's response path
        assert (s["vm_starts"], s["roots"]) == ("1", "1")
        assert plugins(proxy)["b"]["state"] == "failed"
    finally:
        proxy.stop()


def test_memory_watchdog_recycles_the_shared_vm(tmp_path: Path, upstream: Upstream) -> None:
    wasm = hostile.write(tmp_path, "leak")  # one 64 KiB page per callback
    limit = {"wasmgate.io/memory-recycle-bytes": str(8 * 65536)}
    files = [wasmplugin_yaml(tmp_path, n, wasm, annotations=limit) for n in ("p", "q")]
    proxy = ProxyThread(files, upstream.url)
    try:
        first = plugins(proxy)
        assert first["p"]["vm_instance"] == first["q"]["vm_instance"]
        statuses = [request(proxy.port)[0] for _ in range(12)]
        wait_for(lambda: all(p["recycles"] >= 1 and p["state"] == "running" for p in plugins(proxy).values()))
        info = plugins(proxy)
    finally:
        proxy.stop()
    assert set(statuses) == {200}
    assert info["p"]["vm_instance"] == info["q"]["vm_instance"] != first["p"]["vm_instance"]
    assert info["p"]["memory_bytes"] == info["q"]["memory_bytes"] <= 8 * 65536 + 2 * 65536


# ---- the instance, driven by hand (tiny WAT modules) --------------------------------------


def _two_on_one(tmp_path: Path, wat: str | None = None) -> tuple[PluginVM, PluginVM]:
    path = write_module(tmp_path, wat if wat is not None else module_wat())
    module = load_module(path)
    a = PluginVM(PluginSpec("a", path, root_id="ra", vm_id="v"), engine(), module)
    a.start()
    b = PluginVM(PluginSpec("b", path, root_id="rb", vm_id="v"), engine(), module, shared=a.shared)
    b.start()
    return a, b


def test_plugins_on_one_instance_share_ids_and_tokens(tmp_path: Path) -> None:
    a, b = _two_on_one(tmp_path)
    assert a.instance is b.instance
    assert (a.root.id, b.root.id) == (1, 2)
    assert a.create_http_context(Stream()).id == 3 and b.create_http_context(Stream()).id == 4
    assert (a.next_call_token(), b.next_call_token()) == (4, 8)  # Envoy numbers callouts per VM
    assert (a.next_grpc_token(False), b.next_grpc_token(True)) == (5, 6)
    assert a.shared.names() == ["a", "b"]


def test_effective_context_may_be_another_plugins(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from wasmgate.host.general import proxy_log, proxy_set_effective_context

    a, b = _two_on_one(tmp_path)
    ctx = b.create_http_context(Stream())
    assert isinstance(ctx, HttpContext)
    assert proxy_set_effective_context(a, ctx.id) == 0
    assert a.shared.current is b and b.effective is ctx
    ptr = SCRATCH
    assert a.instance.write(ptr, b"hello")
    with caplog.at_level(logging.INFO, logger="wasmgate.wasm"):
        proxy_log(a.shared.current, 2, ptr, 5)  # as the bound host function passes it
    assert "wasm log b rb v: hello" in caplog.text


def test_shutdown_of_one_plugin_leaves_the_instance(tmp_path: Path) -> None:
    a, b = _two_on_one(tmp_path)
    b.shutdown()
    assert b.failed == "shut down" and a.failed is None
    assert a.shared.plugins == [a] and set(a.contexts) == {1}
    assert a.create_http_context(Stream()).id == 3  # ids are never reused


def test_start_on_a_failed_instance_is_refused(tmp_path: Path) -> None:
    path = write_module(tmp_path, module_wat())
    a, _ = _two_on_one(tmp_path)
    a.shared.failed = "trapped"
    c = PluginVM(PluginSpec("c", path), engine(), load_module(path), shared=a.shared)
    with pytest.raises(PluginError, match="its VM has failed"):
        c.start()
    assert c not in a.shared.plugins

