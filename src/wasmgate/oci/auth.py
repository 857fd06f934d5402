"""Registry credentials: Docker config files, Kubernetes pull Secrets, credential helpers.

A :class:`Credentials` never shows its secrets in ``repr``/``str``, so it can be logged
or put in an exception by mistake without leaking them. Keys of a Docker config's
``auths`` are matched the way Docker matches them: scheme and path are ignored, and
``https://index.docker.io/v1/`` stands for Docker Hub.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wasmgate.oci.errors import AuthError, OciError
from wasmgate.oci.reference import DOCKER_HUB

_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
DOCKER_HUB_CONFIG_KEY = "https://index.docker.io/v1/"


class CredentialsError(OciError):
    """A Docker config file or pull Secret cannot be read (the message names it, not its secrets)."""


@dataclass(frozen=True)
class Credentials:
    """How to authenticate to one registry. Empty means anonymous."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)  # OAuth2 refresh token ("identitytoken")
    registry_token: str = field(default="", repr=False)  # a bearer token used as is ("registrytoken")

    @property
    def anonymous(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def __repr__(self) -> str:
        kinds = [k for k, v in (("password", self.password), ("identity_token", self.identity_token),
                                ("registry_token", self.registry_token)) if v]
        return f"Credentials(username={self.username!r}, with={'+'.join(kinds) or 'nothing'})"

    __str__ = __repr__

    def secrets(self) -> list[str]:
        """Every secret value, for scrubbing them out of text that may be shown."""
        out = [s for s in (self.password, self.identity_token, self.registry_token) if s]
        if self.username and self.password:
            out.append(base64.b64encode(f"{self.username}:{self.password}".encode()).decode())
        return out


def normalize_registry(key: str) -> str:
    """``https://host:5000/v1/`` -> ``host:5000``; Docker Hub's aliases -> ``docker.io``."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    k = k.split("/", 1)[0].lower()
    return DOCKER_HUB if k in _HUB_ALIASES else k


class Keychain:
    """Credentials for several registries, as one Docker config holds them."""

    def __init__(self, auths: Mapping[str, Credentials] | None = None, *,
                 helpers: Mapping[str, str] | None = None, store: str = "", source: str = "") -> None:
        self._auths = {normalize_registry(k): v for k, v in (auths or {}).items()}
        self._helpers = {normalize_registry(k): v for k, v in (helpers or {}).items()}
        self._store = store
        self.source = source  # where the credentials came from, for messages

    def __repr__(self) -> str:
        return f"Keychain(source={self.source!r}, registries={sorted(self._auths)})"

    @classmethod
    def anonymous(cls) -> Keychain:
        return cls(source="anonymous")

    @classmethod
    def single(cls, registry: str, creds: Credentials) -> Keychain:
        return cls({registry: creds}, source=f"credentials for {registry}")

    @classmethod
    def from_dockerconfigjson(cls, data: Mapping[str, Any] | bytes | str, source: str = "docker config") -> Keychain:
        """From the content of a Docker ``config.json`` (or a Secret's ``.dockerconfigjson``)."""
        if isinstance(data, (bytes, str)):
            try:
                parsed = json.loads(data)
            except json.JSONDecodeError as e:
                raise CredentialsError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
            except ValueError:
                raise CredentialsError(f"{source}: not valid JSON") from None
        else:
            parsed = data
        if not isinstance(parsed, Mapping):
            raise CredentialsError(f"{source}: expected a JSON object")
        auths_raw = parsed.get("auths", {})
        if not isinstance(auths_raw, Mapping):
            raise CredentialsError(f"{source}: 'auths' must be an object")
        auths = {str(k): _entry(v, source, str(k)) for k, v in auths_raw.items()}
        helpers = parsed.get("credHelpers") or {}
        store = parsed.get("credsStore") or ""
        if not isinstance(helpers, Mapping) or not isinstance(store, str):
            raise CredentialsError(f"{source}: 'credHelpers' must be an object and 'credsStore' a string")
        return cls(auths, helpers={str(k): str(v) for k, v in helpers.items()}, store=store, source=source)

    @classmethod
    def from_docker_config(cls, path: Path | None = None) -> Keychain:
        """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; none there means anonymous."""
        if path is None:
            base = os.environ.get("DOCKER_CONFIG")
            path = Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return cls(source=f"{path} (absent)")
        except OSError as e:
            raise CredentialsError(f"{path}: {e.strerror}") from None
        return cls.from_dockerconfigjson(text, source=str(path))

    @classmethod
    def from_k8s_secret(cls, secret: Mapping[str, Any]) -> Keychain:
        """From a parsed Kubernetes Secret of type ``kubernetes.io/dockerconfigjson`` (or legacy
        ``kubernetes.io/dockercfg``), reading ``data`` (base64) or ``stringData``."""
        meta = secret.get("metadata") or {}
        name = f"Secret {meta.get('namespace') or 'default'}/{meta.get('name') or '?'}"
        if secret.get("kind", "Secret") != "Secret":
            raise CredentialsError(f"{name}: kind is {secret.get('kind')!r}, expected Secret")
        stype = secret.get("type", "")
        keys = {"kubernetes.io/dockerconfigjson": ".dockerconfigjson", "kubernetes.io/dockercfg": ".dockercfg"}
        if stype not in keys:
            raise CredentialsError(f"{name}: type is {stype!r}, expected kubernetes.io/dockerconfigjson")
        key = keys[stype]
        raw: str | bytes | None = None
        string_data = secret.get("stringData") or {}
        data = secret.get("data") or {}
        if key in string_data:
            raw = str(string_data[key])
        elif key in data:
            try:
                raw = base64.b64decode(str(data[key]), validate=True)
            except (binascii.Error, ValueError):
                raise CredentialsError(f"{name}: data.{key} is not valid base64") from None
        if raw is None:
            raise CredentialsError(f"{name}: no data.{key}")
        if key == ".dockercfg":  # legacy: the auths map itself
            try:
                legacy = json.loads(raw)
            except ValueError:
                raise CredentialsError(f"{name}: data.{key} is not valid JSON") from None
            return cls.from_dockerconfigjson({"auths": legacy}, source=name)
        return cls.from_dockerconfigjson(raw, source=name)

    def resolve(self, registry: str) -> Credentials:
        """Credentials for ``registry`` (host[:port]); anonymous when none are configured."""
        key = normalize_registry(registry)
        entry = self._auths.get(key, Credentials())
        # with a credsStore, Docker leaves empty entries in auths: the store holds the secrets
        helper = self._helpers.get(key) or (self._store if entry.anonymous else "")
        if helper:
            return _from_helper(helper, DOCKER_HUB_CONFIG_KEY if key == DOCKER_HUB else key)
        return entry


def _entry(v: Any, source: str, key: str) -> Credentials:
    if not isinstance(v, Mapping):
        raise CredentialsError(f"{source}: auths[{key!r}] must be an object")
    user = str(v.get("username") or "")
    password = str(v.get("password") or "")
    auth = v.get("auth")
    if auth:
        try:
            user, sep, password = base64.b64decode(str(auth), validate=True).decode().partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise CredentialsError(f"{source}: auths[{key!r}].auth is not base64 of user:password") from None
        if not sep:
            raise CredentialsError(f"{source}: auths[{key!r}].auth is not base64 of user:password")
    return Credentials(user, password, str(v.get("identitytoken") or ""), str(v.get("registrytoken") or ""))


def _from_helper(helper: str, server: str) -> Credentials:
    exe = f"docker-credential-{helper}"
    path = shutil.which(exe)
    if path is None:
        raise AuthError(f"credential helper {exe} (named in the Docker config) is not installed")
    try:
        out = subprocess.run([path, "get"], input=server, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AuthError(f"credential helper {exe} failed: {type(e).__name__}") from None
    if out.returncode != 0:
        if "credentials not found" in out.stdout.lower() + out.stderr.lower():
            return Credentials()
        raise AuthError(f"credential helper {exe} failed for {server} (exit {out.returncode})")
    try:
        got = json.loads(out.stdout)
        user, secret = str(got.get("Username", "")), str(got.get("Secret", ""))
    except (ValueError, AttributeError):
        raise AuthError(f"credential helper {exe} printed no valid JSON for {server}") from None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(user, secret)
