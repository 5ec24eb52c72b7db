"""The daemon's `status` call and the counters it reads, on the in-memory network."""

from __future__ import annotations

from typing import Any

import trio

from moshpit_trio.identity import Identity
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.transport import open_transport


async def test_transport_counts_bytes_of_live_and_ended_connections(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=1, latency=0.01)
    a_id, b_id, c_id = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))

    async def echo(request: Request) -> bytes:
        return bytes(request.payload)

    async with (
        open_transport(a_id, listen="a:1", network=net.host("a")) as a,
        open_transport(b_id, listen=None, network=net.host("b")) as b,
    ):
        a.register("echo", echo)
        assert (a.bytes_sent, a.bytes_received) == (0, 0)
        assert a.address is not None
        await b.call(a.address, "echo", b"x" * 10_000, timeout=5)
        # Both ends count the same envelopes (the handshake's messages are not envelopes).
        assert a.bytes_received == b.bytes_sent > 10_000
        assert a.bytes_sent == b.bytes_received > 10_000
        # and one envelope each way: the REQUEST, then its RESPONSE
        assert (a.messages_received, b.messages_sent) == (1, 1)
        assert (a.messages_sent, b.messages_received) == (1, 1)
        before = a.bytes_received
        before_messages = a.messages_received
        # A second client comes and goes: its connection's bytes stay counted once it ended.
        async with open_transport(c_id, listen=None, network=net.host("c")) as c:
            await c.call(a.address, "echo", b"y" * 5_000, timeout=5)
            assert len(a.connections()) == 2
        await trio.sleep(1.0)  # a sees the close within a few link latencies
        assert len(a.connections()) == 1
        # c's connection has ended on both sides; every byte it sent (its GOODBYE included)
        # is still in a's total, counted once.
        assert c.bytes_sent > 5_000
        assert a.bytes_received == before + c.bytes_sent
        assert a.messages_received == before_messages + c.messages_sent
