"""Relayed connections: a byte pipe through a public peer, for peers nobody can dial.

SPEC.md "Relay" is the contract; this module is its I/O. Three parts:

- :class:`RelayPipe` is one end's ``trio.abc.Stream`` through a relay. What it sends goes out
  as a moshpit stream ``relay.up`` to the relay; what it receives arrives as the stream
  ``relay.down`` the relay opens back. Both ride on the ordinary, authenticated connection
  between this peer and the relay, so each hop has the existing credit-based flow control,
  deadlines and cancellation. The transport runs the *unchanged* websocket, handshake and
  envelope code over the pipe, end to end with the peer behind the relay: the relay only
  ever sees ciphertext, and cannot impersonate either end or alter a byte unnoticed.
- :class:`RelayService` (on a listening peer that offers relaying): reservations, circuit
  set-up, and the forwarding of each direction, paced by ``relay_table.RelayTable``.
- :class:`RelayEndpoint` (on every peer): reserve a slot on a relay, open a circuit to a peer
  through one, accept circuits a relay announces, and route ``relay.down`` streams to their
  pipes. The transport owns one and uses it when it has no other way to reach a peer.

Tasks: a relayed connection is served by one task in the transport's nursery, as a dialed or
accepted one is, with one more child that breaks the pipe at once when the connection to the
relay ends (``RelayPipe.watch``). The relay forwards each direction inside the handler task of
that direction's ``relay.up`` stream; nothing outlives the connections it rides on.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import trio

from ..errors import ConfigError, MoshpitError, Rejected, RelayRefused, UnknownHandler
from ..identity import PeerID
from .address import PeerAddress
from .connection import Connection, Request, SendStream, StreamRequest
from .relay_table import CIRCUIT_ID_SIZE, Circuit, RelayLimits, RelayTable

if TYPE_CHECKING:
    from .transport import Transport

__all__ = [
    "CONNECT",
    "DOWN",
    "INCOMING",
    "RESERVE",
    "UP",
    "RelayEndpoint",
    "RelayPipe",
    "RelayService",
]

RESERVE: Final = "relay.reserve"
CONNECT: Final = "relay.connect"
INCOMING: Final = "relay.incoming"
UP: Final = "relay.up"
DOWN: Final = "relay.down"

#: the longest reservation a peer asks for, and the longest circuit it accepts (ms)
_MAX_MS: Final = 86_400_000
_MAX_DETAIL: Final = 1000
#: peers whose relays a peer remembers (``RelayEndpoint.routes``)
MAX_ROUTED: Final = 4096
#: circuits a peer waits on at once as the target (announced, not yet connected)
_MAX_PENDING: Final = 64


# -- messages (SPEC.md "Relay"): each one msgpack array, decoded strictly -----------------------

_T = TypeVar("_T")
_encoder = msgspec.msgpack.Encoder()
_answer_decoder = msgspec.msgpack.Decoder(tuple[str, str, int])
_reserve_decoder = msgspec.msgpack.Decoder(tuple[int])
_connect_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])
_incoming_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes, int])
_pipe_decoder = msgspec.msgpack.Decoder(tuple[bytes])


def answer(status: str, detail: str = "", value: int = 0) -> bytes:
    """``[status, detail, value]``: every relay call's answer."""
    return _encoder.encode((status, detail[:_MAX_DETAIL], value))


def _refusal(exc: RelayRefused) -> bytes:
    return answer(exc.code, exc.detail)


def _decode_answer(payload: bytes, relay: PeerID) -> int:
    """The value of an ``ok`` answer; ``RelayRefused`` for any other status."""
    try:
        status, detail, value = _answer_decoder.decode(payload)
    except msgspec.DecodeError:
        raise RelayRefused("malformed", f"{relay.short} sent an unreadable answer") from None
    if status != "ok":
        raise RelayRefused(status[:32], detail[:_MAX_DETAIL])
    if not 0 < value <= _MAX_MS:
        raise RelayRefused("malformed", f"{relay.short} granted {value} ms")
    return value


def _decode(decoder: msgspec.msgpack.Decoder[_T], payload: memoryview, what: str) -> _T:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError:
        raise Rejected(f"malformed {what}") from None


