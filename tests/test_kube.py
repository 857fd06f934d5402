"""``wasmgate run --kube`` against a real kube-apiserver (on kine/SQLite, tests/kube_harness.py),
with a real upstream and real Go plugins: apply, serve, edit under load, delete, restart the API
server, watch expiry (410) after a lost connection, and pull Secrets with a real registry."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from kube_harness import REPO, SA_TOKEN, KubeServer, Relay, kube_server, object_path
from oci_harness import PASSWORD, USER, Registry, shared_registry
from servers import ALLOW_HEADER_WASM, PLUGIN_BUILD, ProxyThread, Upstream
from test_e2e import request
from test_reference_flow import push
from wasmgate.resources.wasmplugin import scan_plugin_specs

CRD = REPO / "deploy" / "kubernetes" / "crd-wasmplugin.yaml"
TAG = PLUGIN_BUILD / "tag.wasm"
NS = "gw"
ALLOW = {"allow": "true"}


def setup_cluster(k: KubeServer) -> None:
    k.apply(yaml.safe_load(CRD.read_text()))
    k.wait_established("wasmplugins.extensions.istio.io")
    for ns in (NS, "wasmgate"):
        k.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeServer]:
    with kube_server(tmp_path_factory.mktemp("kube")) as k:
        setup_cluster(k)
        yield k


def wasmplugin(name: str, wasm: Path, config: dict[str, Any], *, phase: str = "", ns: str = NS,
               **spec: Any) -> dict[str, Any]:
    s: dict[str, Any] = {"url": f"file://{wasm}", "pluginName": name, "pluginConfig": config, **spec}
    if phase:
        s["phase"] = phase
    return {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": name, "namespace": ns}, "spec": s}


def allow_header(wasm: Path = ALLOW_HEADER_WASM) -> dict[str, Any]:
    return wasmplugin("allow-header", wasm, {"header": "allow", "value": "true"}, phase="AUTHN",
                      failStrategy="FAIL_CLOSE")


def tag(value: str) -> dict[str, Any]:
    return wasmplugin("tag", TAG, {"tag": value})


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout:.0f}s"
        time.sleep(0.05)


def status(p: ProxyThread, headers: dict[str, str] | None = None) -> int:
    return request(p.port, headers=headers)[0]


def tag_of(p: ProxyThread) -> str:
    st, headers, _ = request(p.port, headers=ALLOW)
    assert st == 200
    return headers.get("x-chain-resp", "")


def plugin_names(p: ProxyThread) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{p.admin_port}/plugins", timeout=10) as r:
        return [x["name"] for x in json.loads(r.read())["plugins"]]


class Load:
    """Requests with the allow header in a loop from another thread; every status and tag kept."""

    def __init__(self, port: int, headers: dict[str, str] | None = None):
        self.port = port
        self.headers = headers if headers is not None else ALLOW
        self.results: list[tuple[int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                st, headers, _ = request(self.port, headers=self.headers)
                self.results.append((st, headers.get("x-chain-resp", "")))
            except Exception as e:
                self.errors.append(repr(e))
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def proxy_for(k: KubeServer, upstream: Upstream, kubeconfig: Path | None = None, **opts: Any) -> ProxyThread:
    return ProxyThread([], upstream.url, kube=True, kube_namespace=NS,
                       kubeconfig=str(kubeconfig or k.kubeconfig()), **opts)


def test_kube_flow_apply_edit_delete_restart(kube: KubeServer, upstream: Upstream, tmp_path: Path) -> None:
    # 1. the CRD (fixture) and a WasmPlugin, applied through the API server
    kube.apply(allow_header())
    # 2. the proxy serves it, with the rights the example RBAC grants (deploy/kubernetes)
    for doc in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "rbac.yaml").read_text()):
        doc["metadata"]["namespace"] = NS if doc["kind"] != "ServiceAccount" else "wasmgate"
        if doc["kind"] == "RoleBinding":
            doc["subjects"][0]["namespace"] = "wasmgate"
        kube.apply(doc)
    proxy = proxy_for(kube, upstream, kube.kubeconfig(token=SA_TOKEN))
    load: Load | None = None
    try:
        assert plugin_names(proxy) == ["allow-header"]
        assert status(proxy) == 403
        assert status(proxy, ALLOW) == 200

        # 3. edit under load: a second plugin, its config changed, the first one's module switched
        kube.apply(tag("v1"))
        wait_for(lambda: tag_of(proxy) == "v1", what="tag v1 applied")
        load = Load(proxy.port)
        kube.apply(tag("v2"))
        wait_for(lambda: tag_of(proxy) == "v2", what="tag v2 applied")
        moved = tmp_path / "allow-header-copy.wasm"
        shutil.copy(ALLOW_HEADER_WASM, moved)
        kube.apply(allow_header(moved))
        wait_for(lambda: any(h.spec.module_path == moved for h in proxy.running.app.chain.plugins),
                 what="allow-header switched to the copied module")
        assert status(proxy) == 403
        time.sleep(0.2)
        load.stop()
        assert load.errors == []
        assert load.results and {st for st, _ in load.results} == {200}
        assert {t for _, t in load.results} <= {"v1", "v2"}

        # 4. delete: the plugin is removed
        kube.delete(tag("v2"))
        wait_for(lambda: plugin_names(proxy) == ["allow-header"], what="tag removed")
        assert tag_of(proxy) == ""

        # 5. restart the API server and its store, under load: nothing lost, the watch resumes
        load = Load(proxy.port, headers={})
        (live,) = proxy.running.app.chain.plugins
        kube.restart(store=True)
        time.sleep(0.5)
        load.stop()
        assert load.errors == []
        assert load.results and {st for st, _ in load.results} == {403}
        assert plugin_names(proxy) == ["allow-header"]
        kube.apply(tag("after-restart"))
        wait_for(lambda: tag_of(proxy) == "after-restart", timeout=60, what="edit after restart applied")
        # The resync after the restart (resumed watch or relist) left the unchanged plugin as it was.
        assert proxy.running.app.chain.plugins[0] is live and live.reloads == 0
        kube.delete(allow_header())
        wait_for(lambda: status(proxy) == 200, what="allow-header deleted after restart")
    finally:
        if load is not None:
            load.stop()
        proxy.stop()
        for doc in (tag(""), allow_header()):
            with kube.client() as c:
                c.delete(object_path(doc))


def test_watch_expiry_relists_and_sees_what_was_missed(upstream: Upstream, tmp_path: Path) -> None:
    """The connection to the API server is lost; meanwhile a plugin is edited, another deleted,
    and the store compacts past the last resourceVersion seen. Resuming the watch gets 410
    Gone from the API server; the relist brings the edit and the deletion."""
    # No watch cache, and the store compacted every second: old resourceVersions expire for real.
    with kube_server(tmp_path / "kube", apiserver_args=["--watch-cache=false", "--etcd-compaction-interval=1s"],
                     kine_args=["--compact-min-retain=0"]) as k:
        setup_cluster(k)
        k.apply(allow_header())
        k.apply(tag("before"))
        relay = Relay(k.port)
        proxy = proxy_for(k, upstream, k.kubeconfig(server=relay.url))
        source = proxy.running.watcher
        assert source is not None
        try:
            assert tag_of(proxy) == "before" and status(proxy) == 403
            seen = dict(source.versions)  # type: ignore[attr-defined]
            relists = source.relists  # type: ignore[attr-defined]
            relay.cut()
            k.apply(tag("during-outage"))
            k.delete(allow_header())
            wait_for(lambda: expired(k, seen["WasmPlugin"]), what="the last seen resourceVersion expired")
            assert status(proxy) == 403 and tag_of(proxy) == "before"  # nothing changes meanwhile
            relay.resume()
            wait_for(lambda: tag_of(proxy) == "during-outage", timeout=60, what="edit made during the outage")
            wait_for(lambda: status(proxy) == 200, what="deletion made during the outage")
            assert source.relists > relists  # type: ignore[attr-defined]
        finally:
            proxy.stop()
            relay.close()


def expired(k: KubeServer, rv: str) -> bool:
    """Whether a watch from ``rv`` now gets 410 Gone (asked independently of wasmgate)."""
    with k.client() as c:
        r = c.get(f"/apis/extensions.istio.io/v1alpha1/namespaces/{NS}/wasmplugins",
                  params={"watch": "true", "resourceVersion": rv, "timeoutSeconds": "1"})
    if r.status_code == 410:
        return True
    for line in r.text.splitlines():
        event = json.loads(line)
        if event.get("type") == "ERROR" and event["object"].get("code") == 410:
            return True
    return False


def test_pull_secret_from_kubernetes(kube: KubeServer, upstream: Upstream, tmp_path_factory: pytest.TempPathFactory
                                     ) -> None:
    registry: Registry = shared_registry("basic", tmp_path_factory.getbasetemp())
    push(registry, ALLOW_HEADER_WASM, "kube")
    plugin = wasmplugin("pulled", ALLOW_HEADER_WASM, {"header": "x-pulled", "value": "yes"},
                        imagePullSecret="registry-creds")
    plugin["spec"]["url"] = f"oci://{registry.ref('plugins/allow-header:kube')}"
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config = json.dumps({"auths": {registry.host: {"auth": auth}}}).encode()
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
              "metadata": {"name": "registry-creds", "namespace": NS},
              "data": {".dockerconfigjson": base64.b64encode(config).decode()}}
    kube.apply(secret)
    kube.apply(plugin)
    proxy = proxy_for(kube, upstream)
    try:
        assert status(proxy) == 403
        assert status(proxy, {"x-pulled": "yes"}) == 200
        # A Secret that goes away leaves the plugin serving (its last good version), with the error shown.
        kube.delete(secret)
        wait_for(lambda: any("imagePullSecret" in e for e in proxy.running.app.plugins.resource_errors.values()),
                 what="missing Secret reported")
        assert status(proxy) == 403 and plugin_names(proxy) == ["pulled"]
    finally:
        proxy.stop()
        kube.delete(plugin)


def test_deploy_examples_are_accepted(kube: KubeServer) -> None:
    """deploy/kubernetes: the API server takes every object (strict field validation), and
    wasmgate takes the Deployment's arguments."""
    from wasmgate.cli import _parser

    d = REPO / "deploy" / "kubernetes"
    for name in ("rbac.yaml", "gateway.yaml", "wasmplugin-allow-header.yaml"):
        for doc in yaml.safe_load_all((d / name).read_text()):
            kube.apply(doc)
            if doc["kind"] == "Deployment":
                (container,) = doc["spec"]["template"]["spec"]["containers"]
                args = [a.replace("$(POD_NAMESPACE)", "wasmgate") for a in container["args"]]
                parsed = _parser().parse_args(args)
                assert parsed.kube and parsed.namespace == "wasmgate" and parsed.workers == 2
    with kube.client() as c:
        r = c.get("/apis/apps/v1/namespaces/wasmgate/deployments/wasmgate")
        assert r.status_code == 200 and r.json()["spec"]["template"]["spec"]["serviceAccountName"] == "wasmgate"


