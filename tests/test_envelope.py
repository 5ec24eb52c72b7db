"""Envelopes: round trips, one targeted tamper per refusal reason, and fuzzing."""

from __future__ import annotations

import dataclasses
from typing import Any

import blake3
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity
from moshpit_trio.wire.envelope import (
    DEFAULT_LIMITS,
    ENVELOPE_DOMAIN,
    Envelope,
    EnvelopeLimits,
    EnvelopeOpener,
    EnvelopeSealer,
    Kind,
)
from moshpit_trio.wire.envelope import _mac as envelope_mac

from .fuzzing import mutated as mutated_bytes

ALICE = Identity.from_seed(bytes([1]) * 32)
BOB = Identity.from_seed(bytes([2]) * 32)
CAROL = Identity.from_seed(bytes([3]) * 32)
SESSION = bytes(range(32))
#: the MAC key of alice -> bob in SESSION (a handshake derives it; any 32 bytes do here)
KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))

FIELDS = (
    "version",
    "kind",
    "session",
    "sender",
    "recipient",
    "seq",
    "call_id",
    "deadline_ms",
    "name",
    "payload_len",
    "payload_hash",
)


def sealer(
    identity: Identity = ALICE,
    session: bytes = SESSION,
    recipient: Identity = BOB,
    key: bytes = KEY,
    **kw: Any,
) -> EnvelopeSealer:
    return EnvelopeSealer(identity.peer_id, session, recipient.peer_id, key, **kw)


def opener(**kw: Any) -> EnvelopeOpener:
    return EnvelopeOpener(KEY, SESSION, ALICE.peer_id, BOB.peer_id, **kw)


def split(message: bytes) -> tuple[list[Any], bytes, bytes]:
    """A message's header fields, MAC and payload."""
    size = int.from_bytes(message[:2], "big")
    header = msgspec.msgpack.decode(message[2 : 2 + size])
    return header, message[2 + size : 2 + size + 32], message[2 + size + 32 :]


def forge(fields: list[Any], payload: bytes, key: bytes | None = KEY, mac: bytes = b"") -> bytes:
    """An envelope with any header; its MAC under ``key`` (or ``mac`` as is)."""
    header = msgspec.msgpack.encode(fields)
    if key is not None:
        mac = blake3.blake3(ENVELOPE_DOMAIN + header, key=key).digest()
    return len(header).to_bytes(2, "big") + header + mac + payload


