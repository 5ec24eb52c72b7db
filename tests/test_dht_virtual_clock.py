"""Every DHT node of one trio run reads the same unix clock, even under a virtual clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from moshpit_trio.dht.node import DHTValue
from moshpit_trio.identity import Identity
from moshpit_trio.peer import open_peer
from moshpit_trio.testing import MemoryNetwork


def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(32, "big"))


async def test_nodes_started_minutes_apart_agree_on_the_time(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=1, latency=0.01)
    async with open_peer(ident(1), listen="a:0", network=net.host("a")) as a:
        # Virtual minutes pass in almost no wall time: a node made now must not be behind.
        await trio.sleep(400)
        async with open_peer(
            ident(2), listen="b:0", network=net.host("b"), bootstrap=[str(a.address)]
        ) as b:
            assert b.dht.now() == pytest.approx(a.dht.now(), abs=1)
            # an owned record at the namespace's full TTL is accepted by the other node
            assert await a.dht.store("mp.avg/run/0/1", b"hello", ttl=300) == 2
            got = await b.dht.get("mp.avg/run/0/1")
            assert isinstance(got, dict) and [v.value for v in got.values()] == [b"hello"]
            assert isinstance(next(iter(got.values())), DHTValue)
