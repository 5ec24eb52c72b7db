"""Moshpit All-Reduce end to end, on the in-memory network under the virtual clock."""

from __future__ import annotations

import itertools
import types
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from moshpit_trio.averaging import allreduce as allreduce_module
from moshpit_trio.averaging import compression
from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.averaging.grid import Grid, balanced_initial_keys
from moshpit_trio.averaging.matchmaking import ANSWERS_WAIT, GroupInfo, Matchmaker
from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import Identity
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.transport import TransportLimits

LATENCY = 0.005


def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(32, "big"))


@asynccontextmanager
async def swarm(
    net: MemoryNetwork, n: int, *, limits: TransportLimits | None = None
) -> AsyncIterator[list[Peer]]:
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(n):
            boot = [peers[j].address for j in range(min(len(peers), 3))]
            peers.append(
                await stack.enter_async_context(
                    open_peer(
                        ident(i + 1),
                        listen=f"h{i}:0",
                        network=net.host(f"h{i}"),
                        bootstrap=boot,  # type: ignore[arg-type]
                        limits=limits,
                    )
                )
            )
        yield peers


def check_report_is_true(
    report: RoundReport, before: dict[Any, np.ndarray], weights: dict[Any, float], now: np.ndarray
) -> None:
    """The values equal, span by span, the weighted average of exactly the members named."""
    me = report.members[report.index]
    covered = np.zeros(len(now), dtype=bool)
    for span in report.spans:
        part = slice(span.start, span.end)
        covered[part] = True
        if span.included is None:
            np.testing.assert_array_equal(now[part], before[me][part])
            continue
        w = np.array([weights[p] for p in span.included])
        expect = sum(wi * before[p][part] for wi, p in zip(w, span.included, strict=True)) / w.sum()
        np.testing.assert_allclose(now[part], expect, rtol=1e-5, atol=1e-6)
    if not report.spans:  # solo round
        np.testing.assert_array_equal(now, before[me])


@pytest.mark.parametrize(
    ("shape", "n_peers", "rounds"),
    [((4, 4), 16, 2), ((3, 3, 3), 27, 3), pytest.param((8, 8), 64, 2, marks=pytest.mark.slow)],
)
async def test_balanced_grid_reaches_the_exact_mean(
    autojump_clock: Any, shape: tuple[int, ...], n_peers: int, rounds: int
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    grid = Grid(shape)
    keys = balanced_initial_keys(grid, n_peers)
    rng = np.random.default_rng(0)
    values = [rng.normal(size=1000).astype(np.float32) for _ in range(n_peers)]
    target = np.mean(values, axis=0)
    async with swarm(net, n_peers) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(p, "exact", [v], grid=shape, initial_key=k)
            )
            for p, v, k in zip(peers, values, keys, strict=True)
        ]
        for _ in range(rounds):
            before = {p.id: v.copy() for p, v in zip(peers, values, strict=True)}
            weights = {p.id: 1.0 for p in peers}
            reports: list[RoundReport] = []
            async with trio.open_nursery() as nursery:
                for a in averagers:
                    nursery.start_soon(_step_into, a, reports)
            for report in reports:
                me = report.members[report.index]
                check_report_is_true(report, before, weights, values[peers.index(_peer(peers, me))])
                assert report.succeeded
                assert len(report.members) == shape[report.round % len(shape)]
        for v in values:
            np.testing.assert_allclose(v, target, rtol=1e-5, atol=1e-6)


async def _step_into(averager: MoshpitAverager, reports: list[RoundReport]) -> None:
    reports.append(await averager.step(timeout=30))


def _peer(peers: list[Peer], peer_id: Any) -> Peer:
    return next(p for p in peers if p.id == peer_id)


