"""grid="auto" end to end: the real peers and averager on the in-memory network, virtual clock.

Rounds on a shared clock (``round_period``): every peer steps each slot; the table says how many
peers, and what each round must have done.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import msgspec
import numpy as np
import pytest
import trio

from moshpit_trio.averaging.auto_grid import RowRecord, directory_key, encode_record
from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.errors import ConfigError, Rejected
from moshpit_trio.peer import open_peer
from moshpit_trio.testing import MemoryNetwork

from .test_averager import LATENCY, ident, swarm

PERIOD = 4.0
TIMEOUT = 3.0


async def run_rounds(averagers: list[MoshpitAverager], rounds: int) -> list[list[RoundReport]]:
    """Every averager steps ``rounds`` times (each on the shared slots); reports by round."""
    by_round: list[list[RoundReport]] = [[] for _ in range(rounds)]

    async def run(a: MoshpitAverager) -> None:
        for r in range(rounds):
            by_round[r].append(await a.step(timeout=TIMEOUT))

    async with trio.open_nursery() as nursery:
        for a in averagers:
            nursery.start_soon(run, a)
    return by_round


@pytest.mark.parametrize(
    ("n", "rounds_to_exact"),
    [
        (2, 1),  # one row: everyone in one group, every round
        (5, 1),
        (12, 1),
        (40, 3),  # 40 > 32: a cold start in row 0 (two groups), then 5 rows x 8 columns
    ],
)
async def test_every_round_averages_and_reaches_the_exact_mean(
    autojump_clock: Any, n: int, rounds_to_exact: int
) -> None:
    net = MemoryNetwork(seed=n, latency=LATENCY)
    rng = np.random.default_rng(n)
    values = [rng.normal(size=64).astype(np.float32) for _ in range(n)]
    target = np.mean(np.stack(values).astype(np.float64), axis=0)
    async with swarm(net, n) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "auto", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        start = trio.current_time()
        by_round = await run_rounds(averagers, rounds_to_exact + 1)
        took = trio.current_time() - start
        # Every round reads the run's directory, but a row round right after a column round
        # (nothing wrote to it in between): one row, every round a row round, 2 reads in 2
        # rounds; 40 peers, 4 rounds (a cold start, then a column round and a row round in
        # some order, then one more), 3.
        reads = {a.directory_reads + a.directory_handed for a in averagers}
        assert reads == ({3} if n > 32 else {rounds_to_exact + 1}), reads
        # After a row round only one member of each group reads the directory from the DHT;
        # the others get it from that member. One row (one group a round): n reads at the cold
        # start, then one a round.
        dht_reads = sum(a.directory_reads for a in averagers)
        if n <= 32:
            assert dht_reads == n + rounds_to_exact
    # Each step waits for the next slot and then takes at most its timeout.
    assert took <= (rounds_to_exact + 2) * PERIOD
    for round_, reports in enumerate(by_round):
        assert len(reports) == n
        if round_ == 0 and n > 32:
            # A cold start of more than one group cuts row 0 by what each peer had seen of
            # it when it decided: not always balanced, and a straggler may be left alone
            # (known; the directory places everyone from the next round on).
            continue
        for report in reports:
            assert report.succeeded, report  # nobody solo, nothing partial
            assert 2 <= len(report.members) <= 32
        sizes = sorted({len(r.members) for r in reports})
        assert sizes[-1] - sizes[0] <= 1, sizes  # balanced
    for v in values:
        np.testing.assert_allclose(v, target, rtol=1e-5, atol=1e-5)


async def test_a_joiner_takes_part_in_its_first_whole_round_and_a_leaver_strands_nobody(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=7, latency=LATENCY)
    n = 4
    values = [np.full(8, float(i), dtype=np.float32) for i in range(n + 1)]
    async with swarm(net, n + 1) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "auto", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        # rounds with 4 peers, then the fifth joins: its first round already averages
        first = await run_rounds(averagers[:n], 2)
        assert all(len(r.members) == n for reports in first for r in reports)
        joined = await run_rounds(averagers, 1)
        assert all(r.succeeded and len(r.members) == n + 1 for r in joined[0])
        # one leaves for good: the next rounds have four, never a solo peer
        net.kill("h0")
        after = await run_rounds(averagers[1:], 3)
        for reports in after[1:]:
            assert all(r.succeeded and len(r.members) == n for r in reports)


async def test_bad_arguments_are_refused(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    v = np.zeros(4, dtype=np.float32)
    async with swarm(net, 1) as (peer,):
        with pytest.raises(ConfigError, match="max_group_size"):
            MoshpitAverager(peer, "r", [v], max_group_size=1)
        with pytest.raises(ConfigError, match="max_group_size"):
            MoshpitAverager(peer, "r", [v], max_group_size=True)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="max_group_size are for grid='auto'"):
            MoshpitAverager(peer, "r", [v], grid=(4, 4), max_group_size=8)
        with pytest.raises(ConfigError, match="target_group_size and max_group_size are for"):
            MoshpitAverager(peer, "r", [v], grid=(4, 4), target_group_size=8)
        with pytest.raises(ConfigError, match="target_group_size must be at least 2"):
            MoshpitAverager(peer, "r", [v], target_group_size=1)
        with pytest.raises(ConfigError, match="target_group_size <= max_group_size"):
            MoshpitAverager(peer, "r", [v], target_group_size=20, max_group_size=16)
        with pytest.raises(ConfigError, match="<= 256"):
            MoshpitAverager(peer, "r", [v], max_group_size=300)
        averager = MoshpitAverager(peer, "r", [v], target_group_size=8)
        assert (averager.target_group_size, averager.max_group_size) == (8, 10)
        averager = MoshpitAverager(peer, "r", [v])
        assert (averager.target_group_size, averager.max_group_size) == (32, 40)
        with pytest.raises(ConfigError, match="initial_key"):
            MoshpitAverager(peer, "r", [v], initial_key=(1,))
        with pytest.raises(ConfigError, match="min_group_size"):
            MoshpitAverager(peer, "r", [v], max_group_size=4, min_group_size=5)


async def test_client_mode_peers_always_average_with_a_member_that_listens(
    autojump_clock: Any,
) -> None:
    # 40 peers, 8 of them listening: cold start, then rows and columns. A client-mode peer's
    # group always has a listener, who leads it and reduces the spans.
    net = MemoryNetwork(seed=3, latency=LATENCY)
    n, listening = 40, 8
    values = [np.full(16, float(i), dtype=np.float32) for i in range(n)]
    async with AsyncExitStack() as stack:
        peers = []
        for i in range(n):
            public = i < listening
            boot = [peers[j].address for j in range(min(len(peers), 3))]
            peers.append(
                await stack.enter_async_context(
                    open_peer(
                        ident(100 + i),
                        listen=f"h{i}:0" if public else None,
                        client_mode=not public,
                        network=net.host(f"h{i}"),
                        bootstrap=boot,  # type: ignore[arg-type]
                    )
                )
            )
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "nat", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        by_round = await run_rounds(averagers, 5)
    listeners = {p.id for p in peers[:listening]}
    for round_, reports in enumerate(by_round):
        for report in reports:
            if round_ > 0:
                assert len(report.members) >= 2, (round_, report)
            if len(report.members) >= 2:
                assert listeners & set(report.members)
    mean = np.mean([float(i) for i in range(n)])
    spread = max(abs(float(v[0]) - mean) for v in values)
    assert spread < 1e-3, spread


async def test_lies_in_the_directory_do_not_skew_the_plan(autojump_clock: Any) -> None:
    # A peer of the swarm (not averaging) writes a row group of 500 (no group is larger than 32)
    # and a malformed entry under the run's directory: the five averaging peers ignore both.
    net = MemoryNetwork(seed=11, latency=LATENCY)
    n = 5
    values = [np.full(4, float(i), dtype=np.float32) for i in range(n)]
    async with swarm(net, n + 2) as peers, AsyncExitStack() as stack:
        liar, garbler = peers[n], peers[n + 1]
        await liar.dht.store(
            directory_key("auto"), encode_record(RowRecord(3, 0, bytes(16), 500, 500)), ttl=60
        )
        await garbler.dht.store(directory_key("auto"), b"\xc1 not msgpack", ttl=60)
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "auto", [v], round_period=PERIOD))
            for p, v in zip(peers[:n], values, strict=True)
        ]
        by_round = await run_rounds(averagers, 3)
    for reports in by_round:
        assert all(r.succeeded and len(r.members) == n for r in reports)
    for v in values:
        np.testing.assert_allclose(v, 2.0, rtol=1e-6)


async def test_the_directory_is_read_once_per_group_and_read_again_when_its_reader_is_gone(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=13, latency=LATENCY)
    n = 5
    values = [np.full(4, float(i), dtype=np.float32) for i in range(n)]
    async with swarm(net, n) as peers, AsyncExitStack() as stack:
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "auto", [v], round_period=PERIOD))
            for p, v in zip(peers, values, strict=True)
        ]
        await run_rounds(averagers, 1)  # a cold start: everyone reads
        assert [a.directory_reads for a in averagers] == [1] * n
        await run_rounds(averagers, 1)
        # the group's first member by PeerID read it; the others asked it
        reader = min(range(n), key=lambda i: peers[i].id.to_bytes())
        assert [a.directory_reads for a in averagers] == [2 if i == reader else 1 for i in range(n)]
        assert [a.directory_handed for a in averagers] == [
            0 if i == reader else 1 for i in range(n)
        ]
        # A stranger (no member of that group) is refused the directory, and so is a
        # malformed request, a wrong round, and (after the round) anyone.
        share = averagers[reader]._dir_share
        assert share is not None
        outsider = await stack.enter_async_context(
            open_peer(ident(99), listen="h99:0", network=net.host("h99"))
        )
        name = "avg.auto.dir"
        address = peers[reader].address
        assert address is not None
        for payload in (msgspec.msgpack.encode(share.round), b"\xc1", msgspec.msgpack.encode(-1)):
            with pytest.raises(Rejected):
                await outsider.transport.call(address, name, payload, timeout=1.0)
        with pytest.raises(Rejected, match="that round"):
            await peers[(reader + 1) % n].transport.call(
                address, name, msgspec.msgpack.encode(share.round + 5), timeout=1.0
            )
        # The reader dies: the others' asking fails at once and they read the key themselves;
        # the round still averages, all four.
        net.kill(f"h{reader}")
        rest = [a for i, a in enumerate(averagers) if i != reader]
        start = trio.current_time()
        (reports,) = await run_rounds(rest, 1)
        assert all(r.succeeded and len(r.members) == n - 1 for r in reports)
        assert [a.directory_reads for a in rest] == [2] * (n - 1)
        assert trio.current_time() - start <= PERIOD + TIMEOUT
