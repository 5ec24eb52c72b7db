"""Faults during a round, as a table of scenarios on the in-memory network (virtual clock).

Every scenario checks, for every peer that survives: its step returned by its deadline, and its
values equal — span by span — the weighted average of exactly the members its report names.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging import allreduce as allreduce_module
from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.averaging.grid import Grid, next_key
from moshpit_trio.errors import ConfigError, MoshpitError, Rejected
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.peer import Peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.connection import ConnectionLimits
from moshpit_trio.wire.transport import TransportLimits

from .test_averager import check_report_is_true, swarm

TIMEOUT = 10.0
FLOATS = 50_000


@dataclass
class Round:
    net: MemoryNetwork
    peers: list[Peer]
    averagers: list[MoshpitAverager]
    values: list[np.ndarray]
    weights: list[float]
    reports: dict[int, RoundReport] = field(default_factory=dict)
    returned_at: dict[int, float] = field(default_factory=dict)
    #: peers the fault took out of the round; their results are not checked
    gone: set[int] = field(default_factory=set)
    cancel_scopes: dict[int, trio.CancelScope] = field(default_factory=dict)


Fault = Callable[[Round], Awaitable[None]]


async def run_round(
    n: int,
    fault: Fault | None,
    *,
    grid: tuple[int, ...] = (4,),
    bandwidth: float | None = None,
    prepare: Callable[[Round], None] | None = None,
) -> Round:
    net = MemoryNetwork(seed=3, latency=0.005, bandwidth=bandwidth)
    rng = np.random.default_rng(1)
    async with swarm(net, n) as peers, AsyncExitStack() as stack:
        values = [rng.normal(size=FLOATS).astype(np.float32) for _ in range(n)]
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "faults", [v], grid=grid))
            for p, v in zip(peers, values, strict=True)
        ]
        r = Round(net, peers, averagers, values, [1.0 + i for i in range(n)])
        if prepare is not None:
            prepare(r)
        before = {p.id: v.copy() for p, v in zip(peers, values, strict=True)}
        start = trio.current_time()

        async def step(i: int) -> None:
            with trio.CancelScope() as scope:
                r.cancel_scopes[i] = scope
                r.reports[i] = await averagers[i].step(weight=r.weights[i], timeout=TIMEOUT)
                r.returned_at[i] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(step, i)
            if fault is not None:
                nursery.start_soon(fault, r)
        weights = {p.id: w for p, w in zip(peers, r.weights, strict=True)}
        for i in range(n):
            if i in r.gone:
                continue
            assert r.returned_at[i] <= TIMEOUT + 1e-9, f"peer {i} returned late"
            check_report_is_true(r.reports[i], before, weights, values[i])
        return r


def kill_at(delay: float, *victims: int) -> Fault:
    async def fault(r: Round) -> None:
        await trio.sleep(delay)
        for i in victims:
            r.gone.add(i)
            r.net.kill(f"h{i}")
            r.cancel_scopes[i].cancel()

    return fault


def freeze_at(delay: float, victim: int) -> Fault:
    async def fault(r: Round) -> None:
        await trio.sleep(delay)
        r.gone.add(victim)
        r.net.freeze(f"h{victim}")

    return fault


def cancel_at(delay: float, victim: int) -> Fault:
    async def fault(r: Round) -> None:
        await trio.sleep(delay)
        r.gone.add(victim)
        r.cancel_scopes[victim].cancel()

    return fault


def partition_at(delay: float, side: list[int]) -> Fault:
    async def fault(r: Round) -> None:
        await trio.sleep(delay)
        r.net.partition([f"h{i}" for i in side])

    return fault


def survivors_agree_on_spans(r: Round) -> None:
    """Any two survivors that got span j's result name the same members for it."""
    seen: dict[int, tuple[PeerID, ...]] = {}
    for i, report in r.reports.items():
        if i in r.gone:
            continue
        for span in report.spans:
            if span.included is not None:
                assert seen.setdefault(span.start, span.included) == span.included


# (scenario, fault, peers, network bandwidth or None)
SCENARIOS: list[tuple[str, Fault | None, int, float | None]] = [
    ("no fault", None, 4, None),
    ("dies before matchmaking", kill_at(0.0, 3), 4, None),
    ("dies during matchmaking", kill_at(0.02, 2), 4, None),
    ("dies mid-send", kill_at(0.3, 1), 4, 2e6),
    ("dies mid-reduce", kill_at(0.6, 0), 4, 2e6),
    ("frozen mid-round", freeze_at(0.3, 2), 4, 2e6),
    ("cancels its step", cancel_at(0.3, 3), 4, 2e6),
    ("partition mid-round", partition_at(0.3, [0, 1]), 4, 2e6),
    ("two die at once", kill_at(0.3, 1, 2), 4, 2e6),
]


