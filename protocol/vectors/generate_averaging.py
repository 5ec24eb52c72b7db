"""Write the averaging test vectors (averaging.json) next to this file.

Run ``python protocol/vectors/generate_averaging.py``. Everything is fixed (PeerIDs from fixed
seeds, the first three those of keys.json; a fixed ``now``; Ed25519 signatures are
deterministic), so running it again rewrites the same bytes. Every message comes from the
library's own encoders and every answer from its own code (the matchmaker's reader and its
leader's fix, ``partition.spans``, the codecs); tests/test_averaging_vectors.py checks that the
file is current, and that the code reproduces every vector byte for byte and refuses every
invalid one. See protocol/SPEC.md ("Averaging: matchmaking and all-reduce").
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(_ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import trio  # noqa: E402

from moshpit_trio.averaging.allreduce import (  # noqa: E402
    _PartHeader,
    _ResultHeader,
    no_span,
)
from moshpit_trio.averaging.auto_grid import block_of, directory_key, group_sizes  # noqa: E402
from moshpit_trio.averaging.compression import codec  # noqa: E402
from moshpit_trio.averaging.grid import Grid, group_indices, group_key_name, next_key  # noqa: E402
from moshpit_trio.averaging.matchmaking import (  # noqa: E402
    GroupInfo,
    Matchmaker,
    MemberInfo,
    _Attempt,
    _Join,
    group_id_of,
)
from moshpit_trio.averaging.partition import spans  # noqa: E402
from moshpit_trio.averaging.result_stream import RangeHeader, range_record  # noqa: E402
from moshpit_trio.dht.records import Record, encode_records, make_record  # noqa: E402
from moshpit_trio.identity import Identity, PeerID  # noqa: E402
from moshpit_trio.wire.address import PeerAddress  # noqa: E402

HERE = Path(__file__).resolve().parent

# alice, bob and carol are the seeds of keys.json; dave and erin two more for a fuller key.
SEEDS = {
    "alice": bytes([1]) * 32,
    "bob": bytes([2]) * 32,
    "carol": bytes([3]) * 32,
    "dave": bytes([4]) * 32,
    "erin": bytes([5]) * 32,
}
NOW = 1_700_000_000.0
RUN = "run1"
ROUND = 7
KEY = (0, 3)  # grid="auto": row 3
_encode = msgspec.msgpack.Encoder().encode


def _ident(name: str) -> Identity:
    return Identity.from_seed(SEEDS[name])


def _id(name: str) -> PeerID:
    return _ident(name).peer_id


def _member_json(member: MemberInfo) -> dict[str, Any]:
    return {
        "peer_id": member.peer_id.hex(),
        "address": member.address,
        "bandwidth": member.bandwidth,
        "client_mode": member.client_mode,
        "relayed": member.relayed,
    }


def _members() -> dict[str, MemberInfo]:
    def listening(name: str, port: int, bandwidth: float) -> MemberInfo:
        address = str(PeerAddress(f"{name}.example.org", port, _id(name)))
        return MemberInfo(_id(name).to_bytes(), address, bandwidth, False)

    return {
        "alice": listening("alice", 7070, 12_500_000.0),
        # client mode, holding a relay reservation: may lead and reduce where nobody listens
        "bob": MemberInfo(_id("bob").to_bytes(), "", 2_500_000.0, True, True),
        # client mode, no relay: reached only over the connections it opens
        "carol": MemberInfo(_id("carol").to_bytes(), "", 1_000_000.0, True, False),
        "dave": listening("dave", 7071, 100_000_000.0),
        "erin": MemberInfo(_id("erin").to_bytes(), "", 2_500_000.0, True, True),
    }


def _fake_peer(me: MemberInfo, records: dict[bytes, Record] | None = None) -> Any:
    """Just enough of a peer for Matchmaker's reader and its leader's fix (no network)."""
    peer_id = PeerID(me.peer_id)

    async def get_records(key: str) -> dict[bytes, Record]:
        return dict(records or {})

    return types.SimpleNamespace(
        id=peer_id,
        address=PeerAddress.parse(me.address) if me.address else None,
        dht=types.SimpleNamespace(get_records=get_records),
        transport=types.SimpleNamespace(
            relay=types.SimpleNamespace(live_reservations=lambda: [b"r"] if me.relayed else []),
            unresponsive_since=lambda peer: None,
        ),
    )


def announcements(members: dict[str, MemberInfo]) -> dict[str, Any]:
    key = group_key_name(RUN, KEY, ROUND)
    # Expirations: when each wants its group to start (the end of its matchmaking time).
    expirations = {"alice": 12.5, "bob": 12.5, "carol": 10.0, "dave": 14.25, "erin": 11.0}
    valid = []
    records: dict[bytes, Record] = {}
    for name, member in members.items():
        value = _encode(member)
        record = make_record(key.encode(), value, NOW + expirations[name], owner=_ident(name))
        records[record.subkey] = record
        valid.append(
            {
                "who": name,
                "member": _member_json(member),
                "value": value.hex(),
                "record": encode_records([record]).hex(),
            }
        )
    # Records under the same key that a reader drops (each signed by its owner, so they pass
    # the DHT's checks and only the matchmaker's own ones catch them).
    alice, bob = members["alice"], members["bob"]
    extra = _ident("carol")
    dropped = [
        ("a tombstone (withdrawn)", b""),
        ("not a MemberInfo", _encode(["hello"])),
        ("describes another peer (bob) than its owner", _encode(bob)),
        ("listening and relayed", _encode(msgspec.structs.replace(alice, relayed=True))),
        ("client mode with an address", _encode(msgspec.structs.replace(bob, address="x"))),
        (
            "listening, its address names bob",
            _encode(
                msgspec.structs.replace(
                    alice, address=str(PeerAddress("alice.example.org", 7070, _id("bob")))
                )
            ),
        ),
        (
            "listening, its address does not parse",
            _encode(msgspec.structs.replace(alice, address="ws://alice.example.org/")),
        ),
        ("bandwidth 0", _encode(msgspec.structs.replace(bob, bandwidth=0.0))),
        ("bandwidth NaN", _encode(msgspec.structs.replace(bob, bandwidth=math.nan))),
        ("bandwidth +Inf", _encode(msgspec.structs.replace(bob, bandwidth=math.inf))),
        ("a 31-byte peer_id", _encode(msgspec.structs.replace(bob, peer_id=bytes(31)))),
    ]
    refused = []
    for what, value in dropped:
        # each as if carol had published it, instead of her own announcement
        record = make_record(key.encode(), value, NOW + 9.0, owner=extra)
        refused.append({"what": what, "record": encode_records([record]).hex()})
    # What a reader keeps of the valid five, in order: (expiration, PeerID).
    reader = Matchmaker(_fake_peer(members["dave"], records), RUN, bandwidth=1e8)
    kept = trio.run(reader._announced, key, 0.0)
    by_id = {m.peer_id: name for name, m in members.items()}
    carol = members["carol"]
    four = msgspec.msgpack.encode(list(msgspec.structs.astuple(carol))[:4])
    return {
        "key": key,
        "valid": valid,
        # from a peer older than the trailing 'relayed' field: decodes as relayed = false
        "four_fields": {"who": "carol", "value": four.hex(), "reencoded": _encode(carol).hex()},
        "order": [by_id[m.peer_id] for _, m in kept],
        "dropped": refused,
    }


def join_and_answer(members: dict[str, MemberInfo]) -> dict[str, Any]:
    alice, bob, carol = members["alice"], members["bob"], members["carol"]
    join = _Join(ROUND, KEY, bob)
    # alice leads; bob then carol joined. The group as her real leader code fixes it.
    leader = Matchmaker(_fake_peer(alice), RUN, bandwidth=alice.bandwidth)
    leader.me = alice
    attempt = _Attempt(ROUND, KEY, 3, max_capacity=3, leading=True, followers=[bob, carol])
    group = leader._close(attempt)
    assert group is not None
    names = {m.peer_id: n for n, m in members.items()}
    return {
        "run": RUN,
        "round": ROUND,
        "key": list(KEY),
        "join": {"from": "bob", "to": "alice", "hex": _encode(join).hex()},
        "group_id_input": (
            b"moshpit/1 group\x00"
            + RUN.encode()
            + _encode([ROUND, list(KEY)])
            + b"".join(sorted(m.peer_id for m in (alice, bob, carol)))
        ).hex(),
        "group_id": group_id_of(RUN, ROUND, KEY, [alice.peer_id, bob.peer_id, carol.peer_id]).hex(),
        "answer": {
            "leader": "alice",
            "members": [names[m.peer_id] for m in group.members],
            "hex": _encode(group).hex(),
        },
        "disbanded": "the group was disbanded (too small)",
    }


def headers(group: GroupInfo) -> list[dict[str, Any]]:
    gid = group.group_id
    cases: list[tuple[str, str, _PartHeader | _ResultHeader | RangeHeader]] = [
        ("part", "member 1 -> reducer 0, weight 32", _PartHeader(gid, 1, 0, 417, 32.0, "none")),
        ("part", "8-bit, weight 1.5", _PartHeader(gid, 2, 417, 1000, 1.5, "8bit")),
        ("result", "uncompressed", _ResultHeader(gid, "none")),
        ("result", "fp16", _ResultHeader(gid, "fp16")),
        # a result stream's records: the length, then the header (the values follow)
        ("range", "reducer 0's span, all three", RangeHeader(0, 417, [0, 1, 2])),
        ("range", "a range of span 1, only member 1", RangeHeader(417, 1000, [1])),
    ]
    out = []
    for stream, what, header in cases:
        fields = msgspec.structs.asdict(header)
        if "group_id" in fields:
            fields["group_id"] = gid.hex()
        data = (
            range_record(header.start, header.end, header.included)
            if isinstance(header, RangeHeader)
            else _encode(header)
        )
        out.append({"stream": stream, "what": what, "fields": fields, "hex": data.hex()})
    return out


def invalid_messages(group: GroupInfo, bob: MemberInfo) -> list[dict[str, Any]]:
    gid = group.group_id
    enc = msgspec.msgpack.encode
    bob_fields = list(msgspec.structs.astuple(bob))
    cases = [
        ("member", "six fields", enc([*bob_fields, 1])),
        ("member", "three fields", enc(bob_fields[:3])),
        ("member", "a str peer_id", enc([str(_id("bob")), *bob_fields[1:]])),
        ("member", "an int for client_mode", enc([*bob_fields[:3], 1, True])),
        ("member", "a str bandwidth", enc([*bob_fields[:2], "1e6", True, True])),
        ("join", "a float round", enc([7.0, list(KEY), bob_fields])),
        ("join", "a key that is not an array", enc([ROUND, "0.3", bob_fields])),
        ("join", "bytes after the array", _encode(_Join(ROUND, KEY, bob)) + b"\x00"),
        ("group", "members not an array", enc([gid, ROUND, list(KEY), bob_fields, bob.peer_id])),
        ("part", "seven fields", enc([gid, 1, 0, 417, 32.0, "none", 0])),
        ("part", "a float sender", enc([gid, 1.0, 0, 417, 32.0, "none"])),
        ("part", "a bin codec", enc([gid, 1, 0, 417, 32.0, b"none"])),
        ("result", "three fields", enc([gid, 0, "none"])),
        ("result", "an int codec", enc([gid, 0])),
        ("range", "included not an array", enc([0, 417, 0])),
        ("range", "a bool in included", enc([0, 417, [True]])),
        ("range", "a float start", enc([0.0, 417, [0]])),
        ("dir", "a bool round", enc(True)),
        ("dir", "an array", enc([ROUND])),
    ]
    return [{"message": m, "what": w, "hex": data.hex()} for m, w, data in cases]


def grid_indices(group_id: bytes) -> list[dict[str, Any]]:
    """A fixed grid's index rule: each position's coordinate on the round's axis, and the
    next key of the member at position 0, for a group of 3 in round 7 (axis 7 mod d)."""
    out = []
    for shape, key, size in (((4, 4, 4), (2, 1), 3), ((8, 8), (5,), 8), ((32, 32), (9,), 3)):
        grid = Grid(shape)
        for rule in ("random", "rank"):
            indices = group_indices(group_id, size, grid, ROUND, rule=rule)
            out.append(
                {
                    "shape": list(shape),
                    "round": ROUND,
                    "rule": rule,
                    "group_id": group_id.hex(),
                    "size": size,
                    "indices": indices,
                    "key": list(key),
                    "next_key_of_position_0": list(next_key(grid, key, indices[0], ROUND)),
                }
            )
    return out


def partitions() -> list[dict[str, Any]]:
    # (total, [(bandwidth, client_mode, relayed)]) -> no_span, spans
    cases = [
        ("equal shares; the leftover to the lowest index", 10, [(1.0, False, False)] * 3),
        (
            "the example group: only alice listens, so only she reduces",
            1000,
            [(12_500_000.0, False, False), (2_500_000.0, True, True), (1_000_000.0, True, False)],
        ),
        (
            "two listening, one client-mode between them",
            1000,
            [(12_500_000.0, False, False), (2_500_000.0, True, True), (2e7, False, False)],
        ),
        (
            "nobody listens: the relayed ones reduce",
            1001,
            [(2_500_000.0, True, True), (1_000_000.0, True, False), (3_000_000.0, True, True)],
        ),
        (
            "uneven links (100, 250, 500, 1000 Mbit/s): the two slower ones reduce nothing",
            1000,
            [
                (12_500_000.0, False, False),
                (31_250_000.0, False, False),
                (62_500_000.0, False, False),
                (125_000_000.0, False, False),
            ],
        ),
        (
            "a third reducer barely fast enough for a span of its own",
            1000,
            [(10.0, False, False), (10.0, False, False), (6.7, False, False)],
        ),
        (
            "exact binary values: 0.1 + 0.2 is not 0.3",
            7,
            [(0.1, False, False), (0.2, False, False), (0.3, False, False)],
        ),
        (
            "fewer elements than members",
            3,
            [(5.0, False, False), (1.0, False, False), (3.0, False, False), (2.0, False, False)],
        ),
        ("a vector of length 0", 0, [(1.0, False, False), (2.0, False, False)]),
        (
            "largest remainders, not the largest bandwidths",
            100,
            [(4.0, False, False), (5.0, False, False), (6.0, False, False)],
        ),
    ]
    out = []
    for what, total, flags in cases:
        infos = [MemberInfo(bytes(32), "" if c else "x", b, c, r) for b, c, r in flags]
        reduce_nothing = no_span(infos)
        out.append(
            {
                "what": what,
                "total": total,
                "members": [{"bandwidth": b, "client_mode": c, "relayed": r} for b, c, r in flags],
                "no_span": reduce_nothing,
                "spans": [
                    list(s)
                    for s in spans(total, [m.bandwidth for m in infos], client_mode=reduce_nothing)
                ],
            }
        )
    return out


def _wide_values(count: int) -> np.ndarray:
    # x_i = ((37 * i) mod 101 - 50) / 8, as float32 (exact: eighths of small integers)
    i = np.arange(count, dtype=np.int64)
    return (((37 * i) % 101 - 50) / 8).astype(np.float32)


def codecs() -> list[dict[str, Any]]:
    small = [1.5, -2.0, 0.25, 3.0e-5, -0.75, 0.0, 1.0 / 3.0, 2.0]
    cases = [
        ("none", small),
        ("fp16", small),
        # past the half-precision range: saturates to +-65504; 6e-8 is a half subnormal
        ("fp16", [1.0e5, -1.0e5, 65504.0, 6.0e-8]),
        ("8bit", small),
        ("8bit", [4.0, 4.0, 4.0]),  # a constant block: step 0, exact
    ]
    out: list[dict[str, Any]] = []
    for name, listed in cases:
        values = np.array(listed, dtype=np.float32)
        c = codec(name)
        data = c.encode(values)
        decoded = c.decode(data, len(values))
        out.append(
            {
                "codec": name,
                "values": [float(v) for v in values],
                "hex": data.hex(),
                "decoded": [float(v) for v in decoded],
            }
        )
    # two 8-bit blocks (4096 values and 1): every block's min, then every step, then the codes
    wide = _wide_values(4097)
    c = codec("8bit")
    data = c.encode(wide)
    decoded = c.decode(data, len(wide))
    out.append(
        {
            "codec": "8bit",
            "values_formula": "x_i = ((37 * i) mod 101 - 50) / 8 for i in 0..4096, as float32",
            "count": len(wide),
            "hex": data.hex(),
            "decoded_sha256": hashlib.sha256(decoded.astype("<f4").tobytes()).hexdigest(),
            "decoded_first": [float(v) for v in decoded[:8]],
        }
    )
    return out


def build() -> dict[str, Any]:
    members = _members()
    joined = join_and_answer(members)
    group = msgspec.msgpack.decode(bytes.fromhex(joined["answer"]["hex"]), type=GroupInfo)
    return {
        "description": (
            "averaging messages (SPEC.md 'Averaging: matchmaking and all-reduce'); the first "
            "three PeerIDs are those of keys.json; records signed at the fixed 'now'"
        ),
        "now": NOW,
        "peers": {name: _id(name).to_bytes().hex() for name in SEEDS},
        "members": {name: _member_json(m) for name, m in members.items()},
        "keys": {
            "announcement (grid=auto, row 3)": group_key_name(RUN, KEY, ROUND),
            "announcement (grid=auto, column 12)": group_key_name(RUN, (1, 12), ROUND),
            "announcement (fixed grid 4x4x4, key (2, 1))": group_key_name(RUN, (2, 1), ROUND),
            "announcement (fixed grid of one axis)": group_key_name(RUN, (), ROUND),
            "directory": directory_key(RUN),
        },
        "announcements": announcements(members),
        "blocks": [
            {
                "announced": n,
                "max_group_size": most,
                "sizes": group_sizes(n, most),
                "blocks": [list(block_of(p, n, most)) for p in range(0, n, max(1, n // 4))],
                "places": list(range(0, n, max(1, n // 4))),
            }
            for n, most in ((5, 32), (33, 32), (97, 32), (20, 16))
        ],
        "matchmaking": joined,
        "headers": headers(group),
        "dir_request": {"round": ROUND, "hex": _encode(ROUND).hex()},
        "grid_indices": grid_indices(group.group_id),
        "invalid": invalid_messages(group, members["bob"]),
        "partitions": partitions(),
        "codecs": codecs(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    (HERE / "averaging.json").write_text(render())
