"""Wasm plugin image formats: building them for push, finding the module when pulling.

Formats Istio's image fetcher (pkg/wasm/imagefetcher.go) accepts, tried in its order:

1. Docker image: manifest ``application/vnd.docker.distribution.manifest.v2+json``; the
   *last* layer must be ``application/vnd.docker.image.rootfs.diff.tar.gzip``, a gzip tar
   holding a file whose base name is ``plugin.wasm`` (``FROM scratch`` + ``COPY plugin.wasm ./``).
2. OCI "compat" image: any other manifest whose last layer is
   ``application/vnd.oci.image.layer.v1.tar+gzip`` holding ``plugin.wasm``.
3. Wasm artifact ("oci" variant of the solo.io spec): exactly two layers, one of them
   ``application/vnd.module.wasm.content.layer.v1+wasm`` (the raw module), the other the
   ``application/vnd.module.wasm.config.v1+json`` runtime config.

wasmgate also pulls (Istio does not) single-module artifacts whose layer is
``application/vnd.wasm.content.layer.v1+wasm`` (wasm-to-oci) or ``application/wasm``
(CNCF TAG Runtime Wasm OCI artifact), and reports them as not Istio-compatible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wasmgate.oci.errors import FormatError
from wasmgate.oci.registry import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
WASM_TO_OCI_CONFIG = "application/vnd.wasm.config.v1+json"
WASM_TO_OCI_LAYER = "application/vnd.wasm.content.layer.v1+wasm"
CNCF_WASM_CONFIG = "application/vnd.wasm.config.v0+json"
CNCF_WASM_LAYER = "application/wasm"
COMPAT_ANNOTATION = "module.wasm.image/variant"
TITLE_ANNOTATION = "org.opencontainers.image.title"
PLUGIN_FILE = "plugin.wasm"

FORMATS = ("image", "oci-image", "artifact")
"""Push formats: Docker v2 schema 2 image (default), OCI compat image, two-layer Wasm artifact."""

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)


@dataclass
class Blob:
    media_type: str
    data: bytes
    annotations: dict[str, str] | None = None

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "size": len(self.data), "digest": self.digest}
        if self.annotations:
            d["annotations"] = self.annotations
        return d


@dataclass
class Package:
    """What ``push`` uploads: config and layer blobs, then the manifest."""

    media_type: str
    config: Blob
    layers: list[Blob]
    manifest: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def blobs(self) -> list[Blob]:
        seen: dict[str, Blob] = {}
        for b in (self.config, *self.layers):
            seen.setdefault(b.digest, b)
        return list(seen.values())


def plugin_tar_gz(wasm: bytes) -> tuple[bytes, bytes]:
    """(gzip tar, plain tar) holding ``plugin.wasm``; reproducible (mtime 0, root-owned, 0644)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(PLUGIN_FILE)
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        tar.addfile(info, io.BytesIO(wasm))
    plain = raw.getvalue()
    return gzip.compress(plain, compresslevel=6, mtime=0), plain


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode()


def build_package(wasm: bytes, fmt: str = "image", abi_versions: list[str] | None = None) -> Package:
    if wasm[:4] != b"\0asm":
        raise FormatError("not a WebAssembly module (missing \\0asm magic)")
    if fmt in ("image", "oci-image"):
        gz, plain = plugin_tar_gz(wasm)
        docker = fmt == "image"
        image_config = {
            "architecture": "wasm",
            "os": "wasip1",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(plain).hexdigest()]},
            "history": [{"created_by": f"COPY {PLUGIN_FILE} ./", "comment": "wasmgate push"}],
        }
        config = Blob(DOCKER_CONFIG if docker else OCI_CONFIG, _compact(image_config))
        layer = Blob(DOCKER_LAYER if docker else OCI_LAYER, gz)
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type,
                                    "config": config.descriptor(), "layers": [layer.descriptor()]}
        if not docker:
            manifest["annotations"] = {COMPAT_ANNOTATION: "compat"}
        return Package(media_type, config, [layer], _compact(manifest))
    if fmt == "artifact":
        runtime = {"type": "envoy_proxy", "abiVersions": abi_versions or [], "config": {}}
        config = Blob(WASM_CONFIG, _compact(runtime), {TITLE_ANNOTATION: "runtime-config.json"})
        module = Blob(WASM_LAYER, wasm, {TITLE_ANNOTATION: PLUGIN_FILE})
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": Blob(WASM_CONFIG, config.data).descriptor(),
                    "layers": [config.descriptor(), module.descriptor()]}
        return Package(OCI_MANIFEST, config, [config, module], _compact(manifest))
    raise FormatError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")


# ---- reading ----------------------------------------------------------------------------------