def _peer(raw: object) -> PeerID:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise Rejected("a PeerID is 32 bytes")
    return PeerID(raw)


def _circuit_id(raw: object) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != CIRCUIT_ID_SIZE:
        raise Rejected(f"a circuit id is {CIRCUIT_ID_SIZE} bytes")
    return raw


def pipe_header(circuit: bytes) -> bytes:
    """``[circuit]``: the header of ``relay.up`` and ``relay.down`` streams."""
    return _encoder.encode((circuit,))


def reserve_request(ttl_ms: int) -> bytes:
    """``[ttl_ms]``: the body of ``relay.reserve``."""
    return _encoder.encode((ttl_ms,))


def connect_request(target: PeerID, circuit: bytes) -> bytes:
    """``[target, circuit]``: the body of ``relay.connect``."""
    return _encoder.encode((target.to_bytes(), circuit))


def incoming_request(initiator: PeerID, circuit: bytes, lifetime_ms: int) -> bytes:
    """``[initiator, circuit, lifetime_ms]``: the body of ``relay.incoming``."""
    return _encoder.encode((initiator.to_bytes(), circuit, lifetime_ms))


#: the strict decoder of each message (SPEC.md "Relay"), for tests and vectors
DECODERS: Final[dict[str, msgspec.msgpack.Decoder[Any]]] = {
    "reserve": _reserve_decoder,
    "connect": _connect_decoder,
    "incoming": _incoming_decoder,
    "answer": _answer_decoder,
    "pipe": _pipe_decoder,
}


# -- the pipe ----------------------------------------------------------------------------------


class RelayPipe(trio.abc.Stream):
    """One end of a circuit, as a byte stream (see the module docstring).

    ``send_all`` sends on the ``relay.up`` stream (waiting for the relay's credit);
    ``receive_some`` returns the chunks of the ``relay.down`` stream as they come. The pipe
    breaks (``trio.BrokenResourceError``) when the relay refuses or ends either stream, when the
    circuit's lifetime is over, or when the connection to the relay ends.
    """

    def __init__(self, relay: Connection, circuit: bytes, remote: PeerID) -> None:
        self.relay = relay
        self.circuit = circuit
        #: the peer at the other end (as the relay named it; the handshake proves it)
        self.remote = remote
        self._out: SendStream | None = None
        # The downstream handler hands chunks over one at a time: it takes the next chunk
        # (granting credit) only once the previous one was read, so a reader that stops
        # stops the relay, and through it the sender.
        self._in_send, self._in_recv = trio.open_memory_channel[bytes](0)
        self._rest = b""  # the chunk being read, from _offset on
        self._offset = 0
        self._attached = False
        self._eof = False
        self._closed = False
        self._broken: str | None = None
        self._sending = False
        self._receiving = False

    @property
    def broken(self) -> str | None:
        return self._broken

    async def open_out(self, lifetime: float) -> None:
        """Open the ``relay.up`` stream; its deadline is the circuit's end."""
        stream = self.relay.open_stream(UP, pipe_header(self.circuit), timeout=lifetime)
        await stream.__aenter__()
        self._out = stream

    def _break(self, reason: str) -> None:
        if self._broken is None and not self._closed:
            self._broken = reason
        self._in_send.close()

    async def watch(self) -> None:
        """Break the pipe as soon as the connection to the relay ends (run beside its user)."""
        await self.relay.wait_closed()
        self._break(f"the connection to relay {self.relay.remote_peer_id.short} ended")

    async def feed(self, request: StreamRequest) -> bytes:
        """Serve the relay's ``relay.down`` stream: pass its chunks on to ``receive_some``."""
        if self._attached:
            raise Rejected("this circuit already has its downstream")
        self._attached = True
        ended = False
        try:
            async for chunk in request:
                await self._in_send.send(bytes(chunk))
            ended = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ended = True  # our reader closed the pipe or it broke meanwhile: nothing to pass on
        finally:
            if not ended:
                self._break("the relay ended the circuit")
            self._in_send.close()
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this pipe")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the pipe was closed")
            if self._broken is not None:
                raise trio.BrokenResourceError(self._broken)
            if self._out is None:
                raise trio.BrokenResourceError("the circuit has no upstream")
            if not data:
                return
            try:
                await self._out.send(data)
            except MoshpitError as exc:
                self._break(f"relay stream failed: {type(exc).__name__}: {exc}")
                raise trio.BrokenResourceError(self._broken) from None
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this pipe")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the pipe was closed")
            if self._offset >= len(self._rest) and not self._eof:
                try:
                    self._rest, self._offset = await self._in_recv.receive(), 0
                except trio.EndOfChannel:
                    if self._broken is not None:
                        raise trio.BrokenResourceError(self._broken) from None
                    self._eof = True
            start, left = self._offset, len(self._rest) - self._offset
            if left <= 0:
                return b""
            n = left if max_bytes is None else min(left, max_bytes)
            self._offset = start + n
            # A whole chunk goes as it is; a part is copied, only that part (never the rest).
            return self._rest if n == len(self._rest) else self._rest[start : start + n]
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._out is not None:
                # An END after every queued chunk; never a CANCEL, which would drop the tail
                # (the websocket's closing frame) at the relay.
                self._out.end_nowait()
            self._in_recv.close()
            self._in_send.close()
        await trio.lowlevel.checkpoint()


