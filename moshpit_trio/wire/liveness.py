"""Who is answering: when each peer was last heard from, and which ones went silent.

A peer that is killed resets its connections, and the transport learns that at once. A peer
that *freezes* (a laptop that sleeps, a SIGSTOPped process, a paused VM) keeps its connections
open and says nothing: the only sign is silence. This module keeps, per peer, the time of the
last message received from it, and the set of peers found *unresponsive* (silent past a
deadline while something was asked of them).

Unresponsive is a verdict about now, not a ban: the first message that arrives from the peer
again (its queued replies, when a frozen process is continued) clears it. Until then the DHT
neither waits on it nor counts it among the closest peers, and matchmaking never picks it.

The rules are plain state (sans-IO); the transport feeds it the times (``heard`` from every
connection's reader) and the probes (``Transport.probe``).

>>> from moshpit_trio.identity import PeerID
>>> live = Liveness()
>>> p = PeerID(bytes(32))
>>> live.mark_unresponsive(p, now=1.0, reason="no answer to a probe in 0.5 s")
True
>>> live.is_unresponsive(p)
True
>>> live.heard(p, now=2.0)
>>> live.is_unresponsive(p), live.last_heard(p)
(False, 2.0)
"""

from __future__ import annotations

import dataclasses
import math

from ..identity import PeerID

__all__ = ["MIN_PROGRESS_TIMEOUT", "Liveness", "Unresponsive", "progress_timeout"]

#: The shortest silence taken for a frozen peer. A busy but live process (reducing a large
#: span, two cores shared by four peers) can stall its event loop for a few hundred
#: milliseconds; half a second of silence from a peer that was asked something is not that.
MIN_PROGRESS_TIMEOUT = 0.5


def progress_timeout(
    window: float, bandwidth: float, chunk: int = 4 * 1024 * 1024, streams: int = 1
) -> float:
    """How long a peer that should be delivering may stay silent before it counts as gone.

    ``window`` is the time the stage has (seconds), ``bandwidth`` the slower end's announced
    bytes per second, ``chunk`` the largest message a healthy sender makes us wait for (a
    stream chunk arrives whole), ``streams`` how many streams share that link at once (a
    member of a group of N sends its parts to, and takes results from, N - 1 others together,
    so each stream gets a share of its link). Four chunks' worth of time at the stream's share
    of the announced bandwidth, so a slow link is not mistaken for a dead peer; at most half
    the window, so a frozen peer is found while the stage can still finish; never under
    ``MIN_PROGRESS_TIMEOUT``.

    >>> progress_timeout(window=2.4, bandwidth=1e8)       # fast link: the floor
    0.5
    >>> round(progress_timeout(window=20.0, bandwidth=12.5e6), 3)  # 100 Mbit/s: 4 chunks
    1.342
    >>> round(progress_timeout(window=20.0, bandwidth=12.5e6, streams=3), 3)  # a third each
    4.027
    >>> progress_timeout(window=2.0, bandwidth=1e6)       # too slow for the window: capped
    1.0
    """
    if not (window > 0 and bandwidth > 0 and chunk > 0):
        raise ValueError("window, bandwidth and chunk must be positive")
    if type(streams) is not int or streams < 1:
        raise ValueError(f"streams must be a positive int, got {streams!r}")
    transfer = 4 * chunk * streams / bandwidth
    return max(MIN_PROGRESS_TIMEOUT, min(transfer, window / 2))


@dataclasses.dataclass(frozen=True, slots=True)
class Unresponsive:
    """Why and since when a peer counts as unresponsive."""

    since: float
    reason: str


class Liveness:
    """Last-heard times and unresponsive verdicts for the peers of one transport."""

    def __init__(self) -> None:
        self._heard: dict[PeerID, float] = {}
        self._unresponsive: dict[PeerID, Unresponsive] = {}

    def heard(self, peer: PeerID, now: float) -> None:
        """A message from ``peer`` arrived: it is alive, whatever was said of it before."""
        self._heard[peer] = now
        if self._unresponsive:
            self._unresponsive.pop(peer, None)

    def last_heard(self, peer: PeerID) -> float:
        """When ``peer`` last said anything to us; ``-inf`` if never."""
        return self._heard.get(peer, -math.inf)

    def heard_since(self, peer: PeerID, since: float) -> bool:
        return self._heard.get(peer, -math.inf) >= since

    def mark_unresponsive(self, peer: PeerID, now: float, reason: str) -> bool:
        """Record that ``peer`` stayed silent when asked; True when it was not marked before."""
        if peer in self._unresponsive:
            return False
        self._unresponsive[peer] = Unresponsive(now, reason)
        return True

    def is_unresponsive(self, peer: PeerID) -> bool:
        return peer in self._unresponsive

    def unresponsive_since(self, peer: PeerID) -> float | None:
        """When ``peer`` was found unresponsive; None when it is not."""
        verdict = self._unresponsive.get(peer)
        return None if verdict is None else verdict.since

    def unresponsive(self) -> dict[PeerID, Unresponsive]:
        """The peers that count as unresponsive now, with why."""
        return dict(self._unresponsive)

    def forget(self, peer: PeerID) -> None:
        """Drop what is known of ``peer`` (it left for good)."""
        self._heard.pop(peer, None)
        self._unresponsive.pop(peer, None)