@pytest.mark.parametrize(
    ("fault", "n", "bandwidth"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
async def test_round_with_a_fault(
    autojump_clock: Any, fault: Fault | None, n: int, bandwidth: float | None
) -> None:
    r = await run_round(n, fault, bandwidth=bandwidth)
    survivors_agree_on_spans(r)
    if fault is None:
        assert all(rep.succeeded for rep in r.reports.values())


async def test_leader_dies_after_assembling(autojump_clock: Any) -> None:
    async def kill_leader(r: Round) -> None:
        # wait until some group is fixed, then kill its leader
        while not any(a._rounds._rounds for a in r.averagers):  # noqa: ASYNC110 - polls state
            await trio.sleep(0.001)
        leader = next(
            iter(next(a for a in r.averagers if a._rounds._rounds)._rounds._rounds.values())
        )
        victim = next(i for i, p in enumerate(r.peers) if p.id.to_bytes() == leader.group.leader)
        r.gone.add(victim)
        r.net.kill(f"h{victim}")
        r.cancel_scopes[victim].cancel()

    r = await run_round(4, kill_leader, bandwidth=2e6)
    survivors_agree_on_spans(r)


async def test_nan_from_one_peer_is_excluded_and_named(autojump_clock: Any) -> None:
    def poison(r: Round) -> None:
        r.values[2][10] = np.nan

    r = await run_round(4, None, prepare=poison)
    bad = r.peers[2].id
    poisoned_reducer = None
    for report in r.reports.values():
        for span in report.spans:
            if span.start <= 10 < span.end and span.included is not None:
                # the span holding the NaN averages everyone else, and not the NaN
                assert bad not in span.included and len(span.included) == 3
                poisoned_reducer = span.reducer
            elif span.included is not None:
                assert bad in span.included  # its other spans were fine, and count
        assert np.all(
            np.isfinite(r.values[r.peers.index(_by_id(r, report.members[report.index]))][:20])
            | (report.members[report.index] == bad)
        )
    assert poisoned_reducer is not None
    reducer_report = r.reports[r.peers.index(_by_id(r, poisoned_reducer))]
    assert reducer_report.excluded == {bad: "nonfinite"}


def _by_id(r: Round, peer_id: PeerID) -> Peer:
    return next(p for p in r.peers if p.id == peer_id)


@pytest.mark.parametrize("lie", ["wrong length", "too long", "duplicate part"])
async def test_lying_sender_is_excluded(autojump_clock: Any, lie: str, monkeypatch: Any) -> None:
    def prepare(r: Round) -> None:
        liar = r.averagers[1]
        real_send = allreduce_module.AllReduce._send_part

        async def send_part(
            self: Any, transport: Any, run_id: str, j: int, deadline: float
        ) -> None:
            if self.me != liar.peer.id:
                return await real_send(self, transport, run_id, j, deadline)
            start, end = self.spans[j]
            header = allreduce_module._PartHeader(
                self.group.group_id, self.index, start, end, self.weight, self.codec.name
            )
            data = self.codec.encode(self.flat[start:end])
            # "wrong length": a part 4 bytes short; "too long": the whole part and 4 bytes more
            # (it must not count even though it held the whole part at one point);
            # "duplicate part": the same part twice
            streams = {"wrong length": [[data[:-4]]], "too long": [[data, bytes(4)]]}.get(
                lie, [[data], [data]]
            )
            for chunks in streams:
                try:
                    async with transport.open_stream(
                        self._target(self.members[j]),
                        f"avg.{run_id}.part",
                        allreduce_module._encode(header),
                        timeout=deadline - trio.current_time(),
                    ) as stream:
                        for k, chunk in enumerate(chunks):  # one send, one chunk
                            if k:  # the rest comes after every honest part is in
                                await trio.sleep(1.0)
                            await stream.send(chunk)
                        await stream.finish()
                except MoshpitError:
                    pass
            return None

        monkeypatch.setattr(allreduce_module.AllReduce, "_send_part", send_part)

    r = await run_round(4, None, prepare=prepare)
    liar = r.peers[1].id
    for report in r.reports.values():
        if report.members[report.index] == liar:
            continue
        if lie in ("wrong length", "too long"):
            assert report.excluded == {liar: "length"}
            assert all(liar not in (s.included or ()) for s in report.spans if s.reducer != liar)
        else:
            # A second copy that arrives before the span is reduced gets the sender excluded;
            # one that arrives after is refused as too late, and the first copy counted once.
            # Either way the values match the report (checked in run_round).
            assert report.excluded in ({}, {liar: "duplicate"})


async def test_lone_peer_rounds_alone_and_advances_its_key(autojump_clock: Any) -> None:
    r = await run_round(1, None, grid=(4, 4))
    (report,) = r.reports.values()
    assert report.group_id is None and report.members == (r.peers[0].id,)
    # the key still rotates: the old last coordinate moved to the front, a new one appended
    assert len(report.key_after) == 1 and 0 <= report.key_after[0] < 4
    assert report.key_after == next_key(Grid((4, 4)), report.key_before, report.key_after[0], 0)
    assert r.returned_at[0] <= TIMEOUT * 0.4 + 1e-9  # the matchmaking share of the timeout


async def test_three_m_peers_under_one_key_split_into_groups_of_m(autojump_clock: Any) -> None:
    r = await run_round(12, None, grid=(4,))
    sizes = sorted(len(rep.members) for rep in r.reports.values())
    assert max(sizes) <= 4
    # every peer is in exactly one group, and groups agree on their membership
    groups: dict[bytes | None, tuple[PeerID, ...]] = {}
    for rep in r.reports.values():
        assert groups.setdefault(rep.group_id, rep.members) == rep.members or rep.group_id is None


async def test_two_peers_find_each_other(autojump_clock: Any) -> None:
    r = await run_round(2, None, grid=(2,))
    assert all(rep.succeeded and len(rep.members) == 2 for rep in r.reports.values())


@pytest.mark.parametrize(
    ("name", "payload", "message"),
    [
        ("avg.faults.join", b"\xc1garbage", "malformed join request"),
        # a well-formed join that describes someone else
        (
            "avg.faults.join",
            b"\x93\x00\x90\x94\xc4\x20"
            + bytes(32)
            + b"\xa0\xcb"
            + bytes.fromhex("3ff0000000000000")
            + b"\xc2",
            "must describe the peer",
        ),
        ("avg.faults.join", b"\x93\x07\x90\x94", "malformed join request"),
    ],
)
async def test_malformed_join_requests_are_rejected(
    autojump_clock: Any, name: str, payload: bytes, message: str
) -> None:
    net = MemoryNetwork(seed=4)
    async with swarm(net, 2) as peers, AsyncExitStack() as stack:
        for p in peers:
            await stack.enter_async_context(MoshpitAverager(p, "faults", [np.zeros(4, np.float32)]))
        assert peers[0].address is not None
        with pytest.raises(Rejected, match=message):
            await peers[1].transport.call(peers[0].address, name, payload, timeout=5)


@pytest.mark.parametrize("name", ["avg.faults.part", "avg.faults.result"])
async def test_streams_with_malformed_headers_are_rejected(autojump_clock: Any, name: str) -> None:
    net = MemoryNetwork(seed=4)
    async with swarm(net, 2) as peers, AsyncExitStack() as stack:
        for p in peers:
            await stack.enter_async_context(MoshpitAverager(p, "faults", [np.zeros(4, np.float32)]))
        assert peers[0].address is not None
        with pytest.raises(Rejected, match="malformed"):
            async with peers[1].transport.open_stream(
                peers[0].address, name, b"\xc1nonsense", timeout=5
            ) as stream:
                await stream.send(b"x" * 16)
                await stream.finish()


async def test_a_part_stream_cut_short_leaves_nothing_in_its_buffer(autojump_clock: Any) -> None:
    """Parts are encrypted straight from the averager's flat buffer, without a copy. A part
    stream to a frozen reducer does not finish; when the round gives up on it, the chunks
    still queued for that connection and not yet sealed are dropped (they are views of the
    buffer), and the ones already sealed hold ciphertext of their own. So the next round
    flattens into the same buffer and is exact, and what goes out when the reducer thaws is
    what was sealed (else the reducer would refuse it: "mac")."""
    net = MemoryNetwork(seed=3, latency=0.005, bandwidth=2e6)
    rng = np.random.default_rng(1)
    async with swarm(net, 4) as peers, AsyncExitStack() as stack:
        values = [rng.normal(size=FLOATS).astype(np.float32) for _ in range(4)]
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "queued", [v], grid=(4,)))
            for p, v in zip(peers, values, strict=True)
        ]
        buffers = [a._flat for a in averagers]
        reports: dict[int, RoundReport] = {}

        async def step(i: int) -> None:
            reports[i] = await averagers[i].step(timeout=TIMEOUT)

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(step, i)
            # Frozen as soon as parts start to arrive at it: the rest are on their way.
            for _ in range(int(TIMEOUT * 1000)):  # polled every virtual millisecond
                if _receiving_parts(averagers[2]):
                    break
                await trio.sleep(0.001)
            else:
                raise AssertionError("no part ever reached peer 2")
            net.freeze("h2")
        survivors = [0, 1, 3]
        frozen_id = peers[2].id
        for i in survivors:
            span = next(s for s in reports[i].spans if s.reducer == frozen_id)
            assert span.included is None  # it kept local values there
            assert averagers[i]._flat is buffers[i]  # and kept its buffer
        # The survivors go on with new values, in the same buffers (and the frozen peer
        # thaws: whatever waited for it goes out now).
        net.thaw("h2")
        before = {}
        for i in survivors:
            values[i][:] = float(i)
            before[peers[i].id] = values[i].copy()
        async with trio.open_nursery() as nursery:
            for i in survivors:
                nursery.start_soon(step, i)
        weights = {peers[i].id: 1.0 for i in survivors}
        for i in survivors:
            assert len(reports[i].members) == 3 and reports[i].succeeded
            check_report_is_true(reports[i], before, weights, values[i])


