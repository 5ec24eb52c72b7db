"""Envelopes: round trips, one targeted tamper per refusal reason, and fuzzing."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity
from moshpit_trio.wire.envelope import (
    DEFAULT_LIMITS,
    ENVELOPE_DOMAIN,
    TAG_SIZE,
    Direction,
    Envelope,
    EnvelopeLimits,
    EnvelopeOpener,
    EnvelopeSealer,
    Kind,
    SharedPayload,
)

from .fuzzing import mutated as mutated_bytes

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
CAROL = Identity.from_seed(bytes([3]) * 32)
SESSION = bytes(range(32))
#: the key of alice -> bob in SESSION (a handshake derives it; any 32 bytes do here)
KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
I2R = Direction.INITIATOR_TO_RESPONDER
R2I = Direction.RESPONDER_TO_INITIATOR

FIELDS = ("version", "kind", "seq", "call_id", "deadline_ms", "name_len", "payload_len")


def sealer(
    identity: Identity = ALICE,
    session: bytes = SESSION,
    recipient: Identity = BOB,
    key: bytes = KEY,
    direction: Direction = I2R,
    **kw: Any,
) -> EnvelopeSealer:
    return EnvelopeSealer(
        identity.peer_id, session, recipient.peer_id, key, direction=direction, **kw
    )


def opener(**kw: Any) -> EnvelopeOpener:
    return EnvelopeOpener(KEY, SESSION, ALICE.peer_id, BOB.peer_id, direction=I2R, **kw)


def nonce(seq: int, direction: Direction = I2R) -> bytes:
    return int(direction).to_bytes(4, "big") + seq.to_bytes(8, "big")


def associated(head: bytes, session: bytes = SESSION, sender: Identity = ALICE) -> bytes:
    return ENVELOPE_DOMAIN + session + sender.peer_id.to_bytes() + BOB.peer_id.to_bytes() + head


def split(message: bytes) -> tuple[list[Any], bytes, bytes]:
    """A message's header fields, its head (length + header) and its sealed part."""
    size = int.from_bytes(message[:2], "big")
    return msgspec.msgpack.decode(message[2 : 2 + size]), message[: 2 + size], message[2 + size :]


def forge(
    fields: Any,
    plain: bytes = b"ok",
    *,
    key: bytes = KEY,
    seq: int = 1,
    direction: Direction = I2R,
    session: bytes = SESSION,
    sender: Identity = ALICE,
) -> bytes:
    """An envelope with any header, sealing ``plain`` (name + payload) under ``key`` with the
    nonce of ``seq`` and ``direction``, and the associated data of ``session`` and ``sender``."""
    header = msgspec.msgpack.encode(fields)
    head = len(header).to_bytes(2, "big") + header
    sealed = AESGCM(key).encrypt(nonce(seq, direction), plain, associated(head, session, sender))
    return head + sealed


def good_fields(payload: bytes = b"ok", **changes: Any) -> list[Any]:
    values: dict[str, Any] = {
        "version": 2,
        "kind": int(Kind.RESPONSE),
        "seq": 1,
        "call_id": 5,
        "deadline_ms": 0,
        "name_len": 0,
        "payload_len": len(payload),
    }
    assert set(changes) <= set(values)
    values.update(changes)
    return list(values.values())


def refused(
    message: bytes | bytearray | memoryview, reason: str, op: EnvelopeOpener | None = None
) -> ProtocolError:
    """Assert that ``op`` (a fresh opener by default) refuses ``message`` for ``reason``."""
    op = op or opener()
    before = op.last_seq
    with pytest.raises(ProtocolError) as info:
        op.open(message)
    assert info.value.reason == reason, info.value
    assert op.last_seq == before, "a refused envelope must not advance the seq"
    return info.value


def test_forge_makes_what_the_sealer_makes() -> None:
    # The helpers above are the spec's layout, checked once against the real sealer.
    message = sealer().seal(Kind.REQUEST, 9, b"body", deadline_ms=250, name="dht.find")
    fields = [2, int(Kind.REQUEST), 1, 9, 250, len("dht.find"), 4]
    assert message == forge(fields, b"dht.find" + b"body")
    assert opener().open(forge(good_fields())).payload == b"ok"


