"""``wasmgate export --istio``: manifests that pass the WasmPlugin CRD's schema, read back by
wasmgate as the same plugins, with file:// modules pushed to a real registry; every refusal."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from crd_schema import errors as crd_errors
from oci_harness import PASSWORD, USER, Registry
from wasmgate.cli import main
from wasmgate.export.istio import ExportError, ExportOptions, export_istio
from wasmgate.oci.auth import Keychain
from wasmgate.oci.fetch import ModuleCache, fetch_module
from wasmgate.plugin.manager import chain_order
from wasmgate.plugin.spec import PluginLimits, PluginSpec
from wasmgate.resources.wasmplugin import Scope, scan_plugin_specs

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "allow-header"
TAG_WASM = ROOT / "tests" / "plugins" / "build" / "tag.wasm"
SCOPE = Scope(labels={"app": "gateway"})  # selects every plugin below (wasmgate serves inbound)
OCI = "oci://registry.example.com/team/plugin:v1"


REGISTRY_KIND = "basic"  # of conftest's registry fixture


def _dockerconfig(reg: Registry) -> str:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return json.dumps({"auths": {reg.host: {"auth": auth}}})


def plugin(name: str, namespace: str = "default", meta: dict[str, Any] | None = None,
           **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": name, "namespace": namespace, **(meta or {})},
            "spec": {"url": OCI, **spec}}


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def resources(tmp: Path, reg: Registry) -> Path:
    """Every field wasmgate reads, its extensions, and the examples' relative file:// url."""
    d = tmp / "resources"
    shutil.copy(TAG_WASM, tmp / "tag.wasm")
    write(d / "secrets.yaml",
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred"},
           "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": _dockerconfig(reg)}},
          {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unused", "namespace": "edge"},
           "type": "kubernetes.io/dockerconfigjson",
           "data": {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}},
          {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other"}, "data": {"a": "b"}})
    write(d / "local.yaml",
          plugin("tag", meta={"labels": {"team": "edge"},
                              "annotations": {"wasmgate.io/max-memory-bytes": "1048576",
                                              "wasmgate.io/callback-deadline-ms": "50", "wasmgate.io/vm-id": "own",
                                              "owner": "platform"}},
                 url=f"file://{tmp / 'tag.wasm'}", imagePullSecret="regcred", pluginName="tag", phase="STATS",
                 pluginConfig={"name": "x-tag", "nested": {"list": [1, 2.5, None, True]}}))
    write(d / "remote.yaml",
          plugin("everything", namespace="edge", meta={"creationTimestamp": "2024-05-01T12:00:00+02:00"},
                 url="registry.example.com/team/everything:v2", sha256="sha256:" + "AB" * 32,
                 imagePullPolicy="Always", pluginName="root", phase="AUTHZ", priority=-3,
                 failStrategy="FAIL_RELOAD", type="HTTP", selector={"matchLabels": {"app": "gateway"}},
                 pluginConfig='{"mode": "strict",  "limit": 10}',
                 vmConfig={"env": [{"name": "INLINE_VAR", "value": "1"},
                                   {"name": "HOME", "valueFrom": "HOST", "value": "ignored"}]},
                 match=[{"mode": "SERVER", "ports": [{"number": 8080}, {"number": 9090}]},
                        {"mode": "CLIENT_AND_SERVER"}]),
          plugin("gateway-api", namespace="edge", url="https://modules.example.com/p.wasm",
                 targetRefs=[{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}]),
          {**plugin("target-ref", url=OCI, targetRef={"kind": "Service", "name": "svc", "namespace": ""},
                    priority=None), "status": {"conditions": []}})
    shutil.copytree(EXAMPLE, tmp / "example", ignore=shutil.ignore_patterns("*.go", "go.mod"))
    return d


def _pushing(reg: Registry, pushed: list[str]) -> ExportOptions:
    from wasmgate.oci.ops import push
    from wasmgate.oci.reference import parse_reference
    from wasmgate.oci.registry import RegistryClient

    def do_push(ref: str, wasm: bytes) -> str:
        pushed.append(ref)
        with RegistryClient(Keychain.from_dockerconfigjson(_dockerconfig(reg))) as client:
            return push(client, parse_reference(ref), wasm).digest

    return ExportOptions(push_to=f"{reg.host}/exported", push=do_push)


def _by_key(specs: list[PluginSpec]) -> dict[tuple[str, str], PluginSpec]:
    return {(s.namespace, s.name): s for s in specs}


def test_export_validates_and_round_trips(tmp_path: Path, registry: Registry) -> None:
    src = resources(tmp_path, registry)
    paths = [src, tmp_path / "example" / "wasmplugin.yaml"]
    pushed: list[str] = []
    exported = export_istio(paths, _pushing(registry, pushed))

    # Structure and order: the one referenced Secret, then WasmPlugins by (namespace, name).
    docs = exported.documents
    assert [(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs] == [
        ("Secret", "default", "regcred"),
        ("WasmPlugin", "default", "allow-header"), ("WasmPlugin", "default", "tag"),
        ("WasmPlugin", "default", "target-ref"),
        ("WasmPlugin", "edge", "everything"), ("WasmPlugin", "edge", "gateway-api")]
    secret = docs[0]
    assert secret == {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "regcred", "namespace": "default"},
                      "type": "kubernetes.io/dockerconfigjson",
                      "data": {".dockerconfigjson": base64.b64encode(_dockerconfig(registry).encode()).decode()}}
    for d in docs[1:]:
        assert d["apiVersion"] == "extensions.istio.io/v1alpha1"
        assert set(d) == {"apiVersion", "kind", "metadata", "spec"}
        assert crd_errors(d) == [], d["metadata"]["name"]
    wp = {d["metadata"]["name"]: d for d in docs[1:]}
    assert wp["tag"]["metadata"] == {"name": "tag", "namespace": "default", "labels": {"team": "edge"},
                                     "annotations": {"owner": "platform"}}
    assert wp["everything"]["spec"]["sha256"] == "ab" * 32
    assert wp["everything"]["spec"]["vmConfig"]["env"][1] == {"name": "HOME", "valueFrom": "HOST"}
    assert wp["target-ref"]["spec"]["targetRef"] == {"kind": "Service", "name": "svc"}
    assert "priority" not in wp["target-ref"]["spec"]
    assert wp["everything"]["metadata"]["creationTimestamp"] == "2024-05-01T12:00:00+02:00"  # as written
    assert "creationTimestamp" not in wp["tag"]["metadata"]
    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    assert sorted(pushed) == [f"{registry.host}/exported/allow-header:sha256-{sha(EXAMPLE / 'plugin.wasm')}",
                              f"{registry.host}/exported/tag:sha256-{sha(TAG_WASM)}"]
    notes = "\n".join(exported.notes)
    for expected in ("metadata.annotations: dropped wasmgate.io/callback-deadline-ms, wasmgate.io/max-memory-bytes",
                     "spec.pluginConfig: the string holds a JSON object", "env[1].value: dropped",
                     "Secret unused: not exported", "ConfigMap other: skipped", "status: dropped",
                     "is a loopback address", "dropped wasmgate.io/vm-id: Istio sets no vm_id",
                     "WasmPlugin everything: metadata.creationTimestamp: kept"):
        assert expected in notes

    # wasmgate's directory source reads the exported file back as the same plugins.
    out = tmp_path / "istio.yaml"
    out.write_text(exported.yaml())
    before = _by_key(scan_plugin_specs(paths, SCOPE, strict=True)[0])
    after = _by_key(scan_plugin_specs([out], SCOPE, strict=True)[0])
    assert before.keys() == after.keys()
    cache = ModuleCache(tmp_path / "cache")
    for key, old in before.items():
        new = after[key]
        expect = dataclasses.replace(old, source=new.source, limits=PluginLimits(), vm_id="")
        if old.url.startswith("file://"):
            # Pushed: the exported url and sha256 fetch the very same module with the exported Secret.
            assert old.module_path is not None and new.module_path is None
            assert new.url.startswith(f"oci://{registry.host}/exported/") and len(new.sha256) == 64
            # (the example names no imagePullSecret: wasmgate, like Istio, then uses the Docker config)
            creds = new.pull_secret or _dockerconfig(registry).encode()
            fetched = fetch_module(new.url, sha256=new.sha256, auth=Keychain.from_dockerconfigjson(creds), cache=cache)
            assert fetched.path.read_bytes() == old.module_path.read_bytes()
            expect = dataclasses.replace(expect, module_path=None, url=new.url, sha256=new.sha256)
        if key == ("edge", "everything"):
            assert json.loads(old.plugin_config) == json.loads(new.plugin_config)
            expect = dataclasses.replace(expect, plugin_config=new.plugin_config, sha256="ab" * 32)
        assert new == expect, key
    assert before[("default", "tag")].limits != PluginLimits()  # the annotations were in effect
    assert after[("edge", "everything")].created == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_creation_timestamp_round_trips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`export --istio` keeps a given creationTimestamp (Istio's tie-break for equal priorities),
    as written, also from YAML's unquoted form; read back, the plugins keep their order (by
    the instant: the zones make the text order another)."""
    src = tmp_path / "plugins.yaml"
    src.write_text("".join(f"""---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, namespace: default{f", creationTimestamp: {at}" if at else ""}}}