def test_workers_each_follow_the_api(kube: KubeServer, upstream: Upstream) -> None:
    """`wasmgate run --kube --workers 2`, the command itself: every worker applies an edit."""
    from test_workers import admin_get, workers

    kube.apply(tag("w1"))
    try:
        with workers("--kube", "--namespace", NS, "--kubeconfig", str(kube.kubeconfig()),
                     "--upstream", upstream.url) as (port, admin, _):
            assert {request(port)[1].get("x-chain-resp") for _ in range(10)} == {"w1"}
            kube.apply(tag("w2"))

            def all_workers_have_w2() -> bool:
                info = json.loads(admin_get(admin, "/plugins"))
                return len(info["workers"]) == 2 and all(
                    w["plugins"] and w["plugins"][0]["name"] == "tag" for w in info["workers"]) and \
                    {request(port)[1].get("x-chain-resp") for _ in range(20)} == {"w2"}

            wait_for(all_workers_have_w2, what="both workers on w2")
    finally:
        kube.delete(tag(""))


def test_api_server_agrees_with_the_crd_checks(kube: KubeServer) -> None:
    """tests/test_crd.py checks the CRD's schema with jsonschema; the real API server (which
    also runs the CEL rules) accepts and rejects the same WasmPlugins. Dry runs: nothing stored."""
    from test_crd import EXAMPLES, REJECTED, _plugin

    def send(doc: dict[str, Any]) -> tuple[int, list[str]]:
        doc = {**doc, "metadata": {**doc["metadata"], "namespace": NS}}
        with kube.client() as c:
            r = c.post(f"/apis/extensions.istio.io/v1alpha1/namespaces/{NS}/wasmplugins",
                       params={"dryRun": "All", "fieldValidation": "Strict"}, json=doc)
        causes = (r.json().get("details") or {}).get("causes") or []
        # The API server adds a cause without a field when it skipped CEL rules of an invalid object.
        # A cause without a field: CEL rules skipped for an invalid object (ignored), or a format
        # check, whose message names the field ("... in spec.priority").
        return r.status_code, [str(x.get("field")) if x.get("field") != "<nil>" else str(x.get("message"))
                               for x in causes if "validation rules were not checked" not in str(x.get("message"))]

    for where, doc in EXAMPLES:
        code, fields = send(doc)
        if isinstance(doc["spec"].get("pluginConfig"), str):
            assert code == 422 and fields == ["spec.pluginConfig"], (where, fields)
        else:
            assert code == 201, (where, fields)
    for spec, field in REJECTED:
        code, fields = send(_plugin(**spec))
        want = re.sub(r"\.(\d+)", r"[\1]", field)  # spec.match.0.mode -> spec.match[0].mode
        assert code == 422 and fields and all(want in f for f in fields), (spec, fields)


