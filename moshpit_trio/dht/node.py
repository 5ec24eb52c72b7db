"""The Kademlia node: four RPCs over the transport, iterative lookups, and upkeep.

Everything that can be pure lives elsewhere (``routing``, ``lookup``, ``records``); this module
only moves messages and keeps time. A ``DHTNode`` runs inside its peer's nursery:

- handlers for ``dht.ping``, ``dht.find_node``, ``dht.find_value`` and ``dht.store`` on the
  transport; every request names the caller's listen address (empty in client mode), and an
  address whose PeerID is the authenticated caller's enters the routing table;
- lookups drive a ``Lookup`` state machine: up to α queries in flight, and a query that has not
  answered within ``slow_after`` stops counting against α (it may still answer until
  ``rpc_timeout``), so frozen peers cost a lookup a short delay each, not a full timeout;
- unresponsive peers are backed off (doubling, capped), globally, and skipped by lookups;
- background tasks refresh stale buckets, republish this node's own records, and drop expired
  ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import trio

from ..errors import ConfigError, MoshpitError, PeerBusy, ProtocolError, Rejected, Unreachable
from ..identity import PeerID
from ..log import get_logger
from ..wire.address import InvalidAddress, PeerAddress
from ..wire.connection import Request
from ..wire.transport import Transport
from .lookup import Lookup
from .records import (
    NamespacePolicy,
    Namespaces,
    Record,
    RecordRejected,
    RecordStore,
    VerifiedSignatures,
    decode_records,
    encode_records,
    key_id,
    make_record,
    merge,
    validate,
)
from .routing import Contact, RoutingTable

__all__ = [
    "BootstrapFailed",
    "DHTNode",
    "DHTSettings",
    "DHTValue",
    "LookupFailed",
    "LookupStats",
    "default_namespaces",
]


class BootstrapFailed(Unreachable):
    """None of the bootstrap peers answered."""


class LookupFailed(Unreachable):
    """A lookup found no live peer to ask (its whole neighbourhood is dead or unknown)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DHTSettings:
    k: int = 20
    alpha: int = 3
    #: how many of the closest peers a record is stored on
    replicas: int = 5
    #: a query with no answer by then has failed
    rpc_timeout: float = 2.0
    #: a query with no answer by then stops holding one of the α slots
    slow_after: float = 0.25
    #: a whole lookup (and so a get or a store) ends by then
    lookup_timeout: float = 10.0
    #: buckets without a lookup for this long are refreshed
    refresh_interval: float = 600.0
    #: owners store their live records again this often
    republish_interval: float = 300.0
    #: a full bucket's least-recently-seen contact heard from this recently (and not failed
    #: since) is not pinged when a newcomer arrives; the newcomer waits in the replacement cache
    #: (and takes the place of whichever contact next fails a query)
    fresh_for: float = 60.0
    #: the first back-off after a failure; doubles with every further failure
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    #: records accepted per STORE / returned per FIND_VALUE
    max_records_per_message: int = 256

    @property
    def replica_width(self) -> int:
        """How many of the closest peers a get or a store converges on: the replica set and
        one more, not the whole k. Records live on the ``replicas`` closest, so a reader
        finds each on every one of those it reaches, and a record survives as long as one
        holder does: walking on past them only costs queries (and dials, each a handshake).
        With twice the replica set, a 256-peer averaging swarm sent a third more messages a
        round and a get took 658 ms instead of 467 (median, 30% of the peers frozen), with
        the same success."""
        return min(self.k, self.replicas + 1)

    @property
    def near_width(self) -> int:
        """How many of the closest peers a get converges on when its caller asks who they are
        (``get_records(near=...)``): twice the replica set, since a swarm-size estimate fits
        their distances (``auto_grid.estimate_size_around``), and the replica set and one more
        made it noisy (``benchmarks/averaging_sim.py``, p = 0.01, N = 1024: 6.6 rounds to 1e-9
        instead of 6.2)."""
        return min(self.k, 2 * self.replicas)

    def __post_init__(self) -> None:
        for name in ("k", "alpha", "replicas", "max_records_per_message"):
            if getattr(self, name) < 1:
                raise ConfigError(f"DHTSettings.{name} must be at least 1")
        if not self.fresh_for >= 0:
            raise ConfigError("DHTSettings.fresh_for must be at least 0")
        if not 0 < self.slow_after <= self.rpc_timeout <= self.lookup_timeout:
            raise ConfigError("need 0 < slow_after <= rpc_timeout <= lookup_timeout")


