"""The transport: listener, dialer, handshakes, and a pool of connections keyed by PeerID.

``open_transport`` is an async context manager that owns one nursery. Inside it:

- the listener (unless client mode) accepts byte streams, upgrades them to websockets, runs the
  responder side of the handshake under ``handshake_timeout`` and starts a ``Connection``;
- each dial does the same from the initiator side, in a task of that nursery, so the
  connection outlives the call that opened it;
- every connection, whichever side opened it, enters the pool under the remote PeerID, so a
  peer that can only dial out still receives calls over the connection it opened.

Two peers that dial each other at once end up with two connections; both sides prefer the one
opened by the smaller PeerID, so they agree on which one new calls use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from ..errors import (
    ConfigError,
    ConnectionLost,
    CrossedIdleClose,
    DeadlineExceeded,
    HandshakeFailed,
    MoshpitError,
    PeerBusy,
    ProtocolError,
    Unreachable,
)
from ..identity import Identity, PeerID
from ..log import get_logger
from . import speedups
from .access import AccessControl, AccessPolicy, Ban
from .address import InvalidAddress, PeerAddress, parse_listen
from .connection import (
    Connection,
    ConnectionLimits,
    Handler,
    HandlerRegistry,
    SendStream,
    StreamHandler,
)
from .frame_reads import frame_sized
from .handshake import (
    HandshakeInitiator,
    HandshakeRejected,
    HandshakeResponder,
    HandshakeResult,
    MessageType,
    _parse,
)
from .liveness import Liveness
from .relay import RelayEndpoint, RelayPipe, RelayService
from .relay_table import RelayLimits
from .streams import StreamNetwork, TcpNetwork, pacer_for
from .websocket import HandshakeStream, WebSocket

__all__ = ["PING", "SUBPROTOCOL", "Transport", "TransportLimits", "open_transport"]

SUBPROTOCOL = "moshpit/1"
#: every transport answers calls to this handler with an empty body (``Transport.probe``)
PING = "moshpit.ping"
_REFUSAL_TIMEOUT = 1.0
#: a peer we reach through a relay, whose address we know but could not dial, is tried
#: directly again after this long
_DIRECT_RETRY = 60.0
# A listener at its connection limit answers 503: dial it again after about this long, twice
# as long each time (randomized by half either way), within the caller's time. In a crowd the
# listener makes room as calls end (``crowded_idle_after``), so the dialers that come back
# spread out get in; refusing them for good made a 1024-peer cold start's readers of the
# run's directory each see a different part of it.
_BUSY_WAIT = 0.05
_BUSY_WAIT_MAX = 1.0
# HTTP status a listener answers with when it is at its connection limit (try again) and when
# it is shutting down (do not)
_BUSY = 503
_GOING_AWAY = 410
# a listener at its limit says so in its log at most this often (with how many it refused)
_REFUSAL_WARN_EVERY = 1.0
#: a peer whose relays could not be found is not looked up again for this long
_RESOLVE_AGAIN = 10.0
#: peers remembered as having published no relay (the oldest go first beyond this)
_MAX_UNRESOLVED = 1024


@dataclasses.dataclass(frozen=True, slots=True)
class TransportLimits:
    connection: ConnectionLimits = dataclasses.field(default_factory=ConnectionLimits)
    #: connections open at once, handshaking ones included; more are closed on arrival
    max_connections: int = 256
    #: connections to one peer (two when both dialed at once); more are refused
    max_connections_per_peer: int = 2
    #: the websocket upgrade plus our handshake must finish within this, both ways
    handshake_timeout: float = 10.0
    #: idle connections kept open (no call or stream in flight, no message for ``idle_after``
    #: seconds); beyond that the least recently used close (looked for when a connection
    #: opens, at most once per tenth of ``idle_after``), so that a peer of a large swarm
    #: holds connections to the peers it works with, not to everyone it ever met. A round's
    #: group and DHT lookups are done within seconds; a 256-peer swarm that kept 64 idle ones
    #: for 30 s held 144 connections a peer (65 KB each in memory), and a 1024-peer one would
    #: need 10 GB for them. A redial costs one handshake.
    idle_connections: int = 24
    idle_after: float = 10.0
    #: a relayed connection idle this long closes, whatever the count: its circuit holds one
    #: of the few a relay grants each end (16 by default), and an averaging peer meets new
    #: group mates every round; opening a circuit again costs a fraction of a second
    relayed_idle_after: float = 2.0
    #: at ``max_connections``, a newcomer is let in by closing the least recently used idle
    #: connection or, when none is idle (a crowd: many peers asking this one within seconds),
    #: the least recently used one with nothing in flight and no message for this long.
    #: Whoever needs it again dials again (a handshake), where a refusal would have cost its
    #: call. A burst in which nothing is quiet yet is turned away (HTTP 503; the dialers come
    #: back shortly, see ``PeerBusy``): so the shorter this, the more newcomers a second a
    #: crowded peer takes, about max_connections / (handshake + call + this). At a 1024-peer
    #: cold start, every peer asking the ten replicas of the run's directory at one instant
    #: made them refuse ~6,400 dials with 0.5 s; the readers now spread out (auto_grid's
    #: cold_read_spread), at a rate that 0.2 s lets a replica take.
    crowded_idle_after: float = 0.2

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_connections_per_peer < 1:
            raise ConfigError("connection limits must be at least 1")
        if self.idle_connections < 0 or not self.idle_after > 0:
            raise ConfigError("idle_connections must be >= 0 and idle_after positive")
        if not self.relayed_idle_after > 0:
            raise ConfigError("relayed_idle_after must be positive")
        if not 0 <= self.crowded_idle_after <= self.idle_after:
            raise ConfigError("crowded_idle_after must be in 0 .. idle_after")
        if not self.handshake_timeout > 0:
            raise ConfigError("handshake_timeout must be positive")


Target = str | PeerAddress | PeerID

#: the close reasons of a connection closed as idle, by this end or by the other one
_IDLE_REASONS = frozenset({"idle", "remote closed: idle"})


class Transport:
    """A peer's end of the wire: register handlers, call and stream to other peers.

    Made by ``open_transport``; see there.
    """

    def __init__(
        self,
        identity: Identity,
        network: StreamNetwork,
        limits: TransportLimits,
        nursery: trio.Nursery,
        access: AccessPolicy | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.limits = limits
        self.registry = HandlerRegistry()
        self.registry.register(PING, _pong)
        #: who may connect and call, and the bans in force (wire/access.py)
        self.access = AccessControl(access)
        #: when each peer was last heard from, and who went silent (wire/liveness.py)
        self.liveness = Liveness()
        # Tasks waiting on a peer: for the next message from it, for the end of its last
        # connection, for a connection to it to exist. Set (and dropped) when that happens.
        self._heard_events: dict[PeerID, trio.Event] = {}
        self._lost_events: dict[PeerID, trio.Event] = {}
        self._connected_events: dict[PeerID, trio.Event] = {}
        #: where others reach us; None in client mode (we only dial out)
        self.address: PeerAddress | None = None
        self.log = get_logger(peer=self.peer_id.short)
        self._network = network
        self._nursery = nursery
        self._conns: dict[PeerID, list[Connection]] = {}
        self._dialing: dict[PeerID, trio.Event] = {}
        self._addresses: dict[PeerID, PeerAddress] = {}
        self._direct_failed: dict[PeerID, float] = {}  # peer -> when to try it directly again
        self._unresolved: dict[PeerID, float] = {}  # peer -> when to look its relays up again
        # peers whose last connection was closed as idle (not lost), until a new one comes
        self._closed_idle: dict[PeerID, None] = {}
        self._open_streams = 0  # connections being set up or running, both directions
        self._sweeping = False  # a task closes idle relayed connections (while any is open)
        # when a new connection next looks for idle ones to close (``_add``)
        self._trim_due = -math.inf
        self._closing = False
        #: refusals at the connection limit: in all, and since the last warning about them
        self.refused_at_limit = 0
        self._refused_unwarned = 0
        self._refusal_warned_at = -math.inf
        # bytes moved by connections that have ended (the live ones count their own)
        self._ended_sent = 0
        self._ended_received = 0
        self._ended_messages_sent = 0
        self._ended_messages_received = 0
        #: relayed connections, both ways (wire/relay.py): routes to peers behind relays, the
        #: circuits we open and those relays announce to us
        self.relay = RelayEndpoint(self)
        #: set by ``offer_relay``: this peer relays for client-mode peers
        self.relay_service: RelayService | None = None

    def offer_relay(self, limits: RelayLimits | None = None) -> RelayService:
        """Relay for client-mode peers (a listening peer only); see SPEC.md "Relay"."""
        if self.relay_service is None:
            self.relay_service = RelayService(self, limits)
        return self.relay_service

    # -- handlers ----------------------------------------------------------------------------

    def register(self, name: str, handler: Handler) -> None:
        """Serve calls to ``name``: ``async def handler(request: Request) -> bytes``."""
        self.registry.register(name, handler)

    def register_stream(self, name: str, handler: StreamHandler) -> None:
        """Serve streams to ``name``: ``async def handler(request: StreamRequest) -> bytes``."""
        self.registry.register_stream(name, handler)

    # -- the pool ----------------------------------------------------------------------------

    def connections(self) -> list[Connection]:
        return [c for conns in self._conns.values() for c in conns if not c.closed]

    def connection_to(self, peer: PeerID, *, open_only: bool = False) -> Connection | None:
        """The live connection new calls to ``peer`` use, if there is one (``open_only``: not
        one that is saying GOODBYE, which a new call could not finish on)."""
        live = [c for c in self._conns.get(peer, ()) if not (c.closing if open_only else c.closed)]
        if not live:
            return None
        # A direct connection beats a relayed one (both ends see the same two, so they agree).
        live = [c for c in live if c.via is None] or live
        return min(live, key=lambda c: self._initiator_of(c).to_bytes())

    def _initiator_of(self, conn: Connection) -> PeerID:
        return self.peer_id if conn.initiator else conn.remote_peer_id

    def _add(self, conn: Connection) -> None:
        self._conns.setdefault(conn.remote_peer_id, []).append(conn)
        self._closed_idle.pop(conn.remote_peer_id, None)
        self.liveness.heard(conn.remote_peer_id, trio.current_time())  # it just shook hands
        event = self._connected_events.pop(conn.remote_peer_id, None)
        if event is not None:
            event.set()
        # Looking for idle connections means a pass over all of them, and a busy peer adds
        # dozens a second (a replica of a crowded key, the members of a forming group): 3% of
        # a 256-peer swarm's CPU went to that pass. Which connections have been silent for
        # ``idle_after`` hardly changes within a tenth of it, so one look in that time does.
        now = trio.current_time()
        if now >= self._trim_due:
            self._trim_due = now + self.limits.idle_after / 10
            self._trim(self.limits.idle_connections)
        if conn.via is not None and not self._sweeping:
            self._sweeping = True
            self._nursery.start_soon(self._sweep_relayed)

    async def _sweep_relayed(self) -> None:
        """Close relayed connections idle for ``relayed_idle_after``, for as long as any is
        open (``_add`` starts this again when the next one comes)."""
        after = self.limits.relayed_idle_after
        try:
            while True:
                # (one already saying GOODBYE needs nothing more from here)
                relayed = [c for c in self.connections() if c.via is not None and not c.closing]
                if not relayed:
                    return
                now = trio.current_time()
                idle = [
                    c
                    for c in relayed
                    if not c.busy and c.last_active + after <= now and c.pinned_until <= now
                ]
                self._close_idle(idle)
                # Next look: when the quietest of the others would be idle long enough (a
                # busy one is looked at again then too: it may be done by that time).
                wake = min(
                    (max(c.last_active + after, now + after / 4) for c in relayed if c not in idle),
                    default=now + after / 4,
                )
                await trio.sleep_until(wake)
        finally:
            self._sweeping = False

    def _idle(self, after: float | None = None) -> list[Connection]:
        """Open connections with nothing in flight and no message for ``after`` seconds
        (``idle_after`` by default), the least recently used first."""
        idle = list(self._quiet(self.limits.idle_after if after is None else after))
        idle.sort(key=lambda c: c.last_active)
        return idle

    def _quiet(self, after: float) -> Iterator[Connection]:
        """Open, unpinned connections with nothing in flight and no message for ``after``
        seconds, in no order."""
        now = trio.current_time()
        since = now - after
        for conns in self._conns.values():
            for c in conns:
                if not c.closed and not c.busy and c.last_active <= since and c.pinned_until <= now:
                    yield c

    def _trim(self, keep: int) -> int:
        """Close the least recently used idle connections beyond ``keep``; how many."""
        idle = self._idle()
        return self._close_idle(idle[: max(0, len(idle) - keep)])

    def _close_idle(self, conns: list[Connection]) -> int:
        for conn in conns:
            # aclose waits (bounded) for the GOODBYE to leave; the pool's nursery owns it.
            self._nursery.start_soon(conn.aclose, "idle")
        if conns:
            self.log.debug("closed idle connections", count=len(conns))
        return len(conns)

    # -- liveness ----------------------------------------------------------------------------

    def _heard_from(self, peer: PeerID) -> Callable[[], None]:
        liveness, events = self.liveness, self._heard_events

        def heard() -> None:
            liveness.heard(peer, trio.current_time())
            event = events.pop(peer, None)
            if event is not None:
                event.set()

        return heard

    def _connection_closed(self, conn: Connection) -> None:
        peer = conn.remote_peer_id
        error = conn.protocol_error
        if error is not None and conn.via is not None:
            # Through a relay, a broken envelope proves only that somebody on the path broke
            # it: the relay may have tampered. Ban nobody (``_after``); stop using that relay
            # for the peer.
            self.log.warning(
                "relayed connection broke the protocol; dropping the route",
                remote=peer.short,
                relay=conn.via.short,
                reason=error.reason,
            )
            routes = self.relay.routes.get(peer, [])
            routes[:] = [r for r in routes if r.peer_id != conn.via]
        if any(not c.closed for c in self._conns.get(peer, ())):
            return  # another connection to the peer is still up: nothing is lost
        if conn.close_reason in _IDLE_REASONS:
            if len(self._closed_idle) >= _MAX_UNRESOLVED:
                del self._closed_idle[next(iter(self._closed_idle))]
            self._closed_idle[peer] = None
        event = self._lost_events.pop(peer, None)
        if event is not None:
            event.set()

    def connected(self, peer: PeerID) -> bool:
        return self.connection_to(peer) is not None

    async def wait_lost(self, peer: PeerID) -> None:
        """Return when the last live connection to ``peer`` ends (it closed, was reset, said
        GOODBYE, broke the protocol); at once if there is none now."""
        if not self.connected(peer):
            await trio.lowlevel.checkpoint()
            return
        event = self._lost_events.setdefault(peer, trio.Event())
        await event.wait()

    async def wait_gone(self, peer: PeerID) -> None:
        """Return when the last live connection to ``peer`` ends for any reason but an idle
        close (one end closed it for having nothing in flight: the peer is not gone, and the
        next call dials again); waits for a connection first when there is none."""
        while True:
            await self.wait_connected(peer)
            await self.wait_lost(peer)
            if peer not in self._closed_idle:
                return

    async def wait_connected(self, peer: PeerID) -> None:
        """Return when a live connection to ``peer`` exists (either side opened it)."""
        while not self.connected(peer):
            event = self._connected_events.setdefault(peer, trio.Event())
            await event.wait()
        await trio.lowlevel.checkpoint()

    async def wait_heard(self, peer: PeerID, since: float) -> None:
        """Return once a message from ``peer`` arrived at or after trio time ``since``."""
        while not self.liveness.heard_since(peer, since):
            event = self._heard_events.setdefault(peer, trio.Event())
            await event.wait()
        await trio.lowlevel.checkpoint()

    async def probe(self, target: Target, timeout: float) -> bool:
        """Is the peer answering? True as soon as any message from it arrives (a busy peer
        streaming to us answers that way); else a ping goes out, and False when nothing came
        back within ``timeout`` or it cannot be reached; True when it turned the ping's
        connection away at its limit (``PeerBusy``: full, not silent). False marks the peer
        unresponsive (``liveness``) until it is heard from again."""
        address = self._resolve(target)
        peer = address.peer_id if isinstance(address, PeerAddress) else address
        start = trio.current_time()
        failure = "no answer"
        busy = False
        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:

                async def ping() -> None:
                    nonlocal failure
                    try:
                        await self.call(target, PING, timeout=timeout)
                    except PeerBusy:
                        # Full to the last moment (HTTP 503), not silent: there, and alive.
                        nonlocal busy
                        busy = True
                        nursery.cancel_scope.cancel()
                        return
                    except MoshpitError as exc:
                        failure = f"{type(exc).__name__}: {exc}"
                        if not isinstance(exc, DeadlineExceeded):
                            nursery.cancel_scope.cancel()  # unreachable: no use waiting
                        return
                    nursery.cancel_scope.cancel()

                nursery.start_soon(ping)
                await self.wait_heard(peer, start)
                nursery.cancel_scope.cancel()
        answered = busy or self.liveness.heard_since(peer, start)
        if not answered:
            reason = f"silent for {trio.current_time() - start:.3g} s when probed ({failure})"
            if self.liveness.mark_unresponsive(peer, trio.current_time(), reason):
                self.log.info("peer unresponsive", remote=peer.short, reason=reason)
        return answered

    async def wait_silent(self, target: Target, timeout: float) -> None:
        """Return once the peer has said nothing for ``timeout`` seconds from now on, a ping
        included (it is then marked unresponsive), or cannot be reached. A peer that keeps
        talking (streaming to us, answering pings) keeps this waiting: run it beside the work
        that depends on the peer, and cancel it with that work."""
        address = self._resolve(target)
        peer = address.peer_id if isinstance(address, PeerAddress) else address
        start = trio.current_time()
        half = timeout / 2
        while True:
            # Absolute times, never a difference: sleeping "half - silent" can round to no
            # time at all and spin forever at one instant.
            quiet_at = max(self.liveness.last_heard(peer), start) + half
            if trio.current_time() < quiet_at:
                await trio.sleep_until(quiet_at)
                continue
            # Quiet for a while: a busy peer answers a ping (or its next message arrives
            # meanwhile); a frozen one says nothing.
            if not await self.probe(target, timeout=half):
                return

    def mark_unresponsive(self, peer: PeerID, reason: str) -> None:
        """Record that ``peer`` stayed silent when something was asked of it."""
        if self.liveness.mark_unresponsive(peer, trio.current_time(), reason):
            self.log.info("peer unresponsive", remote=peer.short, reason=reason)

    def unresponsive(self, peer: PeerID) -> bool:
        return self.liveness.is_unresponsive(peer)

    def unresponsive_since(self, peer: PeerID) -> float | None:
        """When ``peer`` was found unresponsive (trio time); None when it is not."""
        return self.liveness.unresponsive_since(peer)

    @property
    def bytes_sent(self) -> int:
        """Bytes written to the wire by every connection so far, ended ones included."""
        return self._ended_sent + sum(c.bytes_sent for cs in self._conns.values() for c in cs)

    @property
    def bytes_received(self) -> int:
        """Bytes read from the wire by every connection so far, ended ones included."""
        live = sum(c.bytes_received for cs in self._conns.values() for c in cs)
        return self._ended_received + live

    @property
    def messages_sent(self) -> int:
        """Envelopes written by every connection so far, ended ones included."""
        live = sum(c.messages_sent for cs in self._conns.values() for c in cs)
        return self._ended_messages_sent + live

    @property
    def messages_received(self) -> int:
        """Envelopes read by every connection so far, ended ones included."""
        live = sum(c.messages_received for cs in self._conns.values() for c in cs)
        return self._ended_messages_received + live

    # -- access control ----------------------------------------------------------------------

    @property
    def bans(self) -> list[Ban]:
        """The bans in force now, soonest to end first."""
        return self.access.bans.active(trio.current_time())

    def ban(self, peer: PeerID, reason: str) -> Ban:
        """Ban ``peer`` (for longer each time): its connections close, it cannot connect and
        we do not dial it until the ban ends."""
        ban = self.access.offence(peer, reason, trio.current_time())
        self._enforce_bans()
        return ban

    def report_bad_data(self, excluded: dict[PeerID, str]) -> list[Ban]:
        """Ban the peers a round excluded for malformed data (``RoundReport.excluded``), as
        the access policy says."""
        # A reducer that checks its own part names itself when that part is bad: not a ban.
        others = [(p, why) for p, why in excluded.items() if p != self.peer_id]
        bans = self.access.bad_data(others, trio.current_time())
        self._enforce_bans()
        return bans

    def _enforce_bans(self) -> None:
        for ban in self.access.take_new_bans():
            self.log.warning(
                "peer banned",
                remote=str(ban.peer),
                reason=ban.reason,
                duration=ban.duration,
                offence=ban.offence,
            )
            why = f"banned for {ban.duration:g} s: {ban.reason}"
            for conn in self._conns.get(ban.peer, ()):
                if not conn.closed:
                    # aclose waits (bounded) for the GOODBYE to leave; the pool's nursery owns it.
                    self._nursery.start_soon(conn.aclose, why)

    def _admit(self, peer: PeerID) -> Callable[[int], str | None]:
        def admit(nbytes: int) -> str | None:
            refused = self.access.admit_call(peer, nbytes, trio.current_time())
            if refused is not None and self.access.new_bans:
                self._enforce_bans()
            return refused

        return admit

    def _after(self, conn: Connection) -> None:
        """A connection ended: ban its peer if it broke the protocol (the handshake proved who
        it is, and every envelope is sealed under a key only it and we hold, so the violation is
        its own, or that of whoever tampers with the bytes between us)."""
        error = conn.protocol_error
        if error is not None and conn.via is None and self.access.policy.ban_on_protocol_error:
            self.ban(conn.remote_peer_id, f"protocol violation ({error.reason})")

    def _remove(self, conn: Connection) -> None:
        conns = self._conns.get(conn.remote_peer_id, [])
        if conn in conns:
            conns.remove(conn)
            self._ended_sent += conn.bytes_sent
            self._ended_received += conn.bytes_received
            self._ended_messages_sent += conn.messages_sent
            self._ended_messages_received += conn.messages_received
        if not conns:
            self._conns.pop(conn.remote_peer_id, None)

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self, target: Target, name: str, payload: bytes | memoryview = b"", *, timeout: float
    ) -> bytes:
        """Call handler ``name`` on ``target`` (an address, or the PeerID of a connected or
        known peer) and return its answer; dials first when there is no connection.

        Raises ``Unreachable`` (and ``HandshakeFailed``; ``PeerBusy`` when the peer was at
        its connection limit every time it was dialed within ``timeout``),
        ``DeadlineExceeded``, ``UnknownHandler``, ``Rejected``, ``RemoteError``,
        ``ConnectionLost``.
        """
        deadline = _deadline(timeout)
        conn = await self.connect(target, timeout=timeout)
        try:
            return await conn.call(name, payload, timeout=_left(deadline, timeout, name))
        except ConnectionLost:
            # Both ends close idle connections (``_trim``): a call on a pooled connection can
            # cross the other end's GOODBYE. The connection was idle there (nothing in flight),
            # so the call was not being served; it goes out once more on a new connection.
            # (A join or a DHT store that did run there is taken once all the same.)
            if conn.close_reason not in _IDLE_REASONS:
                raise
        self.log.debug("call crossed an idle close; calling again", name=name)
        conn = await self.connect(target, timeout=_left(deadline, timeout, name))
        return await conn.call(name, payload, timeout=_left(deadline, timeout, name))

    @asynccontextmanager
    async def open_stream(
        self, target: Target, name: str, header: bytes | memoryview = b"", *, timeout: float
    ) -> AsyncIterator[SendStream]:
        """A flow-controlled stream to handler ``name`` on ``target``:

        ``async with t.open_stream(addr, "upload", timeout=30) as s: await s.send(data);
        answer = await s.finish()``

        A stream that crosses the other end's idle close (as a call can, see ``call``) fails
        with ``CrossedIdleClose``: nothing of it was served, and the caller may send it again.
        """
        deadline = _deadline(timeout)
        conn = await self.connect(target, timeout=timeout)
        try:
            async with conn.open_stream(name, header, timeout=_left(deadline, timeout, name)) as s:
                yield s
        except ConnectionLost as exc:
            if conn.close_reason == "remote closed: idle":
                raise CrossedIdleClose(str(exc)) from None
            raise

    async def connect(self, target: Target, *, timeout: float | None = None) -> Connection:
        """The pooled connection to ``target``, dialing it if needed. A peer at its connection
        limit (HTTP 503) is dialed again after short randomized waits (``_busy_wait``) while
        the time lasts; ``PeerBusy`` when it runs out first."""
        if self._closing:
            raise Unreachable("the transport is closing")
        address = self._resolve(target)
        peer = address.peer_id if isinstance(address, PeerAddress) else address
        if peer == self.peer_id:
            raise ConfigError("a peer cannot connect to itself")
        refused = self.access.refusal(peer, trio.current_time())
        if refused is not None:
            raise HandshakeFailed(f"not connecting to {peer.short}: {refused}")
        conn = self.connection_to(peer, open_only=True)
        if conn is not None and conn.via is None:
            return conn  # the common case, without the dialing loop's timeout scope
        limit = min(timeout, self.limits.handshake_timeout) if timeout else None
        limit = limit or self.limits.handshake_timeout
        until = trio.current_time() + limit
        busy = 0
        try:
            with trio.fail_after(limit):
                while True:
                    # (one this end is closing as idle is no use: a call on it would be cut off)
                    conn = self.connection_to(peer, open_only=True)
                    # Relayed, but an address is known: try to go direct (now and then).
                    go_direct = (
                        conn is not None
                        and conn.via is not None
                        and isinstance(address, PeerAddress)
                        and trio.current_time() >= self._direct_failed.get(peer, -math.inf)
                    )
                    if conn is not None and not go_direct:
                        return conn
                    if peer in self._dialing:
                        # Someone is already dialing this peer: share the result, don't race.
                        await self._dialing[peer].wait()
                        continue
                    if not isinstance(address, PeerAddress):
                        return await self._dial_relayed(peer, limit)
                    if conn is None:
                        try:
                            return await self._dial(address)
                        except PeerBusy:
                            wait = self._busy_wait(peer, busy)
                            if trio.current_time() + wait >= until:
                                raise
                            busy += 1
                            await trio.sleep(wait)
                            continue
                    try:
                        return await self._dial(address)
                    except Unreachable:
                        self._direct_failed[peer] = trio.current_time() + _DIRECT_RETRY
                        return conn
        except trio.TooSlowError:
            raise DeadlineExceeded(f"could not connect to {address} within {limit:g} s") from None

    def _busy_wait(self, peer: PeerID, attempt: int) -> float:
        """How long to wait before dialing ``peer`` again after its ``attempt``-th 503:
        doubling, and spread by half either way by a hash of both ends and the attempt, so
        that the dialers a crowded peer turned away at one instant do not all come back at
        the next (and the same run under a virtual clock waits the same)."""
        base: float = min(_BUSY_WAIT * 2.0**attempt, _BUSY_WAIT_MAX)
        digest = hashlib.blake2b(
            self.peer_id.to_bytes() + peer.to_bytes() + attempt.to_bytes(4, "big"), digest_size=8
        ).digest()
        return base * (0.5 + int.from_bytes(digest, "big") / 2**64)

    def _resolve(self, target: Target) -> PeerAddress | PeerID:
        if isinstance(target, PeerAddress):
            return target
        if isinstance(target, PeerID):
            return self._addresses.get(target, target)
        if isinstance(target, str):
            return PeerAddress.parse(target)
        raise InvalidAddress(f"a target is an address or a PeerID, got {type(target).__name__}")

    async def _dial(self, address: PeerAddress) -> Connection:
        done = self._dialing[address.peer_id] = trio.Event()
        try:
            conn: Connection = await self._nursery.start(self._dial_and_serve, address)
            self._addresses[address.peer_id] = address
            return conn
        finally:
            del self._dialing[address.peer_id]
            done.set()

    async def _dial_relayed(self, peer: PeerID, limit: float) -> Connection:
        """Reach ``peer`` through one of its relays (``relay.routes``, else ``relay.resolver``),
        in order; the first circuit whose handshake completes wins."""
        routes = list(self.relay.routes.get(peer, ()))
        now = trio.current_time()
        if not routes and self.relay.resolver is not None and self._unresolved.get(peer, 0) <= now:
            for route in await self.relay.resolver(peer):
                self.relay.add_route(peer, route)
            routes = list(self.relay.routes.get(peer, ()))
            if not routes:
                # Nothing published: say so at once for a while, rather than look it up again
                # for every call to a peer that is gone (a round's calls to a lost member).
                if len(self._unresolved) >= _MAX_UNRESOLVED:
                    # (bounded: every peer ever looked up would otherwise stay here)
                    self._unresolved = {p: t for p, t in self._unresolved.items() if t > now}
                    while len(self._unresolved) >= _MAX_UNRESOLVED:
                        del self._unresolved[next(iter(self._unresolved))]
                self._unresolved[peer] = trio.current_time() + _RESOLVE_AGAIN
        if not routes:
            raise Unreachable(f"no connection to {peer.short} and no address known for it")
        done = self._dialing[peer] = trio.Event()
        failures: list[MoshpitError] = []
        try:
            for route in routes:
                try:
                    relay = await self.connect(route, timeout=limit)
                    if relay.via is not None:
                        raise Unreachable(f"relay {route.peer_id.short} is itself behind a relay")
                    pipe, _ = await self.relay.open_circuit(relay, peer, timeout=limit)
                    address = PeerAddress(route.host, route.port, peer)
                    conn: Connection = await self._nursery.start(
                        self._serve_dialed_pipe, pipe, address
                    )
                    return conn
                except MoshpitError as exc:
                    self.log.info(
                        "relayed dial failed",
                        remote=peer.short,
                        relay=route.peer_id.short,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                    failures.append(exc)
                    if isinstance(exc, Unreachable | HandshakeFailed):
                        # A relay that is gone is not a way to the peer any more (the next
                        # dial asks the DHT, where the peer republishes without it). A relay
                        # that refused keeps its place: its limits may have room later.
                        left = self.relay.routes.get(peer, [])
                        left[:] = [r for r in left if r != route]
        finally:
            del self._dialing[peer]
            done.set()
        refused = [f for f in failures if not isinstance(f, Unreachable)]
        if len(failures) == 1 or (refused and len(refused) == len(failures)):
            raise failures[-1]
        why = "; ".join(f"{type(f).__name__}: {f}" for f in failures)
        raise Unreachable(f"{peer.short}: no relay got through ({why})")

    async def _serve_dialed_pipe(
        self, pipe: RelayPipe, address: PeerAddress, *, task_status: trio.TaskStatus[Connection]
    ) -> None:
        try:
            await self._dial_and_serve(address, task_status=task_status, pipe=pipe)
        finally:
            self.relay.forget(pipe)

    async def _serve_relayed(self, pipe: RelayPipe, lifetime: float) -> None:
        """The target's side of a circuit a relay announced: open our upstream, then serve the
        pipe exactly as an incoming connection (``_accept``)."""
        try:
            with trio.move_on_after(self.limits.handshake_timeout) as scope:
                await pipe.open_out(lifetime)
            if scope.cancelled_caught:
                self.log.info("relayed circuit: the relay took no stream from us")
                return
            await self._accept(pipe, pipe=pipe)
        except MoshpitError as exc:
            self.log.info(
                "relayed circuit failed",
                relay=pipe.relay.remote_peer_id.short,
                error=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self.relay.forget(pipe)
            await trio.aclose_forcefully(pipe)

    async def _dial_and_serve(
        self,
        address: PeerAddress,
        *,
        task_status: trio.TaskStatus[Connection],
        pipe: RelayPipe | None = None,
    ) -> None:
        stream: trio.abc.Stream
        if pipe is None:
            try:
                stream = await self._network.connect(address.host, address.port)
            except OSError as exc:
                raise Unreachable(f"cannot reach {address}: {exc.strerror or exc}") from None
            stream = frame_sized(stream)
        else:
            stream = pipe
        self._open_streams += 1
        started = False
        try:
            async with trio.open_nursery() as ws_nursery:
                if pipe is not None:
                    ws_nursery.start_soon(pipe.watch)
                ws, result = await self._initiate(ws_nursery, stream, address)
                conn = self._new_connection(
                    ws, result, initiator=True, stream=stream if pipe is None else None
                )
                if pipe is not None:
                    conn.via = pipe.relay.remote_peer_id
                self._add(conn)
                try:
                    task_status.started(conn)
                    started = True
                    await conn.run()
                finally:
                    self._remove(conn)
                    self._after(conn)
                    ws_nursery.cancel_scope.cancel()
        except (*_HANDSHAKE_ERRORS, BaseExceptionGroup) as exc:
            failure = _expected_failure(exc)
            if failure is None:
                raise
            if started:
                # The connection was up; its end is not the dialer's business any more.
                self.log.info("connection ended", remote=address.peer_id.short, error=failure)
                return
            self.log.info("dial failed", remote=address.peer_id.short, error=failure)
            if any(
                isinstance(leaf, ConnectionRejected) and leaf.status_code == _BUSY
                for leaf in _leaves(exc)
            ):
                raise PeerBusy(f"{address}: {failure}") from None
            raise HandshakeFailed(f"{address}: {failure}") from None
        finally:
            self._open_streams -= 1
            await trio.aclose_forcefully(stream)

    async def _initiate(
        self, ws_nursery: trio.Nursery, stream: trio.abc.Stream, address: PeerAddress
    ) -> tuple[WebSocket, HandshakeResult]:
        # trio-websocket runs the upgrade and the handshake, reading no further than the
        # responder's one message; the envelopes are ours (wire/websocket.py says why).
        handshake_stream = HandshakeStream(stream, messages=1)
        ws = await wrap_client_stream(
            ws_nursery,
            handshake_stream,  # type: ignore[arg-type]  # any trio Stream works
            address.hostport,
            f"/{address.peer_id}",
            subprotocols=[SUBPROTOCOL],
            **self._ws_options(),
        )
        if ws.subprotocol != SUBPROTOCOL:
            raise ProtocolError("subprotocol", f"the peer does not speak {SUBPROTOCOL}")
        initiator = HandshakeInitiator(self.identity, address.peer_id)
        await ws.send_message(initiator.hello())
        finish = initiator.receive_response(await _binary(ws))
        await ws.send_message(finish)
        assert initiator.result is not None
        return self._websocket(handshake_stream, client=True), initiator.result

    # -- accepting ---------------------------------------------------------------------------

    async def _accept(self, stream: trio.abc.Stream, *, pipe: RelayPipe | None = None) -> None:
        """Serve one incoming stream (``pipe``: a circuit through a relay). Never raises (but
        Cancelled): whatever a remote does to one connection, the listener and every other
        connection go on."""
        at_limit = self._open_streams >= self.limits.max_connections
        if at_limit and not self._closing:
            # Make room: the least recently used idle connection closes for this one; in a
            # crowd (none idle), the least recently used quiet one (see crowded_idle_after).
            # (One pass for the least recently used quiet one: if any is idle, that is it.)
            quiet = min(
                self._quiet(self.limits.crowded_idle_after),
                key=lambda c: c.last_active,
                default=None,
            )
            at_limit = self._close_idle([] if quiet is None else [quiet]) == 0
        if self._closing:
            # (not a warning: a peer that is shutting down turns newcomers away)
            self.log.info("connection refused: shutting down")
            await self._refuse(stream, _GOING_AWAY, b"this peer is shutting down")
            return
        if at_limit:
            self.refused_at_limit += 1
            self._refused_unwarned += 1
            now = trio.current_time()
            if now - self._refusal_warned_at >= _REFUSAL_WARN_EVERY:
                # (one line a second at most: a crowd is turned away hundreds of times)
                self.log.warning(
                    "connection refused: at the limit",
                    limit=self.limits.max_connections,
                    refused=self._refused_unwarned,
                )
                self._refusal_warned_at = now
                self._refused_unwarned = 0
            await self._refuse(stream, _BUSY, b"too many connections; try again later")
            return
        stream = frame_sized(stream)
        self._open_streams += 1
        try:
            async with trio.open_nursery() as ws_nursery:
                if pipe is not None:
                    ws_nursery.start_soon(pipe.watch)
                with trio.move_on_after(self.limits.handshake_timeout) as scope:
                    accepted = await self._respond(ws_nursery, stream)
                if scope.cancelled_caught:
                    self.log.info("handshake timed out; dropped the connection")
                elif accepted is not None:
                    await self._serve_accepted(*accepted, pipe=pipe, stream=stream)
                ws_nursery.cancel_scope.cancel()
        except (*_HANDSHAKE_ERRORS, BaseExceptionGroup) as exc:
            failure = _expected_failure(exc)
            if failure is None:
                if _has_cancelled(exc):
                    raise
                self.log.exception("bug while serving an incoming connection")
            elif any(isinstance(leaf, ProtocolError) for leaf in _leaves(exc)):
                self.log.warning("incoming handshake broke the protocol", error=failure)
            else:
                self.log.info("incoming connection failed", error=failure)
        except Exception:
            self.log.exception("bug while serving an incoming connection")
        finally:
            self._open_streams -= 1
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream, status: int, body: bytes) -> None:
        """Answer the websocket upgrade with an HTTP error, so the dialer learns why at once
        (a bare close would leave it waiting for its deadline); give it one second at most."""
        try:
            with trio.move_on_after(_REFUSAL_TIMEOUT):
                async with trio.open_nursery() as ws_nursery:
                    request = await wrap_server_stream(ws_nursery, stream)
                    await request.reject(status, body=body)
                    ws_nursery.cancel_scope.cancel()
        except (*_HANDSHAKE_ERRORS, BaseExceptionGroup) as exc:
            if _expected_failure(exc) is None:
                raise
        finally:
            await trio.aclose_forcefully(stream)

    async def _respond(
        self, ws_nursery: trio.Nursery, stream: trio.abc.Stream
    ) -> tuple[WebSocket, HandshakeResult] | None:
        # As in _initiate: trio-websocket reads the upgrade, the HELLO and the FINISH, no more.
        handshake_stream = HandshakeStream(stream, messages=2)
        request = await wrap_server_stream(ws_nursery, handshake_stream, **self._ws_options())
        if request.path != f"/{self.peer_id}":
            await request.reject(404, body=f"no peer {request.path[1:80]} here".encode())
            return None
        if SUBPROTOCOL not in request.proposed_subprotocols:
            await request.reject(400, body=f"speak {SUBPROTOCOL}".encode())
            return None
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        responder = HandshakeResponder(self.identity)
        hello = await _binary(ws)
        claimed = _claimed_peer(hello)
        refused = None if claimed is None else self.access.refusal(claimed, trio.current_time())
        if claimed is not None and refused is not None:
            # Refused on the HELLO's claim, before we sign anything: a banned or unlisted peer
            # costs one small message. A liar claiming someone else's key only refuses itself.
            self.log.warning("connection refused", remote=str(claimed), reason=refused)
            await ws.send_message(responder.reject(refused))
            return None
        try:
            reply = responder.receive_hello(hello)
        except HandshakeRejected as exc:
            await ws.send_message(exc.reply)
            raise
        await ws.send_message(reply)
        result = responder.receive_finish(await _binary(ws))
        return self._websocket(handshake_stream, client=False), result

    async def _serve_accepted(
        self,
        ws: WebSocket,
        result: HandshakeResult,
        *,
        pipe: RelayPipe | None = None,
        stream: trio.abc.Stream | None = None,
    ) -> None:
        live = [c for c in self._conns.get(result.remote_peer_id, ()) if not c.closed]
        conn = self._new_connection(
            ws, result, initiator=False, stream=stream if pipe is None else None
        )
        if pipe is not None:
            conn.via = pipe.relay.remote_peer_id
            if result.remote_peer_id != pipe.remote:
                # The relay announced one peer and another one shook hands: a relay that lies.
                self.log.warning(
                    "relayed peer is not the one announced",
                    remote=result.remote_peer_id.short,
                    announced=pipe.remote.short,
                )
                await conn.aclose("you are not the peer the relay announced")
                return
        if len(live) >= self.limits.max_connections_per_peer:
            self.log.warning("too many connections from one peer", remote=conn.remote_peer_id.short)
            await conn.aclose("too many connections from your peer")
            return
        self._add(conn)
        try:
            await conn.run()
        finally:
            self._remove(conn)
            self._after(conn)

    # -- shared ------------------------------------------------------------------------------

    def _new_connection(
        self,
        ws: WebSocket,
        result: HandshakeResult,
        *,
        initiator: bool,
        stream: trio.abc.Stream | None = None,
    ) -> Connection:
        return Connection(
            ws,
            result,
            self.identity,
            initiator=initiator,
            registry=self.registry,
            limits=self.limits.connection,
            log=self.log,
            admit=self._admit(result.remote_peer_id),
            on_heard=self._heard_from(result.remote_peer_id),
            on_closed=self._connection_closed,
            pacer=None if stream is None else pacer_for(stream),
        )

    def _websocket(self, handshake_stream: HandshakeStream, *, client: bool) -> WebSocket:
        return WebSocket(
            handshake_stream.detach(),
            client=client,
            max_message=self.limits.connection.envelope.max_message,
        )

    def _ws_options(self) -> dict[str, Any]:
        return {
            "max_message_size": self.limits.connection.envelope.max_message,
            "receive_buffer_size": speedups.RECEIVE_BUFFER_SIZE,
            "message_queue_size": 1,
        }

    async def _close_all(self) -> None:
        self._closing = True
        async with trio.open_nursery() as nursery:
            for conn in self.connections():
                nursery.start_soon(conn.aclose, "peer shutting down")


async def _pong(request: Any) -> bytes:
    return b""


# What a remote peer (or the network) can make a dial or an accept fail with.
_HANDSHAKE_ERRORS = (
    HandshakeError,
    ConnectionClosed,
    ProtocolError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def _has_cancelled(exc: BaseException) -> bool:
    return any(isinstance(leaf, trio.Cancelled) for leaf in _leaves(exc))


def _expected_failure(exc: BaseException) -> str | None:
    """Plain words for a handshake failure caused from outside; None when ``exc`` holds
    anything else (a cancellation, which must propagate, or a bug, which must be seen)."""
    leaves = _leaves(exc)
    if not leaves or not all(isinstance(leaf, _HANDSHAKE_ERRORS) for leaf in leaves):
        return None
    leaf = leaves[0]
    if isinstance(leaf, ConnectionRejected):
        body = (leaf.body or b"").decode("utf-8", "replace")[:200]
        return f"refused the connection (HTTP {leaf.status_code}): {body}"
    if isinstance(leaf, ProtocolError):
        return f"handshake failed: {leaf}"
    if isinstance(leaf, ConnectionClosed):
        return f"closed during the handshake ({leaf.reason})"
    return f"handshake failed: {type(leaf).__name__}: {leaf}"


def _claimed_peer(hello: bytes) -> PeerID | None:
    """The PeerID a HELLO claims (not yet proven), or None when it is not a valid HELLO (the
    responder then fails it with the precise error)."""
    try:
        _, fields, _ = _parse(hello, frozenset({MessageType.HELLO}))
    except ProtocolError:
        return None
    return PeerID.from_public_key(fields[2])


async def _binary(ws: WebSocketConnection) -> bytes:
    message = await ws.get_message()
    if not isinstance(message, bytes):
        raise ProtocolError("malformed", "text message during the handshake")
    return message


def _deadline(timeout: float) -> float:
    if not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return trio.current_time() + timeout


def _left(deadline: float, timeout: float, name: str) -> float:
    left = deadline - trio.current_time()
    if left <= 0:
        raise DeadlineExceeded(f"{name!r}: {timeout:g} s passed while connecting")
    return left


@asynccontextmanager
async def open_transport(
    identity: Identity,
    *,
    listen: str | None = "127.0.0.1:0",
    announce_host: str | None = None,
    network: StreamNetwork | None = None,
    limits: TransportLimits | None = None,
    access: AccessPolicy | None = None,
) -> AsyncIterator[Transport]:
    """Run a peer's transport for the duration of the block.

    ``listen="HOST:PORT"`` (port 0 picks one) serves incoming connections; ``listen=None`` is
    client mode: the peer only dials out, and receives calls over the connections it opened.
    ``announce_host`` is the host others should dial (default: the listen host, or 127.0.0.1
    when listening on every interface). ``network`` defaults to real TCP. ``access`` makes the
    swarm private (an allowlist) and sets rate limits and bans (wire/access.py; default: open,
    with generous limits).

    >>> async def main():                                                  # doctest: +SKIP
    ...     async with open_transport(Identity.generate()) as t:
    ...         t.register("echo", lambda req: ...)
    ...         print(t.address)
    """
    if not isinstance(identity, Identity):
        raise ConfigError(f"identity must be an Identity, got {type(identity).__name__}")
    speedups.install()
    net: StreamNetwork = network if network is not None else TcpNetwork()
    bind = parse_listen(listen) if listen is not None else None
    # Errors of the block (and of setting up) are re-raised as they are, not wrapped in the
    # nursery's ExceptionGroup: `except Unreachable` around the block should just work.
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        transport = Transport(identity, net, limits or TransportLimits(), nursery, access)
        try:
            if bind is not None:
                host, port = bind
                try:
                    _, bound_port = await nursery.start(net.serve, host, port, transport._accept)
                except OSError as exc:
                    raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
                public = announce_host or ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host)
                transport.address = PeerAddress(public, bound_port, identity.peer_id)
                transport.log.info("listening", address=str(transport.address))
            try:
                yield transport
            finally:
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(transport.limits.connection.close_timeout + 1):
                        await transport._close_all()
        except Exception as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
