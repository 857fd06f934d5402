"""OCI pieces that need no registry: references, credentials, formats, build, http/file fetch, cache."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from wasmgate.build import BuildError, Toolchain, build, tinygo_command
from wasmgate.oci.auth import Credentials, CredentialsError, Keychain
from wasmgate.oci.errors import FetchError, FormatError
from wasmgate.oci.fetch import ModuleCache, effective_policy, fetch_module
from wasmgate.oci.image import (
    DOCKER_LAYER,
    OCI_LAYER,
    WASM_LAYER,
    WASM_TO_OCI_LAYER,
    build_package,
    locate_module,
    plugin_from_tar_gz,
    plugin_tar_gz,
    wasm_export_names,
)
from wasmgate.oci.reference import BadReference, Reference, parse_reference
from wasmgate.oci.registry import DOCKER_MANIFEST, OCI_MANIFEST, parse_challenge

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "allow-header"
PLUGIN = EXAMPLE / "plugin.wasm"
TINY = b"\0asm\x01\x00\x00\x00"  # the smallest valid module
WASMGATE = [sys.executable, "-m", "wasmgate"]


# ---- references and challenges -------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("127.0.0.1:5000/plugins/a:v1", Reference("127.0.0.1:5000", "plugins/a", "v1")),
    ("oci://localhost:5000/a", Reference("localhost:5000", "a", "latest")),
    ("ghcr.io/o/p@sha256:" + "a" * 64, Reference("ghcr.io", "o/p", "", "sha256:" + "a" * 64)),
    ("nginx", Reference("docker.io", "library/nginx", "latest")),
    ("user/img:1.0", Reference("docker.io", "user/img", "1.0")),
])
def test_parse_reference(text: str, want: Reference) -> None:
    assert parse_reference(text) == want


@pytest.mark.parametrize("text", ["", "http://x/y", "Upper/Case", "a/b@sha256:12", "a:b:c:d"])
def test_parse_reference_rejects(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                                     'scope="repository:a/b:pull,push",error="insufficient_scope"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "reg",
                      "scope": "repository:a/b:pull,push", "error": "insufficient_scope"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# ---- credentials ---------------------------------------------------------------------------------


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_docker_config_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"auths": {
        "https://index.docker.io/v1/": {"auth": _b64("hubuser:hubpw")},
        "http://127.0.0.1:5000": {"username": "u", "password": "p"},
        "reg.example:443/v2/": {"identitytoken": "idtok"},
    }}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    kc = Keychain.from_docker_config()
    assert kc.resolve("docker.io") == Credentials("hubuser", "hubpw")
    assert kc.resolve("registry-1.docker.io") == Credentials("hubuser", "hubpw")
    assert kc.resolve("127.0.0.1:5000") == Credentials("u", "p")
    assert kc.resolve("reg.example:443").identity_token == "idtok"
    assert kc.resolve("other.example").anonymous
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "missing"))
    assert Keychain.from_docker_config().resolve("127.0.0.1:5000").anonymous


def test_credentials_never_show_secrets() -> None:
    c = Credentials("alice", "hunter2-secret", identity_token="tok-secret")
    for text in (repr(c), str(c), repr(Keychain.single("r", c))):
        assert "hunter2" not in text and "tok-secret" not in text
    assert "alice" in repr(c)


def _secret(data: dict[str, Any], stype: str = "kubernetes.io/dockerconfigjson") -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pull", "namespace": "ns"},
            "type": stype, **data}


def test_k8s_secret() -> None:
    conf = json.dumps({"auths": {"127.0.0.1:5000": {"auth": _b64("bob:pw")}}})
    kc = Keychain.from_k8s_secret(_secret({"data": {".dockerconfigjson": _b64(conf)}}))
    assert kc.resolve("127.0.0.1:5000") == Credentials("bob", "pw")
    kc = Keychain.from_k8s_secret(_secret({"stringData": {".dockerconfigjson": conf}}))
    assert kc.resolve("127.0.0.1:5000") == Credentials("bob", "pw")
    legacy = json.dumps({"127.0.0.1:5000": {"auth": _b64("bob:pw")}})
    kc = Keychain.from_k8s_secret(_secret({"data": {".dockercfg": _b64(legacy)}}, "kubernetes.io/dockercfg"))
    assert kc.resolve("127.0.0.1:5000") == Credentials("bob", "pw")


@pytest.mark.parametrize("secret,msg", [
    (_secret({"data": {}}, "Opaque"), "type is 'Opaque'"),
    (_secret({"data": {}}), "no data..dockerconfigjson"),
    (_secret({"data": {".dockerconfigjson": "%%%"}}), "not valid base64"),
    (_secret({"data": {".dockerconfigjson": _b64("{bad")}}), "not valid JSON"),
    (_secret({"data": {".dockerconfigjson": _b64('{"auths":{"r":{"auth":"' + _b64("nocolon") + '"}}}')}}),
     "not base64 of user:password"),
])
def test_k8s_secret_errors(secret: dict[str, Any], msg: str) -> None:
    with pytest.raises(CredentialsError) as e:
        Keychain.from_k8s_secret(secret)
    assert msg in str(e.value) and "Secret ns/pull" in str(e.value)


def test_credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    helper = tmp_path / "bin" / "docker-credential-testhelper"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread server\n'
                      'if [ "$server" = "127.0.0.1:5000" ]; then echo \'{"Username":"h","Secret":"hs"}\'; '
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}:{os.environ['PATH']}")
    kc = Keychain.from_dockerconfigjson({"credsStore": "testhelper", "auths": {"127.0.0.1:5000": {}}})
    assert kc.resolve("127.0.0.1:5000") == Credentials("h", "hs")
    assert kc.resolve("other:1").anonymous


# ---- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,media_type,layer_type,n_layers", [
    ("image", DOCKER_MANIFEST, DOCKER_LAYER, 1),
    ("oci-image", OCI_MANIFEST, OCI_LAYER, 1),
    ("artifact", OCI_MANIFEST, WASM_LAYER, 2),
])
def test_package_roundtrip(fmt: str, media_type: str, layer_type: str, n_layers: int) -> None:
    wasm = PLUGIN.read_bytes()
    pkg = build_package(wasm, fmt, ["proxy_abi_version_0_2_1"])
    doc = json.loads(pkg.manifest)
    assert doc["mediaType"] == media_type == pkg.media_type
    assert len(doc["layers"]) == n_layers
    loc = locate_module(doc, media_type)
    assert loc.istio and loc.layer["mediaType"] == layer_type
    blobs = {b.digest: b.data for b in pkg.blobs()}
    data = blobs[loc.layer["digest"]]
    assert (plugin_from_tar_gz(data, 1 << 30) if loc.tar else data) == wasm
    assert build_package(wasm, fmt).manifest == build_package(wasm, fmt).manifest  # reproducible


def test_formats_follow_istio_rules() -> None:
    desc = {"digest": "sha256:" + "0" * 64, "size": 1}
    # a Docker manifest must end with a Docker tar.gz layer: Istio tries nothing else
    with pytest.raises(FormatError, match="last layer"):
        locate_module({"layers": [{**desc, "mediaType": OCI_LAYER}]}, DOCKER_MANIFEST)
    # OCI: only the last layer counts for the compat variant
    loc = locate_module({"layers": [{**desc, "mediaType": "x"}, {**desc, "mediaType": OCI_LAYER}]}, OCI_MANIFEST)
    assert loc.format == "oci-compat-image" and loc.istio
    # one Wasm layer alone: wasmgate reads it, Istio would not (it wants exactly two layers)
    loc = locate_module({"layers": [{**desc, "mediaType": WASM_LAYER}]}, OCI_MANIFEST)
    assert loc.format == "wasm-artifact" and not loc.istio
    loc = locate_module({"layers": [{**desc, "mediaType": WASM_TO_OCI_LAYER}]}, OCI_MANIFEST)
    assert loc.format == "wasm-to-oci" and not loc.istio
    loc = locate_module({"layers": [{**desc, "mediaType": "application/wasm"}]}, OCI_MANIFEST)
    assert loc.format == "cncf-wasm"
    with pytest.raises(FormatError, match="no Wasm module found"):
        locate_module({"layers": [{**desc, "mediaType": "application/vnd.oci.image.layer.v1.tar"}]}, OCI_MANIFEST)


def _tar_gz(entries: list[tuple[str, bytes]]) -> bytes:
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def test_tar_layer_rules() -> None:
    # any directory, by base name, the first one (as Istio reads it)
    assert plugin_from_tar_gz(_tar_gz([("etc/other", b"x"), ("app/plugin.wasm", TINY),
                                       ("plugin.wasm", b"second")]), 100) == TINY
    with pytest.raises(FormatError, match=r"plugin\.wasm not found"):
        plugin_from_tar_gz(_tar_gz([("main.wasm", TINY)]), 100)
    with pytest.raises(FormatError, match="over the 4-byte limit"):
        plugin_from_tar_gz(plugin_tar_gz(TINY)[0], 4)
    with pytest.raises(FormatError, match="not a valid gzip tar"):
        plugin_from_tar_gz(b"not gzip", 100)


def test_export_scan_matches_wasmtime() -> None:
    from wasmgate.engine.wasm import compile_module, exports_of
    from wasmgate.plugin.manager import cache_dir, engine
    wasm = PLUGIN.read_bytes()
    assert wasm_export_names(wasm) == exports_of(compile_module(engine(), wasm, "p", cache_dir()))


# ---- build ---------------------------------------------------------------------------------------


def test_build_example(tmp_path: Path) -> None:
    out = tmp_path / "built.wasm"
    proc = subprocess.run([*WASMGATE, "build", str(EXAMPLE), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and proc.stderr == ""
    wasm = out.read_bytes()
    assert wasm[:4] == b"\0asm"
    assert "proxy_abi_version_0_2_1" in wasm_export_names(wasm)
    assert "_initialize" in wasm_export_names(wasm)  # c-shared (reactor) module


def test_build_without_toolchain_says_what_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no go, no tinygo
    proc = subprocess.run([*WASMGATE, "build", str(EXAMPLE), "-o", str(tmp_path / "x.wasm")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert "no Go toolchain found" in proc.stderr and "Go >= 1.24" in proc.stderr and "TinyGo" in proc.stderr
    proc = subprocess.run([*WASMGATE, "build", str(EXAMPLE), "--tinygo"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "install TinyGo" in proc.stderr


def test_build_errors(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="no Go files"):
        build(tmp_path)
    (tmp_path / "go.mod").write_text("module example.com/broken\n\ngo 1.24\n")
    (tmp_path / "main.go").write_text("package main\nfunc main() { undefined() }\n")
    with pytest.raises(BuildError, match=r"go build .* failed") as e:
        build(tmp_path)
    assert "undefined" in str(e.value)
    with pytest.raises(BuildError, match="needs --tinygo"):
        build(EXAMPLE, tinygo_gc="custom")


def test_tinygo_command_flags() -> None:
    new = Toolchain("tinygo", "tinygo", (0, 37, 0))
    cmd = tinygo_command(new, Path("/o.wasm"), "custom")
    assert cmd == ["tinygo", "build", "-o", "/o.wasm", "-target=wasip1", "-buildmode=c-shared",
                   "-scheduler=none", "-gc=custom", "-tags=custommalloc nottinygc_envoy", "."]
    old = Toolchain("tinygo", "tinygo", (0, 30, 0))
    assert tinygo_command(old, Path("/o.wasm"), "leaking") == [
        "tinygo", "build", "-o", "/o.wasm", "-target=wasi", "-scheduler=none", "-gc=leaking", "."]
    with pytest.raises(BuildError, match="unknown collector"):
        tinygo_command(new, Path("/o.wasm"), "bogus")


# ---- inspect a file ------------------------------------------------------------------------------


def test_inspect_file() -> None:
    proc = subprocess.run([*WASMGATE, "inspect", str(PLUGIN)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ABI version: 0.2.1" in out
    assert hashlib.sha256(PLUGIN.read_bytes()).hexdigest() in out
    assert "proxy_on_request_headers" in out and "env.proxy_log (i32,i32,i32)->i32" in out
    js = json.loads(subprocess.run([*WASMGATE, "inspect", "--json", str(PLUGIN)],
                                   capture_output=True, text=True, check=True).stdout)
    assert js["module"]["abi_version"] == "0.2.1"
    assert {"module": "env", "name": "proxy_log", "type": "(i32,i32,i32)->i32"} in js["module"]["imports"]


def test_inspect_not_wasm(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"hello")
    proc = subprocess.run([*WASMGATE, "inspect", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1 and "\\0asm" in proc.stderr


# ---- http and file fetch -------------------------------------------------------------------------


@dataclass
class FileServer:
    server: ThreadingHTTPServer
    files: dict[str, bytes] = field(default_factory=dict)
    fail_first: dict[str, int] = field(default_factory=dict)  # path -> 503s to answer first
    hits: dict[str, int] = field(default_factory=dict)
    auth: dict[str, str] = field(default_factory=dict)  # path -> Authorization header seen

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def files() -> Iterator[FileServer]:
    fs: FileServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            fs.hits[path] = fs.hits.get(path, 0) + 1
            fs.auth[path] = self.headers.get("Authorization", "")
            if fs.fail_first.get(path, 0) > 0:
                fs.fail_first[path] -= 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = fs.files.get(path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    fs = FileServer(ThreadingHTTPServer(("127.0.0.1", 0), H))
    threading.Thread(target=fs.server.serve_forever, daemon=True).start()
    yield fs
    fs.server.shutdown()
    fs.server.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> ModuleCache:
    return ModuleCache(tmp_path / "cache", max_module_size=8 << 20)


def test_http_fetch_sha256_and_cache(files: FileServer, cache: ModuleCache) -> None:
    wasm = PLUGIN.read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    files.files["/p.wasm"] = wasm
    got = fetch_module(files.url("/p.wasm"), sha256=sha, cache=cache)
    assert got.sha256 == sha and got.path.read_bytes() == wasm and not got.from_cache
    assert got.path == cache.root / "modules" / f"{sha}.wasm"
    # IfNotPresent (the default): no second request, for the same URL or the same sha256
    again = fetch_module(files.url("/p.wasm"), cache=cache)
    assert again.from_cache and again.path == got.path and files.hits["/p.wasm"] == 1
    assert fetch_module(files.url("/other.wasm"), sha256=sha, cache=cache).from_cache
    # Always asks again
    fetch_module(files.url("/p.wasm"), pull_policy="Always", cache=cache)
    assert files.hits["/p.wasm"] == 2
    # ... unless the sha256 pins the content and that module is cached
    assert fetch_module(files.url("/p.wasm"), sha256=sha, pull_policy="Always", cache=cache).from_cache
    assert files.hits["/p.wasm"] == 2
    with pytest.raises(FetchError) as e:
        fetch_module(files.url("/p.wasm"), sha256="0" * 64, pull_policy="Always", cache=cache)
    assert files.url("/p.wasm") in str(e.value) and "does not match" in str(e.value)


def test_http_fetch_retries_with_backoff(files: FileServer, cache: ModuleCache) -> None:
    files.files["/flaky.wasm"] = TINY
    files.fail_first["/flaky.wasm"] = 2
    t0 = time.monotonic()
    got = fetch_module(files.url("/flaky.wasm"), cache=cache, initial_backoff=0.05)
    assert got.path.read_bytes() == TINY and files.hits["/flaky.wasm"] == 3
    assert time.monotonic() - t0 >= 0.05 + 0.1  # 0.05 then 0.1
    files.fail_first["/down.wasm"] = 99
    with pytest.raises(FetchError, match=r"download failed after 3 attempt\(s\), last error: HTTP 503"):
        fetch_module(files.url("/down.wasm"), cache=cache, max_retries=3, initial_backoff=0.01)
    with pytest.raises(FetchError, match=r"after 1 attempt\(s\), last error: HTTP 404"):  # 4xx: no retry
        fetch_module(files.url("/missing.wasm"), cache=cache, initial_backoff=0.01)


def test_http_fetch_checks(files: FileServer, cache: ModuleCache, caplog: pytest.LogCaptureFixture) -> None:
    files.files["/gz.wasm"] = gzip.compress(TINY)
    got = fetch_module(files.url("/gz.wasm"), sha256=hashlib.sha256(TINY).hexdigest(), cache=cache)
    assert got.path.read_bytes() == TINY  # unpacked as Istio does; sha256 is the module's
    files.files["/text"] = b"<html>not a module</html>"
    with pytest.raises(FetchError, match="missing \\\\0asm magic"):
        fetch_module(files.url("/text"), cache=cache)
    files.files["/big.wasm"] = TINY + bytes(9 << 20)
    with pytest.raises(FetchError, match="over the 8388608-byte limit"):
        fetch_module(files.url("/big.wasm"), cache=cache)
    files.files["/secret.wasm"] = b"nope"
    with caplog.at_level(logging.DEBUG), pytest.raises(FetchError) as e:
        fetch_module(files.url("/secret.wasm").replace("http://", "http://user:pa55word@") + "?sig=tok3n",
                     cache=cache)
    assert "pa55word" not in str(e.value) and "tok3n" not in str(e.value) and "/secret.wasm" in str(e.value)
    assert files.auth["/secret.wasm"] == "Basic " + _b64("user:pa55word")  # sent as a header
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert "/secret.wasm" in logs and "pa55word" not in logs and _b64("user:pa55word") not in logs
    with pytest.raises(FetchError, match="unsupported URL scheme 'ftp'"):
        fetch_module("ftp://x/y.wasm", cache=cache)
    with pytest.raises(FetchError, match="sha256 must be 64 hex digits"):
        fetch_module(files.url("/gz.wasm"), sha256="abc", cache=cache)


def test_file_fetch(tmp_path: Path, cache: ModuleCache) -> None:
    (tmp_path / "m.wasm").write_bytes(TINY)
    got = fetch_module("file://m.wasm", base_dir=tmp_path, cache=cache)
    assert got.path == tmp_path / "m.wasm" and got.sha256 == hashlib.sha256(TINY).hexdigest()
    assert fetch_module(f"file://{tmp_path}/m.wasm", sha256=got.sha256, cache=cache).path == got.path
    with pytest.raises(FetchError, match="does not match"):
        fetch_module("file://m.wasm", base_dir=tmp_path, sha256="1" * 64, cache=cache)
    (tmp_path / "n.wasm").write_bytes(b"\0asX\1\0\0\0")
    with pytest.raises(FetchError, match=r"file://n\.wasm: not a WebAssembly module"):
        fetch_module("file://n.wasm", base_dir=tmp_path, cache=cache)
    with pytest.raises(FetchError, match=r"file://none\.wasm: cannot read"):
        fetch_module("file://none.wasm", base_dir=tmp_path, cache=cache)


def test_pull_policy() -> None:
    assert effective_policy("oci://r/a:latest", "") == "Always"
    assert effective_policy("r/a:latest", "UNSPECIFIED_POLICY") == "Always"
    assert effective_policy("oci://r/a:v1", "") == "IfNotPresent"
    assert effective_policy("oci://r/a", "") == "IfNotPresent"  # as Istio: only an explicit :latest
    assert effective_policy("https://h/a:latest", "") == "IfNotPresent"
    assert effective_policy("oci://r/a:latest", "IfNotPresent") == "IfNotPresent"
    with pytest.raises(FetchError, match="unknown imagePullPolicy"):
        effective_policy("oci://r/a", "Never")
    # content pinned by sha256 or a digest in the URL: IfNotPresent whatever the policy (Istio's rule)
    assert effective_policy("oci://r/a:latest", "Always", "a" * 64) == "IfNotPresent"
    assert effective_policy("oci://r/a:latest", "", "a" * 64) == "IfNotPresent"
    assert effective_policy(f"oci://r/a@sha256:{'a' * 64}", "Always") == "IfNotPresent"
    assert effective_policy(f"r/a:v1@sha256:{'a' * 64}", "Always") == "IfNotPresent"
    assert effective_policy("https://h/a.wasm", "Always", "a" * 64) == "IfNotPresent"
    assert effective_policy("https://h/a.wasm@sha256:x", "Always") == "Always"  # only oci URLs carry digests


# ---- cache ---------------------------------------------------------------------------------------


def test_cache_expiry_and_pins(cache: ModuleCache) -> None:
    a_sha, a = cache.put(TINY)
    b_sha, b = cache.put(TINY + b"\0")
    cache.remember("http://x/a.wasm", a_sha)
    cache.remember("oci://r/b:v1", b_sha, "sha256:" + "b" * 64)
    assert cache.put(TINY) == (a_sha, a)  # content-addressed: one file
    old = time.time() - cache.expiry - 10
    for p in (a, b):
        os.utime(p, (old, old))
    cache.pin(a)
    cache.pin(a)
    assert cache.purge() == [b]  # a is in use
    assert a.exists() and not b.exists()
    assert cache.lookup("oci://r/b:v1") is None and cache.by_digest("b" * 64) is None
    assert cache.lookup("http://x/a.wasm") == (a_sha, "")
    cache.unpin(a)
    assert cache.is_pinned(a)  # pinned twice, unpinned once
    cache.unpin(a)
    os.utime(a, (old, old))
    with cache.pinned(a):
        assert cache.purge() == []
    assert cache.purge() == [a]
    assert cache.lookup("http://x/a.wasm") is None


def test_cache_hit_refreshes_use_time(cache: ModuleCache) -> None:
    sha, p = cache.put(TINY)
    old = time.time() - cache.expiry - 10
    os.utime(p, (old, old))
    assert cache.get(sha) == p  # a use: no longer expired
    assert cache.purge() == []
    with pytest.raises(FetchError, match="over the 8388608-byte limit"):
        cache.put(TINY + bytes(8 << 20))