# -- round trips -----------------------------------------------------------------------------

SAMPLE_PAYLOADS = {
    Kind.REQUEST: b"request body",
    Kind.RESPONSE: b"",
    Kind.ERROR: msgspec.msgpack.encode({"code": "boom", "message": "it broke"}),
    Kind.CANCEL: b"",
    Kind.STREAM_OPEN: b"stream header",
    Kind.STREAM_DATA: bytes(range(256)) * 100,
    Kind.STREAM_CREDIT: (65536).to_bytes(8, "big"),
    Kind.STREAM_END: b"",
    Kind.GOODBYE: b"bye",
}


def test_round_trip_every_kind_in_sequence() -> None:
    s, o = sealer(), opener()
    for i, kind in enumerate(Kind, start=1):
        named = kind in (Kind.REQUEST, Kind.STREAM_OPEN)
        message = s.seal(
            kind,
            call_id=i * 3,
            payload=SAMPLE_PAYLOADS[kind],
            deadline_ms=1500 if named else 0,
            name="svc.call" if named else "",
        )
        assert isinstance(message, bytes)
        assert s.last_seq == i
        env = o.open(message)
        assert env == Envelope(
            kind=kind,
            seq=i,
            call_id=i * 3,
            deadline_ms=1500 if named else 0,
            name="svc.call" if named else "",
            payload=env.payload,
        )
        assert env.payload == SAMPLE_PAYLOADS[kind]
        assert o.last_seq == i


def test_both_directions_of_one_session() -> None:
    # The responder's sealer and the initiator's opener: the other key and the other direction.
    back = sealer(identity=BOB, recipient=ALICE, key=OTHER_KEY, direction=R2I)
    o = EnvelopeOpener(OTHER_KEY, SESSION, BOB.peer_id, ALICE.peer_id, direction=R2I)
    assert o.open(back.seal(Kind.RESPONSE, 1, b"back")).payload == b"back"


def test_the_payload_is_encrypted_on_the_wire() -> None:
    secret = b"the model's weights, not for the path" * 3
    message = sealer().seal(Kind.REQUEST, 1, secret, deadline_ms=5, name="avg.private-run.part")
    assert secret[:16] not in message and b"private-run" not in message
    big = bytes(range(256)) * 1024
    _, body = sealer().seal_parts(Kind.STREAM_DATA, 1, big)
    assert big[:16] not in bytes(body)


def test_a_large_payload_is_decrypted_into_memory_of_its_own() -> None:
    data = bytes(range(256)) * 1024
    message = sealer().seal(Kind.STREAM_DATA, 1, data)
    env = opener().open(message)
    assert env.payload == data
    # A fresh, writable, aligned buffer no one else holds: a receiver may keep it as it is.
    assert isinstance(env.payload.obj, np.ndarray) and not env.payload.readonly
    assert env.payload.obj.ctypes.data % 16 == 0
    assert not np.shares_memory(env.payload.obj, np.frombuffer(message, np.uint8))


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_open_accepts_any_byte_buffer(wrap: Any) -> None:
    message = sealer().seal(Kind.RESPONSE, 1, b"abc")
    assert bytes(opener().open(wrap(message)).payload) == b"abc"


def test_seal_accepts_memoryview_payload_and_extreme_ints() -> None:
    data = bytearray(b"0123456789")
    message = sealer().seal(
        Kind.REQUEST, 2**64 - 1, memoryview(data)[2:5], deadline_ms=2**64 - 1, name="é" * 64
    )
    env = opener().open(message)
    assert (env.call_id, env.deadline_ms, env.name, bytes(env.payload)) == (
        2**64 - 1,
        2**64 - 1,
        "é" * 64,
        b"234",
    )


