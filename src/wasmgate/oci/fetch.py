"""Fetching a plugin's module from a WasmPlugin ``url``, with Istio's semantics, into a local cache.

- ``oci://REF`` or a URL with no scheme: pull from a registry (formats: wasmgate.oci.image).
  ``sha256`` is the expected *manifest digest*; a ``@sha256:`` in the URL counts the same.
- ``http://`` / ``https://``: GET with retries and exponential backoff on connection errors and
  5xx answers; a gzip or tar body is unpacked as Istio does. ``sha256`` is the module's hash.
- ``file://PATH``: a local file, relative paths against ``base_dir``; ``sha256`` is checked if given.

``pull_policy`` (WasmPlugin ``imagePullPolicy``): ``IfNotPresent`` uses a module already
fetched for the same URL (or the same expected digest/hash) without asking the network;
``Always`` asks every time (a manifest digest that is already cached still skips the
download). Unset means IfNotPresent, except Always for oci URLs ending in ``:latest``. A
``sha256``, or a digest in an oci URL, pins the content: then IfNotPresent whatever the policy.

Every module is checked for the ``\\0asm`` magic and a size cap before it is cached. Errors
are :class:`FetchError` (or another :class:`OciError`) naming the URL, never credentials.
This API is blocking; from asyncio call it with ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from wasmgate.oci.auth import Credentials, Keychain
from wasmgate.oci.errors import FetchError, OciError
from wasmgate.oci.ops import DEFAULT_MAX_MODULE_SIZE, pull, resolve
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import ProgressFn, RegistryClient

_log = logging.getLogger("wasmgate.oci")

DEFAULT_EXPIRY = 24 * 3600.0  # Istio's default module expiry
PULL_POLICIES = ("", "UNSPECIFIED_POLICY", "IfNotPresent", "Always")
_HEX64 = re.compile(r"^[a-f0-9]{64}$")


@dataclass(frozen=True)
class Fetched:
    url: str
    path: Path  # the module file (in the cache, or the file itself for file://)
    sha256: str  # hex sha256 of the module
    digest: str = ""  # oci: the image manifest digest, "sha256:<hex>"; else ""
    from_cache: bool = False  # served without downloading the module
    format: str = ""  # oci: which image format held it (see wasmgate.oci.image.Located)


def default_cache_dir() -> Path:
    env = os.environ.get("WASMGATE_MODULE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wasmgate" / "modules"


class ModuleCache:
    """Content-addressed module files, with expiry, that never removes a pinned module.

    Layout under ``root``: ``modules/<sha256>.wasm``; ``refs/<sha256 of url>.json`` (the
    module and manifest digest a URL last gave); ``digests/<manifest digest hex>`` (the module
    a manifest holds). A module's file mtime is its last use; :meth:`purge` removes modules
    unused for ``expiry`` seconds unless pinned (``pin``/``unpin`` count, per process).
    """

    def __init__(self, root: Path | None = None, *, expiry: float = DEFAULT_EXPIRY,
                 max_module_size: int = DEFAULT_MAX_MODULE_SIZE) -> None:
        self.root = root or default_cache_dir()
        self.expiry = expiry
        self.max_module_size = max_module_size
        self._pins: dict[Path, int] = {}
        self._lock = threading.Lock()
        for sub in ("modules", "refs", "digests"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- modules ------------------------------------------------------------------------------

    def path_for(self, sha256: str) -> Path:
        return self.root / "modules" / f"{sha256}.wasm"

    def get(self, sha256: str) -> Path | None:
        """The cached module with this hash, marked as used now; None if absent."""
        if not _HEX64.match(sha256):
            return None
        p = self.path_for(sha256)
        try:
            os.utime(p)
        except FileNotFoundError:
            return None
        return p

    def put(self, wasm: bytes, *, source: str = "module") -> tuple[str, Path]:
        check_module(wasm, source, self.max_module_size)
        sha = hashlib.sha256(wasm).hexdigest()
        p = self.path_for(sha)
        if self.get(sha) is None:
            _atomic_write(p, wasm)
        return sha, p

    # ---- pins ---------------------------------------------------------------------------------

    def pin(self, path: Path) -> None:
        with self._lock:
            key = Path(path).resolve()
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, path: Path) -> None:
        with self._lock:
            key = Path(path).resolve()
            n = self._pins.get(key, 0) - 1
            if n > 0:
                self._pins[key] = n
            else:
                self._pins.pop(key, None)

    def is_pinned(self, path: Path) -> bool:
        with self._lock:
            return Path(path).resolve() in self._pins

    @contextlib.contextmanager
    def pinned(self, path: Path) -> Iterator[Path]:
        self.pin(path)
        try:
            yield path
        finally:
            self.unpin(path)

    # ---- url and digest memory ----------------------------------------------------------------

    def _ref_file(self, url: str) -> Path:
        return self.root / "refs" / (hashlib.sha256(url.encode()).hexdigest() + ".json")

    def remember(self, url: str, sha256: str, digest: str = "") -> None:
        _atomic_write(self._ref_file(url), json.dumps({"url": url, "sha256": sha256, "digest": digest}).encode())
        if digest.startswith("sha256:"):
            _atomic_write(self.root / "digests" / digest[7:], sha256.encode())

    def lookup(self, url: str) -> tuple[str, str] | None:
        """(module sha256, manifest digest) this URL last gave, if its module is still cached."""
        try:
            rec = json.loads(self._ref_file(url).read_text())
            sha, digest = str(rec["sha256"]), str(rec.get("digest", ""))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (sha, digest) if self.get(sha) is not None else None

    def by_digest(self, digest_hex: str) -> str | None:
        """The module sha256 a manifest digest (hex) holds, if cached."""
        if not _HEX64.match(digest_hex):
            return None
        try:
            sha = (self.root / "digests" / digest_hex).read_text().strip()
        except OSError:
            return None
        return sha if self.get(sha) is not None else None

    # ---- expiry -------------------------------------------------------------------------------

    def purge(self, now: float | None = None) -> list[Path]:
        """Remove modules unused for ``expiry`` seconds and not pinned; returns what was removed."""
        now = time.time() if now is None else now
        removed: list[Path] = []
        with self._lock:
            pinned = set(self._pins)
        for p in (self.root / "modules").glob("*.wasm"):
            try:
                if now - p.stat().st_mtime <= self.expiry or p.resolve() in pinned:
                    continue
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                continue
        if removed:
            present = {p.stem for p in (self.root / "modules").glob("*.wasm")}
            for f in (self.root / "digests").iterdir():
                with contextlib.suppress(OSError):
                    if f.read_text().strip() not in present:
                        f.unlink()
            for f in (self.root / "refs").glob("*.json"):
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    if json.loads(f.read_text())["sha256"] not in present:
                        f.unlink()
            _log.debug("module cache: removed %d expired module(s)", len(removed))
        return removed


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def check_module(wasm: bytes, source: str, max_size: int) -> None:
    if len(wasm) > max_size:
        raise FetchError(f"{source}: module is {len(wasm)} bytes, over the {max_size}-byte limit")
    if len(wasm) < 8 or wasm[:4] != b"\0asm":
        raise FetchError(f"{source}: not a WebAssembly module (missing \\0asm magic)")


def _expected_hex(sha256: str, url: str) -> str:
    s = sha256.strip().lower()
    s = s.removeprefix("sha256:")
    if s and not _HEX64.match(s):
        raise FetchError(f"{url}: sha256 must be 64 hex digits, got {sha256!r}")
    return s


def effective_policy(url: str, pull_policy: str, sha256: str = "") -> str:
    """"Always" or "IfNotPresent", as Istio decides it. Content pinned by ``sha256`` or by a
    digest in an oci URL cannot have moved, so the cache answers it whatever the policy."""
    if pull_policy not in PULL_POLICIES:
        raise FetchError(f"{url}: unknown imagePullPolicy {pull_policy!r}")
    scheme = urlsplit(url).scheme if "://" in url else "oci"
    if sha256 or (scheme == "oci" and "@sha256:" in url):
        return "IfNotPresent"
    if pull_policy in ("Always", "IfNotPresent"):
        return pull_policy
    return "Always" if scheme == "oci" and url.endswith(":latest") else "IfNotPresent"


def fetch_module(url: str, *, sha256: str = "", pull_policy: str = "",
                 auth: Keychain | Credentials | None = None, base_dir: Path | None = None,
                 cache: ModuleCache, insecure: bool = False, timeout: float = 15.0, max_retries: int = 5,
                 initial_backoff: float = 0.5, progress: ProgressFn | None = None) -> Fetched:
    """Fetch the module ``url`` names (see the module docstring).

    ``auth``: a :class:`Keychain` (e.g. ``Keychain.from_k8s_secret(secret)`` for an
    ``imagePullSecret``), :class:`Credentials` for the URL's registry, or None for the
    Docker config ($DOCKER_CONFIG or ~/.docker/config.json), as Istio's default keychain.
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else "oci"
    expected = _expected_hex(sha256, url)
    policy = effective_policy(url, pull_policy, expected)
    if scheme == "file":
        return _fetch_file(url, expected, base_dir, cache)
    if scheme in ("http", "https"):
        return _fetch_http(url, expected, policy, cache, insecure, timeout, max_retries, initial_backoff)
    if scheme == "oci":
        return _fetch_oci(url, expected, policy, auth, cache, insecure, timeout, progress)
    raise FetchError(f"{url}: unsupported URL scheme {scheme!r} (expected oci://, http(s):// or file://)")


