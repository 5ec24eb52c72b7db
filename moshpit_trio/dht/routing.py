"""The Kademlia routing table: XOR distance, k-buckets and replacement caches (sans-IO).

Ids are 256-bit (a PeerID). Bucket ``i`` holds the peers whose XOR distance to the local id
has its highest set bit at position ``i``, that is distances in ``[2**i, 2**(i+1))``; bucket 255
covers half of the id space, bucket 0 a single id. The 256 buckets are fixed instead of split
on demand: the layout is simpler and the contents are the same, because a split tree only ever
splits the bucket holding the local id, which ends up with exactly these ranges.

Only peers that completed the authenticated handshake are given to :meth:`RoutingTable.add`:
a PeerID that a remote merely *mentions* (in a find_node answer) is a lookup candidate, never a
table entry, so nobody can fill our table with made-up or other people's ids.

Eviction follows the paper's rule that long-lived contacts are the most likely to stay: when a
bucket is full, a newcomer waits in the bucket's replacement cache while the node pings the
least-recently-seen contact. If it answers (:meth:`RoutingTable.seen`) it stays and the
newcomer keeps waiting; if it does not (:meth:`RoutingTable.failed`) it is evicted, but only
when a replacement is there to take its place: a table that keeps a stale contact still knows
more than one that keeps nothing, and the contact may come back after a network blip.

The table does no I/O and reads no clock: the time is passed in as ``now`` (any monotonic
float, e.g. ``trio.current_time()``) and randomness comes from a passed ``random.Random``.
"""

from __future__ import annotations

import dataclasses
import random
from collections import OrderedDict, defaultdict
from collections.abc import Container, Iterator

from ..identity import PeerID
from ..wire.address import PeerAddress

__all__ = [
    "ID_BITS",
    "ID_BYTES",
    "Contact",
    "RoutingTable",
    "bucket_index",
    "distance",
]

ID_BITS = 256
ID_BYTES = ID_BITS // 8


@dataclasses.dataclass(frozen=True, slots=True)
class Contact:
    """A peer and where to reach it.

    The address names the peer too (``ws://HOST:PORT/PEER_ID``), and dialing it checks that
    whoever answers owns that id; the two must agree, or a contact could send us to one peer
    while claiming to be another.
    """

    peer_id: PeerID
    address: PeerAddress

    def __post_init__(self) -> None:
        if self.address.peer_id != self.peer_id:
            raise ValueError(
                f"contact {self.peer_id.short}: its address {self.address} names another peer"
            )

    @classmethod
    def from_address(cls, address: PeerAddress) -> Contact:
        return cls(address.peer_id, address)


def _as_int(x: PeerID | bytes) -> int:
    if isinstance(x, PeerID):
        return int(x)
    if len(x) != ID_BYTES:
        raise ValueError(f"a DHT id is {ID_BYTES} bytes, got {len(x)}")
    return int.from_bytes(x, "big")


def distance(a: PeerID | bytes, b: PeerID | bytes) -> int:
    """The XOR distance between two 256-bit ids."""
    return _as_int(a) ^ _as_int(b)


def bucket_index(local: PeerID, other: PeerID | bytes) -> int:
    """Which bucket of ``local``'s table ``other`` falls in: the highest differing bit, 0..255."""
    d = distance(local, other)
    if d == 0:
        raise ValueError("the local id has no bucket")
    return d.bit_length() - 1


@dataclasses.dataclass(slots=True)
class _Entry:
    contact: Contact
    key: int  # int(peer_id), kept so closest() does not convert ids on every call
    last_seen: float
    failures: int = 0


