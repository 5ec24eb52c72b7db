"""The moshpit/1 handshake: mutual authentication in three messages (sans-IO).

::

    initiator -> responder  HELLO     ["moshpit/1", 1, initiator_key, initiator_nonce, expected_id]
    responder -> initiator  RESPONSE  ["moshpit/1", 2, responder_key, responder_nonce, sig_r]
                         or REJECT    ["moshpit/1", 4, reason]
    initiator -> responder  FINISH    ["moshpit/1", 3, sig_i]

``sig_r`` covers the HELLO (so the initiator's fresh nonce) and the responder's key and nonce;
``sig_i`` covers the HELLO and the RESPONSE (so the responder's fresh nonce). Each side thus signs
a nonce the other side just drew, which is what makes a recorded handshake useless to replay. The
session id is the sha256 of the whole transcript. protocol/SPEC.md ("Handshake") is the contract.

Each nonce is an ephemeral X25519 public key, drawn fresh for this handshake. Both are signed, so
the X25519 secret the two sides then share is known to them alone, and each direction's envelope
key is derived from it with HKDF-SHA256 (:class:`SessionKeys`): after the handshake, envelopes
are encrypted and authenticated with AES-256-GCM instead of carrying an Ed25519 signature each.

Both classes are small state machines; their ``_TRANSITIONS`` tables list every allowed call.
Any error, including a call out of order, leaves the object FAILED for good: a handshake that
went wrong once is not resumed, the connection is closed.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..errors import ConfigError, ProtocolError
from ..identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, PeerID

__all__ = [
    "MAX_HANDSHAKE_MESSAGE",
    "NONCE_SIZE",
    "PROTOCOL",
    "HandshakeInitiator",
    "HandshakeRejected",
    "HandshakeResponder",
    "HandshakeResult",
    "MessageType",
    "SessionKeys",
    "State",
]

PROTOCOL = "moshpit/1"
NONCE_SIZE = 32
MAX_HANDSHAKE_MESSAGE = 1024
# A REJECT's reason is cut to this many utf-8 bytes so the message always fits the cap above.
MAX_REJECT_REASON = 512
RESPONDER_DOMAIN = b"moshpit/1 handshake responder\x00"
INITIATOR_DOMAIN = b"moshpit/1 handshake initiator\x00"
SESSION_DOMAIN = b"moshpit/1 session\x00"
# HKDF-SHA256 ``info`` strings for the two directions' envelope keys (the salt is the session id).
KEY_INFO_INITIATOR = b"moshpit/1 envelope key initiator to responder"
KEY_INFO_RESPONDER = b"moshpit/1 envelope key responder to initiator"


class MessageType(enum.IntEnum):
    HELLO = 1
    RESPONSE = 2
    FINISH = 3
    REJECT = 4


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class SessionKeys:
    """This side's AES-256-GCM envelope keys: one for what it sends, one for what it receives."""

    send: bytes
    receive: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeResult:
    """What a completed handshake established: the session id, who is at the other end, and
    the keys that authenticate the session's envelopes."""

    session: bytes
    remote_public_key: bytes
    remote_peer_id: PeerID
    keys: SessionKeys = dataclasses.field(repr=False)


class HandshakeRejected(ProtocolError):
    """The responder refuses this initiator; send ``reply`` (a REJECT message), then close."""

    def __init__(self, reason: str, detail: str, reply: bytes) -> None:
        super().__init__(reason, detail)
        self.reply = reply


class State(enum.Enum):
    START = "start"
    AWAIT_RESPONSE = "await-response"
    AWAIT_HELLO = "await-hello"
    AWAIT_FINISH = "await-finish"
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"


_encode = msgspec.msgpack.Encoder().encode
_decode_elements = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_decode_str = msgspec.msgpack.Decoder(str).decode
_decode_int = msgspec.msgpack.Decoder(int).decode
_KEYED = tuple[str, int, bytes, bytes, bytes]  # HELLO and RESPONSE share this shape
_decode_full: Mapping[MessageType, Callable[[bytes], tuple[Any, ...]]] = {
    MessageType.HELLO: msgspec.msgpack.Decoder(_KEYED).decode,
    MessageType.RESPONSE: msgspec.msgpack.Decoder(_KEYED).decode,
    MessageType.FINISH: msgspec.msgpack.Decoder(tuple[str, int, bytes]).decode,
    MessageType.REJECT: msgspec.msgpack.Decoder(tuple[str, int, str]).decode,
}
# What msgspec's C decoder raises on hostile bytes (UnicodeDecodeError is a ValueError).
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


