"""wire/liveness.py: last-heard times, unresponsive verdicts, and the progress timeout."""

from __future__ import annotations

import doctest
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moshpit_trio.identity import PeerID
from moshpit_trio.wire import liveness
from moshpit_trio.wire.liveness import MIN_PROGRESS_TIMEOUT, Liveness, progress_timeout

A, B = PeerID(bytes(32)), PeerID(bytes(31) + b"\x01")


def test_the_docstring_examples_hold() -> None:
    failures, tried = doctest.testmod(liveness)
    assert tried > 0 and failures == 0


def test_a_verdict_is_about_now_and_the_next_message_clears_it() -> None:
    live = Liveness()
    assert live.last_heard(A) == -math.inf and not live.heard_since(A, 0.0)
    live.heard(A, now=1.0)
    assert live.heard_since(A, 1.0) and not live.heard_since(A, 1.5)
    assert live.mark_unresponsive(B, now=2.0, reason="silent")
    assert not live.mark_unresponsive(B, now=3.0, reason="again")  # the first one stands
    assert live.unresponsive()[B].since == 2.0 and not live.is_unresponsive(A)
    live.heard(B, now=4.0)  # a frozen peer continued: its late messages arrive
    assert not live.is_unresponsive(B) and live.last_heard(B) == 4.0
    live.forget(A)
    assert live.last_heard(A) == -math.inf


@given(
    window=st.floats(min_value=1e-3, max_value=1e4),
    bandwidth=st.floats(min_value=1.0, max_value=1e12),
    chunk=st.integers(min_value=1, max_value=2**26),
    streams=st.integers(min_value=1, max_value=64),
)
def test_the_progress_timeout_is_never_under_the_floor_nor_over_half_the_window_above_it(
    window: float, bandwidth: float, chunk: int, streams: int
) -> None:
    t = progress_timeout(window=window, bandwidth=bandwidth, chunk=chunk, streams=streams)
    assert t >= MIN_PROGRESS_TIMEOUT
    assert t <= max(MIN_PROGRESS_TIMEOUT, window / 2)
    # four chunks at a stream's share of the bandwidth fit in it whenever the window allows
    share = bandwidth / streams
    if 4 * chunk / share <= window / 2:
        assert t >= 4 * chunk / share * (1 - 1e-12)
    # more streams sharing the link never shorten it
    assert t >= progress_timeout(window=window, bandwidth=bandwidth, chunk=chunk)


@pytest.mark.parametrize("streams", [0, -1, 1.5, True])
def test_a_bad_stream_count_is_refused(streams: object) -> None:
    with pytest.raises(ValueError, match="streams must be a positive int"):
        progress_timeout(window=10.0, bandwidth=1e6, streams=streams)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("window", "bandwidth", "chunk"), [(0.0, 1.0, 1), (1.0, -1.0, 1), (1.0, 1.0, 0)]
)
def test_a_bad_progress_timeout_argument_is_refused(
    window: float, bandwidth: float, chunk: int
) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        progress_timeout(window=window, bandwidth=bandwidth, chunk=chunk)
