"""The sans-IO access rules: token buckets, growing bans, the allowlist, flood -> ban."""

from __future__ import annotations

import doctest
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import PeerID
from moshpit_trio.wire import access as access_module
from moshpit_trio.wire.access import (
    AccessControl,
    AccessPolicy,
    BanList,
    RateLimits,
    TokenBucket,
)

P = PeerID(bytes([1]) * 32)
Q = PeerID(bytes([2]) * 32)


def test_doctests() -> None:
    assert doctest.testmod(access_module, optionflags=doctest.ELLIPSIS).failed == 0


def test_bucket_starts_full_refills_at_rate_and_caps_at_burst() -> None:
    b = TokenBucket(rate=10.0, burst=5.0, now=100.0)
    assert b.tokens(100.0) == 5.0
    assert all(b.take(1, now=100.0) for _ in range(5))
    assert not b.take(1, now=100.0)
    assert not b.take(1, now=100.05)  # half a token
    assert b.take(1, now=100.1)
    assert b.tokens(1000.0) == 5.0
    # time going backwards is ignored, not a source of tokens or debt
    assert b.tokens(0.0) == 5.0


def test_drain_floors_at_zero_and_says_whether_it_could_pay() -> None:
    b = TokenBucket(rate=1.0, burst=10.0, now=0.0)
    assert b.drain(4, now=0.0)
    assert not b.drain(100, now=0.0)
    assert b.tokens(0.0) == 0.0
    assert b.tokens(3.0) == 3.0


@pytest.mark.parametrize(
    ("rate", "burst"), [(0, 1), (1, 0), (-1, 1), (float("inf"), 1), (float("nan"), 1)]
)
def test_bucket_rejects_bad_settings(rate: float, burst: float) -> None:
    with pytest.raises(ConfigError):
        TokenBucket(rate, burst, now=0.0)


@given(
    rate=st.floats(0.01, 1e6),
    burst=st.floats(0.01, 1e6),
    ops=st.lists(
        st.tuples(st.sampled_from(["take", "drain"]), st.floats(0, 2e6), st.floats(-10.0, 1000.0)),
        max_size=60,
    ),
)
def test_bucket_never_negative_never_over_burst(
    rate: float, burst: float, ops: list[tuple[str, float, float]]
) -> None:
    b = TokenBucket(rate, burst, now=0.0)
    for op, n, t in ops:
        before = b.tokens(t)
        ok = b.take(n, t) if op == "take" else b.drain(n, t)
        after = b.tokens(t)
        assert 0.0 <= after <= burst
        slack = 1e-9 * max(1.0, n)
        assert ok == (n <= before + slack)
        if op == "take" and not ok:
            assert after == before  # a refused take takes nothing


def test_ban_durations_double_up_to_the_cap_and_expire_exactly() -> None:
    bans = BanList(base=60, cap=300)
    first = bans.ban(P, "flood", now=10.0)
    assert (first.since, first.until, first.offence) == (10.0, 70.0, 1)
    assert bans.banned(P, 69.999) == first
    assert bans.banned(P, 70.0) is None
    assert bans.banned(Q, 20.0) is None
    assert [b.duration for b in (bans.ban(P, "again", now=t) for t in (70, 190, 430))] == [
        120.0,
        240.0,
        300.0,
    ]
    assert bans.active(500.0)[0].reason == "again"


def test_offences_are_forgotten_after_a_quiet_spell() -> None:
    bans = BanList(base=60, cap=600, forget_after=100)
    bans.ban(P, "x", now=0.0)  # until 60
    assert bans.ban(P, "x", now=159.0).offence == 2  # within 100 s of the end
    # ends at 279; a new offence 100 s after that starts from the base again
    assert bans.ban(P, "x", now=379.0).duration == 60.0


def test_a_shorter_ban_never_cuts_a_longer_one() -> None:
    bans = BanList(base=60, cap=10_000)
    bans.ban(P, "a", now=0.0)
    bans.ban(P, "b", now=1.0)  # 120 s from 1
    third = bans.ban(P, "c", now=2.0)  # 240 s from 2
    assert third.until == 242.0
    bans.lift(P)
    assert bans.banned(P, 3.0) is None
    assert bans.ban(P, "d", now=3.0).offence == 1


@given(
    base=st.floats(0.001, 1e5),
    factor=st.floats(1.0, 1e4),
    offences=st.integers(1, 300),
)
def test_ban_durations_are_monotone(base: float, factor: float, offences: int) -> None:
    bans = BanList(base=base, cap=base * factor)
    durations = [bans.duration(k) for k in range(1, offences + 1)]
    assert durations[0] == base
    assert all(a <= b for a, b in itertools.pairwise(durations))
    assert all(d <= base * factor for d in durations)


