"""SpanAccumulator: the weighted average, all-or-nothing senders, every check with its tag, and
independence from the order chunks arrive in."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging.partition import chunk_ranges
from moshpit_trio.averaging.reducer import BadContribution, SpanAccumulator, SpanRange
from moshpit_trio.errors import ConfigError, ProtocolError

rng = np.random.default_rng(11)


def parts(senders: int, length: int) -> list[np.ndarray]:
    return [rng.standard_normal(length).astype(np.float32) for _ in range(senders)]


def deliver(
    acc: SpanAccumulator, sender: int, part: np.ndarray, weight: float, chunk: int = 7
) -> None:
    for a, b in chunk_ranges(0, len(part), chunk):
        acc.add(sender, a, part[a:b], weight)


def reference(ps: list[np.ndarray], ws: list[float]) -> np.ndarray:
    total = sum(ws)
    return sum(w / total * p.astype(np.float64) for p, w in zip(ps, ws, strict=True))


def test_weighted_average_matches_numpy() -> None:
    ps, ws = parts(5, 100), [1.0, 2.5, 0.5, 4.0, 32.0]
    acc = SpanAccumulator(100, 5)
    for s in range(5):
        deliver(acc, s, ps[s], ws[s])
        assert acc.complete(s)
    avg, included = acc.finalize()
    assert included == [0, 1, 2, 3, 4]
    assert avg.dtype == np.float32 and avg.shape == (100,)
    np.testing.assert_allclose(avg, reference(ps, ws), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1e-300, 3.0, 1e300], [0.1, 0.2, 0.7]])
def test_average_of_identical_parts_is_exact(weights: list[float]) -> None:
    # Values over many binades, subnormals included: none may move by even one ulp.
    part = (rng.standard_normal(2000) * 10.0 ** rng.integers(-40, 38, 2000)).astype(np.float32)
    acc = SpanAccumulator(2000, 3)
    for s, w in enumerate(weights):
        deliver(acc, s, part, w, chunk=333)
    avg, _ = acc.finalize()
    assert np.array_equal(avg, part)


def test_huge_weights_do_not_overflow() -> None:
    ps = parts(2, 10)
    acc = SpanAccumulator(10, 2)
    deliver(acc, 0, ps[0], 1.7e308)
    deliver(acc, 1, ps[1], 1.7e308)
    avg, _ = acc.finalize()
    np.testing.assert_allclose(avg, (ps[0] + ps[1]) / 2, rtol=1e-6)


def test_single_sender_is_copied_exactly() -> None:
    (p,) = parts(1, 50)
    acc = SpanAccumulator(50, 1)
    deliver(acc, 0, p, 3.0)
    avg, included = acc.finalize()
    assert included == [0] and np.array_equal(avg, p)
    p[:] = 0  # the result does not alias the caller's data
    assert not np.array_equal(avg, p)


def test_a_sender_that_stops_half_way_is_not_in_the_average_at_all() -> None:
    ps = parts(3, 60)
    acc = SpanAccumulator(60, 3)
    deliver(acc, 0, ps[0], 1.0)
    acc.add(1, 0, ps[1][:30], 1.0)  # half, then silence
    deliver(acc, 2, ps[2], 1.0)
    assert not acc.complete(1) and acc.delivered(1) == 30
    avg, included = acc.finalize()
    assert included == [0, 2]
    np.testing.assert_allclose(avg, reference([ps[0], ps[2]], [1.0, 1.0]), rtol=1e-6)
    assert acc.excluded == {}  # timing out is the caller's to report


def test_chunks_that_do_not_follow_chunk_ranges_still_assemble() -> None:
    (p,) = parts(1, 20)
    acc = SpanAccumulator(20, 2)
    for a, b in [(15, 20), (0, 3), (3, 4), (9, 15), (4, 9)]:
        acc.add(0, a, p[a:b], 2.0)
    acc.add(1, 0, p, 2.0)
    avg, included = acc.finalize()
    assert included == [0, 1] and np.array_equal(avg, p)


def _bad_chunks(length: int) -> list[tuple[str, Any]]:
    """(tag, function that makes sender 1 misbehave) pairs."""
    good = np.ones(length, np.float32)
    nan = good.copy()
    nan[3] = np.nan
    inf = good.copy()
    inf[-1] = -np.inf

    def duplicate(acc: SpanAccumulator) -> None:
        acc.add(1, 0, good[:8], 1.0)
        acc.add(1, 4, good[4:12], 1.0)

    def changed_weight(acc: SpanAccumulator) -> None:
        acc.add(1, 0, good[:8], 1.0)
        acc.add(1, 8, good[8:], 2.0)

    return [
        ("duplicate", duplicate),
        ("weight", changed_weight),
        ("length", lambda acc: acc.add(1, 4, good, 1.0)),  # runs past the end
        ("length", lambda acc: acc.add(1, 0, np.ones((2, 2), np.float32), 1.0)),
        ("offset", lambda acc: acc.add(1, -1, good[:2], 1.0)),
        ("offset", lambda acc: acc.add(1, length + 1, good[:0], 1.0)),
        ("offset", lambda acc: acc.add(1, 1.5, good[:2], 1.0)),
        ("nonfinite", lambda acc: acc.add(1, 0, nan, 1.0)),
        ("nonfinite", lambda acc: acc.add(1, 0, inf, 1.0)),
        ("weight", lambda acc: acc.add(1, 0, good, 0.0)),
        ("weight", lambda acc: acc.add(1, 0, good, -1.0)),
        ("weight", lambda acc: acc.add(1, 0, good, float("nan"))),
        ("weight", lambda acc: acc.add(1, 0, good, float("inf"))),
        ("weight", lambda acc: acc.add(1, 0, good, "heavy")),
        ("norm", lambda acc: acc.add(1, 0, good * 100, 1.0)),
    ]


@pytest.mark.parametrize(("tag", "misbehave"), _bad_chunks(32))
def test_each_bad_contribution_is_excluded_with_its_tag(tag: str, misbehave: Any) -> None:
    ps = parts(3, 32)
    acc = SpanAccumulator(32, 3, max_norm=50.0)
    deliver(acc, 0, ps[0], 1.0)
    with pytest.raises(BadContribution) as info:
        misbehave(acc)
    assert info.value.reason == tag and info.value.sender == 1
    assert isinstance(info.value, ProtocolError)
    assert acc.excluded == {1: tag} and not acc.complete(1) and acc.delivered(1) == 0
    # Later chunks from the excluded sender are dropped without another error.
    acc.add(1, 0, ps[1], 1.0)
    assert not acc.complete(1)
    deliver(acc, 2, ps[2], 3.0)
    avg, included = acc.finalize()
    assert included == [0, 2]
    np.testing.assert_allclose(avg, reference([ps[0], ps[2]], [1.0, 3.0]), rtol=1e-6)


def test_norm_is_checked_over_what_arrived_so_far() -> None:
    # Every chunk is under the bound on its own; the part is not: found at the chunk that takes
    # the running norm over it (sqrt(90) > 9), before a range holding it could be taken.
    acc = SpanAccumulator(100, 1, max_norm=9.0)
    part = np.ones(100, np.float32)  # norm 10
    for a in range(0, 80, 10):
        acc.add(0, a, part[a : a + 10], 1.0)
    with pytest.raises(BadContribution, match="norm"):
        acc.add(0, 80, part[80:90], 1.0)
    assert acc.excluded == {0: "norm"}
    # Huge finite values overflow a float32 sum of squares but are neither NaN nor Inf.
    acc = SpanAccumulator(4, 1, max_norm=1e30)
    acc.add(0, 0, np.full(4, 3e20, np.float32), 1.0)
    assert acc.complete(0)
    acc = SpanAccumulator(4, 1, max_norm=1e20)
    with pytest.raises(BadContribution, match="norm"):
        acc.add(0, 0, np.full(4, 3e20, np.float32), 1.0)


def test_sender_out_of_range_is_refused_without_excluding_anyone() -> None:
    acc = SpanAccumulator(4, 2)
    for sender in (-1, 2, "0"):
        with pytest.raises(BadContribution) as info:
            acc.add(sender, 0, np.ones(4, np.float32), 1.0)  # type: ignore[arg-type]
        assert info.value.reason == "sender"
    assert acc.excluded == {}


def test_exclude_drops_what_was_delivered() -> None:
    ps = parts(2, 10)
    acc = SpanAccumulator(10, 2)
    deliver(acc, 0, ps[0], 1.0)
    deliver(acc, 1, ps[1], 1.0)
    acc.exclude(1, "deadline")
    acc.exclude(1, "something else")  # the first reason stays
    assert acc.excluded == {1: "deadline"} and not acc.complete(1)
    avg, included = acc.finalize()
    assert included == [0] and np.array_equal(avg, ps[0])
    with pytest.raises(ConfigError):
        SpanAccumulator(10, 2).exclude(5, "x")


def test_finalize_with_nobody_raises_value_error() -> None:
    acc = SpanAccumulator(10, 3)
    acc.add(0, 0, np.ones(5, np.float32), 1.0)
    with pytest.raises(BadContribution):
        acc.add(1, 0, np.full(10, np.nan, np.float32), 1.0)
    acc.exclude(2, "gone")
    with pytest.raises(ValueError):
        acc.finalize()


def test_late_chunks_and_second_finalize() -> None:
    acc = SpanAccumulator(3, 2)
    acc.add(0, 0, np.ones(3, np.float32), 1.0)
    acc.finalize()
    with pytest.raises(BadContribution) as info:
        acc.add(1, 0, np.ones(3, np.float32), 1.0)
    assert info.value.reason == "late" and acc.excluded == {}
    with pytest.raises(ConfigError):
        acc.finalize()


def test_empty_span() -> None:
    acc = SpanAccumulator(0, 2)
    acc.add(1, 0, np.empty(0, np.float32), 1.0)
    assert acc.complete(1) and not acc.complete(0)
    avg, included = acc.finalize()
    assert avg.shape == (0,) and included == [1]


def test_bad_construction() -> None:
    for args, kwargs in [((-1, 2), {}), ((5, 0), {}), ((5, 2), {"max_norm": 0.0})]:
        with pytest.raises(ConfigError):
            SpanAccumulator(*args, **kwargs)


def test_read_only_views_are_accepted_and_copied() -> None:
    (p,) = parts(1, 16)
    view = np.frombuffer(p.tobytes(), dtype=np.float32)
    acc = SpanAccumulator(16, 1)
    acc.add(0, 0, view, 1.0)
    avg, _ = acc.finalize()
    assert np.array_equal(avg, p)


def test_equal_weights_take_the_sum_then_scale_path_with_the_same_result() -> None:
    ps = parts(4, 5000)
    for weights in ([2.0] * 4, [2.0, 2.0, 2.0, 2.0000001]):
        acc = SpanAccumulator(5000, 4)
        for s, p in enumerate(ps):
            deliver(acc, s, p, weights[s], chunk=999)
        avg, _ = acc.finalize()
        assert np.array_equal(avg, reference(ps, weights).astype(np.float32))


def test_unaligned_views_are_accepted() -> None:
    (p,) = parts(1, 1000)
    raw = b"x" + p.tobytes()
    view = np.frombuffer(memoryview(raw)[1:], dtype=np.float32)
    assert not view.flags.aligned
    acc = SpanAccumulator(1000, 1, max_norm=1e6)
    deliver(acc, 0, view, 1.0, chunk=300)
    avg, _ = acc.finalize()
    assert np.array_equal(avg, p)


def test_float64_values_past_float32_range_are_nonfinite() -> None:
    # 1e39 is a finite float64 but would be Inf in the float32 average: refuse it
    acc = SpanAccumulator(4, 1)
    with pytest.raises(BadContribution) as info:
        acc.add(0, 0, np.array([1.0, 2.0, 1e39, 0.0]), 1.0)
    assert info.value.reason == "nonfinite"
    assert acc.excluded == {0: "nonfinite"}


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(1, 300),
    senders=st.integers(1, 5),
    chunk=st.integers(1, 64),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_result_is_independent_of_chunk_arrival_order(
    length: int, senders: int, chunk: int, seed: int, data: st.DataObject
) -> None:
    gen = np.random.default_rng(seed)
    ps = [gen.standard_normal(length).astype(np.float32) for _ in range(senders)]
    ws = [float(w) for w in gen.uniform(0.1, 10.0, senders)]
    # Each sender either delivers everything or stops after some of its chunks.
    stops = [data.draw(st.booleans()) for _ in range(senders)]
    messages = []
    for s in range(senders):
        ranges = chunk_ranges(0, length, chunk)
        if stops[s]:
            ranges = ranges[: data.draw(st.integers(0, len(ranges) - 1))]
        messages += [(s, a, b) for a, b in ranges]
    shuffled = data.draw(st.permutations(messages))

    def run(order: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[int]] | None:
        acc = SpanAccumulator(length, senders)
        for s, a, b in order:
            acc.add(s, a, ps[s][a:b], ws[s])
        try:
            return acc.finalize()
        except ValueError:
            return None

    in_order, any_order = run(messages), run(list(shuffled))
    full = [s for s in range(senders) if not stops[s]]
    if not full:
        assert in_order is None and any_order is None
        return
    assert in_order is not None and any_order is not None
    assert in_order[1] == any_order[1] == full
    assert np.array_equal(in_order[0], any_order[0])  # bit for bit
    np.testing.assert_allclose(
        any_order[0], reference([ps[s] for s in full], [ws[s] for s in full]), rtol=1e-5, atol=1e-6
    )


# -- take(): the span averaged range by range as the parts come in -----------------------------


def test_take_averages_what_every_sender_has_delivered() -> None:
    ps = parts(3, 30)
    acc = SpanAccumulator(30, 3)
    acc.add(0, 0, ps[0], 1.0)  # whole
    acc.add(1, 0, ps[1][:20], 1.0)
    assert acc.ready() == 0 and acc.take() is None  # sender 2 has sent nothing yet
    acc.add(2, 0, ps[2][:10], 1.0)
    assert acc.ready() == 10
    assert acc.take(min_length=11) is None  # too short, and not the end
    first = acc.take()
    assert first is not None and (first.start, first.end, first.included) == (0, 10, (0, 1, 2))
    assert first.values is not None
    np.testing.assert_allclose(first.values, reference([p[:10] for p in ps], [1.0] * 3), rtol=1e-6)
    assert acc.done == 10 and acc.take() is None and not acc.finalized
    acc.add(2, 10, ps[2][10:], 1.0)
    acc.add(1, 20, ps[1][20:], 1.0)
    rest = acc.take(min_length=1000)  # the end: taken whatever its length
    assert rest is not None and (rest.start, rest.end) == (10, 30) and acc.finalized
    assert acc.take() is None
    with pytest.raises(BadContribution) as info:
        acc.add(1, 0, ps[1][:1], 1.0)
    assert info.value.reason == "late"


def test_a_sender_excluded_mid_way_is_in_the_ranges_before_and_in_none_after() -> None:
    ps = parts(3, 40)
    acc = SpanAccumulator(40, 3, max_norm=1e3)
    for s in range(3):
        acc.add(s, 0, ps[s][:20], [1.0, 2.0, 3.0][s])
    first = acc.take()
    assert first is not None and first.included == (0, 1, 2)
    acc.add(0, 20, ps[0][20:], 1.0)
    acc.add(2, 20, ps[2][20:], 3.0)
    with pytest.raises(BadContribution):
        acc.add(1, 20, np.full(20, 1e3, np.float32), 2.0)  # over the norm bound: excluded
    rest = acc.take()
    assert rest is not None and (rest.start, rest.end, rest.included) == (20, 40, (0, 2))
    assert rest.values is not None
    np.testing.assert_allclose(
        rest.values, reference([ps[0][20:], ps[2][20:]], [1.0, 3.0]), rtol=1e-6
    )
    assert acc.excluded == {1: "norm"}


def test_a_range_nobody_is_counted_for_has_no_average() -> None:
    acc = SpanAccumulator(10, 2)
    acc.add(0, 0, np.ones(4, np.float32), 1.0)
    acc.add(1, 0, np.ones(6, np.float32), 1.0)
    first = acc.take()
    assert first is not None and (first.start, first.end, first.included) == (0, 4, (0, 1))
    acc.exclude(0, "lost")
    acc.exclude(1, "late")
    rest = acc.take()
    assert rest == SpanRange(4, 10, None, ()) and acc.finalized


def test_finalize_after_take_is_refused() -> None:
    acc = SpanAccumulator(4, 1)
    acc.add(0, 0, np.ones(2, np.float32), 1.0)
    assert acc.take() is not None
    with pytest.raises(ConfigError):
        acc.finalize()


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 200),
    senders=st.integers(1, 4),
    chunk=st.integers(1, 50),
    min_length=st.integers(1, 80),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_ranges_taken_as_chunks_arrive_are_the_whole_average(
    length: int, senders: int, chunk: int, min_length: int, seed: int, data: st.DataObject
) -> None:
    """With every part delivered whole, the ranges taken along the way (in order, without gap
    or overlap, each over every sender) join into exactly what finalize() gives, bit for bit,
    whatever the order in which chunks arrive."""
    gen = np.random.default_rng(seed)
    ps = [gen.standard_normal(length).astype(np.float32) for _ in range(senders)]
    ws = [float(w) for w in gen.uniform(0.1, 10.0, senders)]
    messages = [(s, a, b) for s in range(senders) for a, b in chunk_ranges(0, length, chunk)]
    order = data.draw(st.permutations(messages))
    whole = SpanAccumulator(length, senders)
    streamed = SpanAccumulator(length, senders)
    ranges = []
    for s, a, b in order:
        whole.add(s, a, ps[s][a:b], ws[s])
        streamed.add(s, a, ps[s][a:b], ws[s])
        if (taken := streamed.take(min_length)) is not None:
            ranges.append(taken)
    assert streamed.finalized and streamed.take() is None
    assert [r.start for r in ranges] == [0] + [r.end for r in ranges[:-1]]
    assert ranges[-1].end == length
    assert all(r.included == tuple(range(senders)) for r in ranges)
    expected, _ = whole.finalize()
    joined = np.concatenate([r.values for r in ranges if r.values is not None])
    assert np.array_equal(joined, expected)


def test_no_short_rest_keeps_a_short_tail_with_the_range_before_it() -> None:
    """With no_short_rest a range is not taken while what would remain after it is shorter
    than it: a span that arrives as a 8-value chunk and a 2-value one is one range, not two;
    a long rest is still taken range by range."""
    ps = parts(2, 10)
    acc = SpanAccumulator(10, 2)
    for s in range(2):
        acc.add(s, 0, ps[s][:8], 1.0)
    assert acc.take(no_short_rest=True) is None  # [0, 8) would leave 2 < 8
    taken = acc.take()  # without it: taken
    assert taken is not None and (taken.start, taken.end) == (0, 8)
    acc = SpanAccumulator(10, 2)
    for s in range(2):
        acc.add(s, 0, ps[s][:4], 1.0)
    first = acc.take(no_short_rest=True)  # [0, 4) leaves 6 >= 4
    assert first is not None and (first.start, first.end) == (0, 4)
    for s in range(2):
        acc.add(s, 4, ps[s][4:8], 1.0)
    assert acc.take(no_short_rest=True) is None  # [4, 8) would leave 2 < 4
    for s in range(2):
        acc.add(s, 8, ps[s][8:], 1.0)
    rest = acc.take(no_short_rest=True)  # the end: taken whatever it leaves
    assert rest is not None and (rest.start, rest.end) == (4, 10) and acc.finalized


# -- chunks kept as they came (keep=True) and senders whose chunks end at different places -----


def _cuts(draw: st.DataObject, length: int) -> list[tuple[int, int]]:
    points = sorted(set(draw.draw(st.lists(st.integers(1, max(1, length - 1)), max_size=8))))
    edges = [0, *[p for p in points if 0 < p < length], length]
    return list(itertools.pairwise(edges))


@settings(max_examples=150, deadline=None)
@given(
    length=st.integers(1, 400),
    senders=st.integers(1, 5),
    equal=st.booleans(),
    min_length=st.integers(1, 100),
    seed=st.integers(0, 2**32 - 1),
    data=st.data(),
)
def test_chunks_kept_or_copied_and_cut_anywhere_average_alike(
    length: int, senders: int, equal: bool, min_length: int, seed: int, data: st.DataObject
) -> None:
    """Each sender cuts its part where it likes and hands each chunk over to be kept or has
    it copied; the chunks arrive in any order, and ranges are taken as they can be. The
    ranges join, bit for bit, into what one whole chunk per sender gives."""
    import moshpit_trio.averaging.reducer as reducer

    gen = np.random.default_rng(seed)
    ps = [gen.standard_normal(length).astype(np.float32) for _ in range(senders)]
    ws = [1.0] * senders if equal else [float(w) for w in gen.uniform(0.1, 10.0, senders)]
    messages = [
        (s, a, b, data.draw(st.booleans())) for s in range(senders) for a, b in _cuts(data, length)
    ]
    order = data.draw(st.permutations(messages))
    whole = SpanAccumulator(length, senders)
    for s in range(senders):
        whole.add(s, 0, ps[s], ws[s])
    expected, _ = whole.finalize()
    streamed = SpanAccumulator(length, senders)
    ranges = []
    # (a block shorter than the span, so that blocks and chunk ends meet in every way)
    saved, reducer._BLOCK = reducer._BLOCK, 16
    try:
        for s, a, b, keep in order:
            streamed.add(s, a, ps[s][a:b].copy(), ws[s], keep=keep)
            if (taken := streamed.take(min_length)) is not None:
                ranges.append(taken)
    finally:
        reducer._BLOCK = saved
    assert ranges and ranges[-1].end == length
    joined = np.concatenate([r.values for r in ranges if r.values is not None])
    assert np.array_equal(joined, expected)


def test_a_kept_chunk_is_held_as_it_is_and_anything_else_is_copied() -> None:
    """keep=True holds an aligned float32 chunk itself (no copy: what the all-reduce's
    received chunks and own part save); a float64, strided or unaligned one, or any chunk
    without keep, is copied, so that changing it afterwards changes nothing."""
    acc = SpanAccumulator(8, 5)
    kept = np.arange(8, dtype=np.float32)
    acc.add(0, 0, kept, 1.0, keep=True)
    wide = np.arange(8, dtype=np.float64)
    acc.add(1, 0, wide, 1.0, keep=True)
    strided = np.arange(8, dtype=np.float32).repeat(2)[::2]
    acc.add(2, 0, strided, 1.0, keep=True)
    raw = np.zeros(8 * 4 + 1, dtype=np.uint8)
    unaligned = raw[1:].view(np.float32)
    unaligned[...] = np.arange(8, dtype=np.float32)
    acc.add(3, 0, unaligned, 1.0, keep=True)
    plain = np.arange(8, dtype=np.float32)
    acc.add(4, 0, plain, 1.0)
    held = [acc._parts[s].values[0] for s in range(5)]  # type: ignore[union-attr]
    assert held[0] is kept
    assert not any(
        np.shares_memory(h, src)
        for h, src in zip(held[1:], [wide, strided, unaligned, plain], strict=True)
    )
    for src in (wide, strided, unaligned, plain):
        src[...] = -1
    avg, included = acc.finalize()
    assert included == [0, 1, 2, 3, 4]
    assert np.array_equal(avg, np.arange(8, dtype=np.float32))


def test_a_kept_chunk_that_fails_a_check_is_not_held() -> None:
    """A chunk handed over with keep=True is checked like any other: NaN in it excludes the
    sender, and nothing of it is held."""
    acc = SpanAccumulator(4, 2)
    acc.add(0, 0, np.ones(4, dtype=np.float32), 1.0, keep=True)
    bad = np.array([1.0, np.nan, 1.0, 1.0], dtype=np.float32)
    with pytest.raises(BadContribution) as error:
        acc.add(1, 0, bad, 1.0, keep=True)
    assert error.value.reason == "nonfinite" and acc.excluded == {1: "nonfinite"}
    avg, included = acc.finalize()
    assert included == [0] and np.array_equal(avg, np.ones(4, dtype=np.float32))
