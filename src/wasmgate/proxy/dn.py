"""Certificate names as Envoy prints them for the ``*_certificate`` subject attributes:
BoringSSL's ``X509_NAME_print_ex(..., XN_FLAG_RFC2253)``.

That is RFC 2253 with OpenSSL's choices: every attribute of every RDN in reverse order
(a multi-valued RDN's too), OpenSSL short names (``emailAddress``, ``GN``,
``serialNumber``; an OID BoringSSL does not know is dotted and its value dumped as
``#`` + the DER in hex), values converted to UTF-8 with bytes above 0x7f and control
characters escaped as ``\\XX``. Checked against Envoy 1.40 by tests/test_tls_envoy_diff.py.
"""

from __future__ import annotations

# OID -> short name: the X.500 (2.5.4), PKCS #9 and RFC 1274 attribute types BoringSSL
# knows (probed through Envoy 1.40; organizationIdentifier and the jurisdiction* types of
# newer OpenSSL are not among them).
_X500 = ("", "", "", "CN", "SN", "serialNumber", "C", "L", "ST", "street", "O", "OU", "title", "description",
         "searchGuide", "businessCategory", "postalAddress", "postalCode", "postOfficeBox",
         "physicalDeliveryOfficeName", "telephoneNumber", "telexNumber", "teletexTerminalIdentifier",
         "facsimileTelephoneNumber", "x121Address", "internationaliSDNNumber", "registeredAddress",
         "destinationIndicator", "preferredDeliveryMethod", "presentationAddress", "supportedApplicationContext",
         "member", "owner", "roleOccupant", "seeAlso", "userPassword", "userCertificate", "cACertificate",
         "authorityRevocationList", "certificateRevocationList", "crossCertificatePair", "name", "GN", "initials",
         "generationQualifier", "x500UniqueIdentifier", "dnQualifier", "enhancedSearchGuide", "protocolInformation",
         "distinguishedName", "uniqueMember", "houseIdentifier", "supportedAlgorithms", "deltaRevocationList",
         "dmdName")
_PKCS9 = ("", "emailAddress", "unstructuredName", "contentType", "messageDigest", "signingTime", "countersignature",
          "challengePassword", "unstructuredAddress", "extendedCertificateAttributes", "", "", "", "", "extReq",
          "SMIME-CAPS", "SMIME", "", "", "", "friendlyName", "localKeyID")
_PILOT = ("", "UID", "textEncodedORAddress", "mail", "info", "favouriteDrink", "roomNumber", "photo", "userClass",
          "host", "manager", "documentIdentifier", "documentTitle", "documentVersion", "documentAuthor",
          "documentLocation", "", "", "", "", "homeTelephoneNumber", "secretary", "otherMailbox", "lastModifiedTime",
          "lastModifiedBy", "DC", "aRecord", "pilotAttributeType27", "mXRecord", "nSRecord", "sOARecord",
          "cNAMERecord", "", "", "", "", "", "associatedDomain", "associatedName", "homePostalAddress",
          "personalTitle", "mobileTelephoneNumber", "pagerTelephoneNumber", "friendlyCountryName", "",
          "organizationalStatus", "janetMailbox", "mailPreferenceOption", "buildingName", "dSAQuality",
          "singleLevelQuality", "subtreeMinimumQuality", "subtreeMaximumQuality", "personalSignature", "dITRedirect",
          "audio", "documentPublisher")
SHORT_NAMES = {f"{arc}.{i}": sn for arc, names in (("2.5.4", _X500), ("1.2.840.113549.1.9", _PKCS9),
                                                   ("0.9.2342.19200300.100.1", _PILOT))
               for i, sn in enumerate(names) if sn}
SHORT_NAMES |= {"2.5.4.65": "pseudonym", "2.5.4.72": "role"}

# String types and how their bytes become characters; any other type is dumped.
_LATIN1 = {0x12, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1A}  # Numeric, Printable, T61, IA5, UTCTime, GeneralizedTime, Visible
_UTF8, _UNIVERSAL, _BMP = 0x0C, 0x1C, 0x1E


