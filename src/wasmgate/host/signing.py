"""Envoy's ``sign`` and ``verify_signature`` foreign functions, with ``cryptography``.

As Envoy 1.40 (foreign.cc, common/crypto): the argument is a serialized protobuf,
``SignArguments {hash_function = 1; private_key (DER) = 2; text = 3; private_key_pem = 4}``
or ``VerifySignatureArguments {hash_function = 1; public_key (DER) = 2; signature = 3;
text = 4; public_key_pem = 5}``; the result is ``SignResult {result = 1; signature = 2;
error = 3}`` or ``VerifySignatureResult {result = 1; error = 2}``. No key, or both a DER and
a PEM key: BAD_ARGUMENT. Hashes: sha1, sha224, sha256, sha384, sha512 (any case). RSA keys
sign with PKCS#1 v1.5, EC keys with ECDSA (DER signatures), as BoringSSL's EVP_DigestSign;
a DER private key must be PKCS#8 and a DER public key SubjectPublicKeyInfo, as there.
"""

from __future__ import annotations

from typing import Any

from wasmgate.abi.constants import WasmResult
from wasmgate.host.foreign import ForeignError, foreign, proto_fields

R = WasmResult


def _field(fields: dict[int, bytes | int], n: int) -> bytes:
    v = fields.get(n, b"")
    if not isinstance(v, bytes):
        raise ForeignError(R.BAD_ARGUMENT)
    return v


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _message(*fields: tuple[int, bool | bytes]) -> bytes:
    """A protobuf message of bool and bytes/string fields; proto3 defaults left out."""
    out = bytearray()
    for n, v in fields:
        if isinstance(v, bool):
            if v:
                out += _varint(n << 3) + b"\x01"
        elif v:
            out += _varint(n << 3 | 2) + _varint(len(v)) + v
    return bytes(out)


def _hash(name: bytes) -> Any:
    from cryptography.hazmat.primitives import hashes

    return {b"sha1": hashes.SHA1, b"sha224": hashes.SHA224, b"sha256": hashes.SHA256, b"sha384": hashes.SHA384,
            b"sha512": hashes.SHA512}.get(name.lower())


def _is_pkcs8(der: bytes) -> bool:
    # PrivateKeyInfo ::= SEQUENCE { INTEGER version, SEQUENCE algorithm, OCTET STRING key }:
    # its second element is a SEQUENCE, where PKCS#1/SEC1 keys have an INTEGER or OCTET STRING.
    try:
        pos = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
        pos += 2 + der[pos + 1]  # skip the version INTEGER (short form)
        return der[0] == 0x30 and der[pos] == 0x30
    except IndexError:
        return False


def _load_key(pem: bytes, der: bytes, private: bool) -> Any:
    """The key, None when it does not parse (Envoy then reports an error in the result)."""
    from cryptography.hazmat.primitives import serialization

    try:
        if pem:
            if private:
                return serialization.load_pem_private_key(pem, password=None)
            if b"-----BEGIN PUBLIC KEY-----" not in pem:
                return None  # BoringSSL's PEM_read_bio_PUBKEY reads SubjectPublicKeyInfo only
            return serialization.load_pem_public_key(pem)
        if private:
            return serialization.load_der_private_key(der, password=None) if _is_pkcs8(der) else None
        return serialization.load_der_public_key(der)
    except (ValueError, TypeError):
        return None


def _scheme(key: Any, digest: Any) -> tuple[Any, ...] | None:
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return (padding.PKCS1v15(), digest())
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return (ec.ECDSA(digest()),)
    return None  # Ed25519 and others: BoringSSL's digest init refuses a hash with them


@foreign("sign")
def _sign(vm: object, arg: bytes) -> bytes:
    f = proto_fields(arg)
    hash_name, der, text, pem = _field(f, 1), _field(f, 2), _field(f, 3), _field(f, 4)
    if bool(der) == bool(pem):
        raise ForeignError(R.BAD_ARGUMENT)  # no key, or both forms
    digest = _hash(hash_name)
    if digest is None:
        return _message((1, False), (3, hash_name + b" is not supported."))
    key = _load_key(pem, der, private=True)
    if key is None:
        return _message((1, False), (3, b"Invalid key type: private key required for signing operation."))
    scheme = _scheme(key, digest)
    if scheme is None:
        return _message((1, False), (3, b"Invalid private key: key data is corrupted or malformed."))
    try:
        signature = key.sign(text, *scheme)
    except (ValueError, TypeError):
        return _message((1, False), (3, b"Failed to create signature."))
    return _message((1, True), (2, signature))


@foreign("verify_signature")
def _verify_signature(vm: object, arg: bytes) -> bytes:
    from cryptography.exceptions import InvalidSignature

    f = proto_fields(arg)
    hash_name, der, signature, text, pem = _field(f, 1), _field(f, 2), _field(f, 3), _field(f, 4), _field(f, 5)
    if bool(der) == bool(pem):
        raise ForeignError(R.BAD_ARGUMENT)
    digest = _hash(hash_name)
    if digest is None:
        return _message((1, False), (2, hash_name + b" is not supported."))
    key = _load_key(pem, der, private=False)
    scheme = _scheme(key, digest) if key is not None else None
    if scheme is None:
        return _message((1, False), (2, b"Failed to initialize digest verify."))
    try:
        key.verify(signature, text, *scheme)
    except (InvalidSignature, ValueError, TypeError):
        return _message((1, False), (2, b"Failed to verify digest. Error code: 0"))
    return _message((1, True))