def _receiving_parts(averager: MoshpitAverager) -> bool:
    rounds = list(averager._rounds._rounds.values())
    return any(
        r.accumulator is not None
        and any(r.accumulator.delivered(i) for i in range(len(r.members)) if i != r.index)
        for r in rounds
    )


async def test_a_slow_member_streaming_to_five_reducers_is_not_taken_for_frozen(
    autojump_clock: Any,
) -> None:
    """The slowest of six members sends its parts to the five reducers at once, so each of its
    streams gets a fifth of its link: a 256 KiB chunk arrives on each about every 1.3 s (at
    1 MB/s). The progress timeout used to count the whole link (four chunks: 1.05 s, a probe
    after 0.52 s of silence, whose answer waits behind the chunk in flight), and the others
    took the slow member for frozen and left its parts out. It now counts the five streams
    sharing the link: every member averages every span, in about the time the link needs."""
    slow = 1e6  # bytes/s, the slow host's upload and download
    chunk = 256 * 1024
    floats = 1_000_000  # the slow member's parts: about 780 KB each, three chunks
    timeout = 30.0
    n = 6
    net = MemoryNetwork(seed=3, latency=0.005)
    net.set_host("h0", upload=slow, download=slow)
    limits = TransportLimits(connection=ConnectionLimits(stream_chunk=chunk))
    rng = np.random.default_rng(1)
    async with swarm(net, n, limits=limits) as peers, AsyncExitStack() as stack:
        values = [rng.normal(size=floats).astype(np.float32) for _ in range(n)]
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(p, "slow", [v], grid=(n,), bandwidth=slow if i == 0 else 10 * slow)
            )
            for i, (p, v) in enumerate(zip(peers, values, strict=True))
        ]
        before = {p.id: v.copy() for p, v in zip(peers, values, strict=True)}
        reports: dict[int, RoundReport] = {}
        took: dict[int, float] = {}
        start = trio.current_time()

        async def step(i: int) -> None:
            reports[i] = await averagers[i].step(timeout=timeout)
            took[i] = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(step, i)
        weights = {p.id: 1.0 for p in peers}
        for i in range(n):
            report = reports[i]
            assert report.succeeded, (i, report.lost, report.excluded)
            assert all(len(span.included or ()) == n for span in report.spans)
            check_report_is_true(report, before, weights, values[i])
        for p in peers[1:]:
            assert not p.transport.unresponsive(peers[0].id)
        # The slow link moves about 3.9 MB of parts up and as much in results down (3.9 s at
        # least). One after the other, as the all-reduce did before it streamed its ranges,
        # that took 7.9 s; now each range's results come down while the next ranges' parts
        # still go up (6.96 s: the first range waits for a chunk of every part to arrive, and
        # for the slow member's credit to come back behind the chunk it is writing).
        assert 3.9 < max(took.values()) < 7.4, took


