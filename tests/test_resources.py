"""WasmPlugin resources: Istio's selection, ordering, Secrets, and error reporting."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from wasmgate.plugin.manager import chain_order
from wasmgate.resources.wasmplugin import ConfigError, Scope, load_plugin_specs, scan_plugin_specs


def plugin(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
            "metadata": {"name": name, "namespace": spec.pop("namespace", "default")},
            "spec": {"url": "file:///x.wasm", **spec}}


def write(path: Path, *docs: dict[str, Any]) -> Path:
    path.write_text("\n---\n".join(json.dumps(d) for d in docs))
    return path


def names(specs: list[Any]) -> list[str]:
    return [s.name for s in specs]


def test_selector_match_labels(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", plugin("any"), plugin("gw", selector={"matchLabels": {"app": "gateway"}}),
              plugin("other", selector={"matchLabels": {"app": "web"}}))
    assert names(load_plugin_specs([f], Scope(labels={"app": "gateway", "x": "y"}))) == ["any", "gw"]
    assert names(load_plugin_specs([f], Scope())) == ["any"]


def test_match_ports_and_mode(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml",
              plugin("p8080", match=[{"ports": [{"number": 8080}]}]),
              plugin("p9090", match=[{"ports": [{"number": 9090}]}]),
              plugin("client", match=[{"mode": "CLIENT"}]),
              plugin("server", match=[{"mode": "SERVER"}]))
    assert names(load_plugin_specs([f], Scope(port=8080))) == ["p8080", "server"]


def test_network_plugins_keep_their_ports_for_the_tcp_listeners(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml",
              plugin("http"),
              plugin("any", type="NETWORK"),
              plugin("db", type="NETWORK", match=[{"mode": "SERVER", "ports": [{"number": 5432}]},
                                                  {"ports": [{"number": 6543}]}, {"mode": "CLIENT"}]),
              plugin("wide", type="NETWORK", match=[{"ports": [{"number": 1}]}, {"mode": "CLIENT_AND_SERVER"}]),
              plugin("client", type="NETWORK", match=[{"mode": "CLIENT", "ports": [{"number": 5432}]}]))
    specs = {s.name: s for s in load_plugin_specs([f], Scope(port=8080))}  # the HTTP port does not matter
    assert sorted(specs) == ["any", "db", "http", "wide"]
    assert not specs["http"].network
    assert (specs["any"].network, specs["any"].ports) == (True, ())
    assert specs["db"].ports == (5432, 6543)
    assert specs["wide"].ports == ()  # an entry without ports: every listener
    assert [specs["db"].applies_to_port(p) for p in (5432, 6543, 9000, 0)] == [True, True, False, True]


def test_istio_ordering(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml",
              plugin("z-unset-authn", phase="AUTHN"),
              plugin("stats", phase="STATS", priority=100),
              plugin("low-authn", phase="AUTHN", priority=-5),
              plugin("high-authn", phase="AUTHN", priority=10),
              plugin("authz", phase="AUTHZ"),
              plugin("a-unspecified"),
              plugin("a-unset-authn", phase="AUTHN"))
    ordered = names(chain_order(load_plugin_specs([f])))
    assert ordered == ["high-authn", "low-authn", "a-unset-authn", "z-unset-authn", "authz", "stats",
                       "a-unspecified"]


def created(name: str, at: str | None, **spec: Any) -> dict[str, Any]:
    doc = plugin(name, **spec)
    if at is not None:
        doc["metadata"]["creationTimestamp"] = at
    return doc


def test_istio_ties_by_creation_time_then_name(tmp_path: Path) -> None:
    """Istio sorts by metadata.creationTimestamp (absent: the zero time, first), then name;
    the priority sort after it is stable, so equal priorities keep that order."""
    f = write(tmp_path / "p.yaml",
              created("a-new", "2024-05-02T00:00:00Z", priority=1),
              created("z-old", "2024-05-01T00:00:00Z", priority=1),
              created("m-old", "2024-05-01T00:00:00Z", priority=1),
              created("y-none", None, priority=1),
              created("b-offset", "2024-05-01T01:00:00+02:00", priority=1),  # 23:00 UTC the day before
              created("high", "2024-05-03T00:00:00Z", priority=2))
    assert names(chain_order(load_plugin_specs([f]))) == ["high", "y-none", "b-offset", "m-old", "z-old", "a-new"]


def test_istio_creation_timestamp_as_yaml_writes_it(tmp_path: Path) -> None:
    """Unquoted, YAML reads it as a timestamp; without a zone, as UTC (Kubernetes writes Z)."""
    f = tmp_path / "p.yaml"
    f.write_text("".join(f"""---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, creationTimestamp: {at}}}
