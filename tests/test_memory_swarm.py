"""Hundreds of peers in one process, on the in-memory network under the virtual clock."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio

from moshpit_trio.identity import Identity
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.transport import open_transport

N = 200
LATENCY = 0.02


async def test_two_hundred_peers_call_around_a_ring(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=7, latency=LATENCY)
    identities = [Identity.from_seed(i.to_bytes(32, "big")) for i in range(1, N + 1)]

    async def whoami(request: Request) -> bytes:
        return bytes(request.connection.remote_peer_id) + bytes(request.payload)

    async with AsyncExitStack() as stack:
        peers = [
            await stack.enter_async_context(
                open_transport(ident, listen=f"h{i}:0", network=net.host(f"h{i}"))
            )
            for i, ident in enumerate(identities)
        ]
        for p in peers:
            p.register("whoami", whoami)
        answers: dict[int, bytes] = {}
        start = trio.current_time()

        async def call_next(i: int) -> None:
            target = peers[(i + 1) % N].address
            assert target is not None
            answers[i] = await peers[i].call(target, "whoami", b"!", timeout=10)

        async with trio.open_nursery() as nursery:
            for i in range(N):
                nursery.start_soon(call_next, i)
        elapsed = trio.current_time() - start
        # the callee saw the caller's authenticated PeerID, every time
        assert all(answers[i] == bytes(identities[i].peer_id) + b"!" for i in range(N))
        # connect (1 RTT) + websocket upgrade (1 RTT) + HELLO/RESPONSE (1 RTT) + the call, whose
        # REQUEST travels right behind FINISH (1 RTT): four round trips, exactly
        assert elapsed == pytest.approx(4 * 2 * LATENCY)
        # each peer has two connections: the one it dialed and the one dialed to it
        assert all(len(p.connections()) == 2 for p in peers)
