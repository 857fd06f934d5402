import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/servers.py and friends

from oci_harness import Registry, RegistryProxy, shared_registry
from servers import Upstream, start_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """A real upstream HTTP server that records what it receives (tests/servers.py)."""
    up = start_upstream()
    yield up
    up.server.shutdown()


@pytest.fixture(scope="module")
def registry(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A real docker-registry (tests/oci_harness.py) of the kind the test module names in
    ``REGISTRY_KIND`` ("open" when it names none). There is one per kind for the whole run,
    shared by every module: tests push to repositories of their own, never expect it empty."""
    kind = getattr(request.module, "REGISTRY_KIND", "open")
    return shared_registry(kind, tmp_path_factory.getbasetemp())


@pytest.fixture
def proxy(registry: Registry) -> Iterator[RegistryProxy]:
    """A recording proxy in front of ``registry``, one per test. Modules that run a wasmgate
    proxy name their own ``proxy`` fixture, which overrides this one."""
    p = RegistryProxy(registry.host)
    yield p
    p.close()