def _fetch_file(url: str, expected: str, base_dir: Path | None, cache: ModuleCache) -> Fetched:
    raw = unquote(url[len("file://"):])
    path = Path(raw)
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    try:
        size = path.stat().st_size
        if size > cache.max_module_size:
            raise FetchError(f"{url}: module is {size} bytes, over the {cache.max_module_size}-byte limit")
        wasm = path.read_bytes()
    except OSError as e:
        raise FetchError(f"{url}: cannot read {path}: {e.strerror}") from None
    check_module(wasm, url, cache.max_module_size)
    sha = hashlib.sha256(wasm).hexdigest()
    if expected and sha != expected:
        raise FetchError(f"{url}: module sha256 is {sha}, which does not match the expected {expected}")
    return Fetched(url, path, sha)


def _fetch_http(url: str, expected: str, policy: str, cache: ModuleCache, insecure: bool, timeout: float,
                max_retries: int, initial_backoff: float) -> Fetched:
    shown = _safe_url(url)
    if policy == "IfNotPresent":
        if expected and (p := cache.get(expected)) is not None:
            return Fetched(url, p, expected, from_cache=True)
        hit = cache.lookup(url)
        if hit and not expected:
            return Fetched(url, cache.path_for(hit[0]), hit[0], from_cache=True)
    body = _http_get(url, shown, insecure, timeout, max_retries, initial_backoff, cache.max_module_size)
    wasm = unbox(body, cache.max_module_size)
    check_module(wasm, shown, cache.max_module_size)
    sha = hashlib.sha256(wasm).hexdigest()
    if expected and sha != expected:
        raise FetchError(f"{shown}: module downloaded has sha256 {sha}, which does not match the expected {expected}")
    sha, path = cache.put(wasm, source=shown)
    cache.remember(url, sha)
    return Fetched(url, path, sha)


