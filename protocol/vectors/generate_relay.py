"""Write the relay test vectors (relay.json) next to this file.

Run ``python protocol/vectors/generate_relay.py``. Everything is fixed (PeerIDs from the seeds
of keys.json, a fixed circuit id), so running it again rewrites the same bytes;
tests/test_relay_vectors.py checks that the file is current, that the code reproduces every
message, and that it refuses every invalid one. See protocol/SPEC.md ("Relay").
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

from moshpit_trio.identity import Identity  # noqa: E402
from moshpit_trio.relays import encode_relays  # noqa: E402
from moshpit_trio.wire.address import PeerAddress  # noqa: E402
from moshpit_trio.wire.relay import (  # noqa: E402
    answer,
    connect_request,
    incoming_request,
    pipe_header,
    reserve_request,
)

HERE = Path(__file__).resolve().parent
SEEDS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}
CIRCUIT = bytes(range(16))


def build() -> dict[str, Any]:
    ids = {name: Identity.from_seed(seed).peer_id for name, seed in SEEDS.items()}
    alice, bob, carol = ids["alice"], ids["bob"], ids["carol"]
    # alice wants carol (client mode), who reserved on bob (the relay)
    relay = PeerAddress("relay.example.org", 7070, bob)
    messages = [
        ("reserve", "carol -> bob: relay.reserve, 120 s", reserve_request(120_000)),
        ("answer", "bob -> carol: granted 120 s", answer("ok", "", 120_000)),
        ("connect", "alice -> bob: relay.connect to carol", connect_request(carol, CIRCUIT)),
        (
            "incoming",
            "bob -> carol: relay.incoming from alice, 3600 s",
            incoming_request(alice, CIRCUIT, 3_600_000),
        ),
        ("answer", "carol -> bob, bob -> alice: ok", answer("ok", "", 3_600_000)),
        (
            "answer",
            "a refusal",
            answer("no-reservation", f"{carol.short} has no reservation here"),
        ),
        ("pipe", "header of relay.up and relay.down", pipe_header(CIRCUIT)),
    ]
    enc = msgspec.msgpack.encode
    invalid = [
        ("reserve", "a boolean is not an int", enc([True])),
        ("reserve", "two elements", enc([1, 2])),
        ("connect", "a str where a bin goes", enc([str(carol), CIRCUIT])),
        ("connect", "bytes after the array", connect_request(carol, CIRCUIT) + b"\x00"),
        ("incoming", "a float lifetime", enc([alice.to_bytes(), CIRCUIT, 1.5])),
        ("answer", "a bin status", enc([b"ok", "", 1])),
        ("pipe", "not an array", enc(CIRCUIT)),
    ]
    return {
        "description": "relay messages (SPEC.md 'Relay'); PeerIDs of keys.json",
        "peers": {name: pid.to_bytes().hex() for name, pid in ids.items()},
        "circuit": CIRCUIT.hex(),
        "messages": [
            {"message": kind, "what": what, "hex": data.hex()} for kind, what, data in messages
        ],
        # Sizes are the receiver's next check, after decoding (a 15-byte circuit id decodes).
        "invalid": [
            {"message": kind, "what": what, "hex": data.hex()} for kind, what, data in invalid
        ],
        "record": {
            "key": f"mp.relay/{carol}",
            "relays": [str(relay)],
            "value_hex": encode_relays([relay]).hex(),
        },
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    (HERE / "relay.json").write_text(render())