@given(start=st.floats(0, 1e6), base=st.floats(0.5, 1e4))
def test_ban_expiry_is_exact(start: float, base: float) -> None:
    bans = BanList(base=base, cap=base)
    ban = bans.ban(P, "x", now=start)
    assert bans.banned(P, start) is ban
    assert bans.banned(P, ban.until) is None
    assert ban.until == start + base


def test_allowlist_admits_only_its_members() -> None:
    open_swarm = AccessControl()
    assert open_swarm.refusal(Q, 0.0) is None
    private = AccessControl(AccessPolicy(allowlist=frozenset({P})))
    assert private.refusal(P, 0.0) is None
    assert private.refusal(Q, 0.0) == "not on the allowlist of this private swarm"
    assert private.admit_call(Q, 0, 0.0) == "not on the allowlist of this private swarm"


def test_policy_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="ban_cap"):
        AccessPolicy(ban_base=100, ban_cap=10)
    with pytest.raises(ConfigError, match="PeerIDs"):
        AccessPolicy(allowlist=frozenset({"not a peer id"}))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ban_after_refusals"):
        RateLimits(ban_after_refusals=0)
    with pytest.raises(ConfigError, match="calls_per_s"):
        RateLimits(calls_per_s=0)


def test_flood_is_rate_limited_then_banned_and_the_ban_grows() -> None:
    rates = RateLimits(calls_per_s=10, call_burst=20, ban_after_refusals=5, refusal_window=10)
    acl = AccessControl(AccessPolicy(rates=rates, ban_base=60))
    verdicts = [acl.admit_call(P, 0, now=0.0) for _ in range(26)]
    assert verdicts[:20] == [None] * 20
    assert all(v is not None and v.startswith("rate limited") for v in verdicts[20:25])
    assert verdicts[25] == "banned for 60 s: rate limit exceeded again and again"
    [ban] = acl.take_new_bans()
    assert (ban.peer, ban.since, ban.until) == (P, 0.0, 60.0)
    assert acl.take_new_bans() == []
    # others are not affected
    assert acl.admit_call(Q, 0, now=0.0) is None
    assert acl.refusal(P, 59.0) is not None
    # the ban ends at its exact time; the peer starts afresh (a full bucket) ...
    assert acl.refusal(P, 60.0) is None
    assert [acl.admit_call(P, 0, now=60.0) for _ in range(20)] == [None] * 20
    # ... and a second flood bans twice as long
    for _ in range(6):
        last = acl.admit_call(P, 0, now=60.0)
    assert last == "banned for 120 s: rate limit exceeded again and again"
    assert acl.bans.banned(P, 179.9) is not None
    assert acl.bans.banned(P, 180.0) is None


def test_a_steady_caller_within_the_rate_is_never_refused() -> None:
    acl = AccessControl(AccessPolicy(rates=RateLimits(calls_per_s=10, call_burst=1)))
    assert all(acl.admit_call(P, 0, now=i / 10) is None for i in range(1000))


def test_refusals_spread_out_do_not_ban() -> None:
    rates = RateLimits(calls_per_s=1, call_burst=1, ban_after_refusals=3, refusal_window=30)
    acl = AccessControl(AccessPolicy(rates=rates))
    # one refused call every 20 s: well under 3 per 30 s
    for i in range(20):
        t = 20.0 * i
        assert acl.admit_call(P, 0, now=t) is None
        assert acl.admit_call(P, 0, now=t) is not None
    assert acl.bans.banned(P, 400.0) is None


def test_bytes_count_against_the_byte_bucket() -> None:
    rates = RateLimits(bytes_per_s=100, byte_burst=1000)
    acl = AccessControl(AccessPolicy(rates=rates))
    assert acl.admit_call(P, 1000, now=0.0) is None
    refused = acl.admit_call(P, 1, now=0.0)
    assert refused == "rate limited: too many bytes from your peer; slow down"
    assert acl.admit_call(P, 100, now=1.0) is None


def test_bad_data_bans_only_for_malformed_data() -> None:
    acl = AccessControl()
    bans = acl.bad_data([(P, "nonfinite"), (Q, "norm")], now=5.0)
    assert [(b.peer, b.reason) for b in bans] == [(P, "bad data in a round (nonfinite)")]
    assert acl.refusal(Q, 5.0) is None
    lenient = AccessControl(AccessPolicy(ban_on_bad_data=False))
    assert lenient.bad_data([(P, "length")], now=0.0) == []