@pytest.mark.parametrize("size", [100, 1 << 20])
def test_seal_parts_is_seal_in_two_pieces(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    s1, s2 = sealer(), sealer()
    head, body = s1.seal_parts(Kind.REQUEST, 3, data, deadline_ms=50, name="f")
    assert head + bytes(body) == s2.seal(Kind.REQUEST, 3, data, deadline_ms=50, name="f")
    assert len(body) == 1 + size + TAG_SIZE
    if size >= 1 << 16:
        # a large body is the caller's own writable memory (a websocket client masks it there)
        assert isinstance(body, memoryview) and not body.readonly
    else:
        assert isinstance(body, bytes)


@pytest.mark.parametrize("make", [bytearray, lambda b: memoryview(bytearray(b))])
def test_the_payload_is_read_once_when_sealed(make: Any) -> None:
    buf = make(b"abcdef" * 20000)
    head, body = sealer().seal_parts(Kind.STREAM_DATA, 1, buf)
    buf[:3] = b"xyz"  # the caller reuses its buffer after sending
    env = opener().open(head + bytes(body))
    assert bytes(env.payload) == b"abcdef" * 20000


def test_shared_payload_slices_seal_like_bytes() -> None:
    data = bytes(range(256)) * 100
    shared = SharedPayload(data)
    for _ in range(3):  # three connections, three sealers
        s, plain = sealer(), sealer()
        for start in range(0, len(data), 7000):
            head, body = s.seal_parts(Kind.STREAM_DATA, 1, shared.slice(start, start + 7000))
            want = plain.seal(Kind.STREAM_DATA, 1, data[start : start + 7000])
            assert head + bytes(body) == want
    assert len(shared.slice(25_000, 99_999)) == 600  # clamped like a slice
    with pytest.raises(ConfigError):
        SharedPayload(bytearray(3))  # type: ignore[arg-type]


def test_borrowed_payload_is_not_copied_and_seals_like_bytes() -> None:
    values = np.arange(30000, dtype=np.float32)
    shared = SharedPayload.borrow(memoryview(values))  # a float view, cast to bytes
    assert len(shared) == values.nbytes
    assert np.shares_memory(np.frombuffer(shared.data, dtype=np.uint8), values)
    s, plain, o = sealer(), sealer(), opener()
    sealed = []
    for start in range(0, values.nbytes, 50000):
        head, body = s.seal_parts(Kind.STREAM_DATA, 1, shared.slice(start, start + 50000))
        want = plain.seal(Kind.STREAM_DATA, 1, values.tobytes()[start : start + 50000])
        assert head + bytes(body) == want
        sealed.append(head + bytes(body))
    original = values.tobytes()
    values[:] = -1  # the borrower writes again: the sealed envelopes hold their own bytes
    assert b"".join(bytes(o.open(m).payload) for m in sealed) == original
    with pytest.raises(ConfigError):
        SharedPayload.borrow(memoryview(values)[::2])  # not contiguous


def test_seal_refuses_a_payload_that_is_not_flat_bytes() -> None:
    words = memoryview(bytearray(8)).cast("I")  # two 4-byte items, 8 bytes
    with pytest.raises(ConfigError):
        sealer().seal(Kind.STREAM_DATA, 1, words)
    strided = memoryview(bytes(8))[::2]
    with pytest.raises(ConfigError):
        sealer().seal(Kind.STREAM_DATA, 1, strided)
    with pytest.raises(ConfigError):
        sealer().seal(Kind.STREAM_DATA, 1, "text")  # type: ignore[arg-type]


def test_full_size_payloads_open() -> None:
    s, o = sealer(), opener()
    for kind in Kind:
        cap = DEFAULT_LIMITS.max_payload[kind]
        named = kind in (Kind.REQUEST, Kind.STREAM_OPEN)
        message = s.seal(kind, 1, bytes(cap), name="n" * 128 if named else "")
        assert len(o.open(message).payload) == cap
        assert len(message) <= DEFAULT_LIMITS.max_message


def test_limits() -> None:
    # the largest envelope: a 4 MiB REQUEST with a 128-byte name, a full header and the tag
    assert DEFAULT_LIMITS.max_message == 2 + 64 + 128 + 4 * 1024 * 1024 + 16
    assert DEFAULT_LIMITS.max_payload[Kind.STREAM_CREDIT] == 8
    assert DEFAULT_LIMITS.max_payload[Kind.CANCEL] == 0
    assert DEFAULT_LIMITS.max_payload[Kind.GOODBYE] == 1024
    with pytest.raises(ConfigError):
        EnvelopeLimits(max_payload={Kind.REQUEST: 10})
    with pytest.raises(ConfigError):
        EnvelopeLimits(max_header=70000)
    custom = EnvelopeLimits(max_payload={**DEFAULT_LIMITS.max_payload, Kind.STREAM_DATA: 1 << 24})
    assert custom.max_message == 2 + 64 + (1 << 24) + 16


def test_the_largest_header_fits_the_cap() -> None:
    message = sealer().seal(
        Kind.REQUEST, 2**64 - 1, bytes(4 << 20), deadline_ms=2**64 - 1, name="n" * 128
    )
    assert int.from_bytes(message[:2], "big") <= DEFAULT_LIMITS.max_header


def test_kind_values_are_the_wire_values() -> None:
    assert [(k.name, k.value) for k in Kind] == [
        ("REQUEST", 1),
        ("RESPONSE", 2),
        ("ERROR", 3),
        ("CANCEL", 4),
        ("STREAM_OPEN", 5),
        ("STREAM_DATA", 6),
        ("STREAM_CREDIT", 7),
        ("STREAM_END", 8),
        ("GOODBYE", 9),
    ]
    assert [(d.name, d.value) for d in Direction] == [
        ("INITIATOR_TO_RESPONDER", 1),
        ("RESPONDER_TO_INITIATOR", 2),
    ]


def test_layout() -> None:
    s = sealer()
    s.seal(Kind.CANCEL, 1)
    message = s.seal(Kind.REQUEST, 9, b"body", deadline_ms=250, name="dht.find")
    header, head, sealed = split(message)
    assert dict(zip(FIELDS, header, strict=True)) == {
        "version": 2,
        "kind": 1,
        "seq": 2,
        "call_id": 9,
        "deadline_ms": 250,
        "name_len": 8,
        "payload_len": 4,
    }
    # AES-256-GCM of name + payload: nonce u32be(direction) + u64be(seq); associated data the
    # domain, session, sender, recipient and the head as sent.
    assert AESGCM(KEY).decrypt(nonce(2), sealed, associated(head)) == b"dht.find" + b"body"
    assert len(sealed) == 8 + 4 + 16


# -- the sealer refuses what the opener would refuse ------------------------------------------


@pytest.mark.parametrize(
    ("args", "kw"),
    [
        ((99,), {}),
        ((True,), {}),
        ((Kind.RESPONSE, -1), {}),
        ((Kind.RESPONSE, 2**64), {}),
        ((Kind.RESPONSE, 1.0), {}),
        ((Kind.RESPONSE, 1), {"name": "x"}),
        ((Kind.RESPONSE, 1), {"deadline_ms": 5}),
        ((Kind.REQUEST, 1), {"name": ""}),
        ((Kind.REQUEST, 1), {"name": "x" * 129}),
        ((Kind.REQUEST, 1), {"name": "x", "deadline_ms": -1}),
        ((Kind.CANCEL, 1, b"x"), {}),
        ((Kind.STREAM_CREDIT, 1, b"1234567"), {}),
        ((Kind.GOODBYE, 0, b"x" * 1025), {}),
    ],
)
def test_sealer_refuses_bad_arguments(args: tuple[Any, ...], kw: dict[str, Any]) -> None:
    s = sealer()
    with pytest.raises(ConfigError):
        s.seal(*args, **kw)
    assert s.last_seq == 0, "a refused seal must not use up a seq"


def test_sealer_and_opener_refuse_bad_construction() -> None:
    with pytest.raises(ConfigError):
        sealer(session=b"short")
    with pytest.raises(ConfigError):
        sealer(key=KEY[:31])
    with pytest.raises(ConfigError):
        sealer(direction=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EnvelopeOpener(KEY, b"short", ALICE.peer_id, BOB.peer_id, direction=I2R)
    with pytest.raises(ConfigError):
        EnvelopeOpener(KEY + b"x", SESSION, ALICE.peer_id, BOB.peer_id, direction=I2R)
    with pytest.raises(ConfigError):
        EnvelopeOpener(bytearray(KEY), SESSION, ALICE.peer_id, BOB.peer_id, direction=I2R)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        EnvelopeOpener(KEY, SESSION, ALICE.peer_id, BOB.peer_id, direction="i2r")  # type: ignore[arg-type]


# -- one tamper per reason -------------------------------------------------------------------


def _flipped(message: bytes, index: int, bit: int = 0x01) -> bytes:
    out = bytearray(message)
    out[index] ^= bit
    return bytes(out)


def test_tampered_payload_is_mac() -> None:
    refused(_flipped(sealer().seal(Kind.STREAM_DATA, 1, b"tensor bytes"), -20), "mac")


def test_tampered_tag_is_mac() -> None:
    refused(_flipped(sealer().seal(Kind.STREAM_DATA, 1, b"tensor bytes"), -1), "mac")


def test_tampered_name_is_mac() -> None:
    message = sealer().seal(Kind.REQUEST, 1, b"", deadline_ms=9, name="echo")
    refused(_flipped(message, len(split(message)[1])), "mac")  # the first sealed byte


def test_tampered_header_is_mac() -> None:
    message = sealer().seal(Kind.RESPONSE, 0x41, b"ok")
    header, _, sealed = split(message)
    header[FIELDS.index("call_id")] = 0x42  # same encoded size, still a valid header
    encoded = msgspec.msgpack.encode(header)
    refused(len(encoded).to_bytes(2, "big") + encoded + sealed, "mac")


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(sealer(key=OTHER_KEY).seal(Kind.RESPONSE, 5, b"ok"), id="another key"),
        pytest.param(forge(good_fields(), direction=R2I), id="the reflected direction"),
        pytest.param(forge(good_fields(), session=bytes(32)), id="another session"),
        pytest.param(sealer(session=bytes(32)).seal(Kind.RESPONSE, 5, b"ok"), id="sealer session"),
        pytest.param(sealer(identity=CAROL).seal(Kind.RESPONSE, 5, b"ok"), id="another sender"),
        pytest.param(sealer(recipient=CAROL).seal(Kind.RESPONSE, 5, b"ok"), id="for another"),
        pytest.param(forge(good_fields(), seq=2), id="the nonce of another seq"),
    ],
)
def test_wrong_key_session_peer_or_direction_is_mac(message: bytes) -> None:
    # The header names none of these: the key, the nonce and the associated data bind them.
    refused(message, "mac")


