"""Envelopes: the encrypted, authenticated framing of every message after the handshake (sans-IO).

One envelope is one binary websocket message::

    u16 big-endian H | header (H bytes, msgpack) | sealed (name + payload, encrypted) | tag (16)

The header is the msgpack array ``[version, kind, seq, call_id, deadline_ms, name_len,
payload_len]``. Everything after it is AES-256-GCM under the sending direction's key from the
handshake (both ends hold it, nobody else does), with the nonce ``u32be(direction) + u64be(seq)``
and, as associated data, ``"moshpit/1 envelope\\x00" + session + sender + recipient + u16be H +
header``. So one pass over the payload encrypts it and authenticates it together with the
header; the session and both PeerIDs are bound in without being sent. protocol/SPEC.md
("Envelope") is the contract; this module follows it check for check.

What an observer of the wire still sees (the header, in the clear but authenticated): that
envelopes of some kind, call and size pass, in what order, with what deadline. What it does not
see: the called handler's name (it names the run and what is asked), and every payload.

Why a session key and not an Ed25519 signature per envelope: the handshake already signs both
ends' ephemeral keys, so the session keys prove who sent an envelope to the one peer that
receives it, which is all an envelope is for (DHT records, which are passed on, carry their own
signatures). A signature and its check cost about 175 microseconds per envelope here.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, NoReturn

import msgspec
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import ConfigError, ProtocolError
from ..identity import PeerID

__all__ = [
    "DEFAULT_LIMITS",
    "ENVELOPE_DOMAIN",
    "TAG_SIZE",
    "VERSION",
    "Direction",
    "Envelope",
    "EnvelopeLimits",
    "EnvelopeOpener",
    "EnvelopeSealer",
    "Kind",
    "SharedPayload",
    "SharedSlice",
]

VERSION = 2
ENVELOPE_DOMAIN = b"moshpit/1 envelope\x00"
SESSION_SIZE = 32
KEY_SIZE = 32
TAG_SIZE = 16
U64_MAX = 2**64 - 1
_PREFIX_SIZE = 2
KiB = 1024
MiB = 1024 * KiB
# Sealed parts at least this long are encrypted into (and decrypted into) an uninitialised numpy
# buffer: no zero-filling pass before the cipher's own. Shorter ones go through AESGCM.encrypt /
# decrypt, which cost less per call.
_INTO_THRESHOLD = 64 * KiB


class Direction(enum.IntEnum):
    """Which way an envelope travels; the first four bytes of its nonce (u32 big-endian).

    Each direction also has its own key, so this is defence in depth: a reflected envelope
    fails even if both keys were ever the same."""

    INITIATOR_TO_RESPONDER = 1
    RESPONDER_TO_INITIATOR = 2


class Kind(enum.IntEnum):
    """What an envelope carries; the connection layer gives each kind its meaning."""

    REQUEST = 1  # a call: name, deadline_ms; payload = request body
    RESPONSE = 2  # call_id of the request; payload = response body
    ERROR = 3  # call_id; payload = msgpack map {"code": str, "message": str}
    CANCEL = 4  # call_id; the caller gave up; payload empty
    STREAM_OPEN = 5  # like REQUEST (name, deadline_ms); payload = the stream's header bytes
    STREAM_DATA = 6  # call_id; payload = one chunk
    STREAM_CREDIT = 7  # call_id; payload = 8-byte big-endian unsigned: bytes granted
    STREAM_END = 8  # call_id; the sender has sent all chunks; payload empty
    GOODBYE = 9  # the sender is closing the connection; payload = reason (utf-8)


# Only these kinds open something by name, so only they may carry a name and a deadline; the
# others refer to an open call by call_id. Refusing stray names keeps every header meaningful.
NAMED_KINDS = frozenset({Kind.REQUEST, Kind.STREAM_OPEN})
# Kinds whose payload has one exact size rather than a maximum.
EXACT_SIZE_KINDS = frozenset({Kind.STREAM_CREDIT})
_KIND_BY_VALUE = {int(k): k for k in Kind}


def _default_max_payload() -> Mapping[Kind, int]:
    return MappingProxyType(
        {
            Kind.REQUEST: 4 * MiB,
            Kind.RESPONSE: 4 * MiB,
            Kind.ERROR: 64 * KiB,
            Kind.CANCEL: 0,
            Kind.STREAM_OPEN: 64 * KiB,
            Kind.STREAM_DATA: 4 * MiB,
            Kind.STREAM_CREDIT: 8,
            Kind.STREAM_END: 0,
            Kind.GOODBYE: 1 * KiB,
        }
    )


@dataclasses.dataclass(frozen=True, slots=True)
class EnvelopeLimits:
    """Size caps. ``max_payload[STREAM_CREDIT]`` is an exact size, the others are maxima."""

    max_payload: Mapping[Kind, int] = dataclasses.field(default_factory=_default_max_payload)
    #: the clear header: seven small ints, at most 45 bytes of msgpack
    max_header: int = 64
    max_name: int = 128  # bytes of utf-8

    def __post_init__(self) -> None:
        missing = [k.name for k in Kind if k not in self.max_payload]
        if missing:
            raise ConfigError(f"EnvelopeLimits.max_payload has no cap for {', '.join(missing)}")
        if any(v < 0 for v in self.max_payload.values()):
            raise ConfigError("EnvelopeLimits.max_payload caps must be >= 0")
        if not 0 < self.max_header <= 0xFFFF:
            raise ConfigError("EnvelopeLimits.max_header must be in 1..65535 (a u16 length)")
        if self.max_name < 0:
            raise ConfigError("EnvelopeLimits.max_name must be >= 0")

    @property
    def max_message(self) -> int:
        """The largest envelope these limits admit; the websocket layer's max message size."""
        largest = max(
            cap + (self.max_name if kind in NAMED_KINDS else 0)
            for kind, cap in self.max_payload.items()
        )
        return _PREFIX_SIZE + self.max_header + largest + TAG_SIZE


