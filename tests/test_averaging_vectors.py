"""protocol/vectors/averaging.json: current, reproduced by the code, and refused where invalid.

The vectors are the averaging messages of SPEC.md ("Averaging: matchmaking and all-reduce"):
announcements, the join call and its answer, the group id, the part and result stream headers,
the directory request, span partitions and the codecs' bytes. Every check re-encodes with the
library's encoders and compares byte for byte, so a change to any encoding fails here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import types
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from moshpit_trio.averaging.allreduce import (
    _part_decoder,
    _PartHeader,
    _result_decoder,
    _ResultHeader,
    no_span,
)
from moshpit_trio.averaging.auto_grid import block_of, directory_key, group_sizes
from moshpit_trio.averaging.averager import _decode_round, _encode_round
from moshpit_trio.averaging.compression import codec
from moshpit_trio.averaging.grid import Grid, group_indices, group_key_name, next_key
from moshpit_trio.averaging.matchmaking import (
    GroupInfo,
    Matchmaker,
    MemberInfo,
    _Attempt,
    _group_decoder,
    _Join,
    _join_decoder,
    _member_decoder,
    group_id_of,
)
from moshpit_trio.averaging.partition import spans
from moshpit_trio.averaging.result_stream import RangeHeader, range_record
from moshpit_trio.dht.node import default_namespaces
from moshpit_trio.dht.records import Record, decode_records, validate
from moshpit_trio.identity import PeerID
from moshpit_trio.wire.address import PeerAddress

VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
DATA: dict[str, Any] = json.loads((VECTORS / "averaging.json").read_text())
NOW: float = DATA["now"]
_encode = msgspec.msgpack.Encoder().encode


def _member(fields: dict[str, Any]) -> MemberInfo:
    # by name: a change to the fields' order must show in the bytes
    return MemberInfo(
        peer_id=bytes.fromhex(fields["peer_id"]),
        address=fields["address"],
        bandwidth=fields["bandwidth"],
        client_mode=fields["client_mode"],
        relayed=fields["relayed"],
    )


MEMBERS = {name: _member(fields) for name, fields in DATA["members"].items()}
NAMES = {m.peer_id: name for name, m in MEMBERS.items()}


def _reader(records: list[Record]) -> Matchmaker:
    """A matchmaker (dave's) whose DHT read returns ``records``, with no network at all."""
    dave = MEMBERS["dave"]

    async def get_records(key: str) -> dict[bytes, Record]:
        return {r.subkey: r for r in records}

    peer = types.SimpleNamespace(
        id=PeerID(dave.peer_id),
        address=PeerAddress.parse(dave.address),
        dht=types.SimpleNamespace(get_records=get_records),
        transport=types.SimpleNamespace(
            relay=types.SimpleNamespace(live_reservations=lambda: []),
            unresponsive_since=lambda peer: None,
        ),
    )
    return Matchmaker(peer, "run1", bandwidth=dave.bandwidth)


def _one_record(hex_: str) -> Record:
    (record,) = decode_records(bytes.fromhex(hex_))
    # a valid owned record: only the matchmaker's own checks may drop it
    validate(record, default_namespaces().policy_for(record.key), NOW)
    return record


def test_the_committed_file_is_what_the_generator_writes() -> None:
    path = VECTORS / "generate_averaging.py"
    spec = importlib.util.spec_from_file_location("generate_averaging", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == (VECTORS / "averaging.json").read_text()


def test_the_first_peers_are_those_of_keys_json() -> None:
    keys = json.loads((VECTORS / "keys.json").read_text())["keys"]
    for entry in keys:
        assert DATA["peers"][entry["name"]] == entry["peer_id"]


def test_dht_keys() -> None:
    keys = DATA["keys"]
    assert keys["announcement (grid=auto, row 3)"] == group_key_name("run1", (0, 3), 7)
    assert keys["announcement (grid=auto, column 12)"] == group_key_name("run1", (1, 12), 7)
    assert keys["announcement (fixed grid 4x4x4, key (2, 1))"] == group_key_name("run1", (2, 1), 7)
    assert keys["announcement (fixed grid of one axis)"] == group_key_name("run1", (), 7)
    assert keys["directory"] == directory_key("run1")


@pytest.mark.parametrize("vector", DATA["announcements"]["valid"], ids=lambda v: v["who"])
def test_announcements_reproduced_byte_for_byte(vector: dict[str, Any]) -> None:
    member = _member(vector["member"])
    value = bytes.fromhex(vector["value"])
    assert _encode(member) == value
    assert _member_decoder.decode(value) == member
    record = _one_record(vector["record"])
    assert record.key == DATA["announcements"]["key"].encode()
    assert record.subkey == member.peer_id == bytes.fromhex(DATA["peers"][vector["who"]])
    assert record.value == value


def test_client_mode_and_relayed_decide_who_may_lead() -> None:
    assert MEMBERS["alice"].can_lead and not MEMBERS["alice"].client_mode  # listening
    assert MEMBERS["bob"].can_lead and MEMBERS["bob"].relayed  # client mode, relayed
    assert not MEMBERS["carol"].can_lead  # client mode, no relay


def test_an_announcement_of_four_fields_reads_as_not_relayed() -> None:
    vector = DATA["announcements"]["four_fields"]
    member = _member_decoder.decode(bytes.fromhex(vector["value"]))
    assert member == MEMBERS[vector["who"]] and member.relayed is False
    assert _encode(member).hex() == vector["reencoded"]


async def test_a_reader_keeps_the_valid_announcements_in_expiration_then_peer_id_order() -> None:
    records = [_one_record(v["record"]) for v in DATA["announcements"]["valid"]]
    kept = await _reader(records)._announced(DATA["announcements"]["key"], 0.0)
    assert [NAMES[m.peer_id] for _, m in kept] == DATA["announcements"]["order"]
    assert [e for e, _ in kept] == sorted(r.expiration for r in records)


@pytest.mark.parametrize("vector", DATA["announcements"]["dropped"], ids=lambda v: v["what"])
async def test_a_reader_drops_announcements_it_cannot_use(vector: dict[str, Any]) -> None:
    record = _one_record(vector["record"])
    assert await _reader([record])._announced(DATA["announcements"]["key"], 0.0) == []


def test_the_join_request() -> None:
    mm = DATA["matchmaking"]
    data = bytes.fromhex(mm["join"]["hex"])
    join = _join_decoder.decode(data)
    assert (join.round, tuple(join.key), join.member) == (
        mm["round"],
        tuple(mm["key"]),
        MEMBERS[mm["join"]["from"]],
    )
    assert _encode(_Join(round=mm["round"], key=tuple(mm["key"]), member=MEMBERS["bob"])) == data


def test_the_group_id() -> None:
    mm = DATA["matchmaking"]
    ids = [MEMBERS[name].peer_id for name in mm["answer"]["members"]]
    # as a second implementation would build it, from the spec's words
    expected_input = (
        b"moshpit/1 group\x00"
        + mm["run"].encode()
        + msgspec.msgpack.encode([mm["round"], mm["key"]])
        + b"".join(sorted(ids))
    )
    assert expected_input.hex() == mm["group_id_input"]
    assert hashlib.sha256(expected_input).digest()[:16].hex() == mm["group_id"]
    assert group_id_of(mm["run"], mm["round"], tuple(mm["key"]), ids).hex() == mm["group_id"]


def test_the_join_answer() -> None:
    mm = DATA["matchmaking"]
    data = bytes.fromhex(mm["answer"]["hex"])
    group = _group_decoder.decode(data)
    assert _encode(group) == data
    assert group == GroupInfo(
        group_id=bytes.fromhex(mm["group_id"]),
        round=mm["round"],
        key=tuple(mm["key"]),
        members=tuple(MEMBERS[n] for n in mm["answer"]["members"]),
        leader=MEMBERS[mm["answer"]["leader"]].peer_id,
    )
    # a follower (bob, asking alice) takes it: every check of SPEC.md passes
    follower = _reader([])
    follower.me = MEMBERS["bob"]
    attempt = _Attempt(mm["round"], tuple(mm["key"]), 3, max_capacity=3)
    assert follower._valid_group(group, attempt, MEMBERS["alice"])
    # ... and not from another leader, nor for another round, nor past its largest group
    assert not follower._valid_group(group, attempt, MEMBERS["dave"])
    assert not follower._valid_group(
        group, _Attempt(8, (0, 3), 3, max_capacity=3), MEMBERS["alice"]
    )
    small = _Attempt(mm["round"], tuple(mm["key"]), 2, max_capacity=2)
    assert not follower._valid_group(group, small, MEMBERS["alice"])


_HEADER_TYPES: dict[str, Any] = {
    "part": _PartHeader,
    "result": _ResultHeader,
    "range": RangeHeader,
}


@pytest.mark.parametrize("vector", DATA["headers"], ids=lambda v: v["what"])
def test_stream_headers_reproduced_byte_for_byte(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    kind = _HEADER_TYPES[vector["stream"]]
    fields = dict(vector["fields"])
    if kind is RangeHeader:
        # a result stream's record: a 4-byte big-endian length, then the header
        assert int.from_bytes(data[:4], "big") == len(data) - 4
        header = _DECODERS["range"].decode(data[4:])
        assert range_record(header.start, header.end, header.included) == data
        data = data[4:]
    else:
        header = _DECODERS[vector["stream"]].decode(data)
        assert header.group_id.hex() == DATA["matchmaking"]["group_id"]
        fields["group_id"] = bytes.fromhex(fields["group_id"])
    assert isinstance(header, kind)
    assert _encode(header) == data
    # built from its fields by name, and as the array SPEC.md lists them in
    built = kind(**fields)
    assert built == header
    assert _encode(built) == data
    assert data == msgspec.msgpack.encode(list(fields.values()))


def test_the_directory_request() -> None:
    vector = DATA["dir_request"]
    assert _encode_round(vector["round"]).hex() == vector["hex"]
    assert _decode_round(bytes.fromhex(vector["hex"])) == vector["round"]


_DECODERS: dict[str, Any] = {
    "member": _member_decoder,
    "join": _join_decoder,
    "group": _group_decoder,
    "part": _part_decoder,
    "result": _result_decoder,
    "range": msgspec.msgpack.Decoder(RangeHeader),
    "dir": msgspec.msgpack.Decoder(int),
}


@pytest.mark.parametrize("vector", DATA["invalid"], ids=lambda v: v["what"])
def test_every_invalid_message_is_refused(vector: dict[str, Any]) -> None:
    with pytest.raises(msgspec.DecodeError):
        _DECODERS[vector["message"]].decode(bytes.fromhex(vector["hex"]))


@pytest.mark.parametrize("vector", DATA["partitions"], ids=lambda v: v["what"])
def test_span_partitions(vector: dict[str, Any]) -> None:
    members = [
        MemberInfo(bytes(32), "" if m["client_mode"] else "x", m["bandwidth"], m["client_mode"])
        if not m["relayed"]
        else MemberInfo(bytes(32), "", m["bandwidth"], True, True)
        for m in vector["members"]
    ]
    assert no_span(members) == vector["no_span"]
    got = spans(vector["total"], [m.bandwidth for m in members], client_mode=vector["no_span"])
    assert [list(s) for s in got] == vector["spans"]


@pytest.mark.parametrize("vector", DATA["blocks"], ids=lambda v: str(v["announced"]))
def test_blocks_under_one_key(vector: dict[str, Any]) -> None:
    n, most = vector["announced"], vector["max_group_size"]
    assert group_sizes(n, most) == vector["sizes"]
    assert [list(block_of(p, n, most)) for p in vector["places"]] == vector["blocks"]


@pytest.mark.parametrize(
    "vector", DATA["codecs"], ids=lambda v: f"{v['codec']}-{len(v.get('values', ()))}"
)
def test_codec_bytes(vector: dict[str, Any]) -> None:
    c = codec(vector["codec"])
    data = bytes.fromhex(vector["hex"])
    if "values" in vector:
        values = np.array(vector["values"], dtype=np.float32)
        assert c.encode(values) == data
        decoded = c.decode(data, len(values))
        assert decoded.astype("<f4").tobytes() == np.array(vector["decoded"], "<f4").tobytes()
        return
    i = np.arange(vector["count"], dtype=np.int64)
    values = (((37 * i) % 101 - 50) / 8).astype(np.float32)
    assert c.encode(values) == data
    decoded = c.decode(data, len(values)).astype("<f4")
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == vector["decoded_sha256"]
    assert decoded[:8].tolist() == vector["decoded_first"]


def _below(words: list[int], bound: int) -> int:
    limit = 2**64 - 2**64 % bound
    while True:
        word = words.pop(0)
        if word < limit:
            return word % bound


@pytest.mark.parametrize(
    "vector", DATA["grid_indices"], ids=lambda v: f"{v['shape']}-{v['rule']}-{v['size']}"
)
def test_fixed_grid_indices(vector: dict[str, Any]) -> None:
    grid, group_id = Grid(tuple(vector["shape"])), bytes.fromhex(vector["group_id"])
    got = group_indices(group_id, vector["size"], grid, vector["round"], rule=vector["rule"])
    assert got == vector["indices"]
    # ... and as SPEC.md words it, without the library
    m = grid.shape[vector["round"] % grid.d]
    if vector["rule"] == "rank":
        expected = [j % m for j in range(vector["size"])]
    else:
        seed = hashlib.sha256(b"moshpit/1 grid index\x00" + group_id).digest()
        stream = b"".join(hashlib.sha256(seed + b.to_bytes(8, "big")).digest() for b in range(64))
        words = [int.from_bytes(stream[i : i + 8], "big") for i in range(0, len(stream), 8)]
        perm = list(range(m))
        for i in range(m - 1, 0, -1):
            k = _below(words, i + 1)
            perm[i], perm[k] = perm[k], perm[i]
        expected = [perm[j % m] for j in range(vector["size"])]
    assert expected == vector["indices"]
    key = tuple(vector["key"])
    assert list(next_key(grid, key, got[0], vector["round"])) == vector["next_key_of_position_0"]
    assert vector["next_key_of_position_0"] == [*key, got[0]][1:]
