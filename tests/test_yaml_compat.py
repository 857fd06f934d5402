"""YAML as kubectl reads it (src/wasmgate/resources/kubeyaml.py).

Each case is a few lines under a WasmPlugin's pluginConfig and the pluginConfig kubectl makes of
them (written down from kubectl 1.32's ``kubectl annotate --local -o json``), or REFUSED. With
kubectl on PATH each case is also run through it, and kubectl and wasmgate must agree with each
other and with the table; without it only the table is checked (the kubectl tests skip saying so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from servers import PLUGIN_BUILD, ProxyThread, Upstream
from test_e2e import request
from wasmgate.export.istio import dump_manifests
from wasmgate.resources.wasmplugin import ConfigError, load_plugin_specs, scan_plugin_specs

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: only the written-down "
                                   "table is checked, not the kubectl that made it")
HEAD = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\n" \
       "spec:\n  url: file:///x.wasm\n  pluginConfig:\n"
CASE_LINE = 7  # the case's first line in its document

# (YAML under pluginConfig, the pluginConfig kubectl sends as JSON)
TAKEN: list[tuple[str, str]] = [
    ("v: yes", '{"v":true}'),
    ("v: no", '{"v":false}'),
    ("v: on", '{"v":true}'),
    ("v: Off", '{"v":false}'),
    ("v: y", '{"v":true}'),
    ("v: n", '{"v":false}'),
    ("v: Y", '{"v":true}'),
    ("v: N", '{"v":false}'),
    ("v: True", '{"v":true}'),
    ("v: tRUE", '{"v":"tRUE"}'),
    ("v: ~", '{"v":null}'),
    ("v: Null", '{"v":null}'),
    ("v:", '{"v":null}'),
    ("v: =", '{"v":"="}'),
    ("v: <<", '{"v":"<<"}'),
    ("v: 1:20", '{"v":"1:20"}'),
    ("v: -1:20", '{"v":"-1:20"}'),
    ("v: 1:20:30", '{"v":"1:20:30"}'),
    ("v: 190:20:30.15", '{"v":"190:20:30.15"}'),
    ("v: 0755", '{"v":493}'),
    ("v: 08", '{"v":8}'),
    ("v: 0o755", '{"v":493}'),
    ("v: 0O17", '{"v":15}'),
    ("v: 0x1F", '{"v":31}'),
    ("v: 0X1F", '{"v":31}'),
    ("v: -0x1F", '{"v":-31}'),
    ("v: 0x", '{"v":"0x"}'),
    ("v: 0b101", '{"v":5}'),
    ("v: 0B101", '{"v":5}'),
    ("v: 0b-101", '{"v":-5}'),
    ("v: +12", '{"v":12}'),
    ("v: -0", '{"v":0}'),
    ("v: 1_000", '{"v":1000}'),
    ("v: 1__0", '{"v":10}'),
    ("v: 1_", '{"v":1}'),
    ("v: _1", '{"v":"_1"}'),
    ("v: 0x_1F", '{"v":31}'),
    ("v: 1_0.5", '{"v":10.5}'),
    ("v: 1e3", '{"v":1000}'),
    ("v: 1E3", '{"v":1000}'),
    ("v: 1e+3", '{"v":1000}'),
    ("v: 1.0e3", '{"v":1000}'),
    ("v: 1.0e+3", '{"v":1000}'),
    ("v: 1.e3", '{"v":1000}'),
    ("v: 0.1e1_0", '{"v":1000000000}'),
    ("v: 685.230_15e+03", '{"v":685230.15}'),
    ("v: 1.5", '{"v":1.5}'),
    ("v: .5", '{"v":0.5}'),
    ("v: .5_0", '{"v":0.5}'),
    ("v: ._5", '{"v":"._5"}'),
    ("v: .", '{"v":"."}'),
    ("v: -.5", '{"v":-0.5}'),
    ("v: +.5", '{"v":0.5}'),
    ("v: 5.", '{"v":5}'),
    ("v: 100.0", '{"v":100}'),
    ("v: -0.0", '{"v":0}'),
    ("v: 0.1", '{"v":0.1}'),
    ("v: 1e20", '{"v":100000000000000000000}'),
    ("v: 1e21", '{"v":1e+21}'),
    ("v: 1e-7", '{"v":1e-07}'),
    ("v: 1.5e300", '{"v":1.5e+300}'),
    ("v: 1e400", '{"v":"1e400"}'),
    ("v: 1e-400", '{"v":0}'),
    ("v: inf", '{"v":"inf"}'),
    ("v: nan", '{"v":"nan"}'),
    ("v: 0x1p-2", '{"v":"0x1p-2"}'),
    ("v: 9223372036854775807", '{"v":9223372036854775807}'),
    ("v: 9223372036854775808", '{"v":9223372036854776000}'),
    ("v: 18446744073709551615", '{"v":18446744073709552000}'),
    ("v: 18446744073709551616", '{"v":18446744073709552000}'),
    ("v: -9223372036854775808", '{"v":-9223372036854775808}'),
    ("v: -9223372036854775809", '{"v":-9223372036854776000}'),
    ("v: 9007199254740993", '{"v":9007199254740993}'),
    ("v: 1152921504606846976.0", '{"v":1152921504606847000}'),
    ("v: 0xFFFFFFFFFFFFFFFF", '{"v":18446744073709552000}'),
    ("v: 0x10000000000000000", '{"v":"0x10000000000000000"}'),
    ("v: 2024-05-01", '{"v":"2024-05-01"}'),
    ("v: 2024-05-01 10:00:00", '{"v":"2024-05-01 10:00:00"}'),
    ("v: 2024-05-01T10:00:00Z", '{"v":"2024-05-01T10:00:00Z"}'),
    ("v: 2024-5-1", '{"v":"2024-5-1"}'),
    ("v: \"yes\"", '{"v":"yes"}'),
    ("v: 'on'", '{"v":"on"}'),
    ("v: |\n  yes", '{"v":"yes\\n"}'),
    ("v: [yes, no, y, n, 1:20, 1e3]", '{"v":[true,false,true,false,"1:20",1000]}'),
    ("v: {a: y}", '{"v":{"a":true}}'),
    ("v: !!str 12", '{"v":"12"}'),
    ("v: !!int \"12\"", '{"v":12}'),
    ("v: !!int 0o17", '{"v":15}'),
    ("v: !!float 3", '{"v":3}'),
    ("v: !!bool y", '{"v":true}'),
    ("v: !!null \"\"", '{"v":null}'),
    ("v: !!null ~", '{"v":null}'),
    ("v: !!timestamp 2024-05-01", '{"v":"2024-05-01"}'),
    ("v: !!binary aGVsbG8=", '{"v":"hello"}'),
    ("v: !!binary //79", '{"v":"\\ufffd\\ufffd\\ufffd"}'),
    ("v: !!binary |\n  aGVs\n  bG8=", '{"v":"hello"}'),
    ("v: !!set {a, b}", '{"v":{"a":null,"b":null}}'),
    ("v: !!omap [a: 1, b: 2]", '{"v":[{"a":1},{"b":2}]}'),
    ("v: !!pairs [a: 1, a: 2]", '{"v":[{"a":1},{"a":2}]}'),
    ("v: !!merge <<", '{"v":"<<"}'),
    ("v: !foo bar", '{"v":"bar"}'),
    ("v: !foo 12", '{"v":"12"}'),
    ("v: !foo [1]", '{"v":[1]}'),
    ("v: !!python/none x", '{"v":"x"}'),
    ("v: !<tag:example.com,2000:x> 12", '{"v":"12"}'),
    ("v: &a [1, 2]\nw: *a", '{"v":[1,2],"w":[1,2]}'),
    ("1: a", '{"1":"a"}'),
    ("-5: a", '{"-5":"a"}'),
    ("0x1F: a", '{"31":"a"}'),
    ("yes: a", '{"true":"a"}'),
    ("y: a", '{"true":"a"}'),
    ("false: a", '{"false":"a"}'),
    ("n: a", '{"false":"a"}'),
    ("1.5: a", '{"1.5":"a"}'),
    ("0.1234567890123: a", '{"0.12345679":"a"}'),
    ("1e3: a", '{"1000":"a"}'),
    ("1.5e10: a", '{"1.5e+10":"a"}'),
    ("1234567.0: a", '{"1.234567e+06":"a"}'),
    ("0.00001: a", '{"1e-05":"a"}'),
    ("-0.0: a", '{"-0":"a"}'),
    (".inf: a", '{".inf":"a"}'),
    ("-.inf: a", '{"-.inf":"a"}'),
    (".nan: a", '{".nan":"a"}'),
    ("1e39: a", '{".inf":"a"}'),
    ("1:20: a", '{"1:20":"a"}'),
    ("9223372036854775807: a", '{"9223372036854775807":"a"}'),
    ("-9223372036854775809: a", '{"-9.223372e+18":"a"}'),
    ("18446744073709551616: a", '{"1.8446744e+19":"a"}'),
    ("2024-05-01: a", '{"2024-05-01":"a"}'),
    ("a: 1\na: 2", '{"a":2}'),
    ("a: {b: 1, b: 2}", '{"a":{"b":2}}'),
    ("yes: 1\ntrue: 2", '{"true":2}'),
    ("base: &b {x: 1, y: 2}\nm: {<<: *b, y: 3}", '{"base":{"true":2,"x":1},"m":{"true":3,"x":1}}'),
    ("b: &b {x: 1, z: 2}\nm: {x: 9, <<: *b}", '{"b":{"x":1,"z":2},"m":{"x":1,"z":2}}'),
    ("b: &b {x: 1}\nc: &c {x: 2}\nm: {<<: [*b, *c]}", '{"b":{"x":1},"c":{"x":2},"m":{"x":1}}'),
    ("b: &b {x: 1}\nc: &c {x: 2}\nm: {<<: *b, <<: *c}", '{"b":{"x":1},"c":{"x":2},"m":{"x":2}}'),
    ("b: &b {x: 1}\nm:\n  <<: [*b, {z: 2}]\n  y: 3", '{"b":{"x":1},"m":{"true":3,"x":1,"z":2}}'),
    ("m: {\"<<\": {x: 1}}", '{"m":{"<<":{"x":1}}}'),
    ("m: {<<: []}", '{"m":{}}'),
]

# What kubectl refuses (its message after the case)
REFUSED: list[str] = [
    "v: .inf",  # json: unsupported value: +Inf
    "v: -.inf",  # json: unsupported value: -Inf
    "v: .NaN",  # json: unsupported value: NaN
    "v: !!float .inf",  # json: unsupported value: +Inf
    "v: !!int abc",  # yaml: cannot decode !!str `abc` as a !!int
    "v: !!int 1:20",  # yaml: cannot decode !!str `1:20` as a !!int
    "v: !!int 08",  # yaml: cannot decode !!float `08` as a !!int
    "v: !!int 1.0",  # yaml: cannot decode !!float `1.0` as a !!int
    "v: !!float abc",  # yaml: cannot decode !!str `abc` as a !!float
    "v: !!float 1:20",  # yaml: cannot decode !!str `1:20` as a !!float
    "v: !!float 1e400",  # yaml: cannot decode !!str `1e400` as a !!float
    "v: !!float 18446744073709551615",  # yaml: cannot decode !!int `18446744073709551615` as a !!float
    "v: !!bool maybe",  # yaml: cannot decode !!str `maybe` as a !!bool
    "v: !!null x",  # yaml: cannot decode !!str `x` as a !!null
    "v: !!timestamp abc",  # yaml: cannot decode !!str `abc` as a !!timestamp
    "v: !!timestamp 2024-13-01",  # yaml: cannot decode !!str `2024-13-01` as a !!timestamp
    "v: !!binary \"@@@\"",  # yaml: !!binary value contains invalid base64 data
    "null: a",  # unsupported map key of type: %!s(<nil>), key: <nil>, value: "a"
    "~: a",  # unsupported map key of type: %!s(<nil>), key: <nil>, value: "a"
    "9223372036854775808: a",  # unsupported map key of type: uint64, key: 0x8000000000000000, value: "
    "[1, 2]: a",  # yaml: invalid map key: []interface {}{1, 2}
    "{a: 1}: a",  # yaml: invalid map key: map[interface {}]interface {}{"a":1}
    "m: {<<: 5}",  # yaml: map merge requires map or sequence of maps as the value
    "m: {<<: [5]}",  # yaml: map merge requires map or sequence of maps as the value
    "m: {<<: null}",  # yaml: map merge requires map or sequence of maps as the value
]


def document(case: str, name: str = "p") -> str:
    return HEAD.format(name=name) + "".join(f"    {line}\n" for line in case.split("\n"))


def _number(text: str) -> int | float:
    n = int(text)  # as the API server keeps a number: an int in int64, else a float
    return n if -(1 << 63) <= n < 1 << 63 else float(text)


def canon(value: Any) -> Any:
    """JSON values compared strictly: true is not 1, 1000 is not 1000.0 (a Go int field takes only
    the first), key order aside."""
    if isinstance(value, dict):
        return ("object", sorted((k, canon(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", [canon(v) for v in value])
    return (type(value).__name__, value)


def parse(text: str | bytes) -> Any:
    return canon(json.loads(text, parse_int=_number))


def kubectl(path: Path) -> subprocess.CompletedProcess[str]:
    """kubectl's client-side reading of a file, without a server: remove an annotation locally."""
    assert KUBECTL is not None
    env = {**os.environ, "KUBECONFIG": str(path.parent / "no-cluster")}
    return subprocess.run([KUBECTL, "annotate", "--local", "-o", "json", "-f", str(path), "wasmgate-probe-"],
                          capture_output=True, text=True, env=env, timeout=60)


