"""Write the moshpit/1 test vectors (keys.json, handshake.json, envelopes.json) next to this file.

Run ``python protocol/vectors/generate.py``. Everything is deterministic (keys from fixed seeds,
ephemeral X25519 keys from fixed secrets, and Ed25519 signatures and blake3 are deterministic), so
running it again rewrites the same bytes; tests/test_vectors.py checks both that the files are
current and that the code reproduces and accepts every vector. See protocol/SPEC.md for what
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

import blake3  # noqa: E402
import msgspec  # noqa: E402

from moshpit_trio.identity import Identity  # noqa: E402
from moshpit_trio.wire.envelope import ENVELOPE_DOMAIN, EnvelopeSealer, Kind  # noqa: E402
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
# A key nobody in the handshake holds: MACs under it must be refused.
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
        "The nonces are X25519 public keys of the ephemeral secrets; the MAC keys are derived "
        "from their shared secret and the session id",
        "initiator": "alice",
        "responder": "bob",
        "initiator_ephemeral_secret": INITIATOR_EPHEMERAL.hex(),
        "responder_ephemeral_secret": RESPONDER_EPHEMERAL.hex(),
        "hello": hello.hex(),
        "response": response.hex(),
        "finish": finish.hex(),
        "session": result.session.hex(),
        "mac_key_initiator_to_responder": result.keys.receive.hex(),
        "mac_key_responder_to_initiator": result.keys.send.hex(),
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


def _forge(key: bytes, fields: list[Any], payload: bytes) -> bytes:
    """An envelope with an arbitrary header and its MAC under ``key``: for the must-reject
    vectors."""
    header = msgspec.msgpack.encode(fields)
    mac = blake3.blake3(ENVELOPE_DOMAIN + header, key=key).digest()
    return len(header).to_bytes(2, "big") + header + mac + payload


def envelopes(session: bytes, key: bytes, reverse_key: bytes) -> dict[str, Any]:
    """``key``: alice -> bob's MAC key; ``reverse_key``: bob -> alice's."""
    alice, bob, carol = _ident("alice"), _ident("bob"), _ident("carol")
    sealer = EnvelopeSealer(alice.peer_id, session, bob.peer_id, key)
    valid = []
    for spec in ENVELOPES:
        message = sealer.seal(
            Kind[spec["kind"]],
            spec["call_id"],
            spec["payload"],
            deadline_ms=spec.get("deadline_ms", 0),
            name=spec.get("name", ""),
        )
        valid.append(
            {
                "kind": spec["kind"],
                "kind_value": int(Kind[spec["kind"]]),
                "seq": sealer.last_seq,
                "call_id": spec["call_id"],
                "deadline_ms": spec.get("deadline_ms", 0),
                "name": spec.get("name", ""),
                "payload": spec["payload"].hex(),
                "payload_hash": blake3.blake3(spec["payload"]).digest().hex(),
                "message": message.hex(),
            }
        )

    def fields(**changes: Any) -> list[Any]:
        base: dict[str, Any] = {
            "version": 1,
            "kind": int(Kind.RESPONSE),
            "session": session,
            "sender": alice.peer_id.to_bytes(),
            "recipient": bob.peer_id.to_bytes(),
            "seq": 1,
            "call_id": 5,
            "deadline_ms": 0,
            "name": "",
            "payload_len": 2,
            "payload_hash": blake3.blake3(b"ok").digest(),
        }
        base.update(changes)
        return list(base.values())

    good = _forge(key, fields(), b"ok")
    header_size = int.from_bytes(good[:2], "big")
    flipped_mac = bytearray(good)
    flipped_mac[2 + header_size] ^= 0x01
    long_name = "n" * 129
    invalid = [
        ("a correct envelope, for reference", good, None),
        ("payload changed after sealing", good[:-2] + b"OK", "hash"),
        ("one MAC bit flipped", bytes(flipped_mac), "mac"),
        ("MAC under a key outside the session", _forge(STRANGER_KEY, fields(), b"ok"), "mac"),
        (
            "MAC under bob -> alice's key (reflected)",
            _forge(reverse_key, fields(), b"ok"),
            "mac",
        ),
        (
            "carol's envelope on alice's connection",
            _forge(key, fields(sender=carol.peer_id.to_bytes()), b"ok"),
            "sender",
        ),
        (
            "addressed to carol",
            _forge(key, fields(recipient=carol.peer_id.to_bytes()), b"ok"),
            "recipient",
        ),
        ("from another session", _forge(key, fields(session=bytes(32)), b"ok"), "session"),
        ("seq 2 where 1 is expected", _forge(key, fields(seq=2), b"ok"), "seq"),
        ("seq 0", _forge(key, fields(seq=0), b"ok"), "seq"),
        ("version 2", _forge(key, fields(version=2), b"ok"), "version"),
        ("kind 10", _forge(key, fields(kind=10), b"ok"), "kind"),
        ("payload_len 3 for 2 bytes", _forge(key, fields(payload_len=3), b"ok"), "malformed"),
        ("negative call_id", _forge(key, fields(call_id=-1), b"ok"), "malformed"),
        ("name on a RESPONSE", _forge(key, fields(name="x"), b"ok"), "malformed"),
        ("header of 10 fields", _forge(key, fields()[:10], b"ok"), "malformed"),
        (
            "call name of 129 bytes",
            _forge(key, fields(kind=int(Kind.REQUEST), name=long_name), b"ok"),
            "too-large",
        ),
        (
            "CANCEL with a payload",
            _forge(key, fields(kind=int(Kind.CANCEL)), b"ok"),
            "too-large",
        ),
        (
            "STREAM_CREDIT of 2 bytes",
            _forge(key, fields(kind=int(Kind.STREAM_CREDIT)), b"ok"),
            "malformed",
        ),
        ("header length 600 (over 512)", (600).to_bytes(2, "big") + bytes(700), "too-large"),
        ("one byte", b"\x00", "malformed"),
        ("header length past the end", good[:20], "malformed"),
    ]
    return {
        "description": "alice -> bob envelopes in the session of handshake.json, under its "
        "mac_key_initiator_to_responder. 'valid' must "
        "open in order with one opener and reproduce byte for byte; each 'invalid' message is "
        "opened by a fresh opener (expecting seq 1) and must fail with 'reason' (null: opens)",
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
            bytes.fromhex(hs["mac_key_initiator_to_responder"]),
            bytes.fromhex(hs["mac_key_responder_to_initiator"]),
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
