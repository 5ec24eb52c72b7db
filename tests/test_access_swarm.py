"""Access control on the wire: allowlist and bans at the handshake, rate limits, flood -> ban.

All on the in-memory network under the virtual clock.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed

from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.errors import ConnectionLost, HandshakeFailed, Rejected
from moshpit_trio.identity import Identity
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.access import AccessPolicy, RateLimits
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.transport import Transport, open_transport
from tests.test_wire_faults import _request, peer, raw_client

LATENCY = 0.01
FLOOD = RateLimits(calls_per_s=10, call_burst=10, ban_after_refusals=5, refusal_window=10)


class Counter:
    """An echo handler that counts its runs."""

    def __init__(self) -> None:
        self.runs = 0

    async def __call__(self, request: Request) -> bytes:
        self.runs += 1
        return bytes(request.payload)


async def test_allowlisted_peers_connect_and_a_stranger_is_refused_at_the_handshake(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    members = frozenset(i.peer_id for i in identities[:3])
    policy = AccessPolicy(allowlist=members)
    counter = Counter()
    async with (
        peer(net, "s", identities[0], access=policy) as server,
        peer(net, "a", identities[1], access=policy) as member,
        peer(net, "x", identities[5]) as stranger,
    ):
        assert server.address is not None and stranger.address is not None
        server.register("count", counter)
        assert await member.call(server.address, "count", b"hi", timeout=5) == b"hi"
        start = trio.current_time()
        with pytest.raises(HandshakeFailed, match="not on the allowlist of this private swarm"):
            await stranger.call(server.address, "count", b"let me in", timeout=5)
        # Refused as soon as its HELLO arrived, not at a deadline.
        assert trio.current_time() - start < 10 * LATENCY
        assert counter.runs == 1
        assert [c.remote_peer_id for c in server.connections()] == [member.peer_id]
        refused = [e for e in logs if e["event"] == "connection refused"]
        assert [e["remote"] for e in refused] == [str(stranger.peer_id)]
        # Nor do we dial a stranger: refused before anything goes on the wire.
        before = trio.current_time()
        with pytest.raises(HandshakeFailed, match=r"not connecting to .*: not on the allowlist"):
            await server.call(stranger.address, "echo", b"", timeout=5)
        assert trio.current_time() == before
        assert stranger.connections() == []


async def flood(client: Transport, target: Any, n: int) -> list[BaseException | bytes]:
    """``n`` calls at the same instant; what each one ended with."""
    outcomes: list[BaseException | bytes] = []

    async def one(i: int) -> None:
        try:
            outcomes.append(await client.call(target, "count", b"x", timeout=5))
        except (Rejected, ConnectionLost, HandshakeFailed) as exc:
            outcomes.append(exc)

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, i)
    return outcomes


def _rate_limited(outcomes: list[BaseException | bytes]) -> int:
    return sum(isinstance(o, Rejected) and o.reason.startswith("rate limited") for o in outcomes)


async def test_a_flooder_is_rate_limited_then_banned_and_the_ban_grows(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    counter = Counter()
    policy = AccessPolicy(rates=FLOOD, ban_base=60)
    async with (
        peer(net, "s", identities[0], access=policy) as server,
        peer(net, "h", identities[1]) as honest,
        open_transport(identities[2], listen=None, network=net.host("f")) as flooder,
    ):
        assert server.address is not None
        server.register("count", counter)
        start = trio.current_time()
        outcomes = await flood(flooder, server.address, 30)
        # The burst runs, the next five are refused without running, the sixth refusal bans.
        assert sum(o == b"x" for o in outcomes) == 10
        assert counter.runs == 10
        assert _rate_limited(outcomes) == 5
        assert sum(isinstance(o, Rejected) and "banned for 60 s" in o.reason for o in outcomes) == 1
        assert all(
            isinstance(o, ConnectionLost) or (isinstance(o, Rejected) and "banned" in o.reason)
            for o in outcomes
            if o != b"x" and not (isinstance(o, Rejected) and o.reason.startswith("rate"))
        )
        [ban] = server.bans
        assert (ban.peer, ban.duration, ban.offence) == (flooder.peer_id, 60.0, 1)
        # Dial (one round trip), websocket upgrade (one), handshake (one and a half), then the
        # calls travel one way: all of them arrive, and the ban falls, at 7 latencies.
        assert ban.since == pytest.approx(start + 7 * LATENCY, abs=1e-9)
        assert ban.until == ban.since + 60
        assert ban.reason == "rate limit exceeded again and again"
        [logged] = [e for e in logs if e["event"] == "peer banned"]
        assert logged["remote"] == str(flooder.peer_id) and logged["duration"] == 60.0
        # Its connection is closed (a client-mode peer is banned like any other) ...
        await trio.sleep(1)
        assert flooder.connections() == []
        assert server.connections() == []
        # ... it cannot come back until the ban ends ...
        await trio.sleep_until(ban.until - 0.5)
        with pytest.raises(HandshakeFailed, match=r"banned for another 0\.4\d* s: rate limit"):
            await flooder.call(server.address, "count", b"x", timeout=5)
        # ... while everyone else is served.
        assert await honest.call(server.address, "echo", b"still here", timeout=5) == b"still here"
        await trio.sleep_until(ban.until)
        assert await flooder.call(server.address, "count", b"back", timeout=5) == b"back"
        # A second flood bans twice as long.
        await trio.sleep(2)  # its bucket refills
        again = trio.current_time()
        outcomes = await flood(flooder, server.address, 30)
        [second] = server.bans
        assert (second.duration, second.offence) == (120.0, 2)
        # over the connection it has: the calls arrive one latency later
        assert second.since == pytest.approx(again + LATENCY, abs=1e-9)
        assert _rate_limited(outcomes) == 5


async def test_a_protocol_violation_bans_the_peer(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    async with peer(net, "s", identities[0]) as server:
        assert server.address is not None
        async with raw_client(net, "m", identities[2], server.address) as raw:
            message = _request(raw, server)
            await raw.ws.send_message(message)
            await raw.ws.send_message(message)  # replayed: a sequence violation
            with pytest.raises(ConnectionClosed):
                while True:
                    await raw.ws.get_message()
        await trio.sleep(0.1)
        [ban] = server.bans
        assert (ban.peer, ban.reason, ban.duration) == (
            identities[2].peer_id,
            "protocol violation (seq)",
            60.0,
        )
        # The same identity, however honest now, is refused at the handshake.
        async with peer(net, "m2", identities[2]) as again:
            with pytest.raises(HandshakeFailed, match="protocol violation"):
                await again.call(server.address, "echo", b"", timeout=5)


async def test_a_ban_closes_connections_and_stops_dialing_both_ways(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    async with peer(net, "s", identities[0]) as server, peer(net, "b", identities[1]) as bad:
        assert server.address is not None and bad.address is not None
        assert await bad.call(server.address, "echo", b"1", timeout=5) == b"1"
        # "norm" is no ban, nor is this peer's own part named by its own reducer
        excluded = {
            bad.peer_id: "nonfinite",
            identities[3].peer_id: "norm",
            server.peer_id: "length",
        }
        [ban] = server.report_bad_data(excluded)
        assert ban.reason == "bad data in a round (nonfinite)"
        await trio.sleep(1)
        assert server.connections() == [] and bad.connections() == []
        with pytest.raises(HandshakeFailed, match=r"not connecting to .*bad data"):
            await server.call(bad.address, "echo", b"", timeout=5)
        with pytest.raises(HandshakeFailed, match="bad data"):
            await bad.call(server.address, "echo", b"", timeout=5)


async def test_the_swarm_averages_while_a_flooder_is_banned(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    net = MemoryNetwork(seed=3, latency=LATENCY)
    policy = AccessPolicy(rates=FLOOD)
    n = 4
    rng = np.random.default_rng(0)
    values = [rng.normal(size=100).astype(np.float32) for _ in range(n)]
    async with AsyncExitStack() as stack:
        peers: list[Peer] = []
        for i in range(n):
            peers.append(
                await stack.enter_async_context(
                    open_peer(
                        identities[i],
                        listen=f"h{i}:0",
                        network=net.host(f"h{i}"),
                        bootstrap=[p.address for p in peers[:1]],  # type: ignore[misc]
                        access=policy,
                    )
                )
            )
        counter = Counter()
        peers[0].transport.register("count", counter)
        flooder = await stack.enter_async_context(
            open_peer(
                identities[7],
                client_mode=True,
                network=net.host("f"),
                bootstrap=[peers[0].address],  # type: ignore[list-item]
            )
        )
        outcomes = await flood(flooder.transport, peers[0].id, 30)
        assert _rate_limited(outcomes) == 5
        assert [b.peer for b in peers[0].transport.bans] == [flooder.id]
        averagers = [
            await stack.enter_async_context(MoshpitAverager(p, "acl", [v], grid=(4,)))
            for p, v in zip(peers, values, strict=True)
        ]
        target = np.mean(values, axis=0)
        reports: list[RoundReport] = []

        async def step(a: MoshpitAverager) -> None:
            reports.append(await a.step(timeout=30))

        async with trio.open_nursery() as nursery:
            for a in averagers:
                nursery.start_soon(step, a)
        assert all(r.succeeded and len(r.members) == n for r in reports)
        for v in values:
            np.testing.assert_allclose(v, target, rtol=1e-5, atol=1e-6)
        assert peers[0].transport.bans[0].peer == flooder.id


async def test_callers_queued_behind_a_banned_connection_fail_at_once(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # 300 calls at once fill the flooder's send queue; when the ban closes the connection, the
    # callers still waiting for room in it fail then, not at their deadline.
    # A slow link, so the writer waits on it and the queue fills, as it does over real TCP.
    net = MemoryNetwork(seed=1, latency=LATENCY, bandwidth=100_000)
    async with (
        peer(net, "s", identities[0], access=AccessPolicy(rates=FLOOD)) as server,
        open_transport(identities[2], listen=None, network=net.host("f")) as flooder,
    ):
        assert server.address is not None
        server.register("count", Counter())
        start = trio.current_time()
        outcomes = await flood(flooder, server.address, 300)
        assert trio.current_time() - start < 1.0
        assert len(outcomes) == 300 and _rate_limited(outcomes) == 5


async def test_a_daemon_bans_a_member_whose_round_data_is_malformed(
    autojump_clock: Any, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    from tests.test_daemon import PERIOD, daemons

    net = MemoryNetwork(seed=1, latency=0.005)
    async with daemons(tmp_path, net, 3) as ds:
        await trio.sleep(4 * PERIOD)
        assert all(d.peer.transport.bans == [] for d in ds)
        bad = ds[2]
        # a NaN in each of the three spans: every reducer sees one (the bad peer's own reducer
        # names itself, which bans nobody)
        bad.services[0].vector[[5, 400, 800]] = np.nan  # type: ignore[attr-defined]
        await trio.sleep(2 * PERIOD)
        for judge in ds[:2]:
            [ban] = judge.peer.transport.bans
            assert (ban.peer, ban.reason, ban.duration) == (
                bad.identity.peer_id,
                "bad data in a round (nonfinite)",
                60.0,
            )
            assert bad.peer.transport.connection_to(judge.identity.peer_id) is None
        assert bad.peer.transport.bans == []
        logged = [e for e in logs if e["event"] == "peer banned"]
        assert [e["remote"] for e in logged] == [str(bad.identity.peer_id)] * 2
