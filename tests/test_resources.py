"""WasmPlugin resources: Istio's selection, ordering, Secrets, and error reporting."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime
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
    """Unquoted, YAML would make it a timestamp; it stays the text written, as kubectl sends it
    (with any zone; converted to UTC for the order)."""
    f = tmp_path / "p.yaml"
    f.write_text("".join(f"""---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}, creationTimestamp: {at}}}
spec: {{url: file:///x.wasm, pluginConfig: {{since: 2024-05-01, at: {at}}}}}
""" for name, at in (("a", "2024-05-01T10:00:02Z"), ("b", "2024-05-01T11:00:01+01:00"),
                     ("c", "2024-05-01T10:00:01.5Z"))))
    specs = chain_order(load_plugin_specs([f]))
    assert names(specs) == ["b", "c", "a"]
    assert specs[0].created == datetime(2024, 5, 1, 10, 0, 1, tzinfo=UTC)
    # In pluginConfig too the plugin gets the text (a date used to stop the whole scan).
    assert json.loads(specs[1].plugin_config) == {"since": "2024-05-01", "at": "2024-05-01T10:00:01.5Z"}


# Kubernetes' metav1.Time is Go's time.Parse(time.RFC3339, ...); test_kube.py checks that the
# real API server takes and refuses the same.
TIMESTAMPS_TAKEN: list[tuple[str | None, datetime | None]] = [
    ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T12:30:00+02:30", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T10:00:00-00:00", datetime(2024, 5, 1, 10, tzinfo=UTC)),
    ("2024-05-01T10:00:00.123456789Z", datetime(2024, 5, 1, 10, 0, 0, 123456, tzinfo=UTC)),  # to the microsecond
    ("2024-05-01T10:00:00,5Z", datetime(2024, 5, 1, 10, 0, 0, 500000, tzinfo=UTC)),
    ("2024-05-01T9:00:00Z", datetime(2024, 5, 1, 9, tzinfo=UTC)),  # Go takes a one-digit hour
    ("2024-05-01T10:00:00+24:00", datetime(2024, 4, 30, 10, tzinfo=UTC)),
    ("2024-02-29T00:00:00Z", datetime(2024, 2, 29, tzinfo=UTC)),
    ("0000-12-31T23:00:00-02:00", datetime(1, 1, 1, 1, tzinfo=UTC)),  # year 0, an offset into year 1
    ("0000-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),  # before year 1: as its first instant
    (None, None),  # null: absent
]
TIMESTAMPS_REFUSED: list[str | int] = [
    "2024-05-01T10:00:00", "2024-05-01", "2024-05-01 10:00:00Z", "2024-05-01t10:00:00z", "2024-05-01T10:00:00+0200",
    "2024-05-01T10:00:00+25:00", "2024-02-30T00:00:00Z", "2023-02-29T00:00:00Z", "2024-05-01T10:00:60Z",
    "2024-05-01T24:00:00Z", "2024-5-01T10:00:00Z", "2024-05-01T10:00:00.Z", "24-05-01T10:00:00Z", "yesterday", "",
    1714557600]


@pytest.mark.parametrize(("at", "want"), TIMESTAMPS_TAKEN)
def test_creation_timestamp_forms_kubernetes_takes(tmp_path: Path, at: str | None, want: datetime | None) -> None:
    doc = plugin("p")
    doc["metadata"]["creationTimestamp"] = at
    (spec,) = load_plugin_specs([write(tmp_path / "p.yaml", doc)])
    assert spec.created == want


@pytest.mark.parametrize("at", TIMESTAMPS_REFUSED)
def test_creation_timestamp_forms_kubernetes_refuses(tmp_path: Path, at: str | int) -> None:
    """Each an error naming the file and the field; the file's other plugins are not applied."""
    f = write(tmp_path / "p.yaml", plugin("ok"), created("p", at))  # type: ignore[arg-type]
    write(tmp_path / "other.yaml", plugin("other"))
    specs, errors = scan_plugin_specs([tmp_path])
    assert names(specs) == ["other"]
    assert errors == {str(f): f"{f}: WasmPlugin p: metadata.creationTimestamp: {at!r} is not an RFC 3339 time "
                                "as Kubernetes takes it (e.g. 2024-05-01T10:00:00Z, with the zone: Z or an offset "
                                "such as +02:00)"}


def test_unquoted_yaml_timestamps_kubernetes_refuses(tmp_path: Path) -> None:
    """YAML's own timestamp forms (no zone, date only, a space) are not RFC 3339 to Kubernetes."""
    for at in ("2024-05-01T10:00:01", "2024-05-01", "2024-05-01 10:00:01Z"):
        f = tmp_path / "p.yaml"
        f.write_text(f"apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
                     f"metadata: {{name: p, creationTimestamp: {at}}}\nspec: {{url: file:///x.wasm}}\n")
        with pytest.raises(ConfigError, match=rf"^{re.escape(str(f))}: WasmPlugin p: metadata\.creationTimestamp: "
                                              rf"'{at}' is not an RFC 3339 time"):
            load_plugin_specs([f])


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


# Istio's priority is an Int32Value (the CRD: integer, int32, nullable); test_kube.py checks
# that the real API server takes and refuses the same.
PRIORITIES_TAKEN: list[tuple[object, int | None]] = [
    (-(1 << 31), -(1 << 31)), ((1 << 31) - 1, (1 << 31) - 1), (5.0, 5), (None, None)]
PRIORITIES_REFUSED: list[tuple[object, str]] = [
    (1 << 31, "2147483648 is outside the 32-bit range Istio's priority has (-2147483648 to 2147483647); "
              "Kubernetes refuses it"),
    (-(1 << 31) - 1, "-2147483649 is outside the 32-bit range"),
    (1 << 70, "1180591620717411303424 is outside the 32-bit range"),
    (1e10, "10000000000 is outside the 32-bit range"),
    ("5", "expected a 32-bit integer, got '5'"),
    (True, "expected a 32-bit integer, got True"),
    (5.5, "expected a 32-bit integer, got 5.5"),
]


@pytest.mark.parametrize(("priority", "want"), PRIORITIES_TAKEN)
def test_priority_int32_taken(tmp_path: Path, priority: float | None, want: int | None) -> None:
    (spec,) = load_plugin_specs([write(tmp_path / "p.yaml", plugin("p", priority=priority))])
    assert spec.priority == want and type(spec.priority) is type(want)


@pytest.mark.parametrize(("priority", "message"), PRIORITIES_REFUSED)
def test_priority_outside_int32_names_file_and_field(tmp_path: Path, priority: object, message: str) -> None:
    f = write(tmp_path / "p.yaml", plugin("p", priority=priority))
    write(tmp_path / "other.yaml", plugin("other", priority=1))
    specs, errors = scan_plugin_specs([tmp_path])
    assert names(specs) == ["other"]
    assert list(errors) == [str(f)] and errors[str(f)].startswith(f"{f}: WasmPlugin p: spec.priority: {message}")


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
