"""The lookup state machine, driven over simulated networks held in plain dicts.

Each simulated peer has a real RoutingTable holding every other peer it could (k per bucket,
filled in a random order), and answers find_node like the node does: its k closest contacts to
the target, leaving out the asker. The driver below plays the network: it starts the queries
the lookup asks for, then delivers one event at a time (an answer, a failure, or a soft
timeout) in an order drawn from a seeded RNG, checking the α window after every step.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Callable, Collection, Iterable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.dht.lookup import Lookup
from moshpit_trio.dht.routing import Contact, RoutingTable, distance
from moshpit_trio.identity import PeerID
from moshpit_trio.wire.address import PeerAddress

K = 20
ALPHA = 3


def contact(pid: PeerID) -> Contact:
    return Contact(pid, PeerAddress("10.0.0.1", 7070, pid))


def near(target: bytes, d: int) -> PeerID:
    """The id at XOR distance ``d`` from ``target``."""
    return PeerID((int.from_bytes(target, "big") ^ d).to_bytes(32, "big"))


class Network:
    """``n`` peers with random ids; each knows the others through a full routing table."""

    def __init__(self, n: int, seed: int, k: int = K) -> None:
        rng = random.Random(seed)
        self.k = k
        self.ids = [PeerID(rng.randbytes(32)) for _ in range(n)]
        self.contacts = {pid: contact(pid) for pid in self.ids}
        self.tables: dict[PeerID, RoutingTable] = {}
        everyone = list(self.contacts.values())
        for pid in self.ids:
            table = RoutingTable(pid, k=k, replacements=0)
            rng.shuffle(everyone)
            for c in everyone:
                if c.peer_id != pid:
                    table.add(c, 0.0)
            self.tables[pid] = table

    def answer(self, asker: PeerID, peer: PeerID, target: bytes) -> list[Contact]:
        return self.tables[peer].closest(target, self.k, exclude={asker})

    def true_closest(
        self, target: bytes, count: int, *, without: Collection[PeerID] = ()
    ) -> list[PeerID]:
        live = (p for p in self.ids if p not in without)
        return sorted(live, key=lambda p: distance(p, target))[:count]


@functools.cache
def network_500() -> Network:
    return Network(500, seed=500)


@dataclasses.dataclass
class Run:
    steps: int = 0
    max_active: int = 0
    discovered: set[PeerID] = dataclasses.field(default_factory=set)
    asked: list[PeerID] = dataclasses.field(default_factory=list)


def drive(
    lookup: Lookup,
    answer: Callable[[PeerID], Iterable[Contact] | None],
    rng: random.Random,
    *,
    slow: Collection[PeerID] = (),
    max_steps: int = 10_000,
) -> Run:
    """Play the network until the lookup finishes.

    ``answer(peer)`` gives the peer's contacts, or None when it fails (dead, or made up).
    Peers in ``slow`` first pass their soft deadline (on_slow) and only answer once nothing
    else is in flight, as if their hard deadline were the last thing to happen.
    """
    run = Run()
    marked_slow: set[PeerID] = set()
    while not lookup.finished:
        run.asked += [c.peer_id for c in lookup.next_queries()]
        in_flight = lookup.in_flight()
        active = [p for p in in_flight if p not in marked_slow]
        assert len(active) <= lookup.alpha, "more than alpha queries hold a slot"
        run.max_active = max(run.max_active, len(active))
        assert in_flight, "not finished, yet nothing in flight and nothing to ask: stuck"
        pid = rng.choice(active or in_flight)
        if pid in slow and pid not in marked_slow:
            lookup.on_slow(pid)
            marked_slow.add(pid)
        else:
            contacts = answer(pid)
            if contacts is None:
                lookup.on_failure(pid)
            else:
                given_back = list(itertools.islice(contacts, lookup.k))
                run.discovered.update(c.peer_id for c in given_back)
                lookup.on_response(pid, given_back)
        run.steps += 1
        assert run.steps <= max_steps, "the lookup did not finish"
    return run


def ids_of(contacts: Iterable[Contact]) -> list[PeerID]:
    return [c.peer_id for c in contacts]


def assert_sorted(result: list[Contact], target: bytes) -> None:
    ds = [distance(c.peer_id, target) for c in result]
    assert ds == sorted(ds) and len(set(ds)) == len(ds)


# -- on the 500-peer network -------------------------------------------------------------------


def hop_bound(n: int, k: int = K, alpha: int = ALPHA) -> float:
    # The k closest must each be asked once: k queries. Every other query went to a peer that
    # was among the k best known when it was sent and was pushed out later by nearer ones.
    # Kademlia's argument: a peer's table covers every range around it, so its answer holds
    # peers at least one more prefix bit nearer the target (the distance halves per round),
    # and after about log2(n) rounds the lookup is among the k closest; each of those rounds
    # spends at most the alpha queries in flight on peers that the next round pushes out.
    # Hence k + alpha*log2(n): 47 for 500 peers; measured 20-25 over 600 lookups.
    return k + alpha * math.log2(n)


def test_finds_the_true_k_closest_from_a_few_seeds() -> None:
    net = network_500()
    rng = random.Random(1)
    local = net.ids[0]
    targets = [rng.randbytes(32) for _ in range(8)] + [net.ids[123].to_bytes()]
    for target in targets:
        seeds = [net.contacts[p] for p in rng.sample(net.ids[1:], 3)]
        lookup = Lookup(local, target, seeds)
        run = drive(lookup, functools.partial(net.answer, local, target=target), rng)
        result = lookup.closest()
        assert ids_of(result) == net.true_closest(target, K, without={local})
        assert_sorted(result, target)
        assert run.max_active == ALPHA
        assert lookup.queried == len(run.asked) == len(set(run.asked))
        assert lookup.queried <= hop_bound(500), lookup.queried
        assert lookup.in_flight() == [] or all(p not in ids_of(result) for p in lookup.in_flight())


def test_looking_up_an_existing_id_finds_that_peer_first() -> None:
    net = network_500()
    local, wanted = net.ids[0], net.ids[77]
    seeds = [net.contacts[p] for p in net.ids[1:4]]
    lookup = Lookup(local, wanted.to_bytes(), seeds)
    drive(lookup, lambda p: net.answer(local, p, wanted.to_bytes()), random.Random(2))
    assert lookup.closest(1) == [net.contacts[wanted]]
    assert len(lookup.closest(5)) == 5
    assert lookup.closest(0) == []


def test_seeded_from_the_local_table_takes_few_queries() -> None:
    # The usual case: seeds are the local table's k closest, so the lookup starts near.
    net = network_500()
    rng = random.Random(3)
    local = net.ids[5]
    counts = []
    for _ in range(10):
        target = rng.randbytes(32)
        lookup = Lookup(local, target, net.tables[local].closest(target, K))
        drive(lookup, functools.partial(net.answer, local, target=target), rng)
        assert ids_of(lookup.closest()) == net.true_closest(target, K, without={local})
        counts.append(lookup.queried)
    assert max(counts) <= hop_bound(500)


def test_failed_peers_are_excluded_from_the_result() -> None:
    net = network_500()
    rng = random.Random(4)
    local = net.ids[0]
    target = rng.randbytes(32)
    top = net.true_closest(target, K, without={local})
    dead = set(top[::3]) | set(rng.sample(net.ids[1:], 60))
    seeds = [net.contacts[p] for p in net.ids[1:] if p not in dead][:3]
    lookup = Lookup(local, target, seeds)
    drive(lookup, lambda p: None if p in dead else net.answer(local, p, target), rng)
    result = ids_of(lookup.closest())
    assert not dead & set(result)
    assert len(result) == K
    assert_sorted(lookup.closest(), target)
    # Every live peer among the true k closest is found (the dead ones' slots go to others).
    assert {p for p in top if p not in dead} <= set(result)
    assert set(lookup.failed()) <= dead


def test_made_up_contacts_fail_and_the_lookup_still_finds_the_truth() -> None:
    net = network_500()
    rng = random.Random(5)
    local, liar = net.ids[0], net.ids[1]
    target = rng.randbytes(32)
    # The liar answers with k ids nearer the target than anyone, owned by nobody.
    fakes = [contact(near(target, d)) for d in range(1, K + 1)]
    real = set(net.ids)

    def answer(p: PeerID) -> list[Contact] | None:
        if p not in real:
            return None  # nobody answers at a made-up id (the dial fails or times out)
        return fakes if p == liar else net.answer(local, p, target)

    lookup = Lookup(local, target, [net.contacts[liar]] + [net.contacts[p] for p in net.ids[2:4]])
    drive(lookup, answer, rng)
    assert ids_of(lookup.closest()) == net.true_closest(target, K, without={local})
    assert set(lookup.failed()) == {c.peer_id for c in fakes}


def test_a_slow_peer_frees_its_slot_and_is_waited_for_only_while_it_matters() -> None:
    net = network_500()
    local = net.ids[0]
    target = random.Random(6).randbytes(32)
    top = net.true_closest(target, K, without={local})
    seeds = [net.contacts[p] for p in net.ids[1:4]]

    # A slow peer far from the target: the lookup finishes without ever hearing from it.
    far = max(net.ids[1:4], key=lambda p: distance(p, target))
    lookup = Lookup(local, target, seeds)
    drive(
        lookup,
        lambda p: None if p == far else net.answer(local, p, target),
        random.Random(7),
        slow={far},
    )
    assert lookup.finished and far not in ids_of(lookup.closest())
    assert ids_of(lookup.closest()) == top

    # A slow peer among the k closest: the others go on in its slot; at the end the lookup
    # waits for it alone, and when its hard deadline fails it, finishes without it.
    victim = top[0]
    lookup = Lookup(local, target, seeds)
    asked_after_slow = 0
    marked = False
    rng = random.Random(8)
    while not lookup.finished:
        started = lookup.next_queries()
        if marked:
            asked_after_slow += len(started)
        in_flight = lookup.in_flight()
        if victim in in_flight and not marked:
            lookup.on_slow(victim)
            marked = True
            assert len(lookup.next_queries()) == 1  # its slot, handed on at once
            asked_after_slow += 1
            continue
        others = [p for p in in_flight if p != victim]
        if not others:
            assert in_flight == [victim]
            lookup.on_failure(victim)
            continue
        pid = rng.choice(others)
        lookup.on_response(pid, net.answer(local, pid, target))
    assert marked and asked_after_slow > 0
    assert ids_of(lookup.closest()) == net.true_closest(target, K, without={local, victim})


def test_a_slow_peer_that_answers_late_still_counts() -> None:
    net = network_500()
    local = net.ids[0]
    target = random.Random(9).randbytes(32)
    top = net.true_closest(target, K, without={local})
    lookup = Lookup(local, target, [net.contacts[p] for p in net.ids[1:4]])
    drive(lookup, lambda p: net.answer(local, p, target), random.Random(10), slow=set(top[:5]))
    assert ids_of(lookup.closest()) == top


# -- the window, event by event ----------------------------------------------------------------

TARGET = bytes(32)
LOCAL = near(TARGET, 2**255 + 12345)


def line(n: int) -> list[Contact]:
    """``n`` contacts at distances 1..n from TARGET (nearest first)."""
    return [contact(near(TARGET, d)) for d in range(1, n + 1)]


def test_alpha_is_a_sliding_window() -> None:
    peers = line(10)
    lookup = Lookup(LOCAL, TARGET, peers, k=5, alpha=3)
    first = lookup.next_queries()
    assert first == peers[:3]
    assert lookup.next_queries() == []  # all slots taken
    assert lookup.in_flight() == ids_of(peers[:3])
    # One answer frees one slot; the next candidate goes out at once, not after a round.
    lookup.on_response(peers[1].peer_id, [])
    assert lookup.next_queries() == [peers[3]]
    assert lookup.next_queries() == []
    lookup.on_slow(peers[0].peer_id)
    assert lookup.next_queries() == [peers[4]]
    # Only the window (the k=5 nearest that have not failed) is worth asking.
    lookup.on_response(peers[2].peer_id, [])
    assert lookup.next_queries() == []
    lookup.on_failure(peers[3].peer_id)
    assert lookup.next_queries() == [peers[5]]
    assert lookup.queried == 6
    assert not lookup.finished
    for p in (peers[0], peers[4], peers[5]):
        lookup.on_response(p.peer_id, [])
    assert lookup.finished
    assert lookup.closest() == [peers[i] for i in (0, 1, 2, 4, 5)]
    assert lookup.failed() == [peers[3].peer_id]
    assert lookup.next_queries() == []


def test_nearer_contacts_are_asked_first() -> None:
    peers = line(8)
    lookup = Lookup(LOCAL, TARGET, peers[5:], k=3, alpha=1)
    assert lookup.next_queries() == [peers[5]]
    lookup.on_response(peers[5].peer_id, peers[:2])
    assert lookup.next_queries() == [peers[0]]
    lookup.on_response(peers[0].peer_id, [])
    assert lookup.next_queries() == [peers[1]]
    lookup.on_response(peers[1].peer_id, [])
    assert lookup.finished
    assert lookup.closest() == [*peers[:2], peers[5]]
    assert lookup.queried == 3


def test_stray_and_duplicate_events_are_ignored() -> None:
    peers = line(6)
    lookup = Lookup(LOCAL, TARGET, peers, k=3, alpha=2)
    a, b = lookup.next_queries()
    stranger = near(TARGET, 999)
    lookup.on_response(stranger, peers)  # never asked, never heard of
    lookup.on_failure(stranger)
    lookup.on_slow(stranger)
    lookup.on_response(peers[4].peer_id, [])  # known but not asked
    lookup.on_slow(peers[4].peer_id)
    lookup.on_failure(a.peer_id)
    lookup.on_response(a.peer_id, line(1))  # late answer after a failure: ignored
    lookup.on_failure(a.peer_id)
    lookup.on_response(b.peer_id, [])
    lookup.on_response(b.peer_id, [])  # duplicate
    lookup.on_failure(b.peer_id)  # after it answered
    lookup.on_slow(b.peer_id)
    assert lookup.failed() == [a.peer_id]
    assert lookup.closest() == [b]
    assert lookup.in_flight() == []
    assert lookup.queried == 2
    assert len(lookup.next_queries()) == 2


def test_slow_then_failure_or_answer_counts() -> None:
    peers = line(4)
    lookup = Lookup(LOCAL, TARGET, peers, k=2, alpha=1)
    [a] = lookup.next_queries()
    lookup.on_slow(a.peer_id)
    lookup.on_slow(a.peer_id)  # twice frees one slot, not two
    [b] = lookup.next_queries()
    assert lookup.next_queries() == []
    assert lookup.in_flight() == [a.peer_id, b.peer_id]
    lookup.on_response(a.peer_id, [])
    assert lookup.next_queries() == []  # b still holds the only slot
    lookup.on_response(b.peer_id, [])
    assert lookup.finished and lookup.closest() == [a, b]


def test_local_skipped_and_duplicate_contacts_are_not_candidates() -> None:
    peers = line(5)
    backed_off = peers[0].peer_id
    lookup = Lookup(
        LOCAL, TARGET, [contact(LOCAL), peers[0], peers[3], peers[3]], k=4, skip={backed_off}
    )
    assert lookup.known == 1
    [only] = lookup.next_queries()
    assert only == peers[3]
    lookup.on_response(only.peer_id, [contact(LOCAL), peers[0], peers[1], peers[1], peers[3]])
    assert lookup.known == 2
    assert lookup.next_queries() == [peers[1]]


def test_a_response_adds_at_most_k_contacts() -> None:
    k = 20
    seed = contact(near(TARGET, 2**200))
    lookup = Lookup(LOCAL, TARGET, [seed], k=k)
    lookup.next_queries()
    consumed = 0

    def flood() -> Iterator[Contact]:
        nonlocal consumed
        for d in range(1, 10_001):
            consumed += 1
            yield contact(near(TARGET, d))

    lookup.on_response(seed.peer_id, flood())
    assert lookup.known == 1 + k
    assert consumed <= k  # the rest is not even looked at
    assert len(lookup.next_queries()) == 3


def test_degenerate_starts() -> None:
    # No seeds at all: finished at once, with nothing found.
    lookup = Lookup(LOCAL, TARGET, [])
    assert lookup.finished and lookup.closest() == [] and lookup.next_queries() == []
    # Only the local id and backed-off peers: the same.
    peers = line(2)
    lookup = Lookup(LOCAL, TARGET, [contact(LOCAL), *peers], skip={p.peer_id for p in peers})
    assert lookup.finished and lookup.queried == 0
    # Every seed fails: finished, empty.
    lookup = Lookup(LOCAL, TARGET, peers)
    for c in lookup.next_queries():
        lookup.on_failure(c.peer_id)
    assert lookup.finished and lookup.closest() == [] and lookup.failed() == ids_of(peers)
    # Bad arguments.
    with pytest.raises(ValueError):
        Lookup(LOCAL, TARGET, [], k=0)
    with pytest.raises(ValueError):
        Lookup(LOCAL, TARGET, [], alpha=0)
    with pytest.raises(ValueError):
        Lookup(LOCAL, b"short", [])


def test_finished_sticks() -> None:
    peers = line(5)
    lookup = Lookup(LOCAL, TARGET, peers[3:], k=2, alpha=2)
    a, b = lookup.next_queries()
    lookup.on_response(a.peer_id, [peers[0]])  # a nearer one pushes b out of the window
    assert lookup.next_queries() == [peers[0]]
    lookup.on_response(peers[0].peer_id, [])
    assert lookup.finished  # the two nearest answered; b is still out there
    assert lookup.in_flight() == [b.peer_id]  # left for the caller to cancel
    lookup.on_response(b.peer_id, peers[1:3])  # too late: ignored
    assert lookup.finished and lookup.closest() == [peers[0], a] and lookup.known == 3
    assert lookup.next_queries() == []


# -- any network, any failures, any order ------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=48),
    k=st.integers(min_value=1, max_value=8),
    alpha=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**32),
    dead_fraction=st.sampled_from([0.0, 0.0, 0.2, 0.5, 0.9]),
    liars=st.integers(min_value=0, max_value=2),
    n_skip=st.integers(min_value=0, max_value=3),
    n_slow=st.integers(min_value=0, max_value=4),
    n_seeds=st.integers(min_value=1, max_value=5),
    target_is_a_peer=st.booleans(),
)
def test_always_terminates_with_the_closest_live_peers_it_heard_of(
    n: int,
    k: int,
    alpha: int,
    seed: int,
    dead_fraction: float,
    liars: int,
    n_skip: int,
    n_slow: int,
    n_seeds: int,
    target_is_a_peer: bool,
) -> None:
    net = Network(n + 1, seed=seed, k=k)
    rng = random.Random(f"drive {seed}")  # not the network's stream: fakes must be new ids
    local, others = net.ids[0], net.ids[1:]
    target = rng.choice(others).to_bytes() if target_is_a_peer else rng.randbytes(32)
    dead = {p for p in others if rng.random() < dead_fraction}
    lying = set(rng.sample(others, min(liars, n)))
    skip = set(rng.sample(others, min(n_skip, n)))
    slow = set(rng.sample(others, min(n_slow, n)))
    made_up: set[PeerID] = set()

    def answer(p: PeerID) -> list[Contact] | None:
        if p in dead or p in made_up:
            return None
        if p in lying:
            fakes = [contact(PeerID(rng.randbytes(32))) for _ in range(k)]
            fakes += [contact(near(target, rng.randrange(1, 2**20))) for _ in range(k)]
            made_up.update(c.peer_id for c in fakes)
            rng.shuffle(fakes)
            return fakes
        return net.answer(local, p, target)

    seeds = [net.contacts[p] for p in rng.sample(others, min(n_seeds, n))]
    lookup = Lookup(local, target, seeds, k=k, alpha=alpha, skip=skip)
    # Each candidate is asked at most once and settles in at most two events (slow, then an
    # answer or a failure); candidates are the peers plus at most 2k made up per liar answer.
    bound = 2 * (n + 2 * k * len(lying)) + 1
    run = drive(lookup, answer, rng, slow=slow, max_steps=bound)

    assert lookup.finished
    assert lookup.queried == len(run.asked) == len(set(run.asked))
    assert lookup.queried <= lookup.known <= n + 2 * k * len(lying)
    assert run.max_active <= alpha
    result = lookup.closest()
    assert_sorted(result, target)
    got = ids_of(result)
    assert not set(got) & (dead | made_up | skip | {local})
    # Sound: exactly the k nearest of the live peers it heard of (seeds and answers).
    heard = ({c.peer_id for c in seeds} | run.discovered) - skip - {local} - made_up - dead
    assert got == sorted(heard, key=lambda p: distance(p, target))[:k]
    # Complete where it can be: with no dead, lying or skipped peers, any peer that an answering
    # peer knows is either found or beaten by k nearer ones.
    if not dead and not lying and not skip:
        for responder in got:
            for c in net.tables[responder]:
                if c.peer_id != local:
                    assert c.peer_id in got or (
                        len(got) == k and distance(got[-1], target) < distance(c.peer_id, target)
                    )
        if n <= k:  # every table holds every peer: the true k closest, exactly
            assert got == net.true_closest(target, k, without={local})
