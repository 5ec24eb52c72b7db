"""Unix time pinned to trio's clock, so that runs under a virtual clock repeat exactly."""

from __future__ import annotations

__all__ = ["PINNED_UNIX_TIME", "pin_unix_time"]

#: where :func:`pin_unix_time` puts trio's clock zero by default (November 2023)
PINNED_UNIX_TIME = 1_700_000_000.0


def pin_unix_time(at_zero: float = PINNED_UNIX_TIME) -> None:
    """In the current trio run, Unix time as the library sees it (``DHTNode.now()``) becomes
    ``at_zero + trio.current_time()``. Call it before the first peer is opened in the run
    (the library reads the offset once per run).

    Averaging rounds are slots of Unix time, and record expiry is Unix time. By default the
    library fixes Unix time minus trio's clock from the wall clock at its first use in a run,
    so under ``trio.testing.MockClock`` each run's rounds fall at a different phase of the
    virtual clock: the same seed gives other groups, other virtual times, other float
    rounding. Pinned, a run repeats. Only for runs whose peers all live in this process (the
    in-memory network): a peer in another process reads the real Unix time.

    Example (a swarm benchmark's trio run)::

        async def main() -> None:
            pin_unix_time()
            net = MemoryNetwork(seed=0)
            ...  # open peers: their rounds now start at the same virtual times every run

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    """
    from ..dht.node import _EPOCH_OFFSET

    _EPOCH_OFFSET.set(at_zero)
