"""Plugin developer tools: ``wasmgate new``, ``wasmgate test``, ``wasmgate bench`` and a pytest plugin."""
