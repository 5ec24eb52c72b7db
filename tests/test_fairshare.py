"""Max-min fair bandwidth sharing (moshpit_trio/testing/fairshare.py): the allocation and the
flows over time, with plain floats for time (no trio)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.testing.fairshare import FairShare, max_min_rates


def near(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


# -- the allocation ------------------------------------------------------------------------------


def test_one_flow_gets_its_narrowest_resource() -> None:
    assert max_min_rates({"f": ["up", "down"]}, {"up": 10.0, "down": 4.0}) == {"f": 4.0}


def test_equal_flows_split_a_resource_equally() -> None:
    rates = max_min_rates({i: ["up"] for i in range(3)}, {"up": 9.0})
    assert rates == {0: 3.0, 1: 3.0, 2: 3.0}


def test_a_flow_held_back_elsewhere_leaves_the_rest_to_the_others() -> None:
    # a's upload (3) carries a->b and a->c; c's download (1) carries a->c and d->c. c's
    # download is the bottleneck of a->c and d->c (0.5 each); a->b takes what a has left.
    flows = {"ab": ["up:a"], "ac": ["up:a", "down:c"], "dc": ["down:c"]}
    rates = max_min_rates(flows, {"up:a": 3.0, "down:c": 1.0})
    assert rates == {"ab": 2.5, "ac": 0.5, "dc": 0.5}


def test_unlimited_resources_do_not_limit() -> None:
    capacity = {"link": math.inf, "up": 5.0, "free": math.inf}
    rates = max_min_rates({"f": ["link", "up"], "g": ["free"], "h": []}, capacity)
    assert rates == {"f": 5.0, "g": math.inf, "h": math.inf}


def test_a_resource_named_twice_counts_once() -> None:
    assert max_min_rates({"f": ["up", "up"], "g": ["up"]}, {"up": 2.0}) == {"f": 1.0, "g": 1.0}


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_bad_capacity(bad: float) -> None:
    with pytest.raises(ValueError, match="capacity"):
        max_min_rates({"f": ["up"]}, {"up": bad})


def test_missing_capacity() -> None:
    with pytest.raises(ValueError, match="no capacity"):
        max_min_rates({"f": ["up"]}, {})


# Random networks: hosts with an upload and a download, flows between them, some links capped.
HOSTS = 6


@st.composite
def networks(draw: st.DrawFn) -> tuple[dict[int, list[str]], dict[str, float]]:
    rate = st.one_of(st.just(math.inf), st.floats(min_value=1.0, max_value=1e9))
    capacity: dict[str, float] = {}
    for h in range(HOSTS):
        capacity[f"up{h}"] = draw(rate)
        capacity[f"down{h}"] = draw(rate)
    pairs = draw(
        st.lists(
            st.tuples(st.integers(0, HOSTS - 1), st.integers(0, HOSTS - 1)).filter(
                lambda p: p[0] != p[1]
            ),
            max_size=25,
        )
    )
    flows: dict[int, list[str]] = {}
    for i, (a, b) in enumerate(pairs):
        link = f"link{a}>{b}"
        if link not in capacity:
            capacity[link] = draw(rate)
        flows[i] = [link, f"up{a}", f"down{b}"]
    return flows, capacity


@settings(max_examples=300, deadline=None)
@given(net=networks())
def test_allocation_properties(net: tuple[dict[int, list[str]], dict[str, float]]) -> None:
    flows, capacity = net
    rates = max_min_rates(flows, capacity)
    assert set(rates) == set(flows)
    load = {r: 0.0 for r in capacity}
    for f, rs in flows.items():
        for r in rs:
            load[r] += rates[f]
    # never more than any capacity (up to rounding)
    for r, c in capacity.items():
        assert load[r] <= c * (1 + 1e-9), r
    for f, rs in flows.items():
        finite = [r for r in rs if not math.isinf(capacity[r])]
        if not finite:
            assert rates[f] == math.inf
            continue
        assert 0 < rates[f] < math.inf
        # bottlenecked: one of its resources is full and nobody on it goes faster
        assert any(
            load[r] >= capacity[r] * (1 - 1e-9)
            and all(rates[g] <= rates[f] * (1 + 1e-9) for g, gs in flows.items() if r in gs)
            for r in finite
        ), f
    # equal flows (the same resources) get exactly equal rates
    by_path: dict[tuple[str, ...], set[float]] = {}
    for f, rs in flows.items():
        by_path.setdefault(tuple(rs), set()).add(rates[f])
    assert all(len(v) == 1 for v in by_path.values())
    # the order of the flows does not matter (beyond rounding)
    reordered = max_min_rates(dict(reversed(list(flows.items()))), capacity)
    assert all(reordered[f] == pytest.approx(rates[f], rel=1e-9) for f in flows)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 40),
    capacity=st.floats(min_value=1e-3, max_value=1e12),
    others=st.lists(st.floats(min_value=1e-3, max_value=1e12), max_size=5),
)
def test_equal_flows_on_one_link_get_equal_shares(
    n: int, capacity: float, others: list[float]
) -> None:
    # n flows on one shared link, each also crossing a private resource that may be narrower
    flows = {i: ["link", f"own{i % (len(others) or 1)}"] for i in range(n)}
    caps = {"link": capacity} | {f"own{j}": c for j, c in enumerate(others or [math.inf])}
    rates = max_min_rates(flows, caps)
    for j in range(len(others) or 1):
        assert len({rates[i] for i in flows if i % (len(others) or 1) == j}) <= 1


# -- flows over time -----------------------------------------------------------------------------


def model(capacity: dict[str, float]) -> FairShare[str]:
    return FairShare(capacity.__getitem__)


def test_one_flow_over_time() -> None:
    fs = model({"up": 100.0})
    f = fs.start(["up"], 50, now=1.0)
    assert fs.dirty and f.rate == 0 and f.finish == math.inf
    assert fs.settle(1.0) == [f]
    assert (f.rate, f.finish) == (100.0, 1.5)
    assert f.left(1.25) == near(25)
    fs.stop(f, 1.5)
    assert fs.flows() == []


def test_a_flow_that_starts_when_another_is_half_done() -> None:
    fs = model({"up": 100.0})
    a = fs.start(["up"], 100, now=0.0)
    fs.settle(0.0)
    assert a.finish == 1.0
    b = fs.start(["up"], 100, now=0.5)
    fs.settle(0.5)
    # 50 bytes left of a, at 50/s; b at 50/s too until a ends, then alone
    assert (a.rate, b.rate) == (50.0, 50.0)
    assert a.finish == near(1.5)
    fs.stop(a, a.finish)
    fs.settle(a.finish)
    assert b.rate == 100.0 and b.finish == near(2.0)


def test_an_aborted_flow_gives_its_share_back() -> None:
    fs = model({"up": 100.0})
    a = fs.start(["up"], 100, now=0.0)
    b = fs.start(["up"], 100, now=0.0)
    fs.settle(0.0)
    assert a.finish == b.finish == 2.0
    b.wake_at = 2.0  # whoever waits for b sleeps until then ...
    fs.stop(a, 0.5)  # ... a is aborted with 75 bytes unsent
    assert a.left(0.5) == near(75) and a.finish == math.inf
    assert fs.settle(0.5) == [b]  # ... so b's waiter must wake: b is due sooner
    assert b.rate == 100.0 and b.finish == near(1.25)


def test_a_finished_flow_leaves_at_the_next_settle_and_its_stop_changes_nothing() -> None:
    fs = model({"up": 100.0})
    a = fs.start(["up"], 100, now=0.0)
    b = fs.start(["up"], 300, now=0.0)
    fs.settle(0.0)
    assert a.finish == 2.0
    c = fs.start(["up"], 100, now=2.0)  # at the instant a ends, before a's sender stops it
    fs.settle(2.0)
    assert not a.active and (b.rate, c.rate) == (50.0, 50.0)
    fs.stop(a, 2.0)
    assert not fs.dirty
    # at these rates: c's 100 bytes by 4.0, b's 200 left by 6.0 (sooner once c is gone)
    assert c.finish == near(4.0) and b.finish == near(6.0)


def test_unchanged_rates_keep_their_exact_finish() -> None:
    fs = model({"up:a": 3.0, "up:b": 7.0})
    a = fs.start(["up:a"], 1, now=0.0)
    fs.settle(0.0)
    finish = a.finish
    fs.start(["up:b"], 1, now=0.1)  # another component: a is not even looked at
    fs.settle(0.1)
    assert a.finish == finish == 1 / 3


def test_a_capacity_change_applies_to_flows_in_progress() -> None:
    caps = {"up": 100.0}
    fs = model(caps)
    a = fs.start(["up"], 100, now=0.0)
    fs.settle(0.0)
    caps["up"] = 50.0
    fs.touch(["up", "elsewhere"])
    fs.settle(0.5)
    assert a.finish == near(1.5)  # 50 bytes left at 50/s


def test_bad_flow_size() -> None:
    fs = model({"up": 1.0})
    for size in (0, -1, math.inf, math.nan):
        with pytest.raises(ValueError, match="size"):
            fs.start(["up"], size, now=0.0)


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    starts=st.lists(st.floats(min_value=0, max_value=50), min_size=12, max_size=12),
    capacity=st.floats(min_value=1.0, max_value=1e4),
)
def test_one_resource_is_work_conserving(
    sizes: list[int], starts: list[float], capacity: float
) -> None:
    # Flows on one resource, started at various times, each stopped when due: the resource is
    # never idle while a flow is in progress, so the last one ends exactly when the bytes
    # need, counting the idle gaps.
    fs = model({"up": capacity})
    pending = sorted(zip(starts, sizes, strict=False))
    running = []
    now = 0.0
    busy_until = 0.0  # the same, computed as a single queue
    for t, size in pending:
        busy_until = max(busy_until, t) + size / capacity
    while pending or running:
        next_start = pending[0][0] if pending else math.inf
        next_end = min((f.finish for f in running), default=math.inf)
        now = min(next_start, next_end)
        if next_end <= next_start:
            done = [f for f in running if f.finish <= now]
            for f in done:
                fs.stop(f, now)
                running.remove(f)
        else:
            t, size = pending.pop(0)
            running.append(fs.start(["up"], size, now=t))
        fs.settle(now)
        total = sum(f.rate for f in running if f.finish > now)
        assert total == pytest.approx(capacity if any(f.finish > now for f in running) else 0)
    assert now == pytest.approx(busy_until, rel=1e-9)


def test_a_resource_that_becomes_limited_or_unlimited_mid_flow() -> None:
    caps = {"link": math.inf, "up": 100.0}
    fs = model(caps)
    a = fs.start(["link", "up"], 100, now=0.0)
    fs.settle(0.0)
    assert a.rate == 100.0
    caps["link"] = 20.0
    fs.touch(["link"])
    fs.settle(0.5)
    assert a.rate == 20.0 and a.finish == near(0.5 + 50 / 20)
    caps["link"] = math.inf
    fs.touch(["link"])
    assert fs.settle(1.0) == [a]  # due sooner: its waiter must wake
    assert a.rate == 100.0 and a.finish == near(1.0 + 40 / 100)
