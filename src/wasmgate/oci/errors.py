"""Errors of the OCI and module-fetch code. Messages name the URL or reference, never credentials."""

from __future__ import annotations


class OciError(Exception):
    """Base of every error raised by wasmgate.oci."""


class RegistryError(OciError):
    """The registry refused a request or answered something unexpected."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class AuthError(RegistryError):
    """Authentication with the registry (or its token service) failed."""


class FormatError(OciError):
    """The manifest or its layers hold no Wasm module in a format wasmgate reads."""


class FetchError(OciError):
    """A module could not be fetched, or failed a check (digest, magic, size)."""
