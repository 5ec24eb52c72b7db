from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from moshpit_trio.identity import Identity


@pytest.fixture
def identities() -> list[Identity]:
    """Eight fixed identities (seeds 1..8), so failures reproduce with the same PeerIDs."""
    return [Identity.from_seed(bytes([i]) * 32) for i in range(1, 9)]


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Structlog events of every level emitted during the test, as dicts.

    Whatever level an earlier test (or the library's quiet default) configured, capture all of
    them here: tests assert on info lines too.
    """
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**saved)


@pytest.fixture(autouse=True)
def _structlog_starts_unconfigured() -> Iterator[None]:
    """Each test starts with structlog unconfigured, as a fresh program does: a test that ran
    the CLI (which points logging at that test's captured stderr, closed afterwards) must not
    leave later tests logging into a closed stream."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