def test_api_server_agrees_on_priority_and_creation_timestamp(kube: KubeServer, tmp_path: Path) -> None:
    """wasmgate's file checks of spec.priority (the CRD's int32) and metadata.creationTimestamp
    (metav1.Time: Go's RFC 3339 parse) take and refuse what the real API server does. Dry runs."""
    from test_resources import PRIORITIES_REFUSED, PRIORITIES_TAKEN, TIMESTAMPS_REFUSED, TIMESTAMPS_TAKEN

    def server_takes(doc: dict[str, Any]) -> bool:
        with kube.client() as c:
            r = c.post(f"/apis/extensions.istio.io/v1alpha1/namespaces/{NS}/wasmplugins",
                       params={"dryRun": "All"}, json=doc)
        assert r.status_code in (201, 400, 422), r.text
        return r.status_code == 201

    def wasmgate_takes(doc: dict[str, Any]) -> bool:
        f = tmp_path / "p.yaml"
        f.write_text(json.dumps(doc))
        specs, errors = scan_plugin_specs([f])
        assert bool(specs) != bool(errors)
        return not errors

    def doc(*created: object, **spec: Any) -> dict[str, Any]:
        d = wasmplugin("p", TAG, {}, **spec)
        if created:  # None too: an explicit null
            d["metadata"]["creationTimestamp"] = created[0]
        return d

    cases = [(doc(at), True) for at, _ in TIMESTAMPS_TAKEN] + [(doc(at), False) for at in TIMESTAMPS_REFUSED]
    cases += [(doc(priority=v), True) for v, _ in PRIORITIES_TAKEN]
    cases += [(doc(priority=v), False) for v, _ in PRIORITIES_REFUSED]
    for d, taken in cases:
        where = (d["metadata"].get("creationTimestamp"), d["spec"].get("priority"))
        assert (server_takes(d), wasmgate_takes(d)) == (taken, taken), where