def test_tampered_and_wrong_key_are_mac_for_a_large_payload() -> None:
    data = bytes(range(256)) * 1024
    refused(_flipped(sealer().seal(Kind.STREAM_DATA, 1, data), 5000), "mac")
    refused(sealer(key=OTHER_KEY).seal(Kind.STREAM_DATA, 1, data), "mac")


def test_every_single_bit_flip_is_refused() -> None:
    message = sealer().seal(Kind.REQUEST, 7, b"p", deadline_ms=9, name="a.b")
    for index in range(len(message)):
        for bit in (0x01, 0x80):
            with pytest.raises(ProtocolError) as info:
                opener().open(_flipped(message, index, bit))
            assert info.value.reason in {
                "mac",
                "malformed",
                "truncated",
                "seq",
                "kind",
                "version",
                "too-large",
            }


def test_replay_is_seq() -> None:
    s, o = sealer(), opener()
    first = s.seal(Kind.RESPONSE, 1, b"a")
    o.open(first)
    refused(first, "seq", o)


def test_reorder_is_seq_and_nothing_is_skipped() -> None:
    s, o = sealer(), opener()
    first, second = s.seal(Kind.RESPONSE, 1, b"a"), s.seal(Kind.RESPONSE, 2, b"b")
    refused(second, "seq", o)
    assert o.open(first).seq == 1
    assert o.open(second).seq == 2


