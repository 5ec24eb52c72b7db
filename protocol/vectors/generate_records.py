"""Write the DHT record test vectors (records.json) next to this file.

Run ``python protocol/vectors/generate_records.py``. Everything is deterministic (keys from the
seeds of keys.json, a fixed ``now``, and Ed25519 signatures are deterministic), so running it
again rewrites the same bytes; tests/test_dht_records.py checks that the file is current and
that the code reproduces, accepts and refuses every vector. See protocol/SPEC.md ("DHT
records") for what the bytes mean.
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

from moshpit_trio.dht.records import (  # noqa: E402
    NamespacePolicy,
    Namespaces,
    Record,
    encode_records,
    key_id,
    make_record,
    namespace_of,
    newer,
    record_message,
)
from moshpit_trio.identity import Identity  # noqa: E402

HERE = Path(__file__).resolve().parent

# The seeds of keys.json.
SEEDS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}
NOW = 1_700_000_000.0
MAX_CLOCK_SKEW = 30.0
POLICIES = [
    NamespacePolicy(b"mp.avg", max_ttl=600.0, owned=True, max_value_size=1024, max_subkeys=64),
    NamespacePolicy(b"run", max_ttl=3600.0, max_value_size=16, max_subkeys=4),
]
KEYS = [b"hello", b"mp.avg/run1/g03/r17", b"run/progress", b"a/b/c", b"/leading-slash", b"\xff"]


def _ident(name: str) -> Identity:
    return Identity.from_seed(SEEDS[name])


def _record_json(record: Record) -> dict[str, Any]:
    return {
        "key": record.key.hex(),
        "subkey": record.subkey.hex(),
        "value": record.value.hex(),
        "expiration": record.expiration,
        "owner_key": record.owner_key.hex(),
        "signature": record.signature.hex(),
    }


def _policy_json(policy: NamespacePolicy) -> dict[str, Any]:
    return {
        "namespace": policy.namespace.hex(),
        "max_ttl": float(policy.max_ttl),
        "owned": policy.owned,
        "max_value_size": policy.max_value_size,
        "max_subkeys": policy.max_subkeys,
    }


def _raw(*fields: Any) -> bytes:
    """A one-record message with arbitrary fields (for the must-refuse vectors)."""
    return msgspec.msgpack.encode([list(fields)])


def records() -> dict[str, Any]:
    alice, bob, carol = _ident("alice"), _ident("bob"), _ident("carol")
    avg = b"mp.avg/run1/g03/r17"
    valid = [
        ("a plain value", make_record(b"hello", b"world", NOW + 60)),
        (
            "an unowned record under a subkey",
            make_record(b"run/progress", b"42", NOW + 3600, subkey=b"w1"),
        ),
        ("alice's announcement (owned)", make_record(avg, b"\x92\x01\x02", NOW + 120, owner=alice)),
        ("bob's announcement under the same key", make_record(avg, b"bob", NOW + 90.5, owner=bob)),
        ("alice withdraws (a tombstone, later)", make_record(avg, b"", NOW + 121, owner=alice)),
        (
            "a signed record in an unowned namespace",
            make_record(b"hello", b"signed", NOW + 60, owner=carol),
        ),
        (
            "expiration at the TTL cap plus skew",
            make_record(b"run/x", b"", NOW + 3600 + MAX_CLOCK_SKEW),
        ),
    ]
    valid_json = []
    for description, record in valid:
        entry = {"description": description, **_record_json(record)}
        entry["signed_message"] = (
            record_message(record.key, record.subkey, record.value, record.expiration).hex()
            if record.signature
            else ""
        )
        entry["message"] = encode_records([record]).hex()
        valid_json.append(entry)

    good = valid[2][1]  # alice's announcement
    forged_sig = bytearray(good.signature)
    forged_sig[0] ^= 0x01
    alice_on_bob = make_record(avg, b"x", NOW + 100, owner=alice)
    invalid: list[tuple[str, bytes, str]] = [
        ("empty key", _raw(b"", b"", b"v", NOW + 60, b"", b""), "malformed"),
        ("key of 257 bytes", _raw(b"k" * 257, b"", b"v", NOW + 60, b"", b""), "too-large"),
        ("subkey of 65 bytes", _raw(b"hello", b"s" * 65, b"v", NOW + 60, b"", b""), "subkey"),
        (
            "value over the namespace's 16 bytes",
            _raw(b"run/x", b"", b"v" * 17, NOW + 60, b"", b""),
            "too-large",
        ),
        ("expired exactly now", _raw(b"hello", b"", b"v", NOW, b"", b""), "expired"),
        ("expires in a year", _raw(b"hello", b"", b"v", NOW + 365 * 86400, b"", b""), "ttl"),
        (
            "just over the TTL cap plus skew",
            _raw(b"run/x", b"", b"v", NOW + 3630.5, b"", b""),
            "ttl",
        ),
        (
            "owned namespace, unsigned",
            _raw(avg, bytes(alice.peer_id), b"v", NOW + 60, b"", b""),
            "owner",
        ),
        (
            "owned namespace, empty subkey",
            _raw(avg, b"", b"v", NOW + 60, alice.public_key, good.signature),
            "subkey",
        ),
        (
            "alice's signed record under bob's subkey",
            _raw(
                avg, bytes(bob.peer_id), b"x", NOW + 100, alice.public_key, alice_on_bob.signature
            ),
            "owner",
        ),
        (
            "alice's record with one signature bit flipped",
            _raw(
                good.key,
                good.subkey,
                good.value,
                good.expiration,
                good.owner_key,
                bytes(forged_sig),
            ),
            "signature",
        ),
        (
            "alice's record with its value changed",
            _raw(good.key, good.subkey, b"evil", good.expiration, good.owner_key, good.signature),
            "signature",
        ),
        (
            "alice's record with a later expiration",
            _raw(
                good.key,
                good.subkey,
                good.value,
                good.expiration + 1,
                good.owner_key,
                good.signature,
            ),
            "signature",
        ),
        (
            "a withdrawal of alice's entry signed by carol with alice's key named",
            _raw(
                avg,
                bytes(alice.peer_id),
                b"",
                NOW + 200,
                alice.public_key,
                carol.sign(record_message(avg, bytes(alice.peer_id), b"", NOW + 200)),
            ),
            "signature",
        ),
        (
            "owner_key without signature",
            _raw(b"hello", b"", b"v", NOW + 60, carol.public_key, b""),
            "owner",
        ),
        (
            "signature of 63 bytes",
            _raw(b"hello", b"", b"v", NOW + 60, carol.public_key, bytes(63)),
            "signature",
        ),
        (
            "owner_key of 31 bytes",
            _raw(b"hello", b"", b"v", NOW + 60, bytes(31), bytes(64)),
            "owner",
        ),
    ]
    bad_messages: list[tuple[str, bytes, str]] = [
        ("not an array", msgspec.msgpack.encode({"key": b"k"}), "malformed"),
        ("empty input", b"", "malformed"),
        ("a record of 5 fields", _raw(b"hello", b"", b"v", NOW + 60, b""), "malformed"),
        ("a record of 7 fields", _raw(b"hello", b"", b"v", NOW + 60, b"", b"", b""), "malformed"),
        ("a str where bin belongs", _raw("hello", b"", b"v", NOW + 60, b"", b""), "malformed"),
        ("expiration NaN", _raw(b"hello", b"", b"v", float("nan"), b"", b""), "malformed"),
        ("expiration true", _raw(b"hello", b"", b"v", True, b"", b""), "malformed"),
        ("bytes after the array", encode_records([valid[0][1]]) + b"\x00", "malformed"),
        ("an array claiming 1025 records", b"\xdc\x04\x01", "too-large"),
    ]
    messages_json = [
        {"description": d, "message": m.hex(), "reason": r} for d, m, r in bad_messages
    ]
    messages_json.append(
        {
            "description": "every valid record above in one message",
            "message": encode_records([r for _, r in valid]).hex(),
            "reason": None,
        }
    )
    messages_json.append(
        {
            "description": "an expiration sent as a msgpack int decodes as the same float",
            "message": _raw(b"hello", b"", b"v", int(NOW) + 60, b"", b"").hex(),
            "reason": None,
        }
    )

    # Conflicts: same key and subkey; the winner is the later expiration, then the larger
    # (value, signature) compared as byte strings.
    pairs = [
        (
            "later expiration wins",
            make_record(b"hello", b"a", NOW + 61),
            make_record(b"hello", b"b", NOW + 60),
        ),
        (
            "equal expiration: larger value",
            make_record(b"hello", b"b", NOW + 60),
            make_record(b"hello", b"ab", NOW + 60),
        ),
        (
            "equal expiration: longer value with the same prefix",
            make_record(b"hello", b"ab", NOW + 60),
            make_record(b"hello", b"a", NOW + 60),
        ),
        (
            "a tombstone wins only by a later expiration",
            make_record(avg, b"", NOW + 121, owner=alice),
            good,
        ),
        (
            "a tombstone loses at equal expiration",
            good,
            make_record(avg, b"", NOW + 120, owner=alice),
        ),
        (
            "equal expiration and value: larger signature",
            make_record(b"hello", b"v", NOW + 60, owner=carol),
            make_record(b"hello", b"v", NOW + 60, subkey=bytes(carol.peer_id)),
        ),
    ]
    conflicts = []
    for description, a, b in pairs:
        assert (a.key, a.subkey) == (b.key, b.subkey) and newer(a, b), description
        conflicts.append(
            {
                "description": description,
                "a": encode_records([a]).hex(),
                "b": encode_records([b]).hex(),
                "winner": "a",
            }
        )

    namespaces = Namespaces(POLICIES)
    return {
        "description": "DHT records. key_ids: key_id and namespace of each key. Under the "
        "'policies' (any other namespace: 'default_policy') at 'now' with 'max_clock_skew': "
        "each 'valid' record is reproduced byte for byte ('message' is the one-record message "
        "encode_records([record]), 'signed_message' what its owner signed) and passes "
        "validation; each 'invalid' one-record message decodes and then fails validation with "
        "'reason'; each 'messages' entry fails decode_records with 'reason' (null: decodes). In "
        "each 'conflicts' pair (same key and subkey) 'a' wins over 'b' in either order. Byte "
        "strings are hex.",
        "now": NOW,
        "max_clock_skew": MAX_CLOCK_SKEW,
        "default_policy": _policy_json(namespaces.policy_for(b"no-such-namespace/x")),
        "policies": [_policy_json(p) for p in POLICIES],
        "key_ids": [
            {"key": k.hex(), "key_id": key_id(k).hex(), "namespace": namespace_of(k).hex()}
            for k in KEYS
        ],
        "signers": {name: _ident(name).public_key.hex() for name in SEEDS},
        "valid": valid_json,
        "invalid": [{"description": d, "message": m.hex(), "reason": r} for d, m, r in invalid],
        "messages": messages_json,
        "conflicts": conflicts,
    }


def build() -> dict[str, str]:
    """The text of every vector file this script writes, by file name."""
    return {"records.json": json.dumps(records(), indent=2, ensure_ascii=False) + "\n"}


def main() -> None:
    for name, text in build().items():
        (HERE / name).write_text(text, encoding="utf-8")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