async def test_converges_with_one_peer_killed_per_round(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=2, latency=LATENCY)
    grid = Grid((4, 4))
    n = 16
    keys = balanced_initial_keys(grid, n)
    rng = np.random.default_rng(5)
    values = [rng.normal(size=200).astype(np.float32) for _ in range(n)]
    alive = list(range(n))
    spread = [float(np.var(np.stack(values), axis=0).mean())]
    async with swarm(net, n) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(p, "churn", [v], grid=(4, 4), initial_key=k)
            )
            for p, v, k in zip(peers, values, keys, strict=True)
        ]
        for round_ in range(6):
            victim = alive.pop(round_ * 5 % len(alive))
            reports: list[RoundReport] = []
            scopes: dict[int, trio.CancelScope] = {}

            async def kill_soon(
                victim: int = victim, scopes: dict[int, trio.CancelScope] = scopes
            ) -> None:
                await trio.sleep(0.05)
                net.kill(f"h{victim}")
                scopes[victim].cancel()

            async with trio.open_nursery() as nursery:
                for i in [*alive, victim]:
                    nursery.start_soon(_step_scoped, averagers[i], reports, scopes, i)
                nursery.start_soon(kill_soon)
            live = np.stack([values[i] for i in alive])
            spread.append(float(np.var(live, axis=0).mean()))
    # one death per round slows it down, but the survivors still close in on each other fast
    assert spread[-1] < 1e-3 * spread[0]


async def _step_scoped(
    averager: MoshpitAverager,
    reports: list[RoundReport],
    scopes: dict[int, trio.CancelScope],
    i: int,
) -> None:
    with trio.CancelScope() as scope:
        scopes[i] = scope
        reports.append(await averager.step(timeout=10))