def test_a_refused_envelope_does_not_consume_its_seq() -> None:
    s, o = sealer(), opener()
    genuine = s.seal(Kind.STREAM_DATA, 1, b"chunk")
    refused(_flipped(genuine, -1, 0xFF), "mac", o)
    assert o.open(genuine).seq == 1


@pytest.mark.parametrize("seq", [0, 2, 2**64 - 1])
def test_wrong_first_seq(seq: int) -> None:
    refused(forge(good_fields(seq=seq), seq=seq), "seq")


@pytest.mark.parametrize("cut", [1, 16, 17, 30])
def test_truncated(cut: int) -> None:
    message = sealer().seal(Kind.RESPONSE, 1, b"x" * 14)
    refused(message[:-cut], "truncated")


def test_truncated_inside_the_header() -> None:
    message = sealer().seal(Kind.RESPONSE, 1, b"x")
    refused(message[:5], "truncated")
    refused(b"\x00\x05abc", "truncated")


def test_extra_bytes_are_malformed() -> None:
    refused(sealer().seal(Kind.RESPONSE, 1, b"x") + b"\x00", "malformed")


def test_unknown_kind() -> None:
    for kind in (0, 10, 255, 2**64 - 1):
        refused(forge(good_fields(kind=kind)), "kind")


def test_other_version() -> None:
    refused(forge(good_fields(version=1)), "version")
    refused(forge(good_fields(version=3)), "version")
    # Another version may lay out its header differently: still "version", not "malformed".
    refused(forge([1, "something", "else"]), "version")
    refused(forge([-1, 1]), "version")


