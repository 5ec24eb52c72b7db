"""Training state for joiners: a donor serves its current state, a joiner downloads it.

A peer that joins (or restarts) must start from where the swarm is: the parameters, the
optimizer's statistics, the step, epoch and averaging round. Any live peer of the run that
listens can be a *donor*; ``StateServer`` serves its state, ``download_state`` fetches one.

Data flows donor → joiner, but a moshpit stream flows caller → callee, and only the joiner knows
it wants something. So the joiner *calls* the donor (``state.RUN``: a nonce and the most bytes
it accepts), and the donor, inside that call, opens a stream back over the same connection
(``state.recv.NONCE``, a handler the joiner registered for this one download). The call's
answer, sent after the stream, says how it went (``ok``, ``busy``, ``no-state``, ...). So:

- it works for a joiner in client mode (the donor never dials it: it streams over the
  connection the joiner opened);
- the stream has the transport's credit flow control, and the joiner writes each chunk into
  the tensor it belongs to: memory on both sides stays at one window plus the state itself;
- everything runs under the call's deadline: a donor that dies breaks the connection (the
  joiner sees it at once), a frozen one runs out the per-donor timeout; either way the joiner
  goes on to the next donor.

The stream's bytes are ``u32 H | H bytes of msgpack header | the tensors' bytes``, in order,
each C-contiguous (protocol/SPEC.md, "Training state"). The joiner checks everything: header
size, version, dtypes (plain numbers only, no objects), shapes, that the declared sizes fit in
its ``max_bytes``, that exactly that many bytes arrive, and the metadata's size.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any

import msgspec
import numpy as np
import trio

from ..errors import (
    ConfigError,
    DeadlineExceeded,
    MoshpitError,
    ProtocolError,
    Rejected,
)
from ..identity import PeerID
from ..log import get_logger
from ..wire.address import InvalidAddress, PeerAddress
from ..wire.connection import Request, StreamRequest
from .progress import PeerProgress, SwarmProgress, fetch_progress, progress_key

__all__ = [
    "MAX_METADATA",
    "StateDecoder",
    "StateServer",
    "StateUnavailable",
    "TrainingState",
    "download_state",
    "encode_state",
]

STATE_VERSION = 1
#: encoded metadata, at most
MAX_METADATA = 64 * 1024
#: tensors in one state, at most
MAX_TENSORS = 65536
#: dimensions of one tensor, at most
MAX_NDIM = 32
#: the msgpack header of a state, at most (65536 tensors of a few dimensions fit)
MAX_HEADER = 4 * 1024 * 1024
_NONCE_SIZE = 16
_U63 = 2**63 - 1
_PREFIX = struct.Struct(">I")
# Plain numbers only, in either byte order: never objects, structured or void types, whose
# bytes could mean pointers or hide more structure. Long double is left out: its size and
# layout depend on the platform.
_DTYPES = frozenset(
    ["|b1", "|i1", "|u1"]
    + [f"{order}{kind}{size}" for order in "<>" for kind in "iu" for size in (2, 4, 8)]
    + [f"{order}f{size}" for order in "<>" for size in (2, 4, 8)]
    + [f"{order}c{size}" for order in "<>" for size in (8, 16)]
)


class StateUnavailable(MoshpitError):
    """No donor gave us its state. ``attempts`` lists ``(donor, why)`` for every try."""

    def __init__(self, message: str, attempts: Sequence[tuple[str, str]] = ()) -> None:
        self.attempts = list(attempts)
        super().__init__(message)


@dataclasses.dataclass(eq=False)
class TrainingState:
    """A trainer's state, as a donor serves it and a joiner receives it.

    >>> s = TrainingState(step=10, epoch=2, round=7, tensors=[np.zeros(3, np.float32)],
    ...                   metadata={"lr": 0.1})
    >>> s.nbytes
    12
    """

    #: the donor's local step counter
    step: int
    #: the donor's global epoch
    epoch: int
    #: the donor's next averaging round number (so a joiner can align)
    round: int
    #: parameters then optimizer statistics, in the trainer's fixed order (plain numeric
    #: dtypes; C-contiguous copies on receive)
    tensors: list[np.ndarray]
    #: a small msgpack-able dict (at most 64 KiB encoded), e.g. the LR scheduler's state
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(int(np.asarray(t).nbytes) for t in self.tensors)


# -- wire messages ---------------------------------------------------------------------------

_Count = Annotated[int, msgspec.Meta(ge=0, le=_U63)]


class _StateRequest(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The joiner's call ``state.RUN``."""

    nonce: Annotated[bytes, msgspec.Meta(min_length=_NONCE_SIZE, max_length=_NONCE_SIZE)]
    max_bytes: _Count