def good_fields(payload: bytes = b"ok", **changes: Any) -> list[Any]:
    values: dict[str, Any] = {
        "version": 1,
        "kind": int(Kind.RESPONSE),
        "session": SESSION,
        "sender": ALICE.peer_id.to_bytes(),
        "recipient": BOB.peer_id.to_bytes(),
        "seq": 1,
        "call_id": 5,
        "deadline_ms": 0,
        "name": "",
        "payload_len": len(payload),
        "payload_hash": blake3.blake3(payload).digest(),
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


def test_payload_is_a_view_into_the_message() -> None:
    message = sealer().seal(Kind.STREAM_DATA, 1, b"x" * 1000)
    env = opener().open(message)
    assert env.payload.obj is message
    assert env.payload.readonly


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


def test_seal_parts_is_seal_in_two_pieces() -> None:
    data = bytes(range(256)) * 40
    s1, s2 = sealer(), sealer()
    head, body = s1.seal_parts(Kind.REQUEST, 3, data, deadline_ms=50, name="f")
    assert head + body == s2.seal(Kind.REQUEST, 3, data, deadline_ms=50, name="f")
    assert body is data  # bytes go out as they are: nothing can change them
    view = memoryview(data)[10:20]
    assert s1.seal_parts(Kind.STREAM_DATA, 3, view)[1] is view


@pytest.mark.parametrize("make", [bytearray, lambda b: memoryview(bytearray(b))])
def test_seal_parts_copies_a_payload_its_owner_can_change(make: Any) -> None:
    buf = make(b"abcdef")
    head, body = sealer().seal_parts(Kind.STREAM_DATA, 1, buf)
    buf[:3] = b"xyz"  # the caller reuses its buffer after sending
    env = opener().open(head + bytes(body))
    assert bytes(env.payload) == b"abcdef"  # what was hashed is what goes out


def test_shared_payload_slices_seal_like_bytes_and_hash_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from moshpit_trio.wire import envelope

    data = bytes(range(256)) * 100
    shared = envelope.SharedPayload(data)
    calls: list[int] = []
    real_hash = envelope._hash

    def counting_hash(payload: Any) -> bytes:
        calls.append(len(payload))
        return real_hash(payload)

    monkeypatch.setattr(envelope, "_hash", counting_hash)
    for _ in range(3):  # three connections, three sealers, one digest per slice
        s, plain = sealer(), sealer()
        for start in range(0, len(data), 7000):
            head, body = s.seal_parts(Kind.STREAM_DATA, 1, shared.slice(start, start + 7000))
            want = plain.seal(Kind.STREAM_DATA, 1, data[start : start + 7000])
            assert head + bytes(body) == want
    assert len(calls) == 4 + 3 * 4  # four slices hashed once; the plain seals hash each time
    assert len(shared.slice(25_000, 99_999)) == 600  # clamped like a slice
    with pytest.raises(ConfigError):
        envelope.SharedPayload(bytearray(3))  # type: ignore[arg-type]


def test_borrowed_payload_goes_out_uncopied_and_seals_like_bytes() -> None:
    import numpy as np

    from moshpit_trio.wire import envelope

    values = np.arange(3000, dtype=np.float32)
    shared = envelope.SharedPayload.borrow(memoryview(values))  # a float view, cast to bytes
    assert len(shared) == values.nbytes
    s, plain = sealer(), sealer()
    for start in range(0, values.nbytes, 5000):
        head, body = s.seal_parts(Kind.STREAM_DATA, 1, shared.slice(start, start + 5000))
        assert isinstance(body, memoryview) and body.obj is not None
        assert np.shares_memory(np.frombuffer(body, dtype=np.uint8), values)  # no copy
        want = plain.seal(Kind.STREAM_DATA, 1, values.tobytes()[start : start + 5000])
        assert head + bytes(body) == want
    with pytest.raises(ConfigError):
        envelope.SharedPayload.borrow(memoryview(values)[::2])  # not contiguous


def test_seal_refuses_a_payload_that_is_not_flat_bytes() -> None:
    words = memoryview(bytearray(8)).cast("I")  # two 4-byte items, 8 bytes
    with pytest.raises(ConfigError):
        sealer().seal(Kind.STREAM_DATA, 1, words)
    strided = memoryview(bytes(8))[::2]
    with pytest.raises(ConfigError):
        sealer().seal(Kind.STREAM_DATA, 1, strided)


def test_full_size_payloads_open() -> None:
    s, o = sealer(), opener()
    for kind in Kind:
        cap = DEFAULT_LIMITS.max_payload[kind]
        named = kind in (Kind.REQUEST, Kind.STREAM_OPEN)
        message = s.seal(kind, 1, bytes(cap), name="n" * 128 if named else "")
        assert len(o.open(message).payload) == cap


def test_limits() -> None:
    assert DEFAULT_LIMITS.max_message == 2 + 512 + 32 + 4 * 1024 * 1024
    assert DEFAULT_LIMITS.max_payload[Kind.STREAM_CREDIT] == 8
    assert DEFAULT_LIMITS.max_payload[Kind.CANCEL] == 0
    assert DEFAULT_LIMITS.max_payload[Kind.GOODBYE] == 1024
    with pytest.raises(ConfigError):
        EnvelopeLimits(max_payload={Kind.REQUEST: 10})
    with pytest.raises(ConfigError):
        EnvelopeLimits(max_header=70000)
    custom = EnvelopeLimits(max_payload={**DEFAULT_LIMITS.max_payload, Kind.STREAM_DATA: 1 << 24})
    assert custom.max_message == 2 + 512 + 32 + (1 << 24)


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


def test_header_layout() -> None:
    message = sealer().seal(Kind.REQUEST, 9, b"body", deadline_ms=250, name="dht.find")
    header, mac, payload = split(message)
    assert dict(zip(FIELDS, header, strict=True)) == {
        "version": 1,
        "kind": 1,
        "session": SESSION,
        "sender": ALICE.peer_id.to_bytes(),
        "recipient": BOB.peer_id.to_bytes(),
        "seq": 1,
        "call_id": 9,
        "deadline_ms": 250,
        "name": "dht.find",
        "payload_len": 4,
        "payload_hash": blake3.blake3(b"body").digest(),
    }
    assert payload == b"body"
    size = int.from_bytes(message[:2], "big")
    # keyed blake3 over the domain and the exact header bytes
    assert mac == blake3.blake3(ENVELOPE_DOMAIN + message[2 : 2 + size], key=KEY).digest()
    assert mac == envelope_mac(KEY, message[2 : 2 + size])


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
        EnvelopeSealer(ALICE.peer_id, b"short", BOB.peer_id, KEY)
    with pytest.raises(ConfigError):
        EnvelopeSealer(ALICE.peer_id, SESSION, BOB.peer_id, KEY[:31])
    with pytest.raises(ConfigError):
        EnvelopeOpener(KEY, b"short", ALICE.peer_id, BOB.peer_id)
    with pytest.raises(ConfigError):
        EnvelopeOpener(KEY + b"x", SESSION, ALICE.peer_id, BOB.peer_id)
    with pytest.raises(ConfigError):
        EnvelopeOpener(bytearray(KEY), SESSION, ALICE.peer_id, BOB.peer_id)  # type: ignore[arg-type]


# -- one tamper per reason -----------------------------------------------------------------------


def test_tampered_payload_is_hash() -> None:
    message = bytearray(sealer().seal(Kind.STREAM_DATA, 1, b"tensor bytes"))
    message[-1] ^= 0x01
    refused(message, "hash")


def test_tampered_header_byte_is_mac() -> None:
    message = sealer().seal(Kind.RESPONSE, 0x41, b"ok")
    header, mac, payload = split(message)
    header[FIELDS.index("call_id")] = 0x42  # same encoded size, still a valid header
    refused(forge(header, payload, key=None, mac=mac), "mac")


def test_tampered_mac_is_mac() -> None:
    message = bytearray(sealer().seal(Kind.RESPONSE, 1, b"ok"))
    size = int.from_bytes(message[:2], "big")
    message[2 + size + 10] ^= 0x80
    refused(message, "mac")


def test_mac_under_another_key_is_mac() -> None:
    # another session's key, or the other direction's: the header alone names the right peers
    refused(forge(good_fields(), b"ok", key=OTHER_KEY), "mac")
    refused(sealer(key=OTHER_KEY).seal(Kind.RESPONSE, 5, b"ok"), "mac")


@pytest.mark.parametrize("index", range(2, 2 + 30))
def test_any_header_byte_flip_is_refused(index: int) -> None:
    message = bytearray(sealer().seal(Kind.REQUEST, 7, b"p", deadline_ms=9, name="a.b"))
    message[index] ^= 0x04
    op = opener()
    with pytest.raises(ProtocolError) as info:
        op.open(message)
    assert op.last_seq == 0
    assert info.value.reason in {
        "mac",
        "malformed",
        "session",
        "sender",
        "recipient",
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
    tampered = bytearray(genuine)
    tampered[-1] ^= 0xFF
    refused(tampered, "hash", o)
    assert o.open(genuine).seq == 1


@pytest.mark.parametrize("seq", [0, 2, 2**64 - 1])
def test_wrong_first_seq(seq: int) -> None:
    refused(forge(good_fields(seq=seq), b"ok"), "seq")


def test_other_session() -> None:
    refused(sealer(session=bytes(32)).seal(Kind.RESPONSE, 1), "session")


def test_other_recipient() -> None:
    refused(sealer(recipient=CAROL).seal(Kind.RESPONSE, 1), "recipient")


def test_other_sender() -> None:
    refused(sealer(identity=CAROL).seal(Kind.RESPONSE, 1), "sender")


def test_unknown_kind() -> None:
    for kind in (0, 10, 255, 2**64 - 1):
        refused(forge(good_fields(kind=kind), b"ok"), "kind")


def test_other_version() -> None:
    refused(forge(good_fields(version=2), b"ok"), "version")
    # A future version may lay out its header differently: still "version", not "malformed".
    refused(forge([2, "something", "else"], b""), "version")
    refused(forge(good_fields(version=0), b"ok"), "version")


@pytest.mark.parametrize(
    ("fields", "payload"),
    [
        (good_fields(payload_len=3), b"ok"),
        (good_fields(payload_len=1), b"ok"),
        (good_fields(call_id=-1), b"ok"),
        (good_fields(seq=-1), b"ok"),
        (good_fields(deadline_ms=-5), b"ok"),
        (good_fields(call_id=True), b"ok"),
        (good_fields(call_id=1.5), b"ok"),
        (good_fields(call_id=None), b"ok"),
        (good_fields(name=b"bytes"), b"ok"),
        (good_fields(session="x" * 32), b"ok"),
        (good_fields(session=SESSION[:31]), b"ok"),
        (good_fields(sender=ALICE.peer_id.to_bytes() + b"\x00"), b"ok"),
        (good_fields(payload_hash=bytes(31)), b"ok"),
        (good_fields(kind=-1), b"ok"),
        (good_fields(kind="1"), b"ok"),
        (good_fields()[:10], b"ok"),
        ([*good_fields(), 0], b"ok"),
        (good_fields(name="x"), b"ok"),
        (good_fields(deadline_ms=1), b"ok"),
        (good_fields(kind=int(Kind.REQUEST), name=""), b"ok"),
        (good_fields(b"1234567", kind=int(Kind.STREAM_CREDIT)), b"1234567"),
        ({"version": 1}, b""),
        ([[1] * 11], b""),
    ],
)
def test_malformed_header(fields: Any, payload: bytes) -> None:
    refused(forge(fields, payload), "malformed")


def test_name_that_is_not_utf8_is_malformed() -> None:
    fields = good_fields(kind=int(Kind.REQUEST), name="\x01\x02\x03")
    message = forge(fields, b"ok")
    bad = message.replace(b"\xa3\x01\x02\x03", b"\xa3\xff\xfe\xfd")
    assert bad != message
    refused(bad, "malformed")


def test_deeply_nested_header_is_malformed() -> None:
    header = b"\x91" * 500 + b"\x01"
    refused(len(header).to_bytes(2, "big") + header + bytes(64), "malformed")


@pytest.mark.parametrize(
    "message",
    [b"", b"\x00", b"\x00\x00", b"\x00\x05abc", b"\x00\x00" + bytes(63), b"\xff", bytes(100)],
)
def test_garbage_is_malformed(message: bytes) -> None:
    refused(message, "malformed")


def test_text_message_is_malformed() -> None:
    with pytest.raises(ProtocolError) as info:
        opener().open("a text websocket message")  # type: ignore[arg-type]
    assert info.value.reason == "malformed"


def test_oversized_header() -> None:
    refused((513).to_bytes(2, "big") + bytes(600), "too-large")
    refused(b"\xff\xff", "too-large")


def test_oversized_name() -> None:
    refused(forge(good_fields(kind=int(Kind.REQUEST), name="x" * 129), b"ok"), "too-large")
    refused(forge(good_fields(kind=int(Kind.REQUEST), name="é" * 65), b"ok"), "too-large")


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


def test_oversized_4mib_payload_is_refused_before_hashing() -> None:
    size = 4 * 1024 * 1024 + 1
    # A wrong hash: if the opener hashed before checking the size it would say "hash".
    message = forge(good_fields(payload_len=size, kind=int(Kind.STREAM_DATA)), bytes(size))
    refused(message, "too-large")


def test_custom_smaller_limits() -> None:
    small = EnvelopeLimits(
        max_payload={**DEFAULT_LIMITS.max_payload, Kind.STREAM_DATA: 10}, max_name=3
    )
    o = opener(limits=small)
    s = sealer()
    refused(s.seal(Kind.STREAM_DATA, 1, bytes(11)), "too-large", o)
    refused(forge(good_fields(kind=int(Kind.REQUEST), name="abcd"), b"ok"), "too-large", o)


def test_mac_is_checked_before_the_hash() -> None:
    header, _, _ = split(sealer().seal(Kind.STREAM_DATA, 1, b"data"))
    refused(forge(header, b"DATA", key=None, mac=bytes(32)), "mac")


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


@FUZZ
@given(
    fields=st.lists(
        st.one_of(
            st.integers(min_value=-(2**63), max_value=2**64 - 1),
            st.binary(max_size=40),
            st.text(max_size=20),
            st.booleans(),
            st.none(),
            st.floats(allow_nan=False),
        ),
        min_size=0,
        max_size=13,
    ),
    payload=st.binary(max_size=20),
)
def test_fuzz_signed_headers(fields: list[Any], payload: bytes) -> None:
    """Arbitrary headers with a correct MAC: the field checks, not the MAC, refuse."""
    _open_or_protocol_error(forge(fields, payload))


@FUZZ
@given(
    index=st.sampled_from(range(len(FIELDS))),
    value=st.one_of(
        st.integers(min_value=-(2**63), max_value=2**64 - 1),
        st.binary(max_size=40),
        st.text(max_size=200),
        st.booleans(),
    ),
)
def test_fuzz_one_field_of_a_signed_header(index: int, value: Any) -> None:
    fields = good_fields()
    fields[index] = value
    _open_or_protocol_error(forge(fields, b"ok"))