spec: {{url: file:///x.wasm}}
""" for name, at in (("a", "2024-05-01T10:00:02Z"), ("b", "2024-05-01T10:00:01"), ("c", "2024-05-01"))))
    assert names(chain_order(load_plugin_specs([f]))) == ["c", "b", "a"]


def test_istio_unset_priority_is_the_lowest_int32(tmp_path: Path) -> None:
    """Unset is not 0: it sorts as -2147483648, so after every other set priority (-5 too)
    and tied with an explicit -2147483648 (then creation time and name decide)."""
    f = write(tmp_path / "p.yaml",
              created("b-min", "2024-05-02T00:00:00Z", priority=-(1 << 31)),
              created("c-unset", "2024-05-01T00:00:00Z"),
              created("a-unset", "2024-05-02T00:00:00Z"),
              created("d-neg", "2024-05-03T00:00:00Z", priority=-5))
    assert names(chain_order(load_plugin_specs([f]))) == ["d-neg", "c-unset", "a-unset", "b-min"]


def test_istio_compares_names_of_its_translated_resources(tmp_path: Path) -> None:
    """Istio 1.30+ compares the names of the TrafficExtensions it makes of WasmPlugins
    (name + "~istio-translated-wasmplugin"): a name sorts after longer names it begins."""
    f = write(tmp_path / "p.yaml", plugin("auth"), plugin("auth-z"), plugin("auth.b"), plugin("autha"))
    assert names(chain_order(load_plugin_specs([f]))) == ["auth-z", "auth.b", "autha", "auth"]


def test_bad_creation_timestamp_names_the_field(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", created("p", "yesterday"))
    with pytest.raises(ConfigError, match=r"p\.yaml: WasmPlugin p: metadata\.creationTimestamp: "):
        load_plugin_specs([f])


def test_image_pull_secret_from_another_file(tmp_path: Path) -> None:
    config = json.dumps({"auths": {"r.example": {"auth": "dTpw"}}}).encode()
    write(tmp_path / "a-secret.yaml", {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                                       "metadata": {"name": "creds", "namespace": "team"},
                                       "data": {".dockerconfigjson": base64.b64encode(config).decode()}})
    write(tmp_path / "b-plugin.yaml", plugin("p", namespace="team", url="oci://r.example/p:v1",
                                              imagePullSecret="creds"))
    (spec,) = load_plugin_specs([tmp_path])
    assert spec.pull_secret == config
    assert spec.remote and spec.url == "oci://r.example/p:v1"


def test_missing_secret_names_field(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", plugin("p", url="oci://r/p:v1", imagePullSecret="nope"))
    with pytest.raises(ConfigError, match=r"p\.yaml: WasmPlugin p: spec\.imagePullSecret: no .*'nope'"):
        load_plugin_specs([f])


def test_bad_file_is_skipped_others_keep_working(tmp_path: Path) -> None:
    write(tmp_path / "good.yaml", plugin("good"))
    (tmp_path / "bad.yaml").write_text("kind: WasmPlugin\nspec: {url: 5, phase: NOPE}\nmetadata: {name: b}\n"
                                       "apiVersion: extensions.istio.io/v1alpha1\n")
    specs, errors = scan_plugin_specs([tmp_path])
    assert names(specs) == ["good"]
    (where,) = errors
    assert where.endswith("bad.yaml") and "spec.phase" in errors[where]


@pytest.mark.parametrize(("url", "remote"), [("oci://r/p:v1", True), ("r.example/p:v1", True),
                                              ("https://h/p.wasm", True), ("file://p.wasm", False)])
def test_url_schemes(tmp_path: Path, url: str, remote: bool) -> None:
    (spec,) = load_plugin_specs([write(tmp_path / "p.yaml", plugin("p", url=url))])
    assert spec.remote is remote
    if not remote:
        assert spec.module_path == tmp_path / "p.wasm"


def test_target_refs_reported(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", plugin("p", targetRefs=[{"kind": "Gateway", "group": "gateway.networking.k8s.io",
                                                            "name": "edge"}]))
    (spec,) = load_plugin_specs([f])
    assert spec.target_refs == ("Gateway/edge",)


def test_plugin_config_bytes(tmp_path: Path) -> None:
    f = write(tmp_path / "p.yaml", plugin("obj", pluginConfig={"b": [1, 2], "a": "x y"}),
              plugin("text", pluginConfig="raw text: not JSON {"), plugin("none"), plugin("empty", pluginConfig={}))
    by_name = {s.name: s.plugin_config for s in load_plugin_specs([f])}
    # Istio sends an empty object as no configuration at all
    assert by_name == {"obj": b'{"b":[1,2],"a":"x y"}', "text": b"raw text: not JSON {", "none": b"", "empty": b""}