@dataclass
class Located:
    """Where the module is in a manifest, and how to get it out."""

    format: str  # "docker-image", "oci-compat-image", "wasm-artifact", "wasm-to-oci", "cncf-wasm"
    layer: dict[str, Any]
    tar: bool  # the layer is a gzip tar holding plugin.wasm (else the raw module)
    istio: bool  # whether Istio's image fetcher accepts this manifest


def _layers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise FormatError("manifest has no valid 'layers' list")
    return layers


def locate_module(manifest: dict[str, Any], media_type: str) -> Located:
    """Find the module's layer, in the order Istio tries formats, then the other Wasm artifact types."""
    layers = _layers(manifest)
    if not layers:
        raise FormatError("manifest has no layers")
    last = layers[-1]
    if media_type == DOCKER_MANIFEST:
        if last.get("mediaType") != DOCKER_LAYER:
            raise FormatError(f"Docker image: last layer is {last.get('mediaType')!r}, expected {DOCKER_LAYER}")
        return Located("docker-image", last, True, True)
    if last.get("mediaType") == OCI_LAYER:
        return Located("oci-compat-image", last, True, True)
    wasm_layers = [x for x in layers if x.get("mediaType") == WASM_LAYER]
    if len(layers) == 2 and wasm_layers:
        return Located("wasm-artifact", wasm_layers[0], False, True)
    for mt, name in ((WASM_LAYER, "wasm-artifact"), (WASM_TO_OCI_LAYER, "wasm-to-oci"),
                     (CNCF_WASM_LAYER, "cncf-wasm")):
        found = [x for x in layers if x.get("mediaType") == mt]
        if len(found) == 1:
            return Located(name, found[0], False, False)
    kinds = ", ".join(str(x.get("mediaType")) for x in layers)
    raise FormatError(
        "no Wasm module found: expected a Docker/OCI image whose last layer is a gzip tar holding "
        f"{PLUGIN_FILE}, or a Wasm artifact layer ({WASM_LAYER}, {WASM_TO_OCI_LAYER} or "
        f"{CNCF_WASM_LAYER}); layers are: {kinds}")


def plugin_from_tar_gz(data: bytes, max_size: int) -> bytes:
    """The first file named ``plugin.wasm`` (any directory) in a gzip tar, as Istio reads it."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for member in tar:
                if member.name.rsplit("/", 1)[-1] != PLUGIN_FILE:
                    continue
                if not member.isfile():
                    continue
                if member.size > max_size:
                    raise FormatError(f"{PLUGIN_FILE} in the layer is {member.size} bytes, "
                                      f"over the {max_size}-byte limit")
                f = tar.extractfile(member)
                if f is None:
                    break
                return f.read()
    except (OSError, tarfile.TarError, EOFError) as e:
        raise FormatError(f"layer is not a valid gzip tar: {e}") from None
    raise FormatError(f"{PLUGIN_FILE} not found in the layer")


def pick_from_index(index: dict[str, Any]) -> dict[str, Any]:
    """The manifest descriptor to use from an index: linux/amd64 as go-containerregistry (and so
    Istio) picks by default, else a wasi/wasm one, else the only entry."""
    entries = index.get("manifests")
    if not isinstance(entries, list) or not entries:
        raise FormatError("image index has no manifests")

    def plat(e: dict[str, Any]) -> tuple[str, str]:
        p = e.get("platform") or {}
        return str(p.get("os", "")), str(p.get("architecture", ""))

    for want in (("linux", "amd64"), ("wasip1", "wasm"), ("wasi", "wasm")):
        for e in entries:
            if isinstance(e, dict) and plat(e) == want:
                return e
    if len(entries) == 1 and isinstance(entries[0], dict):
        return entries[0]
    raise FormatError("image index has no linux/amd64 or wasi/wasm manifest")


def extract_module(manifest: dict[str, Any], media_type: str, get_blob: Callable[[dict[str, Any]], bytes],
                   max_size: int) -> tuple[bytes, Located]:
    loc = locate_module(manifest, media_type)
    data = get_blob(loc.layer)
    wasm = plugin_from_tar_gz(data, max_size) if loc.tar else data
    return wasm, loc


def wasm_export_names(wasm: bytes) -> list[str]:
    """Export names read straight from the binary's export section (no compile)."""
    def uleb(pos: int) -> tuple[int, int]:
        result = shift = 0
        while True:
            b = wasm[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result, pos

    names: list[str] = []
    try:
        pos = 8
        while pos < len(wasm):
            sid = wasm[pos]
            size, pos = uleb(pos + 1)
            if sid == 7:
                count, p = uleb(pos)
                for _ in range(count):
                    n, p = uleb(p)
                    names.append(wasm[p:p + n].decode("utf-8", "replace"))
                    p += n + 1
                    _, p = uleb(p)
                return names
            pos += size
    except IndexError:
        pass
    return names