def kubectl_configs(path: Path) -> dict[str, Any]:
    """pluginConfig by WasmPlugin name, as kubectl would send them."""
    r = kubectl(path)
    assert r.returncode == 0, r.stderr
    decoder, items, at = json.JSONDecoder(parse_int=_number), [], 0
    while r.stdout[at:].strip():  # one JSON object per document, one after the other
        item, at = decoder.raw_decode(r.stdout, at + len(r.stdout[at:]) - len(r.stdout[at:].lstrip()))
        items.append(item)
    return {item["metadata"]["name"]: canon(item["spec"]["pluginConfig"]) for item in items}


@pytest.mark.parametrize(("case", "want"), TAKEN)
def test_reads_as_kubectl(tmp_path: Path, case: str, want: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(document(case))
    (spec,) = load_plugin_specs([f])
    assert parse(spec.plugin_config) == parse(want)


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_what_kubectl_refuses(tmp_path: Path, case: str) -> None:
    """An error naming the file and the line; the other files' plugins still load."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(document(case))
    (tmp_path / "good.yaml").write_text(document("v: 1", name="good"))
    specs, errors = scan_plugin_specs([tmp_path])
    assert [s.name for s in specs] == ["good"]
    m = re.fullmatch(rf"{re.escape(str(bad))}: line (\d+) column \d+: invalid YAML: .*kubectl refuses it\)",
                     errors[str(bad)])
    assert m is not None, errors
    assert CASE_LINE <= int(m[1]) < CASE_LINE + len(case.split("\n"))


@needs_kubectl
def test_kubectl_reads_the_table_as_wasmgate_does(tmp_path: Path) -> None:
    """All taken cases in one file, read by kubectl and by wasmgate: the same, and as written down."""
    f = tmp_path / "cases.yaml"
    f.write_text("---\n".join(document(case, name=f"c{i}") for i, (case, _) in enumerate(TAKEN)))
    theirs = kubectl_configs(f)
    ours = {s.name: parse(s.plugin_config) for s in load_plugin_specs([f])}
    for i, (case, want) in enumerate(TAKEN):
        assert theirs[f"c{i}"] == parse(want), f"kubectl reads {case!r} differently from the table"
        assert ours[f"c{i}"] == theirs[f"c{i}"], f"wasmgate and kubectl differ on {case!r}"


@needs_kubectl
@pytest.mark.parametrize("case", REFUSED)
def test_kubectl_refuses_the_same(tmp_path: Path, case: str) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(document(case))
    r = kubectl(f)
    assert r.returncode != 0 and "error converting YAML to JSON" in r.stderr, (r.returncode, r.stderr)
    with pytest.raises(ConfigError, match="kubectl refuses it"):
        load_plugin_specs([f])


# Two different YAML keys with one JSON form, and the two readings kubectl may give (it keeps
# either value, by Go's map order).
COLLIDING = [
    ("1: a\n\"1\": b", '{"1":"a"}', '{"1":"b"}'),
    ("true: a\n\"true\": b", '{"true":"a"}', '{"true":"b"}'),
    ("1: a\n1.0: b", '{"1":"a"}', '{"1":"b"}'),
    ("m: {\"1\": a, 1: b}", '{"m":{"1":"a"}}', '{"m":{"1":"b"}}'),
]


@pytest.mark.parametrize(("case", "one", "other"), COLLIDING)
def test_keys_that_collide_in_json_are_refused(tmp_path: Path, case: str, one: str, other: str) -> None:
    """kubectl takes such a file, but which value it keeps changes from run to run (seen in
    CI: the same kubectl read 1: a / "1": b once as a, once as b); wasmgate refuses it."""
    f = tmp_path / "p.yaml"
    f.write_text(document(case))
    with pytest.raises(ConfigError, match=r"are both '.*' in JSON; kubectl keeps either value at random"):
        load_plugin_specs([f])
    if KUBECTL is not None:
        assert kubectl_configs(f)["p"] in (parse(one), parse(other))


PLUGIN = """apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: tag}}
spec:
  url: file://{wasm}
  pluginName: tag
  priority: 1e1
  pluginConfig:
    tag: yes
    window: 1:20
    limit: 1e3
    mode: 0o755
    ratio: 100.0
    y: n