def test_namespaces_kube_selector_and_istio_selector(kube: KubeServer, upstream: Upstream) -> None:
    """No --namespace: every namespace. --kube-selector filters what is read (and an object
    relabelled out of it goes away); --labels is Istio's spec.selector, as with files."""
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}})

    def labelled(name: str, gateway: str, ns: str = NS, **spec: Any) -> dict[str, Any]:
        doc = wasmplugin(name, TAG, {"tag": name}, ns=ns, **spec)
        doc["metadata"]["labels"] = {"gateway": gateway}
        return doc

    docs = [labelled("sel-one", "a"), labelled("sel-two", "b"),
            labelled("sel-three", "a", selector={"matchLabels": {"app": "other"}}),
            labelled("sel-four", "a", ns="other")]
    for doc in docs:
        kube.apply(doc)
    proxy = ProxyThread([], upstream.url, kube=True, kubeconfig=str(kube.kubeconfig()),
                        kube_selector={"gateway": "a"}, labels={"app": "me"})
    try:
        assert plugin_names(proxy) == ["sel-one", "sel-four"]  # Istio order: namespace gw, then other
        kube.apply(labelled("sel-two", "a"))
        wait_for(lambda: plugin_names(proxy) == ["sel-one", "sel-two", "sel-four"], what="relabelled in")
        kube.apply(labelled("sel-one", "c"))
        wait_for(lambda: plugin_names(proxy) == ["sel-two", "sel-four"], what="relabelled out")
    finally:
        proxy.stop()
        for doc in docs:
            kube.delete(doc)


