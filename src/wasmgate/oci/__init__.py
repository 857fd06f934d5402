"""OCI distribution for Wasm plugins: registry client, image formats, module fetching and cache.

See docs/oci.md.
"""
