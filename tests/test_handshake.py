"""The handshake: happy path, refusals, replays, state rules, and fuzzing."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity, verify_signature
from moshpit_trio.wire.handshake import (
    HandshakeInitiator,
    HandshakeRejected,
    HandshakeResponder,
    HandshakeResult,
    State,
)

from .fuzzing import mutated

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
CAROL = Identity.from_seed(bytes([3]) * 32)


def run(
    initiator: HandshakeInitiator, responder: HandshakeResponder
) -> tuple[bytes, bytes, bytes, HandshakeResult]:
    hello = initiator.hello()
    response = responder.receive_hello(hello)
    finish = initiator.receive_response(response)
    return hello, response, finish, responder.receive_finish(finish)


def fails(reason: str, call: Callable[[], object]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call()
    assert info.value.reason == reason, info.value
    return info.value


# -- happy path --------------------------------------------------------------------------------


@pytest.mark.parametrize(("a", "b"), [(ALICE, BOB), (BOB, ALICE), (ALICE, ALICE)])
def test_happy_path(a: Identity, b: Identity) -> None:
    initiator, responder = HandshakeInitiator(a, b.peer_id), HandshakeResponder(b)
    assert initiator.result is None and responder.result is None
    hello, response, finish, result = run(initiator, responder)
    assert initiator.result is not None
    assert initiator.result.session == result.session
    assert len(result.session) == 32
    assert initiator.result.remote_peer_id == b.peer_id
    assert initiator.result.remote_public_key == b.public_key
    assert result.remote_peer_id == a.peer_id
    assert result.remote_public_key == a.public_key
    assert responder.remote_peer_id == a.peer_id
    assert responder.result == result
    assert initiator.state is State.DONE and responder.state is State.DONE
    assert (
        result.session
        == hashlib.sha256(b"moshpit/1 session\x00" + hello + response + finish).digest()
    )
    # Each side sends with the key the other receives with; the two directions differ.
    assert initiator.result.keys.send == result.keys.receive
    assert initiator.result.keys.receive == result.keys.send
    assert result.keys.send != result.keys.receive
    assert "send" not in repr(result)  # keys stay out of logs


def _x25519_public(secret: bytes) -> bytes:
    key = X25519PrivateKey.from_private_bytes(secret).public_key()
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_message_layout_signatures_and_keys() -> None:
    i_secret, r_secret = b"i" * 32, b"r" * 32
    initiator = HandshakeInitiator(ALICE, BOB.peer_id, ephemeral_secret=i_secret)
    responder = HandshakeResponder(BOB, ephemeral_secret=r_secret)
    hello, response, finish, result = run(initiator, responder)
    assert msgspec.msgpack.decode(hello) == [
        "moshpit/1",
        1,
        ALICE.public_key,
        _x25519_public(i_secret),  # the nonce: an ephemeral X25519 public key
        BOB.peer_id.to_bytes(),
    ]
    proto, mtype, key, nonce, sig_r = msgspec.msgpack.decode(response)
    assert (proto, mtype, key, nonce) == ("moshpit/1", 2, BOB.public_key, _x25519_public(r_secret))
    # the envelope keys: HKDF-SHA256 of the X25519 secret, salted with the session id
    shared = X25519PrivateKey.from_private_bytes(i_secret).exchange(
        X25519PrivateKey.from_private_bytes(r_secret).public_key()
    )

    def derive(info: bytes) -> bytes:
        kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=result.session, info=info)
        return kdf.derive(shared)

    assert result.keys.receive == derive(b"moshpit/1 envelope key initiator to responder")
    assert result.keys.send == derive(b"moshpit/1 envelope key responder to initiator")
    assert verify_signature(
        BOB.public_key, sig_r, b"moshpit/1 handshake responder\x00" + hello + key + nonce
    )
    proto, mtype, sig_i = msgspec.msgpack.decode(finish)
    assert (proto, mtype) == ("moshpit/1", 3)
    assert verify_signature(
        ALICE.public_key, sig_i, b"moshpit/1 handshake initiator\x00" + hello + response
    )
    assert all(len(m) <= 1024 for m in (hello, response, finish))


def test_sessions_differ_between_handshakes() -> None:
    sessions = {run(HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB))[3].session}
    sessions.add(run(HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB))[3].session)
    assert len(sessions) == 2


def test_bad_ephemeral_secret_argument() -> None:
    with pytest.raises(ConfigError):
        HandshakeInitiator(ALICE, BOB.peer_id, ephemeral_secret=b"short")
    with pytest.raises(ConfigError):
        HandshakeResponder(BOB, ephemeral_secret=bytes(33))


@pytest.mark.parametrize("side", ["initiator", "responder"])
def test_a_low_order_nonce_fails_the_key_exchange(side: str) -> None:
    """A nonce that is a low-order X25519 point would make the shared secret all zeros (known
    to anyone): the side that receives it fails the handshake instead of using it."""
    low_order = bytes(32)  # the point 0
    initiator, responder = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    if side == "responder":
        fields = list(msgspec.msgpack.decode(initiator.hello()))
        fields[3] = low_order
        hello = msgspec.msgpack.encode(fields)
        response = responder.receive_hello(hello)
        # FINISH signed over that HELLO, as a peer that chose this nonce would send it
        finish = msgspec.msgpack.encode(
            [
                "moshpit/1",
                3,
                ALICE.sign(b"moshpit/1 handshake initiator\x00" + hello + response),
            ]
        )
        fails("key-exchange", lambda: responder.receive_finish(finish))
    else:
        hello = initiator.hello()
        response = msgspec.msgpack.encode(
            [
                "moshpit/1",
                2,
                BOB.public_key,
                low_order,
                BOB.sign(b"moshpit/1 handshake responder\x00" + hello + BOB.public_key + low_order),
            ]
        )
        fails("key-exchange", lambda: initiator.receive_response(response))


# -- refusals ----------------------------------------------------------------------------------


def test_wrong_expected_peer_is_rejected_by_the_responder() -> None:
    initiator = HandshakeInitiator(ALICE, CAROL.peer_id)
    responder = HandshakeResponder(BOB)
    with pytest.raises(HandshakeRejected) as info:
        responder.receive_hello(initiator.hello())
    assert info.value.reason == "wrong-peer"
    assert isinstance(info.value, ProtocolError)
    assert str(BOB.peer_id) in info.value.detail
    assert responder.state is State.FAILED
    err = fails("rejected", lambda: initiator.receive_response(info.value.reply))
    assert err.detail.startswith("wrong-peer: this is " + str(BOB.peer_id))
    assert initiator.state is State.FAILED


def test_initiator_detects_the_wrong_peer_itself() -> None:
    """A responder that answers for a PeerID it does not own is caught by the initiator."""
    initiator = HandshakeInitiator(ALICE, CAROL.peer_id)
    hello = initiator.hello()
    fields = msgspec.msgpack.decode(hello)
    fields[4] = BOB.peer_id.to_bytes()  # a lying relay rewrites the expected id for bob
    response = HandshakeResponder(BOB).receive_hello(msgspec.msgpack.encode(fields))
    err = fails("wrong-peer", lambda: initiator.receive_response(response))
    assert err.detail == (
        f"the peer at the other end is {BOB.peer_id}, not the expected {CAROL.peer_id}"
    )


def test_busy_reject() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    responder = HandshakeResponder(BOB)
    reply = responder.reject("busy")
    assert responder.state is State.REJECTED
    fails("state", lambda: responder.receive_hello(b""))
    err = fails("rejected", lambda: initiator.receive_response(reply))
    assert err.detail == "busy"


def test_long_reject_reason_is_cut_to_fit() -> None:
    reply = HandshakeResponder(BOB).reject("é" * 2000)
    assert len(reply) <= 1024
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    err = fails("rejected", lambda: initiator.receive_response(reply))
    assert set(err.detail) == {"é"}


def test_bad_responder_signature() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    response = HandshakeResponder(BOB).receive_hello(initiator.hello())
    fields = msgspec.msgpack.decode(response)
    fields[4] = bytes(64)
    fails("signature", lambda: initiator.receive_response(msgspec.msgpack.encode(fields)))


def test_responder_nonce_is_signed() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    response = HandshakeResponder(BOB).receive_hello(initiator.hello())
    fields = msgspec.msgpack.decode(response)
    fields[3] = bytes(32)
    fails("signature", lambda: initiator.receive_response(msgspec.msgpack.encode(fields)))


def test_bad_initiator_signature() -> None:
    initiator, responder = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    finish = initiator.receive_response(responder.receive_hello(initiator.hello()))
    fields = msgspec.msgpack.decode(finish)
    fields[2] = bytes(fields[2][:-1]) + bytes([fields[2][-1] ^ 1])
    fails("signature", lambda: responder.receive_finish(msgspec.msgpack.encode(fields)))
    assert responder.state is State.FAILED and responder.result is None


def test_other_protocol_version() -> None:
    responder = HandshakeResponder(BOB)
    hello = msgspec.msgpack.encode(["moshpit/2", 1, ALICE.public_key, bytes(32), bytes(32)])
    fails("version", lambda: responder.receive_hello(hello))
    responder = HandshakeResponder(BOB)
    fails("version", lambda: responder.receive_hello(msgspec.msgpack.encode(["moshpit/2"] * 2)))


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"\x00",
        b"garbage",
        msgspec.msgpack.encode(["moshpit/1"]),
        msgspec.msgpack.encode([1, 1]),
        msgspec.msgpack.encode(["moshpit/1", "1"]),
        msgspec.msgpack.encode(["moshpit/1", 3, bytes(64)]),  # a FINISH where HELLO is due
        msgspec.msgpack.encode(["moshpit/1", 9]),
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key, bytes(32)]),
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key, bytes(31), bytes(32)]),
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key[:31], bytes(32), bytes(32)]),
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key, bytes(32), bytes(33)]),
        msgspec.msgpack.encode(["moshpit/1", 1, "k" * 32, bytes(32), bytes(32)]),
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key, bytes(32), bytes(32), 0]),
        msgspec.msgpack.encode(["moshpit/1", True, ALICE.public_key, bytes(32), bytes(32)]),
        msgspec.msgpack.encode({"moshpit/1": 1}),
        b"\x91" * 600 + b"\x01",
    ],
)
def test_malformed_hello(message: bytes) -> None:
    responder = HandshakeResponder(BOB)
    fails("malformed", lambda: responder.receive_hello(message))
    assert responder.state is State.FAILED


def test_text_message_is_malformed() -> None:
    fails("malformed", lambda: HandshakeResponder(BOB).receive_hello("hello"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "message",
    [
        msgspec.msgpack.encode(["moshpit/1", 1, ALICE.public_key, bytes(32), bytes(32)]),
        msgspec.msgpack.encode(["moshpit/1", 4, 17]),
        msgspec.msgpack.encode(["moshpit/1", 2, BOB.public_key, bytes(32), bytes(63)]),
        msgspec.msgpack.encode(["moshpit/1", 2, BOB.public_key, bytes(32)]),
    ],
)
def test_malformed_response(message: bytes) -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    fails("malformed", lambda: initiator.receive_response(message))


def test_messages_over_1_kib_are_too_large() -> None:
    big = msgspec.msgpack.encode(["moshpit/1", 4, "x" * 1100])
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    fails("too-large", lambda: initiator.receive_response(big))
    fails("too-large", lambda: HandshakeResponder(BOB).receive_hello(bytes(1025)))
    responder = HandshakeResponder(BOB)
    responder.receive_hello(HandshakeInitiator(ALICE, BOB.peer_id).hello())
    fails("too-large", lambda: responder.receive_finish(bytes(2000)))


# -- replays -----------------------------------------------------------------------------------


def test_replayed_hello_and_finish_fail_against_a_fresh_responder() -> None:
    hello, _, finish, _ = run(HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB))
    fresh = HandshakeResponder(BOB)
    fresh.receive_hello(hello)  # anyone can replay a HELLO: it proves nothing by itself
    fails("signature", lambda: fresh.receive_finish(finish))
    assert fresh.result is None


def test_replayed_response_fails_against_a_fresh_initiator() -> None:
    _, response, _, _ = run(HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB))
    fresh = HandshakeInitiator(ALICE, BOB.peer_id)
    fresh.hello()
    fails("signature", lambda: fresh.receive_response(response))
    assert fresh.result is None


def test_finish_from_another_handshake_fails() -> None:
    """Two concurrent handshakes with the same responder key: FINISH messages do not swap."""
    i1, r1 = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    i2, r2 = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    i1.receive_response(r1.receive_hello(i1.hello()))
    f2 = i2.receive_response(r2.receive_hello(i2.hello()))
    fails("signature", lambda: r1.receive_finish(f2))


def test_reencoded_response_cannot_split_the_session() -> None:
    """sig_r covers the responder's key and nonce, not the RESPONSE's exact bytes, so a relay may
    re-encode it (here: the type as a uint8); the initiator's FINISH then signs a transcript
    the responder does not have, and the handshake fails instead of ending with two sessions."""
    initiator, responder = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    response = responder.receive_hello(initiator.hello())
    assert response[11:12] == b"\x02"
    reencoded = response[:11] + b"\xcc\x02" + response[12:]
    assert msgspec.msgpack.decode(reencoded) == msgspec.msgpack.decode(response)
    finish = initiator.receive_response(reencoded)
    fails("signature", lambda: responder.receive_finish(finish))


# -- state rules -------------------------------------------------------------------------------


def test_initiator_out_of_order() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    fails("state", lambda: initiator.receive_response(b""))
    assert initiator.state is State.FAILED
    fails("state", initiator.hello)

    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    fails("state", initiator.hello)
    fails("state", lambda: initiator.receive_response(b""))

    initiator, responder = HandshakeInitiator(ALICE, BOB.peer_id), HandshakeResponder(BOB)
    response = responder.receive_hello(initiator.hello())
    initiator.receive_response(response)
    fails("state", lambda: initiator.receive_response(response))


def test_responder_out_of_order() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    hello = initiator.hello()
    responder = HandshakeResponder(BOB)
    fails("state", lambda: responder.receive_finish(b""))
    fails("state", lambda: responder.receive_hello(hello))

    responder = HandshakeResponder(BOB)
    response = responder.receive_hello(hello)
    fails("state", lambda: responder.receive_hello(hello))
    fails("state", lambda: responder.receive_finish(initiator.receive_response(response)))

    responder = HandshakeResponder(BOB)
    responder.receive_hello(HandshakeInitiator(ALICE, BOB.peer_id).hello())
    fails("state", lambda: responder.reject("busy"))

    done = HandshakeResponder(BOB)
    run(HandshakeInitiator(ALICE, BOB.peer_id), done)
    fails("state", lambda: done.reject("busy"))
    fails("state", lambda: done.receive_finish(b""))


def test_any_error_is_final() -> None:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id)
    initiator.hello()
    fails("malformed", lambda: initiator.receive_response(b"junk"))
    good = HandshakeResponder(BOB).receive_hello(
        HandshakeInitiator(ALICE, BOB.peer_id, ephemeral_secret=bytes(32)).hello()
    )
    fails("state", lambda: initiator.receive_response(good))
    assert initiator.result is None


# -- fuzzing: only ProtocolError may escape ---------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_I = HandshakeInitiator(ALICE, BOB.peer_id, ephemeral_secret=bytes([7]) * 32)
_R = HandshakeResponder(BOB, ephemeral_secret=bytes([8]) * 32)
HELLO, RESPONSE, FINISH, _ = run(_I, _R)
REJECT = HandshakeResponder(BOB).reject("busy")


def _initiator_after_hello() -> HandshakeInitiator:
    initiator = HandshakeInitiator(ALICE, BOB.peer_id, ephemeral_secret=bytes([7]) * 32)
    assert initiator.hello() == HELLO
    return initiator


def _responder_after_hello() -> HandshakeResponder:
    responder = HandshakeResponder(BOB, ephemeral_secret=bytes([8]) * 32)
    assert responder.receive_hello(HELLO) == RESPONSE
    return responder


def _only_protocol_errors(call: Callable[[bytes], Any], message: bytes) -> bool:
    try:
        call(message)
    except ProtocolError:
        return False
    return True


@FUZZ
@given(message=st.binary(max_size=1100))
def test_fuzz_random_bytes_both_sides(message: bytes) -> None:
    _only_protocol_errors(HandshakeResponder(BOB).receive_hello, message)
    _only_protocol_errors(_initiator_after_hello().receive_response, message)
    _only_protocol_errors(_responder_after_hello().receive_finish, message)


@FUZZ
@given(message=mutated(HELLO))
def test_fuzz_mutated_hello(message: bytes) -> None:
    _only_protocol_errors(HandshakeResponder(BOB).receive_hello, message)


@FUZZ
@given(message=st.one_of(mutated(RESPONSE), mutated(REJECT)))
def test_fuzz_mutated_response(message: bytes) -> None:
    if _only_protocol_errors(_initiator_after_hello().receive_response, message):
        # Any change to what the signature covers is refused; only another msgpack encoding of
        # the same fields can pass here (and then fails at the responder, whose transcript
        # differs).
        assert msgspec.msgpack.decode(message) == msgspec.msgpack.decode(RESPONSE)


@FUZZ
@given(message=mutated(FINISH))
def test_fuzz_mutated_finish(message: bytes) -> None:
    if _only_protocol_errors(_responder_after_hello().receive_finish, message):
        assert msgspec.msgpack.decode(message) == msgspec.msgpack.decode(FINISH)