spec: {{url: "{OCI}", priority: 5}}
""" for name, at in (("a-mid", "2024-05-02T00:00:00Z"), ("b-last", "2024-05-01T23:30:00-01:00"),
                     ("c-first", "'2024-05-02T00:30:00.25+01:00'"), ("d-none", ""))))
    out = tmp_path / "istio.yaml"
    assert main(["export", "--istio", "--resources", str(src), "-o", str(out)]) == 0
    assert "metadata.creationTimestamp: kept" in capsys.readouterr().err
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(out.read_text())}
    assert {n: d["metadata"].get("creationTimestamp") for n, d in docs.items()} == {
        "a-mid": "2024-05-02T00:00:00Z", "b-last": "2024-05-01T23:30:00-01:00",
        "c-first": "2024-05-02T00:30:00.25+01:00", "d-none": None}
    assert all(crd_errors(d) == [] for d in docs.values())
    before = chain_order(scan_plugin_specs([src], strict=True)[0])
    after = chain_order(scan_plugin_specs([out], strict=True)[0])
    assert [s.name for s in after] == [s.name for s in before] == ["d-none", "c-first", "a-mid", "b-last"]
    assert [s.created for s in after] == [s.created for s in before] == [
        None, datetime(2024, 5, 1, 23, 30, 0, 250000, tzinfo=UTC), datetime(2024, 5, 2, tzinfo=UTC),
        datetime(2024, 5, 2, 0, 30, tzinfo=UTC)]


def test_output_is_deterministic(tmp_path: Path, registry: Registry) -> None:
    src = resources(tmp_path, registry)
    first = export_istio([src], _pushing(registry, [])).yaml()
    # The same resources in other files, in another order, give the same bytes.
    other = tmp_path / "shuffled"
    for i, f in enumerate(sorted(src.iterdir(), reverse=True)):
        docs = list(yaml.safe_load_all(f.read_text()))
        write(other / f"{i}-{f.name}", *reversed(docs))
    assert export_istio([other], _pushing(registry, [])).yaml() == first
    assert first.startswith("# Generated by `wasmgate export --istio`")


def test_cli(tmp_path: Path, registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    src = resources(tmp_path, registry)
    cfg = registry.docker_config(tmp_path / "docker")
    out = tmp_path / "out.yaml"
    assert main(["export", "--istio", "--resources", str(src), "--push-to", f"oci://{registry.host}/cli",
                 "--docker-config", str(cfg), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "wrote 5 manifests" in err and "wasmgate export: note:" in err
    docs = list(yaml.safe_load_all(out.read_text()))
    assert [d["kind"] for d in docs] == ["Secret"] + ["WasmPlugin"] * 4
    assert main(["export", "--istio", "--resources", str(src), "--push-to", f"{registry.host}/cli",
                 "--docker-config", str(cfg)]) == 0
    assert capsys.readouterr().out == out.read_text()
    # Without --push-to the file:// plugin is refused: exit 2, the file and field on stderr, nothing written.
    assert main(["export", "--istio", "--resources", str(src)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"wasmgate export: error: {src / 'local.yaml'}: WasmPlugin tag: spec.url: file://" in captured.err
    assert main(["export", "--istio", "--resources", str(src / "remote.yaml"), "-o",
                 str(tmp_path / "no-such-dir" / "out.yaml")]) == 2
    assert "wasmgate export: error: -o: " in capsys.readouterr().err
    # A config file's plugins: are the default resources.
    (tmp_path / "wasmgate.yaml").write_text(f"plugins: [{src / 'remote.yaml'}]\n")
    assert main(["export", "--istio", "-c", str(tmp_path / "wasmgate.yaml")]) == 0
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(capsys.readouterr().out)] == \
        ["target-ref", "everything", "gateway-api"]


def test_keep_file_urls(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", plugin("abs", url="file:///opt/filters/abs.wasm", sha256="cd" * 32))
    (doc,) = export_istio([f], ExportOptions(keep_file_urls=True)).documents
    assert doc["spec"]["url"] == "file:///opt/filters/abs.wasm" and crd_errors(doc) == []
    rel = write(tmp_path / "r.yaml", plugin("rel", url="file://rel.wasm"))
    with pytest.raises(ExportError, match="relative file:// path means nothing to Istio"):
        export_istio([rel], ExportOptions(keep_file_urls=True))


def test_network_plugins_export_as_they_are(tmp_path: Path) -> None:
    match = [{"mode": "SERVER", "ports": [{"number": 5432}]}]
    f = write(tmp_path / "p.yaml", plugin("net", type="NETWORK", match=match))
    (doc,) = export_istio([f]).documents
    assert doc["spec"]["type"] == "NETWORK" and doc["spec"]["match"] == match
    assert crd_errors(doc) == []


def test_push_checks_the_local_sha256(tmp_path: Path, registry: Registry) -> None:
    shutil.copy(TAG_WASM, tmp_path / "tag.wasm")
    f = write(tmp_path / "p.yaml", plugin("tag", url="file://tag.wasm", sha256="00" * 32))
    pushed: list[str] = []
    with pytest.raises(ExportError, match=r"p.yaml: WasmPlugin tag: spec.sha256: .*tag.wasm has sha256 [0-9a-f]{64}, "
                                          r"not 0{64}"):
        export_istio([f], _pushing(registry, pushed))
    assert pushed == []


def test_push_failure_names_the_plugin(tmp_path: Path, registry: Registry) -> None:
    shutil.copy(TAG_WASM, tmp_path / "tag.wasm")
    f = write(tmp_path / "p.yaml", plugin("tag", url="file://tag.wasm"))
    from wasmgate.oci.ops import push
    from wasmgate.oci.reference import parse_reference
    from wasmgate.oci.registry import RegistryClient

    def anonymous_push(ref: str, wasm: bytes) -> str:  # the basic-auth registry refuses it
        with RegistryClient(Keychain.anonymous()) as client:
            return push(client, parse_reference(ref), wasm).digest

    with pytest.raises(ExportError, match=rf"p.yaml: WasmPlugin tag: spec.url: pushing .*tag.wasm to "
                                          rf"{registry.host}/x/tag:sha256-"):
        export_istio([f], ExportOptions(push_to=f"{registry.host}/x", push=anonymous_push))


SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "type": "kubernetes.io/dockerconfigjson",
          "stringData": {".dockerconfigjson": '{"auths": {}}'}}


@pytest.mark.parametrize("docs,message", [
    ([plugin("p", pluginConfig="raw text")],
     "WasmPlugin p: spec.pluginConfig: a string (wasmgate's raw-text extension) cannot be expressed in Istio"),
    ([plugin("p", pluginConfig="[1, 2]")], "WasmPlugin p: spec.pluginConfig: a string"),
    ([plugin("p", url="file:///abs/p.wasm")],
     "WasmPlugin p: spec.url: file:///abs/p.wasm is a file on this machine (/abs/p.wasm), which Istio's proxies "
     "cannot read; push it (`wasmgate push /abs/p.wasm REGISTRY/REPO:TAG`)"),
    ([plugin("p", url="plugin.wasm")], "WasmPlugin p: spec.url: 'plugin.wasm' looks like a local path"),
    ([plugin("p", url="./dir/p")], "WasmPlugin p: spec.url: './dir/p' looks like a local path"),
    ([plugin("p", url="oci://Registry.example.com/UPPER:v1")], "WasmPlugin p: spec.url: invalid image reference"),
    ([plugin("p", url="ftp://host/p.wasm")], "WasmPlugin p: spec.url: unsupported scheme ftp://"),
    ([plugin("p", url=f"oci://r.example.com/p@sha256:{'1' * 64}", sha256="2" * 64)],
     "WasmPlugin p: spec.sha256: " + "2" * 64 + " differs from the digest in spec.url"),
    ([plugin("p", sha256="abc")], "WasmPlugin p: spec.sha256: 'abc' is not 64 hex digits"),
    ([plugin("p", priority=1 << 31)], "WasmPlugin p: spec.priority: 2147483648 is outside the 32-bit range"),
    ([plugin("p", meta={"creationTimestamp": "2024-05-01"})],
     "WasmPlugin p: metadata.creationTimestamp: '2024-05-01' is not an RFC 3339 time as Kubernetes takes it"),
    ([plugin("p", selector={"matchLabels": {"a": "b"}}, targetRefs=[{"kind": "Gateway", "name": "g"}])],
     "WasmPlugin p: spec.targetRefs: Istio allows only one of selector, targetRef and targetRefs (also set: "
     "spec.selector)"),
    ([plugin("p", selector={"matchLabels": {"a": "b*"}})], "WasmPlugin p: spec.selector.matchLabels.a: wildcards"),
    ([plugin("p", targetRefs=[{"kind": "Gateway", "name": "g", "namespace": "other"}])],
     "WasmPlugin p: spec.targetRefs[0].namespace: Istio does not support cross-namespace references"),
    ([plugin("p", targetRef={"name": "g"})], "WasmPlugin p: spec.targetRef.kind: required"),
    ([plugin("p", targetRefs=[{"kind": "Gateway"}])], "WasmPlugin p: spec.targetRefs[0].name: required"),
    ([plugin("p", targetRefs=[{"kind": "Gateway", "name": "g", "group": "Bad_Group"}])],
     "WasmPlugin p: spec.targetRefs[0].group: 'Bad_Group' is not an API group"),
    ([plugin("p", targetRefs=[{"kind": "Gateway", "name": f"g{i}"} for i in range(17)])],
     "WasmPlugin p: spec.targetRefs: at most 16 entries"),
    ([plugin("p", vmConfig={"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]})],
     "WasmPlugin p: spec.vmConfig.env[1].name: 'A' is listed twice"),
    ([plugin("p", vmConfig={"env": [{"name": ""}]})], "WasmPlugin p: spec.vmConfig.env[0].name: required"),
    ([plugin("p", match=[{"ports": [{"number": 0}]}])], "WasmPlugin p: spec.match[0].ports[0].number: 0 is not"),
    ([plugin("p", match=[{"ports": [{"number": 80}, {"number": 80}]}])],
     "WasmPlugin p: spec.match[0].ports[1].number: 80 is listed twice"),
    ([plugin("Bad_Name")], "WasmPlugin Bad_Name: metadata.name: 'Bad_Name' is not a Kubernetes name"),
    ([plugin("p", namespace="a.b")], "WasmPlugin p: metadata.namespace: 'a.b' is not a Kubernetes namespace"),
    ([plugin("p", meta={"labels": {"k": "has space"}})], "WasmPlugin p: metadata.labels.k: 'has space' is not"),
    ([plugin("p", meta={"annotations": {"k": 1}})], "WasmPlugin p: metadata.annotations.k: 1 is not a string"),
    ([plugin("p", imagePullSecret="missing")],
     "WasmPlugin p: spec.imagePullSecret: no kubernetes.io/dockerconfigjson Secret 'missing' in namespace "
     "'default' among the resources"),
    ([plugin("p", imagePullSecret="s"), {**SECRET, "stringData": {".dockerconfigjson": "not json"}}],
     "Secret s: data..dockerconfigjson: not a JSON object"),
    ([plugin("p"), plugin("p")], "WasmPlugin p: metadata.name: duplicate of the one in"),
    ([plugin("p", phase="LATE")], "WasmPlugin p: spec.phase: Input should be"),
])
def test_refusals(tmp_path: Path, docs: list[dict[str, Any]], message: str) -> None:
    f = write(tmp_path / "bad.yaml", *docs)
    with pytest.raises(ExportError) as e:
        export_istio([f])
    assert any(line.startswith(f"{f}: ") and message in line for line in e.value.problems), e.value.problems


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", plugin("a", pluginConfig="raw"), plugin("b", priority=1 << 40))
    b = tmp_path / "b.yaml"
    b.write_text("kind: [unclosed\n")
    with pytest.raises(ExportError) as e:
        export_istio([tmp_path])
    assert sorted(line.split(": ")[0] for line in e.value.problems) == [str(a), str(a), str(b)]
    with pytest.raises(ExportError, match="missing: no such file or directory"):
        export_istio([tmp_path / "missing"])