@pytest.mark.parametrize(
    "fields",
    [
        good_fields(call_id=-1),
        good_fields(seq=-1),
        good_fields(deadline_ms=-5),
        good_fields(payload_len=-2),
        good_fields(call_id=True),
        good_fields(call_id=1.5),
        good_fields(call_id=None),
        good_fields(call_id=b"\x05"),
        good_fields(kind=-1),
        good_fields(kind="1"),
        good_fields()[:6],
        [*good_fields(), 0],
        good_fields(name_len=1),
        good_fields(deadline_ms=1),
        good_fields(kind=int(Kind.REQUEST), deadline_ms=9),
        good_fields(b"1234567", kind=int(Kind.STREAM_CREDIT)),
        {"version": 2},
        [[2] * 7],
    ],
)
def test_malformed_header(fields: Any) -> None:
    refused(forge(fields), "malformed")


def test_name_that_is_not_utf8_is_malformed() -> None:
    fields = good_fields(kind=int(Kind.REQUEST), deadline_ms=9, name_len=3)
    refused(forge(fields, b"\xff\xfe\xfd" + b"ok"), "malformed")


def test_deeply_nested_header_is_malformed() -> None:
    header = b"\x91" * 60 + b"\x01"
    refused(len(header).to_bytes(2, "big") + header + bytes(64), "malformed")


@pytest.mark.parametrize("message", [b"", b"\x00", b"\xff", b"\x00\x00" + bytes(63), bytes(100)])
def test_garbage_is_malformed(message: bytes) -> None:
    refused(message, "malformed")


def test_text_message_is_malformed() -> None:
    with pytest.raises(ProtocolError) as info:
        opener().open("a text websocket message")  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


def test_oversized_header() -> None:
    refused((65).to_bytes(2, "big") + bytes(600), "too-large")
    refused(b"\xff\xff", "too-large")