class _Invalid(ValueError):
    pass


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        raise _Invalid("truncated")
    tag, n = data[pos], data[pos + 1]
    pos += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4 or pos + k > len(data):
            raise _Invalid("bad length")
        n = int.from_bytes(data[pos:pos + k], "big")
        pos += k
    if pos + n > len(data):
        raise _Invalid("truncated")
    return tag, pos, pos + n


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """(tag, element start, content start, end) of each element in data[start:end]."""
    out = []
    while start < end:
        tag, c0, c1 = _tlv(data, start)
        out.append((tag, start, c0, c1))
        start = c1
    return out


def _oid(body: bytes) -> str:
    arcs: list[int] = []
    v = 0
    for b in body:
        v = v << 7 | b & 0x7F
        if not b & 0x80:
            arcs.append(v)
            v = 0
    if not arcs:
        return ""
    first = min(arcs[0] // 40, 2)
    return ".".join(map(str, [first, arcs[0] - 40 * first, *arcs[1:]]))


def _valid(c: int) -> bool:
    """A code point BoringSSL's CBS decoders accept (no surrogates or noncharacters)."""
    return c <= 0x10FFFF and not 0xD800 <= c <= 0xDFFF and not 0xFDD0 <= c <= 0xFDEF and c & 0xFFFE != 0xFFFE


def _chars(tag: int, body: bytes) -> list[int]:
    if tag in _LATIN1:
        return list(body)
    if tag == _UTF8:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid("utf-8") from None
        chars = [ord(ch) for ch in text]
    elif tag in (_BMP, _UNIVERSAL):
        width = 2 if tag == _BMP else 4
        if len(body) % width:
            raise _Invalid("length")
        chars = [int.from_bytes(body[i:i + width], "big") for i in range(0, len(body), width)]
    else:
        raise AssertionError(tag)
    if not all(map(_valid, chars)):
        raise _Invalid("code point")
    return chars


def _escape(chars: list[int]) -> str:
    out = []
    for n, c in enumerate(chars):
        utf8 = chr(c).encode()
        for i, b in enumerate(utf8):
            first, last = n == 0 and i == 0, n == len(chars) - 1 and i == len(utf8) - 1
            ch = chr(b)
            if b > 0x7F or b < 0x20 or b == 0x7F:
                out.append(f"\\{b:02X}")
            elif ch in '\\",+<>;' or (first and ch in " #") or (last and ch == " "):
                out.append("\\" + ch)
            else:
                out.append(ch)
    return "".join(out)


def rfc2253(name_der: bytes) -> str:
    """The DER ``Name`` as Envoy prints it; malformed input gives what was printed up to
    the fault, as BoringSSL leaves it in Envoy's buffer."""
    out: list[str] = []
    try:
        _, c0, c1 = _tlv(name_der, 0)
        entries = []  # (rdn index, OID, value tag, value element, value content)
        for i, (_, _, s0, s1) in enumerate(_children(name_der, c0, c1)):
            for _, _, a0, a1 in _children(name_der, s0, s1):
                (_, _, o0, o1), (vtag, v, b0, b1) = _children(name_der, a0, a1)[:2]
                entries.append((i, _oid(name_der[o0:o1]), vtag, name_der[v:b1], name_der[b0:b1]))
        prev = -1
        for rdn, oid, vtag, element, body in reversed(entries):
            if prev != -1:
                out.append("+" if rdn == prev else ",")
            prev = rdn
            short = SHORT_NAMES.get(oid)
            out.append(f"{short or oid}=")
            if short is None or not (vtag in _LATIN1 or vtag in (_UTF8, _BMP, _UNIVERSAL)):
                out.append("#" + element.hex().upper())
            else:
                out.append(_escape(_chars(vtag, body)))
    except (_Invalid, ValueError):
        pass
    return "".join(out)


def subject_der(cert_der: bytes) -> bytes:
    """The subject ``Name`` of a DER certificate (b"" if it cannot be found)."""
    try:
        _, c0, _ = _tlv(cert_der, 0)
        _, t0, t1 = _tlv(cert_der, c0)  # tbsCertificate
        fields = _children(cert_der, t0, t1)
        if fields and fields[0][0] == 0xA0:  # [0] version
            fields = fields[1:]
        _, start, _, end = fields[4]  # serialNumber, signature, issuer, validity, subject
        return cert_der[start:end]
    except (_Invalid, IndexError):
        return b""
