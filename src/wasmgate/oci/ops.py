"""Push and pull of Wasm plugin images, on top of the registry client and the formats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wasmgate.oci.errors import FetchError, FormatError, RegistryError
from wasmgate.oci.image import INDEX_TYPES, Located, Package, build_package, extract_module, pick_from_index
from wasmgate.oci.reference import Reference
from wasmgate.oci.registry import Manifest, ProgressFn, RegistryClient

DEFAULT_MAX_MODULE_SIZE = 256 << 20
"""Istio's default cap (PILOT_MAX_WASM_BINARY_SIZE_BYTES / features.MaxWasmBinarySizeBytes): 256 MiB."""


@dataclass
class Resolved:
    """The image manifest a reference names (an index resolved to one of its manifests)."""

    manifest: Manifest
    doc: dict[str, Any]
    index: Manifest | None = None

    @property
    def digest(self) -> str:
        """The image manifest's digest: what Istio compares ``sha256`` with for oci URLs."""
        return self.manifest.digest


@dataclass
class Pulled:
    resolved: Resolved
    located: Located
    wasm: bytes


def resolve(client: RegistryClient, ref: Reference) -> Resolved:
    m = client.get_manifest(ref)
    doc = m.json
    if m.media_type in INDEX_TYPES or ("manifests" in doc and "layers" not in doc):
        entry = pick_from_index(doc)
        digest = str(entry.get("digest", ""))
        child = client.get_manifest(ref.with_digest(digest))
        return Resolved(child, child.json, index=m)
    return Resolved(m, doc)


def pull(client: RegistryClient, ref: Reference, *, max_size: int = DEFAULT_MAX_MODULE_SIZE,
         progress: ProgressFn | None = None, resolved: Resolved | None = None) -> Pulled:
    res = resolved or resolve(client, ref)

    def get(desc: dict[str, Any]) -> bytes:
        digest = str(desc.get("digest", ""))
        if not digest.startswith("sha256:"):
            raise FormatError(f"{ref}: layer has unsupported digest {digest!r}")
        size = desc.get("size")
        return client.get_blob(ref, digest, max_size=max_size, label=f"pull {ref.repository}",
                               progress=progress, size_hint=size if isinstance(size, int) else 0)

    try:
        wasm, loc = extract_module(res.doc, res.manifest.media_type, get, max_size)
    except FormatError as e:
        raise FormatError(f"{ref}: {e}") from None
    if len(wasm) > max_size:
        raise FetchError(f"{ref}: module is {len(wasm)} bytes, over the {max_size}-byte limit")
    if wasm[:4] != b"\0asm" or len(wasm) < 8:
        raise FetchError(f"{ref}: the {loc.format} layer does not hold a WebAssembly module (no \\0asm magic)")
    return Pulled(res, loc, wasm)


def push(client: RegistryClient, ref: Reference, wasm: bytes, fmt: str = "image", *,
         abi_versions: list[str] | None = None, progress: ProgressFn | None = None) -> Package:
    if ref.digest:
        raise RegistryError(f"{ref}: push to a tag, not a digest")
    pkg = build_package(wasm, fmt, abi_versions)
    for blob in pkg.blobs():
        client.put_blob(ref, blob.data, label=f"push {blob.digest[7:19]}", progress=progress)
    client.put_manifest(ref, pkg.manifest, pkg.media_type)
    return pkg