async def test_a_member_killed_half_way_through_its_parts_is_in_the_ranges_averaged_before(
    autojump_clock: Any,
) -> None:
    """Each reducer averages its span range by range as the parts come in. A member killed
    after some of its chunks were averaged is in those ranges and in none after: every
    survivor's report says so range by range, its values match what each range names, the
    round ends at once (the loss is news at once), and the next round averages the others."""
    slow = 200e3  # bytes/s: the victim's parts trickle in, a 64 KiB chunk at a time
    chunk = 64 * 1024
    floats = 300_000  # the victim's parts: about 570 KB each, nine chunks
    n = 3
    net = MemoryNetwork(seed=5, latency=0.005)
    net.set_host("h0", upload=slow, download=10 * slow)
    limits = TransportLimits(connection=ConnectionLimits(stream_chunk=chunk))
    rng = np.random.default_rng(2)
    async with swarm(net, n, limits=limits) as peers, AsyncExitStack() as stack:
        values = [rng.normal(size=floats).astype(np.float32) for _ in range(n)]
        averagers = [
            await stack.enter_async_context(
                MoshpitAverager(p, "half", [v], grid=(n,), bandwidth=slow if i == 0 else 10 * slow)
            )
            for i, (p, v) in enumerate(zip(peers, values, strict=True))
        ]
        before = {p.id: v.copy() for p, v in zip(peers, values, strict=True)}
        victim = peers[0].id
        reports: dict[int, RoundReport] = {}
        ended: dict[int, float] = {}

        async def step(i: int, scope: trio.CancelScope) -> None:
            with scope:
                reports[i] = await averagers[i].step(timeout=30.0)
                ended[i] = trio.current_time()

        def taken_with_victim() -> bool:
            for i in (1, 2):
                for r in averagers[i]._rounds._rounds.values():
                    k = r.group.index_of(victim)
                    if any(k in t.included for t in r._ranges) and r.reduced is None:
                        return True
            return False

        scopes = [trio.CancelScope() for _ in range(n)]
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(step, i, scopes[i])
            for _ in range(20_000):  # polled every virtual millisecond
                if taken_with_victim():
                    break
                await trio.sleep(0.001)
            else:
                raise AssertionError("no range with the victim in it was taken mid-span")
            killed = trio.current_time()
            net.kill("h0")
            scopes[0].cancel()
        weights = {p.id: 1.0 for p in peers}
        for i in (1, 2):
            report = reports[i]
            check_report_is_true(report, before, weights, values[i])
            assert ended[i] - killed < 0.1, (i, ended[i], killed)  # no deadline waited out
            with_victim = [s for s in report.spans if s.included and victim in s.included]
            without = [s for s in report.spans if s.included and victim not in s.included]
            assert with_victim and without, report.spans
            # a span split where the victim dropped out: the same reducer, back to back
            assert any(
                a.end == b.start and a.reducer == b.reducer for a in with_victim for b in without
            ), report.spans
        # the next round: the survivors average together
        before = {p.id: v.copy() for p, v in zip(peers, values, strict=True)}
        async with trio.open_nursery() as nursery:
            for i in (1, 2):
                nursery.start_soon(step, i, trio.CancelScope())
        for i in (1, 2):
            assert reports[i].succeeded and len(reports[i].members) == 2
            check_report_is_true(reports[i], before, weights, values[i])


