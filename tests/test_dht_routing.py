"""The routing table: XOR metric, bucket order, eviction rules, closest(), refresh bookkeeping."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from moshpit_trio.dht.routing import Contact, RoutingTable, bucket_index, distance
from moshpit_trio.identity import PeerID
from moshpit_trio.wire.address import PeerAddress

LOCAL = PeerID(bytes(range(32)))
ids = st.binary(min_size=32, max_size=32).map(PeerID)


def contact(pid: PeerID, port: int = 7070) -> Contact:
    return Contact(pid, PeerAddress("127.0.0.1", port, pid))


def at(local: PeerID, d: int) -> PeerID:
    """The id at XOR distance ``d`` from ``local``."""
    return PeerID((int(local) ^ d).to_bytes(32, "big"))


def in_bucket(index: int, n: int, local: PeerID = LOCAL) -> list[PeerID]:
    """``n`` distinct ids in bucket ``index`` of ``local`` (distances 2**index + 0, 1, 2...)."""
    return [at(local, (1 << index) + i) for i in range(n)]


# -- the metric ---------------------------------------------------------------------------------


@settings(max_examples=200)
@given(a=ids, b=ids, c=ids)
def test_xor_metric(a: PeerID, b: PeerID, c: PeerID) -> None:
    assert distance(a, b) == distance(b, a)
    assert (distance(a, b) == 0) == (a == b)
    assert distance(a, b.to_bytes()) == distance(a, b)
    # XOR composes exactly, which gives the triangle inequality (x ^ y <= x + y).
    assert distance(a, c) == distance(a, b) ^ distance(b, c)
    assert distance(a, c) <= distance(a, b) + distance(b, c)
    # Unidirectional: for a given point and distance there is exactly one other point.
    assert at(a, distance(a, b)) == b


@settings(max_examples=200)
@given(local=ids, other=ids)
def test_bucket_index_range(local: PeerID, other: PeerID) -> None:
    if local == other:
        with pytest.raises(ValueError):
            bucket_index(local, other)
        return
    i = bucket_index(local, other)
    assert 0 <= i <= 255
    assert 2**i <= distance(local, other) < 2 ** (i + 1)
    assert bucket_index(other, local) == i
    assert bucket_index(local, other.to_bytes()) == i


def test_bucket_index_edges() -> None:
    assert bucket_index(LOCAL, at(LOCAL, 1)) == 0
    assert bucket_index(LOCAL, at(LOCAL, 2**255)) == 255
    assert bucket_index(LOCAL, at(LOCAL, 2**256 - 1)) == 255
    with pytest.raises(ValueError):
        bucket_index(LOCAL, LOCAL.to_bytes())
    with pytest.raises(ValueError):
        distance(LOCAL, b"short")


def test_contact_address_must_name_the_peer() -> None:
    a, b = in_bucket(3, 2)
    with pytest.raises(ValueError, match="names another peer"):
        Contact(a, PeerAddress("127.0.0.1", 1, b))
    addr = PeerAddress("example.org", 9, a)
    assert Contact.from_address(addr) == Contact(a, addr)


# -- add, seen, failed, remove -----------------------------------------------------------------


def test_add_orders_by_last_seen_and_refreshes() -> None:
    t = RoutingTable(LOCAL, k=5)
    a, b, c = in_bucket(200, 3)
    for i, pid in enumerate((a, b, c)):
        assert t.add(contact(pid), now=float(i)) is None
    assert [x.peer_id for x in t.bucket(200)] == [a, b, c]
    # Heard from a again, at a new address: most recently seen end, address updated.
    assert t.add(contact(a, port=9999), now=10.0) is None
    assert [x.peer_id for x in t.bucket(200)] == [b, c, a]
    assert t.get(a) == contact(a, port=9999)
    assert t.last_seen(a) == 10.0
    assert len(t) == 3 and a in t and LOCAL not in t
    assert set(t) == {contact(b), contact(c), contact(a, port=9999)}
    t.seen(b, now=11.0)
    assert [x.peer_id for x in t.bucket(200)] == [c, a, b]


def test_never_adds_the_local_id() -> None:
    t = RoutingTable(LOCAL)
    with pytest.raises(ValueError):
        t.add(contact(LOCAL), now=0.0)
    # The other calls take the local id quietly: it is never in the table to act on.
    t.seen(LOCAL, 0.0)
    assert t.failed(LOCAL) is None
    t.remove(LOCAL)
    assert len(t) == 0


def test_full_bucket_returns_lru_and_caches_newcomer() -> None:
    t = RoutingTable(LOCAL, k=3)
    a, b, c, new = in_bucket(100, 4)
    for i, pid in enumerate((a, b, c)):
        t.add(contact(pid), now=float(i))
    assert t.add(contact(new), now=5.0) == contact(a)  # ping a
    assert new not in t
    assert t.replacement_cache(100) == [contact(new)]
    assert len(t.bucket(100)) == 3
    # Other buckets are not affected by this one being full.
    other = in_bucket(101, 1)[0]
    assert t.add(contact(other), now=6.0) is None
    assert other in t


def test_responsive_old_contact_is_never_evicted_for_a_newcomer() -> None:
    t = RoutingTable(LOCAL, k=2)
    a, b, new = in_bucket(50, 3)
    t.add(contact(a), 0.0)
    t.add(contact(b), 1.0)
    assert t.add(contact(new), 2.0) == contact(a)
    t.seen(a, 3.0)  # a answered the ping: it stays, and moves to the fresh end
    assert [x.peer_id for x in t.bucket(50)] == [b, a]
    assert new not in t and t.replacement_cache(50) == [contact(new)]
    # The next newcomer asks about b now, the least recently seen.
    assert t.add(contact(new), 4.0) == contact(b)
    t.seen(b, 5.0)
    assert set(x.peer_id for x in t.bucket(50)) == {a, b}
    assert t.replacement_cache(50) == [contact(new)]


def test_fresh_oldest_contact_is_not_pinged_for_a_newcomer() -> None:
    # Every contact of the full bucket was heard from within fresh_for: the newcomer waits in
    # the replacement cache and nobody is pinged; once the oldest is older than that, or has
    # failed since, the next newcomer asks about it again.
    t = RoutingTable(LOCAL, k=2, fresh_for=60.0)
    a, b, new, newer = in_bucket(40, 4)
    t.add(contact(a), 0.0)
    t.add(contact(b), 10.0)
    assert t.add(contact(new), 59.9) is None
    assert new not in t and t.replacement_cache(40) == [contact(new)]
    assert t.add(contact(newer), 60.0) == contact(a)  # a last heard 60 s ago
    t.seen(a, 61.0)
    assert t.add(contact(new), 62.0) is None  # b heard 52 s ago: fresh
    assert [x.peer_id for x in t.bucket(40)] == [b, a]
    # A failure makes a contact worth asking about, however recently it was heard from.
    u = RoutingTable(LOCAL, k=1, replacements=0, fresh_for=60.0)
    u.add(contact(a), 0.0)
    assert u.add(contact(new), 1.0) is None
    assert u.failed(a) is None and a in u  # no replacement: a stays, marked failing
    assert u.add(contact(new), 2.0) == contact(a)


def test_fresh_for_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="fresh_for"):
        RoutingTable(LOCAL, fresh_for=-1.0)


def test_failed_evicts_only_with_a_replacement() -> None:
    t = RoutingTable(LOCAL, k=2)
    a, b, new = in_bucket(7, 3)
    t.add(contact(a), 0.0)
    t.add(contact(b), 1.0)
    # No replacement: b stays, marked stale and moved to the front (next to go).
    assert t.failed(b) is None
    assert b in t and t.failures(b) == 1
    assert [x.peer_id for x in t.bucket(7)] == [b, a]
    assert t.closest(b, 5, skip_failing=True) == [contact(a)]
    assert t.failed(b) is None and t.failures(b) == 2
    # A newcomer arrives: the stale contact is the one to ping; it fails again and goes.
    assert t.add(contact(new), 2.0) == contact(b)
    assert t.failed(b) == contact(new)
    assert b not in t and new in t
    assert [x.peer_id for x in t.bucket(7)] == [a, new]
    assert t.replacement_cache(7) == []
    assert t.last_seen(new) == 2.0 and t.failures(new) == 0


def test_seen_and_add_clear_failures() -> None:
    t = RoutingTable(LOCAL, k=2)
    a, b = in_bucket(7, 2)
    t.add(contact(a), 0.0)
    t.failed(a)
    t.seen(a, 1.0)
    assert t.failures(a) == 0
    t.failed(a)
    t.add(contact(a), 2.0)
    assert t.failures(a) == 0
    assert t.failures(b) == 0 and t.last_seen(b) is None and t.get(b) is None


def test_failed_unknown_peer_leaves_the_replacement_cache() -> None:
    t = RoutingTable(LOCAL, k=1)
    a, new = in_bucket(9, 2)
    t.add(contact(a), 0.0)
    t.add(contact(new), 1.0)
    assert t.failed(new) is None
    assert t.replacement_cache(9) == []
    assert t.failed(in_bucket(10, 1)[0]) is None  # never heard of: nothing happens
    # With the cache empty, a failing a is kept.
    assert t.failed(a) is None and a in t


def test_replacement_cache_is_bounded_and_most_recent_first() -> None:
    t = RoutingTable(LOCAL, k=1, replacements=3)
    a, *rest = in_bucket(30, 6)
    t.add(contact(a), 0.0)
    for i, pid in enumerate(rest):
        assert t.add(contact(pid), float(i + 1)) == contact(a)
    assert t.replacement_cache(30) == [contact(p) for p in reversed(rest[-3:])]
    # Hearing from a cached newcomer again (add or seen) makes it the most recent.
    t.add(contact(rest[-3]), 10.0)
    assert t.replacement_cache(30)[0] == contact(rest[-3])
    t.seen(rest[-2], 11.0)
    assert t.replacement_cache(30)[0] == contact(rest[-2])
    # Eviction promotes the most recent replacement.
    assert t.failed(a) == contact(rest[-2])
    assert t.bucket(30) == [contact(rest[-2])]
    assert t.replacement_cache(30) == [contact(rest[-3]), contact(rest[-1])]


def test_no_replacement_cache() -> None:
    t = RoutingTable(LOCAL, k=1, replacements=0)
    a, b = in_bucket(30, 2)
    t.add(contact(a), 0.0)
    assert t.add(contact(b), 1.0) == contact(a)
    assert t.replacement_cache(30) == []
    assert t.failed(a) is None and a in t


def test_remove_promotes_a_replacement() -> None:
    t = RoutingTable(LOCAL, k=1)
    a, new = in_bucket(40, 2)
    t.add(contact(a), 0.0)
    t.add(contact(new), 1.0)
    t.remove(a)
    assert a not in t and new in t
    t.remove(new)
    assert len(t) == 0
    t.remove(new)  # twice is fine


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RoutingTable(LOCAL, k=0)
    with pytest.raises(ValueError):
        RoutingTable(LOCAL, replacements=-1)
    t = RoutingTable(LOCAL)
    for bad in (-1, 256):
        with pytest.raises(ValueError):
            t.bucket(bad)
        with pytest.raises(ValueError):
            t.mark_refreshed(bad, 0.0)
        with pytest.raises(ValueError):
            t.random_id_in_bucket(bad, random.Random(0))


# -- closest() ---------------------------------------------------------------------------------


@settings(max_examples=100)
@given(
    local=ids,
    others=st.lists(ids, max_size=120, unique=True),
    target=st.binary(min_size=32, max_size=32),
    count=st.integers(min_value=0, max_value=30),
    k=st.integers(min_value=1, max_value=8),
    n_exclude=st.integers(min_value=0, max_value=5),
)
def test_closest_matches_brute_force(
    local: PeerID, others: list[PeerID], target: bytes, count: int, k: int, n_exclude: int
) -> None:
    t = RoutingTable(local, k=k)
    for i, pid in enumerate(others):
        if pid != local:
            t.add(contact(pid), float(i))
    held = [c.peer_id for c in t]
    exclude = set(held[:n_exclude])
    expected = sorted((p for p in held if p not in exclude), key=lambda p: distance(p, target))
    got = t.closest(target, count, exclude=exclude)
    assert [c.peer_id for c in got] == expected[:count]
    assert t.closest(PeerID(target), count, exclude=exclude) == got


# Random ids fall almost all in the top few buckets; these spread over every distance band,
# the target too (and sometimes the local id itself), with some contacts failing.
near_distances = st.integers(min_value=0, max_value=12).flatmap(
    lambda bits: st.integers(min_value=1, max_value=(1 << (bits * 20)) - 1) if bits else st.just(1)
)


@settings(max_examples=300)
@given(
    distances=st.lists(near_distances, max_size=150, unique=True),
    target_distance=st.one_of(st.just(0), near_distances),
    count=st.integers(min_value=0, max_value=40),
    k=st.integers(min_value=1, max_value=10),
    n_exclude=st.integers(min_value=0, max_value=5),
    n_failing=st.integers(min_value=0, max_value=10),
    skip_failing=st.booleans(),
)
def test_closest_matches_brute_force_in_every_distance_band(
    distances: list[int],
    target_distance: int,
    count: int,
    k: int,
    n_exclude: int,
    n_failing: int,
    skip_failing: bool,
) -> None:
    t = RoutingTable(LOCAL, k=k)
    for i, d in enumerate(distances):
        t.add(contact(at(LOCAL, d)), float(i))
    held = [c.peer_id for c in t]
    for pid in held[-n_failing:] if n_failing else []:
        t.failed(pid)  # with a replacement waiting, it goes; without, it stays, failing
    exclude = set(held[:n_exclude])
    target = at(LOCAL, target_distance)
    kept = [
        c.peer_id
        for c in t
        if c.peer_id not in exclude and not (skip_failing and t.failures(c.peer_id))
    ]
    expected = sorted(kept, key=lambda p: distance(p, target))
    got = t.closest(target, count, exclude=exclude, skip_failing=skip_failing)
    assert [c.peer_id for c in got] == expected[:count]


# -- refresh -----------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    local=ids,
    index=st.integers(min_value=0, max_value=255),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_random_id_in_bucket(local: PeerID, index: int, seed: int) -> None:
    t = RoutingTable(local)
    target = t.random_id_in_bucket(index, random.Random(seed))
    assert len(target) == 32
    assert bucket_index(local, target) == index


def test_random_id_in_bucket_spreads_over_the_bucket() -> None:
    t = RoutingTable(LOCAL)
    rng = random.Random(1)
    targets = {t.random_id_in_bucket(250, rng) for _ in range(50)}
    assert len(targets) == 50


def test_stale_buckets() -> None:
    t = RoutingTable(LOCAL)
    assert t.stale_buckets(now=0.0, interval=600.0) == []  # nothing to refresh from
    t.add(contact(in_bucket(250, 1)[0]), 0.0)
    t.add(contact(in_bucket(255, 1)[0]), 0.0)
    # From the nearest non-empty bucket up: never refreshed, so all stale.
    assert t.stale_buckets(0.0, 600.0) == list(range(250, 256))
    for i in range(250, 256):
        t.mark_refreshed(i, 100.0)
    assert t.stale_buckets(699.0, 600.0) == []
    assert t.stale_buckets(700.0, 600.0) == list(range(250, 256))
    # A lookup for an id in a bucket refreshes it; one for the local id refreshes nothing.
    t.note_lookup(in_bucket(252, 1)[0], 650.0)
    t.note_lookup(LOCAL, 650.0)
    assert t.stale_buckets(700.0, 600.0) == [250, 251, 253, 254, 255]
    # A nearer contact widens the range.
    t.add(contact(in_bucket(248, 1)[0]), 0.0)
    assert t.stale_buckets(700.0, 600.0)[:2] == [248, 249]


# -- invariants under random operations --------------------------------------------------------

# Ids crowded into three buckets (plus a near one), so that buckets fill and caches are used.
POOL = [pid for index in (255, 254, 3) for pid in in_bucket(index, 7)] + in_bucket(0, 1)


class RoutingMachine(RuleBasedStateMachine):
    K = 3
    REPLACEMENTS = 2

    def __init__(self) -> None:
        super().__init__()
        self.table = RoutingTable(LOCAL, k=self.K, replacements=self.REPLACEMENTS)
        self.now = 0.0
        self.pending: set[PeerID] = set()  # contacts that add() asked us to ping

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    @rule(pid=st.sampled_from(POOL))
    def add(self, pid: PeerID) -> None:
        before = set(self.table)
        was_in = pid in self.table
        ping = self.table.add(contact(pid), self.tick())
        assert pid in self.table or ping is not None
        if ping is not None:
            # Full bucket: the newcomer waits, the table is unchanged, the LRU is to be pinged.
            assert not was_in and set(self.table) == before
            index = bucket_index(LOCAL, pid)
            assert ping == self.table.bucket(index)[0]
            assert self.table.replacement_cache(index)[0] == contact(pid)
            self.pending.add(ping.peer_id)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), answers=st.booleans())
    def ping_outcome(self, data: st.DataObject, answers: bool) -> None:
        pid = data.draw(st.sampled_from(sorted(self.pending)))
        self.pending.discard(pid)
        if answers:
            self.table.seen(pid, self.tick())
            return
        self.check_failed(pid)

    @rule(pid=st.sampled_from(POOL))
    def fail(self, pid: PeerID) -> None:
        self.check_failed(pid)

    def check_failed(self, pid: PeerID) -> None:
        index = bucket_index(LOCAL, pid)
        was_in = pid in self.table
        cache = self.table.replacement_cache(index)
        promoted = self.table.failed(pid)
        if was_in and cache:
            assert promoted == cache[0] and pid not in self.table and promoted.peer_id in self.table
        elif was_in:
            assert promoted is None and pid in self.table
            assert self.table.bucket(index)[0].peer_id == pid
        else:
            assert promoted is None and contact(pid) not in self.table.replacement_cache(index)

    @rule(pid=st.sampled_from(POOL))
    def remove(self, pid: PeerID) -> None:
        self.table.remove(pid)
        assert pid not in self.table

    @invariant()
    def buckets_are_consistent(self) -> None:
        seen: set[PeerID] = set()
        total = 0
        for index in range(256):
            bucket = self.table.bucket(index)
            cache = self.table.replacement_cache(index)
            assert len(bucket) <= self.K
            assert len(cache) <= self.REPLACEMENTS
            # A replacement waits only while its bucket is full.
            assert not cache or len(bucket) == self.K
            for c in bucket + cache:
                assert bucket_index(LOCAL, c.peer_id) == index
                assert c.peer_id not in seen
                seen.add(c.peer_id)
            total += len(bucket)
        assert total == len(self.table)
        assert LOCAL not in seen


RoutingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40)
TestRoutingMachine = RoutingMachine.TestCase
