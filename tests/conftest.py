import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/servers.py and friends

from servers import Upstream, start_upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """A real upstream HTTP server that records what it receives (tests/servers.py)."""
    up = start_upstream()
    yield up
    up.server.shutdown()
