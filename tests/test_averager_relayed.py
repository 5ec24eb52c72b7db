"""Client-mode peers that nobody can dial average with each other through relays.

A public relay that averages nothing, and volunteers in client mode that hold reservations on it
(``open_peer(relays=...)``): a relayed volunteer may lead a group and reduce spans when nobody in
its group listens; with a listening member there, that member leads and reduces everything, and
the relayed ones reduce nothing (their traffic through the relay stays small). In-memory
network, virtual clock: exact times where they are fixed.
"""

from __future__ import annotations

import math
import types
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from moshpit_trio.averaging.allreduce import no_span
from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.averaging.matchmaking import RELAYED_GROUP_MAX, Matchmaker, MemberInfo, _usable
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.relay_table import RelayLimits

from .test_averager import LATENCY, check_report_is_true, ident

PERIOD = 4.0
RELAY_LIMITS = RelayLimits()
TIMEOUT = 3.0


@asynccontextmanager
async def volunteers(
    net: MemoryNetwork, n_relays: int, n_clients: int, *, n_public: int = 0, relayed: bool = True
) -> AsyncIterator[tuple[list[Peer], list[Peer]]]:
    """``n_relays`` public relays (no averaging), then ``n_public`` listening peers and
    ``n_clients`` client-mode peers holding reservations on every relay (``relayed``)."""
    async with AsyncExitStack() as stack:
        relays: list[Peer] = []
        for i in range(n_relays):
            relays.append(
                await stack.enter_async_context(
                    open_peer(
                        ident(200 + i),
                        listen=f"r{i}:0",
                        network=net.host(f"r{i}"),
                        bootstrap=[r.address for r in relays[:1] if r.address is not None],
                        relay=RELAY_LIMITS,
                    )
                )
            )
        addresses = [r.address for r in relays if r.address is not None]
        averaging: list[Peer] = []
        for i in range(n_public + n_clients):
            public = i < n_public
            averaging.append(
                await stack.enter_async_context(
                    open_peer(
                        ident(100 + i),
                        listen=f"h{i}:0" if public else None,
                        client_mode=not public,
                        network=net.host(f"h{i}"),
                        bootstrap=addresses[:1],
                        relays=addresses if relayed and not public else (),
                    )
                )
            )
        yield relays, averaging


async def run_rounds(
    averagers: list[MoshpitAverager], values: list[np.ndarray], rounds: int
) -> list[list[RoundReport]]:
    """Every averager steps ``rounds`` times; each report is checked against the values."""
    by_round: list[list[RoundReport]] = [[] for _ in range(rounds)]
    for r in range(rounds):
        before = {a.peer.id: v.copy() for a, v in zip(averagers, values, strict=True)}

        async def run(a: MoshpitAverager, v: np.ndarray, into: list[RoundReport]) -> None:
            into.append(await a.step(timeout=TIMEOUT))

        async with trio.open_nursery() as nursery:
            for a, v in zip(averagers, values, strict=True):
                nursery.start_soon(run, a, v, by_round[r])
        now = {a.peer.id: v for a, v in zip(averagers, values, strict=True)}
        for report in by_round[r]:
            me = report.members[report.index]
            check_report_is_true(report, before, dict.fromkeys(before, 1.0), now[me])
    return by_round


async def test_four_volunteers_behind_nat_average_through_a_relay_that_averages_nothing(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=4, latency=LATENCY)
    values = [np.full(4096, float(i), dtype=np.float32) for i in range(4)]
    async with volunteers(net, 1, 4) as ((relay,), peers), AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "nat", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        forwarded = relay.transport.bytes_received
        start = trio.current_time()
        by_round = await run_rounds(averagers, values, 3)
        took = trio.current_time() - start
        forwarded = relay.transport.bytes_received - forwarded
        # every connection between the volunteers runs through the relay
        for p in peers:
            for q in peers:
                conn = p.transport.connection_to(q.id)
                assert conn is None or conn.via == relay.id
    # Each step waits for its slot and then takes at most its timeout: three rounds, at most
    # four periods from the first call (the first waits for the next slot).
    assert took <= 3 * PERIOD + TIMEOUT
    for reports in by_round:
        assert len(reports) == 4
        for report in reports:
            assert report.succeeded, report
            assert len(report.members) == 4
            # nobody listens: the relayed members reduce (each a non-empty span)
            assert all(s.end > s.start for s in report.spans)
            assert report.seconds["total"] <= TIMEOUT + 1e-9
    np.testing.assert_allclose(np.stack(values), 1.5)
    # 3 rounds x 4 peers x 3 parts out and 3 results back of 4 KiB each, through the relay
    assert forwarded >= 3 * 4 * 6 * 4096


