"""One authenticated websocket to one peer: calls, streams, and the tasks that move them.

A ``Connection`` owns three kinds of task, all inside the nursery of ``run()``:

- the *reader*: takes one websocket message at a time, opens it (every check in
  ``envelope.EnvelopeOpener``) and dispatches it by kind (``_DISPATCH`` below). It never waits on
  application code: a reply wakes a waiting caller, a chunk lands in a stream's bounded buffer, a
  request starts a handler task (which runs up to its first wait before the reader reads on).
- the *writer*: the only task that writes to the websocket. Envelopes are sealed (numbered) by
  the task that sends them and queued without a checkpoint in between, so sequence numbers hit
  the wire in order, and a caller cancelled half-way can never leave a gap or half a frame.
- one *handler* task per incoming call or stream, under the caller's deadline and cancelled by
  the caller's CANCEL.

When the websocket ends (or the peer breaks the protocol) the nursery is cancelled: waiting
callers get ``ConnectionLost``, handlers are cancelled, and ``run()`` returns.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import msgspec
import trio

from ..errors import (
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    MoshpitError,
    ProtocolError,
    Rejected,
    RemoteError,
    UnknownHandler,
)
from ..identity import Identity, PeerID
from .envelope import (
    DEFAULT_LIMITS,
    Direction,
    Envelope,
    EnvelopeLimits,
    EnvelopeOpener,
    EnvelopeSealer,
    Kind,
    SharedPayload,
    SharedSlice,
)
from .handshake import HandshakeResult
from .streams import Pacer
from .websocket import TOO_BIG, WebSocket, WebSocketClosed

__all__ = [
    "Connection",
    "ConnectionLimits",
    "Handler",
    "HandlerRegistry",
    "Request",
    "SendStream",
    "StreamHandler",
    "StreamRequest",
]

_MAX_DEADLINE_MS: Final = 24 * 3600 * 1000


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per-connection limits. Every one protects a peer from a careless or hostile remote."""

    envelope: EnvelopeLimits = DEFAULT_LIMITS
    #: incoming calls (and streams) running at once; more are answered "busy"
    max_incoming_calls: int = 64
    #: incoming streams running at once; more are answered "busy"
    max_incoming_streams: int = 16
    #: bytes a stream receiver lets the sender have in flight (its buffer never holds more)
    stream_window: int = 16 * 1024 * 1024
    #: sealed envelopes queued for the writer; a sender waits (under its deadline) beyond this
    max_queued: int = 8
    #: chunk size ``SendStream.send`` cuts data into
    stream_chunk: int = 4 * 1024 * 1024
    #: how long a graceful close waits for the GOODBYE to leave
    close_timeout: float = 2.0

    def __post_init__(self) -> None:
        data_cap = self.envelope.max_payload[Kind.STREAM_DATA]
        if not 0 < self.stream_chunk <= data_cap:
            raise ConfigError(f"stream_chunk must be in 1..{data_cap} (the STREAM_DATA cap)")
        if self.stream_window < self.stream_chunk:
            raise ConfigError("stream_window must hold at least one stream_chunk")
        for name in ("max_incoming_calls", "max_incoming_streams", "max_queued"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """What a handler gets for a call: who called, what, and until when."""

    peer: PeerID
    name: str
    payload: memoryview
    #: trio time by which the caller stops waiting; the handler is cancelled then
    deadline: float
    connection: Connection
    #: set once the call is answered as far as this side goes: its response sealed for the
    #: wire (the connection's writer took it and writes it next), its error queued, or the
    #: call ended without an answer (cancelled, the connection lost). A handler that hands its
    #: work on (a matchmaking leader's) can wait for it before it takes the CPU for long.
    answered: trio.Event = dataclasses.field(
        default_factory=trio.Event, init=False, repr=False, compare=False
    )


class StreamRequest:
    """What a stream handler gets: the stream's header, then its chunks as they arrive.

    ``async for chunk in request`` yields memoryviews in order and ends at the sender's
    ``finish()``. Reading a chunk frees its room in the window, which lets the sender go on.
    """

    def __init__(
        self, connection: Connection, call_id: int, name: str, header: memoryview, deadline: float
    ) -> None:
        self.connection = connection
        self.peer = connection.remote_peer_id
        self.call_id = call_id
        self.name = name
        self.header = header
        self.deadline = deadline
        self._chunks: deque[memoryview] = deque()
        self._arrived = trio.Event()
        self._ended = False
        # Credit accounting, in bytes: what the sender may still send without breaking the rules,
        # and what the handler consumed since the last grant.
        self._granted = 0
        self._consumed = 0

    def _deliver(self, chunk: memoryview) -> None:
        if self._ended:
            raise ProtocolError("stream", f"chunk after the end of stream {self.call_id}")
        if len(chunk) > self._granted:
            raise ProtocolError(
                "credit", f"stream {self.call_id}: {len(chunk)} bytes sent, {self._granted} granted"
            )
        self._granted -= len(chunk)
        self._chunks.append(chunk)
        self._arrived.set()

    def _end(self) -> None:
        if self._ended:
            raise ProtocolError("stream", f"stream {self.call_id} ended twice")
        self._ended = True
        self._arrived.set()

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[memoryview]:
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                await self._consumed_bytes(len(chunk))
                yield chunk
            elif self._ended:
                return
            else:
                self._arrived = trio.Event()
                await self._arrived.wait()

    async def read_all(self, limit: int) -> bytes:
        """All remaining chunks joined; ``Rejected`` when they pass ``limit`` bytes."""
        parts: list[memoryview] = []
        total = 0
        async for chunk in self:
            total += len(chunk)
            if total > limit:
                raise Rejected(f"stream larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def _consumed_bytes(self, n: int) -> None:
        self._consumed += n
        window = self.connection.limits.stream_window
        # Grant in batches of half a window: one CREDIT per few chunks, and the sender never
        # waits on a full round trip while the receiver keeps up.
        if self._consumed * 2 >= window:
            grant, self._consumed = self._consumed, 0
            await self.connection._grant(self, grant)
        else:
            # Cancellable here, but no yield to the scheduler: the handler yields as it
            # waits for the next chunk, and no more than a window's worth is ever queued.
            await trio.lowlevel.checkpoint_if_cancelled()


Handler = Callable[[Request], Awaitable[bytes]]
StreamHandler = Callable[[StreamRequest], Awaitable[bytes]]


class HandlerRegistry:
    """Handlers by name; one registry is shared by every connection of a transport."""

    def __init__(self) -> None:
        self.calls: dict[str, Handler] = {}
        self.streams: dict[str, StreamHandler] = {}

    def register(self, name: str, handler: Handler) -> None:
        self._check_name(name)
        self.calls[name] = handler

    def register_stream(self, name: str, handler: StreamHandler) -> None:
        self._check_name(name)
        self.streams[name] = handler

    def unregister(self, name: str) -> None:
        self.calls.pop(name, None)
        self.streams.pop(name, None)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name or len(name.encode()) > DEFAULT_LIMITS.max_name:
            raise ConfigError(f"a handler name is 1-{DEFAULT_LIMITS.max_name} bytes of text")
        if name in self.calls or name in self.streams:
            raise ConfigError(f"a handler named {name!r} is already registered")


class _ErrorBody(msgspec.Struct):
    code: str
    message: str


_error_encoder = msgspec.msgpack.Encoder()
_error_decoder = msgspec.msgpack.Decoder(_ErrorBody)


def _error_from_wire(payload: memoryview, peer: PeerID, name: str) -> MoshpitError:
    try:
        body = _error_decoder.decode(payload)
    except msgspec.DecodeError:
        return RemoteError(f"{peer.short} answered {name!r} with an unreadable error")
    message = body.message[:1000]
    if body.code == "unknown-handler":
        return UnknownHandler(message)
    if body.code in ("rejected", "busy"):
        return Rejected(message)
    return RemoteError(f"{peer.short} failed on {name!r}: {message}")


class _Waiter:
    """Where the reader puts the answer to one of our calls or streams."""

    __slots__ = (
        "credit",
        "credit_changed",
        "done",
        "envelope",
        "error",
        "granted",
        "name",
        "presumed",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.done = trio.Event()
        self.envelope: Envelope | None = None
        self.error: BaseException | None = None
        # streams only: bytes the receiver lets us send, and a wake-up for senders
        self.credit = 0
        self.credit_changed = trio.Event()
        # the window counted before the receiver's first grant (its window on this
        # connection, as an earlier stream's first grant showed it), and whether that first
        # grant has come
        self.presumed = 0
        self.granted = False

    def finish(self, envelope: Envelope | None, error: BaseException | None) -> None:
        if not self.done.is_set():
            self.envelope, self.error = envelope, error
            self.done.set()
            self.credit_changed.set()


class Connection:
    """An authenticated connection to ``remote_peer_id``; see the module docstring."""

    def __init__(
        self,
        ws: WebSocket,
        handshake: HandshakeResult,
        identity: Identity,
        *,
        initiator: bool,
        registry: HandlerRegistry,
        limits: ConnectionLimits,
        log: Any,
        admit: Callable[[int], str | None] | None = None,
        on_heard: Callable[[], None] | None = None,
        on_closed: Callable[[Connection], None] | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.remote_peer_id = handshake.remote_peer_id
        self._pacer = pacer
        #: the cap on what this connection sends, in bytes/s, as ``pace`` set it (None: none)
        self.pacing: float | None = None
        self.session = handshake.session
        self.initiator = initiator
        self.registry = registry
        self.limits = limits
        self.log = log.bind(remote=self.remote_peer_id.short, session=handshake.session[:4].hex())
        self._ws = ws
        # Writes (head, payload) as one websocket message without joining them.
        self._write_message = ws.send_message
        sending, receiving = (
            (Direction.INITIATOR_TO_RESPONDER, Direction.RESPONDER_TO_INITIATOR)
            if initiator
            else (Direction.RESPONDER_TO_INITIATOR, Direction.INITIATOR_TO_RESPONDER)
        )
        self._sealer = EnvelopeSealer(
            identity.peer_id,
            handshake.session,
            handshake.remote_peer_id,
            handshake.keys.send,
            direction=sending,
            limits=limits.envelope,
        )
        self._opener = EnvelopeOpener(
            handshake.keys.receive,
            handshake.session,
            handshake.remote_peer_id,
            identity.peer_id,
            limits.envelope,
            direction=receiving,
        )
        # Envelopes to write, in order, sealed by the writer as it comes to each (so that the
        # sequence numbers follow the order of writing); unbounded because the slots bound it.
        # None: only a wake-up (a credit is waiting in _credits).
        self._outbox_send, self._outbox = trio.open_memory_channel[_Outgoing | None](math.inf)
        # STREAM_CREDITs to write before anything still in the outbox: a credit lets the
        # remote's stream go on, and must not wait behind megabytes of our own chunks queued
        # for a link that the remote's data does not even use (its direction is the other).
        self._credits: deque[_Outgoing] = deque()
        # Envelopes queued (or taken by the writer) and not sealed yet, credits included: while
        # there are any, nothing may be sealed before the writer has come to them (_enqueue).
        self._unsealed = 0
        # Envelopes sealed as they were queued (at most one waits here: _enqueue), written
        # before anything else.
        self._sealed: deque[_Outgoing] = deque()
        self._writer_done = trio.Event()
        self._finished = trio.Event()
        self._closed_event = trio.Event()
        self._closing = False
        # When a graceful close must be over: set by aclose(), so its wait for the writer and
        # run()'s websocket close share one close_timeout between them.
        self._close_by: float | None = None
        self._close_code = 1000
        self._queue_slots = trio.Semaphore(limits.max_queued)
        self._next_call_id = 1
        self._waiters: dict[int, _Waiter] = {}
        self._incoming: dict[int, tuple[trio.CancelScope, StreamRequest | None]] = {}
        self._incoming_streams = 0
        self._max_remote_call_id = 0
        self._closed = False
        self._close_reason = ""
        self._nursery: trio.Nursery | None = None
        # A call the envelope just dispatched accepted: the reader starts its handler.
        self._starting: (
            tuple[Envelope, trio.CancelScope, Callable[[Any], Awaitable[bytes]], Any] | None
        ) = None
        # The transport's access check (rate limits, bans): given the bytes received since the
        # last call, it returns None to run the call or why it is refused ("busy").
        self._admit = admit
        self._admitted_bytes = 0
        # The transport's liveness hooks: every message read is a sign of life (a frozen
        # peer sends none); the end of the connection is news to whoever waits on the peer.
        self._on_heard = on_heard
        self._on_closed = on_closed
        #: trio time of the last message written or read (the transport closes the least
        #: recently used idle connections when it holds too many)
        self.last_active = trio.current_time()
        #: not closed as idle before this trio time (a relay reservation rides on it)
        self.pinned_until = -math.inf
        self.bytes_sent = 0
        self.bytes_received = 0
        # Envelopes written and read (requests, responses, stream chunks, credits, control):
        # the protocol's messages, counted where the bytes are.
        self.messages_sent = 0
        self.messages_received = 0
        #: the violation that closed this connection, if one did
        self.protocol_error: ProtocolError | None = None
        #: the relay this connection's bytes pass through (wire/relay.py); None when direct
        self.via: PeerID | None = None
        #: the window the remote grants first on each of our streams, once one has shown it
        #: (None before): a later stream sends that much before its own grant arrives, not a
        #: round trip later
        self.stream_window: int | None = None

    def pace(self, rate: float | None) -> bool:
        """Cap the rate at which this connection sends, in bytes/s (the kernel spaces the
        socket's packets out: Linux's ``SO_MAX_PACING_RATE``), or lift the cap (None). False,
        and nothing changes, where there is no such socket: in memory, through a relay, on
        another platform. (An all-reduce paces what it sends to each member, so that the
        flows sharing our uplink finish together instead of crowding each other out:
        ``AllReduce`` with ``pace``.)"""
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
        ):
            raise ConfigError(f"a pacing rate is a positive number of bytes/s, not {rate!r}")
        if self._pacer is None or self._closed:
            return False
        self.pacing = None if rate is None or math.isinf(rate) else float(rate)
        self._pacer(self.pacing)
        return True

    # -- lifetime ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def closing(self) -> bool:
        """Saying GOODBYE (or closed): no new call or stream should start on it."""
        return self._closing or self._closed

    @property
    def close_reason(self) -> str:
        return self._close_reason

    @property
    def busy(self) -> bool:
        """Calls or streams in flight, either way: closing it now would cut them off."""
        return bool(self._waiters or self._incoming)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the connection until it ends; the caller's nursery owns this."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader)
                task_status.started()
        finally:
            self._mark_closed(self._close_reason or "closed")
            # A frozen peer never answers the websocket close handshake; don't wait for it.
            close_by = self._close_by
            if close_by is None:
                close_by = trio.current_time() + self.limits.close_timeout
            with trio.CancelScope(shield=True, deadline=close_by):
                await self._ws.aclose(code=self._close_code, reason=self._close_reason[:100])
            self._finished.set()

    async def aclose(self, reason: str = "closing") -> None:
        """Say GOODBYE (briefly, best effort) and end the connection."""
        if self._closed or self._closing:
            return
        self._queue_control(Kind.GOODBYE, 0, reason.encode()[:1000])
        # Closing the outbox lets the writer send what is queued, GOODBYE last, and stop.
        self._closing = True
        self._outbox_send.close()
        # One budget for the whole goodbye: a writer still working through megabytes queued
        # on a slow link (a round this peer abandoned) must not double how long it takes.
        self._close_by = trio.current_time() + self.limits.close_timeout
        with trio.move_on_at(self._close_by):
            await self._writer_done.wait()
        self._shutdown(reason)
        # Wait for run() to finish the websocket close while the websocket's own reader task
        # still runs: it is the one that sees the remote's answer to our close frame.
        with trio.move_on_at(self._close_by):
            await self._finished.wait()

    def _shutdown(self, reason: str, code: int = 1000) -> None:
        if not self._closed:
            self._close_code = code
        self._mark_closed(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def wait_closed(self) -> None:
        """Return once the connection has ended (for whatever reason)."""
        await self._closed_event.wait()

    def _mark_closed(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._closed_event.set()
        lost = ConnectionLost(f"connection to {self.remote_peer_id.short} ended: {reason}")
        for waiter in self._waiters.values():
            waiter.finish(None, lost)
        # Envelopes the writer will never come to: whoever waits for one to be sealed is told.
        self._credits.clear()
        self._sealed.clear()
        while True:
            try:
                item = self._outbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            if item is not None:
                item.sealed(lost)
        for scope, _ in self._incoming.values():
            scope.cancel()
        # Senders waiting for room in the queue: the writer will free none now. Wake each one;
        # _acquire_slot sees the connection closed and raises ConnectionLost at once (rather
        # than at its deadline).
        for _ in range(self._queue_slots.statistics().tasks_waiting):
            self._queue_slots.release()
        if self._on_closed is not None:
            self._on_closed(self)

    # -- the writer --------------------------------------------------------------------------

    async def _writer(self) -> None:
        try:
            async for item in self._outbox:
                # Envelopes sealed as they were queued go first: each was sealed before any
                # credit or envelope still waiting to be sealed was queued (_enqueue), and
                # sequence numbers must reach the wire in order. Then the credits, then the
                # envelope taken (nothing is sealed ahead of it while it waits: _unsealed).
                while self._sealed or self._credits:
                    if self._sealed:
                        await self._write(self._sealed.popleft())
                    else:
                        await self._write(self._credits.popleft())
                if item is not None:
                    await self._write(item)
        except WebSocketClosed:
            self._shutdown("websocket closed while sending")
        finally:
            self._writer_done.set()

    async def _write(self, item: _Outgoing) -> None:
        """Write ``item``, sealing it first (its payload is read then, once) unless it was
        sealed as it was queued."""
        if item.parts is None:
            self._unsealed -= 1
            if item.dropped or not self._seal(item):
                if item.counted:
                    self._queue_slots.release()
                return
        assert item.parts is not None
        head, body = item.parts
        item.parts = None
        try:
            await self._write_message(head, body)
        finally:
            if item.counted:
                self._queue_slots.release()
        self.bytes_sent += len(head) + len(body)
        self.messages_sent += 1
        self.last_active = trio.current_time()

    def _seal(self, item: _Outgoing) -> bool:
        """Seal ``item`` (numbering it: the next sequence number) into ``item.parts``; False,
        with the caller's error on ``item``, when it cannot be (over the limits)."""
        try:
            deadline_ms = _ms_left(item.deadline) if item.deadline is not None else 0
            item.parts = self._sealer.seal_parts(
                item.kind, item.call_id, item.payload, deadline_ms=deadline_ms, name=item.name
            )
        except MoshpitError as exc:  # a payload or name over the limits: the caller's error
            item.sealed(exc)
            return False
        item.sealed(None)
        return True

    def _enqueue(self, item: _Outgoing) -> None:
        """Hand ``item`` (holding a queue slot) to the writer. When nothing is queued ahead of
        it, it is sealed here and now, in the sending task: numbered in the order of writing
        all the same (the writer writes it before anything queued later), and its sender need
        not wait for the writer to come to it (a trip through trio's scheduler per envelope).
        Only then: an envelope sealed is a copy of its payload that goes out whatever its
        sender does, so a stream's chunks queued behind others stay views of its memory,
        dropped if it gives up."""
        if self._unsealed or self._sealed:
            self._unsealed += 1
            self._outbox_send.send_nowait(item)
        elif self._seal(item):
            self._sealed.append(item)
            self._outbox_send.send_nowait(None)  # wakes a writer waiting for work
        else:
            self._queue_slots.release()  # over the limits: the caller's error, nothing to write

    async def _send(
        self,
        kind: Kind,
        call_id: int,
        payload: bytes | memoryview | SharedSlice = b"",
    ) -> None:
        """Queue one envelope of a running call or stream, waiting (cancellably) for room in
        the queue, then until the writer has sealed it: its payload is read then, so the
        caller may change its buffer once this returns. Cancelled before that, an envelope
        whose payload is a view of the caller's memory is dropped, never written (``bytes``
        cannot change, and still go out)."""
        item = await self._queue(kind, call_id, payload, keep=isinstance(payload, bytes))
        await item.wait_sealed()

    async def _queue(
        self,
        kind: Kind,
        call_id: int,
        payload: bytes | memoryview | SharedSlice,
        *,
        keep: bool,
    ) -> _Outgoing:
        """Queue one envelope, waiting (cancellably) for room in the queue; the caller waits
        for it to be sealed before changing the payload's buffer. ``keep``: written even if
        its sender gives up before then (the payload cannot change)."""
        await self._acquire_slot()
        item = _Outgoing(kind, call_id, payload, counted=True, keep=keep)
        self._enqueue(item)
        return item

    async def _start_call(
        self, kind: Kind, name: str, payload: bytes | memoryview, deadline: float
    ) -> tuple[int, _Waiter]:
        """Open a call or a stream: wait for room, then take its call id and queue its
        REQUEST / STREAM_OPEN with no checkpoint in between. Ids thus reach the wire in the
        order they were taken, which the receiver insists on, however many calls start at once
        (one dropped on the way, its caller cancelled, leaves a gap, which is allowed).
        """
        await self._acquire_slot()
        call_id, waiter = self._new_waiter(name)
        item = _Outgoing(
            kind,
            call_id,
            payload,
            counted=True,
            keep=isinstance(payload, bytes),
            deadline=deadline,
            name=name,
        )
        self._enqueue(item)
        try:
            await item.wait_sealed()
        except BaseException:
            self._waiters.pop(call_id, None)
            raise
        return call_id, waiter

    async def _acquire_slot(self) -> None:
        self._check_open()
        # A free slot is taken without acquire()'s yield to the scheduler (every envelope
        # sent comes here, and the caller yields anyway while it waits to be sealed).
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self._queue_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._queue_slots.acquire()
        if self._closed or self._closing:
            self._queue_slots.release()
            self._check_open()

    def _queue_control(self, kind: Kind, call_id: int, payload: bytes = b"") -> None:
        """Queue a small control envelope (CANCEL, CREDIT, ERROR, GOODBYE) without waiting for
        room: they are small, and must go out even from a task that is being cancelled. A
        STREAM_CREDIT goes before everything queued (see ``_credits``); the others keep their
        place after what is queued (a STREAM_END after its stream's chunks, a GOODBYE last)."""
        if self._closed or self._closing:
            return
        item = _Outgoing(kind, call_id, payload, counted=False, keep=True)
        self._unsealed += 1
        if kind is Kind.STREAM_CREDIT:
            self._credits.append(item)
            self._outbox_send.send_nowait(None)  # wakes a writer waiting for work
        else:
            self._outbox_send.send_nowait(item)

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ConnectionLost(
                f"connection to {self.remote_peer_id.short} ended: {self._close_reason}"
            )

    # -- the reader --------------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    message = await self._ws.get_message()
                except WebSocketClosed as exc:
                    if exc.code == TOO_BIG:
                        self.log.warning("message over the size limit; closed", detail=str(exc))
                    self._shutdown(f"websocket closed ({exc})")
                    return
                self.bytes_received += len(message)
                self.messages_received += 1
                self.last_active = trio.current_time()
                envelope = self._opener.open(message)
                if self._on_heard is not None:
                    self._on_heard()
                _DISPATCH[envelope.kind](self, envelope)
                starting = self._starting
                if starting is None:
                    # A schedule point before the next envelope (get_message() is none when
                    # the next one is already buffered): what this one woke runs first.
                    await trio.lowlevel.checkpoint()
                    continue
                # A call's handler runs up to its first wait before the next envelope is
                # dispatched, so that the order of what arrived decides, not trio's
                # scheduler: a frozen peer, continued, finds a REQUEST and the caller's
                # CANCEL queued right behind it. Its handler (a DHT lookup: no wait at all)
                # has queued its answer by then, and the answer goes out, which tells the
                # caller the peer is back; left to the scheduler it was cancelled unanswered
                # in about half the runs (test_fault_stages' frozen DHT contact).
                # (An event the handler sets as it starts: what nursery.start does, without
                # the nursery it opens for each call.)
                self._starting = None
                started = trio.Event()
                assert self._nursery is not None
                self._nursery.start_soon(self._serve_call, *starting, started)
                await started.wait()
        except ProtocolError as exc:
            self.log.warning("protocol violation; closing", reason=exc.reason, detail=exc.detail)
            self.protocol_error = exc
            self._shutdown(f"protocol error from the remote peer: {exc}", code=1002)

    # Each _on_* handles one kind. None of them awaits: the reader must never wait on
    # application code. Anything that needs waiting starts a task in the connection's nursery.

    def _on_request(self, env: Envelope) -> None:
        self._accept_call(env, stream=False)

    def _on_stream_open(self, env: Envelope) -> None:
        self._accept_call(env, stream=True)

    def _accept_call(self, env: Envelope, *, stream: bool) -> None:
        if env.call_id <= self._max_remote_call_id:
            raise ProtocolError("call-id", f"call id {env.call_id} reused")
        self._max_remote_call_id = env.call_id
        if not 0 < env.deadline_ms <= _MAX_DEADLINE_MS:
            raise ProtocolError("malformed", f"deadline_ms {env.deadline_ms} out of range")
        deadline = trio.current_time() + env.deadline_ms / 1000
        assert self._nursery is not None
        if self._admit is not None:
            refused = self._admit(self.bytes_received - self._admitted_bytes)
            self._admitted_bytes = self.bytes_received
            if refused is not None:
                self._queue_error(env.call_id, "busy", refused)
                return
        if len(self._incoming) >= self.limits.max_incoming_calls or (
            stream and self._incoming_streams >= self.limits.max_incoming_streams
        ):
            self._queue_error(env.call_id, "busy", "too many calls in flight; try again later")
            return
        if stream:
            stream_handler = self.registry.streams.get(env.name)
            if stream_handler is None:
                self._queue_unknown(env)
                return
            request = StreamRequest(self, env.call_id, env.name, env.payload, deadline)
            scope = trio.CancelScope(deadline=deadline)
            self._incoming[env.call_id] = (scope, request)
            self._incoming_streams += 1
            # The first grant opens the window (or confirms the one the sender presumed from an
            # earlier stream: the same on every stream, SPEC); it also says the stream is accepted.
            request._granted = self.limits.stream_window
            self._queue_control(
                Kind.STREAM_CREDIT, env.call_id, self.limits.stream_window.to_bytes(8, "big")
            )
            self._starting = (env, scope, stream_handler, request)
        else:
            handler = self.registry.calls.get(env.name)
            if handler is None:
                self._queue_unknown(env)
                return
            scope = trio.CancelScope(deadline=deadline)
            self._incoming[env.call_id] = (scope, None)
            call = Request(self.remote_peer_id, env.name, env.payload, deadline, self)
            self._starting = (env, scope, handler, call)

    def _queue_unknown(self, env: Envelope) -> None:
        self.log.info("call to an unknown handler", name=env.name)
        self._queue_error(env.call_id, "unknown-handler", f"no handler named {env.name!r}")

    def _queue_error(self, call_id: int, code: str, message: str) -> None:
        body = _error_encoder.encode(_ErrorBody(code=code, message=message[:4000]))
        self._queue_control(Kind.ERROR, call_id, body)

    async def _serve_call(
        self,
        env: Envelope,
        scope: trio.CancelScope,
        handler: Callable[[Any], Awaitable[bytes]],
        request: Request | StreamRequest,
        started: trio.Event,
    ) -> None:
        started.set()
        try:
            with scope:
                try:
                    result = await handler(request)
                    if not isinstance(result, bytes | bytearray | memoryview):
                        raise TypeError(f"handler returned {type(result).__name__}, not bytes")
                except Rejected as exc:
                    code = "unknown-handler" if isinstance(exc, UnknownHandler) else "rejected"
                    self._queue_error(env.call_id, code, str(exc))
                except (ProtocolError, ConnectionLost):
                    raise
                except Exception as exc:
                    self.log.warning(
                        "handler failed", name=env.name, error=f"{type(exc).__name__}: {exc}"
                    )
                    self._queue_error(env.call_id, "remote-error", f"{type(exc).__name__}: {exc}")
                else:
                    await self._send(Kind.RESPONSE, env.call_id, result)
            if scope.cancelled_caught:
                self.log.debug("call cancelled (deadline or caller gave up)", name=env.name)
        except ConnectionLost:
            pass
        finally:
            self._incoming.pop(env.call_id, None)
            if isinstance(request, StreamRequest):
                self._incoming_streams -= 1
            else:
                request.answered.set()

    def _on_stream_data(self, env: Envelope) -> None:
        entry = self._incoming.get(env.call_id)
        if entry is None or entry[1] is None:
            self._check_stale(env)
            return
        entry[1]._deliver(env.payload)

    def _on_stream_end(self, env: Envelope) -> None:
        entry = self._incoming.get(env.call_id)
        if entry is None or entry[1] is None:
            self._check_stale(env)
            return
        entry[1]._end()

    def _on_cancel(self, env: Envelope) -> None:
        entry = self._incoming.get(env.call_id)
        if entry is None:
            self._check_stale(env)
            return
        entry[0].cancel()

    def _check_stale(self, env: Envelope) -> None:
        # A message for a call that already finished here is normal (it crossed our reply on
        # the wire); one for a call that never started is a protocol violation.
        if env.call_id > self._max_remote_call_id or env.call_id == 0:
            raise ProtocolError("call-id", f"{env.kind.name} for unknown call {env.call_id}")

    def _on_reply(self, env: Envelope) -> None:
        waiter = self._waiters.get(env.call_id)
        if waiter is None:
            if not 0 < env.call_id < self._next_call_id:
                raise ProtocolError("call-id", f"{env.kind.name} for a call we never made")
            return  # the caller already gave up
        error = (
            _error_from_wire(env.payload, self.remote_peer_id, waiter.name)
            if env.kind is Kind.ERROR
            else None
        )
        waiter.finish(env, error)

    def _on_credit(self, env: Envelope) -> None:
        waiter = self._waiters.get(env.call_id)
        if waiter is None:
            if not 0 < env.call_id < self._next_call_id:
                raise ProtocolError("call-id", "STREAM_CREDIT for a stream we never opened")
            return
        grant = int.from_bytes(env.payload, "big")
        if grant == 0 or waiter.credit + grant > 1 << 40:
            raise ProtocolError("credit", f"implausible grant of {grant} bytes")
        if not waiter.granted:
            # A stream's first grant is the receiver's window, the same on every stream of a
            # connection (SPEC): learned here, and already counted when it was presumed.
            waiter.granted = True
            if self.stream_window is None:
                self.stream_window = grant
            grant -= waiter.presumed
        waiter.credit += grant
        waiter.credit_changed.set()

    def _on_goodbye(self, env: Envelope) -> None:
        reason = bytes(env.payload).decode("utf-8", "replace")
        self.log.debug("remote said goodbye", reason=reason)
        self._shutdown(f"remote closed: {reason}")

    # -- calls and streams we make -----------------------------------------------------------

    def _new_waiter(self, name: str) -> tuple[int, _Waiter]:
        call_id = self._next_call_id
        self._next_call_id += 1
        waiter = _Waiter(name)
        self._waiters[call_id] = waiter
        return call_id, waiter

    async def call(self, name: str, payload: bytes | memoryview = b"", *, timeout: float) -> bytes:
        """Call ``name`` on the remote peer; its handler runs under our deadline.

        Raises ``DeadlineExceeded``, ``UnknownHandler``, ``Rejected``, ``RemoteError`` or
        ``ConnectionLost``.
        """
        deadline = _deadline_from(timeout)
        started: tuple[int, _Waiter] | None = None
        try:
            with trio.move_on_at(deadline):
                started = await self._start_call(Kind.REQUEST, name, payload, deadline)
                await started[1].done.wait()
            if started is None or not started[1].done.is_set():
                if started is not None:
                    self._queue_control(Kind.CANCEL, started[0])
                raise DeadlineExceeded(
                    f"{self.remote_peer_id.short} did not answer {name!r} within {timeout:g} s"
                )
        except trio.Cancelled:
            if started is not None and not started[1].done.is_set():
                self._queue_control(Kind.CANCEL, started[0])
            raise
        finally:
            if started is not None:
                del self._waiters[started[0]]
        waiter = started[1]
        if waiter.error is not None:
            raise waiter.error
        assert waiter.envelope is not None
        return bytes(waiter.envelope.payload)

    def open_stream(
        self, name: str, header: bytes | memoryview = b"", *, timeout: float
    ) -> SendStream:
        """A stream to the remote handler ``name``; use as ``async with``:

        ``async with conn.open_stream("upload", timeout=30) as s: await s.send(data);
        result = await s.finish()``. Leaving the block without ``finish()`` cancels the stream.
        """
        return SendStream(self, name, header, _deadline_from(timeout), timeout)

    async def _grant(self, request: StreamRequest, grant: int) -> None:
        request._granted += grant
        self._queue_control(Kind.STREAM_CREDIT, request.call_id, grant.to_bytes(8, "big"))
        await trio.lowlevel.checkpoint()


class _Outgoing:
    """An envelope on its way to the writer: sealed as it was queued (``parts``), or to be
    sealed by the writer when it comes to it."""

    __slots__ = (
        "call_id",
        "counted",
        "deadline",
        "dropped",
        "error",
        "keep",
        "kind",
        "name",
        "parts",
        "payload",
        "sealed_event",
    )

    def __init__(
        self,
        kind: Kind,
        call_id: int,
        payload: bytes | memoryview | SharedSlice,
        *,
        counted: bool,
        keep: bool,
        deadline: float | None = None,
        name: str = "",
    ) -> None:
        self.kind = kind
        self.call_id = call_id
        self.payload = payload
        self.counted = counted  # holds a queue slot
        self.keep = keep  # written even if its sender gives up first (it cannot change)
        self.deadline = deadline  # a call's: its deadline_ms is what is left when sealed
        self.name = name
        self.dropped = False
        self.error: MoshpitError | None = None
        self.sealed_event: trio.Event | None = None
        #: (head, body) once sealed, until written
        self.parts: tuple[bytes, bytes | memoryview] | None = None

    def drop(self) -> None:
        """Not to be written after all (its sender gave up), if it is not sealed yet."""
        if self.sealed_event is not _SEALED:
            self.dropped = True
            self.payload = b""

    def sealed(self, error: MoshpitError | None) -> None:
        self.error = error
        self.payload = b""  # read: nothing here refers to the caller's memory any more
        if self.sealed_event is not None:
            self.sealed_event.set()
        self.sealed_event = _SEALED

    async def wait_sealed(self) -> None:
        """Until the writer has sealed this (raising its error, if it could not). Cancelled
        before that, it is dropped unless ``keep``: a view of someone's memory may change from
        now on, while what cannot change still goes out (an answer a frozen peer owed, say:
        once it runs again, it is heard from; the last frames of a relayed pipe)."""
        if self.sealed_event is _SEALED:
            # Sealed as it was queued: nothing to wait for, and nothing to cancel (it goes
            # out; the caller's next wait is a schedule point).
            if self.error is not None:
                raise self.error
            return
        if self.sealed_event is None:
            self.sealed_event = trio.Event()
        try:
            await self.sealed_event.wait()
        except BaseException:
            if not self.keep:
                self.drop()
            raise
        if self.error is not None:
            raise self.error


_SEALED = trio.Event()
_SEALED.set()


class SendStream:
    """The sending end of a stream. ``send`` waits for credit, so a slow receiver slows us."""

    def __init__(
        self,
        conn: Connection,
        name: str,
        header: bytes | memoryview,
        deadline: float,
        timeout: float,
    ) -> None:
        self._conn = conn
        self.name = name
        self._header = header
        self.deadline = deadline
        self._timeout = timeout
        self._call_id = 0
        self._waiter: _Waiter | None = None
        self._finished = False
        # A chunk being queued (waiting for room in the outbox), and an end_nowait() that came
        # meanwhile: its END goes right after that chunk, never before it.
        self._queueing = False
        self._end_deferred = False

    @property
    def connection(self) -> Connection:
        """The connection the stream runs on."""
        return self._conn

    async def __aenter__(self) -> SendStream:
        async def start() -> None:
            self._call_id, self._waiter = await self._conn._start_call(
                Kind.STREAM_OPEN, self.name, self._header, self.deadline
            )
            window = self._conn.stream_window
            if window is not None:
                # The receiver's window, shown by an earlier stream's first grant: ours to use
                # now; its first grant on this stream confirms it (_on_credit).
                self._waiter.presumed = self._waiter.credit = window

        await self._guarded(start())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._waiter is None:
            return
        if not self._waiter.done.is_set():
            self._conn._queue_control(Kind.CANCEL, self._call_id)
        self._conn._waiters.pop(self._call_id, None)

    async def _guarded(self, op: Awaitable[None]) -> None:
        with trio.CancelScope(deadline=self.deadline) as scope:
            await op
        if scope.cancelled_caught:
            raise self._too_slow()

    def _too_slow(self) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"stream {self.name!r} to {self._conn.remote_peer_id.short} "
            f"did not finish within {self._timeout:g} s"
        )

    def _raise_if_done(self) -> None:
        waiter = self._waiter
        assert waiter is not None, "use the stream as `async with conn.open_stream(...)`"
        if waiter.done.is_set():
            if waiter.error is not None:
                raise waiter.error
            raise Rejected(f"the receiver of stream {self.name!r} finished before the end")
        if self._finished:
            raise ConfigError("send() after finish()")

    async def send(
        self,
        data: bytes | bytearray | memoryview | SharedPayload,
        *,
        chunk: int | Sequence[int] | None = None,
    ) -> None:
        """Send ``data``, cut into chunks of the connection's ``stream_chunk`` bytes, or of
        ``chunk`` when that is smaller (a receiver can use each chunk as it arrives, so a
        sender on a slow link may want them sooner); returns once every chunk has been sealed
        for the wire (the writer seals envelopes in order, as it comes to each). ``chunk`` may
        also be the chunks' sizes, in order, adding up to ``len(data)`` (one larger than
        ``stream_chunk`` is cut at it): say, smaller ones at the end, so that the receiver's
        last piece of work waits on a small chunk.

        Each chunk is encrypted as it is sealed, straight from ``data`` (no copy before): the
        caller leaves ``data`` alone until this returns, and may reuse it after. Cancelled
        before that, the chunks not sealed yet are dropped, never sent, when ``data`` is
        memory that may change (anything but ``bytes``, or a :class:`SharedPayload` of bytes);
        chunks of immutable data still go out in order. A :class:`SharedPayload` is sent the
        same way (e.g. one average to several peers)."""
        limit = self._conn.limits.stream_chunk
        view: memoryview | SharedPayload = (
            data if isinstance(data, SharedPayload) else memoryview(data).cast("B")
        )
        bounds = _chunk_bounds(len(view), limit, chunk)
        keep = isinstance(data, bytes) or (
            isinstance(data, SharedPayload) and isinstance(data.data, bytes)
        )
        pieces: list[memoryview | SharedSlice]
        if isinstance(view, SharedPayload):
            pieces = [view.slice(start, end) for start, end in bounds]
        else:
            pieces = [view[start:end] for start, end in bounds]
        queued: list[_Outgoing] = []
        # One scope for all the chunks (a deadline scope per chunk cost more than the chunk's
        # own bookkeeping): the stream's deadline bounds the whole send.
        with trio.CancelScope(deadline=self.deadline) as scope:
            try:
                for piece in pieces:
                    await self._send_chunk(piece, queued, keep)
                # The writer seals in order: once the last chunk is sealed, all of them are,
                # and `data` has been read.
                if queued:
                    await queued[-1].wait_sealed()
            except BaseException:
                if not keep:
                    for item in queued:
                        item.drop()
                raise
        if scope.cancelled_caught:
            raise self._too_slow()
        for item in queued:
            if item.error is not None:
                raise item.error

    async def _send_chunk(
        self, piece: memoryview | SharedSlice, queued: list[_Outgoing], keep: bool
    ) -> None:
        waiter = self._waiter
        assert waiter is not None
        while True:
            self._raise_if_done()
            if waiter.credit >= len(piece):
                break
            waiter.credit_changed = trio.Event()
            await waiter.credit_changed.wait()
        waiter.credit -= len(piece)
        self._queueing = True
        try:
            queued.append(
                await self._conn._queue(Kind.STREAM_DATA, self._call_id, piece, keep=keep)
            )
        finally:
            self._queueing = False
            if self._end_deferred:
                self._end_deferred = False
                self._conn._queue_control(Kind.STREAM_END, self._call_id)

    def end_nowait(self) -> None:
        """Queue STREAM_END at once, without waiting for room or for the receiver's answer,
        and stop listening for that answer. For a byte pipe being closed (wire/relay.py): its
        end must reach the receiver after every chunk already queued, even from a task that is
        being cancelled, and a CANCEL would make the receiver drop chunks it has not read."""
        waiter = self._waiter
        if waiter is None:
            return
        if not waiter.done.is_set() and not self._finished:
            self._finished = True
            if self._queueing:
                # Another task is queueing a chunk of ours: queued now, the END would reach
                # the receiver before that chunk, a protocol violation (``_send_chunk``).
                self._end_deferred = True
            else:
                self._conn._queue_control(Kind.STREAM_END, self._call_id)
        self._conn._waiters.pop(self._call_id, None)
        waiter.finish(None, ConfigError("the stream was ended"))

    async def finish(self) -> bytes:
        """Tell the receiver that was all, and return its handler's answer."""
        waiter = self._waiter
        self._raise_if_done()
        assert waiter is not None
        self._finished = True

        async def end_and_wait() -> None:
            # Queued, not waited on until sealed: it has nothing to read, and a connection
            # that ends before writing it finishes the waiter (ConnectionLost).
            await self._conn._queue(Kind.STREAM_END, self._call_id, b"", keep=True)
            await waiter.done.wait()

        await self._guarded(end_and_wait())
        if waiter.error is not None:
            raise waiter.error
        assert waiter.envelope is not None
        return bytes(waiter.envelope.payload)


def _chunk_bounds(
    size: int, limit: int, chunk: int | Sequence[int] | None
) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each chunk of ``size`` bytes sent with ``chunk`` (see
    ``SendStream.send``), none longer than ``limit``; ConfigError for a bad ``chunk``."""
    if chunk is None or (isinstance(chunk, int) and not isinstance(chunk, bool)):
        step = limit if chunk is None else chunk
        if step < 1:
            raise ConfigError(f"chunk must be a positive number of bytes, not {chunk!r}")
        step = min(step, limit)
        return [(start, min(start + step, size)) for start in range(0, size, step)]
    if not isinstance(chunk, Sequence) or isinstance(chunk, str | bytes | bytearray):
        raise ConfigError(
            f"chunk must be a positive number of bytes or a list of them, not {chunk!r}"
        )
    bounds: list[tuple[int, int]] = []
    start = 0
    for n in chunk:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"chunk sizes must be positive numbers of bytes, not {n!r}")
        end = start + n
        bounds.extend((a, min(a + limit, end)) for a in range(start, end, limit))
        start = end
    if start != size:
        raise ConfigError(f"the chunk sizes add up to {start} bytes, not the {size} sent")
    return bounds


def _deadline_from(timeout: float) -> float:
    if not isinstance(timeout, int | float) or not 0 < timeout <= _MAX_DEADLINE_MS / 1000:
        raise ConfigError(f"timeout must be a number of seconds in (0, 86400], got {timeout!r}")
    return trio.current_time() + timeout


def _ms_left(deadline: float) -> int:
    return max(1, math.ceil((deadline - trio.current_time()) * 1000))


_DISPATCH: Final[dict[Kind, Callable[[Connection, Envelope], None]]] = {
    Kind.REQUEST: Connection._on_request,
    Kind.STREAM_OPEN: Connection._on_stream_open,
    Kind.STREAM_DATA: Connection._on_stream_data,
    Kind.STREAM_END: Connection._on_stream_end,
    Kind.CANCEL: Connection._on_cancel,
    Kind.RESPONSE: Connection._on_reply,
    Kind.ERROR: Connection._on_reply,
    Kind.STREAM_CREDIT: Connection._on_credit,
    Kind.GOODBYE: Connection._on_goodbye,
}
