"""The committed protocol vectors: current, reproduced byte for byte, and accepted."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from moshpit_trio.errors import ProtocolError
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.wire.envelope import Direction, EnvelopeOpener, EnvelopeSealer, Kind
from moshpit_trio.wire.handshake import (
    HandshakeInitiator,
    HandshakeRejected,
    HandshakeResponder,
)

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"


def _load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KEYS = {k["name"]: k for k in _load("keys.json")["keys"]}
HANDSHAKE = _load("handshake.json")
ENVELOPES = _load("envelopes.json")


def ident(name: str) -> Identity:
    return Identity.from_seed(bytes.fromhex(KEYS[name]["seed"]))


def test_committed_files_are_what_the_generator_writes() -> None:
    for name, text in _generator().build().items():
        assert (VECTORS / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python protocol/vectors/generate.py"
        )


@pytest.mark.parametrize("name", sorted(KEYS))
def test_keys(name: str) -> None:
    key = KEYS[name]
    identity = ident(name)
    assert identity.public_key.hex() == key["public_key"]
    assert identity.peer_id.to_bytes().hex() == key["peer_id"]
    assert str(identity.peer_id) == key["peer_id_text"]
    assert PeerID.from_text(key["peer_id_text"]) == identity.peer_id
    assert PeerID.from_public_key(bytes.fromhex(key["public_key"])) == identity.peer_id


I_SECRET = bytes.fromhex(HANDSHAKE["initiator_ephemeral_secret"])
R_SECRET = bytes.fromhex(HANDSHAKE["responder_ephemeral_secret"])
KEY_I2R = bytes.fromhex(HANDSHAKE["key_initiator_to_responder"])
KEY_R2I = bytes.fromhex(HANDSHAKE["key_responder_to_initiator"])
I2R = Direction.INITIATOR_TO_RESPONDER


def test_handshake_reproduced_byte_for_byte() -> None:
    initiator = HandshakeInitiator(
        ident(HANDSHAKE["initiator"]),
        ident(HANDSHAKE["responder"]).peer_id,
        ephemeral_secret=I_SECRET,
    )
    responder = HandshakeResponder(ident(HANDSHAKE["responder"]), ephemeral_secret=R_SECRET)
    hello = initiator.hello()
    assert hello.hex() == HANDSHAKE["hello"]
    response = responder.receive_hello(hello)
    assert response.hex() == HANDSHAKE["response"]
    finish = initiator.receive_response(response)
    assert finish.hex() == HANDSHAKE["finish"]
    result = responder.receive_finish(finish)
    assert result.session.hex() == HANDSHAKE["session"]
    assert initiator.result is not None
    assert initiator.result.session == result.session
    assert (initiator.result.keys.send, initiator.result.keys.receive) == (KEY_I2R, KEY_R2I)
    assert (result.keys.send, result.keys.receive) == (KEY_R2I, KEY_I2R)


def test_handshake_vectors_accepted_by_each_side() -> None:
    """Each side, fed the other side's recorded messages (and its own recorded ephemeral
    secret), accepts and derives the recorded keys."""
    alice, bob = ident(HANDSHAKE["initiator"]), ident(HANDSHAKE["responder"])
    responder = HandshakeResponder(bob, ephemeral_secret=R_SECRET)
    responder.receive_hello(bytes.fromhex(HANDSHAKE["hello"]))
    result = responder.receive_finish(bytes.fromhex(HANDSHAKE["finish"]))
    assert result.remote_peer_id == alice.peer_id
    assert result.remote_public_key == alice.public_key
    assert result.keys.receive == KEY_I2R

    initiator = HandshakeInitiator(alice, bob.peer_id, ephemeral_secret=I_SECRET)
    initiator.hello()
    initiator.receive_response(bytes.fromhex(HANDSHAKE["response"]))
    assert initiator.result is not None
    assert initiator.result.session.hex() == HANDSHAKE["session"]
    assert initiator.result.remote_peer_id == bob.peer_id
    assert initiator.result.keys.send == KEY_I2R


def test_handshake_rejects() -> None:
    alice, bob = ident("alice"), ident("bob")
    wrong = HANDSHAKE["wrong_peer"]
    responder = HandshakeResponder(bob, ephemeral_secret=R_SECRET)
    with pytest.raises(HandshakeRejected) as info:
        responder.receive_hello(bytes.fromhex(wrong["hello"]))
    assert info.value.reason == "wrong-peer"
    assert info.value.reply.hex() == wrong["reject"]

    busy = HandshakeResponder(bob).reject(HANDSHAKE["busy"]["reason"])
    assert busy.hex() == HANDSHAKE["busy"]["reject"]

    for reject, text in ((wrong["reject"], "wrong-peer: "), (HANDSHAKE["busy"]["reject"], "busy")):
        initiator = HandshakeInitiator(alice, bob.peer_id)
        initiator.hello()
        with pytest.raises(ProtocolError) as err:
            initiator.receive_response(bytes.fromhex(reject))
        assert err.value.reason == "rejected"
        assert err.value.detail.startswith(text)


def _opener(session: bytes) -> EnvelopeOpener:
    alice, bob = ident(ENVELOPES["sender"]), ident(ENVELOPES["recipient"])
    return EnvelopeOpener(KEY_I2R, session, alice.peer_id, bob.peer_id, direction=I2R)


def test_envelopes_reproduced_and_opened() -> None:
    session = bytes.fromhex(ENVELOPES["session"])
    assert ENVELOPES["session"] == HANDSHAKE["session"]
    sealer = EnvelopeSealer(
        ident("alice").peer_id, session, ident("bob").peer_id, KEY_I2R, direction=I2R
    )
    opener = _opener(session)
    kinds = set()
    for vector in ENVELOPES["valid"]:
        payload = bytes.fromhex(vector["payload"])
        # The recorded nonce and associated data open the sealed part with any AES-GCM.
        message = bytes.fromhex(vector["message"])
        head = bytes.fromhex(vector["head"])
        assert message.startswith(head)
        plain = AESGCM(KEY_I2R).decrypt(
            bytes.fromhex(vector["nonce"]),
            message[len(head) :],
            bytes.fromhex(vector["associated_data"]),
        )
        assert plain == vector["name"].encode() + payload
        kind = Kind(vector["kind_value"])
        assert kind.name == vector["kind"]
        message = sealer.seal(
            kind,
            vector["call_id"],
            payload,
            deadline_ms=vector["deadline_ms"],
            name=vector["name"],
        )
        assert message.hex() == vector["message"], vector["kind"]
        envelope = opener.open(bytes.fromhex(vector["message"]))
        assert envelope.kind is kind
        assert envelope.seq == vector["seq"]
        assert envelope.call_id == vector["call_id"]
        assert envelope.deadline_ms == vector["deadline_ms"]
        assert envelope.name == vector["name"]
        assert bytes(envelope.payload) == payload
        kinds.add(kind)
    assert kinds == set(Kind)


@pytest.mark.parametrize(
    "vector", ENVELOPES["invalid"], ids=[v["description"] for v in ENVELOPES["invalid"]]
)
def test_invalid_envelopes(vector: dict[str, Any]) -> None:
    opener = _opener(bytes.fromhex(ENVELOPES["session"]))
    message = bytes.fromhex(vector["message"])
    if vector["reason"] is None:
        assert opener.open(message).seq == 1
        return
    with pytest.raises(ProtocolError) as info:
        opener.open(message)
    assert info.value.reason == vector["reason"]
