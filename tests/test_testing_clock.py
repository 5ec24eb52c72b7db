"""moshpit_trio.testing.pin_unix_time: Unix time as the library sees it, tied to trio's clock."""

from __future__ import annotations

from typing import Any

import trio
import trio.testing

from moshpit_trio.identity import Identity
from moshpit_trio.peer import open_peer
from moshpit_trio.testing import PINNED_UNIX_TIME, MemoryNetwork, pin_unix_time


async def test_a_pinned_run_reads_unix_time_as_the_pin_plus_trios_clock(
    autojump_clock: Any,
) -> None:
    await trio.sleep(2.5)  # the pin holds from trio's zero, whenever it is called
    pin_unix_time(5_000.0)
    net = MemoryNetwork(seed=0)
    async with open_peer(
        Identity.from_seed(bytes([1]) * 32), listen="h0:0", network=net.host("h0")
    ) as peer:
        assert peer.dht.now() == 5_002.5  # the pin was made 2.5 s in
        await trio.sleep(10.0)
        assert peer.dht.now() == 5_012.5


def test_two_virtual_runs_see_the_same_unix_times() -> None:
    async def main() -> list[float]:
        pin_unix_time()
        net = MemoryNetwork(seed=0)
        seen = []
        async with open_peer(
            Identity.from_seed(bytes([2]) * 32), listen="h0:0", network=net.host("h0")
        ) as peer:
            for _ in range(3):
                await trio.sleep(0.7)
                seen.append(peer.dht.now())
        return seen

    runs = [trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) for _ in range(2)]
    assert runs[0] == runs[1] == [PINNED_UNIX_TIME + 0.7 * k for k in (1, 2, 3)]