@dataclasses.dataclass(frozen=True, slots=True)
class DHTValue:
    value: bytes
    #: unix time
    expiration: float


@dataclasses.dataclass(slots=True)
class LookupStats:
    """What the last lookup cost; benchmarks read it."""

    queried: int = 0
    hops: int = 0
    failed: int = 0


def default_namespaces() -> Namespaces:
    """The namespaces every peer of a swarm must agree on. Unknown ones use DEFAULT_POLICY."""
    return Namespaces(
        [
            # matchmaking announcements and training progress: owned, short-lived
            NamespacePolicy(b"mp.avg", max_ttl=300.0, owned=True),
            NamespacePolicy(b"mp.progress", max_ttl=3600.0, owned=True),
            # the relays a client-mode peer holds reservations on (SPEC.md "Relay")
            NamespacePolicy(
                b"mp.relay",
                max_ttl=600.0,
                owned=True,
                max_value_size=1024,
                max_subkeys=8,
                keyed_by_owner=True,
            ),
        ]
    )


# -- messages ------------------------------------------------------------------------------
# Every request names the sender's listen address ("" in client mode). Contacts travel as
# addresses (ws://HOST:PORT/PEER_ID): the PeerID is in them, and dialing one checks it.


class _Ping(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    sender: str


class _FindNode(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    sender: str
    target: bytes


class _FindValue(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    sender: str
    key: bytes


class _Store(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    sender: str
    records: bytes


class _Contacts(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    contacts: list[str]


class _Values(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    records: bytes
    contacts: list[str]


class _Stored(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    stored: list[bool]


_encoder = msgspec.msgpack.Encoder()
_MAX_ADDRESS_LIST = 64


class DHTNode:
    """A peer's Kademlia node; made and run by ``open_peer`` (``peer.dht``)."""

    def __init__(
        self,
        transport: Transport,
        *,
        settings: DHTSettings | None = None,
        namespaces: Namespaces | None = None,
        client_mode: bool = False,
        seed: int | None = None,
    ) -> None:
        self.transport = transport
        self.id = transport.peer_id
        self.settings = settings or DHTSettings()
        self.namespaces = namespaces or default_namespaces()
        self.client_mode = client_mode or transport.address is None
        self.table = RoutingTable(self.id, k=self.settings.k, fresh_for=self.settings.fresh_for)
        #: records whose signatures verified here lately (lookups see each from every replica)
        self.verified = VerifiedSignatures()
        self.records = RecordStore(self.namespaces, verified=self.verified)
        self.last_lookup = LookupStats()
        self.log = get_logger(peer=self.id.short)
        self._rng = random.Random(seed if seed is not None else int(self.id) & 0xFFFFFFFF)
        self._own: dict[tuple[bytes, bytes], Record] = {}
        self._backoff: dict[PeerID, tuple[float, float]] = {}  # peer -> (until, last delay)
        self._pinging: set[PeerID] = set()
        # Contacts dropped from the table for going silent (transport.liveness), put back
        # once they are heard from again.
        self._dropped: dict[PeerID, Contact] = {}
        self._nursery: trio.Nursery | None = None
        # set (and replaced) whenever another peer's store lands here (store_landed)
        self._landed = trio.Event()
        # Wall-clock time that follows trio's clock: records carry unix expirations, and under a
        # virtual clock in tests they must age with virtual time. One offset per trio run, so
        # that every node of a simulated swarm reads the same clock even when nodes start
        # minutes of virtual time apart (a per-node offset drifts by virtual minus wall time).
        self._epoch_offset = _epoch_offset()
        self._decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
            t: msgspec.msgpack.Decoder(t) for t in (_Ping, _FindNode, _FindValue, _Store)
        }
        self._answer_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {
            t: msgspec.msgpack.Decoder(t) for t in (_Contacts, _Values, _Stored)
        }

    def now(self) -> float:
        """Unix time, advancing with trio's clock."""
        return self._epoch_offset + trio.current_time()

    @property
    def _sender(self) -> str:
        address = self.transport.address
        return "" if self.client_mode or address is None else str(address)

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the DHT until cancelled (the peer's nursery owns this)."""
        t = self.transport
        t.register("dht.ping", self._on_ping)
        t.register("dht.find_node", self._on_find_node)
        t.register("dht.find_value", self._on_find_value)
        t.register("dht.store", self._on_store)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._refresh_loop)
                nursery.start_soon(self._republish_loop)
                nursery.start_soon(self._expire_loop)
                task_status.started()
        finally:
            for name in ("dht.ping", "dht.find_node", "dht.find_value", "dht.store"):
                t.registry.unregister(name)

    async def bootstrap(self, addresses: Sequence[str | PeerAddress]) -> int:
        """Ping every bootstrap address, then look ourselves up to fill the table.

        Returns how many bootstrap peers answered; ``BootstrapFailed`` names each address and
        why it failed when none did.
        """
        parsed: list[PeerAddress] = []
        for a in addresses:
            try:
                parsed.append(a if isinstance(a, PeerAddress) else PeerAddress.parse(a))
            except InvalidAddress as exc:
                raise ConfigError(f"bad bootstrap address: {exc}") from None
        parsed = [a for a in parsed if a.peer_id != self.id]
        if not parsed:
            return 0
        errors: dict[str, str] = {}

        async def ping(address: PeerAddress) -> None:
            try:
                await self._call(Contact(address.peer_id, address), "dht.ping", _Ping(self._sender))
            except MoshpitError as exc:
                errors[str(address)] = f"{type(exc).__name__}: {exc}"

        async with trio.open_nursery() as nursery:
            for address in parsed:
                nursery.start_soon(ping, address)
        answered = len(parsed) - len(errors)
        if not answered:
            listing = "; ".join(f"{a} ({why})" for a, why in errors.items())
            raise BootstrapFailed(f"no bootstrap peer answered: {listing}")
        await self.find_closest(self.id.to_bytes())
        return answered

    # -- public calls ------------------------------------------------------------------------

    async def store(
        self,
        key: str | bytes,
        value: bytes,
        ttl: float,
        *,
        subkey: str | bytes | PeerID | None = None,
        replicas: int | None = None,
        lookup: bool = True,
    ) -> int:
        """Store ``value`` under ``key`` (and ``subkey``) for ``ttl`` seconds on the
        ``replicas`` closest peers (the settings' unless given, at most ``k``); returns how
        many accepted it (this node included).

        ``lookup=False`` stores on the closest peers of this node's own routing table, with no
        lookup first (one round trip instead of a few): for a swarm small enough that the
        table holds all of it, as matchmaking's one-group swarms are. A peer the table does
        not know then has no copy; a reader finds the record on the others all the same.

        In an owned namespace (``mp.avg/...``) the record is signed by this peer and its subkey
        is this peer's PeerID. An empty ``value`` withdraws an earlier entry.
        """
        if replicas is not None and (
            isinstance(replicas, bool)
            or not isinstance(replicas, int)
            or not 1 <= replicas <= self.settings.k
        ):
            raise ConfigError(f"replicas must be an int from 1 to k={self.settings.k}")
        if not isinstance(lookup, bool):
            raise ConfigError(f"lookup is True or False, not {lookup!r}")
        record = self._make(key, value, ttl, subkey)
        self._own[(record.id, record.subkey)] = record
        return await self._store_record(record, replicas, lookup=lookup)

    async def withdraw(
        self, key: str | bytes, *, subkey: str | bytes | PeerID | None = None
    ) -> int:
        """Replace this peer's entry under ``key`` with a tombstone that outlives it."""
        policy = self.namespaces.policy_for(_key_bytes(key))
        ttl = min(policy.max_ttl, 3600.0)
        return await self.store(key, b"", ttl, subkey=subkey)

    async def get(self, key: str | bytes) -> DHTValue | dict[bytes, DHTValue] | None:
        """The value under ``key``; or, for a key with subkeys, the dict of its live subkeys
        with their values and expirations; ``None`` when nothing live is stored."""
        records = await self.get_records(key)
        live = {sk: r for sk, r in records.items() if r.value}
        if not live:
            return None
        if set(live) == {b""}:
            r = live[b""]
            return DHTValue(r.value, r.expiration)
        return {sk: DHTValue(r.value, r.expiration) for sk, r in live.items()}

    async def get_records(
        self, key: str | bytes, *, near: list[Contact] | None = None
    ) -> dict[bytes, Record]:
        """All live records under ``key`` by subkey (withdrawals included), merged from the
        closest peers' answers and this node's own store. ``near``, when given, is extended
        with the closest peers to the key that answered, closest first (``near_width`` of
        them, where a plain get converges on ``replica_width``): what the swarm looks like
        around the key, the same for every reader (``auto_grid.estimate_size_around``)."""
        kid = key_id(_key_bytes(key))
        found: list[Record] = list(self.records.get(kid, self.now()))
        width = self.settings.replica_width if near is None else self.settings.near_width
        closest = await self._lookup(kid, want_values=True, found=found, width=width)
        if near is not None:
            near.extend(closest)
        return merge(found)

    def held_here(self, key: str | bytes) -> dict[bytes, Record]:
        """The live records under ``key`` that this node holds as one of its replicas, by
        subkey (withdrawals included): what a :meth:`get_records` would merge in from here,
        without asking anyone. Empty where nothing is held (and always in client mode, where
        nobody stores here)."""
        return merge(self.records.get(key_id(_key_bytes(key)), self.now()))

    def store_landed(self) -> trio.Event:
        """An event set when the next store from another peer lands here (whatever its key,
        whether or not its records were new): whoever waits for its own copy of a key to fill
        up (``held_here``) looks again then, instead of reading the key a while later."""
        return self._landed

    async def find_peer(self, peer_id: PeerID) -> PeerAddress | None:
        """The address of ``peer_id``, if a lookup finds it."""
        known = self.table.get(peer_id)
        if known is not None:
            return known.address
        for contact in await self.find_closest(peer_id.to_bytes()):
            if contact.peer_id == peer_id:
                return contact.address
        return None

    async def find_closest(self, target: bytes) -> list[Contact]:
        """The k closest live peers to ``target`` (a 32-byte id)."""
        return await self._lookup(target, want_values=False, found=None)

    # -- lookups -----------------------------------------------------------------------------

    def _skip(self) -> _Skip:
        """Peers not to ask now: those backing off after a failure, and those found
        unresponsive (checked at each use)."""
        now = trio.current_time()
        backed_off = {p for p, (until, _) in self._backoff.items() if until > now}
        return _Skip(backed_off, self.transport.liveness)

    async def _lookup(
        self,
        target: bytes,
        *,
        want_values: bool,
        found: list[Record] | None,
        width: int | None = None,
    ) -> list[Contact]:
        """An iterative lookup that ends once the ``width`` closest peers it knows of (default
        k) have answered."""
        s = self.settings
        self._restore_dropped()
        # Neither asked nor counted among the closest: peers backing off after a failure, and
        # peers found unresponsive (also those found so while this lookup runs).
        skip = self._skip()
        seeds = self.table.closest(target, s.k, exclude=skip)
        lookup = Lookup(self.id, target, seeds, k=width or s.k, alpha=s.alpha, skip=skip)
        depth = {c.peer_id: 1 for c in seeds}
        started: dict[PeerID, float] = {}
        asked: dict[Contact, float] = {}
        stats = LookupStats()
        send, receive = trio.open_memory_channel[tuple[Contact, Any]](math.inf)
        if not seeds:
            self.last_lookup = stats
            return []
        with trio.move_on_after(s.lookup_timeout) as scope:
            async with trio.open_nursery() as nursery:
                while not lookup.finished:
                    queries = lookup.next_queries()
                    for contact in queries:
                        started[contact.peer_id] = asked[contact] = trio.current_time()
                        # In the node's nursery when it runs: a query the lookup stops waiting
                        # for still runs out its rpc_timeout, so that a silent peer is found
                        # and dropped (its answer, if any, goes unread).
                        owner = self._nursery if self._nursery is not None else nursery
                        owner.start_soon(self._query, contact, target, want_values, send)
                    only_slow_left = not queries and not any(
                        p in started for p in lookup.in_flight()
                    )
                    if only_slow_left and len(lookup.closest()) >= s.replicas:
                        # Only slow peers are left to hear from (frozen ones look just like
                        # this), and enough of the closest have answered to hold every replica
                        # we would have stored: stop, rather than wait out rpc_timeout for each.
                        break
                    if only_slow_left and lookup.closest():
                        # Fewer answered than a replica set (a small swarm, or a neighbourhood
                        # with frozen peers): give the slow ones one more slow_after, not the
                        # whole rpc_timeout, then go with what answered.
                        with trio.move_on_after(s.slow_after):
                            contact, answer = await receive.receive()
                            self._apply(lookup, contact, answer, depth, stats, found)
                            continue
                        break
                    slow_at = min(
                        (started[p] + s.slow_after for p in lookup.in_flight() if p in started),
                        default=math.inf,
                    )
                    with trio.move_on_at(slow_at):
                        contact, answer = await receive.receive()
                        self._apply(lookup, contact, answer, depth, stats, found)
                        continue
                    # Nothing answered in time: whoever is overdue stops holding a slot.
                    for p in lookup.in_flight():
                        if p in started and started.pop(p) + s.slow_after <= trio.current_time():
                            lookup.on_slow(p)
                nursery.cancel_scope.cancel()  # stragglers: their answers no longer matter
        self._note_silent(asked, lookup.in_flight())
        closest = lookup.closest()
        stats.queried = lookup.queried
        stats.hops = max((depth.get(c.peer_id, 1) for c in closest), default=0)
        self.last_lookup = stats
        if scope.cancelled_caught:
            self.log.info("lookup ran out of time", target=target[:4].hex(), queried=stats.queried)
        if not closest and lookup.queried:
            raise LookupFailed(
                f"none of the {lookup.queried} peers asked about {target[:6].hex()}… answered"
            )
        if closest:
            self.table.note_lookup(target, trio.current_time())
        return closest

    def _apply(
        self,
        lookup: Lookup,
        contact: Contact,
        answer: Any,
        depth: dict[PeerID, int],
        stats: LookupStats,
        found: list[Record] | None,
    ) -> None:
        if isinstance(answer, BaseException):
            stats.failed += 1
            lookup.on_failure(contact.peer_id)
            return
        contacts, records = answer
        d = depth.get(contact.peer_id, 1)
        for c in contacts:
            depth.setdefault(c.peer_id, d + 1)
        if found is not None:
            found.extend(records)
        lookup.on_response(contact.peer_id, contacts)

    async def _query(
        self,
        contact: Contact,
        target: bytes,
        want_values: bool,
        send: trio.MemorySendChannel[tuple[Contact, Any]],
    ) -> None:
        """One lookup query; reports (contacts, records) or the error on ``send``."""
        try:
            if want_values:
                raw = await self._call(contact, "dht.find_value", _FindValue(self._sender, target))
                values = self._decode_answer(_Values, raw, contact)
                records = self._check_records(decode_records(values.records), target, contact)
                answer: Any = (self._parse_contacts(values.contacts, contact), records)
            else:
                raw = await self._call(contact, "dht.find_node", _FindNode(self._sender, target))
                found = self._decode_answer(_Contacts, raw, contact)
                answer = (self._parse_contacts(found.contacts, contact), [])
        except (MoshpitError, RecordRejected) as exc:
            answer = exc
        # The lookup may be over (this query ran on in the node's nursery): its answer then
        # goes unread.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait((contact, answer))

    def _check_records(self, records: list[Record], target: bytes, sender: Contact) -> list[Record]:
        """Keep the records that belong to ``target`` and pass validation; log forgeries."""
        if len(records) > self.settings.max_records_per_message:
            raise RecordRejected("too-large", f"{len(records)} records in one answer")
        good: list[Record] = []
        now = self.now()
        for record in records:
            try:
                if record.id != target:
                    raise RecordRejected("malformed", "a record for another key")
                validate(
                    record, self.namespaces.policy_for(record.key), now, verified=self.verified
                )
            except RecordRejected as exc:
                if exc.reason == "expired":
                    # Not the sender's fault: a record that lived to its last moment (an
                    # announcement lives as long as its round) can expire on the way.
                    continue
                self.log.warning(
                    "dropped a bad record from a peer",
                    remote=sender.peer_id.short,
                    reason=exc.reason,
                    detail=exc.detail,
                )
                continue
            good.append(record)
        return good

    def _parse_contacts(self, addresses: list[str], sender: Contact) -> list[Contact]:
        contacts: list[Contact] = []
        for text in addresses[: self.settings.k]:
            try:
                address = PeerAddress.parse(text)
            except InvalidAddress:
                self.log.info("ignored a bad contact", remote=sender.peer_id.short)
                continue
            if address.peer_id != self.id:
                contacts.append(Contact(address.peer_id, address))
        return contacts

    def _decode_answer(self, kind: type[Any], raw: bytes, sender: Contact) -> Any:
        try:
            return self._answer_decoders[kind].decode(raw)
        except msgspec.DecodeError as exc:
            self._penalize(sender.peer_id)
            raise ProtocolError(
                "malformed", f"bad DHT answer from {sender.peer_id.short}: {exc}"
            ) from None

    # -- calls to other nodes ----------------------------------------------------------------

    async def _call(self, contact: Contact, name: str, message: msgspec.Struct) -> bytes:
        """One RPC with the per-RPC deadline; keeps the routing table and back-off current."""
        start = trio.current_time()
        try:
            answer = await self.transport.call(
                contact.address, name, _encoder.encode(message), timeout=self.settings.rpc_timeout
            )
        except PeerBusy:
            # Full (HTTP 503 to every dial within the query's time), not gone: nothing against
            # it in the table or in liveness. A crowd of readers of one key (a cold start reads
            # the run's directory all at once) made its replicas look dead to most of them,
            # and each reader then counted the swarm and read the directory from other peers.
            raise
        except MoshpitError as exc:
            self._penalize(contact.peer_id)
            if not self.transport.liveness.heard_since(contact.peer_id, start):
                # Not a word back (a refusal would have been one): frozen, dead or cut off.
                # Out of the table even with no replacement waiting, until it is heard again.
                self.transport.mark_unresponsive(
                    contact.peer_id, f"no answer to {name} ({type(exc).__name__})"
                )
                self._drop_silent(contact)
            raise
        self._backoff.pop(contact.peer_id, None)
        self._learn(contact)
        return answer

    def _note_silent(self, asked: dict[Contact, float], in_flight: Iterable[PeerID]) -> None:
        """Peers a lookup stopped waiting for that have said nothing at all since they were
        asked, for two slow_afters or more: unresponsive (a frozen peer looks like this), so
        the next lookups neither ask nor wait for them."""
        waiting = set(in_flight)
        now = trio.current_time()
        liveness = self.transport.liveness
        # A lookup waits out exactly two slow_afters for its last slow peers: the sum of
        # clock readings must not fall a rounding error short of that (4.496 - 3.996 < 0.5).
        silent_for = 2 * self.settings.slow_after - 1e-9
        for contact, at in asked.items():
            if (
                contact.peer_id in waiting
                and now - at >= silent_for
                and not liveness.heard_since(contact.peer_id, at)
            ):
                self.transport.mark_unresponsive(
                    contact.peer_id, f"silent for {now - at:.3g} s during a lookup"
                )
                self._drop_silent(contact)

    def _drop_silent(self, contact: Contact) -> None:
        if self.table.get(contact.peer_id) is not None:
            self.table.remove(contact.peer_id)
            self._dropped[contact.peer_id] = contact
            self.log.debug("dropped a silent contact", dropped=contact.peer_id.short)

    def _restore_dropped(self) -> None:
        """Contacts dropped for silence that have spoken since (a frozen peer continued: its
        late answers arrive) go back into the table."""
        liveness = self.transport.liveness
        for peer, contact in list(self._dropped.items()):
            if not liveness.is_unresponsive(peer):
                del self._dropped[peer]
                self._backoff.pop(peer, None)
                self._learn(contact)

    def _penalize(self, peer: PeerID) -> None:
        s = self.settings
        _, last = self._backoff.get(peer, (0.0, 0.0))
        delay = min(s.backoff_max, last * 2 if last else s.backoff_base)
        self._backoff[peer] = (trio.current_time() + delay, delay)
        promoted = self.table.failed(peer)
        if promoted is not None:
            self.log.debug("evicted an unresponsive contact", evicted=peer.short)

    def _learn(self, contact: Contact) -> None:
        """``contact`` proved itself over an authenticated connection: into the table."""
        if contact.peer_id == self.id:
            return
        stale = self.table.add(contact, trio.current_time())
        if stale is not None and stale.peer_id not in self._pinging and self._nursery is not None:
            # A full bucket: keep the old contact if it still answers (Kademlia's rule that
            # long-lived peers are the most likely to stay); the newcomer waits in the cache.
            self._pinging.add(stale.peer_id)
            self._nursery.start_soon(self._ping_stale, stale)

    async def _ping_stale(self, stale: Contact) -> None:
        try:
            await self._call(stale, "dht.ping", _Ping(self._sender))
            self.table.seen(stale.peer_id, trio.current_time())
        except MoshpitError:
            pass  # _call already counted the failure (and evicted it if it could)
        finally:
            self._pinging.discard(stale.peer_id)

    async def _store_record(
        self, record: Record, replicas: int | None = None, *, lookup: bool = True
    ) -> int:
        """Store on the ``replicas`` closest peers (and here, unless in client mode); returns
        how many hold it now (a peer holding a newer copy counts: the record is not lost).
        ``lookup=False``: the closest ones in the routing table (see ``store``)."""
        replicas = replicas or self.settings.replicas
        held = 0
        if not self.client_mode:
            with contextlib.suppress(RecordRejected):
                self.records.put(record, self.now())
                held += 1
        if not lookup:
            # (peers backing off or found unresponsive are left out, as a lookup leaves them)
            self._restore_dropped()
            closest = self.table.closest(record.id, replicas, exclude=self._skip())
        else:
            try:
                width = min(self.settings.k, max(self.settings.replica_width, replicas + 1))
                closest = await self._lookup(record.id, want_values=False, found=None, width=width)
            except LookupFailed:
                closest = []
        payload = _Store(self._sender, encode_records([record]))
        targets = closest[:replicas]
        wave = _StoreWave(held, len(targets))

        async def store_on(contact: Contact) -> None:
            try:
                raw = await self._store_on(contact, payload)
                answer = self._decode_answer(_Stored, raw, contact)
                if answer.stored and answer.stored[0]:
                    wave.held += 1
                    wave.settled.set()
            except MoshpitError:
                pass  # one replica fewer; the count says so
            finally:
                wave.pending -= 1
                if wave.pending == 0:
                    wave.done.set()
                    wave.settled.set()

        # The replicas' stores run in the node's own nursery: once another peer holds the
        # record, a replica that has not answered within slow_after (a frozen one looks
        # just like this) no longer holds up the caller, while its store still runs out its
        # rpc_timeout, so that a silent peer is found and dropped as it would be in a lookup.
        async with trio.open_nursery() as local:
            nursery = self._nursery if self._nursery is not None else local
            for contact in targets:
                nursery.start_soon(store_on, contact)
            if targets:
                # With no lookup first, the store is where a frozen replica is first asked: it
                # is waited for as long as a lookup would wait (two slow_afters), so that it is
                # found silent before the caller goes on to read the key (a read would wait for
                # it all over again).
                slow = self.settings.slow_after * (1 if lookup else 2)
                with trio.move_on_after(slow):
                    await wave.done.wait()
                # Nobody else holds it yet: wait for the first that does (or for them all).
                with trio.move_on_after(self.settings.rpc_timeout):
                    await wave.settled.wait()
        return wave.held

    async def _store_on(self, contact: Contact, payload: _Store) -> bytes:
        """One replica's store. Silent for two slow_afters (not a word back), it is taken for
        unresponsive and dropped, as a lookup takes a peer it waits for that long: the next
        reads neither ask nor wait for it. (A store with no lookup first, on the routing
        table's peers, is where a frozen peer is first asked.) Heard from meanwhile, it is
        alive but slow, and is asked again with the whole rpc_timeout."""
        asked = trio.current_time()
        with trio.move_on_after(2 * self.settings.slow_after):
            return await self._call(contact, "dht.store", payload)
        if not self.transport.liveness.heard_since(contact.peer_id, asked):
            self.transport.mark_unresponsive(
                contact.peer_id, f"silent for {trio.current_time() - asked:.3g} s during a store"
            )
            self._drop_silent(contact)
            raise Unreachable(f"{contact.peer_id.short} did not answer a store")
        return await self._call(contact, "dht.store", payload)

    def _make(
        self, key: str | bytes, value: bytes, ttl: float, subkey: str | bytes | PeerID | None
    ) -> Record:
        kb = _key_bytes(key)
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ConfigError(f"a DHT value is bytes, got {type(value).__name__}")
        if not isinstance(ttl, int | float) or not ttl > 0:
            raise ConfigError(f"ttl must be a positive number of seconds, got {ttl!r}")
        policy = self.namespaces.policy_for(kb)
        if ttl > policy.max_ttl:
            raise ConfigError(
                f"ttl {ttl:g} s is over the {policy.max_ttl:g} s allowed in namespace "
                f"{policy.namespace.decode(errors='replace')!r}"
            )
        sk = subkey.to_bytes() if isinstance(subkey, PeerID) else _key_bytes(subkey or b"")
        expiration = self.now() + ttl
        try:
            if policy.owned:
                if sk and sk != self.id.to_bytes():
                    raise ConfigError("in an owned namespace the subkey is always your PeerID")
                record = make_record(kb, bytes(value), expiration, owner=self.transport.identity)
            else:
                record = make_record(kb, bytes(value), expiration, subkey=sk)
            validate(record, policy, self.now())
        except RecordRejected as exc:
            raise ConfigError(f"cannot store under {kb[:60]!r}: {exc}") from None
        return record

    # -- handlers ----------------------------------------------------------------------------

    def _decode(self, kind: type[Any], request: Request) -> Any:
        try:
            message = self._decoders[kind].decode(request.payload)
        except msgspec.DecodeError as exc:
            raise Rejected(f"malformed DHT request: {exc}") from None
        self._note_caller(request.peer, message.sender)
        return message

    def _note_caller(self, peer: PeerID, sender: str) -> None:
        if not sender:
            return  # client mode: uses the DHT, never enters anyone's table
        try:
            address = PeerAddress.parse(sender)
        except InvalidAddress:
            return
        if address.peer_id == peer:  # the claim is about the authenticated caller itself
            self._learn(Contact(peer, address))

    def _contacts_for(self, target: bytes, caller: PeerID) -> list[str]:
        near = self.table.closest(target, self.settings.k, exclude={caller})
        return [str(c.address) for c in near]

    async def _on_ping(self, request: Request) -> bytes:
        self._decode(_Ping, request)
        return b""

    async def _on_find_node(self, request: Request) -> bytes:
        message = self._decode(_FindNode, request)
        _check_id(message.target)
        return _encoder.encode(_Contacts(self._contacts_for(message.target, request.peer)))

    async def _on_find_value(self, request: Request) -> bytes:
        message = self._decode(_FindValue, request)
        _check_id(message.key)
        records = self.records.get(message.key, self.now())[: self.settings.max_records_per_message]
        return _encoder.encode(
            _Values(encode_records(records), self._contacts_for(message.key, request.peer))
        )

    async def _on_store(self, request: Request) -> bytes:
        message = self._decode(_Store, request)
        try:
            records = decode_records(
                message.records, max_records=self.settings.max_records_per_message
            )
        except RecordRejected as exc:
            raise Rejected(f"bad records: {exc}") from None
        now = self.now()
        results: list[bool] = []
        for record in records:
            try:
                # accepted, whether stored or already held in a newer version
                self.records.put(record, now)
                results.append(True)
            except RecordRejected as exc:
                self.log.info("refused a record", remote=request.peer.short, reason=exc.reason)
                results.append(False)
        self._landed.set()
        self._landed = trio.Event()
        return _encoder.encode(_Stored(results))

    # -- upkeep ------------------------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        s = self.settings
        while True:
            await trio.sleep(s.refresh_interval)
            for index in self.table.stale_buckets(trio.current_time(), s.refresh_interval):
                target = self.table.random_id_in_bucket(index, self._rng)
                with contextlib.suppress(MoshpitError):  # a refresh that fails is tried again
                    await self.find_closest(target)
                self.table.mark_refreshed(index, trio.current_time())

    async def _republish_loop(self) -> None:
        while True:
            await trio.sleep(self.settings.republish_interval)
            now = self.now()
            for slot, record in list(self._own.items()):
                if record.expiration <= now:
                    del self._own[slot]
                    continue
                with contextlib.suppress(MoshpitError):  # the next round tries again
                    await self._store_record(record)

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(60.0)
            self.records.expire(self.now())


class _Skip:
    """Peers a lookup neither asks nor counts: a fixed set, and whoever the transport finds
    unresponsive, checked at each use (a peer found silent mid-lookup is skipped from then)."""

    def __init__(self, peers: set[PeerID], liveness: Any) -> None:
        self._peers = peers
        self._liveness = liveness

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers or (
            isinstance(peer, PeerID) and self._liveness.is_unresponsive(peer)
        )


class _StoreWave:
    """One record's stores on its replicas: how many hold it, how many are still out."""

    def __init__(self, held: int, pending: int) -> None:
        self.held = held
        self.pending = pending
        self.done = trio.Event()
        #: set once another replica accepted the record (this node does not count), or all
        #: the stores are done
        self.settled = trio.Event()
        if not pending:
            self.done.set()
            self.settled.set()


_EPOCH_OFFSET: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("moshpit_dht_epoch_offset")


def _epoch_offset() -> float:
    """Unix time minus trio's clock, fixed at its first use in this trio run."""
    try:
        return _EPOCH_OFFSET.get()
    except LookupError:
        offset = time.time() - trio.current_time()
        _EPOCH_OFFSET.set(offset)
        return offset


def _key_bytes(key: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(key, str):
        return key.encode()
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise ConfigError(f"a DHT key is str or bytes, got {type(key).__name__}")


def _check_id(value: bytes) -> None:
    if len(value) != 32:
        raise Rejected(f"a DHT id is 32 bytes, got {len(value)}")
