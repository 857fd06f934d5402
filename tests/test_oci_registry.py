"""Push, pull, inspect, auth and fetch against real registries (docker-registry on 127.0.0.1),
and interop both ways with an independent client (crane, go-containerregistry: Istio's library)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from oci_harness import PASSWORD, REFRESH_TOKEN, USER, Registry, crane_path, shared_registry
from wasmgate.oci.auth import Credentials, Keychain
from wasmgate.oci.errors import AuthError, FetchError
from wasmgate.oci.fetch import ModuleCache, fetch_module
from wasmgate.oci.image import (
    CNCF_WASM_CONFIG,
    CNCF_WASM_LAYER,
    DOCKER_LAYER,
    OCI_LAYER,
    WASM_CONFIG,
    WASM_LAYER,
    WASM_TO_OCI_CONFIG,
    WASM_TO_OCI_LAYER,
    build_package,
)
from wasmgate.oci.ops import pull, push
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import DOCKER_MANIFEST, OCI_MANIFEST, RegistryClient

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "allow-header"
WASMGATE = [sys.executable, "-m", "wasmgate"]
FORMATS = ("image", "oci-image", "artifact")


@pytest.fixture(scope="session")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return shared_registry("basic", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return shared_registry("token", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def open_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return shared_registry("open", tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/allow-header built by `wasmgate build`."""
    out = tmp_path_factory.mktemp("build") / "plugin.wasm"
    proc = subprocess.run([*WASMGATE, "build", str(EXAMPLE), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def plugin_v2(tmp_path_factory: pytest.TempPathFactory, plugin: Path) -> Path:
    """A second, different module (a custom section appended: same code, other bytes)."""
    out = tmp_path_factory.mktemp("build2") / "plugin.wasm"
    name = b"wasmgate-test-v2"
    out.write_bytes(plugin.read_bytes() + b"\x00" + bytes([len(name) + 1, len(name)]) + name)
    return out


def wg(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WASMGATE, *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=120)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- push, pull, inspect ---------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_push_pull_inspect(basic: Registry, plugin: Path, tmp_path: Path, fmt: str) -> None:
    env = {"DOCKER_CONFIG": str(basic.docker_config(tmp_path / "docker"))}
    ref = basic.ref(f"plugins/allow-header:{fmt}")
    pushed = wg("push", str(plugin), ref, "--format", fmt, env=env)
    assert pushed.returncode == 0, pushed.stderr
    digest = pushed.stdout.strip()
    assert digest.startswith("sha256:") and len(digest) == 71 and pushed.stderr == ""

    out = tmp_path / "pulled.wasm"
    pulled = wg("pull", ref, "-o", str(out), env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert out.read_bytes() == plugin.read_bytes()
    assert digest in pulled.stdout
    by_digest = wg("pull", f"{basic.host}/plugins/allow-header@{digest}", "-o", str(tmp_path / "d.wasm"), env=env)
    assert by_digest.returncode == 0 and (tmp_path / "d.wasm").read_bytes() == plugin.read_bytes()

    shown = wg("inspect", ref, env=env)
    assert shown.returncode == 0, shown.stderr
    assert f"Digest:      {digest}" in shown.stdout
    assert "Istio-compatible" in shown.stdout and "ABI version: 0.2.1" in shown.stdout
    assert "proxy_on_request_headers" in shown.stdout and "env.proxy_send_local_response" in shown.stdout
    report = json.loads(wg("inspect", "--json", ref, env=env).stdout)
    assert report["digest"] == digest and report["module"]["sha256"] == sha(plugin)
    assert report["istio_compatible"] is True


def _manifest(client: RegistryClient, ref: str) -> tuple[str, dict[str, Any]]:
    m = client.get_manifest(parse_reference(ref))
    return m.media_type, m.json


def test_media_types_are_istios(basic: Registry, plugin: Path) -> None:
    """What push writes, checked against the rules of Istio's pkg/wasm/imagefetcher.go."""
    with RegistryClient(Keychain.single(basic.host, Credentials(USER, PASSWORD))) as client:
        for fmt in FORMATS:
            ref = parse_reference(basic.ref(f"plugins/media:{fmt}"))
            push(client, ref, plugin.read_bytes(), fmt)
        mt, doc = _manifest(client, basic.ref("plugins/media:image"))
        assert mt == doc["mediaType"] == DOCKER_MANIFEST
        assert doc["layers"][-1]["mediaType"] == DOCKER_LAYER
        mt, doc = _manifest(client, basic.ref("plugins/media:oci-image"))
        assert mt == OCI_MANIFEST and doc["layers"][-1]["mediaType"] == OCI_LAYER
        assert doc["annotations"] == {"module.wasm.image/variant": "compat"}
        mt, doc = _manifest(client, basic.ref("plugins/media:artifact"))
        assert mt == OCI_MANIFEST and len(doc["layers"]) == 2
        assert [x["mediaType"] for x in doc["layers"]] == [WASM_CONFIG, WASM_LAYER]
        assert doc["config"]["mediaType"] == WASM_CONFIG
        raw = client.get_blob(ref, doc["layers"][1]["digest"], max_size=1 << 30)
        assert raw == plugin.read_bytes()  # the raw module, uncompressed
        config = json.loads(client.get_blob(ref, doc["config"]["digest"], max_size=1 << 20))
        assert config == {"type": "envoy_proxy", "abiVersions": [], "config": {}}


# ---- auth --------------------------------------------------------------------------------------


def test_wrong_password_is_clear_and_secret(basic: Registry, plugin: Path, tmp_path: Path) -> None:
    wrong = "WrongPass-7f3a9"
    env = {"DOCKER_CONFIG": str(basic.docker_config(tmp_path / "docker", password=wrong))}
    for args in (["push", str(plugin), basic.ref("plugins/x:v1")], ["pull", basic.ref("plugins/x:v1")],
                 ["pull", "-v", basic.ref("plugins/x:v1")], ["inspect", "-v", basic.ref("plugins/x:v1")]):
        proc = wg(*args, env=env)
        assert proc.returncode == 1
        assert f"registry {basic.host} refused user 'alice' from {tmp_path / 'docker' / 'config.json'}" \
            in proc.stderr, proc.stderr
        both = proc.stdout + proc.stderr
        b64 = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
        assert wrong not in both and b64 not in both
    proc = wg("pull", basic.ref("plugins/x:v1"), env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert f"registry {basic.host} requires authentication; no credentials for {basic.host}" in proc.stderr


def test_password_stdin_and_pull_secret(basic: Registry, plugin: Path, tmp_path: Path) -> None:
    ref = basic.ref("plugins/creds:v1")
    proc = wg("push", str(plugin), ref, "-u", USER, "--password-stdin", stdin=PASSWORD + "\n",
              env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stderr
    conf = json.dumps({"auths": {basic.host: {"username": USER, "password": PASSWORD}}})
    secret = tmp_path / "secret.yaml"
    secret.write_text("apiVersion: v1\nkind: Secret\nmetadata: {name: regcred, namespace: plugins}\n"
                      "type: kubernetes.io/dockerconfigjson\n"
                      f"data:\n  .dockerconfigjson: {base64.b64encode(conf.encode()).decode()}\n")
    out = tmp_path / "p.wasm"
    proc = wg("pull", ref, "-o", str(out), "--pull-secret", str(secret), env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == plugin.read_bytes()


def test_bearer_token_flow(token: Registry, plugin: Path, tmp_path: Path) -> None:
    assert token.token is not None
    env = {"DOCKER_CONFIG": str(token.docker_config(tmp_path / "docker"))}
    ref = token.ref("plugins/allow-header:v1")
    proc = wg("push", str(plugin), ref, "--format", "artifact", env=env)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "p.wasm"
    assert wg("pull", ref, "-o", str(out), env=env).returncode == 0
    assert out.read_bytes() == plugin.read_bytes()
    issued = token.token.issued
    assert issued >= 2  # push scope, then pull scope

    # wrong password: the token service refuses; the message says so, without the password
    bad = {"DOCKER_CONFIG": str(token.docker_config(tmp_path / "bad", password="Nope-4411"))}
    proc = wg("pull", ref, env=bad)
    assert proc.returncode == 1 and "token service http://127.0.0.1:" in proc.stderr
    assert "refused user 'alice'" in proc.stderr and "Nope-4411" not in proc.stderr

    # anonymous: the token grants nothing, the registry refuses
    proc = wg("pull", ref, env={"DOCKER_CONFIG": str(tmp_path / "none")})
    assert proc.returncode == 1 and f"registry {token.host} refused no credentials" in proc.stderr

    # an identity token (OAuth2 refresh token) from the Docker config
    ident = tmp_path / "ident"
    ident.mkdir()
    (ident / "config.json").write_text(json.dumps({"auths": {token.host: {"identitytoken": REFRESH_TOKEN}}}))
    proc = wg("pull", ref, "-o", str(tmp_path / "q.wasm"), env={"DOCKER_CONFIG": str(ident)})
    assert proc.returncode == 0, proc.stderr


def test_anonymous_registry(open_registry: Registry, plugin: Path, tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_path / "none")}
    ref = open_registry.ref("anon/plugin:v1")
    assert wg("push", str(plugin), ref, env=env).returncode == 0
    out = tmp_path / "p.wasm"
    assert wg("pull", ref, "-o", str(out), env=env).returncode == 0
    assert out.read_bytes() == plugin.read_bytes()
    by_name = ref.replace("127.0.0.1:", "localhost:")  # plain HTTP for localhost too
    assert wg("pull", by_name, "-o", str(tmp_path / "q.wasm"), env=env).returncode == 0


def test_insecure_flag_allows_plain_http(open_registry: Registry, plugin: Path, tmp_path: Path) -> None:
    with RegistryClient(Keychain.anonymous(), insecure=True) as client:
        ref = parse_reference(open_registry.ref("anon/insecure:v1"))
        push(client, ref, plugin.read_bytes())
        pulled = pull(client, ref)
    assert pulled.wasm == plugin.read_bytes()
    with pytest.raises(FetchError, match="not-there:1: cannot connect"):
        fetch_module("oci://not-there:1/a/b:v1", auth=Keychain.anonymous(), cache=ModuleCache(tmp_path), timeout=2)


# ---- fetch_module ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(basic: Registry, plugin: Path, plugin_v2: Path) -> dict[str, str]:
    """tag -> manifest digest, in the basic registry."""
    out = {}
    with RegistryClient(Keychain.single(basic.host, Credentials(USER, PASSWORD))) as client:
        for tag, path, fmt in (("v1", plugin, "image"), ("v2", plugin_v2, "artifact"), ("latest", plugin, "oci-image")):
            out[tag] = push(client, parse_reference(basic.ref(f"fetch/plugin:{tag}")), path.read_bytes(), fmt).digest
    return out


def test_fetch_oci_with_k8s_secret(basic: Registry, plugin: Path, pushed: dict[str, str], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    conf = json.dumps({"auths": {basic.host: {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}})
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
              "metadata": {"name": "regcred"}, "data": {".dockerconfigjson": base64.b64encode(conf.encode()).decode()}}
    auth = Keychain.from_k8s_secret(secret)
    cache = ModuleCache(tmp_path / "cache")
    url = f"oci://{basic.host}/fetch/plugin:v1"
    with caplog.at_level(logging.DEBUG):
        got = fetch_module(url, sha256=pushed["v1"][7:], auth=auth, cache=cache)
    assert got.path.read_bytes() == plugin.read_bytes() and got.sha256 == sha(plugin)
    assert got.digest == pushed["v1"] and got.format == "docker-image" and not got.from_cache
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET" in logs  # requests were logged ...
    assert PASSWORD not in logs and base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in logs

    # IfNotPresent: the same URL is served from the cache, without asking the registry
    # (credentials that would now fail prove no request was made)
    wrong = Credentials(USER, "Wr0ng-pw-5521")
    assert fetch_module(url, auth=wrong, cache=cache).from_cache
    # a manifest digest pinned in the URL, no scheme (= oci)
    again = fetch_module(f"{basic.host}/fetch/plugin@{pushed['v1']}", auth=wrong, cache=cache)
    assert again.from_cache and again.path == got.path
    # Always asks: the wrong credentials now fail, with the URL named and no password
    with pytest.raises(FetchError) as e:
        fetch_module(url, auth=wrong, pull_policy="Always", cache=cache)
    assert url in str(e.value) and "refused user 'alice'" in str(e.value) and "Wr0ng-pw-5521" not in str(e.value)
    # Always with the content pinned (sha256, or a digest in the URL) is IfNotPresent, as in Istio
    assert fetch_module(url, sha256=pushed["v1"], auth=wrong, pull_policy="Always", cache=cache).from_cache
    assert fetch_module(f"oci://{basic.host}/fetch/plugin@{pushed['v1']}", auth=wrong, pull_policy="Always",
                        cache=cache).from_cache


def test_fetch_oci_digest_mismatch_and_latest(basic: Registry, plugin: Path, plugin_v2: Path,
                                              pushed: dict[str, str], tmp_path: Path) -> None:
    auth = Credentials(USER, PASSWORD)
    cache = ModuleCache(tmp_path / "cache")
    url = f"oci://{basic.host}/fetch/plugin:v2"
    with pytest.raises(FetchError) as e:
        fetch_module(url, sha256=pushed["v1"], auth=auth, cache=cache)  # "sha256:" prefix accepted
    assert f"{url}: image manifest digest is {pushed['v2']}, which does not match" in str(e.value)
    got = fetch_module(url, sha256=pushed["v2"], auth=auth, cache=cache)
    assert got.sha256 == sha(plugin_v2) and got.format == "wasm-artifact"

    # :latest means Always: a new push to latest is picked up on the next fetch
    latest = f"oci://{basic.host}/fetch/plugin:latest"
    first = fetch_module(latest, auth=auth, cache=cache)
    assert first.sha256 == sha(plugin) and first.format == "oci-compat-image"
    with RegistryClient(Keychain.single(basic.host, auth)) as client:
        new_digest = push(client, parse_reference(latest), plugin_v2.read_bytes(), "image").digest
    second = fetch_module(latest, auth=auth, cache=cache)
    assert second.sha256 == sha(plugin_v2) and second.digest == new_digest and not second.from_cache
    assert second.path == got.path  # content-addressed: the module :v2 gave, one file
    third = fetch_module(latest, auth=auth, cache=cache)  # Always again: same digest, no download
    assert third.from_cache and third.digest == new_digest


def test_fetch_oci_size_cap(basic: Registry, pushed: dict[str, str], tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache", max_module_size=1 << 20)
    with pytest.raises(FetchError, match="over the 1048576-byte limit"):
        fetch_module(f"oci://{basic.host}/fetch/plugin:v2", auth=Credentials(USER, PASSWORD), cache=cache)
    assert list((tmp_path / "cache" / "modules").iterdir()) == []


def test_fetch_not_wasm_image(open_registry: Registry, tmp_path: Path) -> None:
    """A well-formed image whose plugin.wasm is no module: refused by the magic check."""
    with RegistryClient(Keychain.anonymous()) as client:
        pkg = build_package(b"\0asm\1\0\0\0", "image")
        bad_layer = _tar_gz({"plugin.wasm": b"#!/bin/sh\necho not wasm\n"})
        ref = parse_reference(open_registry.ref("bad/plugin:v1"))
        doc = json.loads(pkg.manifest)
        client.put_blob(ref, pkg.config.data)
        doc["layers"][0].update(digest=client.put_blob(ref, bad_layer), size=len(bad_layer))
        client.put_manifest(ref, json.dumps(doc).encode(), DOCKER_MANIFEST)
    with pytest.raises(FetchError, match="does not hold a WebAssembly module"):
        fetch_module(open_registry.ref("bad/plugin:v1"), auth=Keychain.anonymous(), cache=ModuleCache(tmp_path))


# ---- interop with crane ------------------------------------------------------------------------


def _tar_gz(files: dict[str, bytes]) -> bytes:
    import gzip
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def crane(*args: str, docker_config: Path, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run([crane_path(), *args], capture_output=True, timeout=120,
                          env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


@pytest.mark.parametrize("fmt", FORMATS)
def test_crane_reads_what_wasmgate_pushes(basic: Registry, plugin: Path, tmp_path: Path, fmt: str) -> None:
    dc = basic.docker_config(tmp_path / "docker")
    ref = basic.ref(f"interop/from-wasmgate:{fmt}")
    digest = wg("push", str(plugin), ref, "--format", fmt, env={"DOCKER_CONFIG": str(dc)}).stdout.strip()
    # go-containerregistry (the library Istio's fetcher uses) validates every blob and digest
    assert b"PASS" in crane("validate", "--remote", ref, docker_config=dc).stdout
    assert crane("digest", ref, docker_config=dc).stdout.decode().strip() == digest
    if fmt == "artifact":
        doc = json.loads(crane("manifest", ref, docker_config=dc).stdout)
        wasm = crane("blob", f"{basic.host}/interop/from-wasmgate@{doc['layers'][1]['digest']}",
                     docker_config=dc).stdout
    else:  # the image's file system holds plugin.wasm
        fs = crane("export", ref, "-", docker_config=dc).stdout
        with tarfile.open(fileobj=io.BytesIO(fs)) as tar:
            f = tar.extractfile("plugin.wasm")
            assert f is not None
            wasm = f.read()
    assert wasm == plugin.read_bytes()


@pytest.mark.parametrize("oci", [False, True])
def test_wasmgate_reads_crane_append(basic: Registry, plugin: Path, tmp_path: Path, oci: bool) -> None:
    """`crane append` of a tar with plugin.wasm onto an empty base: the FROM scratch + COPY image."""
    dc = basic.docker_config(tmp_path / "docker")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        tar.add(plugin, arcname="plugin.wasm")
    ref = basic.ref(f"interop/from-crane:{'oci' if oci else 'docker'}")
    crane("append", "-f", str(layer), "-t", ref, *(["--oci-empty-base"] if oci else []), docker_config=dc)
    digest = crane("digest", ref, docker_config=dc).stdout.decode().strip()
    out = tmp_path / "p.wasm"
    proc = wg("pull", ref, "-o", str(out), env={"DOCKER_CONFIG": str(dc)})
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == plugin.read_bytes()
    assert digest in proc.stdout and ("oci-compat-image" if oci else "docker-image") in proc.stdout
    got = fetch_module(ref, sha256=digest, auth=Credentials(USER, PASSWORD), cache=ModuleCache(tmp_path / "c"))
    assert got.sha256 == sha(plugin)

    # an index over it (as a multi-platform build would push): resolved to the image
    idx = basic.ref(f"interop/from-crane-index:{'oci' if oci else 'docker'}")
    crane("index", "append", "-m", ref, "-t", idx, docker_config=dc)
    report = json.loads(wg("inspect", "--json", idx, env={"DOCKER_CONFIG": str(dc)}).stdout)
    assert report["digest"] == digest and report["index_digest"].startswith("sha256:")
    assert report["module"]["sha256"] == sha(plugin)


def _oci_layout(path: Path, wasm: bytes, config_type: str, layer_type: str) -> None:
    """An OCI image layout holding one single-layer Wasm artifact."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> dict[str, Any]:
        d = hashlib.sha256(data).hexdigest()
        (blobs / d).write_bytes(data)
        return {"digest": f"sha256:{d}", "size": len(data)}

    config = put(b'{"architecture":"wasm","os":"wasip1"}')
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": config_type, **config},
                           "layers": [{"mediaType": layer_type, **put(wasm),
                                       "annotations": {"org.opencontainers.image.title": "plugin.wasm"}}]}).encode()
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [{"mediaType": OCI_MANIFEST, **put(manifest)}]}
    (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("config_type,layer_type,fmt", [
    (WASM_TO_OCI_CONFIG, WASM_TO_OCI_LAYER, "wasm-to-oci"),
    (CNCF_WASM_CONFIG, CNCF_WASM_LAYER, "cncf-wasm"),
])
def test_wasmgate_reads_crane_pushed_artifacts(basic: Registry, plugin: Path, tmp_path: Path,
                                               config_type: str, layer_type: str, fmt: str) -> None:
    dc = basic.docker_config(tmp_path / "docker")
    layout = tmp_path / "layout"
    _oci_layout(layout, plugin.read_bytes(), config_type, layer_type)
    ref = basic.ref(f"interop/artifact:{fmt}")
    crane("push", str(layout), ref, docker_config=dc)
    out = tmp_path / "p.wasm"
    proc = wg("pull", ref, "-o", str(out), env={"DOCKER_CONFIG": str(dc)})
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == plugin.read_bytes() and f"({fmt})" in proc.stdout
    report = json.loads(wg("inspect", "--json", ref, env={"DOCKER_CONFIG": str(dc)}).stdout)
    assert report["format"] == fmt and report["istio_compatible"] is False
    assert report["module"]["abi_version"] == "0.2.1"


def test_no_credentials_leak_into_errors_of_auth_failures(basic: Registry) -> None:
    with RegistryClient(Keychain.single(basic.host, Credentials(USER, "Leaky-Pw-123"))) as client, \
            pytest.raises(AuthError) as e:
        client.get_manifest(parse_reference(basic.ref("plugins/x:v1")))
    assert "Leaky-Pw-123" not in str(e.value) and "Leaky-Pw-123" not in repr(e.value)