class RoutingTable:
    """256 k-buckets around ``local_id``, each with a bounded replacement cache.

    Within a bucket, contacts are ordered from least to most recently seen: the first one is the
    one to ping when the bucket is full and a newcomer arrives, unless it was heard from within
    ``fresh_for`` seconds and has not failed since: then it has just proved itself, and a ping
    would only say so again (in a swarm whose peers meet new group mates every round, pinging
    on every newcomer cost each peer about ten pings a round). A contact that failed to answer
    and had no replacement is moved to the front, so it is the next to go.
    """

    def __init__(
        self, local_id: PeerID, *, k: int = 20, replacements: int = 20, fresh_for: float = 0.0
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if replacements < 0:
            raise ValueError(f"replacements must be at least 0, got {replacements}")
        self.local_id = local_id
        self._local = int(local_id)
        if not fresh_for >= 0:
            raise ValueError(f"fresh_for must be at least 0, got {fresh_for}")
        self.k = k
        self.replacements = replacements
        self.fresh_for = fresh_for
        # Per bucket index: peer -> entry, least recently seen first. Buckets are made on first
        # use: a table fills a dozen of its 256, and simulations hold hundreds of tables.
        self._buckets: defaultdict[int, OrderedDict[PeerID, _Entry]] = defaultdict(OrderedDict)
        # Per bucket index: peer -> (contact, last_seen), least recent first (most recent last).
        self._replacements: defaultdict[int, OrderedDict[PeerID, tuple[Contact, float]]] = (
            defaultdict(OrderedDict)
        )
        self._entries: dict[PeerID, _Entry] = {}
        # When each bucket's range was last explored by a lookup; None: never.
        self._touched: list[float | None] = [None] * ID_BITS

    # -- the contacts ------------------------------------------------------------------------

    def _index(self, peer_id: PeerID | bytes) -> int:
        d = self._local ^ _as_int(peer_id)
        if d == 0:
            raise ValueError("the routing table never holds the local id")
        return d.bit_length() - 1

    def add(self, contact: Contact, now: float) -> Contact | None:
        """Record a peer that just proved itself over an authenticated connection.

        Returns None when the peer is in the table now (new, or refreshed with its latest
        address), or when it waits in the replacement cache of a full bucket whose
        least-recently-seen contact is fresh (heard from within ``fresh_for``, no failure since).
        Returns that contact when it is not fresh: the node should ping it and report the
        outcome with :meth:`seen` or :meth:`failed` (the latter promotes the newcomer).
        """
        index = self._index(contact.peer_id)
        bucket = self._buckets[index]
        entry = bucket.get(contact.peer_id)
        if entry is not None:
            entry.contact = contact
            entry.last_seen = now
            entry.failures = 0  # it just talked to us: whatever failed before is over
            bucket.move_to_end(contact.peer_id)
            return None
        if len(bucket) < self.k:
            self._replacements[index].pop(contact.peer_id, None)
            self._insert(index, contact, now)
            return None
        self._cache(index, contact, now)
        oldest = next(iter(bucket.values()))
        if oldest.failures == 0 and now - oldest.last_seen < self.fresh_for:
            return None
        return oldest.contact

    def _insert(self, index: int, contact: Contact, last_seen: float) -> None:
        entry = _Entry(contact, int(contact.peer_id), last_seen)
        self._buckets[index][contact.peer_id] = entry
        self._entries[contact.peer_id] = entry

    def _cache(self, index: int, contact: Contact, now: float) -> None:
        if self.replacements == 0:
            return
        cache = self._replacements[index]
        cache[contact.peer_id] = (contact, now)
        cache.move_to_end(contact.peer_id)
        while len(cache) > self.replacements:
            # The oldest newcomer goes: the most recent ones are the likeliest still online.
            cache.popitem(last=False)

    def seen(self, peer_id: PeerID, now: float) -> None:
        """The peer answered us: it is fresh again and moves to the most-recently-seen end."""
        entry = self._entries.get(peer_id)
        if entry is not None:
            entry.last_seen = now
            entry.failures = 0
            self._buckets[self._index(peer_id)].move_to_end(peer_id)
            return
        if peer_id == self.local_id:
            return
        cache = self._replacements[self._index(peer_id)]
        if peer_id in cache:
            contact, _ = cache[peer_id]
            cache[peer_id] = (contact, now)
            cache.move_to_end(peer_id)

    def failed(self, peer_id: PeerID) -> Contact | None:
        """The peer did not answer (or the connection to it failed).

        With a replacement waiting in its bucket, the peer is evicted and the most recent
        replacement takes its place (returned). Without one, the peer stays, marked stale and
        moved to the least-recently-seen end so that it is the first to go later; returns None.
        A peer not in the table is dropped from the replacement caches; returns None.
        """
        if peer_id == self.local_id:
            return None
        index = self._index(peer_id)
        entry = self._entries.get(peer_id)
        if entry is None:
            self._replacements[index].pop(peer_id, None)
            return None
        entry.failures += 1
        if self._replacements[index]:
            self._drop(index, peer_id)
            return self._promote(index)
        self._buckets[index].move_to_end(peer_id, last=False)
        return None

    def _drop(self, index: int, peer_id: PeerID) -> None:
        del self._buckets[index][peer_id]
        del self._entries[peer_id]

    def _promote(self, index: int) -> Contact | None:
        cache = self._replacements[index]
        if not cache:
            return None
        _, (contact, last_seen) = cache.popitem(last=True)
        self._insert(index, contact, last_seen)
        return contact

    def remove(self, peer_id: PeerID) -> None:
        """Forget a peer (it left, or it misbehaved); a waiting replacement takes its place."""
        if peer_id == self.local_id:
            return
        index = self._index(peer_id)
        self._replacements[index].pop(peer_id, None)
        if peer_id in self._entries:
            self._drop(index, peer_id)
            self._promote(index)

    def get(self, peer_id: PeerID) -> Contact | None:
        entry = self._entries.get(peer_id)
        return entry.contact if entry is not None else None

    def failures(self, peer_id: PeerID) -> int:
        """How many times in a row the peer failed to answer (0: fresh, or not in the table)."""
        entry = self._entries.get(peer_id)
        return entry.failures if entry is not None else 0

    def last_seen(self, peer_id: PeerID) -> float | None:
        entry = self._entries.get(peer_id)
        return entry.last_seen if entry is not None else None

    def bucket(self, index: int) -> list[Contact]:
        """The contacts of one bucket, least recently seen first."""
        bucket = self._buckets.get(_check_index(index))
        return [e.contact for e in bucket.values()] if bucket else []

    def replacement_cache(self, index: int) -> list[Contact]:
        """The newcomers waiting for room in one bucket, most recent first."""
        cache = self._replacements.get(_check_index(index))
        return [c for c, _ in reversed(cache.values())] if cache else []

    def closest(
        self,
        target: PeerID | bytes,
        count: int,
        *,
        exclude: Container[PeerID] = (),
        skip_failing: bool = False,
    ) -> list[Contact]:
        """Up to ``count`` contacts sorted by XOR distance to ``target``, nearest first.

        ``exclude``: peers to leave out (answering a find_node, leave out the asker: it knows
        itself, and listing it would take a slot from a peer it may not know).
        ``skip_failing``: leave out contacts whose last ping went unanswered.
        """
        t = _as_int(target)
        if count <= 0:
            return []
        # The buckets come in distance order, so only the nearest few are looked at (every
        # find_node and find_value a node answers asks this; a pass over the whole table was
        # 4% of a 256-peer swarm's CPU). With b the bucket the target falls in (the highest
        # bit where it differs from us): bucket b's contacts agree with the target above bit
        # b, so they are nearer than 2**b; every bucket below b agrees with us at bit b where
        # the target does not, so all of them lie in [2**b, 2**(b+1)), one band, in no order
        # among themselves; each bucket j above b lies in [2**j, 2**(j+1)). Whole bands are
        # taken, nearest first, until they hold ``count``; then one sort.
        b = (self._local ^ t).bit_length() - 1  # -1: the target is our own id
        buckets = self._buckets
        picked: list[_Entry] = []

        def take(bucket: OrderedDict[PeerID, _Entry]) -> None:
            picked.extend(
                e
                for e in bucket.values()
                if not (skip_failing and e.failures) and e.contact.peer_id not in exclude
            )

        if b in buckets:
            take(buckets[b])
        if len(picked) < count:
            for j in [j for j in buckets if j < b]:
                take(buckets[j])
            for j in sorted(j for j in buckets if j > b):
                if len(picked) >= count:
                    break
                take(buckets[j])
        picked.sort(key=lambda e: e.key ^ t)
        return [e.contact for e in picked[:count]]

    # -- refresh -----------------------------------------------------------------------------

    def mark_refreshed(self, index: int, now: float) -> None:
        """A lookup explored this bucket's range (any lookup for an id in it counts)."""
        self._touched[_check_index(index)] = now

    def note_lookup(self, target: PeerID | bytes, now: float) -> None:
        """Shorthand: a lookup for ``target`` just ran; mark the bucket it falls in refreshed.

        A lookup for the local id itself marks nothing: it explores the nearest buckets, which
        :meth:`stale_buckets` does not ask to refresh anyway (see there).
        """
        d = self._local ^ _as_int(target)
        if d:
            self._touched[d.bit_length() - 1] = now

    def stale_buckets(self, now: float, interval: float) -> list[int]:
        """Buckets worth refreshing: not explored by a lookup within ``interval`` before ``now``.

        Only buckets from the nearest non-empty one up to 255 count. The ones nearer than our
        nearest known peer cover tiny ranges (bucket ``i`` is ``2**i`` ids) that are all but
        certainly empty in a network of any size; refreshing them would cost a lookup each, 200+
        lookups per interval, to find nobody. The periodic self-lookup keeps that area covered.
        A bucket never refreshed is stale; an empty table has nothing to refresh from.
        """
        nearest = min((i for i, bucket in self._buckets.items() if bucket), default=None)
        if nearest is None:
            return []
        return [
            i
            for i in range(nearest, ID_BITS)
            if (t := self._touched[i]) is None or now - t >= interval
        ]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> bytes:
        """A random 32-byte id that falls in bucket ``index`` (a target for its refresh lookup)."""
        index = _check_index(index)
        d = (1 << index) | rng.getrandbits(index) if index else 1
        return (self._local ^ d).to_bytes(ID_BYTES, "big")

    # -- container protocol ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._entries

    def __iter__(self) -> Iterator[Contact]:
        for index in sorted(self._buckets):
            for entry in self._buckets[index].values():
                yield entry.contact

    def __repr__(self) -> str:
        full = sum(1 for b in self._buckets.values() if len(b) >= self.k)
        return f"<RoutingTable {self.local_id.short} contacts={len(self)} full_buckets={full}>"


def _check_index(index: int) -> int:
    if not 0 <= index < ID_BITS:
        raise ValueError(f"a bucket index is 0..{ID_BITS - 1}, got {index}")
    return index
