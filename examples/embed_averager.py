"""The async API in a trio program: three peers in one process average numpy arrays.

    python examples/embed_averager.py

Each peer is an ``open_peer`` block; each holds one ``MoshpitAverager`` over its arrays, and
``step()`` averages them in place with whoever is in the same group this round. In a real
swarm each peer is its own program on its own machine, bootstrapping from any peer's address.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import numpy as np
import trio

import moshpit_trio


async def peer_main(
    peer: moshpit_trio.Peer, values: np.ndarray, rounds: int, results: dict[str, str]
) -> None:
    averager = moshpit_trio.MoshpitAverager(
        peer, run_id="embed-example", tensors=[values], grid=(3,)
    )
    async with averager:
        for _ in range(rounds):
            report = await averager.step(weight=1.0, timeout=10)
            # the report says exactly what the values now hold: which peers each span averages
            results[peer.id.short] = (
                f"round {report.round}: group of {len(report.members)}, "
                f"succeeded={report.succeeded}, values now {values.round(3)}"
            )


async def main() -> None:
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            moshpit_trio.open_peer(moshpit_trio.Identity.generate())
        )
        peers = [first]
        for _ in range(2):
            peers.append(
                await stack.enter_async_context(
                    moshpit_trio.open_peer(
                        moshpit_trio.Identity.generate(), bootstrap=[first.address]
                    )
                )
            )
        arrays = [np.full(4, float(i), dtype=np.float32) for i in range(len(peers))]
        results: dict[str, str] = {}
        async with trio.open_nursery() as nursery:
            for peer, values in zip(peers, arrays, strict=True):
                nursery.start_soon(peer_main, peer, values, 1, results)
        for name, line in sorted(results.items()):
            print(name, line)


if __name__ == "__main__":
    trio.run(main)
