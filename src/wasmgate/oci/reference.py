"""Image references: ``[registry/]repository[:tag][@sha256:hex]``, as Docker and Istio read them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from wasmgate.oci.errors import OciError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_REPO_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


class BadReference(OciError, ValueError):
    """An image reference cannot be parsed."""


@dataclass(frozen=True)
class Reference:
    registry: str  # host[:port] as written; "docker.io" for Docker Hub
    repository: str  # e.g. "library/nginx"
    tag: str = ""
    digest: str = ""  # "sha256:<hex>"

    @property
    def identifier(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest (Istio's module name)."""
        return f"{self.registry}/{self.repository}"

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.registry)

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_loopback_host(hostport: str) -> bool:
    host = hostport
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_reference(text: str) -> Reference:
    """Parse an image reference; an ``oci://`` prefix is accepted and dropped.

    The first path component is a registry when it holds a ``.`` or a ``:`` or is
    ``localhost`` (Docker's rule); otherwise the registry is Docker Hub, where a
    one-component repository gets the ``library/`` prefix.
    """
    ref = text.strip()
    if ref.startswith("oci://"):
        ref = ref[len("oci://"):]
    if not ref or "://" in ref:
        raise BadReference(f"invalid image reference {text!r}")
    digest = ""
    if "@" in ref:
        ref, digest = ref.rsplit("@", 1)
        if not _DIGEST.match(digest):
            raise BadReference(f"invalid image reference {text!r}: digest must be sha256:<64 hex digits>")
    first, sep, rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = DOCKER_HUB, ref
    tag = ""
    last_slash = path.rfind("/")
    colon = path.rfind(":")
    if colon > last_slash:
        path, tag = path[:colon], path[colon + 1:]
        if not _TAG.match(tag):
            raise BadReference(f"invalid image reference {text!r}: bad tag {tag!r}")
    if not path or not all(_REPO_COMPONENT.match(c) for c in path.split("/")):
        raise BadReference(f"invalid image reference {text!r}: bad repository name {path!r}")
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not tag and not digest:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)