DEFAULT_LIMITS = EnvelopeLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, fully checked envelope.

    ``payload`` is a view of the decrypted bytes, which belong to this envelope alone (no other
    reference to them exists): a receiver may keep it, or a numpy array over it, without a copy.
    """

    kind: Kind
    seq: int
    call_id: int
    deadline_ms: int
    name: str
    payload: memoryview


class SharedPayload:
    """A payload that several envelopes carry, e.g. a reducer's average sent to every member of
    its group, or a part sent straight from the averager's flat vector (:meth:`borrow`).

    Each envelope is encrypted under its own connection's key as it is sealed, so its slice is
    read then (once per envelope) and never copied before: the envelope that waits in a queue
    holds its own ciphertext, not a reference to this memory.

    >>> shared = SharedPayload(bytes(100))
    >>> len(shared.slice(0, 50)), len(shared.slice(90, 120))
    (50, 10)
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        if type(data) is not bytes:
            raise ConfigError("a SharedPayload holds bytes; borrow() takes other buffers")
        self.data: bytes | memoryview = data

    @classmethod
    def borrow(cls, buffer: memoryview) -> SharedPayload:
        """Carry ``buffer`` (a flat, contiguous byte view of memory the caller owns) without
        copying it. Each chunk is read when its envelope is sealed (by the connection's writer,
        before ``SendStream.send`` returns), so the caller leaves the memory alone until the
        send that carries it has returned; after that nothing refers to it any more."""
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if not view.c_contiguous:
            raise ConfigError("a borrowed payload must be contiguous memory")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        shared = cls.__new__(cls)
        shared.data = view
        return shared

    def __len__(self) -> int:
        return len(self.data)

    def slice(self, start: int, end: int) -> SharedSlice:
        """``data[start:end]`` (clamped like a slice) as something to seal."""
        start, end, _ = slice(start, end).indices(len(self.data))
        return SharedSlice(self, start, max(start, end))


class SharedSlice:
    """A slice of a :class:`SharedPayload`; :meth:`EnvelopeSealer.seal_parts` takes one as a
    payload."""

    __slots__ = ("end", "shared", "start")

    def __init__(self, shared: SharedPayload, start: int, end: int) -> None:
        self.shared, self.start, self.end = shared, start, end

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def view(self) -> memoryview:
        return memoryview(self.shared.data)[self.start : self.end]