def test_oversized_name() -> None:
    fields = good_fields(kind=int(Kind.REQUEST), deadline_ms=9, name_len=129)
    refused(forge(fields, b"n" * 129 + b"ok"), "too-large")


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        (Kind.GOODBYE, 1025),
        (Kind.CANCEL, 1),
        (Kind.STREAM_END, 1),
        (Kind.STREAM_CREDIT, 9),
        (Kind.ERROR, 64 * 1024 + 1),
        (Kind.STREAM_OPEN, 64 * 1024 + 1),
    ],
)
def test_oversized_payload(kind: Kind, size: int) -> None:
    big = EnvelopeLimits(max_payload=dict.fromkeys(Kind, 1 << 17) | {Kind.STREAM_CREDIT: size})
    named = kind in (Kind.REQUEST, Kind.STREAM_OPEN)
    message = sealer(limits=big).seal(kind, 1, bytes(size), name="n" if named else "")
    refused(message, "too-large")


def test_sizes_are_checked_before_decrypting() -> None:
    size = 4 * 1024 * 1024 + 1
    # Garbage where the ciphertext should be: decrypting first would say "mac".
    fields = good_fields(kind=int(Kind.STREAM_DATA), payload_len=size)
    header = msgspec.msgpack.encode(fields)
    refused(len(header).to_bytes(2, "big") + header + bytes(size + 16), "too-large")
    refused(len(header).to_bytes(2, "big") + header + bytes(100), "too-large")


def test_custom_smaller_limits() -> None:
    small = EnvelopeLimits(
        max_payload={**DEFAULT_LIMITS.max_payload, Kind.STREAM_DATA: 10}, max_name=3
    )
    o = opener(limits=small)
    refused(sealer().seal(Kind.STREAM_DATA, 1, bytes(11)), "too-large", o)
    fields = good_fields(kind=int(Kind.REQUEST), deadline_ms=9, name_len=4)
    refused(forge(fields, b"abcd" + b"ok"), "too-large", o)


def test_envelope_is_frozen() -> None:
    env = opener().open(sealer().seal(Kind.RESPONSE, 1, b"x"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.seq = 2  # type: ignore[misc]


# -- fuzzing: only ProtocolError may escape ---------------------------------------------------

VALID = [
    sealer().seal(Kind.REQUEST, 3, b"some request", deadline_ms=100, name="dht.store"),
    sealer().seal(Kind.STREAM_CREDIT, 3, (4096).to_bytes(8, "big")),
    sealer().seal(Kind.ERROR, 3, SAMPLE_PAYLOADS[Kind.ERROR]),
]


def _open_or_protocol_error(message: bytes) -> Envelope | None:
    try:
        return opener().open(message)
    except ProtocolError:
        return None


@st.composite
def mutated(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    return draw(mutated_bytes(draw(st.sampled_from(originals))))


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(message=st.binary(max_size=700))
def test_fuzz_random_bytes(message: bytes) -> None:
    _open_or_protocol_error(message)


@FUZZ
@given(message=mutated(VALID))
def test_fuzz_mutated_envelopes(message: bytes) -> None:
    env = _open_or_protocol_error(message)
    if env is not None:
        # Anything that still opens must be exactly one of the sealed envelopes.
        assert message in VALID


_FIELD_VALUES = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False),
)


@FUZZ
@given(fields=st.lists(_FIELD_VALUES, min_size=0, max_size=9), plain=st.binary(max_size=40))
def test_fuzz_authenticated_headers(fields: list[Any], plain: bytes) -> None:
    """Arbitrary headers sealed under the right key: the field checks, not the tag, refuse."""
    _open_or_protocol_error(forge(fields, plain))


@FUZZ
@given(
    index=st.sampled_from(range(len(FIELDS))),
    value=st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), _FIELD_VALUES),
    plain=st.binary(max_size=300),
)
def test_fuzz_one_field_of_an_authenticated_header(index: int, value: Any, plain: bytes) -> None:
    fields = good_fields()
    fields[index] = value
    env = _open_or_protocol_error(forge(fields, plain))
    if env is not None:  # then the header told the truth about what was sealed
        assert len(plain) == fields[5] + fields[6]
        assert (env.name, bytes(env.payload)) == (plain[: fields[5]].decode(), plain[fields[5] :])