class _StateReply(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """The donor's answer to ``state.RUN``, sent after its stream (if any) ended."""

    #: ok | busy | no-state | too-large | failed
    status: Annotated[str, msgspec.Meta(max_length=32)]
    detail: Annotated[str, msgspec.Meta(max_length=1000)]


class _TensorSpec(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    dtype: Annotated[str, msgspec.Meta(max_length=8)]
    shape: Annotated[list[_Count], msgspec.Meta(max_length=MAX_NDIM)]


class _StateHeader(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    version: int
    step: _Count
    epoch: _Count
    round: _Count
    #: the sum of the tensors' sizes in bytes: exactly what follows the header
    nbytes: _Count
    tensors: Annotated[list[_TensorSpec], msgspec.Meta(max_length=MAX_TENSORS)]
    #: msgpack of a map with str keys, at most MAX_METADATA bytes
    metadata: Annotated[bytes, msgspec.Meta(max_length=MAX_METADATA)]


_encode = msgspec.msgpack.Encoder().encode
_request_decoder = msgspec.msgpack.Decoder(_StateRequest)
_reply_decoder = msgspec.msgpack.Decoder(_StateReply)
_header_decoder = msgspec.msgpack.Decoder(_StateHeader)
_metadata_decoder = msgspec.msgpack.Decoder(dict[str, Any])
# What msgspec's decoder may raise on hostile input (see dht/records.py).
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError, OverflowError, TypeError)


def _call_name(run_id: str) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty str, got {run_id!r}")
    name = f"state.{run_id}"
    if len(name.encode()) > 128:
        raise ConfigError(f"run_id is too long for a handler name ({len(run_id.encode())} bytes)")
    progress_key(run_id)  # the same run id names the progress records
    return name


def _recv_name(nonce: bytes) -> str:
    return f"state.recv.{nonce.hex()}"


# -- encoding (donor) ------------------------------------------------------------------------


def encode_state(state: TrainingState) -> tuple[bytes, list[memoryview]]:
    """The stream's bytes for ``state``: the prefixed header, then one byte view per tensor
    (no copy for tensors that are already C-contiguous). ``ConfigError`` for a state that
    cannot be sent (a dtype that is not a plain number, metadata too large or not msgpack)."""
    for name in ("step", "epoch", "round"):
        value = getattr(state, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U63:
            raise ConfigError(f"TrainingState.{name} must be a non-negative int, got {value!r}")
    if len(state.tensors) > MAX_TENSORS:
        raise ConfigError(f"{len(state.tensors)} tensors; at most {MAX_TENSORS} are sent")
    specs: list[_TensorSpec] = []
    views: list[memoryview] = []
    for i, tensor in enumerate(state.tensors):
        array = np.asarray(tensor)
        if not array.flags.c_contiguous:
            array = np.array(array, order="C")  # (not ascontiguousarray: it makes 0-d 1-d)
        if array.dtype.str not in _DTYPES:
            raise ConfigError(f"tensor {i}: dtype {array.dtype} is not a plain number type")
        if array.ndim > MAX_NDIM:
            raise ConfigError(f"tensor {i}: {array.ndim} dimensions; at most {MAX_NDIM}")
        specs.append(_TensorSpec(array.dtype.str, list(array.shape)))
        views.append(array.reshape(-1).view(np.uint8).data)
    if not isinstance(state.metadata, dict) or not all(isinstance(k, str) for k in state.metadata):
        raise ConfigError("TrainingState.metadata must be a dict with str keys")
    try:
        metadata = _encode(state.metadata)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"TrainingState.metadata is not msgpack-able: {exc}") from None
    if len(metadata) > MAX_METADATA:
        raise ConfigError(f"metadata of {len(metadata)} bytes; the cap is {MAX_METADATA}")
    header = _encode(
        _StateHeader(
            version=STATE_VERSION,
            step=state.step,
            epoch=state.epoch,
            round=state.round,
            nbytes=sum(len(v) for v in views),
            tensors=specs,
            metadata=metadata,
        )
    )
    if len(header) > MAX_HEADER:
        raise ConfigError(f"a state header of {len(header)} bytes; the cap is {MAX_HEADER}")
    return _PREFIX.pack(len(header)) + header, views


def _pieces(head: bytes, views: Sequence[memoryview], chunk: int) -> Iterator[bytes | memoryview]:
    """The stream's bytes in pieces of about ``chunk`` bytes: small tensors are packed together
    (a model has many tiny biases; one envelope each would cost a signature each), large ones
    are passed on as views without copying."""
    buf = bytearray(head)
    if len(buf) >= chunk:
        yield bytes(buf)
        buf.clear()
    for view in views:
        pos = 0
        while pos < len(view):
            if not buf and len(view) - pos >= chunk:
                whole = (len(view) - pos) // chunk * chunk
                yield view[pos : pos + whole]
                pos += whole
                continue
            take = min(chunk - len(buf), len(view) - pos)
            buf += view[pos : pos + take]
            pos += take
            if len(buf) >= chunk:
                yield bytes(buf)
                buf.clear()
    if buf:
        yield bytes(buf)


# -- decoding (joiner) -----------------------------------------------------------------------


def decode_header(
    data: bytes | bytearray | memoryview, max_bytes: int
) -> tuple[_StateHeader, dict[str, Any]]:
    """Decode and check a state header (without its u32 prefix) and its metadata.

    Raises ``ProtocolError`` (reason ``"state"``) for anything but a version-1 header of
    plain-number tensors whose declared sizes add up to ``nbytes <= max_bytes``, with metadata
    that decodes to a map with str keys; never another exception.
    """
    if len(data) > MAX_HEADER:
        raise ProtocolError("state", f"header of {len(data)} bytes; the cap is {MAX_HEADER}")
    try:
        header = _header_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError("state", f"bad header: {exc}") from None
    if header.version != STATE_VERSION:
        raise ProtocolError("state", f"unknown state version {header.version}")
    total = 0
    for i, spec in enumerate(header.tensors):
        if spec.dtype not in _DTYPES:
            raise ProtocolError("state", f"tensor {i}: dtype {spec.dtype[:8]!r} is not allowed")
        # The product of the nonzero dimensions must fit too, even for a tensor of size zero:
        # numpy refuses shapes whose product overflows, and such a shape is nonsense anyway.
        size = np.dtype(spec.dtype).itemsize
        nonzero = 1
        for dim in spec.shape:
            size *= dim
            nonzero *= max(dim, 1)
            if nonzero > max_bytes:
                raise ProtocolError(
                    "state", f"tensor {i}: shape {spec.shape[:MAX_NDIM]} is over {max_bytes} B"
                )
        total += size
        if total > max_bytes:
            raise ProtocolError(
                "state", f"the tensors declare more than the {max_bytes} bytes accepted"
            )
    if total != header.nbytes:
        raise ProtocolError("state", f"nbytes says {header.nbytes}, the tensors add up to {total}")
    try:
        metadata = _metadata_decoder.decode(header.metadata)
    except _DECODE_ERRORS as exc:
        raise ProtocolError("state", f"bad metadata: {exc}") from None
    return header, metadata


class StateDecoder:
    """Rebuilds a ``TrainingState`` from the stream's chunks as they arrive (sans-IO).

    ``feed`` each chunk, then ``finish()``. Each tensor is allocated (``np.empty``, which
    touches no pages) once the previous one is full, so a donor that declares a large state
    and sends nothing costs next to nothing. Every
    problem raises ``ProtocolError`` (reason ``"state"``), never another exception.

    >>> head, views = encode_state(TrainingState(1, 0, 0, [np.arange(3.0)]))
    >>> d = StateDecoder(max_bytes=1000)
    >>> d.feed(head + bytes(views[0]))
    >>> d.finish().tensors[0]
    array([0., 1., 2.])
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.received = 0
        self._prefix = bytearray()
        self._head_size = -1
        self._head = bytearray()
        self._header: _StateHeader | None = None
        self._metadata: dict[str, Any] = {}
        self._tensors: list[np.ndarray] = []
        self._current: np.ndarray | None = None  # the flat byte view being filled
        self._filled = 0

    def feed(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
        self.received += len(view)
        while view:
            view = self._feed_head(view) if self._header is None else self._feed_tensors(view)

    def _feed_head(self, view: memoryview) -> memoryview:
        if self._head_size < 0:
            take = min(_PREFIX.size - len(self._prefix), len(view))
            self._prefix += view[:take]
            view = view[take:]
            if len(self._prefix) < _PREFIX.size:
                return view
            (self._head_size,) = _PREFIX.unpack(self._prefix)
            if not 0 < self._head_size <= MAX_HEADER:
                raise ProtocolError("state", f"a header of {self._head_size} bytes")
        take = min(self._head_size - len(self._head), len(view))
        self._head += view[:take]
        view = view[take:]
        if len(self._head) == self._head_size:
            self._header, self._metadata = decode_header(self._head, self.max_bytes)
            self._head = bytearray()
            self._advance()
        return view

    def _advance(self) -> None:
        """Allocate tensors until one still needs bytes (zero-size ones need none)."""
        assert self._header is not None
        specs = self._header.tensors
        while self._current is None and len(self._tensors) < len(specs):
            spec = specs[len(self._tensors)]
            array = np.empty(tuple(spec.shape), dtype=np.dtype(spec.dtype))
            self._tensors.append(array)
            if array.nbytes:
                self._current = array.reshape(-1).view(np.uint8)
                self._filled = 0

    def _feed_tensors(self, view: memoryview) -> memoryview:
        current = self._current
        if current is None:
            raise ProtocolError("state", "more bytes than the header declared")
        take = min(len(current) - self._filled, len(view))
        current[self._filled : self._filled + take] = np.frombuffer(view[:take], dtype=np.uint8)
        self._filled += take
        if self._filled == len(current):
            self._current = None
            self._advance()
        return view[take:]

    def finish(self) -> TrainingState:
        """The state, once every declared byte arrived (and not one more)."""
        header = self._header
        if header is None:
            raise ProtocolError("state", f"the stream ended inside the header ({self.received} B)")
        if self._current is not None or len(self._tensors) < len(header.tensors):
            raise ProtocolError(
                "state", f"the stream ended early: {header.nbytes} bytes declared, fewer came"
            )
        return TrainingState(
            step=header.step,
            epoch=header.epoch,
            round=header.round,
            tensors=self._tensors,
            metadata=self._metadata,
        )


# -- the donor -------------------------------------------------------------------------------


class StateServer:
    """Serves this peer's current state to joiners, on call ``state.RUN``.

    ``get_state()`` is called in the trio thread for each download and returns a consistent
    snapshot (the caller's job: the server only reads it while streaming), or ``None`` when
    there is no state to give yet (the joiner then tries another donor). More than
    ``max_concurrent`` downloads at once are refused at once with "busy", so a crowd of joiners
    spreads over the donors instead of queueing at one.

    >>> async with StateServer(peer, "exp1", lambda: snapshot):          # doctest: +SKIP
    ...     await trio.sleep_forever()
    """

    def __init__(
        self,
        peer: Any,
        run_id: str,
        get_state: Callable[[], TrainingState | None],
        *,
        max_concurrent: int = 2,
    ) -> None:
        self.name = _call_name(run_id)
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ConfigError(f"max_concurrent must be an int, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise ConfigError("max_concurrent must be at least 1")
        self.peer = peer
        self.run_id = run_id
        self.get_state = get_state
        self.max_concurrent = max_concurrent
        self.log = get_logger(peer=peer.id.short, run=run_id)
        #: downloads being served now, the most ever served at once, and how many finished
        self.active = 0
        self.peak_active = 0
        self.served = 0
        #: downloads refused because ``max_concurrent`` were running
        self.refused_busy = 0

    async def __aenter__(self) -> StateServer:
        self.peer.transport.register(self.name, self._on_request)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.peer.transport.registry.unregister(self.name)

    async def _on_request(self, request: Request) -> bytes:
        try:
            ask = _request_decoder.decode(request.payload)
        except _DECODE_ERRORS:
            raise Rejected("malformed state request") from None
        if self.active >= self.max_concurrent:
            self.refused_busy += 1
            return _reply("busy", f"serving {self.active} downloads already")
        state = self.get_state()
        if state is None:
            return _reply("no-state", "no state to give yet")
        try:
            head, views = encode_state(state)
        except ConfigError as exc:
            self.log.error("cannot serve the training state", error=str(exc))
            return _reply("failed", "the donor cannot encode its state")
        size = len(head) + sum(len(v) for v in views)
        if size - len(head) > ask.max_bytes:
            return _reply("too-large", f"the state is {size - len(head)} bytes")
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        started = trio.current_time()
        try:
            # Back over the connection the joiner opened (it may be in client mode), under the
            # joiner's deadline, which this handler already runs under.
            timeout = request.deadline - started
            if timeout <= 0:
                return _reply("failed", "no time left")
            async with request.connection.open_stream(
                _recv_name(ask.nonce), timeout=timeout
            ) as stream:
                for piece in _pieces(head, views, request.connection.limits.stream_chunk):
                    await stream.send(piece)
                await stream.finish()
        except MoshpitError as exc:
            self.log.info(
                "a state download failed", remote=request.peer.short, error=f"{exc!r}"[:300]
            )
            return _reply("failed", f"{type(exc).__name__}: {exc}")
        finally:
            self.active -= 1
        self.served += 1
        self.log.info(
            "served the training state",
            remote=request.peer.short,
            bytes=size,
            seconds=round(trio.current_time() - started, 3),
        )
        return _reply("ok", "")


def _reply(status: str, detail: str) -> bytes:
    return _encode(_StateReply(status, detail[:1000]))


# -- the joiner ------------------------------------------------------------------------------

# A busy donor frees up soon: ask it again. One without state is most likely as new as we are
# (the first peers of a run start together); asking it again would only delay starting fresh.
_RETRY = frozenset({"busy"})


@dataclasses.dataclass(eq=False)
class _Attempt:
    """One download from one donor: the receiving handler fills it in."""

    donor: PeerID
    max_bytes: int
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
    opened: bool = False
    result: TrainingState | None = None
    error: str | None = None

    async def on_stream(self, request: StreamRequest) -> bytes:
        if request.peer != self.donor or self.opened:
            raise Rejected("no state download from you is expected here")
        self.opened = True
        decoder = StateDecoder(self.max_bytes)
        with self.scope:  # cancelled when the joiner's call to the donor ends, however
            try:
                async for chunk in request:
                    decoder.feed(chunk)
                self.result = decoder.finish()
            except ProtocolError as exc:
                # Never let a ProtocolError out of a handler: the connection would take it for
                # a violation of the wire protocol and close.
                self.error = exc.detail
                raise Rejected(f"bad state: {exc.detail}") from None
            return b""
        raise Rejected("the download was given up")


@dataclasses.dataclass(frozen=True)
class _Donor:
    peer_id: PeerID
    target: PeerAddress | PeerID

    @property
    def name(self) -> str:
        return self.peer_id.short


async def download_state(
    peer: Any,
    run_id: str,
    *,
    donors: Sequence[PeerID | PeerAddress | str] | None = None,
    timeout: float = 60.0,
    per_donor_timeout: float = 20.0,
    max_bytes: int = 2**31,
    rng: random.Random | None = None,
    progress: SwarmProgress | None = None,
    retry_interval: float = 1.0,
) -> tuple[TrainingState, PeerID]:
    """Download the current training state of run ``run_id`` from a live peer.

    Returns the state and the donor's PeerID. ``donors`` (addresses or PeerIDs) are tried in
    the order given; by default they are the peers of the run's progress records (from
    ``progress``, else read from the DHT) that serve an address, this peer excluded: those in
    the highest epoch first, in an order drawn from ``rng`` (so joiners spread over donors),
    then the others, highest epoch first. A donor that is gone, frozen past
    ``per_donor_timeout``, has no state, refuses, or sends bad data is skipped for the next
    one; donors that were busy are asked again after about ``retry_interval`` seconds (and
    the progress records read again, which may name new donors). Raises ``StateUnavailable``,
    naming every donor tried and why it failed, when none succeeded within ``timeout`` or
    there is no donor left to ask. ``max_bytes`` bounds the tensors' total size.

    >>> state, donor = await download_state(peer, "exp1", timeout=60)   # doctest: +SKIP
    """
    name = _call_name(run_id)
    for label, value in (
        ("timeout", timeout),
        ("per_donor_timeout", per_donor_timeout),
        ("retry_interval", retry_interval),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{label} must be positive seconds, got {value!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 <= max_bytes <= _U63:
        raise ConfigError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    explicit = None if donors is None else _parse_donors(donors, peer.id)
    rng = rng if rng is not None else random.Random(peer.id.to_bytes())
    log = get_logger(peer=peer.id.short, run=run_id)
    deadline = trio.current_time() + timeout
    attempts: list[tuple[str, str]] = []
    skip: set[PeerID] = set()  # donors that failed for good (dead, frozen, lying)
    while True:
        if explicit is not None:
            candidates = explicit
        else:
            candidates = await _discover(peer, run_id, progress, rng, deadline, attempts)
        candidates = [d for d in candidates if d.peer_id not in skip]
        if not candidates:
            break
        for donor in candidates:
            left = deadline - trio.current_time()
            if left <= 0:
                break
            status, why, state = await _try_donor(
                peer, name, donor, min(per_donor_timeout, left), max_bytes
            )
            if state is not None:
                log.info("downloaded the training state", donor=donor.name, bytes=state.nbytes)
                return state, donor.peer_id
            attempts.append((donor.name, why))
            log.info("a donor did not give its state", donor=donor.name, why=why)
            if status not in _RETRY:
                skip.add(donor.peer_id)
        left = deadline - trio.current_time()
        if left <= 0 or all(d.peer_id in skip for d in candidates):
            break  # out of time, or every donor failed for good: nobody left to ask again
        # Busy donors free up, donors without state get one: try again a little later, with
        # jitter so a crowd of joiners does not come back all at once.
        pause = retry_interval * rng.uniform(0.5, 1.5)
        if pause >= left:
            break
        await trio.sleep(pause)
    raise StateUnavailable(_unavailable_message(run_id, timeout, attempts), attempts)


def _unavailable_message(run_id: str, timeout: float, attempts: list[tuple[str, str]]) -> str:
    if not attempts:
        return f"no donor for run {run_id!r}: no live peer of the run serves an address"
    by_donor: dict[str, list[str]] = {}
    for who, why in attempts:
        by_donor.setdefault(who, []).append(why)
    listing = "; ".join(
        f"{who}: {whys[-1]}" + (f" (and {len(whys) - 1} earlier tries)" if len(whys) > 1 else "")
        for who, whys in by_donor.items()
    )
    return f"no donor gave the state of run {run_id!r} within {timeout:g} s: {listing}"


def _parse_donors(donors: Sequence[PeerID | PeerAddress | str], me: PeerID) -> list[_Donor]:
    if isinstance(donors, str | PeerAddress | PeerID):
        raise ConfigError("donors is a list of addresses or PeerIDs, not one")
    out: list[_Donor] = []
    for d in donors:
        if isinstance(d, str):
            try:
                d = PeerAddress.parse(d)
            except InvalidAddress as exc:
                raise ConfigError(f"bad donor address: {exc}") from None
        if isinstance(d, PeerAddress):
            donor = _Donor(d.peer_id, d)
        elif isinstance(d, PeerID):
            donor = _Donor(d, d)
        else:
            raise ConfigError(f"a donor is an address or a PeerID, got {type(d).__name__}")
        if donor.peer_id != me and all(o.peer_id != donor.peer_id for o in out):
            out.append(donor)
    return out


async def _discover(
    peer: Any,
    run_id: str,
    progress: SwarmProgress | None,
    rng: random.Random,
    deadline: float,
    attempts: list[tuple[str, str]],
) -> list[_Donor]:
    """Donors from the progress records: highest epoch first, random order within an epoch."""
    found: tuple[PeerProgress, ...] = ()
    if progress is not None:
        found = progress.peers
    else:
        with trio.move_on_at(deadline):
            try:
                found = await fetch_progress(peer, run_id)
            except MoshpitError as exc:
                attempts.append(("progress records", f"{type(exc).__name__}: {exc}"))
    usable = [p for p in found if p.address is not None and p.peer_id != peer.id]
    rng.shuffle(usable)
    usable.sort(key=lambda p: -p.epoch)  # stable: the shuffle orders each epoch's peers
    donors: list[_Donor] = []
    for p in usable:
        assert p.address is not None
        try:
            donors.append(_Donor(p.peer_id, PeerAddress.parse(p.address)))
        except InvalidAddress:
            continue  # decode_progress checked it; a SwarmProgress made by hand may not be
    return donors


async def _try_donor(
    peer: Any, name: str, donor: _Donor, timeout: float, max_bytes: int
) -> tuple[str, str, TrainingState | None]:
    """One download attempt: (status, why it failed, the state or None)."""
    attempt = _Attempt(donor.peer_id, max_bytes)
    nonce = secrets.token_bytes(_NONCE_SIZE)
    transport = peer.transport
    recv = _recv_name(nonce)
    transport.register_stream(recv, attempt.on_stream)
    deadline = trio.current_time() + timeout
    try:
        target = donor.target
        if isinstance(target, PeerID) and transport.connection_to(target) is None:
            # Only a PeerID: find where it listens (the transport knows addresses it dialed).
            with trio.move_on_at(deadline):
                try:
                    found = await peer.dht.find_peer(target)
                except MoshpitError:
                    found = None
                if found is not None:
                    target = found
        left = deadline - trio.current_time()
        if left <= 0:
            return "failed", f"DeadlineExceeded: no answer within {timeout:g} s", None
        raw = await transport.call(
            target, name, _encode(_StateRequest(nonce, max_bytes)), timeout=left
        )
        reply = _reply_decoder.decode(raw)
    except DeadlineExceeded:
        return "failed", f"DeadlineExceeded: no state within {timeout:g} s", None
    except MoshpitError as exc:
        if attempt.error is not None:
            return "bad-data", f"bad data: {attempt.error}", None
        return "failed", f"{type(exc).__name__}: {exc}", None
    except _DECODE_ERRORS as exc:
        return "bad-data", f"malformed answer: {exc}", None
    finally:
        attempt.scope.cancel()
        transport.registry.unregister(recv)
    if attempt.error is not None:
        return "bad-data", f"bad data: {attempt.error}", None
    if reply.status == "ok":
        if attempt.result is None:
            return "bad-data", "answered ok without sending its state", None
        return "ok", "", attempt.result
    detail = f": {reply.detail}" if reply.detail else ""
    return reply.status, f"{reply.status[:32]}{detail}", None