async def test_a_listening_member_reduces_everything_and_the_relayed_ones_nothing(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=5, latency=LATENCY)
    values = [np.full(1024, float(i), dtype=np.float32) for i in range(4)]
    async with volunteers(net, 1, 3, n_public=1) as ((relay,), peers), AsyncExitStack() as st:
        averagers = [
            await st.enter_async_context(MoshpitAverager(p, "mix", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        through_relay = relay.transport.bytes_received
        by_round = await run_rounds(averagers, values, 2)
        through_relay = relay.transport.bytes_received - through_relay
    public = peers[0].id
    for reports in by_round:
        for report in reports:
            assert report.succeeded and len(report.members) == 4, report
            reducing = {s.reducer for s in report.spans if s.end > s.start}
            assert reducing == {public}
    np.testing.assert_allclose(np.stack(values), 1.5)
    # The volunteers dial the listening member directly: the relay forwards no tensor data
    # (its own DHT and reservation traffic only: well under one round's parts).
    assert through_relay < 3 * 1024 * 4


async def test_a_volunteer_without_a_relay_joins_a_relayed_leader(autojump_clock: Any) -> None:
    # Two relayed volunteers and one that holds no reservation: it cannot lead or be reached,
    # but it can dial the relayed leader through the relay, and reduce nothing.
    net = MemoryNetwork(seed=6, latency=LATENCY)
    values = [np.full(256, float(i), dtype=np.float32) for i in range(3)]
    async with AsyncExitStack() as stack:
        (relay,), relayed = await stack.enter_async_context(volunteers(net, 1, 2))
        assert relay.address is not None
        bare = await stack.enter_async_context(
            open_peer(
                ident(150),
                client_mode=True,
                network=net.host("bare"),
                bootstrap=[relay.address],
            )
        )
        peers = [*relayed, bare]
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "mix", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        by_round = await run_rounds(averagers, values, 2)
    for reports in by_round:
        for report in reports:
            assert report.succeeded and len(report.members) == 3, report
            reducing = {s.reducer for s in report.spans if s.end > s.start}
            assert reducing == {p.id for p in relayed}
    np.testing.assert_allclose(np.stack(values), 1.0)


async def test_when_the_relay_in_use_dies_mid_round_the_next_round_averages_through_another(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=7, latency=LATENCY)
    values = [np.full(4096, float(i), dtype=np.float32) for i in range(4)]
    async with volunteers(net, 2, 4) as ((r0, r1), peers), AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "nat", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        first = await run_rounds(averagers, values, 1)
        assert all(r.succeeded for r in first[0])
        in_use = {c.via for p in peers for c in p.transport.connections() if c.via is not None}
        # each volunteer holds both relays, in its own (rendezvous) order, and is dialed
        # through the first it publishes: the round used one relay or both
        assert in_use and in_use <= {r0.id, r1.id}
        # the next round: kill the relay carrying the most circuits a moment into its
        # all-reduce
        before = {a.peer.id: v.copy() for a, v in zip(averagers, values, strict=True)}
        cut: list[RoundReport] = []
        survivors: list[Peer] = []
        killed: list[float] = []
        ended: list[float] = []
        async with trio.open_nursery() as nursery:

            async def kill_soon() -> None:
                # the first all-reduce of the round to start (a group formed), then 10 ms
                async with trio.open_nursery() as watch:

                    async def started(a: MoshpitAverager) -> None:
                        await a._rounds._changed.wait()
                        watch.cancel_scope.cancel()

                    for a in averagers:
                        watch.start_soon(started, a)
                await trio.sleep(0.01)
                carried = {r.id: 0 for r in (r0, r1)}
                for p in peers:
                    for c in p.transport.connections():
                        if c.via is not None:
                            carried[c.via] += 1
                victim = max((r0, r1), key=lambda r: carried[r.id])
                assert carried[victim.id] > 0
                net.kill("r0" if victim is r0 else "r1")
                survivors.append(r1 if victim is r0 else r0)
                killed.append(trio.current_time())

            async def run(a: MoshpitAverager) -> None:
                cut.append(await a.step(timeout=TIMEOUT))
                ended.append(trio.current_time())

            nursery.start_soon(kill_soon)
            for a in averagers:
                nursery.start_soon(run, a)
        # The round the relay died in: every report true to the values and over by its
        # deadline; the kill did cut it (members lost each other with the relay's
        # connections; some may finish through the other relay, late).
        now_values = {a.peer.id: v for a, v in zip(averagers, values, strict=True)}
        assert len({r.round for r in cut}) == 1
        assert any(r.lost for r in cut), cut
        for report in cut:
            # (a float: the deadline is start + TIMEOUT, and the report subtracts start again)
            assert report.seconds["total"] <= TIMEOUT + 1e-9, report
            me = report.members[report.index]
            check_report_is_true(report, before, dict.fromkeys(before, 1.0), now_values[me])
        after = await run_rounds(averagers, values, 1)
        assert all(r.succeeded and len(r.members) == 4 for r in after[0]), after
        in_use = {c.via for p in peers for c in p.transport.connections() if c.via is not None}
        assert in_use == {survivors[0].id}
    np.testing.assert_allclose(np.stack(values), np.stack(values).mean(), rtol=1e-5)


def member(*, client_mode: bool, relayed: bool, address: str = "") -> MemberInfo:
    return MemberInfo(bytes(32), address, 1.0, client_mode, relayed)


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        # a listening member: client-mode ones (relayed or not) reduce nothing
        ([(False, False), (True, True), (True, False)], [False, True, True]),
        # nobody listens: the relayed ones reduce, the others nothing
        ([(True, True), (True, False), (True, True)], [False, True, False]),
        ([(True, True)], [False]),
    ],
)
def test_who_reduces(members: list[tuple[bool, bool]], expected: list[bool]) -> None:
    infos = [member(client_mode=c, relayed=r, address="" if c else "x") for c, r in members]
    assert no_span(infos) == expected


def test_a_listening_member_that_claims_a_relay_is_refused() -> None:
    # A listening peer is reached directly; "relayed" is a client-mode peer's word only.
    address = "ws://h:1/" + "a" * 52
    assert not _usable(member(client_mode=False, relayed=True, address=address))
    assert _usable(member(client_mode=True, relayed=True))


@pytest.mark.parametrize("bandwidth", [0.0, -1.0, math.nan, math.inf])
def test_an_announcement_without_a_finite_positive_bandwidth_is_refused(bandwidth: float) -> None:
    # spans() refuses an infinite bandwidth: a member announcing one would make every
    # member's all-reduce fail to start, so nobody takes it into a group.
    assert not _usable(MemberInfo(bytes(32), "", bandwidth, True, True))
    assert _usable(MemberInfo(bytes(32), "", 1e308, True, True))


async def test_a_swarm_nobody_can_dial_keeps_its_groups_within_a_relays_circuits(
    autojump_clock: Any,
) -> None:
    # 20 relayed volunteers, one relay with its default limits (16 circuits a peer): groups
    # where nobody listens hold at most RELAYED_GROUP_MAX, each pair of members opens one
    # circuit (not one each way), and idle circuits close, so every round after the cold
    # start averages, and the swarm holds the exact mean.
    net = MemoryNetwork(seed=8, latency=LATENCY)
    n = 20
    values = [np.full(64, float(i), dtype=np.float32) for i in range(n)]
    async with volunteers(net, 1, n) as ((relay,), peers), AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "nat", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        by_round = await run_rounds(averagers, values, 4)
        assert relay.transport.relay_service is not None
    for round_, reports in enumerate(by_round):
        assert all(2 <= len(r.members) <= RELAYED_GROUP_MAX for r in reports), round_
        if round_ > 0:
            assert all(r.succeeded for r in reports), round_
    np.testing.assert_allclose(np.stack(values), (n - 1) / 2, rtol=1e-6)


@pytest.mark.parametrize(
    ("verdict_at", "kept"),
    [
        (None, True),  # never found silent
        (9.0, True),  # found silent in an earlier round: its announcement now outdates that
        (10.0, False),  # found silent in this round (it may have frozen after announcing)
        (10.5, False),
    ],
)
async def test_an_announcer_found_silent_only_before_this_round_is_a_candidate_again(
    verdict_at: float | None, kept: bool
) -> None:
    # A relay that dies takes its circuits along: the peers behind it look silent for a
    # moment, and with no connection left nobody hears from them again to clear the verdict.
    # Their announcement in a later round shows them alive, and that is what counts.
    other, me = ident(60), ident(61)
    announcement = msgspec.msgpack.encode(MemberInfo(other.peer_id.to_bytes(), "", 1.0, True, True))
    record = types.SimpleNamespace(value=announcement, expiration=14.0)

    class Transport:
        relay = types.SimpleNamespace(live_reservations=list)  # it holds none

        def unresponsive_since(self, peer: object) -> float | None:
            return verdict_at if peer == other.peer_id else None

    class DHT:
        async def get_records(self, key: str) -> dict[bytes, object]:
            return {other.peer_id.to_bytes(): record}

    peer = types.SimpleNamespace(id=me.peer_id, address=None, transport=Transport(), dht=DHT())
    matchmaker = Matchmaker(peer, "r", bandwidth=1.0)
    announced = await matchmaker._announced("mp.avg/r/1/0", started=10.0)
    assert [m.peer_id for _, m in announced] == ([other.peer_id.to_bytes()] if kept else [])