def _parse(
    message: object, allowed: frozenset[MessageType]
) -> tuple[MessageType, tuple[Any, ...], bytes]:
    """Decode one handshake message whose type must be in ``allowed``; check its field sizes.

    Returns the type, the fields and the message as bytes (the exact bytes the transcript uses).
    """
    if not isinstance(message, bytes | bytearray | memoryview):
        raise ProtocolError(
            "malformed", f"handshake messages are binary, got {type(message).__name__}"
        )
    try:
        data = bytes(message)
    except (TypeError, ValueError):
        raise ProtocolError("malformed", "the message is not a buffer of bytes") from None
    if len(data) > MAX_HANDSHAKE_MESSAGE:
        raise ProtocolError(
            "too-large",
            f"handshake message of {len(data)} bytes; the cap is {MAX_HANDSHAKE_MESSAGE}",
        )
    try:
        elements = _decode_elements(data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError("malformed", f"not a msgpack array: {exc}") from None
    if len(elements) < 2:
        raise ProtocolError("malformed", "a handshake message has at least 2 elements")
    try:
        protocol = _decode_str(elements[0])
    except _DECODE_ERRORS:
        raise ProtocolError("malformed", "the first element is not the protocol name") from None
    if protocol != PROTOCOL:
        raise ProtocolError("version", f"the peer speaks {protocol[:40]!r}, not {PROTOCOL!r}")
    try:
        type_value = _decode_int(elements[1])
    except _DECODE_ERRORS:
        raise ProtocolError("malformed", "the second element is not a message type") from None
    mtype = next((t for t in allowed if t == type_value), None)
    if mtype is None:
        expected = " or ".join(sorted(t.name for t in allowed))
        raise ProtocolError(
            "malformed", f"handshake message of type {type_value}; expected {expected}"
        )
    try:
        fields = _decode_full[mtype](data)
    except _DECODE_ERRORS as exc:
        raise ProtocolError("malformed", f"bad {mtype.name} message: {exc}") from None
    if mtype in (MessageType.HELLO, MessageType.RESPONSE):
        _check_size(mtype, "public key", fields[2], PUBLIC_KEY_SIZE)
        _check_size(mtype, "nonce", fields[3], NONCE_SIZE)
        last = "expected PeerID" if mtype is MessageType.HELLO else "signature"
        _check_size(mtype, last, fields[4], 32 if mtype is MessageType.HELLO else SIGNATURE_SIZE)
    elif mtype is MessageType.FINISH:
        _check_size(mtype, "signature", fields[2], SIGNATURE_SIZE)
    return mtype, fields, data


def _check_size(mtype: MessageType, what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise ProtocolError(
            "malformed", f"the {mtype.name}'s {what} is {len(value)} bytes, not {size}"
        )


def _verify(public_key: bytes, signature: bytes, message: bytes, what: str) -> None:
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ProtocolError("signature", f"the {what} signature does not verify") from None


def _session_id(hello: bytes, response: bytes, finish: bytes) -> bytes:
    return hashlib.sha256(SESSION_DOMAIN + hello + response + finish).digest()


def _ephemeral(secret: bytes | None) -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair (from ``secret``, 32 bytes, for fixed test vectors); its
    public key is this side's nonce."""
    if secret is None:
        secret = os.urandom(NONCE_SIZE)
    elif len(secret) != NONCE_SIZE:
        raise ConfigError(f"an ephemeral secret is {NONCE_SIZE} bytes, got {len(secret)}")
    key = X25519PrivateKey.from_private_bytes(bytes(secret))
    return key, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _session_keys(
    ephemeral: X25519PrivateKey, remote_nonce: bytes, session: bytes, *, initiator: bool
) -> SessionKeys:
    """Both directions' envelope keys, from the X25519 secret shared with the remote nonce."""
    try:
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(remote_nonce))
    except ValueError:
        # A low-order point gives the all-zero secret: nothing would be secret about it.
        raise ProtocolError("key-exchange", "the remote nonce is not a usable X25519 key") from None
    to_responder = _hkdf(shared, session, KEY_INFO_INITIATOR)
    to_initiator = _hkdf(shared, session, KEY_INFO_RESPONDER)
    if initiator:
        return SessionKeys(send=to_responder, receive=to_initiator)
    return SessionKeys(send=to_initiator, receive=to_responder)


def _hkdf(secret: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869), 32 bytes: one direction's AES-256 key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(secret)


_T = TypeVar("_T")


class _StateMachine:
    _TRANSITIONS: ClassVar[Mapping[tuple[State, str], State]]
    _state: State

    @property
    def state(self) -> State:
        return self._state

    def _step(self, call: str, work: Callable[[], _T]) -> _T:
        """Run ``work`` as the call ``call``, if the table allows it now; FAILED on any error."""
        after = self._TRANSITIONS.get((self._state, call))
        if after is None:
            before, self._state = self._state, State.FAILED
            raise ProtocolError("state", f"{call}() is not allowed in state {before.value}")
        try:
            result = work()
        except BaseException:
            self._state = State.FAILED
            raise
        self._state = after
        return result


class HandshakeInitiator(_StateMachine):
    """The dialing side: ``hello()``, then ``receive_response(reply)`` gives FINISH to send."""

    _TRANSITIONS = {
        (State.START, "hello"): State.AWAIT_RESPONSE,
        (State.AWAIT_RESPONSE, "receive_response"): State.DONE,
    }

    def __init__(
        self, identity: Identity, expected: PeerID, *, ephemeral_secret: bytes | None = None
    ) -> None:
        self._identity = identity
        self._expected = expected
        self._ephemeral, self._nonce = _ephemeral(ephemeral_secret)
        self._state = State.START
        self._hello = b""
        self.result: HandshakeResult | None = None

    def hello(self) -> bytes:
        def work() -> bytes:
            self._hello = _encode(
                (
                    PROTOCOL,
                    int(MessageType.HELLO),
                    self._identity.public_key,
                    self._nonce,
                    self._expected.to_bytes(),
                )
            )
            return self._hello

        return self._step("hello", work)

    def receive_response(self, message: bytes) -> bytes:
        """Check the responder's reply; return the FINISH message to send.

        Raises ProtocolError "rejected" for a REJECT, "wrong-peer" when the responder is not the
        expected peer, "signature" when it did not sign this handshake.
        """

        def work() -> bytes:
            mtype, fields, response = _parse(
                message, frozenset({MessageType.RESPONSE, MessageType.REJECT})
            )
            if mtype is MessageType.REJECT:
                raise ProtocolError("rejected", fields[2][:MAX_REJECT_REASON])
            _, _, key, nonce, signature = fields
            remote = PeerID.from_public_key(key)
            if remote != self._expected:
                raise ProtocolError(
                    "wrong-peer",
                    f"the peer at the other end is {remote}, not the expected {self._expected}",
                )
            _verify(key, signature, RESPONDER_DOMAIN + self._hello + key + nonce, "responder's")
            finish = _encode(
                (
                    PROTOCOL,
                    int(MessageType.FINISH),
                    self._identity.sign(INITIATOR_DOMAIN + self._hello + response),
                )
            )
            session = _session_id(self._hello, response, finish)
            keys = _session_keys(self._ephemeral, nonce, session, initiator=True)
            self.result = HandshakeResult(session, key, remote, keys)
            return finish

        return self._step("receive_response", work)


class HandshakeResponder(_StateMachine):
    """The listening side: ``receive_hello(hello)`` gives RESPONSE to send, then
    ``receive_finish(finish)`` gives the result; or ``reject(reason)`` to refuse."""

    _TRANSITIONS = {
        (State.AWAIT_HELLO, "receive_hello"): State.AWAIT_FINISH,
        (State.AWAIT_HELLO, "reject"): State.REJECTED,
        (State.AWAIT_FINISH, "receive_finish"): State.DONE,
    }

    def __init__(self, identity: Identity, *, ephemeral_secret: bytes | None = None) -> None:
        self._identity = identity
        self._ephemeral, self._nonce = _ephemeral(ephemeral_secret)
        self._state = State.AWAIT_HELLO
        self._hello = b""
        self._response = b""
        self._remote_key = b""
        self._remote_nonce = b""
        self.remote_peer_id: PeerID | None = None
        self.result: HandshakeResult | None = None

    def receive_hello(self, message: bytes) -> bytes:
        """Check the initiator's HELLO; return the RESPONSE to send.

        Raises HandshakeRejected ("wrong-peer", with the REJECT to send in ``.reply``) when
        the initiator expects another peer.
        """

        def work() -> bytes:
            _, fields, hello = _parse(message, frozenset({MessageType.HELLO}))
            _, _, key, initiator_nonce, expected = fields
            own = self._identity.peer_id
            if expected != own.to_bytes():
                detail = f"this is {own}, not {PeerID(expected)}"
                raise HandshakeRejected(
                    "wrong-peer", detail, _reject_message(f"wrong-peer: {detail}")
                )
            self._hello = hello
            self._remote_key = key
            self._remote_nonce = initiator_nonce
            self.remote_peer_id = PeerID.from_public_key(key)
            own_key = self._identity.public_key
            signature = self._identity.sign(RESPONDER_DOMAIN + self._hello + own_key + self._nonce)
            self._response = _encode(
                (PROTOCOL, int(MessageType.RESPONSE), own_key, self._nonce, signature)
            )
            return self._response

        return self._step("receive_hello", work)

    def receive_finish(self, message: bytes) -> HandshakeResult:
        def work() -> HandshakeResult:
            _, fields, finish = _parse(message, frozenset({MessageType.FINISH}))
            transcript = INITIATOR_DOMAIN + self._hello + self._response
            _verify(self._remote_key, fields[2], transcript, "initiator's")
            assert self.remote_peer_id is not None
            session = _session_id(self._hello, self._response, finish)
            keys = _session_keys(self._ephemeral, self._remote_nonce, session, initiator=False)
            self.result = HandshakeResult(session, self._remote_key, self.remote_peer_id, keys)
            return self.result

        return self._step("receive_finish", work)

    def reject(self, reason: str) -> bytes:
        """A REJECT message to send instead of a RESPONSE (for "busy" and the like)."""
        return self._step("reject", lambda: _reject_message(reason))


def _reject_message(reason: str) -> bytes:
    cut = reason.encode("utf-8")[:MAX_REJECT_REASON].decode("utf-8", errors="ignore")
    return _encode((PROTOCOL, int(MessageType.REJECT), cut))