"""
# The tag plugin (tests/plugins/tag) answers with its configuration as its tag when that is not
# {"tag": "..."}: here the bytes it was given.
PLUGIN_CONFIG = '{"tag":true,"window":"1:20","limit":1000,"mode":493,"ratio":100,"true":false}'


def test_plugin_gets_the_configuration_kubectl_sends(upstream: Upstream, tmp_path: Path) -> None:
    f = tmp_path / "tag.yaml"
    f.write_text(PLUGIN.format(wasm=PLUGIN_BUILD / "tag.wasm"))
    (spec,) = load_plugin_specs([f])
    assert spec.priority == 10  # 1e1: kubectl sends 10, which the API server takes as the int32
    proxy = ProxyThread([f], upstream.url)
    try:
        status, headers, _ = request(proxy.port)
    finally:
        proxy.stop()
    assert status == 200
    got = headers["x-chain-resp"]
    assert got == PLUGIN_CONFIG  # compact JSON, in the file's order
    if KUBECTL is not None:
        assert parse(got) == kubectl_configs(f)["tag"]


# Strings kubectl would read as another type unquoted (y, 1e3, 0o17, 08, ...) or PyYAML would.
STRINGS = ["y", "N", "yes", "off", "~", "", "1e3", "1.e3", "0o17", "0B101", "08", "0x1F", "-.5", "1_000", ".inf",
           "1:20", "=", "<<", "2024-05-01", "2024-05-01T10:00:00Z", "12", "1.5", "0x10000000000000000"]


def test_export_writes_strings_kubectl_reads_back(tmp_path: Path) -> None:
    """`wasmgate export --istio` quotes a string wherever kubectl would read it as something else."""
    config = {"values": STRINGS, **{s: s for s in STRINGS}}
    f = tmp_path / "out.yaml"
    f.write_text(dump_manifests([yaml.safe_load(document("{}"))
                                 | {"spec": {"url": "oci://r.example/p:v1", "pluginConfig": config}}]))
    (spec,) = load_plugin_specs([f])
    assert json.loads(spec.plugin_config) == config
    if KUBECTL is not None:
        assert kubectl_configs(f)["p"] == canon(config)
