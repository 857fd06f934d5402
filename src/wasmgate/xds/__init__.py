"""``wasmgate envoy``: a real Envoy configured over xDS (ADS) by wasmgate (docs/envoy.md)."""