_encode = msgspec.msgpack.Encoder().encode
# msgspec refuses ints past 2**64-1 itself; Meta(ge=0) refuses negative ones, so every field
# that decodes is a u64 (a negative version still reads as "version", see _raise_undecodable).
_U64 = Annotated[int, msgspec.Meta(ge=0)]
_HeaderTuple = tuple[_U64, _U64, _U64, _U64, _U64, _U64, _U64]
_decode_header = msgspec.msgpack.Decoder(_HeaderTuple).decode
# Used only when the typed decode failed, to tell a header of another version (whose layout may
# differ) from garbage; Raw elements keep it from recursing into nested attacker data.
_decode_raw_array = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_decode_int = msgspec.msgpack.Decoder(int).decode
# Everything msgspec's C decoder raises on hostile input: its own errors, UnicodeDecodeError (a
# ValueError), RecursionError for deep nesting.
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


def _check_u64(what: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise ConfigError(f"{what} must be an int in 0..2**64-1, got {value!r}")


def _cipher(key: bytes) -> AESGCM:
    if type(key) is not bytes or len(key) != KEY_SIZE:
        raise ConfigError(f"an envelope key is {KEY_SIZE} bytes")
    return AESGCM(key)


def _direction(direction: Direction) -> bytes:
    if type(direction) is not Direction:
        raise ConfigError(f"direction must be a Direction, got {direction!r}")
    return int(direction).to_bytes(4, "big")


def _associated_prefix(session: bytes, sender: PeerID, recipient: PeerID) -> bytes:
    if len(session) != SESSION_SIZE:
        raise ConfigError(f"a session id is {SESSION_SIZE} bytes, got {len(session)}")
    return ENVELOPE_DOMAIN + bytes(session) + sender.to_bytes() + recipient.to_bytes()


class EnvelopeSealer:
    """Seals outgoing envelopes for one direction of one session; numbers them 1, 2, 3, ..."""

    __slots__ = ("_aad", "_aead", "_limits", "_nonce", "_seq")

    def __init__(
        self,
        sender: PeerID,
        session: bytes,
        recipient: PeerID,
        key: bytes,
        *,
        direction: Direction,
        limits: EnvelopeLimits = DEFAULT_LIMITS,
    ) -> None:
        self._aad = _associated_prefix(session, sender, recipient)
        self._aead = _cipher(key)
        self._nonce = _direction(direction)
        self._limits = limits
        self._seq = 0

    @property
    def last_seq(self) -> int:
        """The seq of the last sealed envelope (0 before the first)."""
        return self._seq

    def seal(
        self,
        kind: Kind,
        call_id: int = 0,
        payload: bytes | bytearray | memoryview = b"",
        *,
        deadline_ms: int = 0,
        name: str = "",
    ) -> bytes:
        """Return the whole envelope as one bytes object, ready to send as one message.

        Raises ConfigError for arguments the receiver would refuse (unknown kind, oversize
        payload or name, a name on a kind that takes none), so that a local bug fails here
        instead of closing the connection at the other end. :meth:`seal_parts` is the same
        envelope in two pieces.
        """
        head, body = self.seal_parts(kind, call_id, payload, deadline_ms=deadline_ms, name=name)
        return b"".join((head, body))

    def seal_parts(
        self,
        kind: Kind,
        call_id: int = 0,
        payload: bytes | bytearray | memoryview | SharedSlice = b"",
        *,
        deadline_ms: int = 0,
        name: str = "",
    ) -> tuple[bytes, bytes | memoryview]:
        """The envelope as ``(head, body)``: ``head`` is ``u16 H | header`` and ``body`` the
        encrypted name and payload with their tag; the message is ``head + body``. Same checks
        and errors as :meth:`seal`.

        The payload is read once, here (encrypting it is the only pass over it), so the caller
        may change its buffer as soon as this returns. ``body`` is a new buffer that belongs to
        the caller: bytes when short, else a writable view of its own memory.

        >>> from moshpit_trio.identity import Identity
        >>> me, you = Identity.generate(), Identity.generate()
        >>> sealer = EnvelopeSealer(
        ...     me.peer_id, bytes(32), you.peer_id, bytes(32),
        ...     direction=Direction.INITIATOR_TO_RESPONDER)
        >>> head, body = sealer.seal_parts(Kind.STREAM_DATA, 1, bytes(1000))
        >>> len(body), len(head) < 20
        (1016, True)
        """
        k = _KIND_BY_VALUE.get(kind) if type(kind) in (int, Kind) else None
        if k is None:
            raise ConfigError(f"unknown envelope kind {kind!r}")
        _check_u64("call_id", call_id)
        _check_u64("deadline_ms", deadline_ms)
        view = payload.view if isinstance(payload, SharedSlice) else _flat(payload)
        size = len(view)
        cap = self._limits.max_payload[k]
        if size > cap or (k in EXACT_SIZE_KINDS and size != cap):
            raise ConfigError(f"a {k.name} payload may be {cap} bytes at most, got {size}")
        name_bytes = name.encode("utf-8")
        if k in NAMED_KINDS:
            if not name:
                raise ConfigError(f"a {k.name} needs a name")
            if len(name_bytes) > self._limits.max_name:
                raise ConfigError(
                    f"name is {len(name_bytes)} bytes of utf-8; the cap is {self._limits.max_name}"
                )
        elif name or deadline_ms:
            raise ConfigError(f"a {k.name} carries no name and no deadline")
        if self._seq >= U64_MAX:
            raise ConfigError("this session has sealed 2**64-1 envelopes; open a new one")
        seq = self._seq + 1
        header = _encode((VERSION, int(k), seq, call_id, deadline_ms, len(name_bytes), size))
        if len(header) > self._limits.max_header:
            raise ConfigError(
                f"header is {len(header)} bytes; the cap is {self._limits.max_header}"
            )
        head = len(header).to_bytes(2, "big") + header
        nonce = self._nonce + seq.to_bytes(8, "big")
        aad = self._aad + head
        plain: bytes | memoryview = b"".join((name_bytes, view)) if name_bytes else view
        body: bytes | memoryview
        if len(plain) < _INTO_THRESHOLD:
            body = self._aead.encrypt(nonce, plain, aad)
        else:
            body = np.empty(len(plain) + TAG_SIZE, dtype=np.uint8).data
            self._aead.encrypt_into(nonce, plain, aad, body)
        self._seq = seq
        return head, body


def _flat(payload: bytes | bytearray | memoryview) -> memoryview:
    """``payload`` as a flat byte view; ConfigError for a buffer that is not flat bytes."""
    try:
        view = payload if isinstance(payload, memoryview) else memoryview(payload)
    except TypeError:
        raise ConfigError(f"a payload is a buffer of bytes, not {type(payload).__name__}") from None
    if view.nbytes != len(payload) or not view.c_contiguous:
        raise ConfigError("the payload memoryview must be a flat view of bytes")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


class EnvelopeOpener:
    """Opens incoming envelopes for one direction of one session, checking everything."""

    __slots__ = ("_aad", "_aead", "_last_seq", "_limits", "_nonce")

    def __init__(
        self,
        key: bytes,
        session: bytes,
        sender: PeerID,
        recipient: PeerID,
        limits: EnvelopeLimits = DEFAULT_LIMITS,
        *,
        direction: Direction,
    ) -> None:
        self._aad = _associated_prefix(session, sender, recipient)
        self._aead = _cipher(key)
        self._nonce = _direction(direction)
        self._limits = limits
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        """The seq of the last envelope that opened (0 before the first)."""
        return self._last_seq

    def open(self, message: bytes | bytearray | memoryview) -> Envelope:
        """Check one received message, decrypt it and return its envelope; raise ProtocolError
        if anything is wrong.

        The order of the checks is the spec's: framing and the header's fields first (sizes,
        the sequence number) and only then the one pass over the payload that decrypts and
        authenticates it. The expected seq advances only for an envelope that passed every
        check.
        """
        try:
            mv = memoryview(message)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
        except (TypeError, ValueError):
            raise ProtocolError("malformed", "the message is not a flat buffer of bytes") from None
        total = len(mv)
        limits = self._limits
        if total < _PREFIX_SIZE:
            raise ProtocolError("malformed", f"a {total}-byte message has no header length")
        header_size = (mv[0] << 8) | mv[1]
        if header_size > limits.max_header:
            raise ProtocolError(
                "too-large", f"header of {header_size} bytes; the cap is {limits.max_header}"
            )
        sealed_start = _PREFIX_SIZE + header_size
        if total < sealed_start:
            raise ProtocolError(
                "truncated", f"message of {total} bytes ends inside its {header_size}-byte header"
            )
        header_view = mv[_PREFIX_SIZE:sealed_start]
        try:
            header = _decode_header(header_view)
        except _DECODE_ERRORS as exc:
            self._raise_undecodable(header_view, exc)
        version, kind_value, seq, call_id, deadline_ms, name_len, payload_len = header
        if version != VERSION:
            raise ProtocolError(
                "version", f"envelope version {version}; this peer speaks {VERSION}"
            )
        kind = _KIND_BY_VALUE.get(kind_value)
        if kind is None:
            raise ProtocolError("kind", f"unknown envelope kind {kind_value}")
        expected_seq = self._last_seq + 1
        if seq != expected_seq:
            raise ProtocolError(
                "seq", f"envelope seq {seq}, expected {expected_seq} (replayed, lost or reordered)"
            )
        if kind in NAMED_KINDS:
            if name_len > limits.max_name:
                raise ProtocolError(
                    "too-large", f"call name of {name_len} bytes; the cap is {limits.max_name}"
                )
            if not name_len:
                raise ProtocolError("malformed", f"a {kind.name} without a name")
        elif name_len or deadline_ms:
            raise ProtocolError("malformed", f"a {kind.name} carries no name and no deadline")
        cap = limits.max_payload[kind]
        if payload_len > cap:
            raise ProtocolError(
                "too-large", f"{kind.name} payload of {payload_len} bytes; the cap is {cap}"
            )
        if kind in EXACT_SIZE_KINDS and payload_len != cap:
            raise ProtocolError(
                "malformed", f"a {kind.name} payload is exactly {cap} bytes, got {payload_len}"
            )
        plain_size = name_len + payload_len
        expected_total = sealed_start + plain_size + TAG_SIZE
        if total != expected_total:
            raise ProtocolError(
                "truncated" if total < expected_total else "malformed",
                f"message of {total} bytes; its header says {expected_total}",
            )
        nonce = self._nonce + seq.to_bytes(8, "big")
        aad = self._aad + mv[:sealed_start]
        sealed = mv[sealed_start:]
        view: memoryview
        try:
            if plain_size < _INTO_THRESHOLD:
                view = memoryview(self._aead.decrypt(nonce, sealed, aad))
            else:
                view = np.empty(plain_size, dtype=np.uint8).data
                self._aead.decrypt_into(nonce, sealed, aad, view)
        except InvalidTag:
            raise ProtocolError(
                "mac", "the envelope does not authenticate (tampered, or another key)"
            ) from None
        name = ""
        if name_len:
            try:
                name = str(view[:name_len], "utf-8")
            except UnicodeDecodeError:
                raise ProtocolError("malformed", "the call name is not utf-8") from None
        self._last_seq = seq
        return Envelope(kind, seq, call_id, deadline_ms, name, view[name_len:])

    @staticmethod
    def _raise_undecodable(header_view: memoryview, exc: Exception) -> NoReturn:
        """Raise "version" for a header of another version, otherwise "malformed"."""
        try:
            version = _decode_int(_decode_raw_array(header_view)[0])
        except (*_DECODE_ERRORS, IndexError):
            version = VERSION
        if version != VERSION:
            raise ProtocolError(
                "version", f"envelope version {version}; this peer speaks {VERSION}"
            ) from None
        raise ProtocolError("malformed", f"bad envelope header: {exc}") from None