def test_istio_order_by_creation_timestamp(kube: KubeServer, upstream: Upstream) -> None:
    """Equal priorities (unset is the lowest int32, so an explicit -2147483648 ties with it):
    Istio's tie-break is the API server's creationTimestamp (seconds), then the name."""
    def created_at(doc: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(kube.apply(doc)["metadata"]["creationTimestamp"])

    docs = [wasmplugin("z-first", TAG, {"tag": "z-first"}), wasmplugin("a-second", TAG, {"tag": "a-second"}),
            wasmplugin("m-third", TAG, {"tag": "m-third"}, priority=-(1 << 31))]
    first = created_at(docs[0])
    while datetime.now(UTC) < first + timedelta(seconds=1.05):  # the next second: a later timestamp
        time.sleep(0.05)
    later = [created_at(d) for d in docs[1:]]
    assert first < later[0] <= later[1]
    proxy = proxy_for(kube, upstream)
    try:
        assert plugin_names(proxy) == ["z-first", "a-second", "m-third"]
        assert tag_of(proxy) == "m-third, a-second, z-first"  # the response runs the chain backwards
    finally:
        proxy.stop()
        for doc in docs:
            kube.delete(doc)


def test_in_cluster_config(kube: KubeServer, upstream: Upstream, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    """No --kubeconfig: the pod's service account (token, ca.crt, namespace files and the
    KUBERNETES_SERVICE_* variables), as a pod has them, here in a directory of the test's."""
    from wasmgate.resources import kube as kube_module

    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(SA_TOKEN)
    (sa / "namespace").write_text(NS)
    shutil.copy(kube.workdir / "ca.crt", sa / "ca.crt")
    monkeypatch.setattr(kube_module, "SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(kube.port))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    for doc in yaml.safe_load_all((REPO / "deploy" / "kubernetes" / "rbac.yaml").read_text()):
        if doc["kind"] != "ServiceAccount":
            doc["metadata"]["namespace"] = NS  # the Role where the plugins are; bound to wasmgate/wasmgate
        kube.apply(doc)
    kube.apply(tag("in-cluster"))
    proxy = ProxyThread([], upstream.url, kube=True, kube_namespace=NS)
    try:
        assert tag_of(proxy) == "in-cluster"
    finally:
        proxy.stop()
        kube.delete(tag(""))


def test_startup_errors_name_the_problem(kube: KubeServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "wasmgate", "run", "--listen", "127.0.0.1:0", "--admin",
                            "127.0.0.1:0", *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        return r.stderr

    assert "cannot load Kubernetes config" in run("--kube", "--kubeconfig", str(tmp_path / "missing"))
    assert "--namespace, --kube-selector and --kubeconfig need --kube" in run("--namespace", NS)
    bad = wasmplugin("bad", TAG, {"tag": "x"}, phase="AUTHN")
    bad["spec"]["imagePullSecret"] = "no-such-secret"
    kube.apply(bad)
    try:
        err = run("--kube", "--namespace", NS, "--kubeconfig", str(kube.kubeconfig()), "--workers", "1")
        assert f"/apis/extensions.istio.io/v1alpha1/namespaces/{NS}/wasmplugins/bad: WasmPlugin bad: " \
               "spec.imagePullSecret: no kubernetes.io/dockerconfigjson Secret 'no-such-secret'" in err, err
    finally:
        kube.delete(bad)
