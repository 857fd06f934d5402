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

from wasmgate.proxy import dn


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


def _leaf_der(cert: str) -> bytes:
    pem = Path(cert).read_text(errors="replace")
    first = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", pem, re.S)
    return ssl.PEM_cert_to_DER_cert(first.group(0)) if first else b""  # the leaf, first in the chain file


def _server_ctx(cert: str, key: str, where: str, client_ca: str | None, require_client_cert: bool) -> ServerContext:
    ctx = ServerContext(ssl.PROTOCOL_TLS_SERVER)  # TLS 1.2 at least
    ctx.set_alpn_protocols(["http/1.1"])
    _load(ctx, cert, key, where)
    ctx.local_der = _leaf_der(cert)
    if client_ca is not None:
        # Every context (SNI ones too) verifies alike: OpenSSL keeps the first one's verify
        # mode after an SNI switch but takes the CA store of the new one.
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as e:
            raise TlsError(f"tls.client_ca: cannot load {client_ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


# The server name each downstream TLS connection asked for (connection.requested_server_name).
_requested: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()


def requested_server_name(obj: ssl.SSLObject) -> str:
    return _requested.get(obj, "")


def server_context(cert: str, key: str, sni: list[dict[str, Any]] | None = None, client_ca: str | None = None,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """The listener's context: ``cert``/``key`` by default; an ``sni`` entry
    (``{server_names: [a.example, *.b.example], cert, key}``) when the client asks for
    one of its names. ``*.b.example`` matches one label (``x.b.example``), as in Envoy.
    With ``client_ca`` a client certificate is asked for and verified against it when
    given (Envoy's ``validation_context``), and required with ``require_client_cert``."""
    if client_ca is not None and not Path(client_ca).is_file():
        raise TlsError(f"tls.client_ca: {client_ca}: no such file")
    if require_client_cert and client_ca is None:
        raise TlsError("tls.require_client_certificate: needs tls.client_ca to verify the certificates with")
    default = _server_ctx(cert, key, "tls", client_ca, require_client_cert)
    exact: dict[str, ServerContext] = {}
    wildcard: dict[str, ServerContext] = {}
    for i, entry in enumerate(sni or []):
        where = f"tls.sni[{i}]"
        names = entry.get("server_names") or []
        if not names or "cert" not in entry or "key" not in entry:
            raise TlsError(f"{where}: needs server_names, cert and key")
        ctx = _server_ctx(str(entry["cert"]), str(entry["key"]), where, client_ca, require_client_cert)
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

    subject: str  # RFC 2253 form, as Envoy prints it (dn.py)
    uri_sans: tuple[str, ...]
    dns_sans: tuple[str, ...]
    sha256: str  # hex digest of the DER encoding


@lru_cache(maxsize=256)
def cert_info(der: bytes) -> CertInfo:
    from cryptography import x509

    sha = hashlib.sha256(der).hexdigest()
    subject = dn.rfc2253(dn.subject_der(der))
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return CertInfo(subject, (), (), sha)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    except (x509.ExtensionNotFound, ValueError):
        uris = dns = ()
    return CertInfo(subject, uris, dns, sha)


class ClientContext(ssl.SSLContext):
    """The upstream context; ``local_der`` is the client certificate it presents, if any
    (the ``upstream.*_local_certificate`` attributes describe it)."""

    local_der: bytes = b""


def client_context(ca: str | None = None, insecure_skip_verify: bool = False, cert: str | None = None,
                   key: str | None = None) -> ssl.SSLContext:
    """For ``https://`` upstreams: verify against ``ca`` (else the system store) and
    the URL's host, unless ``insecure_skip_verify``; present ``cert``/``key`` when the
    upstream asks for a client certificate."""
    if ca is not None and not Path(ca).is_file():
        raise TlsError(f"upstream_tls.ca: {ca}: no such file")
    if (cert is None) != (key is None):
        raise TlsError("upstream_tls.cert/upstream_tls.key: give both or neither")
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # what create_default_context sets up
    try:
        if ca is not None:
            ctx.load_verify_locations(cafile=ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"upstream_tls.ca: cannot load {ca}: {e}") from None
    if cert is not None and key is not None:
        _load(ctx, cert, key, "upstream_tls")
        ctx.local_der = _leaf_der(cert)
    if insecure_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
