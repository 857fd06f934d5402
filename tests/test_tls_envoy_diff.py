"""Differential test of the TLS attributes: wasmgate and Envoy 1.40 terminate TLS with the
same certificates (SNI, optional and required client certificates) and reach an HTTPS
upstream that asks for a client certificate; the props plugin reads every
``connection.*`` and ``upstream.*`` TLS attribute in each phase and both must give the
same bytes (Pair.compare also checks the plugin's log lines and metrics).

The certificates are made here with ``cryptography``: a CA, the listener's default and
SNI certificates, a client's, the upstream's and the one the proxies present to it, with
DNS and URI SANs (first ones first: the attributes report the first of each kind) and
subjects that exercise RFC 2253 escaping.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from servers import PLUGIN_BUILD, start_upstream
from test_envoy_diff import ENVOY_KINDS, Connect, Pair, Plugin
from wasmgate.proxy.dn import SHORT_NAMES

TLS_KEYS = ["tls_version", "subject_local_certificate", "subject_peer_certificate", "uri_san_local_certificate",
            "uri_san_peer_certificate", "dns_san_local_certificate", "dns_san_peer_certificate",
            "sha256_peer_certificate_digest"]
PATHS = ["connection.mtls", "connection.requested_server_name", *(f"connection.{k}" for k in TLS_KEYS),
         *(f"upstream.{k}" for k in TLS_KEYS), "request.scheme", "connection.nope", "upstream.nope"]


def _attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type = _ASN1Type.UTF8String) -> x509.NameAttribute[str]:
    return x509.NameAttribute(oid, value, _type=kind)


def _name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


@dataclass
class Pki:
    dir: Path

    def path(self, name: str, kind: str = "pem") -> str:
        return str(self.dir / f"{name}.{kind}")

    def client_context(self, cert: str | None = None, tls12: bool = False) -> ssl.SSLContext:
        """A client that trusts the CA (any host name: SNI picks names no certificate has)."""
        ctx = ssl.create_default_context(cafile=self.path("ca"))
        ctx.check_hostname = False
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            ctx.load_cert_chain(self.path(cert), self.path(cert, "key"))
        return ctx

    def connect(self, server_name: str | None, cert: str | None = None, tls12: bool = False) -> Connect:
        ctx = self.client_context(cert, tls12)

        def connect(port: int) -> http.client.HTTPConnection:
            return _SniConnection(port, ctx, server_name)

        return connect


class _SniConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 sending ``server_name`` as SNI (None: no SNI)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, server_name: str | None):
        super().__init__("127.0.0.1", port, timeout=20, context=ctx)
        self.server_name = server_name

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.server_name)  # type: ignore[attr-defined]


# name -> (subject, SANs, extended key usage); all issued by the CA.
C, ST, L, ORG, OU, CN = (NameOID.COUNTRY_NAME, NameOID.STATE_OR_PROVINCE_NAME, NameOID.LOCALITY_NAME,
                       NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME, NameOID.COMMON_NAME)
LEAVES: dict[str, tuple[x509.Name, list[x509.GeneralName], x509.ObjectIdentifier]] = {
    "default": (_name((C, "US"), (ST, "California"), (L, "San Francisco"), (ORG, "wasmgate"), (OU, "edge"),
                      (CN, "default.example")),
                [x509.DNSName("default.example"), x509.UniformResourceIdentifier("spiffe://td/ns/edge/sa/default"),
                 x509.DNSName("localhost"), x509.UniformResourceIdentifier("spiffe://td/ns/edge/sa/second")],
                ExtendedKeyUsageOID.SERVER_AUTH),
    "a": (_name((ORG, "Sue, Grabbit and Runn"), (OU, "R&D+Ops; \"lab\""), (CN, "a.example")),
          [x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/web"), x509.DNSName("a.example")],
          ExtendedKeyUsageOID.SERVER_AUTH),
    # Names OpenSSL spells its own way, a multi-valued RDN, each string type, escapes.
    "b": (x509.Name([x509.RelativeDistinguishedName(rdn) for rdn in [
        [_attr(NameOID.EMAIL_ADDRESS, "ops@b.example", _ASN1Type.IA5String)],
        [_attr(NameOID.SERIAL_NUMBER, "42", _ASN1Type.PrintableString), _attr(NameOID.DOMAIN_COMPONENT, "b")],
        [_attr(ORG, "Zürich AG")], [_attr(OU, "é<>\\\x01\x7f", _ASN1Type.T61String)],
        [_attr(OU, "Ωmega ", _ASN1Type.BMPString)], [_attr(OU, "😀 smile", _ASN1Type.UniversalString)],
        [_attr(NameOID.GIVEN_NAME, "#x ")], [_attr(NameOID.USER_ID, " uid")],
        [_attr(x509.ObjectIdentifier("1.2.3.4"), "x=y")], [_attr(CN, "b.example")]]]),
          [x509.DNSName("b.example"), x509.UniformResourceIdentifier("urn:b")], ExtendedKeyUsageOID.SERVER_AUTH),
    # Every attribute type wasmgate spells by name, and some BoringSSL does not know.
    "names": (x509.Name([x509.NameAttribute(x509.ObjectIdentifier(oid), "ab") for oid in
                         [*SHORT_NAMES, "2.5.4.97", "2.5.4.100", "0.9.2342.19200300.100.1.44",
                          "1.3.6.1.4.1.311.60.2.1.1", "1.3.6.1.4.1.311.60.2.1.3", "1.3.6.1.4.1.99999.1"]]),
              [x509.DNSName("names.example")], ExtendedKeyUsageOID.SERVER_AUTH),
    "client": (_name((ORG, "tenant"), (CN, "client")),
               [x509.UniformResourceIdentifier("spiffe://td/ns/tenant/sa/client"), x509.DNSName("client.example")],
               ExtendedKeyUsageOID.CLIENT_AUTH),
    "upstream": (_name((ORG, "backend"), (CN, "upstream")),
                 [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("upstream.example"),
                  x509.UniformResourceIdentifier("spiffe://td/ns/backend/sa/upstream")],
                 ExtendedKeyUsageOID.SERVER_AUTH),
    "proxy": (_name((ORG, "mesh"), (CN, "proxy")),
              [x509.UniformResourceIdentifier("spiffe://td/ns/edge/sa/proxy"), x509.DNSName("proxy.example")],
              ExtendedKeyUsageOID.CLIENT_AUTH),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name((ORG, "wasmgate"), (CN, "wasmgate diff CA"))
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, (subject, sans, usage) in LEAVES.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    return Pki(d)


def _pair(pki: Pki, workdir: Path, require_client_certificate: bool = False, kind: str = "static") -> Pair:
    tls: dict[str, Any] = {"cert": pki.path("default"), "key": pki.path("default", "key"),
                           "sni": [{"server_names": [n], "cert": pki.path(n.split(".")[0]),
                                    "key": pki.path(n.split(".")[0], "key")}
                                   for n in ("a.example", "b.example", "names.example")],
                           "client_ca": pki.path("ca"), "require_client_certificate": require_client_certificate}
    # The upstream asks for a client certificate (optional) and trusts the CA.
    upstream_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    upstream_ctx.load_cert_chain(pki.path("upstream"), pki.path("upstream", "key"))
    upstream_ctx.load_verify_locations(pki.path("ca"))
    upstream_ctx.verify_mode = ssl.CERT_OPTIONAL
    upstream = start_upstream(tls=upstream_ctx)
    upstream_tls = {"ca": pki.path("ca"), "cert": pki.path("proxy"), "key": pki.path("proxy", "key")}
    headers = tuple(f"x-prop-{req}{p}" for req in ("", "req-") for p in PATHS)
    try:
        return Pair([Plugin("props", PLUGIN_BUILD / "props.wasm", {"paths": PATHS})], workdir,
                    response_headers=headers, tls=tls, upstream=upstream, upstream_tls=upstream_tls, kind=kind)
    except BaseException:
        upstream.server.shutdown()
        raise


@pytest.fixture(scope="module", params=ENVOY_KINDS)
def pair(pki: Pki, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Pair]:
    p = _pair(pki, tmp_path_factory.mktemp("tlsdiff"), kind=str(request.param))
    yield p
    p.stop()


def _value(got: dict[str, str], path: str, at_request: bool = False) -> str:
    return got[f"x-prop-{'req-' if at_request else ''}{path}"]


@pytest.mark.parametrize(("server_name", "client_cert", "tls12"), [
    (None, None, False), ("a.example", None, False), ("other.example", "client", False),
    ("a.example", "client", False), ("b.example", "client", False), ("names.example", None, False),
    ("a.example", "client", True)])
def test_tls_attributes_same_as_envoy(pair: Pair, pki: Pki, server_name: str | None, client_cert: str | None,
                                      tls12: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)  # a header per attribute read
    got = pair.compare(path="/tls", connect=pki.connect(server_name, client_cert, tls12)).headers
    assert _value(got, "connection.tls_version") == (b"TLSv1.2" if tls12 else b"TLSv1.3").hex()
    # The comparison is only worth something if the attributes say what they should.
    assert _value(got, "request.scheme", True) == b"https".hex()
    assert _value(got, "connection.requested_server_name") == (server_name or "").encode().hex()
    assert _value(got, "connection.mtls") == ("01" if client_cert else "00")
    local_uri = {"a.example": "spiffe://td/ns/a/sa/web", "b.example": "urn:b", "names.example": None}.get(
        server_name or "", "spiffe://td/ns/edge/sa/default")
    assert _value(got, "connection.uri_san_local_certificate") == (local_uri.encode().hex() if local_uri
                                                                   else "status:1")
    assert _value(got, "upstream.uri_san_peer_certificate") == b"spiffe://td/ns/backend/sa/upstream".hex()
    assert _value(got, "upstream.uri_san_local_certificate") == b"spiffe://td/ns/edge/sa/proxy".hex()
    if client_cert:
        assert _value(got, "connection.dns_san_peer_certificate", True) == b"client.example".hex()
        assert _value(got, "connection.subject_peer_certificate") == b"CN=client,O=tenant".hex()
    else:
        assert _value(got, "connection.subject_peer_certificate") == ""
    if server_name == "b.example":  # BoringSSL's RFC 2253: reversed, short names, UTF-8 bytes escaped
        assert bytes.fromhex(_value(got, "connection.subject_local_certificate")).decode() == (
            "CN=b.example,1.2.3.4=#0C03783D79,UID=\\ uid,GN=\\#x\\ ,OU=\\F0\\9F\\98\\80 smile,"
            "OU=\\CE\\A9mega\\ ,OU=\\C3\\83\\C2\\A9\\<\\>\\\\\\01\\7F,O=Z\\C3\\BCrich AG,"
            "DC=b+serialNumber=42,emailAddress=ops@b.example")
    assert _value(got, "upstream.tls_version", True) == "status:1"  # not connected yet
    assert any(m.startswith("props: log prop upstream.sha256_peer_certificate_digest = ") for m in pair.last_logs)


@pytest.mark.parametrize("envoy_kind", ENVOY_KINDS)
def test_required_client_certificate_same_as_envoy(pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   envoy_kind: str) -> None:
    """require_client_certificate: a client with a certificate gets through, one without
    is refused by both during or right after the handshake."""
    monkeypatch.setattr(http.client, "_MAXHEADERS", 1000)
    p = _pair(pki, tmp_path, require_client_certificate=True, kind=envoy_kind)
    try:
        got = p.compare(connect=pki.connect("a.example", "client")).headers
        assert _value(got, "connection.mtls", True) == "01"
        for port in (p.envoy.port, p.wasmgate.port):
            conn = pki.connect("a.example")(port)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                conn.request("GET", "/")
                conn.getresponse().read()
            conn.close()
    finally:
        p.stop()
