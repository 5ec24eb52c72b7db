from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio
import trio.testing

from moshpit_trio.identity import Identity
from moshpit_trio.testing import PINNED_UNIX_TIME, pin_unix_time


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


@pytest.fixture(autouse=True)
def _virtual_time_has_a_fixed_unix_phase(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a mock clock, Unix time is 1.7e9 at its first use in a test's trio run, and advances
    with trio's clock (``pin_unix_time``).

    Rounds are slots of Unix time (``dht.now()``), and the DHT fixes Unix time minus trio's
    clock at its first use in a run. Left to the wall clock, that offset gives each run's rounds
    a different phase against the virtual clock, so each run's virtual times (and their float
    rounding) differ: a test that passes here could fail on CI. Real-clock tests keep the real
    offset, since they may talk to processes that read the real one.
    """
    from moshpit_trio.dht import node

    real = node._epoch_offset

    def pinned() -> float:
        if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            return real()
        try:
            return node._EPOCH_OFFSET.get()
        except LookupError:
            # (Unix time 1.7e9 at the first use, which is deterministic under a mock clock)
            pin_unix_time(PINNED_UNIX_TIME - trio.current_time())
            return node._EPOCH_OFFSET.get()

    monkeypatch.setattr(node, "_epoch_offset", pinned)
