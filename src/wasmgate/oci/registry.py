"""A small Docker Registry HTTP API v2 / OCI distribution client on httpx.

What it does: ping, the auth challenge (anonymous, Basic, Bearer token from the
``WWW-Authenticate`` realm, including OAuth2 refresh tokens and registry tokens),
manifests (get/put, any media type), blobs (get with size cap and digest check,
monolithic upload, existence check). Why not a library: see docs/oci.md.

Scheme: HTTPS. For loopback registries (localhost, 127.0.0.0/8, ::1) and with
``insecure=True`` it falls back to plain HTTP when the TLS connection fails, as
go-containerregistry does; ``insecure`` also skips certificate verification.

Secrets never reach logs or messages: headers are never logged, and every error
message is scrubbed of the credentials' values.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import httpx

from wasmgate.oci.auth import Credentials, Keychain
from wasmgate.oci.errors import AuthError, FetchError, RegistryError
from wasmgate.oci.reference import Reference, is_loopback_host

_log = logging.getLogger("wasmgate.oci")

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST)
MAX_MANIFEST_BYTES = 4 << 20
USER_AGENT = "wasmgate"
_CHUNK = 64 << 10

ProgressFn = Callable[[str, int, int], None]
"""progress(label, bytes_done, bytes_total) for blob transfers."""


@dataclass
class Manifest:
    ref: Reference
    raw: bytes
    media_type: str
    digest: str  # sha256:<hex> of raw

    @property
    def json(self) -> dict[str, Any]:
        parsed = json.loads(self.raw)
        if not isinstance(parsed, dict):
            raise RegistryError(f"{self.ref}: manifest is not a JSON object")
        return parsed


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


_PARAM = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        params[m.group(1).lower()] = m.group(2).replace('\\"', '"') if m.group(2) is not None else m.group(3)
        pos = m.end()
    return scheme.lower(), params


@dataclass
class _Host:
    base: str  # scheme://host[:port]
    challenge: tuple[str, dict[str, str]] | None  # None: no auth needed
    tokens: dict[str, str] = field(default_factory=dict)  # scope -> bearer token


class RegistryClient:
    """One client per credentials set; thread-compatible but not thread-safe."""

    def __init__(self, keychain: Keychain | None = None, *, insecure: bool = False, timeout: float = 30.0,
                 retries: int = 2) -> None:
        self.keychain = keychain if keychain is not None else Keychain.from_docker_config()
        self.insecure = insecure
        self.retries = retries
        self._http = httpx.Client(timeout=timeout, follow_redirects=True, verify=not insecure,
                                  headers={"User-Agent": USER_AGENT})
        self._hosts: dict[str, _Host] = {}
        self._secrets: list[str] = []

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- errors and credentials -------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            if s:
                text = text.replace(s, "<redacted>")
        return text

    def _creds(self, registry: str) -> Credentials:
        creds = self.keychain.resolve(registry)
        self._secrets.extend(s for s in creds.secrets() if s not in self._secrets)
        return creds

    def _who(self, registry: str, creds: Credentials) -> str:
        if creds.anonymous:
            return f"no credentials for {registry} in {self.keychain.source or 'the keychain'}"
        user = f"user {creds.username!r}" if creds.username else "a token"
        return f"{user} from {self.keychain.source or 'the keychain'}"

    # ---- connection and auth ------------------------------------------------------------------

    def _host(self, registry: str, api_host: str) -> _Host:
        h = self._hosts.get(api_host)
        if h is not None:
            return h
        schemes = ["https", "http"] if (self.insecure or is_loopback_host(api_host)) else ["https"]
        last: Exception | None = None
        for scheme in schemes:
            base = f"{scheme}://{api_host}"
            try:
                r = self._send("GET", f"{base}/v2/", registry, retry=scheme == schemes[-1])
            except httpx.TransportError as e:
                last = e
                continue
            if r.status_code == 401:
                challenge = parse_challenge(r.headers.get("www-authenticate", ""))
            elif r.status_code < 300:
                challenge = None
            else:
                raise RegistryError(f"registry {registry}: GET /v2/ answered HTTP {r.status_code}; "
                                    "is this a Docker/OCI registry?", r.status_code)
            h = _Host(base, challenge)
            self._hosts[api_host] = h
            _log.debug("registry %s at %s, auth %s", registry, base, challenge[0] if challenge else "none")
            return h
        reason = f"{type(last).__name__}: {self._scrub(str(last))}" if last else "no scheme to try"
        hint = "" if self.insecure else " (--insecure allows plain HTTP and unverified TLS certificates)"
        raise RegistryError(f"registry {registry}: cannot connect ({reason}){hint}")

    def _send(self, method: str, url: str, registry: str, *, retry: bool = True, **kw: Any) -> httpx.Response:
        """One request with retries on transport errors and 5xx for idempotent methods."""
        attempts = 1 + (self.retries if retry and method in ("GET", "HEAD") else 0)
        for i in range(attempts):
            try:
                r = self._http.request(method, url, **kw)
            except httpx.TransportError:
                if i + 1 == attempts:
                    raise
            else:
                _log.debug("%s %s -> %d", method, _path_only(url), r.status_code)
                if r.status_code < 500 or i + 1 == attempts:
                    return r
            time.sleep(0.2 * (2 ** i))
        raise AssertionError("unreachable")

    def _auth_header(self, host: _Host, registry: str, scope: str) -> dict[str, str]:
        if host.challenge is None:
            return {}
        scheme, params = host.challenge
        creds = self._creds(registry)
        if scheme == "basic":
            if creds.anonymous:
                raise AuthError(f"registry {registry} requires authentication; {self._who(registry, creds)}", 401)
            if not creds.username:
                raise AuthError(f"registry {registry} wants Basic auth, but only a token is configured", 401)
            raw = f"{creds.username}:{creds.password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if scheme == "bearer":
            token = host.tokens.get(scope) or self._token(host, registry, params, scope, creds)
            host.tokens[scope] = token
            return {"Authorization": f"Bearer {token}"}
        raise AuthError(f"registry {registry}: unsupported auth scheme {scheme!r}", 401)

    def _token(self, host: _Host, registry: str, params: dict[str, str], scope: str, creds: Credentials) -> str:
        if creds.registry_token:
            return creds.registry_token
        realm = params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"registry {registry}: bearer challenge has no usable realm ({realm!r})", 401)
        service = params.get("service", "")
        if creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token, "service": service,
                    "scope": scope, "client_id": USER_AGENT}
            r = self._send("POST", realm, registry, data=form)
        else:
            query = {"service": service, "scope": scope} if service else {"scope": scope}
            if creds.username:
                query["account"] = creds.username
            auth = (creds.username, creds.password) if creds.username else None
            r = self._send("GET", f"{realm}?{urlencode(query)}", registry, auth=auth)
        if r.status_code in (401, 403):
            raise AuthError(f"registry {registry}: token service {_path_only(realm)} refused "
                            f"{self._who(registry, creds)} (HTTP {r.status_code})", r.status_code)
        if r.status_code != 200:
            raise AuthError(f"registry {registry}: token service {_path_only(realm)} answered "
                            f"HTTP {r.status_code}", r.status_code)
        try:
            body = r.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"registry {registry}: token service {_path_only(realm)} returned no token")
        self._secrets.append(token)
        return token

    def _request(self, method: str, ref: Reference, path: str, scope_actions: str, *,
                 stream: bool = False, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
        """An authenticated request to ``/v2/<repo>/<path>``; redoes auth once on a new challenge."""
        try:
            return self._request_once(method, ref, path, scope_actions, stream=stream, headers=headers, **kw)
        except httpx.HTTPError as e:
            raise RegistryError(f"registry {ref.registry}: {method} {ref.repository}: "
                                f"{type(e).__name__}: {self._scrub(str(e))}") from None

    def _request_once(self, method: str, ref: Reference, path: str, scope_actions: str, *,
                      stream: bool, headers: dict[str, str] | None, **kw: Any) -> httpx.Response:
        host = self._host(ref.registry, ref.api_host)
        scope = f"repository:{ref.repository}:{scope_actions}"
        url = path if path.startswith(("http://", "https://")) else f"{host.base}/v2/{ref.repository}/{path}"
        for attempt in range(2):
            hdrs = dict(headers or {})
            hdrs.update(self._auth_header(host, ref.registry, scope))
            if stream:
                req = self._http.build_request(method, url, headers=hdrs, **kw)
                r = self._http.send(req, stream=True)
                _log.debug("%s %s -> %d", method, _path_only(url), r.status_code)
            else:
                r = self._send(method, url, ref.registry, headers=hdrs, **kw)
            if r.status_code != 401:
                return r
            r.close()
            challenge = parse_challenge(r.headers.get("www-authenticate", ""))
            already_sent_basic = host.challenge is not None and host.challenge[0] == "basic"
            if attempt == 1 or (challenge[0] == "basic" and already_sent_basic):
                break
            # first challenge for this path, or a bearer token for a new scope (or expired): once more
            host.challenge = challenge
            host.tokens.pop(scope, None)
        creds = self._creds(ref.registry)
        raise AuthError(f"registry {ref.registry} refused {self._who(ref.registry, creds)} "
                        f"for {ref.repository} (HTTP 401)", 401)

    def _fail(self, r: httpx.Response, what: str) -> RegistryError:
        detail = ""
        try:
            r.read()
            errs = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code', '')}: {e.get('message', '')}" for e in errs if isinstance(e, dict))
        except (ValueError, AttributeError, httpx.HTTPError):
            pass
        msg = f"{what}: HTTP {r.status_code}" + (f" ({detail})" if detail else "")
        cls = AuthError if r.status_code in (401, 403) else RegistryError
        return cls(self._scrub(msg), r.status_code)

    # ---- API ----------------------------------------------------------------------------------

    def get_manifest(self, ref: Reference, accept: tuple[str, ...] = MANIFEST_TYPES) -> Manifest:
        r = self._request("GET", ref, f"manifests/{ref.identifier}", "pull", headers={"Accept": ", ".join(accept)})
        if r.status_code == 404:
            raise RegistryError(f"{ref}: manifest not found", 404)
        if r.status_code != 200:
            raise self._fail(r, f"{ref}: get manifest")
        raw = r.content
        if len(raw) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"{ref}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        digest = sha256_digest(raw)
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"{ref}: registry returned a manifest with digest {digest}")
        try:
            media_type = json.loads(raw).get("mediaType") or ""
        except (ValueError, AttributeError):
            raise RegistryError(f"{ref}: manifest is not JSON") from None
        media_type = media_type or r.headers.get("content-type", "").split(";")[0].strip()
        return Manifest(ref, raw, media_type, digest)

    def resolve(self, ref: Reference) -> str:
        """The manifest digest a tag points to (HEAD, falling back to GET)."""
        if ref.digest:
            return ref.digest
        r = self._request("HEAD", ref, f"manifests/{ref.identifier}", "pull",
                          headers={"Accept": ", ".join(MANIFEST_TYPES)})
        d = str(r.headers.get("docker-content-digest", ""))
        if r.status_code == 200 and d.startswith("sha256:"):
            return d
        return self.get_manifest(ref).digest

    def get_blob(self, ref: Reference, digest: str, *, max_size: int, label: str = "",
                 progress: ProgressFn | None = None, size_hint: int = 0) -> bytes:
        """A blob, checked against its digest, refused past ``max_size`` bytes."""
        if size_hint > max_size:
            raise FetchError(f"{ref}: blob {digest[:19]} is {size_hint} bytes, over the {max_size}-byte limit")
        r = self._request("GET", ref, f"blobs/{digest}", "pull", stream=True)
        try:
            if r.status_code != 200:
                raise self._fail(r, f"{ref}: get blob {digest}")
            total = int(r.headers.get("content-length") or size_hint or 0)
            if total > max_size:
                raise FetchError(f"{ref}: blob {digest[:19]} is {total} bytes, over the {max_size}-byte limit")
            h = hashlib.sha256()
            buf = bytearray()
            try:
                for chunk in r.iter_bytes(_CHUNK):
                    buf += chunk
                    h.update(chunk)
                    if len(buf) > max_size:
                        raise FetchError(f"{ref}: blob {digest[:19]} is over the {max_size}-byte limit")
                    if progress:
                        progress(label or digest[:19], len(buf), total)
            except httpx.TransportError as e:
                raise RegistryError(f"{ref}: get blob {digest[:19]}: {type(e).__name__}") from None
        finally:
            r.close()
        if "sha256:" + h.hexdigest() != digest:
            raise FetchError(f"{ref}: blob {digest} failed its digest check")
        return bytes(buf)

    def blob_exists(self, ref: Reference, digest: str) -> bool:
        r = self._request("HEAD", ref, f"blobs/{digest}", "pull,push")
        return r.status_code == 200

    def put_blob(self, ref: Reference, data: bytes, *, label: str = "", progress: ProgressFn | None = None) -> str:
        digest = sha256_digest(data)
        if self.blob_exists(ref, digest):
            if progress:
                progress(label or digest[:19], len(data), len(data))
            return digest
        r = self._request("POST", ref, "blobs/uploads/", "pull,push")
        if r.status_code not in (201, 202):
            raise self._fail(r, f"{ref}: start blob upload")
        location = r.headers.get("location", "")
        if not location:
            raise RegistryError(f"{ref}: registry gave no upload location")
        host = self._hosts[ref.api_host]
        url = urljoin(host.base + "/", location)
        url += ("&" if "?" in url else "?") + urlencode({"digest": digest})

        r = self._request("PUT", ref, url, "pull,push", content=_Chunks(data, label or digest[:19], progress),
                          headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
        if r.status_code not in (201, 204):
            raise self._fail(r, f"{ref}: upload blob {digest[:19]}")
        return digest

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> str:
        digest = sha256_digest(raw)
        r = self._request("PUT", ref, f"manifests/{ref.identifier}", "pull,push", content=raw,
                          headers={"Content-Type": media_type})
        if r.status_code not in (200, 201, 202):
            raise self._fail(r, f"{ref}: push manifest")
        got = r.headers.get("docker-content-digest", "")
        if got and got != digest:
            raise RegistryError(f"{ref}: registry stored the manifest as {got}, expected {digest}")
        return digest


class _Chunks:
    """Re-iterable upload body that reports progress (a generator could not be re-sent after a 401)."""

    def __init__(self, data: bytes, label: str, progress: ProgressFn | None) -> None:
        self.data, self.label, self.progress = data, label, progress

    def __iter__(self) -> Iterator[bytes]:
        n = len(self.data)
        for i in range(0, n, _CHUNK):
            yield self.data[i:i + _CHUNK]
            if self.progress:
                self.progress(self.label, min(i + _CHUNK, n), n)


def _path_only(url: str) -> str:
    """A URL without userinfo or query, for messages and logs."""
    u = urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return f"{u.scheme}://{host}{u.path}"
