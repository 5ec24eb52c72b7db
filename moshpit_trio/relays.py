"""Relays at the peer level: a client-mode peer's reservations kept alive and published in the
DHT, and every peer's way to find another peer's relays there (SPEC.md "Relay").

- :func:`encode_relays` / :func:`decode_relays`: the value of a peer's ``mp.relay/PEER`` record
  (sans-IO).
- :func:`rendezvous_order`: a peer's own order of a relay list (sans-IO), so that volunteers
  given the same list spread over all of it.
- :class:`RelayKeeper` (client-mode peers): holds reservations on up to ``want`` of the given
  relays, tried in this peer's rendezvous order, renews each at half its granted time, moves
  to another relay when one refuses or goes away, and publishes the set it holds; withdraws
  the record when it holds none.
- :func:`find_relays`: the relays a peer published, for ``Transport.relay.resolver``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import msgspec
import trio

from .dht.node import DHTNode, default_namespaces
from .dht.records import NamespacePolicy
from .errors import ConfigError, MoshpitError, Unreachable
from .identity import PeerID
from .log import get_logger
from .wire.address import InvalidAddress, PeerAddress
from .wire.connection import Connection
from .wire.transport import Transport

__all__ = [
    "RELAY_NAMESPACE",
    "RelayKeeper",
    "decode_relays",
    "encode_relays",
    "find_relays",
    "relay_key",
    "rendezvous_order",
]

#: the owned namespace of relay records (registered in ``dht.node.default_namespaces``)
RELAY_NAMESPACE: NamespacePolicy = default_namespaces().policy_for(b"mp.relay/")
MAX_RELAYS = 4
#: after a relay refused or could not be reached, wait this long before asking it again
_RETRY = 5.0

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[str])


def relay_key(peer: PeerID) -> str:
    return f"mp.relay/{peer}"


def encode_relays(relays: Sequence[PeerAddress]) -> bytes:
    if not 1 <= len(relays) <= MAX_RELAYS:
        raise ConfigError(f"a relay record lists 1..{MAX_RELAYS} relays")
    return _encoder.encode([str(r) for r in relays])


def decode_relays(value: bytes, owner: PeerID) -> list[PeerAddress]:
    """The relays in a record's value, in order; addresses that do not parse, name the owner
    itself, or come after the first ``MAX_RELAYS`` are left out. Undecodable: none."""
    try:
        texts = _decoder.decode(value)
    except msgspec.DecodeError:
        return []
    relays: list[PeerAddress] = []
    for text in texts[:MAX_RELAYS]:
        try:
            address = PeerAddress.parse(text)
        except InvalidAddress:
            continue
        if address.peer_id != owner and address not in relays:
            relays.append(address)
    return relays


async def find_relays(dht: DHTNode, peer: PeerID) -> list[PeerAddress]:
    """The relays ``peer`` published (none when it published none, or on any failure)."""
    try:
        records = await dht.get_records(relay_key(peer))
    except MoshpitError:
        return []
    record = records.get(peer.to_bytes())
    if record is None or not record.value:
        return []
    return decode_relays(record.value, peer)


_RENDEZVOUS_DOMAIN = b"moshpit/1 relay rendezvous\x00"


def rendezvous_order(peer: PeerID, relays: Sequence[PeerAddress]) -> list[PeerAddress]:
    """``relays`` (duplicates dropped) in ``peer``'s own order: by sha256 of the two PeerIDs,
    highest first (rendezvous hashing). Volunteers given the same list each start from a
    different relay, so ``want`` reservations each spread over the whole list instead of all
    landing on its first entries; a peer's order is the same after a restart; and a relay
    that is added or removed moves only the peers that put it first.

    >>> from moshpit_trio.identity import Identity
    >>> ids = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(1, 4)]
    >>> relays = [PeerAddress.parse(f"ws://r{i}:1/{p}") for i, p in enumerate(ids)]
    >>> me = Identity.from_seed(b"v" * 32).peer_id
    >>> sorted(rendezvous_order(me, relays), key=str) == sorted(relays, key=str)
    True
    >>> rendezvous_order(me, relays) == rendezvous_order(me, list(reversed(relays)))
    True
    """
    unique = list(dict.fromkeys(relays))

    def weight(relay: PeerAddress) -> bytes:
        return hashlib.sha256(
            _RENDEZVOUS_DOMAIN + peer.to_bytes() + relay.peer_id.to_bytes()
        ).digest()

    # ties (the same relay PeerID at two addresses) keep the list's order: sort is stable
    return sorted(unique, key=weight, reverse=True)


class RelayKeeper:
    """Keep reservations on up to ``want`` of ``relays`` and publish them (see the module
    docstring). The relays are tried in this peer's ``rendezvous_order`` of the list, not the
    list's own order. Run ``run`` in the peer's nursery."""

    def __init__(
        self,
        transport: Transport,
        dht: DHTNode,
        relays: Sequence[PeerAddress],
        *,
        want: int = 2,
        ttl: float = 120.0,
        timeout: float = 5.0,
    ) -> None:
        if not relays:
            raise ConfigError("a relay keeper needs at least one relay address")
        if not 1 <= want <= MAX_RELAYS:
            raise ConfigError(f"want must be 1..{MAX_RELAYS}, got {want!r}")
        self.transport = transport
        self.dht = dht
        #: the relays to hold, in the order they are tried (``rendezvous_order``)
        self.relays = rendezvous_order(transport.peer_id, relays)
        self.want = want
        self.ttl = ttl
        self.timeout = timeout
        #: the relays we hold a reservation on, and when to renew each (trio time)
        self.held: dict[PeerAddress, float] = {}
        self._retry_at: dict[PeerAddress, float] = {}
        self._published: list[PeerAddress] | None = None
        self._publish_by = math.inf
        #: why the last store or withdrawal of the record failed (None: it did not)
        self.publish_error: str | None = None
        self._wake = trio.Event()
        self.log = get_logger(peer=transport.peer_id.short)

    @property
    def published(self) -> tuple[PeerAddress, ...]:
        """The relays the record in the DHT names now (empty: no record of ours)."""
        return tuple(self._published or ())

    @property
    def republish_at(self) -> float:
        """When the record is stored again (trio time; inf: no record to keep up)."""
        return self._publish_by

    def wake(self) -> None:
        """Publish again now, whatever is due: the peer has just joined the swarm (a record
        stored before that reached nobody), or its view of the swarm changed."""
        self._publish_by = -math.inf
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            await self.step()
            if not started:
                task_status.started()
                started = True
            await self._sleep()

    async def _sleep(self) -> None:
        """Until something is due, or a held relay's connection ends (then at once: its
        reservation is gone, and the peer should move to another relay within a round)."""
        conns = [
            conn
            for relay in self.held
            if (conn := self.transport.connection_to(relay.peer_id)) is not None
        ]
        with trio.move_on_at(self._next_wakeup()):
            async with trio.open_nursery() as nursery:

                async def watch(conn: Connection) -> None:
                    await conn.wait_closed()
                    nursery.cancel_scope.cancel()

                async def woken() -> None:
                    await self._wake.wait()
                    nursery.cancel_scope.cancel()

                for conn in conns:
                    nursery.start_soon(watch, conn)
                nursery.start_soon(woken)
        self._wake = trio.Event()

    def _next_wakeup(self) -> float:
        times = [*self.held.values(), self._publish_by]
        if len(self.held) < self.want:
            pending = [self._retry_at.get(r, 0.0) for r in self.relays if r not in self.held]
            times.append(max(trio.current_time(), min(pending, default=math.inf)))
        return max(trio.current_time() + 0.001, min(times))

    async def step(self) -> None:
        """Renew what is due, reserve on more relays when short, publish when changed."""
        now = trio.current_time()
        for relay, renew_at in list(self.held.items()):
            if not self._connected(relay):
                del self.held[relay]  # its connection ended: the reservation with it
            elif renew_at <= now:
                await self._reserve(relay)
        for relay in self.relays:
            if len(self.held) >= self.want:
                break
            if relay not in self.held and self._retry_at.get(relay, -math.inf) <= now:
                await self._reserve(relay)
        await self._publish()

    def _connected(self, relay: PeerAddress) -> bool:
        conn = self.transport.connection_to(relay.peer_id)
        return conn is not None and conn.via is None

    async def _reserve(self, relay: PeerAddress) -> None:
        try:
            granted = await self.transport.relay.reserve(relay, self.ttl, timeout=self.timeout)
        except MoshpitError as exc:
            self.held.pop(relay, None)
            self._retry_at[relay] = trio.current_time() + _RETRY
            self.log.info("relay reservation failed", relay=str(relay), error=str(exc))
            return
        self.held[relay] = trio.current_time() + granted / 2

    async def _publish(self) -> None:
        held = [r for r in self.relays if r in self.held]
        if held == self._published and trio.current_time() < self._publish_by:
            return
        key = relay_key(self.transport.peer_id)
        try:
            if held:
                ttl = min(RELAY_NAMESPACE.max_ttl, self.ttl)
                stored = await self.dht.store(key, encode_relays(held), ttl)
                if stored - (0 if self.dht.client_mode else 1) < 1:
                    # No other peer holds it (this one has not joined yet, or lost everyone):
                    # a record nobody can read is not published. Try again soon.
                    raise Unreachable("no other peer took the record")
                self._publish_by = trio.current_time() + ttl / 2
            elif self._published:
                await self.dht.withdraw(key)
                self._publish_by = math.inf
            self._published = held
            self.publish_error = None
        except MoshpitError as exc:
            self.log.info("could not publish relays", error=str(exc))
            self.publish_error = f"{type(exc).__name__}: {exc}"
            self._publish_by = trio.current_time() + _RETRY