async def test_round_period_aligns_peers_that_step_at_different_times(autojump_clock: Any) -> None:
    """Peers that call step() at scattered times (and one that skips a slot) still meet: each
    waits for the next slot boundary of the shared clock and takes the slot index as its round."""
    period = 10.0
    net = MemoryNetwork(seed=3, latency=LATENCY)
    values = [np.full(64, float(i), dtype=np.float32) for i in range(4)]
    async with swarm(net, 4) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(p, "slots", [v], grid=(4,), round_period=period)
            )
            for p, v in zip(peers, values, strict=True)
        ]
        clock = peers[0].dht
        # start just after a slot boundary of the shared clock, so all four starts (0-3 s
        # later) fall in one slot and the next boundary is where all of them begin
        await trio.sleep(period - clock.now() % period + 0.5)
        boundary = (int(clock.now() // period) + 1) * period
        reports: list[tuple[float, RoundReport]] = []

        async def late_step(a: MoshpitAverager, delay: float) -> None:
            await trio.sleep(delay)
            report = await a.step(timeout=5)
            reports.append((clock.now() - report.seconds["total"], report))

        async with trio.open_nursery() as nursery:
            for i, a in enumerate(averagers):
                nursery.start_soon(late_step, a, i * 1.0)
        assert {r.round for _, r in reports} == {int(boundary // period)}
        for started, r in reports:
            assert started == pytest.approx(boundary)
            assert r.succeeded and len(r.members) == 4
        for v in values:
            np.testing.assert_allclose(v, 1.5)

        # Peer 3 sits out a slot; the others step twice. All three of the others' second
        # rounds and peer 3's one round share a slot number, so it finds them there.
        async with trio.open_nursery() as nursery:
            for a in averagers[:3]:
                nursery.start_soon(_two_steps, a, reports)
            nursery.start_soon(late_step, averagers[3], period + 1.0)
        last = [r for _, r in reports[-4:]]
        assert {r.round for r in last} == {int(boundary // period) + 2}
        assert all(r.succeeded for r in last)


async def _two_steps(a: MoshpitAverager, reports: list[tuple[float, RoundReport]]) -> None:
    for _ in range(2):
        report = await a.step(timeout=5)
        reports.append((0.0, report))


@pytest.mark.parametrize("period", [0, -1.0, float("nan"), float("inf"), "10"])
async def test_round_period_must_be_positive_seconds(period: Any) -> None:
    net = MemoryNetwork(seed=4)
    async with swarm(net, 1) as peers:
        with pytest.raises(ConfigError, match="round_period"):
            MoshpitAverager(peers[0], "bad", [np.zeros(4, np.float32)], round_period=period)


@pytest.mark.parametrize("pace", [1, "yes", None])
async def test_pace_is_true_or_false(pace: Any) -> None:
    net = MemoryNetwork(seed=4)
    async with swarm(net, 1) as peers:
        with pytest.raises(ConfigError, match="pace is True or False"):
            MoshpitAverager(peers[0], "bad", [np.zeros(4, np.float32)], pace=pace)


async def test_wait_for_round_then_step_starts_at_the_boundary(autojump_clock: Any) -> None:
    period = 4.0
    net = MemoryNetwork(seed=5, latency=LATENCY)
    values = [np.full(8, float(i), dtype=np.float32) for i in range(2)]
    async with swarm(net, 2) as peers, AsyncExitStack() as stack:
        a, b = [
            await stack.enter_async_context(
                MoshpitAverager(p, "wait", [v], grid=(2,), round_period=period)
            )
            for p, v in zip(peers, values, strict=True)
        ]
        reports: list[RoundReport] = []

        async def snapshot_then_step() -> None:
            round_ = await a.wait_for_round()
            at = peers[0].dht.now()
            assert at % period == pytest.approx(0.0, abs=1e-6) or at % period == pytest.approx(
                period
            )
            assert await a.wait_for_round() == round_  # waiting again does not skip a slot
            values[0][:] = 10.0  # changed after the wait: the round must average this
            reports.append(await a.step(timeout=2))
            assert reports[-1].round == round_

        async with trio.open_nursery() as nursery:
            nursery.start_soon(snapshot_then_step)
            nursery.start_soon(_step_into, b, reports)
        assert all(r.succeeded for r in reports)
        np.testing.assert_allclose(values[0], 5.5)
        np.testing.assert_allclose(values[1], 5.5)


# ---- how a stream of encoded values is decoded (AllReduce._values) ---------------------------


class _Chunks:
    """Stands in for a StreamRequest: yields the given chunks as memoryviews."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        for chunk in self.chunks:
            await trio.lowlevel.checkpoint()
            yield memoryview(chunk)


async def _decode(codec_name: str, chunks: list[bytes], count: int) -> list[tuple[int, Any]]:
    from types import SimpleNamespace

    from moshpit_trio.averaging.allreduce import AllReduce
    from moshpit_trio.averaging.compression import codec

    fake = SimpleNamespace(codec=codec(codec_name), bytes_received=0)
    runs = AllReduce._values(fake, _Chunks(chunks), count)  # type: ignore[arg-type]
    out = [run async for run in runs]
    assert fake.bytes_received == sum(len(c) for c in chunks)
    return out


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("name", ["none", "fp16", "8bit"])
@pytest.mark.parametrize("cuts", [[], [4096], [1, 2, 3], [4097, 8191, 8195]])
async def test_values_decode_runs_whatever_the_chunk_boundaries(name: str, cuts: list[int]) -> None:
    from moshpit_trio.averaging.compression import codec

    values = np.random.default_rng(5).standard_normal(5000).astype(np.float32)
    data = codec(name).encode(values)
    runs = await _decode(name, _cut(data, cuts), len(values))
    got = np.empty_like(values)
    covered = 0
    for offset, run in runs:
        got[offset : offset + len(run)] = run
        covered += len(run)
    assert covered == len(values)
    assert np.array_equal(got, codec(name).decode(data, len(values)))
    itemsize = codec(name).itemsize
    if itemsize is None:
        assert len(runs) == 1  # a blocked codec decodes once, at the end
    else:
        # one run per chunk that completes at least one more value, as it arrives
        ends = list(itertools.accumulate(len(c) for c in _cut(data, cuts)))
        assert len(runs) == len({e // itemsize for e in ends} - {0})


@pytest.mark.parametrize("name", ["none", "8bit"])
async def test_values_refuse_too_many_or_too_few_bytes(name: str) -> None:
    from moshpit_trio.averaging.compression import codec
    from moshpit_trio.averaging.reducer import BadContribution

    data = codec(name).encode(np.ones(100, np.float32))
    for chunks in ([data, b"\0"], [data[:-1]], [data[:40], data[40:-4]], []):
        with pytest.raises(BadContribution) as info:
            await _decode(name, chunks, 100)
        assert info.value.reason == "length"


@pytest.mark.slow
async def test_paced_rounds_over_real_sockets_pace_each_member_and_lift_it_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``pace=True`` over TCP on 127.0.0.1: each member's connections to the others are paced
    at its rates for the round (``AllReduce.pacing_rates``: a third of its bandwidth to each
    in a group of four) and unpaced once the round ends; the rounds average exactly, and the
    next round does again. (In memory pacing is a no-op: test_wire_faults.)"""
    from moshpit_trio.wire.connection import Connection

    paced: list[tuple[Any, Any, float | None]] = []
    pace = Connection.pace

    def record(conn: Connection, rate: float | None) -> bool:
        done = pace(conn, rate)
        if done:
            paced.append((conn, conn.remote_peer_id, rate))
        return done

    monkeypatch.setattr(Connection, "pace", record)
    planned: list[int] = []
    plan = allreduce_module.part_chunks

    def count(size: int, chunk: int, floor: int) -> list[int]:
        planned.append(size)
        return plan(size, chunk, floor)

    monkeypatch.setattr(allreduce_module, "part_chunks", count)
    bandwidth = 1e9
    rng = np.random.default_rng(3)
    values = [rng.normal(size=200_000).astype(np.float32) for _ in range(4)]
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(4):
            boot = [str(peers[0].address)] if peers else []
            peers.append(
                await stack.enter_async_context(
                    open_peer(ident(40 + i), listen="127.0.0.1:0", bootstrap=boot)
                )
            )
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(
                    p, "paced", [v], grid=(4,), initial_key=(), bandwidth=bandwidth, pace=True
                )
            )
            for p, v in zip(peers, values, strict=True)
        ]
        for _ in range(2):
            target = np.mean(values, axis=0)
            paced.clear()
            reports: list[RoundReport] = []
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    for a in averagers:
                        nursery.start_soon(_step_into, a, reports)
            assert len(reports) == 4 and all(r.succeeded for r in reports)
            for v in values:
                np.testing.assert_allclose(v, target, rtol=1e-5, atol=1e-6)
            owner = {id(c): p.id for p in peers for c in p.transport.connections()}
            caps = [(conn, peer, rate) for conn, peer, rate in paced if rate is not None]
            # every member paced its flow to each of the three others, at a third of its link
            flows = {(owner[id(conn)], peer) for conn, peer, _ in caps}
            assert flows == {(a.id, b.id) for a in peers for b in peers if a is not b}
            assert [rate for _, _, rate in caps] == pytest.approx([bandwidth / 3] * len(caps))
            # and lifted every cap it set once its round was over
            for conn, _, _ in caps:
                assert conn.pacing is None
                assert any(c is conn and r is None for c, _, r in paced)
            # paced parts go in ramped and tapered chunks: 4 members x 3 parts of 50,000 floats
            assert planned == [200_000] * 12
            planned.clear()


async def test_pace_in_memory_changes_nothing(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In memory there is nothing to pace: with ``pace=True`` the rounds average exactly as
    without, about as fast (trio's scheduling order, not seeded here, moves it a little), and
    the parts go in plain chunks (the ramped ones are for paced connections only)."""
    planned: list[int] = []
    plan = allreduce_module.part_chunks
    monkeypatch.setattr(
        allreduce_module, "part_chunks", lambda *a: planned.append(a[0]) or plan(*a)
    )
    took = []
    for pace in (False, True):
        net = MemoryNetwork(seed=7, latency=LATENCY, bandwidth=10e6)
        values = [np.full(100_000, float(i), np.float32) for i in range(4)]
        async with swarm(net, 4) as peers, AsyncExitStack() as stack:
            averagers = [
                await stack.enter_async_context(
                    MoshpitAverager(p, "mem", [v], grid=(4,), initial_key=(), pace=pace)
                )
                for p, v in zip(peers, values, strict=True)
            ]
            reports: list[RoundReport] = []
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                for a in averagers:
                    nursery.start_soon(_step_into, a, reports)
            took.append(trio.current_time() - started)
            assert all(r.succeeded for r in reports)
            for v in values:
                np.testing.assert_array_equal(v, np.full(100_000, 1.5, np.float32))
    # 0.125-0.13 s either way: 300 kB in and out of each 10 MB/s host, plus matchmaking
    assert all(t < 0.2 for t in took) and abs(took[0] - took[1]) < 0.02
    assert planned == []


async def test_a_small_swarm_forms_its_group_in_two_round_trips(
    autojump_clock: Any,
) -> None:
    """Four peers on one group's grid: each stores its announcement on the three others it
    knows, with no lookup first (one round trip); by then the others' announcements have
    landed in its own copy, so it decides at once (no wait, no read). The leader has the
    group when the joins arrive, one way after its store; the others when the answers come
    back, a round trip after theirs. (With a lookup before the store: 25 and 30 ms; with the
    wait and the read too: 55 and 60.) Every round averages, and the next one too."""
    rtt = 2 * LATENCY
    for times in await _in_lockstep("quick", rounds=3):
        assert times == [rtt + LATENCY] + [2 * rtt] * 3, times


async def _in_lockstep(
    run_id: str, rounds: int, floats: int = 64, peers: int = 4
) -> list[list[float]]:
    """``peers`` peers on one group's grid (``(peers,)``) average ``floats`` values each,
    ``rounds`` rounds in lockstep half a second apart, after a second of bootstrap traffic.
    Every round must average the whole group to the exact mean; returned: each round's
    matchmaking times, sorted."""
    net = MemoryNetwork(seed=11, latency=LATENCY)
    values = [np.full(floats, float(i), dtype=np.float32) for i in range(peers)]
    rounds_times: list[list[float]] = []
    async with swarm(net, peers) as swarm_peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, run_id, [v], grid=(peers,)))
            for p, v in zip(swarm_peers, values, strict=True)
        ]
        await trio.sleep(1.0)  # bootstrap traffic over
        for _ in range(rounds):
            reports: list[RoundReport] = []
            async with trio.open_nursery() as nursery:
                for a in averagers:
                    nursery.start_soon(_step_into, a, reports)
            assert all(r.succeeded and len(r.members) == peers for r in reports)
            rounds_times.append(sorted(round(r.seconds["matchmaking"], 6) for r in reports))
            for v in values:
                np.testing.assert_allclose(v, (peers - 1) / 2, rtol=1e-6)
            await trio.sleep(0.5)
    return rounds_times


async def test_a_swarm_that_fits_in_one_group_stores_on_everyone_and_reads_nothing(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight peers on grid (8,): each stores its announcement on all seven others (not the
    DHT's five replicas), with no lookup first, so every peer holds every announcement and
    decides from its own copy, with no read. The store is one round trip; the leader has the
    group when the joins arrive, one way after: 15 ms; the others when the answers come back:
    20 ms. (With the store's lookup first, which asked the seven in three waves: 45 and 50 ms;
    on five replicas, three peers also waited as long as their stores took, then read: 85
    and 90 ms.)"""
    from moshpit_trio.dht.node import DHTNode

    reads: list[float] = []
    get_records = DHTNode.get_records

    async def counted(self: DHTNode, *args: Any, **kwargs: Any) -> Any:
        reads.append(trio.current_time())
        return await get_records(self, *args, **kwargs)

    stored: list[tuple[int | None, bool]] = []
    store = DHTNode.store

    async def noted(self: DHTNode, *args: Any, **kwargs: Any) -> int:
        stored.append((kwargs.get("replicas"), kwargs.get("lookup", True)))
        held = await store(self, *args, **kwargs)
        assert held == 8  # here and on all seven others
        return held

    monkeypatch.setattr(DHTNode, "get_records", counted)
    monkeypatch.setattr(DHTNode, "store", noted)
    rtt = 2 * LATENCY
    for times in await _in_lockstep("eight", rounds=3, peers=8):
        assert times == [rtt + LATENCY] + [2 * rtt] * 7, times
    assert reads == [] and stored == [(7, False)] * 24


async def test_a_leader_returns_its_group_once_every_follower_has_its_answer(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader's caller goes on to copy the whole vector (milliseconds of CPU that nothing
    interrupts) and to start the all-reduce on the connections the answers use: so the leader
    hands over its group only once every follower's answer is sealed for the wire, or that
    follower's call ended. Virtual time cannot show the copy; what the leader holds when its
    group comes back can. Three rounds, a different leader's each time perhaps, and the
    matchmaking times of the two round trips stay as they were."""
    joins: list[tuple[Matchmaker, Request]] = []
    checked: list[int] = []
    on_join, form_group = Matchmaker._on_join, Matchmaker.form_group

    async def recording_join(self: Matchmaker, request: Request) -> bytes:
        joins.append((self, request))
        return await on_join(self, request)

    async def checked_form(self: Matchmaker, *args: Any, **kwargs: Any) -> GroupInfo | None:
        group = await form_group(self, *args, **kwargs)
        if group is not None and group.leader == self.me.peer_id:
            mine = [r for m, r in joins if m is self and r.answered.is_set()]
            assert len(mine) == len(group.members) - 1 == 3
            assert all(r.answered.is_set() for m, r in joins if m is self)
            checked.append(len(mine))
            joins.clear()
        return group

    monkeypatch.setattr(Matchmaker, "_on_join", recording_join)
    monkeypatch.setattr(Matchmaker, "form_group", checked_form)
    for times in await _in_lockstep("answered", rounds=3):
        assert times == [3 * LATENCY] + [4 * LATENCY] * 3, times
    assert checked == [3, 3, 3]


async def test_a_leader_waits_for_an_answer_that_is_not_sealed_only_so_long(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer that stays unsealed (queued behind another run's bulk data, say) holds the
    leader up for ANSWERS_WAIT and no longer: the leader's matchmaking takes exactly that much
    more than the two round trips' time, the round averages, and so does the next."""
    on_join = Matchmaker._on_join

    async def one_never_sealed(self: Matchmaker, request: Request) -> bytes:
        attempt = self._attempt
        if attempt is not None and not attempt.joins:
            # besides the joins it takes, a leader holds an answer that is never sealed
            attempt.joins.append(types.SimpleNamespace(answered=trio.Event()))  # type: ignore[arg-type]
        return await on_join(self, request)

    monkeypatch.setattr(Matchmaker, "_on_join", one_never_sealed)
    for times in await _in_lockstep("unsealed", rounds=2):
        assert times == [4 * LATENCY] * 3 + [round(3 * LATENCY + ANSWERS_WAIT, 6)], times


async def test_parts_arrive_in_chunks_of_whole_values(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four peers at the default bandwidth (1e8 bytes/s, a third of it per stream) send their
    4 MB parts in two chunks each, every chunk of whole values: no reducer ever holds part
    of a value over to the next chunk, which would cost a copy of that whole chunk. (Chunks
    of a tenth of a second at the stream's share were 3,333,333 bytes, and every second
    chunk was copied.) Both rounds average exactly."""
    fed: list[tuple[int, bool]] = []
    feed = compression.ValueRuns.feed

    def recording_feed(self: compression.ValueRuns, piece: memoryview) -> Any:
        fed.append((len(piece), bool(self._held)))
        return feed(self, piece)

    monkeypatch.setattr(compression.ValueRuns, "feed", recording_feed)
    await _in_lockstep("whole", rounds=2, floats=4_000_000)
    # (pieces fed: parts' chunks, and results' values, one range of a span or two)
    sizes = [n for n, _ in fed]
    # two rounds, four reducers, three senders: a chunk of the link's size, and the rest
    assert sizes.count(3_330_048) == sizes.count(4_000_000 - 3_330_048) == 2 * 4 * 3
    assert not any(held for _, held in fed)
