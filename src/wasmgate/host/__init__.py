"""Proxy-Wasm host functions, one module per ABI area.

Importing this package registers every function in ``registry.REGISTRY``.
"""

import wasmgate.host.metrics
import wasmgate.host.shared  # noqa: F401
from wasmgate.host import (  # noqa: F401
    buffers,
    cel,
    foreign,
    general,
    grpc,
    headers,
    http_call,
    properties,
    signing,
    stream,
    wasi,
)
from wasmgate.host.registry import REGISTRY, bind

__all__ = ["REGISTRY", "bind"]
