"""TLS through real sockets: HTTPS listener with SNI, https:// upstreams, startup errors.

The certificates are made here: a test CA, and leaves for 127.0.0.1/localhost (the
default), a.example and *.b.example (chosen by SNI).
"""

from __future__ import annotations

import dataclasses
import datetime
import http.client
import ipaddress
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from servers import ALLOW_HEADER_YAML, ProxyThread, Upstream, start_upstream
from test_cli import run_fails, running
from test_e2e import request
from wasmgate.app import RunOptions
from wasmgate.resources.config import load_config
from wasmgate.worker import _options


@dataclasses.dataclass
class Pki:
    dir: Path
    ca: Path

    def cert(self, name: str) -> str:
        return str(self.dir / f"{name}.pem")

    def key(self, name: str) -> str:
        return str(self.dir / f"{name}.key")

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def server(self, name: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert(name), self.key(name))
        return ctx


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("wasmgate test CA")).issuer_name(_name("wasmgate test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaves: dict[str, list[x509.GeneralName]] = {
        "default": [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        "a": [x509.DNSName("a.example")],
        "b": [x509.DNSName("*.b.example")],
    }
    for name, sans in leaves.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cn = sans[0].value if isinstance(sans[0], x509.DNSName) else name
        cert = (x509.CertificateBuilder().subject_name(_name(str(cn))).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return Pki(d, d / "ca.pem")


def _tls_opts(pki: Pki) -> dict[str, Any]:
    return {"tls_cert": pki.cert("default"), "tls_key": pki.key("default"),
            "tls_sni": [{"server_names": ["a.example"], "cert": pki.cert("a"), "key": pki.key("a")},
                        {"server_names": ["*.b.example"], "cert": pki.cert("b"), "key": pki.key("b")}]}


@pytest.fixture(scope="module")
def tls_proxy(pki: Pki, upstream: Upstream) -> Iterator[ProxyThread]:
    p = ProxyThread([ALLOW_HEADER_YAML], upstream.url, **_tls_opts(pki))
    yield p
    p.stop()


def tls_get(port: int, ctx: ssl.SSLContext, server_name: str, headers: dict[str, str] | None = None,
            path: str = "/") -> tuple[int, bytes, dict[str, Any]]:
    """GET over TLS to 127.0.0.1, sending ``server_name`` as SNI (and Host); returns
    the status, body and the peer certificate the client verified."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as s:
        lines = [f"GET {path} HTTP/1.1", f"host: {server_name}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        r = http.client.HTTPResponse(s)
        r.begin()
        body = r.read()
        cert = s.getpeercert()
        assert cert is not None
        return r.status, body, dict(cert)


def _cn(cert: dict[str, Any]) -> str:
    return str(next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName"))


def test_allow_header_over_tls(tls_proxy: ProxyThread, pki: Pki, upstream: Upstream) -> None:
    status, body, _ = tls_get(tls_proxy.port, pki.client(), "localhost")
    assert (status, body) == (403, b"access denied\n")
    status, _, _ = tls_get(tls_proxy.port, pki.client(), "localhost", {"allow": "true"}, "/over-tls")
    assert status == 200
    seen = upstream.seen[-1]
    assert seen.path == "/over-tls"
    assert seen.header("x-forwarded-proto") == "https"


def test_https_client_by_ip_gets_default_cert(tls_proxy: ProxyThread, pki: Pki) -> None:
    """http.client as users use it: no SNI for an IP address, the default certificate."""
    conn = http.client.HTTPSConnection("127.0.0.1", tls_proxy.port, context=pki.client(), timeout=10)
    try:
        conn.request("GET", "/", headers={"allow": "true"})
        assert conn.getresponse().status == 200
        assert conn.sock is not None
        cert = conn.sock.getpeercert()
        assert cert is not None and _cn(dict(cert)) == "localhost"
    finally:
        conn.close()


@pytest.mark.parametrize(("server_name", "cn"), [
    ("a.example", "a.example"),
    ("x.b.example", "*.b.example"),
    ("localhost", "localhost"),
])
def test_sni_selects_certificate(tls_proxy: ProxyThread, pki: Pki, server_name: str, cn: str) -> None:
    status, _, cert = tls_get(tls_proxy.port, pki.client(), server_name, {"allow": "true"})
    assert status == 200
    assert _cn(cert) == cn
    assert ("DNS", cn) in cert["subjectAltName"]


def test_sni_unknown_name_gets_default_cert(tls_proxy: ProxyThread, pki: Pki) -> None:
    ctx = pki.client()
    ctx.check_hostname = False  # the default certificate does not name it
    for name in ("other.example", "deep.x.b.example"):  # a wildcard matches one label only
        _, _, cert = tls_get(tls_proxy.port, ctx, name, {"allow": "true"})
        assert _cn(cert) == "localhost"


def test_plain_http_to_tls_listener_is_refused(tls_proxy: ProxyThread) -> None:
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        request(tls_proxy.port, headers={"allow": "true"})


@pytest.fixture(scope="module")
def tls_upstream(pki: Pki) -> Iterator[Upstream]:
    up = start_upstream(pki.server("default"))
    yield up
    up.server.shutdown()


def test_https_upstream_verified_with_ca(tls_upstream: Upstream, pki: Pki) -> None:
    assert tls_upstream.url.startswith("https://127.0.0.1:")
    p = ProxyThread([ALLOW_HEADER_YAML], tls_upstream.url, upstream_ca=str(pki.ca))
    try:
        for i in range(3):  # the pooled TLS connection is reused
            status, _, body = request(p.port, path=f"/to-https/{i}", headers={"allow": "true"})
            assert status == 200, body
            assert tls_upstream.seen[-1].path == f"/to-https/{i}"
            assert tls_upstream.seen[-1].header("x-forwarded-proto") == "http"
        assert len({s.peer_port for s in tls_upstream.seen[-3:]}) == 1  # one pooled TLS connection
    finally:
        p.stop()


def test_https_upstream_untrusted_ca_is_503(tls_upstream: Upstream) -> None:
    p = ProxyThread([ALLOW_HEADER_YAML], tls_upstream.url)  # the system store does not know the test CA
    try:
        before = len(tls_upstream.seen)
        status, _, body = request(p.port, headers={"allow": "true"})
        assert status == 503
        assert b"CERTIFICATE_VERIFY_FAILED" in body or b"certificate verify failed" in body.lower()
        assert len(tls_upstream.seen) == before
    finally:
        p.stop()


def test_https_upstream_insecure_skip_verify(tls_upstream: Upstream) -> None:
    p = ProxyThread([ALLOW_HEADER_YAML], tls_upstream.url, upstream_insecure_skip_verify=True)
    try:
        assert request(p.port, headers={"allow": "true"})[0] == 200
    finally:
        p.stop()


def test_tls_both_ways_cli_with_workers(pki: Pki, tls_upstream: Upstream, tmp_path: Path) -> None:
    """The config file (paths relative to it) through the supervisor to two workers."""
    (tmp_path / "certs").mkdir()
    for f in ("default.pem", "default.key"):
        (tmp_path / "certs" / f).write_bytes((pki.dir / f).read_bytes())
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text(json.dumps({
        "tls": {"cert": "certs/default.pem", "key": "certs/default.key",
                "sni": [{"server_names": ["a.example"], "cert": pki.cert("a"), "key": pki.key("a")}]},
        "upstream_tls": {"ca": str(pki.ca)},
        "upstream": tls_upstream.url,
    }))
    with running("-c", str(cfg), "--workers", "2") as (port, _):
        status, _, cert = tls_get(port, pki.client(), "a.example", {"allow": "true"}, "/cli-tls")
        assert status == 200 and _cn(cert) == "a.example"
        assert tls_upstream.seen[-1].path == "/cli-tls"
        assert tls_upstream.seen[-1].header("x-forwarded-proto") == "https"


def test_config_tls_paths_relative_to_file(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "wasmgate.yaml"
    cfg.parent.mkdir()
    cfg.write_text("tls: {cert: certs/s.pem, key: /abs/s.key, sni: [{server_names: [a.example], cert: a.pem, "
                   "key: a.key}]}\nupstream_tls: {ca: ca.pem}\n")
    c = load_config(cfg)
    assert c.tls is not None
    assert c.tls.cert == cfg.parent / "certs" / "s.pem"
    assert c.tls.key == Path("/abs/s.key")
    assert c.tls.sni[0].cert == cfg.parent / "a.pem"
    assert c.upstream_tls.ca == cfg.parent / "ca.pem"
    assert c.upstream_tls.insecure_skip_verify is False


def test_tls_options_survive_json_to_workers(pki: Pki) -> None:
    opts = RunOptions(upstream="https://127.0.0.1:1", upstream_ca=str(pki.ca), **_tls_opts(pki))
    back = _options(json.loads(json.dumps(dataclasses.asdict(opts))))
    assert back == opts


def test_bad_cert_path_is_startup_error(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    err = run_fails("--tls-cert", missing, "--tls-key", pki.key("default"), "--workers", "1")
    assert "tls.cert" in err and missing in err
    err = run_fails("--tls-cert", pki.cert("default"), "--tls-key", missing, "--workers", "2")
    assert "tls.key" in err and missing in err
    err = run_fails("--tls-cert", pki.cert("default"), "--tls-key", pki.key("a"), "--workers", "1")
    assert "tls.cert/tls.key" in err  # a key that does not match the certificate
    err = run_fails("--tls-cert", pki.cert("default"), "--workers", "1")
    assert "tls: cert and key are both required" in err


def test_bad_sni_and_ca_paths_in_config(pki: Pki, tmp_path: Path) -> None:
    cfg = tmp_path / "wasmgate.yaml"
    cfg.write_text(json.dumps({"tls": {"cert": pki.cert("default"), "key": pki.key("default"),
                                       "sni": [{"server_names": ["a.example"], "cert": "gone.pem",
                                                "key": pki.key("a")}]}}))
    err = run_fails("-c", str(cfg), "--workers", "1")
    assert "tls.sni[0].cert" in err and str(tmp_path / "gone.pem") in err
    cfg.write_text(json.dumps({"upstream": "https://127.0.0.1:1", "upstream_tls": {"ca": "no-ca.pem"}}))
    err = run_fails("-c", str(cfg), "--workers", "1")
    assert "upstream_tls.ca" in err and str(tmp_path / "no-ca.pem") in err


def test_client_certificate_settings_errors(pki: Pki, tmp_path: Path) -> None:
    cfg = tmp_path / "wasmgate.yaml"
    base = {"cert": pki.cert("default"), "key": pki.key("default")}
    cfg.write_text(json.dumps({"tls": {**base, "client_ca": "no-ca.pem"}}))
    err = run_fails("-c", str(cfg), "--workers", "1")
    assert "tls.client_ca" in err and str(tmp_path / "no-ca.pem") in err
    cfg.write_text(json.dumps({"tls": {**base, "require_client_certificate": True}}))
    assert "tls.require_client_certificate: needs tls.client_ca" in run_fails("-c", str(cfg), "--workers", "1")
    cfg.write_text(json.dumps({"upstream": "https://127.0.0.1:1", "upstream_tls": {"cert": pki.cert("default")}}))
    assert "upstream_tls.cert/upstream_tls.key: give both" in run_fails("-c", str(cfg), "--workers", "1")
    cfg.write_text(json.dumps({"upstream": "https://127.0.0.1:1",
                               "upstream_tls": {"cert": "gone.pem", "key": pki.key("default")}}))
    err = run_fails("-c", str(cfg), "--workers", "2")
    assert "upstream_tls.cert" in err and str(tmp_path / "gone.pem") in err


def test_client_certificate_settings_reach_the_options(pki: Pki, tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path / "w.yaml", {
        "tls": {"cert": "d.pem", "key": "d.key", "client_ca": "ca.pem", "require_client_certificate": True},
        "upstream_tls": {"cert": "c.pem", "key": "c.key"}}))
    assert cfg.tls is not None and cfg.tls.client_ca == tmp_path / "ca.pem" and cfg.tls.require_client_certificate
    assert (cfg.upstream_tls.cert, cfg.upstream_tls.key) == (tmp_path / "c.pem", tmp_path / "c.key")
    opts = RunOptions(upstream="https://127.0.0.1:1", tls_client_ca=str(pki.ca), tls_require_client_certificate=True,
                      upstream_cert=pki.cert("a"), upstream_key=pki.key("a"), **_tls_opts(pki))
    assert _options(json.loads(json.dumps(dataclasses.asdict(opts)))) == opts


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def test_subject_of_a_malformed_name_stops_where_boringssl_does() -> None:
    from wasmgate.proxy.dn import rfc2253

    def attr(oid: bytes, tag: int, value: bytes) -> bytes:
        inner = bytes([6, len(oid)]) + oid + bytes([tag, len(value)]) + value
        return bytes([0x31, len(inner) + 2, 0x30, len(inner)]) + inner

    cn, o = b"\x55\x04\x03", b"\x55\x04\x0a"
    good = attr(o, 0x0C, b"Org")
    bad = attr(cn, 0x0C, b"\xff")  # not UTF-8: BoringSSL stops after "CN="
    name = good + bad
    assert rfc2253(bytes([0x30, len(name)]) + name) == "CN="
    name = bad + good
    assert rfc2253(bytes([0x30, len(name)]) + name) == "O=Org,CN="
    assert rfc2253(b"\x30\x05\x31") == ""  # truncated
    bmp = attr(cn, 0x1E, b"\xd8\x3d\xde\x00")  # a surrogate pair: not UCS-2
    assert rfc2253(bytes([0x30, len(bmp)]) + bmp) == "CN="