def _retryable(code: int) -> bool:
    return code >= 500 and code not in (501, 505, 511)


def _http_get(url: str, shown: str, insecure: bool, timeout: float, max_retries: int, initial_backoff: float,
              max_size: int) -> bytes:
    last = ""
    delay = initial_backoff
    attempts = max(1, max_retries)
    # userinfo goes into an auth header, never into a URL that httpx might log
    u = urlsplit(url)
    auth = (unquote(u.username), unquote(u.password or "")) if u.username else None
    if auth:
        url = u._replace(netloc=u.netloc.rpartition("@")[2]).geturl()
    with httpx.Client(timeout=timeout, follow_redirects=True, verify=not insecure, auth=auth) as client:
        for attempt in range(1, attempts + 1):
            try:
                with client.stream("GET", url) as r:
                    if r.status_code == 200:
                        declared = int(r.headers.get("content-length") or 0)
                        if declared > max_size:
                            raise FetchError(f"{shown}: module is {declared} bytes, over the {max_size}-byte limit")
                        buf = bytearray()
                        for chunk in r.iter_bytes(64 << 10):
                            buf += chunk
                            if len(buf) > max_size:
                                raise FetchError(f"{shown}: module is over the {max_size}-byte limit")
                        return bytes(buf)
                    last = f"HTTP {r.status_code}"
                    if not _retryable(r.status_code):
                        break
            except httpx.HTTPError as e:
                last = type(e).__name__
            _log.debug("fetch %s: attempt %d failed: %s", shown, attempt, last)
            if attempt < attempts:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    raise FetchError(f"{shown}: download failed after {attempt} attempt(s), last error: {last}")