class _FakeResultStream:
    """What AllReduce.on_result reads of a StreamRequest: the caller, the chunks, a deadline."""

    def __init__(self, peer: PeerID, chunks: list[bytes]) -> None:
        self.peer = peer
        self._chunks = chunks
        self.deadline = 1e9
        self.connection = None

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        for c in self._chunks:
            yield memoryview(c)


def _two_member_round() -> tuple[Any, list[PeerID], tuple[int, int]]:
    from moshpit_trio.averaging.allreduce import AllReduce
    from moshpit_trio.averaging.matchmaking import GroupInfo, MemberInfo

    ids = [Identity.from_seed(bytes([60 + i]) * 32).peer_id for i in range(2)]
    members = tuple(
        MemberInfo(p.to_bytes(), f"ws://h{i}:1/x", 1e6, False) for i, p in enumerate(ids)
    )
    group = GroupInfo(b"g" * 16, 0, (), members, members[0].peer_id)
    reduce = AllReduce(
        group, ids[0], np.zeros(10, np.float32), 1.0, codec_name="none", max_norm=None
    )
    return reduce, ids, reduce.spans[1]


def _values(n: int, value: float = 1.0) -> list[bytes]:
    return [np.full(n, value, np.float32).tobytes()]


def _record(start: int, end: int, included: list[int] | None = None, value: float = 1.0) -> bytes:
    """A result stream's record: the range's header, then its values (all ``value``)."""
    from moshpit_trio.averaging.result_stream import range_record

    values = np.full(max(0, end - start), value, np.float32).tobytes()
    return range_record(start, end, [0, 1] if included is None else included) + values


