"""A failed peer costs its group a moment, never the swarm: a table of faults at every stage of
a round, on the in-memory network under the virtual clock.

Each scenario kills or freezes one member of a group of four at one stage of round 1 (the
trigger is the state the round is in, polled every virtual millisecond, and the test checks the
stage was really reached). Then it checks, for every survivor:

- its values equal, span by span, what its report names (``check_report_is_true``);
- its round ended when the mechanism says it must: a kill within ``KILL_SLACK`` of the end of a
  fault-free round (the loss is news at once: nobody waits for a deadline), a freeze within the
  progress timeout of the freeze (silence is found, not waited out), never at the deadline;
- round 2 averages the three survivors together (the swarm goes on).

The freeze scenarios then continue the frozen peer (SIGCONT) and check that round 3 averages
all four again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.dht.records import key_id
from moshpit_trio.dht.routing import distance
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.peer import open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.connection import ConnectionLimits
from moshpit_trio.wire.liveness import MIN_PROGRESS_TIMEOUT
from moshpit_trio.wire.transport import TransportLimits

from .test_averager import check_report_is_true
from .test_daemon import pin_the_clock

N = 4
FLOATS = 50_000  # 200 kB: at 2 MB/s a part takes 25 ms, so every stage lasts a while
BANDWIDTH = 2e6
LATENCY = 0.005
TIMEOUT = 10.0
#: a kill: the survivors' round may outlast a fault-free round only by a few round trips
KILL_SLACK = 10 * LATENCY
#: a freeze: found after the progress timeout (0.5 s here: the floor) plus a probe's round trip
FREEZE_BOUND = MIN_PROGRESS_TIMEOUT + 10 * LATENCY


@dataclasses.dataclass
class Swarm:
    net: MemoryNetwork
    peers: list[Any]
    averagers: list[MoshpitAverager]
    values: list[np.ndarray]


# -- where a round is ---------------------------------------------------------------------------


def _round(s: Swarm, i: int) -> Any:
    rounds = list(s.averagers[i]._rounds._rounds.values())
    return rounds[0] if rounds else None


def announced(s: Swarm, v: int) -> bool:
    """Gathering: its announcement is stored, it has not decided whom to join."""
    a = s.averagers[v].matchmaker._attempt
    return a is not None and not a.decided.is_set() and _stored_anywhere(s, v)


def _stored_anywhere(s: Swarm, v: int) -> bool:
    me = s.peers[v].id.to_bytes()
    return any(
        r.subkey == me and r.key.startswith(b"mp.avg/")
        for i, p in enumerate(s.peers)
        if i != v
        for r in p.dht.records.records()
    )


def joining(s: Swarm) -> int | None:
    """A follower that has decided whom to join and sent its join, before any group is fixed
    (the leader fixes the group as soon as every expected follower is in, so this is the
    moment a join is on its way)."""
    if any(_round(s, i) is not None for i in range(N)):
        return None
    for i, a in enumerate(s.averagers):
        att = a.matchmaker._attempt
        if att is not None and att.decided.is_set() and not att.leading and att.group is None:
            return i
    return None


def leader_answering_joins(s: Swarm) -> int | None:
    """A leader that fixed its group and started its round while its answers to the joins
    are still on their way (no follower has the group yet)."""
    have = [i for i in range(N) if _round(s, i) is not None]
    if len(have) == 1 and _round(s, have[0]).group.leader == s.peers[have[0]].id.to_bytes():
        return have[0]
    return None


def leader_after_assembling(s: Swarm) -> int | None:
    """The leader of a fixed group, once a member has started the all-reduce."""
    for i in range(N):
        r = _round(s, i)
        if r is not None and r.group.leader != s.peers[i].id.to_bytes():
            return _index(s, r.group.leader)
    return None


def leading(s: Swarm) -> int | None:
    """A leader taking joins (the followers' joins are on their way or held)."""
    for i, a in enumerate(s.averagers):
        att = a.matchmaker._attempt
        if att is not None and att.leading and not att.fixed.is_set():
            return i
    return None


def _index(s: Swarm, peer_id: bytes) -> int:
    return next(i for i, p in enumerate(s.peers) if p.id.to_bytes() == peer_id)


def member(stage: Callable[[Swarm, int], bool], v: int) -> Callable[[Swarm], int | None]:
    """Member ``v`` once ``stage`` holds for it."""
    return lambda s: v if stage(s, v) else None


def anyone(stage: Callable[[Swarm, int], bool]) -> Callable[[Swarm], int | None]:
    """The first member for which ``stage`` holds."""
    return lambda s: next((v for v in range(N) if stage(s, v)), None)


def sending_parts(s: Swarm, v: int) -> bool:
    """Some reducer holds some chunks of its part, not all."""
    for i in range(N):
        r = _round(s, i)
        if i == v or r is None or r.accumulator is None:
            continue
        k = r.group.index_of(s.peers[v].id)
        if r.accumulator.delivered(k) > 0 and not r.accumulator.complete(k):
            return True
    return False


def reducing(s: Swarm, v: int) -> bool:
    """It reduces a span and has some of the others' parts, not all."""
    r = _round(s, v)
    if r is None or r.accumulator is None or r.reduced is not None:
        return False
    got = [r.accumulator.delivered(k) > 0 for k in range(N) if k != r.index]
    return any(got) and not all(r.accumulator.complete(k) for k in range(N) if k != r.index)


def sending_results(s: Swarm, v: int) -> bool:
    """It reduced its span, and its result has not reached everyone whole yet (the first
    ranges go out as they are averaged, so some may be there already)."""
    r = _round(s, v)
    if r is None or r.reduced is None:
        return False
    others = [_round(s, i) for i in range(N) if i != v]
    return any(o is not None and not o._result_complete(r.index) for o in others)


Victim = Callable[[Swarm], int | None]

# A fault in matchmaking may cost one gather poll (0.2 s) and the read after it: the others
# cannot end their gather on a full count (the victim's announcement may be missing or stale),
# so it ends when two reads a poll apart agree.
POLL = 0.2 + 0.1
# A freeze in matchmaking may also cost one DHT lookup's wait for the frozen peer before it is
# found silent (two slow_afters: DHTSettings.slow_after is 0.25 s); later lookups skip it.
LOOKUP = 2 * 0.25
# The first read of a key that a count would end waits for the others' stores, as long as our
# own took, at most a poll (Matchmaker._form): a store slowed by a frozen replica makes that
# wait a whole poll.
FIRST_READ = 0.2

# (name, who and when, action, extra seconds allowed beyond the bound, and why)
SCENARIOS: list[tuple[str, Victim, str, float]] = [
    ("kill when announced", member(announced, 3), "kill", POLL),
    ("kill when joining", joining, "kill", POLL),
    # its answers die with it: the followers' joins fail at once and they regroup, at the
    # cost of one more join and its answer (a couple of round trips)
    ("kill the leader answering the joins", leader_answering_joins, "kill", 10 * LATENCY),
    ("kill the leader after assembling", leader_after_assembling, "kill", 0.0),
    ("kill while sending parts", anyone(sending_parts), "kill", 0.0),
    ("kill while reducing", anyone(reducing), "kill", 0.0),
    ("kill while sending results", anyone(sending_results), "kill", 0.0),
    ("freeze when announced", member(announced, 3), "freeze", POLL + LOOKUP),
    ("freeze when joining", joining, "freeze", POLL + LOOKUP),
    ("freeze the leader taking joins", leading, "freeze", POLL + LOOKUP),
    ("freeze while sending parts", anyone(sending_parts), "freeze", 0.0),
    ("freeze while reducing", anyone(reducing), "freeze", 0.0),
    ("freeze while sending results", anyone(sending_results), "freeze", 0.0),
]


async def _step_all(
    s: Swarm, who: list[int], weights: list[float], timeout: float = TIMEOUT
) -> tuple[dict[int, RoundReport], dict[int, float], float]:
    reports: dict[int, RoundReport] = {}
    ended: dict[int, float] = {}
    start = trio.current_time()

    async def step(i: int) -> None:
        reports[i] = await s.averagers[i].step(weight=weights[i], timeout=timeout)
        ended[i] = trio.current_time()

    async with trio.open_nursery() as nursery:
        for i in who:
            nursery.start_soon(step, i)
    return reports, ended, start


def _check(s: Swarm, reports: dict[int, RoundReport], before: dict[PeerID, np.ndarray]) -> None:
    weights = {p.id: 1.0 + i for i, p in enumerate(s.peers)}
    for i, report in reports.items():
        check_report_is_true(report, before, weights, s.values[i])


async def _fault_free_round_seconds() -> float:
    """How long round 1 takes with nobody failing, in the same network."""
    async with _swarm() as s:
        weights = [1.0 + i for i in range(N)]
        _, ended, start = await _step_all(s, list(range(N)), weights)
        return max(ended.values()) - start


#: small chunks, so that a part (50 kB) crosses in several messages and "part of a part"
#: is a state a round can be caught in
LIMITS = TransportLimits(connection=ConnectionLimits(stream_chunk=8192, stream_window=32768))


@asynccontextmanager
async def _peers(net: MemoryNetwork) -> AsyncIterator[list[Any]]:
    async with AsyncExitStack() as stack:
        peers: list[Any] = []
        for i in range(N):
            boot = [p.address for p in peers[:3]]
            peers.append(
                await stack.enter_async_context(
                    open_peer(
                        Identity.from_seed(bytes([i + 1]) * 32),
                        listen=f"h{i}:0",
                        network=net.host(f"h{i}"),
                        bootstrap=boot,
                        limits=LIMITS,
                    )
                )
            )
        yield peers


class _swarm:
    def __init__(self) -> None:
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Swarm:
        pin_the_clock()
        net = MemoryNetwork(seed=3, latency=LATENCY, bandwidth=BANDWIDTH)
        peers = await self._stack.enter_async_context(_peers(net))
        rng = np.random.default_rng(1)
        values = [rng.normal(size=FLOATS).astype(np.float32) for _ in range(N)]
        averagers = [
            await self._stack.enter_async_context(MoshpitAverager(p, "stages", [v], grid=(N,)))
            for p, v in zip(peers, values, strict=True)
        ]
        return Swarm(net, peers, averagers, values)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


@pytest.mark.parametrize(
    ("victim", "action", "extra"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
async def test_a_fault_at_each_stage(
    autojump_clock: Any, victim: Victim, action: str, extra: float
) -> None:
    clean = await _fault_free_round_seconds()
    weights = [1.0 + i for i in range(N)]
    async with _swarm() as s:
        before = {p.id: v.copy() for p, v in zip(s.peers, s.values, strict=True)}
        fault: dict[str, Any] = {}
        reports: dict[int, RoundReport] = {}
        ended: dict[int, float] = {}
        start = trio.current_time()

        async def step(i: int, scope: trio.CancelScope) -> None:
            with scope:
                reports[i] = await s.averagers[i].step(weight=weights[i], timeout=TIMEOUT)
                ended[i] = trio.current_time()

        scopes = [trio.CancelScope() for _ in range(N)]
        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(step, i, scopes[i])
            for _ in range(int(TIMEOUT * 1000)):  # polled every virtual millisecond
                v = victim(s)
                if v is not None:
                    break
                await trio.sleep(0.001)
            else:
                raise AssertionError("the round never reached the stage")
            fault["victim"], fault["at"] = v, trio.current_time()
            if action == "kill":
                s.net.kill(f"h{v}")
                scopes[v].cancel()
            else:
                s.net.freeze(f"h{v}")
        v = fault["victim"]
        survivors = [i for i in range(N) if i != v]
        _check(s, {i: reports[i] for i in survivors}, before)
        for i in survivors:
            took = ended[i] - start
            if action == "kill":
                assert took <= clean + KILL_SLACK + extra, (i, took, clean)
            else:
                bound = FREEZE_BOUND + clean + extra
                assert ended[i] - fault["at"] <= bound, (i, ended[i], fault)
                assert took < TIMEOUT / 2, (i, took)  # found, not waited out
        # Round 2: the survivors average together, and only them.
        before = {p.id: v.copy() for p, v in zip(s.peers, s.values, strict=True)}
        reports, ended, start = await _step_all(s, survivors, weights)
        _check(s, reports, before)
        # Three of a capacity of four: the gather ends on two agreeing reads (POLL), the first
        # after the others' stores (FIRST_READ); a frozen peer some survivor has not found
        # silent yet costs one lookup's wait (LOOKUP).
        bound = clean + POLL + FIRST_READ + KILL_SLACK + (LOOKUP if action == "freeze" else 0.0)
        for i in survivors:
            assert reports[i].succeeded and len(reports[i].members) == N - 1, reports[i]
            assert ended[i] - start <= bound, (i, ended[i] - start, bound)
        if action == "freeze":
            # SIGCONT: the frozen peer's late messages arrive, its round ends, and round 3
            # averages all four again.
            s.net.thaw(f"h{v}")
            with trio.fail_after(TIMEOUT):
                while s.averagers[v].round < 1:  # noqa: ASYNC110 - its round 1 winds down
                    await trio.sleep(0.01)
            for a in s.averagers:
                a.round = max(a.round for a in s.averagers)
            before = {p.id: x.copy() for p, x in zip(s.peers, s.values, strict=True)}
            reports, ended, start = await _step_all(s, list(range(N)), weights)
            _check(s, reports, before)
            assert all(r.succeeded and len(r.members) == N for r in reports.values()), reports


# -- a frozen DHT contact -----------------------------------------------------------------------

DHT_PEERS = 8


async def test_a_frozen_dht_contact_holds_up_one_store_and_get_by_a_moment_then_none(
    autojump_clock: Any,
) -> None:
    """The peer closest to a key freezes. A store returns once another replica holds the
    record (slow_after, not the 2 s rpc_timeout); a get gives the frozen peer two slow_afters
    and goes with what answered, and marks it unresponsive; the next get does not ask it at
    all. Continued, it answers again and goes back into the routing tables."""
    pin_the_clock()
    net = MemoryNetwork(seed=5, latency=LATENCY)
    async with AsyncExitStack() as stack:
        peers: list[Any] = []
        for i in range(DHT_PEERS):
            peers.append(
                await stack.enter_async_context(
                    open_peer(
                        Identity.from_seed(bytes([40 + i]) * 32),
                        listen=f"d{i}:0",
                        network=net.host(f"d{i}"),
                        bootstrap=[p.address for p in peers[:3]],
                    )
                )
            )
        key = "bench/frozen-contact"
        target = key_id(key.encode())
        frozen = min(range(1, DHT_PEERS), key=lambda i: distance(peers[i].id, target))
        writer, reader = peers[0], peers[(frozen % (DHT_PEERS - 1)) + 1]
        assert reader is not peers[frozen]
        net.freeze(f"d{frozen}")
        slow_after = writer.dht.settings.slow_after

        start = trio.current_time()
        held = await writer.dht.store(key, b"v", ttl=60)
        took = trio.current_time() - start
        assert held >= 2  # this node and at least one live replica
        assert slow_after <= took <= slow_after + 6 * LATENCY, took

        start = trio.current_time()
        got = await reader.dht.get(key)
        first_get = trio.current_time() - start
        assert got is not None and got.value == b"v"  # type: ignore[union-attr]
        assert first_get <= 2 * slow_after + 10 * LATENCY, first_get
        # The query it stopped waiting for runs out its rpc_timeout, with not a word back.
        await trio.sleep(reader.dht.settings.rpc_timeout)
        assert reader.transport.unresponsive(peers[frozen].id)
        assert reader.dht.table.get(peers[frozen].id) is None  # dropped, no replacement needed

        start = trio.current_time()
        got = await reader.dht.get(key)
        assert got is not None and got.value == b"v"  # type: ignore[union-attr]
        assert trio.current_time() - start <= 6 * LATENCY  # nobody waited on the frozen peer

        # SIGCONT: what it owed arrives, it is heard from, and it is back.
        net.thaw(f"d{frozen}")
        await trio.sleep(1.0)
        assert not reader.transport.unresponsive(peers[frozen].id)
        await reader.dht.get(key)
        assert reader.dht.table.get(peers[frozen].id) is not None


# -- shutdown -----------------------------------------------------------------------------------


async def test_two_peers_closing_toward_each_other_take_one_round_trip(
    autojump_clock: Any,
) -> None:
    """Both ends say GOODBYE at the same instant; neither waits out its close_timeout (2 s) for
    an answer the other is also busy closing: each is done within one round trip."""
    pin_the_clock()
    latency = 0.05
    net = MemoryNetwork(seed=6, latency=latency)
    took: dict[str, float] = {}
    both_up = trio.Event()
    close_now = trio.Event()
    address: dict[str, Any] = {}

    async def peer(name: str, seed: int) -> None:
        boot = [address["a"]] if name == "b" else []
        async with open_peer(
            Identity.from_seed(bytes([seed]) * 32),
            listen=f"{name}:0",
            network=net.host(name),
            bootstrap=boot,
        ) as p:
            address[name] = p.address
            if name == "b":
                await p.dht.store("k", b"v", ttl=30)  # traffic both ways first
                both_up.set()
            await close_now.wait()
            start = trio.current_time()
        took[name] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer, "a", 61)
        while "a" not in address:  # noqa: ASYNC110 - a's address, once it listens
            await trio.sleep(0.001)
        nursery.start_soon(peer, "b", 62)
        await both_up.wait()
        close_now.set()
    assert set(took) == {"a", "b"}
    assert all(t <= 2 * latency for t in took.values()), took


# -- a member taken for frozen while it is alive -----------------------------------------------


async def test_a_member_given_up_by_mistake_is_told_by_the_cut_stream_and_does_not_wait(
    autojump_clock: Any,
) -> None:
    """A reducer takes a live member for frozen (a stall on a loaded machine can look like
    that) and gives it up mid-part. The member learns it from the reducer cutting off its
    stream, stops waiting for that reducer's result, and its round ends with the others', not
    at its deadline; every report stays true."""
    clean = await _fault_free_round_seconds()
    weights = [1.0 + i for i in range(N)]
    async with _swarm() as s:
        before = {p.id: v.copy() for p, v in zip(s.peers, s.values, strict=True)}
        reports: dict[int, RoundReport] = {}
        ended: dict[int, float] = {}
        start = trio.current_time()

        async def step(i: int) -> None:
            reports[i] = await s.averagers[i].step(weight=weights[i], timeout=TIMEOUT)
            ended[i] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(step, i)
            for _ in range(int(TIMEOUT * 1000)):
                pair = _reducer_receiving_a_part(s)
                if pair is not None:
                    break
                await trio.sleep(0.001)
            else:
                raise AssertionError("no part was ever half-way")
            reducer, member = pair
            r = _round(s, reducer)
            r._lose(r.group.index_of(s.peers[member].id), "unresponsive")  # the mistake
        _check(s, reports, before)
        gave_up = s.peers[reducer].id
        assert reports[reducer].lost == {s.peers[member].id: "unresponsive"}
        assert reports[member].lost.get(gave_up) == "withdrew", reports[member]
        for i in range(N):
            assert ended[i] <= clean + KILL_SLACK, (i, ended[i], clean)


def _reducer_receiving_a_part(s: Swarm) -> tuple[int, int] | None:
    for j in range(N):
        r = _round(s, j)
        if r is None or r.accumulator is None or r.reduced is not None:
            continue
        for i in range(N):
            k = r.group.index_of(s.peers[i].id)
            if i != j and r.accumulator.delivered(k) > 0 and not r.accumulator.complete(k):
                return j, i
    return None
