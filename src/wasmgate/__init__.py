"""wasmgate: an HTTP proxy extended by Proxy-Wasm plugins."""

from wasmgate.compiled import use_source_if_asked

use_source_if_asked()  # before any compiled module is imported