@pytest.mark.parametrize(
    ("what", "body", "error"),
    [
        ("starts before the span", lambda a, b: _record(a - 1, b), "does not match the span"),
        ("ends past the span", lambda a, b: _record(a, b + 1), "does not match the span"),
        ("empty", lambda a, b: _record(a, a), "bad result: .*empty range"),
        ("reversed", lambda a, b: _record(b, a), "bad result: .*empty range"),
        ("nobody included", lambda a, b: _record(a, b, []), "bad list of included members"),
        ("a member twice", lambda a, b: _record(a, b, [0, 0]), "bad list of included members"),
        ("no such member", lambda a, b: _record(a, b, [0, 2]), "bad list of included members"),
        ("too few bytes", lambda a, b: _record(a, b)[:-4], "bad result: .*inside a range"),
        ("only a header", lambda a, b: _record(a, b)[:12], "bad result: .*inside a range"),
        ("half a length", lambda a, b: b"\x00\x00", "bad result: .*inside a range"),
        ("a NaN", lambda a, b: _record(a, b, value=float("nan")), "non-finite values"),
        ("a zero length", lambda a, b: bytes(4), "bad result: .*header of 0 bytes"),
        ("a huge length", lambda a, b: b"\xff" * 4, "bad result: .*header of 4294967295"),
        ("a header that is not one", lambda a, b: b"\x00\x00\x00\x01\xc1", "does not decode"),
    ],
)
async def test_a_result_range_is_refused_when_malformed(what: str, body: Any, error: str) -> None:
    from moshpit_trio.averaging.allreduce import _ResultHeader

    reduce, ids, (start, end) = _two_member_round()
    header = _ResultHeader(b"g" * 16, "none")
    with pytest.raises(Rejected, match=error):
        await reduce.on_result(_FakeResultStream(ids[1], [body(start, end)]), header)
    assert reduce.results == {} and not reduce.all_results.is_set(), what
    assert reduce._claimed.get(1, []) == [], "a refused range gives its place back"


async def test_a_result_stream_in_another_codec_is_refused() -> None:
    from moshpit_trio.averaging.allreduce import _ResultHeader

    reduce, ids, (start, end) = _two_member_round()
    with pytest.raises(Rejected, match="does not match the span"):
        await reduce.on_result(
            _FakeResultStream(ids[1], [_record(start, end)]), _ResultHeader(b"g" * 16, "fp16")
        )
    assert reduce.results == {}


async def test_result_ranges_may_not_overlap_and_a_refused_one_frees_its_place() -> None:
    from moshpit_trio.averaging.allreduce import _ResultHeader

    reduce, ids, (start, end) = _two_member_round()
    mid = (start + end) // 2
    header = _ResultHeader(b"g" * 16, "none")

    def stream(*records: bytes) -> Any:
        return _FakeResultStream(ids[1], [b"".join(records)])

    await reduce.on_result(stream(_record(start, mid)), header)
    with pytest.raises(Rejected, match="does not match the span"):  # overlaps what came
        await reduce.on_result(stream(_record(start, end)), header)
    with pytest.raises(Rejected, match="non-finite"):
        await reduce.on_result(stream(_record(mid, end, value=float("inf"))), header)
    assert not reduce.all_results.is_set()
    # the refused range left no claim behind: it may come again, and completes the span
    await reduce.on_result(stream(_record(mid, end)), header)
    assert reduce.all_results.is_set()
    assert [(r.start, r.end) for r in reduce.results[1]] == [
        (0, mid - start),
        (mid - start, end - start),
    ]


async def test_a_bad_record_leaves_the_ranges_before_it_whole() -> None:
    """One stream carries every range of a reducer's result: a bad record refuses the stream
    from there on, and the ranges that came whole before it stay."""
    from moshpit_trio.averaging.allreduce import _ResultHeader

    reduce, ids, (start, end) = _two_member_round()
    mid = (start + end) // 2
    body = _record(start, mid, value=2.0) + _record(mid, end, value=float("nan"))
    # cut at odd places, as a relay may cut it: inside a length, a header and a value
    chunks = [body[:2], body[2:9], body[9:23], body[23:]]
    with pytest.raises(Rejected, match="non-finite"):
        await reduce.on_result(_FakeResultStream(ids[1], chunks), _ResultHeader(b"g" * 16, "none"))
    assert [(r.start, r.end, r.included) for r in reduce.results[1]] == [(0, mid - start, (0, 1))]
    (got,) = reduce.results[1]
    assert np.concatenate([v for _, v in got.pieces]).tolist() == [2.0] * (mid - start)
    assert reduce._claimed[1] == [(start, mid)]
    assert not reduce.all_results.is_set()


