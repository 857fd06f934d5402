"""The reference story end to end: Go source -> wasmgate build -> push to a real registry ->
WasmPlugin with oci:// and imagePullSecret -> picked up by the running proxy -> v2 swapped in
under load with no failed request."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from oci_harness import PASSWORD, USER, Registry
from servers import REPO, ProxyThread, Upstream
from test_e2e import request

WASMGATE = [sys.executable, "-m", "wasmgate"]


REGISTRY_KIND = "basic"  # of conftest's registry fixture


def wg(*args: str, stdin: str | None = None) -> str:
    r = subprocess.run([*WASMGATE, *args], capture_output=True, text=True, input=stdin, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def push(registry: Registry, wasm: Path, tag: str) -> str:
    out = wg("push", str(wasm), registry.ref(f"plugins/allow-header:{tag}"), "-u", USER, "--password-stdin",
             stdin=PASSWORD)
    assert "sha256:" in out
    return out


def write_resources(d: Path, registry: Registry, tag: str, config: dict[str, str]) -> None:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    dockerconfig = json.dumps({"auths": {registry.host: {"auth": auth}}})
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
              "metadata": {"name": "registry-creds", "namespace": "default"},
              "data": {".dockerconfigjson": base64.b64encode(dockerconfig.encode()).decode()}}
    plugin = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
              "metadata": {"name": "allow-header", "namespace": "default"},
              "spec": {"url": f"oci://{registry.ref('plugins/allow-header:' + tag)}",
                       "imagePullSecret": "registry-creds", "pluginName": "allow-header",
                       "phase": "AUTHN", "failStrategy": "FAIL_CLOSE", "pluginConfig": config}}
    tmp = d / ".resources.yaml.tmp"
    tmp.write_text(json.dumps(secret) + "\n---\n" + json.dumps(plugin))
    tmp.replace(d / "resources.yaml")


def plugins(p: ProxyThread) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/plugins", timeout=10) as r:
        return list(json.loads(r.read())["plugins"])


def wait_for(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_reference_flow(registry: Registry, upstream: Upstream, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))  # only the Secret may help
    v1 = tmp_path / "v1" / "plugin.wasm"
    wg("build", str(REPO / "examples" / "allow-header"), "-o", str(v1))
    push(registry, v1, "v1")

    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    proxy = ProxyThread([plugin_dir], upstream.url)
    try:
        assert request(proxy.port)[0] == 200  # no plugin yet
        write_resources(plugin_dir, registry, "v1", {"header": "allow", "value": "true"})
        wait_for(lambda: request(proxy.port)[0] == 403)  # picked up without a restart
        assert request(proxy.port, headers={"allow": "true"})[0] == 200
        (info,) = plugins(proxy)
        assert info["sha256"] == hashlib.sha256(v1.read_bytes()).hexdigest()
        assert info["url"].startswith("oci://")

        # v2: other bytes (a custom section) and a new config; both versions let this through
        v2 = tmp_path / "v2" / "plugin.wasm"
        v2.parent.mkdir()
        name = b"allow-header-v2"
        v2.write_bytes(v1.read_bytes() + b"\x00" + bytes([len(name) + 1, len(name)]) + name)
        push(registry, v2, "v2")
        both = {"allow": "true", "x-v2": "yes"}
        statuses: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                statuses.append(request(proxy.port, headers=both)[0])

        loader = threading.Thread(target=load)
        loader.start()
        try:
            write_resources(plugin_dir, registry, "v2", {"header": "x-v2", "value": "yes"})
            wait_for(lambda: plugins(proxy)[0]["sha256"] == hashlib.sha256(v2.read_bytes()).hexdigest())
            time.sleep(0.3)
        finally:
            stop.set()
            loader.join(timeout=30)
        assert statuses and set(statuses) == {200}
        assert request(proxy.port, headers={"allow": "true"})[0] == 403  # v2's config is in force
        assert request(proxy.port, headers={"x-v2": "yes"})[0] == 200

        # a tag that does not exist: the pull fails, v2 keeps serving, the error is shown
        write_resources(plugin_dir, registry, "v3-missing", {"header": "x-v2", "value": "yes"})
        wait_for(lambda: plugins(proxy)[0]["last_error"] is not None)
        assert "v3-missing" in plugins(proxy)[0]["last_error"]
        assert plugins(proxy)[0]["sha256"] == hashlib.sha256(v2.read_bytes()).hexdigest()
        assert request(proxy.port, headers={"x-v2": "yes"})[0] == 200
    finally:
        proxy.stop()


def test_unfetchable_module_follows_istio(upstream: Upstream, tmp_path: Path) -> None:
    """No version at all: FAIL_OPEN lets traffic through, FAIL_CLOSE denies with 403."""
    d = tmp_path / "plugins"
    d.mkdir()
    for name, strategy in (("open", "FAIL_OPEN"), ("closed", "FAIL_CLOSE")):
        doc = {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin", "metadata": {"name": name},
               "spec": {"url": "oci://127.0.0.1:9/nothing/here:v1", "failStrategy": strategy}}
        (d / f"{name}.yaml").write_text(json.dumps(doc))
    proxy = ProxyThread([d / "open.yaml"], upstream.url)
    try:
        assert request(proxy.port)[0] == 200
        assert plugins(proxy)[0]["state"] == "unavailable"
    finally:
        proxy.stop()
    proxy = ProxyThread([d / "closed.yaml"], upstream.url)
    try:
        status, _, body = request(proxy.port)
        assert (status, body) == (403, b"RBAC: access denied")
        assert "127.0.0.1:9" in plugins(proxy)[0]["last_error"]
    finally:
        proxy.stop()


def test_modules_in_use_survive_cache_expiry(registry: Registry, upstream: Upstream, tmp_path: Path) -> None:
    from wasmgate.plugin.manager import module_cache

    wasm = tmp_path / "plugin.wasm"
    wg("build", str(REPO / "examples" / "allow-header"), "-o", str(wasm))
    push(registry, wasm, "pinned")
    d = tmp_path / "plugins"
    d.mkdir()
    write_resources(d, registry, "pinned", {"header": "allow", "value": "true"})
    proxy = ProxyThread([d], upstream.url)
    try:
        (info,) = plugins(proxy)
        in_use = Path(info["module"])
        assert module_cache().is_pinned(in_use)
        removed = module_cache().purge(now=time.time() + 10 * 365 * 86400)  # everything has expired
        assert in_use not in removed and in_use.exists()
    finally:
        proxy.stop()
