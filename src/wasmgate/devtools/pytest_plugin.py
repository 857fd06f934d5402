"""The pytest plugin (entry point ``pytest11``): load any ``.wasm`` and drive its phases in-process.

```python
def test_denies(wasm_plugin):
    p = wasm_plugin("plugin.wasm", {"deny_prefix": "/admin"})
    out = p.run(path="/admin/x")
    assert out.status == 403
    p.expect(out, {"actions": {"request_headers": "pause"}, "logs": ["denied"]})
```

``expect`` takes the ``expect:`` mapping of a spec case and fails with the same lines
``wasmgate test`` prints. Plugins are closed when the test ends. HTTP callouts are answered
in-process from ``callouts=``, a list in the spec's ``expect.callouts`` form (each with
``respond`` or ``fail``); ``out.callouts`` records what the plugin sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from wasmgate.devtools.driver import Outcome, PluginDriver, Request, Response
from wasmgate.devtools.spec import CalloutExpect, Expect, _chunks, _headers, check


class WasmPlugin:
    """A loaded plugin; ``run`` sends one request (and the upstream's response) through it."""

    def __init__(self, driver: PluginDriver):
        self.driver = driver

    def run(self, method: str = "GET", path: str = "/", headers: Any = None, body: Any = None, *,
            status: int = 200, response_headers: Any = None, response_body: Any = None,
            callouts: Sequence[Mapping[str, Any]] = ()) -> Outcome:
        replies = [CalloutExpect.model_validate(dict(c)).reply() for c in callouts]
        return self.driver.run(Request(method, path, "example.com", _headers(headers), _chunks(body)),
                               Response(status, _headers(response_headers), _chunks(response_body)),
                               replies=replies)

    def expect(self, out: Outcome, expect: Mapping[str, Any]) -> None:
        fails = check(Expect.model_validate(dict(expect)), out)
        if fails:
            pytest.fail("\n".join(fails), pytrace=False)

    @property
    def memory_bytes(self) -> int:
        return self.driver.memory_bytes()

    @property
    def start_logs(self) -> list[str]:
        return self.driver.start_logs


@pytest.fixture
def wasm_plugin() -> Iterator[Callable[..., WasmPlugin]]:
    """A factory: ``wasm_plugin(path, config=None, **options)`` -> ``WasmPlugin``."""
    loaded: list[PluginDriver] = []

    def load(wasm: str | Path, config: object = None, **kw: Any) -> WasmPlugin:
        d = PluginDriver(wasm, config, **kw)
        loaded.append(d)
        return WasmPlugin(d)

    yield load
    for d in loaded:
        d.close()