def test_parts_over_slow_links_go_in_chunks_of_a_tenth_of_a_second() -> None:
    """A part's chunk is what its stream moves in PART_CHUNK_TIME at its share (1 / (N - 1))
    of the slower of the two links, at least 64 KiB: a reducer averages a range only once
    every member delivered it, so 4 MiB chunks over a 100 Mbit/s link would hold every
    average, and the results coming back, a second behind."""
    from moshpit_trio.averaging.allreduce import PART_CHUNK_TIME, AllReduce
    from moshpit_trio.averaging.matchmaking import GroupInfo, MemberInfo

    assert PART_CHUNK_TIME == 0.1
    rates = [12.5e6, 31.25e6, 125e6, 1e3]  # bytes/s; the last one all but stalled
    ids = [Identity.from_seed(bytes([70 + i]) * 32).peer_id for i in range(4)]
    members = tuple(
        MemberInfo(p.to_bytes(), f"ws://h{i}:1/x", rates[i], False) for i, p in enumerate(ids)
    )
    group = GroupInfo(b"g" * 16, 0, (), members, members[0].peer_id)

    def chunk(me: int, to: int) -> int:
        reduce = AllReduce(
            group, ids[me], np.zeros(1000, np.float32), 1.0, codec_name="none", max_norm=None
        )
        return reduce._part_chunk(to)

    def whole(size: float) -> int:  # rounded down to 4096-byte blocks: whole values
        return int(size) // 4096 * 4096

    assert chunk(0, 2) == whole(12.5e6 / 3 * 0.1) == 413696  # the sender's link is the slower
    assert chunk(2, 0) == whole(12.5e6 / 3 * 0.1)  # the reducer's link is the slower
    assert chunk(1, 2) == whole(31.25e6 / 3 * 0.1)
    assert chunk(2, 3) == 64 * 1024  # never below 64 KiB


@given(rates=st.lists(st.floats(1e3, 1e11), min_size=2, max_size=8), size=st.integers(0, 1 << 40))
@settings(max_examples=200, deadline=None)
def test_part_chunks_hold_whole_values(rates: list[float], size: int) -> None:
    """A part's chunk (the link's, then capped at the connection's stream_chunk, both rounded
    down) is a multiple of 4096 bytes, whole values of every codec that encodes them one by
    one: a chunk ending inside a value makes the reducer join that value's bytes with the whole
    next chunk, one more copy of nearly every byte (the default 1e8 bytes/s shared by three
    streams made chunks of 3,333,333 bytes). test_averager has the same over a real round."""
    from moshpit_trio.averaging.allreduce import AllReduce, _aligned
    from moshpit_trio.averaging.matchmaking import GroupInfo, MemberInfo

    ids = [Identity.from_seed(bytes([90 + i]) * 32).peer_id for i in range(len(rates))]
    members = tuple(
        MemberInfo(p.to_bytes(), f"ws://h{i}:1/x", rates[i], False) for i, p in enumerate(ids)
    )
    group = GroupInfo(b"g" * 16, 0, (), members, members[0].peer_id)
    reduce = AllReduce(
        group, ids[0], np.zeros(1000, np.float32), 1.0, codec_name="none", max_norm=None
    )
    for j in range(1, len(rates)):
        link = reduce._part_chunk(j)
        assert link % 4096 == 0 and link >= 64 * 1024
    # a stream_chunk under one block stays as it is (nothing whole fits)
    rounded = _aligned(size)
    assert (
        rounded == size if size < 4096 else (rounded % 4096 == 0 and size - 4096 < rounded <= size)
    )


def _paced_round(rates: list[float], me: int, n: int = 1000, codec: str = "none") -> Any:
    from moshpit_trio.averaging.allreduce import AllReduce
    from moshpit_trio.averaging.matchmaking import GroupInfo, MemberInfo

    ids = [Identity.from_seed(bytes([80 + i]) * 32).peer_id for i in range(len(rates))]
    members = tuple(
        MemberInfo(p.to_bytes(), f"ws://h{i}:1/x", rates[i], False) for i, p in enumerate(ids)
    )
    group = GroupInfo(b"g" * 16, 0, (), members, members[0].peer_id)
    return AllReduce(
        group, ids[me], np.zeros(n, np.float32), 1.0, codec_name=codec, max_norm=None, pace=True
    )