# -- the relay's side --------------------------------------------------------------------------


class RelayService:
    """Offer relaying on ``transport`` (a listening peer): see SPEC.md "Relay"."""

    def __init__(self, transport: Transport, limits: RelayLimits | None = None) -> None:
        if transport.address is None:
            raise ConfigError("a relay must listen: client-mode peers cannot relay")
        self.transport = transport
        self.limits = limits or RelayLimits()
        self.table = RelayTable(self.limits, trio.current_time(), self._direct_to_exists)
        self._ended: dict[bytes, int] = {}
        #: bytes forwarded since the start, both directions of every circuit
        self.bytes_forwarded = 0
        #: peers banned since the start for asking again and again for what this relay refused
        self.bans = 0
        transport.register(RESERVE, self._on_reserve)
        transport.register(CONNECT, self._on_connect)
        transport.register_stream(UP, self._on_up)

    def _count_refusal(self, peer: PeerID, what: str) -> None:
        """A refusal feeds the access policy: a peer that floods the relay with requests it
        refuses is banned like one that floods calls (its connections close at once)."""
        if self.transport.access.refused(peer, what, trio.current_time()) is not None:
            self.bans += 1
            self.transport._enforce_bans()

    def _direct_to_exists(self, peer: PeerID) -> bool:
        return self._direct(peer) is not None

    def _direct(self, peer: PeerID) -> Connection | None:
        conn = self.transport.connection_to(peer)
        return conn if conn is not None and conn.via is None else None

    async def _on_reserve(self, request: Request) -> bytes:
        (ttl_ms,) = _decode(_reserve_decoder, request.payload, "reservation")
        assert isinstance(ttl_ms, int)
        if request.connection.via is not None:
            detail = "reserve over a connection you dialed, not a circuit"
            return _refusal(self.table.refused("malformed", detail))
        if not 0 < ttl_ms <= _MAX_MS:
            return _refusal(self.table.refused("malformed", f"ttl_ms {ttl_ms} out of range"))
        now = trio.current_time()
        try:
            reservation = self.table.reserve(request.peer, ttl_ms / 1000, now)
        except RelayRefused as exc:
            self.transport.log.info("reservation refused", remote=request.peer.short, code=exc.code)
            self._count_refusal(request.peer, "reservations")
            return _refusal(exc)
        granted = max(1, int((reservation.expires - now) * 1000))
        # The reservation lives on this connection: it is not an idle one to close.
        request.connection.pinned_until = reservation.expires
        return answer("ok", "", granted)

    async def _on_connect(self, request: Request) -> bytes:
        raw_target, raw_circuit = _decode(_connect_decoder, request.payload, "circuit request")
        target, circuit_id = _peer(raw_target), _circuit_id(raw_circuit)
        now = trio.current_time()
        try:
            circuit = self.table.open_circuit(circuit_id, request.peer, target, now)
        except RelayRefused as exc:
            self.transport.log.info(
                "circuit refused", remote=request.peer.short, target=target.short, code=exc.code
            )
            self._count_refusal(request.peer, "circuit requests")
            return _refusal(exc)
        conn = self._direct(target)
        lifetime_ms = max(1, int((circuit.expires - now) * 1000))
        try:
            if conn is None:
                raise self.table.refused(
                    "unreachable", f"{target.short} is no longer connected here"
                )
            body = incoming_request(request.peer, circuit_id, lifetime_ms)
            reply = await conn.call(INCOMING, body, timeout=max(0.001, request.deadline - now))
            try:
                _decode_answer(reply, target)
            except RelayRefused:
                # counted under one code: the target chooses its codes, and a counter keyed by
                # them would be as large as it likes
                self.table.refusals["target-refused"] += 1
                raise
        except RelayRefused as exc:
            self.table.close(circuit_id)
            return _refusal(exc)
        except MoshpitError as exc:
            self.table.close(circuit_id)
            detail = f"{target.short}: {type(exc).__name__}: {exc}"
            return _refusal(self.table.refused("unreachable", detail))
        self.transport.log.info("circuit opened", initiator=request.peer.short, target=target.short)
        return answer("ok", "", lifetime_ms)

    async def _on_up(self, request: StreamRequest) -> bytes:
        (raw,) = _decode(_pipe_decoder, request.header, "pipe header")
        circuit_id = _circuit_id(raw)
        circuit = self.table.attach(circuit_id, request.peer, trio.current_time())
        try:
            other = circuit.other_end(request.peer)
            conn = self._direct(other)
            if conn is None:
                raise Rejected(f"circuit ended: {other.short} is gone")
            left = circuit.expires - trio.current_time()
            try:
                async with conn.open_stream(DOWN, pipe_header(circuit_id), timeout=left) as out:
                    async for chunk in request:
                        await self._forward(out, circuit, chunk)
                    out.end_nowait()
            except MoshpitError as exc:
                if isinstance(exc, Rejected):
                    raise
                raise Rejected(f"circuit ended: {type(exc).__name__}: {exc}") from None
        finally:
            ended = self._ended[circuit_id] = self._ended.get(circuit_id, 0) + 1
            if ended >= len(circuit.attached):
                self.table.close(circuit_id)
                del self._ended[circuit_id]
        return b""

    async def _forward(self, out: SendStream, circuit: Circuit, chunk: memoryview) -> None:
        """Forward one chunk, paced (see ``RelayTable.pace``)."""
        at = self.table.pace(circuit, len(chunk), trio.current_time())
        await trio.sleep_until(at)
        await out.send(chunk)
        self.bytes_forwarded += len(chunk)


