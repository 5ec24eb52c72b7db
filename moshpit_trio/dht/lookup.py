"""The iterative Kademlia lookup as a pure state machine (sans-IO).

The node drives it::

    lookup = Lookup(local_id, target, table.closest(target, k), skip=backed_off)
    while not lookup.finished:
        for contact in lookup.next_queries():
            start a find_node(target) to contact, which later calls on_response / on_failure
        wait for a reply, a failure, or the soft deadline of a query (then call on_slow)
    result = lookup.closest()
    cancel whatever lookup.in_flight() still lists

Every candidate is in one state: NEW (known, not asked), IN_FLIGHT, SLOW (asked, past its
soft deadline: still awaited, but no longer holding one of the α slots), RESPONDED or FAILED.
Candidates are kept sorted by XOR distance to the target. The *window* is the k closest
candidates that have not failed; only NEW candidates inside it are worth asking, and the lookup
is finished once every candidate in it has responded (the paper's termination rule). A failed
peer leaves the window for good, which lets the next candidate in.

The α slots form a true sliding window: each answer frees one slot, which the next call to
``next_queries`` fills, rather than waiting for a whole round of α to come back. A slow peer
holds no slot, so it never stalls the others; its late answer still counts.

Nothing here trusts the network: a response adds at most k new candidates (extra ones are
ignored), ids that nobody owns simply fail when asked and drop out of the window, duplicates and
answers from peers not in flight are ignored, and each candidate is asked at most once, so the
number of queries is bounded by the number of distinct candidates.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Container, Iterable

from ..identity import PeerID
from .routing import ID_BYTES, Contact

__all__ = ["Lookup"]


class _State(enum.Enum):
    NEW = "new"
    IN_FLIGHT = "in-flight"
    SLOW = "slow"
    RESPONDED = "responded"
    FAILED = "failed"


_PENDING = (_State.IN_FLIGHT, _State.SLOW)


class _Candidate:
    __slots__ = ("contact", "distance", "state")

    def __init__(self, contact: Contact, distance: int) -> None:
        self.contact = contact
        self.distance = distance
        self.state = _State.NEW


class Lookup:
    """One iterative lookup of ``target``: which peers to ask next, and when to stop.

    ``seeds``: where to start (the local table's closest contacts). ``skip``: peers not to ask
    (backed off by the node after recent failures); they are never candidates, even when other
    peers mention them. The local id is never a candidate either.
    """

    def __init__(
        self,
        local_id: PeerID,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        k: int = 20,
        alpha: int = 3,
        skip: Container[PeerID] = (),
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if alpha < 1:
            raise ValueError(f"alpha must be at least 1, got {alpha}")
        target = bytes(target)
        if len(target) != ID_BYTES:
            raise ValueError(f"a lookup target is {ID_BYTES} bytes, got {len(target)}")
        self.local_id = local_id
        self.target = target
        self.k = k
        self.alpha = alpha
        self._target = int.from_bytes(target, "big")
        self._skip = skip
        self._by_id: dict[PeerID, _Candidate] = {}
        self._sorted: list[_Candidate] = []  # by distance to the target, nearest first
        self._active = 0  # IN_FLIGHT, not SLOW: the ones holding an α slot
        self._queried = 0
        self._done = False
        for contact in seeds:
            self._learn(contact)
        self._check_done()

    # -- events ------------------------------------------------------------------------------

    def next_queries(self) -> list[Contact]:
        """The peers to ask now, marked in flight: the nearest NEW ones in the window, as many
        as there are free slots (α minus the queries in flight that are not slow)."""
        free = self.alpha - self._active
        if self._done or free <= 0:
            return []
        chosen: list[Contact] = []
        for cand in self._window():
            if cand.state is _State.NEW:
                cand.state = _State.IN_FLIGHT
                chosen.append(cand.contact)
                if len(chosen) == free:
                    break
        self._active += len(chosen)
        self._queried += len(chosen)
        return chosen

    def on_response(self, peer_id: PeerID, contacts: Iterable[Contact]) -> None:
        """``peer_id`` answered with ``contacts`` (the ones it knows nearest to the target).

        Only the first k are looked at: an honest peer sends at most k, and a dishonest one
        must not be able to flood the candidate list. Ignored unless the peer is in flight.
        """
        cand = self._pending(peer_id)
        if cand is None:
            return
        self._settle(cand, _State.RESPONDED)
        for contact in itertools.islice(contacts, self.k):
            self._learn(contact)
        self._check_done()

    def on_failure(self, peer_id: PeerID) -> None:
        """Asking ``peer_id`` failed (an error, or its hard deadline passed): it is out of this
        lookup for good. Ignored unless the peer is in flight."""
        cand = self._pending(peer_id)
        if cand is None:
            return
        self._settle(cand, _State.FAILED)
        self._check_done()

    def on_slow(self, peer_id: PeerID) -> None:
        """``peer_id`` passed its soft deadline: free its slot for another query, but keep
        waiting for it; a later :meth:`on_response` or :meth:`on_failure` still counts."""
        cand = self._by_id.get(peer_id)
        if cand is None or self._done or cand.state is not _State.IN_FLIGHT:
            return
        cand.state = _State.SLOW
        self._active -= 1

    # -- results -----------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        """True once the k nearest candidates that have not failed all responded (or there are
        none left at all). It stays True: events after that are ignored, so a late answer
        cannot reopen a lookup whose caller has already taken the result."""
        return self._done

    def closest(self, count: int | None = None) -> list[Contact]:
        """The peers that responded, nearest to the target first, at most ``count`` (k)."""
        n = self.k if count is None else count
        return [c.contact for c in self._sorted if c.state is _State.RESPONDED][: max(n, 0)]

    @property
    def queried(self) -> int:
        """How many queries were started."""
        return self._queried

    @property
    def known(self) -> int:
        """How many distinct candidates the lookup has heard of (failed ones included)."""
        return len(self._sorted)

    def in_flight(self) -> list[PeerID]:
        """The peers asked and not yet settled, slow ones included (cancel these when done)."""
        return [c.contact.peer_id for c in self._sorted if c.state in _PENDING]

    def failed(self) -> list[PeerID]:
        """The peers that failed to answer in this lookup (for the node's global back-off)."""
        return [c.contact.peer_id for c in self._sorted if c.state is _State.FAILED]

    def __repr__(self) -> str:
        return (
            f"<Lookup {self.target[:6].hex()} known={self.known} queried={self._queried}"
            f" in_flight={len(self.in_flight())} finished={self._done}>"
        )

    # -- internals ---------------------------------------------------------------------------

    def _learn(self, contact: Contact) -> None:
        pid = contact.peer_id
        if pid in self._by_id or pid == self.local_id or pid in self._skip:
            return
        cand = _Candidate(contact, int(pid) ^ self._target)
        self._by_id[pid] = cand
        bisect.insort(self._sorted, cand, key=lambda c: c.distance)

    def _window(self) -> Iterable[_Candidate]:
        """The k nearest candidates that have not failed, nearest first."""
        return itertools.islice((c for c in self._sorted if c.state is not _State.FAILED), self.k)

    def _pending(self, peer_id: PeerID) -> _Candidate | None:
        cand = self._by_id.get(peer_id)
        if cand is None or self._done or cand.state not in _PENDING:
            return None
        return cand

    def _settle(self, cand: _Candidate, state: _State) -> None:
        if cand.state is _State.IN_FLIGHT:
            self._active -= 1
        cand.state = state

    def _check_done(self) -> None:
        # Vacuously true with no candidates at all, and with fewer than k live ones once all of
        # them answered: nothing is left to ask and nothing is awaited.
        self._done = all(c.state is _State.RESPONDED for c in self._window())
