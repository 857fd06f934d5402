"""Handing wasmgate resources to other control planes: ``wasmgate export --istio`` (docs/istio.md)."""