@pytest.mark.parametrize("codec", ["none", "fp16", "8bit"])
def test_paced_flows_share_our_uplink_by_what_each_member_gets(codec: str) -> None:
    """With ``pace``, we send to each member at our bandwidth times its share of the bytes we
    send in the round (our part of its span, and our average of ours): our flows end together,
    as soon as our uplink allows. Without it, nothing is paced."""
    # equal links: a third of ours to each of the three others
    reduce = _paced_round([1e8] * 4, me=1, codec=codec)
    assert reduce.rates == pytest.approx({0: 1e8 / 3, 2: 1e8 / 3, 3: 1e8 / 3})
    # uneven links: spans sized for them (the slowest may reduce nothing)
    rates = [12.5e6, 31.25e6, 62.5e6, 125e6]
    for me in range(4):
        reduce = _paced_round(rates, me=me, n=1_000_000, codec=codec)
        sizes = [reduce.codec.encoded_size(e - s) if e > s else 0 for s, e in reduce.spans]
        sent = {j: sizes[me] + sizes[j] for j in range(4) if j != me and sizes[me] + sizes[j]}
        assert set(reduce.rates) == set(sent)
        assert sum(reduce.rates.values()) == pytest.approx(rates[me])
        for j, rate in reduce.rates.items():
            assert rate == pytest.approx(rates[me] * sent[j] / sum(sent.values()))
    slowest = _paced_round(rates, me=0, n=1_000_000)
    assert slowest.spans[0] == (0, 0) and slowest.spans[1][1] == slowest.spans[1][0]
    assert set(slowest.rates) == {2, 3}  # it sends parts only, to the two reducers
    # paced, rates; the same round unpaced (no pace=True): none
    assert _paced_round([1e8] * 4, me=0).rates != {}
    from moshpit_trio.averaging.allreduce import AllReduce

    plain = AllReduce(
        reduce.group, reduce.me, np.zeros(10, np.float32), 1.0, codec_name="none", max_norm=None
    )
    assert plain.rates == {}


@given(
    size=st.integers(0, 40 << 20),
    chunk=st.integers(1, 8 << 20),
    floor=st.integers(1, 2 << 20),
)
@settings(max_examples=300, deadline=None)
def test_part_chunks_ramp_up_and_taper_off(size: int, chunk: int, floor: int) -> None:
    """The chunks add up to the part, fall on 4096-byte boundaries, are never larger than the
    (aligned) chunk, and each but the last is at most what follows it (so a reducer taking
    ranges with no_short_rest takes each chunk alone); the last is under twice the floor; the
    first is the floor when there is room to ramp up."""
    from moshpit_trio.averaging.allreduce import part_chunks

    sizes = part_chunks(size, chunk, floor)
    lo = -(-floor // 4096) * 4096
    hi = max(chunk // 4096 * 4096, lo)
    assert sum(sizes) == size and all(n > 0 for n in sizes)
    assert all(n % 4096 == 0 for n in sizes[:-1])
    assert all(n <= hi for n in sizes[:-1])
    for k, n in enumerate(sizes[:-1]):
        assert n <= sum(sizes[k + 1 :])
    if sizes:
        assert sizes[-1] < 2 * lo or (sizes[-1] <= hi and len(sizes) == 1)
    if size - lo >= 2 * hi and lo < hi:
        assert sizes[0] == lo


def test_part_chunks_examples_and_bad_arguments() -> None:
    from moshpit_trio.averaging.allreduce import part_chunks

    mib = 1 << 20
    assert part_chunks(10 * mib, 4 * mib, mib // 2) == [
        mib // 2, mib, 4 * mib, 2304 << 10, 1152 << 10, 576 << 10, 576 << 10,
    ]  # fmt: skip
    assert part_chunks(0, 4 * mib, mib) == []
    assert part_chunks(100, 4 * mib, 64 << 10) == [100]
    for bad in ((-1, 1, 1), (1, 0, 1), (1, 1, 0)):
        with pytest.raises(ConfigError, match="positive"):
            part_chunks(*bad)


def test_a_reducer_takes_each_part_chunk_as_a_range() -> None:
    """Members sending their parts in part_chunks, the reducer (no_short_rest) averages each
    chunk as its own range as it arrives, and the last range is the last, small chunk."""
    from moshpit_trio.averaging.allreduce import part_chunks
    from moshpit_trio.averaging.reducer import SpanAccumulator

    n = 2_500_000
    sizes = [b // 4 for b in part_chunks(4 * n, 4 << 20, 512 << 10)]
    acc = SpanAccumulator(n, 3)
    taken = []
    at = 0
    for size in sizes:
        for sender in range(3):
            acc.add(sender, at, np.full(size, sender, np.float32), 1.0)
        at += size
        while (got := acc.take(no_short_rest=True)) is not None:
            taken.append(got.end - got.start)
    assert taken == sizes and acc.finalized
    assert taken[-1] * 4 < 1 << 20  # under 1 MiB averaged after the last chunk (was 5.5 MiB)
