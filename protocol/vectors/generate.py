"""Write the moshpit/1 test vectors (keys.json, handshake.json, envelopes.json) next to this file.

Run ``python protocol/vectors/generate.py``. Everything is deterministic (keys from fixed seeds,
ephemeral X25519 keys from fixed secrets, Ed25519 signatures and HKDF are deterministic, and
AES-GCM's nonces are the envelopes' sequence numbers), so running it again rewrites the same
bytes; tests/test_vectors.py checks both that the files are current and that the code
reproduces and accepts every vector. See protocol/SPEC.md for what
the bytes mean.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(_ROOT))

import msgspec  # noqa: E402
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402

from moshpit_trio.identity import Identity  # noqa: E402
from moshpit_trio.wire.envelope import (  # noqa: E402
    ENVELOPE_DOMAIN,
    VERSION,
    Direction,
    EnvelopeSealer,
    Kind,
)
from moshpit_trio.wire.handshake import (  # noqa: E402
    HandshakeInitiator,
    HandshakeRejected,
    HandshakeResponder,
    HandshakeResult,
)

HERE = Path(__file__).resolve().parent

SEEDS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}
# The ephemeral X25519 private keys; the nonces on the wire are their public keys.
INITIATOR_EPHEMERAL = bytes(range(32))
RESPONDER_EPHEMERAL = bytes(range(32, 64))
# A key nobody in the handshake holds: envelopes sealed under it must be refused.
STRANGER_KEY = bytes([9]) * 32


def _ident(name: str) -> Identity:
    return Identity.from_seed(SEEDS[name])


def keys() -> dict[str, Any]:
    out = []
    for name, seed in SEEDS.items():
        ident = Identity.from_seed(seed)
        out.append(
            {
                "name": name,
                "seed": seed.hex(),
                "public_key": ident.public_key.hex(),
                "peer_id": ident.peer_id.to_bytes().hex(),
                "peer_id_text": str(ident.peer_id),
            }
        )
    return {
        "description": "Ed25519 keys from 32-byte seeds; PeerID = sha256(public key); "
        "text form = 'mp' + lowercase unpadded base32 of the PeerID",
        "keys": out,
    }


def _handshake() -> tuple[bytes, bytes, bytes, HandshakeResult]:
    alice, bob = _ident("alice"), _ident("bob")
    initiator = HandshakeInitiator(alice, bob.peer_id, ephemeral_secret=INITIATOR_EPHEMERAL)
    responder = HandshakeResponder(bob, ephemeral_secret=RESPONDER_EPHEMERAL)
    hello = initiator.hello()
    response = responder.receive_hello(hello)
    finish = initiator.receive_response(response)
    result = responder.receive_finish(finish)
    assert initiator.result is not None and initiator.result.session == result.session
    assert initiator.result.keys.send == result.keys.receive
    return hello, response, finish, result


def handshake() -> dict[str, Any]:
    alice, bob = _ident("alice"), _ident("bob")
    hello, response, finish, result = _handshake()
    # alice expects carol but reaches bob, who refuses.
    wrong_hello = HandshakeInitiator(
        alice, _ident("carol").peer_id, ephemeral_secret=INITIATOR_EPHEMERAL
    ).hello()
    try:
        HandshakeResponder(bob, ephemeral_secret=RESPONDER_EPHEMERAL).receive_hello(wrong_hello)
    except HandshakeRejected as exc:
        wrong_reject = exc.reply
    else:
        raise AssertionError("bob accepted a HELLO meant for carol")
    busy_reject = HandshakeResponder(bob, ephemeral_secret=RESPONDER_EPHEMERAL).reject("busy")
    return {
        "description": "alice (initiator) authenticates bob (responder); byte strings are hex. "
        "The nonces are X25519 public keys of the ephemeral secrets; the envelope keys are "
        "HKDF-SHA256 of their shared secret, salted with the session id",
        "initiator": "alice",
        "responder": "bob",
        "initiator_ephemeral_secret": INITIATOR_EPHEMERAL.hex(),
        "responder_ephemeral_secret": RESPONDER_EPHEMERAL.hex(),
        "hello": hello.hex(),
        "response": response.hex(),
        "finish": finish.hex(),
        "session": result.session.hex(),
        "key_initiator_to_responder": result.keys.receive.hex(),
        "key_responder_to_initiator": result.keys.send.hex(),
        "wrong_peer": {
            "description": "alice expects carol but reaches bob; bob answers with this REJECT",
            "hello": wrong_hello.hex(),
            "reject": wrong_reject.hex(),
        },
        "busy": {"reason": "busy", "reject": busy_reject.hex()},
    }


# The valid envelopes: alice -> bob in the session of handshake.json, opened in this order.
ENVELOPES: list[dict[str, Any]] = [
    {"kind": "REQUEST", "call_id": 1, "deadline_ms": 30000, "name": "dht.ping", "payload": b""},
    {"kind": "RESPONSE", "call_id": 7, "payload": b"pong"},
    {
        "kind": "ERROR",
        "call_id": 8,
        "payload": msgspec.msgpack.encode({"code": "unknown-handler", "message": "no such call"}),
    },
    {
        "kind": "STREAM_OPEN",
        "call_id": 2,
        "deadline_ms": 60000,
        "name": "avg.part",
        "payload": b"\x81\xa4span\x03",
    },
    {"kind": "STREAM_DATA", "call_id": 2, "payload": bytes(range(256)) * 4},
    {"kind": "STREAM_CREDIT", "call_id": 2, "payload": (1 << 20).to_bytes(8, "big")},
    {"kind": "STREAM_END", "call_id": 2, "payload": b""},
    {"kind": "CANCEL", "call_id": 1, "payload": b""},
    {"kind": "REQUEST", "call_id": 2**64 - 1, "deadline_ms": 1, "name": "ünïcode", "payload": b"x"},
    {"kind": "GOODBYE", "call_id": 0, "payload": b"shutting down"},
]


def _nonce(seq: int, direction: Direction = Direction.INITIATOR_TO_RESPONDER) -> bytes:
    return int(direction).to_bytes(4, "big") + seq.to_bytes(8, "big")


def _associated(session: bytes, sender: bytes, recipient: bytes, head: bytes) -> bytes:
    return ENVELOPE_DOMAIN + session + sender + recipient + head


def envelopes(session: bytes, key: bytes, reverse_key: bytes) -> dict[str, Any]:
    """``key``: alice -> bob's envelope key; ``reverse_key``: bob -> alice's."""
    alice, bob, carol = _ident("alice"), _ident("bob"), _ident("carol")
    a_id, b_id = alice.peer_id.to_bytes(), bob.peer_id.to_bytes()
    sealer = EnvelopeSealer(
        alice.peer_id, session, bob.peer_id, key, direction=Direction.INITIATOR_TO_RESPONDER
    )
    valid = []
    for spec in ENVELOPES:
        message = sealer.seal(
            Kind[spec["kind"]],
            spec["call_id"],
            spec["payload"],
            deadline_ms=spec.get("deadline_ms", 0),
            name=spec.get("name", ""),
        )
        head_size = 2 + int.from_bytes(message[:2], "big")
        valid.append(
            {
                "kind": spec["kind"],
                "kind_value": int(Kind[spec["kind"]]),
                "seq": sealer.last_seq,
                "call_id": spec["call_id"],
                "deadline_ms": spec.get("deadline_ms", 0),
                "name": spec.get("name", ""),
                "payload": spec["payload"].hex(),
                "head": message[:head_size].hex(),
                "nonce": _nonce(sealer.last_seq).hex(),
                "associated_data": _associated(session, a_id, b_id, message[:head_size]).hex(),
                "message": message.hex(),
            }
        )

    def forge(
        fields: list[Any],
        plain: bytes = b"ok",
        *,
        seal_key: bytes = key,
        seq: int = 1,
        direction: Direction = Direction.INITIATOR_TO_RESPONDER,
        sender: bytes = a_id,
        in_session: bytes = session,
    ) -> bytes:
        """An envelope with an arbitrary header, sealing ``plain`` (name + payload): for the
        must-refuse vectors."""
        header = msgspec.msgpack.encode(fields)
        head = len(header).to_bytes(2, "big") + header
        aad = _associated(in_session, sender, b_id, head)
        return head + AESGCM(seal_key).encrypt(_nonce(seq, direction), plain, aad)

    def fields(**changes: Any) -> list[Any]:
        base: dict[str, Any] = {
            "version": VERSION,
            "kind": int(Kind.RESPONSE),
            "seq": 1,
            "call_id": 5,
            "deadline_ms": 0,
            "name_len": 0,
            "payload_len": 2,
        }
        assert set(changes) <= set(base)
        base.update(changes)
        return list(base.values())

    def flipped(message: bytes, index: int) -> bytes:
        out = bytearray(message)
        out[index] ^= 0x01
        return bytes(out)

    good = forge(fields())
    head_size = 2 + int.from_bytes(good[:2], "big")
    other_call = msgspec.msgpack.encode(fields(call_id=6))
    request = {"kind": int(Kind.REQUEST), "deadline_ms": 100}
    invalid = [
        ("a correct envelope, for reference", good, None),
        ("one ciphertext bit flipped", flipped(good, head_size), "mac"),
        ("one tag bit flipped", flipped(good, -1), "mac"),
        (
            "call_id changed in the header (same size)",
            len(other_call).to_bytes(2, "big") + other_call + good[head_size:],
            "mac",
        ),
        ("sealed under a key outside the session", forge(fields(), seal_key=STRANGER_KEY), "mac"),
        (
            "sealed under bob -> alice's key (reflected)",
            forge(fields(), seal_key=reverse_key),
            "mac",
        ),
        (
            "the nonce of the other direction",
            forge(fields(), direction=Direction.RESPONDER_TO_INITIATOR),
            "mac",
        ),
        ("the nonce of seq 2 under seq 1", forge(fields(), seq=2), "mac"),
        ("sealed for another session", forge(fields(), in_session=bytes(32)), "mac"),
        (
            "carol's envelope on alice's connection",
            forge(fields(), sender=carol.peer_id.to_bytes()),
            "mac",
        ),
        ("seq 2 where 1 is expected", forge(fields(seq=2), seq=2), "seq"),
        ("seq 0", forge(fields(seq=0), seq=0), "seq"),
        ("version 1", forge(fields(version=1)), "version"),
        ("kind 10", forge(fields(kind=10)), "kind"),
        ("the last byte cut off", good[:-1], "truncated"),
        ("cut inside the header", good[:5], "truncated"),
        ("one byte too many", good + b"\x00", "malformed"),
        ("negative call_id", forge(fields(call_id=-1)), "malformed"),
        ("name_len on a RESPONSE", forge(fields(name_len=1), b"xok"), "malformed"),
        ("header of 6 fields", forge(fields()[:6]), "malformed"),
        (
            "REQUEST without a name",
            forge(fields(**request)),
            "malformed",
        ),
        (
            "call name of 129 bytes",
            forge(fields(**request, name_len=129), b"n" * 129 + b"ok"),
            "too-large",
        ),
        (
            "call name that is not UTF-8",
            forge(fields(**request, name_len=2), b"\xff\xfe" + b"ok"),
            "malformed",
        ),
        ("CANCEL with a payload", forge(fields(kind=int(Kind.CANCEL))), "too-large"),
        ("STREAM_CREDIT of 2 bytes", forge(fields(kind=int(Kind.STREAM_CREDIT))), "malformed"),
        ("header length 600 (over 64)", (600).to_bytes(2, "big") + bytes(700), "too-large"),
        ("one byte", b"\x00", "malformed"),
    ]
    return {
        "description": "alice -> bob envelopes in the session of handshake.json, under its "
        "key_initiator_to_responder (AES-256-GCM; nonce and associated data given for each "
        "valid one). 'valid' must open in order with one opener and reproduce byte for byte; "
        "each 'invalid' message is opened by a fresh opener (expecting seq 1) and must fail "
        "with 'reason' (null: opens)",
        "sender": "alice",
        "recipient": "bob",
        "session": session.hex(),
        "valid": valid,
        "invalid": [{"description": d, "message": m.hex(), "reason": r} for d, m, r in invalid],
    }


def build() -> dict[str, str]:
    """The text of every vector file, by file name."""
    hs = handshake()
    files = {
        "keys.json": keys(),
        "handshake.json": hs,
        "envelopes.json": envelopes(
            bytes.fromhex(hs["session"]),
            bytes.fromhex(hs["key_initiator_to_responder"]),
            bytes.fromhex(hs["key_responder_to_initiator"]),
        ),
    }
    return {
        name: json.dumps(data, indent=2, ensure_ascii=False) + "\n" for name, data in files.items()
    }


def main() -> None:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