# -- every peer's side -------------------------------------------------------------------------


class RelayEndpoint:
    """A peer's end of relaying: reservations it holds, circuits it opens or accepts, and the
    relays it knows for other peers (see the module docstring)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        #: relays known for peers without an address: the routes ``Transport.connect`` tries
        self.routes: dict[PeerID, list[PeerAddress]] = {}
        #: asked when no route is known: (peer) -> its relays' addresses (the DHT, peer.py)
        self.resolver: Callable[[PeerID], Awaitable[list[PeerAddress]]] | None = None
        #: relays holding a reservation of ours, and until when (trio time)
        self.reservations: dict[PeerID, float] = {}
        self._pending: dict[tuple[PeerID, bytes], RelayPipe] = {}
        transport.register(INCOMING, self._on_incoming)
        transport.register_stream(DOWN, self._on_down)

    def add_route(self, peer: PeerID, relay: PeerAddress) -> None:
        """Reach ``peer`` through ``relay`` when there is no direct way. Routes are kept for
        the ``MAX_ROUTED`` peers routed most recently (a lookup finds the others again)."""
        if peer not in self.routes and len(self.routes) >= MAX_ROUTED:
            del self.routes[next(iter(self.routes))]
        routes = self.routes.setdefault(peer, [])
        if relay not in routes:
            routes.append(relay)

    # -- reservations ------------------------------------------------------------------------

    async def reserve(self, relay: PeerAddress | PeerID, ttl: float, *, timeout: float) -> float:
        """Reserve (or renew) a slot on ``relay``; the seconds it granted. ``RelayRefused``
        when it refused (``not-a-relay`` when it does not relay at all)."""
        ttl_ms = int(ttl * 1000)
        if not 0 < ttl_ms <= _MAX_MS:
            raise ConfigError(f"a reservation lasts 0.001 .. 86400 s, not {ttl!r}")
        conn = await self.transport.connect(relay, timeout=timeout)
        if conn.via is not None:
            raise ConfigError("reserve on a relay you can dial directly")
        try:
            reply = await conn.call(RESERVE, reserve_request(ttl_ms), timeout=timeout)
        except UnknownHandler:
            raise RelayRefused(
                "not-a-relay", f"{conn.remote_peer_id.short} does not relay"
            ) from None
        granted = _decode_answer(reply, conn.remote_peer_id) / 1000
        self.reservations[conn.remote_peer_id] = trio.current_time() + granted
        conn.pinned_until = trio.current_time() + granted  # our way in: never closed as idle
        return granted

    def live_reservations(self) -> list[PeerID]:
        """The relays that hold a slot for us now: the reservation has not run out and the
        relay's direct connection (our way in) is still open. Averaging announces a client-mode
        peer as relayed on this, and its progress record says how many (the dashboard)."""
        now = trio.current_time()
        live = []
        for relay, until in self.reservations.items():
            conn = self.transport.connection_to(relay)
            if until > now and conn is not None and conn.via is None:
                live.append(relay)
        return live

    # -- circuits we open --------------------------------------------------------------------

    async def open_circuit(
        self, relay: Connection, target: PeerID, *, timeout: float
    ) -> tuple[RelayPipe, float]:
        """Ask ``relay`` for a circuit to ``target``; the pipe (upstream open) and its
        lifetime in seconds."""
        circuit = secrets.token_bytes(CIRCUIT_ID_SIZE)
        pipe = RelayPipe(relay, circuit, target)
        key = (relay.remote_peer_id, circuit)
        self._pending[key] = pipe
        try:
            try:
                body = connect_request(target, circuit)
                reply = await relay.call(CONNECT, body, timeout=timeout)
            except UnknownHandler:
                raise RelayRefused(
                    "not-a-relay", f"{relay.remote_peer_id.short} does not relay"
                ) from None
            lifetime = _decode_answer(reply, relay.remote_peer_id) / 1000
            await pipe.open_out(lifetime)
        except BaseException:
            self._pending.pop(key, None)
            raise
        return pipe, lifetime

    def forget(self, pipe: RelayPipe) -> None:
        self._pending.pop((pipe.relay.remote_peer_id, pipe.circuit), None)

    # -- circuits a relay announces to us ----------------------------------------------------

    async def _on_incoming(self, request: Request) -> bytes:
        raw_initiator, raw_circuit, lifetime_ms = _decode(
            _incoming_decoder, request.payload, "circuit announcement"
        )
        initiator, circuit = _peer(raw_initiator), _circuit_id(raw_circuit)
        assert isinstance(lifetime_ms, int)
        if not 0 < lifetime_ms <= _MAX_MS:
            return answer("malformed", f"lifetime_ms {lifetime_ms} out of range")
        transport = self.transport
        if request.connection.via is not None:
            return answer("refused", "circuits are announced over a direct connection")
        if self.reservations.get(request.peer, -1.0) <= trio.current_time():
            # Only a relay we reserved on may bring us circuits: nobody else gets to open
            # streams of ours and run handshakes through them.
            return answer("no-reservation", "we hold no reservation with you")
        refused = transport.access.refusal(initiator, trio.current_time())
        if refused is not None:
            return answer("refused", refused)
        if len(self._pending) >= _MAX_PENDING:
            return answer("refused", "too many circuits being set up; try again later")
        key = (request.peer, circuit)
        if key in self._pending:
            return answer("circuit-id", "a circuit with this id is open")
        pipe = RelayPipe(request.connection, circuit, initiator)
        self._pending[key] = pipe
        transport._nursery.start_soon(transport._serve_relayed, pipe, lifetime_ms / 1000)
        return answer("ok", "", lifetime_ms)

    async def _on_down(self, request: StreamRequest) -> bytes:
        (raw,) = _decode(_pipe_decoder, request.header, "pipe header")
        pipe = self._pending.get((request.peer, _circuit_id(raw)))
        if pipe is None:
            raise Rejected("no such circuit here")
        return await pipe.feed(request)
