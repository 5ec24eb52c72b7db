from __future__ import annotations

import pytest
import structlog

from moshpit_trio.identity import Identity


@pytest.fixture
def identities() -> list[Identity]:
    """Eight fixed identities (seeds 1..8), so failures reproduce with the same PeerIDs."""
    return [Identity.from_seed(bytes([i]) * 32) for i in range(1, 9)]


@pytest.fixture
def logs() -> object:
    """Structlog events emitted during the test, as dicts."""
    with structlog.testing.capture_logs() as captured:
        yield captured