def unbox(data: bytes, max_size: int) -> bytes:
    """A gzip or tar body holding the module is unpacked (the first file of a tar), as Istio does."""
    for _ in range(4):
        if data[:4] == b"\0asm":
            return data
        if data[:2] == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz:
                    data = gz.read(max_size + 1)
            except (OSError, EOFError):
                return data
        elif len(data) > 262 and data[257:262] == b"ustar":
            try:
                with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                    member = next((m for m in tar if m.isfile()), None)
                    f = tar.extractfile(member) if member else None
                    if f is None:
                        return data
                    data = f.read(max_size + 1)
            except tarfile.TarError:
                return data
        else:
            return data
    return data


def _safe_url(url: str) -> str:
    """The URL without userinfo or query (which may hold credentials or signed tokens)."""
    u = urlsplit(url)
    host = u.hostname or ""
    if u.port:
        host += f":{u.port}"
    return f"{u.scheme}://{host}{u.path}"


def _fetch_oci(url: str, expected: str, policy: str, auth: Keychain | Credentials | None, cache: ModuleCache,
               insecure: bool, timeout: float, progress: ProgressFn | None) -> Fetched:
    try:
        ref = parse_reference(url)
    except OciError as e:
        raise FetchError(f"{url}: {e}") from None
    if not expected and ref.digest:
        expected = ref.digest[7:]
    if policy == "IfNotPresent":
        if expected and (sha := cache.by_digest(expected)):
            return Fetched(url, cache.path_for(sha), sha, "sha256:" + expected, True)
        hit = cache.lookup(url)
        if hit and not expected:
            return Fetched(url, cache.path_for(hit[0]), hit[0], hit[1], True)
    keychain = Keychain.single(ref.registry, auth) if isinstance(auth, Credentials) else auth
    try:
        with RegistryClient(keychain, insecure=insecure, timeout=timeout) as client:
            res = resolve(client, ref)
            digest = res.digest
            if expected and digest[7:] != expected:
                raise FetchError(f"{url}: image manifest digest is {digest}, which does not match "
                                 f"the expected sha256:{expected}")
            if sha := cache.by_digest(digest[7:]):
                cache.remember(url, sha, digest)
                return Fetched(url, cache.path_for(sha), sha, digest, True)
            pulled = pull(client, ref, max_size=cache.max_module_size, progress=progress, resolved=res)
    except FetchError:
        raise
    except OciError as e:
        msg = str(e)
        raise FetchError(msg if url in msg or str(ref) in msg else f"{url}: {msg}") from None
    sha, path = cache.put(pulled.wasm, source=url)
    cache.remember(url, sha, digest)
    return Fetched(url, path, sha, digest, False, pulled.located.format)
