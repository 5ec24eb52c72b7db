"""Envelopes: the authenticated framing of every message after the handshake (sans-IO).

One envelope is one binary websocket message::

    u16 big-endian H | header (H bytes, msgpack) | mac (32 bytes) | payload (raw bytes)

The header is the msgpack array ``[version, kind, session, sender, recipient, seq, call_id,
deadline_ms, name, payload_len, payload_hash]`` and the MAC is keyed blake3 over
``b"moshpit/1 envelope\\x00" + header``, under the sending direction's key from the handshake
(both ends hold it, nobody else does). The payload is covered through its blake3 hash in the
header, so a multi-megabyte tensor chunk is never copied through the serializer and is
authenticated at the cost of one hash. protocol/SPEC.md ("Envelope") is the contract; this module
follows it check for check.

Why a MAC and not an Ed25519 signature per envelope: the handshake already signs both ends'
ephemeral keys, so the session keys prove who sent an envelope to the one peer that receives it,
which is all an envelope is for (DHT records, which are passed on, carry their own signatures).
A signature and its check cost about 175 microseconds per envelope here, the MAC about 2.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from collections.abc import Mapping
from types import MappingProxyType
from typing import NoReturn

import blake3
import msgspec

from ..errors import ConfigError, ProtocolError
from ..identity import PeerID

__all__ = [
    "DEFAULT_LIMITS",
    "ENVELOPE_DOMAIN",
    "MAC_SIZE",
    "VERSION",
    "Envelope",
    "EnvelopeLimits",
    "EnvelopeOpener",
    "EnvelopeSealer",
    "Kind",
    "SharedPayload",
    "SharedSlice",
]

VERSION = 1
ENVELOPE_DOMAIN = b"moshpit/1 envelope\x00"
SESSION_SIZE = 32
HASH_SIZE = 32
MAC_SIZE = 32
KEY_SIZE = 32
U64_MAX = 2**64 - 1
_PREFIX_SIZE = 2
KiB = 1024
MiB = 1024 * KiB


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
    max_header: int = 512
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
        return _PREFIX_SIZE + self.max_header + MAC_SIZE + max(self.max_payload.values())


DEFAULT_LIMITS = EnvelopeLimits()


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """An opened, fully checked envelope.

    ``payload`` is a view into the received message (no copy); take ``bytes(payload)`` to keep
    it independently of that buffer.
    """

    kind: Kind
    seq: int
    call_id: int
    deadline_ms: int
    name: str
    payload: memoryview


def _hash(data: bytes | memoryview) -> bytes:
    digest: bytes = blake3.blake3(data).digest()
    return digest


class SharedPayload:
    """``bytes`` that several envelopes carry, e.g. a reducer's average sent to every member of
    its group: the digest of each slice is computed once, however many envelopes (on however
    many connections) carry that slice.

    >>> shared = SharedPayload(bytes(100))
    >>> a, b = shared.slice(0, 50), shared.slice(0, 50)
    >>> a.digest() is b.digest(), len(a)
    (True, 50)
    """

    __slots__ = ("_digests", "data")

    def __init__(self, data: bytes) -> None:
        if type(data) is not bytes:
            raise ConfigError("a SharedPayload holds bytes (nothing may change them)")
        self.data: bytes | memoryview = data
        self._digests: dict[tuple[int, int], bytes] = {}

    @classmethod
    def borrow(cls, buffer: memoryview) -> SharedPayload:
        """Carry ``buffer`` (a flat, contiguous byte view of memory the caller owns) without
        copying it: its slices are hashed and written to the socket straight from that memory.

        The caller promises that nothing changes those bytes until every envelope carrying
        them has been written: a stream that ended with ``finish()`` returning has been
        (the receiver answered after the last chunk); after any other ending, envelopes may
        still wait in the connection's queue, so the caller must then leave the memory alone
        for good. Bytes changed in between would no longer match the hash under the MAC, and the
        receiver would close the connection as a protocol violation.
        """
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if not view.c_contiguous:
            raise ConfigError("a borrowed payload must be contiguous memory")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        shared = cls.__new__(cls)
        shared.data = view
        shared._digests = {}
        return shared

    def __len__(self) -> int:
        return len(self.data)

    def slice(self, start: int, end: int) -> SharedSlice:
        """``data[start:end]`` (clamped like a slice) as something to seal."""
        start, end, _ = slice(start, end).indices(len(self.data))
        return SharedSlice(self, start, max(start, end))


class SharedSlice:
    """A slice of a :class:`SharedPayload`; :meth:`EnvelopeSealer.seal_parts` takes one as a
    payload and uses the slice's remembered digest."""

    __slots__ = ("end", "shared", "start")

    def __init__(self, shared: SharedPayload, start: int, end: int) -> None:
        self.shared, self.start, self.end = shared, start, end

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def view(self) -> memoryview:
        return memoryview(self.shared.data)[self.start : self.end]

    def digest(self) -> bytes:
        key = (self.start, self.end)
        digests = self.shared._digests
        found = digests.get(key)
        if found is None:
            found = digests[key] = _hash(self.view)
        return found


