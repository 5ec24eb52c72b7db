"""``open_peer()``: the actor that owns a peer's whole life.

One block, one nursery: the transport (listener, dialer, connections), the DHT node and every
service attached later (the averager) run inside it, and leaving the block shuts all of it down:
services first, then the DHT's upkeep, then every connection says GOODBYE and closes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from .dht.node import DHTNode, DHTSettings
from .dht.records import Namespaces
from .errors import ConfigError
from .identity import Identity, PeerID
from .log import get_logger
from .relays import RelayKeeper, find_relays
from .wire.access import AccessPolicy
from .wire.address import PeerAddress
from .wire.relay_table import RelayLimits
from .wire.streams import StreamNetwork
from .wire.transport import Transport, TransportLimits, open_transport

__all__ = ["Peer", "open_peer"]


@dataclasses.dataclass(eq=False)
class Peer:
    """A running peer (made by ``open_peer``).

    ``nursery`` is where services run their tasks: they end when the peer does.
    """

    identity: Identity
    transport: Transport
    dht: DHTNode
    nursery: trio.Nursery
    #: the reservations a client-mode peer keeps on its relays (None: it was given none)
    relay_keeper: RelayKeeper | None = None

    @property
    def id(self) -> PeerID:
        return self.identity.peer_id

    @property
    def address(self) -> PeerAddress | None:
        """Where others reach this peer; ``None`` in client mode."""
        return self.transport.address

    @property
    def client_mode(self) -> bool:
        return self.dht.client_mode


@asynccontextmanager
async def open_peer(
    identity: Identity,
    *,
    listen: str | None = "127.0.0.1:0",
    bootstrap: Sequence[str | PeerAddress] = (),
    client_mode: bool = False,
    announce_host: str | None = None,
    network: StreamNetwork | None = None,
    limits: TransportLimits | None = None,
    dht: DHTSettings | None = None,
    namespaces: Namespaces | None = None,
    access: AccessPolicy | None = None,
    relays: Sequence[str | PeerAddress] = (),
    relay: RelayLimits | None = None,
    relay_want: int = 2,
) -> AsyncIterator[Peer]:
    """Join (or start) a swarm for the duration of the block.

    ``listen="HOST:PORT"`` serves others (port 0 picks one); ``client_mode=True`` (for peers
    behind NAT) never listens: the peer dials out, uses the DHT without entering anyone's
    routing table, and still receives calls over the connections it opened. ``bootstrap`` lists
    addresses of peers already in the swarm; with none, this peer starts a new swarm.
    ``BootstrapFailed`` names every address that did not answer. ``access`` makes the swarm
    private (an allowlist of PeerIDs) and sets rate limits and bans (see wire/access.py).
    ``relay`` (a listening peer) offers relaying to client-mode peers with those limits;
    ``relays`` (a client-mode peer) are relays to hold reservations on and publish, so that
    others reach it through them (SPEC.md "Relay"), on ``relay_want`` of them at once
    (``peer.relay_keeper`` shows which). Every peer looks a peer's relays up in
    the DHT when it has no other way to reach it.

    >>> async def main():                                                 # doctest: +SKIP
    ...     async with open_peer(Identity.generate(), bootstrap=[addr]) as peer:
    ...         await peer.dht.store("greeting", b"hello", ttl=60)
    ...         print(await peer.dht.get("greeting"))
    """
    if not isinstance(identity, Identity):
        raise ConfigError(f"identity must be an Identity, got {type(identity).__name__}")
    if isinstance(bootstrap, str | PeerAddress):
        raise ConfigError("bootstrap is a list of addresses, not one address")
    if isinstance(relays, str | PeerAddress):
        raise ConfigError("relays is a list of addresses, not one address")
    relay_addresses = [r if isinstance(r, PeerAddress) else PeerAddress.parse(r) for r in relays]
    if relay is not None and client_mode:
        raise ConfigError("a client-mode peer cannot relay (nobody can dial it)")
    failure: Exception | None = None
    async with (
        open_transport(
            identity,
            listen=None if client_mode else listen,
            announce_host=announce_host,
            network=network,
            limits=limits,
            access=access,
        ) as transport,
        trio.open_nursery() as nursery,
    ):
        try:
            node = DHTNode(transport, settings=dht, namespaces=namespaces, client_mode=client_mode)
            await nursery.start(node.run)
            if relay is not None:
                transport.offer_relay(relay)

            async def resolve(peer: PeerID) -> list[PeerAddress]:
                return await find_relays(node, peer)

            transport.relay.resolver = resolve
            if bootstrap:
                answered = await node.bootstrap(bootstrap)
                get_logger(peer=identity.peer_id.short).info(
                    "joined the swarm", bootstrap_answered=answered, known=len(node.table)
                )
            keeper: RelayKeeper | None = None
            if relay_addresses:
                keeper = RelayKeeper(transport, node, relay_addresses, want=relay_want)
                await nursery.start(keeper.run)
            yield Peer(identity, transport, node, nursery, keeper)
        except Exception as exc:
            # Re-raised below as it is, not inside the nursery's ExceptionGroup.
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
