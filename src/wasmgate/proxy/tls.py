"""TLS with the standard ``ssl`` module: the downstream listener's contexts (with SNI)
and the one client context every ``https://`` upstream and cluster shares."""

from __future__ import annotations

import hashlib
import re
import ssl
import weakref
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


class TlsError(ValueError):
    """A certificate, key or CA that cannot be used; the message names the file and field."""


def _load(ctx: ssl.SSLContext, cert: str, key: str, where: str) -> None:
    for path, name in ((cert, "cert"), (key, "key")):
        if not Path(path).is_file():
            raise TlsError(f"{where}.{name}: {path}: no such file")
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"{where}.cert/{where}.key: cannot load {cert} with {key}: {e}") from None


class ServerContext(ssl.SSLContext):
    """A listener context that knows its certificate: the ``connection.*_local_certificate``
    attributes describe it."""

    local_der: bytes = b""


def _server_ctx(cert: str, key: str, where: str) -> ServerContext:
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 at least
    ctx.set_alpn_protocols(["http/1.1"])
    _load(ctx, cert, key, where)
    pem = Path(cert).read_text(errors="replace")
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.S)
    if first:  # the leaf, first in the chain file
        ctx.local_der = ssl.PEM_cert_to_DER_cert(first.group(0))
    return ctx


# The server name each downstream TLS connection asked for (connection.requested_server_name).
_requested: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def requested_server_name(obj: ssl.SSLObject) -> str:
    return _requested.get(obj, "")


def server_context(cert: str, key: str, sni: list[dict[str, Any]] | None = None) -> ssl.SSLContext:
    """The listener's context: ``cert``/``key`` by default; an ``sni`` entry
    (``{server_names: [a.example, *.b.example], cert, key}``) when the client asks for
    one of its names. ``*.b.example`` matches one label (``x.b.example``), as in Envoy."""
    default = _server_ctx(cert, key, "tls")
    exact: dict[str, ServerContext] = {}
    wildcard: dict[str, ServerContext] = {}
    for i, entry in enumerate(sni or []):
        where = f"tls.sni[{i}]"
        names = entry.get("server_names") or []
        if not names or "cert" not in entry or "key" not in entry:
            raise TlsError(f"{where}: needs server_names, cert and key")
        ctx = _server_ctx(str(entry["cert"]), str(entry["key"]), where)
        for name in names:
            name = str(name).lower().rstrip(".")
            if name.startswith("*."):
                wildcard.setdefault(name[1:], ctx)  # ".b.example"
            else:
                exact.setdefault(name, ctx)

    def pick(sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, current: ssl.SSLContext) -> None:
        if not server_name:
            return  # no SNI (e.g. an IP address): the default certificate
        if isinstance(sock, ssl.SSLObject):
            _requested[sock] = server_name
        name = server_name.lower().rstrip(".")
        chosen = exact.get(name)
        if chosen is None and "." in name:
            chosen = wildcard.get(name[name.index("."):])
        if chosen is not None:
            sock.context = chosen

    default.sni_callback = pick
    return default


@dataclass(frozen=True)
class CertInfo:
    """What Envoy's TLS attributes report about a certificate."""

    subject: str  # RFC 2253 form, as Envoy prints it
    uri_sans: tuple[str, ...]
    dns_sans: tuple[str, ...]
    sha256: str  # hex digest of the DER encoding


@lru_cache(maxsize=256)
def cert_info(der: bytes) -> CertInfo:
    from cryptography import x509

    sha = hashlib.sha256(der).hexdigest()
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return CertInfo("", (), (), sha)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except (x509.ExtensionNotFound, ValueError):
        uris = dns = ()
    return CertInfo(cert.subject.rfc4514_string(), uris, dns, sha)


def client_context(ca: str | None = None, insecure_skip_verify: bool = False) -> ssl.SSLContext:
    """For ``https://`` upstreams: verify against ``ca`` (else the system store) and
    the URL's host, unless ``insecure_skip_verify``."""
    if ca is not None and not Path(ca).is_file():
        raise TlsError(f"upstream_tls.ca: {ca}: no such file")
    try:
        ctx = ssl.create_default_context(cafile=ca)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"upstream_tls.ca: cannot load {ca}: {e}") from None
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