_encode = msgspec.msgpack.Encoder().encode
_HeaderTuple = tuple[int, int, bytes, bytes, bytes, int, int, int, str, int, bytes]
_decode_header = msgspec.msgpack.Decoder(_HeaderTuple).decode
# Used only when the typed decode failed, to tell a header of another version (whose layout may
# differ) from garbage; Raw elements keep it from recursing into nested attacker data.
_decode_raw_array = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_decode_int = msgspec.msgpack.Decoder(int).decode
# Everything msgspec's C decoder raises on hostile input: its own errors, UnicodeDecodeError (a
# ValueError) for a str that is not utf-8, RecursionError for deep nesting.
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


def _check_u64(what: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= U64_MAX:
        raise ConfigError(f"{what} must be an int in 0..2**64-1, got {value!r}")


class EnvelopeSealer:
    """Seals outgoing envelopes for one direction of one session; numbers them 1, 2, 3, ..."""

    __slots__ = ("_key", "_limits", "_prefix_fields", "_seq")

    def __init__(
        self,
        sender: PeerID,
        session: bytes,
        recipient: PeerID,
        mac_key: bytes,
        *,
        limits: EnvelopeLimits = DEFAULT_LIMITS,
    ) -> None:
        if len(session) != SESSION_SIZE:
            raise ConfigError(f"a session id is {SESSION_SIZE} bytes, got {len(session)}")
        self._key = _mac_key(mac_key)
        self._limits = limits
        self._prefix_fields = (
            bytes(session),
            sender.to_bytes(),
            recipient.to_bytes(),
        )
        self._seq = 0

    @property
    def last_seq(self) -> int:
        """The seq of the last sealed envelope (0 before the first)."""
        return self._seq

    def seal(
        self,
        kind: Kind,
        call_id: int = 0,
        payload: bytes | memoryview = b"",
        *,
        deadline_ms: int = 0,
        name: str = "",
    ) -> bytes:
        """Return the whole envelope as one bytes object, ready to send as one message.

        Raises ConfigError for arguments the receiver would refuse (unknown kind, oversize
        payload or name, a name on a kind that takes none), so that a local bug fails here
        instead of closing the connection at the other end. :meth:`seal_parts` is the same
        envelope in two pieces, without copying the payload.
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
        """The envelope as ``(head, payload)``: ``head`` is ``u16 H | header | mac`` and
        the message is ``head + payload``. Same checks and errors as :meth:`seal`.

        The payload that comes back is the one given when nothing can change it afterwards
        (``bytes``, or a read-only view of ``bytes``), otherwise a copy taken before hashing:
        what was hashed is what will be sent, whatever the caller does with its buffer next.
        A sender can thus write the two pieces to the socket one after the other and a
        multi-megabyte payload is never copied on its way there. A :class:`SharedSlice` goes
        out as a view of its bytes, under the digest its :class:`SharedPayload` remembers.

        >>> from moshpit_trio.identity import Identity
        >>> me, you = Identity.generate(), Identity.generate()
        >>> sealer = EnvelopeSealer(me.peer_id, bytes(32), you.peer_id, bytes(32))
        >>> data = bytes(1000)
        >>> head, body = sealer.seal_parts(Kind.STREAM_DATA, 1, data)
        >>> body is data, len(head) < 300
        (True, True)
        """
        k = _KIND_BY_VALUE.get(kind) if type(kind) in (int, Kind) else None
        if k is None:
            raise ConfigError(f"unknown envelope kind {kind!r}")
        _check_u64("call_id", call_id)
        _check_u64("deadline_ms", deadline_ms)
        digest: bytes | None = None
        if isinstance(payload, SharedSlice):
            digest, payload = payload.digest(), payload.view
        elif type(payload) is not bytes:
            payload = _frozen(payload)
        size = len(payload)
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
        session, sender, recipient = self._prefix_fields
        header = _encode(
            (
                VERSION,
                int(k),
                session,
                sender,
                recipient,
                seq,
                call_id,
                deadline_ms,
                name,
                size,
                _hash(payload) if digest is None else digest,
            )
        )
        if len(header) > self._limits.max_header:
            raise ConfigError(
                f"header is {len(header)} bytes; the cap is {self._limits.max_header}"
            )
        mac = _mac(self._key, header)
        self._seq = seq
        return b"".join((len(header).to_bytes(2, "big"), header, mac)), payload


def _mac_key(key: bytes) -> bytes:
    if type(key) is not bytes or len(key) != KEY_SIZE:
        raise ConfigError(f"an envelope MAC key is {KEY_SIZE} bytes")
    return key


def _mac(key: bytes, header: bytes | memoryview) -> bytes:
    """Keyed blake3 of the domain-separated header: the envelope's MAC."""
    hasher = blake3.blake3(ENVELOPE_DOMAIN, key=key)
    hasher.update(header)
    mac: bytes = hasher.digest()
    return mac


def _frozen(payload: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``payload`` as a flat byte view that nobody can change: as it is when it is a read-only
    view of ``bytes``, else a copy. ConfigError for a buffer that is not flat bytes."""
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    if view.nbytes != len(payload) or not view.c_contiguous:
        raise ConfigError("the payload memoryview must be a flat view of bytes")
    if view.readonly and type(view.obj) is bytes:
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return view.tobytes()


class EnvelopeOpener:
    """Opens incoming envelopes for one direction of one session, checking everything."""

    __slots__ = ("_key", "_last_seq", "_limits", "_recipient", "_sender", "_session")

    def __init__(
        self,
        mac_key: bytes,
        session: bytes,
        sender: PeerID,
        recipient: PeerID,
        limits: EnvelopeLimits = DEFAULT_LIMITS,
    ) -> None:
        if len(session) != SESSION_SIZE:
            raise ConfigError(f"a session id is {SESSION_SIZE} bytes, got {len(session)}")
        self._key = _mac_key(mac_key)
        self._session = bytes(session)
        self._sender = sender.to_bytes()
        self._recipient = recipient.to_bytes()
        self._limits = limits
        self._last_seq = 0

    @property
    def last_seq(self) -> int:
        """The seq of the last envelope that opened (0 before the first)."""
        return self._last_seq

    def open(self, message: bytes | bytearray | memoryview) -> Envelope:
        """Check one received message and return its envelope; raise ProtocolError if bad.

        The order of the checks is the spec's: framing and sizes first, then the header's
        fields, then the MAC, and only then the payload hash (the one check that costs
        in proportion to the payload). The expected seq advances only for an envelope that
        passed every check.
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
        payload_start = _PREFIX_SIZE + header_size + MAC_SIZE
        if total < payload_start:
            raise ProtocolError(
                "malformed",
                f"message of {total} bytes is shorter than its {header_size}-byte header and MAC",
            )
        header_view = mv[_PREFIX_SIZE : _PREFIX_SIZE + header_size]
        try:
            header = _decode_header(header_view)
        except _DECODE_ERRORS as exc:
            self._raise_undecodable(header_view, exc)
        (
            version,
            kind_value,
            session,
            sender,
            recipient,
            seq,
            call_id,
            deadline_ms,
            name,
            payload_len,
            payload_hash,
        ) = header
        if version != VERSION:
            raise ProtocolError("version", f"envelope version {version}; this peer speaks 1")
        if not (
            0 <= seq <= U64_MAX
            and 0 <= call_id <= U64_MAX
            and 0 <= deadline_ms <= U64_MAX
            and 0 <= payload_len <= U64_MAX
            and 0 <= kind_value <= U64_MAX
        ):
            raise ProtocolError("malformed", "an integer field is outside 0..2**64-1")
        if (
            len(session) != SESSION_SIZE
            or len(sender) != 32
            or len(recipient) != 32
            or len(payload_hash) != HASH_SIZE
        ):
            raise ProtocolError(
                "malformed", "session, sender, recipient and payload_hash are 32 bytes each"
            )
        kind = _KIND_BY_VALUE.get(kind_value)
        if kind is None:
            raise ProtocolError("kind", f"unknown envelope kind {kind_value}")
        if session != self._session:
            raise ProtocolError("session", "the envelope belongs to another session")
        if sender != self._sender:
            raise ProtocolError(
                "sender", f"the envelope claims sender {PeerID(sender)}, not this connection's"
            )
        if recipient != self._recipient:
            raise ProtocolError("recipient", f"the envelope is addressed to {PeerID(recipient)}")
        expected_seq = self._last_seq + 1
        if seq != expected_seq:
            raise ProtocolError(
                "seq", f"envelope seq {seq}, expected {expected_seq} (replayed, lost or reordered)"
            )
        if kind in NAMED_KINDS:
            name_size = len(name.encode())
            if name_size > limits.max_name:
                raise ProtocolError(
                    "too-large", f"call name of {name_size} bytes; the cap is {limits.max_name}"
                )
            if not name:
                raise ProtocolError("malformed", f"a {kind.name} without a name")
        elif name or deadline_ms:
            raise ProtocolError("malformed", f"a {kind.name} carries no name and no deadline")
        payload_size = total - payload_start
        cap = limits.max_payload[kind]
        if payload_size > cap:
            raise ProtocolError(
                "too-large", f"{kind.name} payload of {payload_size} bytes; the cap is {cap}"
            )
        if payload_len != payload_size:
            raise ProtocolError(
                "malformed", f"header says {payload_len} payload bytes, message has {payload_size}"
            )
        if kind in EXACT_SIZE_KINDS and payload_size != cap:
            raise ProtocolError(
                "malformed", f"a {kind.name} payload is exactly {cap} bytes, got {payload_size}"
            )
        if not hmac.compare_digest(
            mv[payload_start - MAC_SIZE : payload_start], _mac(self._key, header_view)
        ):
            raise ProtocolError("mac", "the envelope's MAC does not match")
        payload = mv[payload_start:]
        if _hash(payload) != payload_hash:
            raise ProtocolError("hash", "the payload does not match the hash in its header")
        self._last_seq = seq
        return Envelope(kind, seq, call_id, deadline_ms, name, payload)

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
