"""DHT records: encoding, validation, the conflict rule, the store's caps, and the vectors."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshpit_trio.dht.records import (
    DEFAULT_POLICY,
    NamespacePolicy,
    Namespaces,
    Record,
    RecordRejected,
    RecordStore,
    VerifiedSignatures,
    accept_answer,
    decode_records,
    encode_records,
    key_id,
    make_record,
    merge,
    namespace_of,
    newer,
    record_message,
    validate,
)
from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity

NOW = 1_700_000_000.0
OWNED = NamespacePolicy(b"mp.avg", max_ttl=600.0, owned=True, max_subkeys=8)
SMALL = NamespacePolicy(b"small", max_ttl=3600.0, max_value_size=16, max_subkeys=4)
AVG_KEY = b"mp.avg/run/g1/r1"
VECTORS = Path(__file__).resolve().parents[1] / "protocol" / "vectors"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# The tests that draw structured data spend their time in hypothesis itself; fewer suffice.
FEW = settings(FUZZ, max_examples=100)


def namespaces() -> Namespaces:
    return Namespaces([OWNED, SMALL])


def store(**kwargs: Any) -> RecordStore:
    return RecordStore(namespaces(), **kwargs)


def rejected(reason: str) -> Any:
    """pytest.raises for a RecordRejected with this reason tag."""
    return pytest.raises(RecordRejected, match=f"^{reason}")


def with_fields(record: Record, **changes: Any) -> Record:
    return msgspec.structs.replace(record, **changes)


# -- keys and namespaces ------------------------------------------------------------------------


def test_key_id_is_the_domain_separated_sha256() -> None:
    import hashlib

    assert key_id(b"hello") == hashlib.sha256(b"moshpit/1 dht key\x00hello").digest()
    assert len(key_id(b"x")) == 32
    assert make_record(b"hello", b"v", NOW + 1).id == key_id(b"hello")


@pytest.mark.parametrize(
    ("key", "namespace"),
    [(b"a/b/c", b"a"), (b"abc", b""), (b"/abc", b""), (b"mp.avg/", b"mp.avg"), (b"", b"")],
)
def test_namespace_is_what_precedes_the_first_slash(key: bytes, namespace: bytes) -> None:
    assert namespace_of(key) == namespace


def test_namespaces_choose_the_policy_by_namespace() -> None:
    ns = namespaces()
    assert ns.policy_for(b"mp.avg/x") is OWNED
    assert ns.policy_for(b"mp.avg") is DEFAULT_POLICY  # no "/": namespace b""
    assert ns.policy_for(b"other/x") is DEFAULT_POLICY
    ns.register(OWNED)  # the same rules again: fine
    with pytest.raises(ConfigError):
        ns.register(NamespacePolicy(b"mp.avg", max_ttl=60.0))
    assert list(ns) == [OWNED, SMALL]
    custom = NamespacePolicy(b"", max_ttl=5.0)
    assert Namespaces(default=custom).policy_for(b"x/y") is custom


@pytest.mark.parametrize(
    "kwargs",
    [
        {"namespace": b"a/b", "max_ttl": 1.0},
        {"namespace": b"a", "max_ttl": 0.0},
        {"namespace": b"a", "max_ttl": math.inf},
        {"namespace": b"a", "max_ttl": 1.0, "max_value_size": -1},
        {"namespace": b"a", "max_ttl": 1.0, "max_subkeys": 0},
        {"namespace": "a", "max_ttl": 1.0},
        {"namespace": b"a", "max_ttl": 1.0, "keyed_by_owner": True},  # not owned
    ],
)
def test_bad_policies_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        NamespacePolicy(**kwargs)


# -- making and encoding records ----------------------------------------------------------------


def test_make_record_signs_under_the_owners_peer_id(identities: list[Identity]) -> None:
    alice = identities[0]
    record = make_record(AVG_KEY, b"v", NOW + 60, owner=alice)
    assert record.subkey == alice.peer_id.to_bytes()
    assert record.owner_key == alice.public_key
    assert len(record.signature) == 64
    assert make_record(AVG_KEY, b"v", NOW + 60, subkey=record.subkey, owner=alice) == record
    validate(record, OWNED, NOW)
    with pytest.raises(ConfigError):
        make_record(AVG_KEY, b"v", NOW + 60, subkey=identities[1].peer_id.to_bytes(), owner=alice)


@pytest.mark.parametrize(
    "args",
    [
        (b"", b"v", NOW),
        (b"k" * 257, b"v", NOW),
        (b"k", b"v", math.nan),
        (b"k", b"v", math.inf),
        (b"k", b"v", True),
        (b"k", b"v", "soon"),
    ],
)
def test_make_record_refuses_what_no_namespace_accepts(args: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigError):
        make_record(*args)
    with pytest.raises(ConfigError):
        make_record(b"k", b"v", NOW, subkey=b"s" * 65)


def test_make_record_stores_expiration_as_float() -> None:
    record = make_record(b"k", b"v", int(NOW) + 5)
    assert type(record.expiration) is float


records_strategy = st.builds(
    Record,
    key=st.binary(max_size=300),
    subkey=st.binary(max_size=70),
    value=st.binary(max_size=100),
    expiration=st.floats(allow_nan=False, allow_infinity=False),
    owner_key=st.binary(max_size=40),
    signature=st.binary(max_size=70),
)


@FEW
@given(records=st.lists(records_strategy, max_size=5))
def test_encode_decode_round_trip(records: list[Record]) -> None:
    data = encode_records(records)
    assert decode_records(data) == records
    assert decode_records(memoryview(data)) == records
    assert encode_records(decode_records(data)) == data
    for record in records:  # arbitrary fields: validation refuses, never crashes
        for policy in (DEFAULT_POLICY, OWNED):
            with contextlib.suppress(RecordRejected):
                validate(record, policy, NOW)


def test_wire_form_is_an_array_of_six_field_arrays(identities: list[Identity]) -> None:
    record = make_record(AVG_KEY, b"v", NOW + 60, owner=identities[0])
    decoded = msgspec.msgpack.decode(encode_records([record]))
    assert decoded == [[AVG_KEY, record.subkey, b"v", NOW + 60, record.owner_key, record.signature]]
    # The signed bytes: domain, then [key, subkey, value, float64 expiration].
    message = record_message(AVG_KEY, record.subkey, b"v", NOW + 60)
    assert message.startswith(b"moshpit/1 record\x00\x94")
    assert message.endswith(b"\xcb" + msgspec.msgpack.encode(NOW + 60)[1:])


# -- validation ---------------------------------------------------------------------------------


def test_value_size_cap() -> None:
    validate(make_record(b"small/k", b"v" * 16, NOW + 60), SMALL, NOW)
    with rejected("too-large"):
        validate(make_record(b"small/k", b"v" * 17, NOW + 60), SMALL, NOW)
    with rejected("too-large"):
        store().put(make_record(b"x", bytes(64 * 1024 + 1), NOW + 60), NOW)


def test_key_and_subkey_sizes() -> None:
    good = make_record(b"k", b"v", NOW + 60)
    with rejected("malformed"):
        validate(with_fields(good, key=b""), DEFAULT_POLICY, NOW)
    with rejected("too-large"):
        validate(with_fields(good, key=b"k" * 257), DEFAULT_POLICY, NOW)
    validate(with_fields(good, key=b"k" * 256, subkey=b"s" * 64), DEFAULT_POLICY, NOW)
    with rejected("subkey"):
        validate(with_fields(good, subkey=b"s" * 65), DEFAULT_POLICY, NOW)


def test_wrongly_typed_local_records_are_malformed() -> None:
    good = make_record(b"k", b"v", NOW + 60)
    for changes in ({"key": "k"}, {"value": bytearray(b"v")}, {"expiration": True}):
        with rejected("malformed"):
            validate(with_fields(good, **changes), DEFAULT_POLICY, NOW)
    for bad in (math.nan, math.inf):
        with rejected("malformed"):
            validate(with_fields(good, expiration=bad), DEFAULT_POLICY, NOW)


def test_expired_and_ttl() -> None:
    policy = NamespacePolicy(b"t", max_ttl=100.0)
    validate(make_record(b"t/k", b"v", NOW + 0.001), policy, NOW)
    with rejected("expired"):
        validate(make_record(b"t/k", b"v", NOW), policy, NOW)
    with rejected("expired"):
        validate(make_record(b"t/k", b"v", NOW - 5), policy, NOW)
    validate(make_record(b"t/k", b"v", NOW + 130), policy, NOW)  # max_ttl + 30 s of skew
    with rejected("ttl"):
        validate(make_record(b"t/k", b"v", NOW + 130.5), policy, NOW)
    validate(make_record(b"t/k", b"v", NOW + 100), policy, NOW, max_clock_skew=0.0)
    with rejected("ttl"):
        validate(make_record(b"t/k", b"v", NOW + 100.5), policy, NOW, max_clock_skew=0.0)


def test_a_record_expiring_in_a_year_is_refused(identities: list[Identity]) -> None:
    s = store()
    year = NOW + 365 * 24 * 3600
    with rejected("ttl"):
        s.put(make_record(b"hello", b"v", year), NOW)
    with rejected("ttl"):
        s.put(make_record(AVG_KEY, b"v", year, owner=identities[0]), NOW)
    assert len(s) == 0


def test_a_key_named_after_its_owner_takes_that_owner_only(identities: list[Identity]) -> None:
    # mp.relay/C: only C writes there, so nobody can fill C's key (max_subkeys) with records
    # that expire later than C's and crowd C's own out.
    policy = NamespacePolicy(b"r", max_ttl=600.0, owned=True, max_subkeys=2, keyed_by_owner=True)
    alice, bob = identities[:2]
    alices_key = b"r/" + str(alice.peer_id).encode()
    validate(make_record(alices_key, b"v", NOW + 60, owner=alice), policy, NOW)
    with rejected("owner"):
        validate(make_record(alices_key, b"v", NOW + 60, owner=bob), policy, NOW)
    with rejected("owner"):  # a key not named after any peer: nobody's
        validate(make_record(b"r/somebody", b"v", NOW + 60, owner=alice), policy, NOW)
    s = RecordStore(Namespaces([policy]))
    s.put(make_record(alices_key, b"mine", NOW + 60, owner=alice), NOW)
    for other in identities[1:]:
        with rejected("owner"):
            s.put(make_record(alices_key, b"junk", NOW + 500, owner=other), NOW)
    assert [r.value for r in s.get(key_id(alices_key), NOW)] == [b"mine"]


def test_owned_namespace_rules(identities: list[Identity]) -> None:
    alice, bob, carol = identities[:3]
    mine = make_record(AVG_KEY, b"v", NOW + 60, owner=alice)
    validate(mine, OWNED, NOW)
    # Unsigned, even under the right subkey.
    with rejected("owner"):
        validate(make_record(AVG_KEY, b"v", NOW + 60, subkey=mine.subkey), OWNED, NOW)
    # The subkey must be a PeerID...
    with rejected("subkey"):
        validate(with_fields(mine, subkey=b""), OWNED, NOW)
    # ...and the signer's own: alice cannot write bob's entry, even with a valid signature.
    bobs_subkey = bob.peer_id.to_bytes()
    signature = alice.sign(record_message(AVG_KEY, bobs_subkey, b"v", NOW + 60))
    with rejected("owner"):
        validate(with_fields(mine, subkey=bobs_subkey, signature=signature), OWNED, NOW)
    # Forgeries: any change to a signed field, or a signature by someone else.
    with rejected("signature"):
        validate(with_fields(mine, value=b"w"), OWNED, NOW)
    with rejected("signature"):
        validate(with_fields(mine, expiration=NOW + 61), OWNED, NOW)
    with rejected("signature"):
        validate(with_fields(mine, key=b"mp.avg/other"), OWNED, NOW)
    forged = carol.sign(record_message(AVG_KEY, mine.subkey, b"v", NOW + 60))
    with rejected("signature"):
        validate(with_fields(mine, signature=forged), OWNED, NOW)
    with rejected("signature"):
        validate(with_fields(mine, signature=bytes(64)), OWNED, NOW)
    with rejected("signature"):
        validate(with_fields(mine, signature=mine.signature[:63]), OWNED, NOW)
    with rejected("owner"):
        validate(with_fields(mine, owner_key=b""), OWNED, NOW)
    with rejected("owner"):
        validate(with_fields(mine, owner_key=alice.public_key[:31]), OWNED, NOW)


def test_unowned_namespaces_verify_signatures_that_are_present(identities: list[Identity]) -> None:
    signed = make_record(b"hello", b"v", NOW + 60, owner=identities[0])
    validate(signed, DEFAULT_POLICY, NOW)
    with rejected("signature"):
        validate(with_fields(signed, value=b"w"), DEFAULT_POLICY, NOW)
    with rejected("owner"):
        validate(with_fields(signed, signature=b""), DEFAULT_POLICY, NOW)
    with rejected("owner"):
        validate(with_fields(signed, owner_key=b""), DEFAULT_POLICY, NOW)


def test_cheap_checks_come_before_the_signature(identities: list[Identity]) -> None:
    forged = with_fields(make_record(AVG_KEY, b"v", NOW + 60, owner=identities[0]), value=b"w")
    with rejected("expired"):
        validate(forged, OWNED, NOW + 60)
    with rejected("ttl"):
        validate(forged, OWNED, NOW - 1000)
    with rejected("too-large"):
        validate(with_fields(forged, value=b"w" * 20), SMALL, NOW)


def test_the_rejection_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as info:
        validate(make_record(b"k", b"v", NOW), DEFAULT_POLICY, NOW)
    assert isinstance(info.value, RecordRejected)
    assert info.value.reason == "expired"


# -- the conflict rule and the store ------------------------------------------------------------


def test_newer_wins_and_older_is_ignored() -> None:
    s = store()
    old, new = make_record(b"k", b"old", NOW + 60), make_record(b"k", b"new", NOW + 61)
    assert s.put(old, NOW) is True
    assert s.put(new, NOW) is True
    assert s.put(old, NOW) is False
    assert s.put(new, NOW) is False  # the same record again
    assert s.get(key_id(b"k"), NOW) == [new]
    assert len(s) == 1
    assert s.bytes_used == new.nbytes


def test_equal_expiration_larger_value_then_signature_wins(identities: list[Identity]) -> None:
    a = make_record(b"k", b"a", NOW + 60)
    b = make_record(b"k", b"b", NOW + 60)
    signed = make_record(b"k", b"b", NOW + 60, subkey=b"", owner=identities[0])
    assert newer(b, a) and not newer(a, b)
    assert newer(with_fields(signed, subkey=b""), b)  # same value: the signature decides
    for first, second in ((a, b), (b, a)):
        s = store()
        s.put(first, NOW)
        s.put(second, NOW)
        assert s.get(key_id(b"k"), NOW) == [b]


def test_an_expired_copy_does_not_block_an_older_live_one() -> None:
    s = store()
    s.put(make_record(b"k", b"first", NOW + 10), NOW)
    later = make_record(b"k", b"second", NOW + 8)
    assert s.put(later, NOW + 5) is False  # the first is still live and newer
    assert s.put(make_record(b"k", b"third", NOW + 30), NOW + 20) is True
    assert len(s) == 1


def _conflicting_records() -> list[Record]:
    """Records under one key: few subkeys, few expirations, so that many of them conflict."""
    out = []
    for subkey, exp, value in itertools.product((b"", b"a", b"b"), (10, 20), (b"", b"x", b"y")):
        out.append(make_record(b"k", value, NOW + exp, subkey=subkey))
    return out


@FEW
@given(order=st.permutations(_conflicting_records()), extra=st.randoms(use_true_random=False))
def test_any_arrival_order_gives_the_same_content(
    order: list[Record], extra: random.Random
) -> None:
    expected = merge(_conflicting_records())
    s = store()
    for record in order:
        s.put(record, NOW)
        if extra.random() < 0.2:  # duplicates change nothing either
            s.put(extra.choice(order), NOW)
    assert {r.subkey: r for r in s.get(key_id(b"k"), NOW)} == expected
    assert merge(order) == expected
    assert len(s) == 3


def test_expiry_hides_then_frees() -> None:
    s = store()
    s.put(make_record(b"k", b"v", NOW + 10), NOW)
    s.put(make_record(b"k", b"w", NOW + 20, subkey=b"s"), NOW)
    s.put(make_record(b"j", b"v", NOW + 10), NOW)
    assert len(s.get(key_id(b"k"), NOW + 9.9)) == 2
    assert [r.subkey for r in s.get(key_id(b"k"), NOW + 10)] == [b"s"]
    assert s.get(key_id(b"j"), NOW + 10) == []
    assert len(s) == 3  # hidden, not yet freed
    assert s.expire(NOW + 10) == 2
    assert len(s) == 1
    assert s.expire(NOW + 10) == 0
    assert s.expire(NOW + 20) == 1
    assert len(s) == 0 and s.bytes_used == 0
    assert s.get(key_id(b"k"), NOW) == []


def test_expire_after_replacements_counts_each_record_once() -> None:
    s = store()
    for i in range(5000):  # replacements leave heap entries behind; compaction bounds them
        s.put(make_record(b"k", b"v", NOW + 1 + i * 0.001), NOW)
    assert len(s) == 1
    assert len(s._heap) <= 2 * len(s) + 1024
    assert s.expire(NOW + 100) == 1
    assert len(s) == 0 and s.bytes_used == 0


def test_owned_store_writes_withdrawals_and_forgeries(identities: list[Identity]) -> None:
    alice, bob = identities[:2]
    s = store()
    entry = make_record(AVG_KEY, b"here", NOW + 60, owner=alice)
    assert s.put(entry, NOW)
    assert s.put(make_record(AVG_KEY, b"bob", NOW + 60, owner=bob), NOW)
    # bob cannot overwrite or withdraw alice's entry.
    signature = bob.sign(record_message(AVG_KEY, entry.subkey, b"", NOW + 61))
    withdrawal_by_bob = with_fields(entry, value=b"", expiration=NOW + 61, signature=signature)
    with rejected("signature"):
        s.put(withdrawal_by_bob, NOW)
    with rejected("owner"):  # naming bob's own key: his key is not the subkey's owner
        s.put(with_fields(withdrawal_by_bob, owner_key=bob.public_key), NOW)
    with rejected("signature"):
        s.put(with_fields(entry, value=b"forged", expiration=NOW + 61), NOW)
    assert entry in s.get(key_id(AVG_KEY), NOW)
    # alice can: a tombstone with a later expiration replaces her entry everywhere it goes.
    tombstone = make_record(AVG_KEY, b"", NOW + 61, owner=alice)
    assert tombstone.withdrawn and not entry.withdrawn
    assert s.put(tombstone, NOW)
    assert s.put(entry, NOW) is False  # the old announcement cannot come back
    records = s.get(key_id(AVG_KEY), NOW)
    assert tombstone in records and entry not in records and len(records) == 2
    # At equal expiration the announcement (larger value) wins: a withdrawal must be later.
    assert newer(entry, make_record(AVG_KEY, b"", NOW + 60, owner=alice))


def test_ten_thousand_subkeys_fill_the_key_then_full() -> None:
    s = store()
    results, reasons = [], []
    for i in range(10_000):
        try:
            results.append(s.put(make_record(b"k", b"v", NOW + 10, subkey=b"%d" % i), NOW))
        except RecordRejected as exc:
            reasons.append(exc.reason)
    assert results == [True] * DEFAULT_POLICY.max_subkeys
    assert set(reasons) == {"full"} and len(reasons) == 10_000 - DEFAULT_POLICY.max_subkeys
    assert len(s.get(key_id(b"k"), NOW)) == DEFAULT_POLICY.max_subkeys
    # Existing subkeys can still be replaced, and other keys still stored.
    assert s.put(make_record(b"k", b"w", NOW + 11, subkey=b"0"), NOW)
    assert s.put(make_record(b"other", b"v", NOW + 10), NOW)
    # Once those subkeys expire, new ones have room again.
    assert s.put(make_record(b"k", b"v", NOW + 20, subkey=b"new"), NOW + 10)
    assert len(s.get(key_id(b"k"), NOW + 10)) == 2


def test_owned_namespace_subkey_cap(identities: list[Identity]) -> None:
    s = store()
    peers = [Identity.from_seed(bytes([100 + i]) * 32) for i in range(OWNED.max_subkeys + 2)]
    stored = 0
    for peer in peers:
        try:
            stored += s.put(make_record(AVG_KEY, b"v", NOW + 60, owner=peer), NOW)
        except RecordRejected as exc:
            assert exc.reason == "full"
    assert stored == OWNED.max_subkeys


def test_max_keys_and_max_bytes() -> None:
    s = store(max_keys=3)
    for k in (b"a", b"b", b"c"):
        s.put(make_record(k, b"v", NOW + 10), NOW)
    with rejected("full"):
        s.put(make_record(b"d", b"v", NOW + 10), NOW)
    assert s.put(make_record(b"a", b"v", NOW + 10, subkey=b"s"), NOW)  # an existing key
    assert s.put(make_record(b"d", b"v", NOW + 20), NOW + 10)  # the others expired

    one = make_record(b"a", bytes(1000), NOW + 10)
    s = store(max_bytes=3 * one.nbytes)
    for k in (b"a", b"b", b"c"):
        s.put(make_record(k, bytes(1000), NOW + 10), NOW)
    assert s.bytes_used == 3 * one.nbytes
    with rejected("full"):
        s.put(make_record(b"d", b"", NOW + 10), NOW)
    with rejected("full"):  # growing an existing record counts too
        s.put(make_record(b"a", bytes(1001), NOW + 11), NOW)
    assert s.put(make_record(b"a", bytes(999), NOW + 11), NOW)  # shrinking is fine
    assert s.bytes_used == 3 * one.nbytes - 1


def test_invalid_records_never_reach_the_store() -> None:
    s = store()
    with rejected("expired"):
        s.put(make_record(b"k", b"v", NOW), NOW)
    with rejected("owner"):
        s.put(make_record(AVG_KEY, b"v", NOW + 10, subkey=bytes(32)), NOW)
    assert len(s) == 0 and s.bytes_used == 0


def test_records_lists_everything_held() -> None:
    s = store()
    made = [make_record(k, b"v", NOW + 10) for k in (b"a", b"b")]
    for r in made:
        s.put(r, NOW)
    assert sorted(s.records(), key=lambda r: r.key) == made


# -- answers from other nodes -------------------------------------------------------------------


def test_merge_picks_the_newest_per_subkey() -> None:
    a1, a2 = (
        make_record(b"k", b"1", NOW + 10, subkey=b"a"),
        make_record(b"k", b"2", NOW + 20, subkey=b"a"),
    )
    b1 = make_record(b"k", b"1", NOW + 5, subkey=b"b")
    assert merge([a2, b1, a1]) == {b"a": a2, b"b": b1}
    assert merge([a1, a2, b1]) == merge([b1, a2, a1])
    assert merge([]) == {}


def test_accept_answer_drops_forgeries_and_caps_subkeys(identities: list[Identity]) -> None:
    alice, bob = identities[:2]
    ns = namespaces()
    good = make_record(AVG_KEY, b"v", NOW + 60, owner=alice)
    older = make_record(AVG_KEY, b"old", NOW + 30, owner=alice)
    forged = with_fields(make_record(AVG_KEY, b"v", NOW + 60, owner=bob), value=b"evil")
    other_key = make_record(b"mp.avg/elsewhere", b"v", NOW + 60, owner=bob)
    year = make_record(b"hello", b"v", NOW + 365 * 86400)
    assert accept_answer(AVG_KEY, [older, forged, good, other_key], ns, NOW) == [good]
    assert accept_answer(b"hello", [year], ns, NOW) == []
    flood = [make_record(b"small/k", b"v", NOW + i + 1, subkey=b"%d" % i) for i in range(100)]
    kept = accept_answer(b"small/k", flood, ns, NOW)
    assert len(kept) == SMALL.max_subkeys
    assert {r.subkey for r in kept} == {b"96", b"97", b"98", b"99"}  # those expiring last
    assert kept == sorted(kept, key=lambda r: r.subkey)


# -- decoding hostile bytes ---------------------------------------------------------------------


def _valid_message() -> bytes:
    alice = Identity.from_seed(bytes([1]) * 32)
    return encode_records(
        [
            make_record(AVG_KEY, b"value", NOW + 60, owner=alice),
            make_record(b"hello", b"", NOW + 1, subkey=b"s"),
        ]
    )


VALID = _valid_message()


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "flip" and out:
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and out:
            del out[pos : pos + draw(st.integers(1, 8))]
        else:
            del out[pos:]
    return bytes(out)


def _decode_or_reject(data: bytes) -> list[Record] | None:
    try:
        records = decode_records(data)
    except RecordRejected as exc:
        assert exc.reason in ("malformed", "too-large")
        return None
    for record in records:  # whatever decodes, validation judges without crashing
        with contextlib.suppress(RecordRejected):
            validate(record, namespaces().policy_for(record.key), NOW)
    return records


@FUZZ
@given(data=st.binary(max_size=600))
def test_garbage_only_raises_record_rejected(data: bytes) -> None:
    _decode_or_reject(data)


@FUZZ
@given(data=mutated(VALID))
def test_mutated_messages_only_raise_record_rejected(data: bytes) -> None:
    _decode_or_reject(data)


@FEW
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.binary() | st.text(),
        lambda children: st.lists(children, max_size=7) | st.dictionaries(st.text(), children),
        max_leaves=20,
    )
)
def test_wrong_structures_only_raise_record_rejected(value: Any) -> None:
    try:
        data = msgspec.msgpack.encode(value)
    except OverflowError:
        return
    _decode_or_reject(data)


def test_decode_limits_and_odd_inputs() -> None:
    with rejected("too-large"):
        decode_records(encode_records([make_record(b"k", b"v", NOW)] * 11), max_records=10)
    assert (
        len(decode_records(encode_records([make_record(b"k", b"v", NOW)] * 10), max_records=10))
        == 10
    )
    with rejected("too-large"):  # the claim alone is refused, before any decoding
        decode_records(b"\xdd\xff\xff\xff\xff")
    with rejected("malformed"):
        decode_records(b"\xdc\x00")
    with rejected("malformed"):
        decode_records(memoryview(b"\x90\x90").cast("H"))
    with rejected("malformed"):
        decode_records(VALID + b"\xc0")
    with rejected("malformed"):
        decode_records(b"\x91" + b"\x91" * 100_000)  # deep nesting
    assert decode_records(b"\x90") == []
    assert decode_records(memoryview(bytearray(VALID))) == decode_records(VALID)


# -- the committed vectors ----------------------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "records_vector_generator", VECTORS / "generate_records.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The seeds of keys.json, by the names records.json uses for its signers.
VECTOR_SEEDS = {"alice": bytes([1]) * 32, "bob": bytes([2]) * 32, "carol": bytes([3]) * 32}
RECORDS = json.loads((VECTORS / "records.json").read_text(encoding="utf-8"))


def _vector_namespaces() -> Namespaces:
    def policy(p: dict[str, Any]) -> NamespacePolicy:
        return NamespacePolicy(
            bytes.fromhex(p["namespace"]),
            max_ttl=p["max_ttl"],
            owned=p["owned"],
            max_value_size=p["max_value_size"],
            max_subkeys=p["max_subkeys"],
        )

    return Namespaces(
        [policy(p) for p in RECORDS["policies"]], default=policy(RECORDS["default_policy"])
    )


def _check(record: Record) -> None:
    validate(
        record,
        _vector_namespaces().policy_for(record.key),
        RECORDS["now"],
        max_clock_skew=RECORDS["max_clock_skew"],
    )


def test_committed_record_vectors_are_what_the_generator_writes() -> None:
    for name, text in _generator().build().items():
        assert (VECTORS / name).read_text(encoding="utf-8") == text, (
            f"{name} is stale: run python protocol/vectors/generate_records.py"
        )


def test_default_policy_vector_is_the_default() -> None:
    assert _vector_namespaces().policy_for(b"nothing-registered/x") == DEFAULT_POLICY


@pytest.mark.parametrize("vector", RECORDS["key_ids"], ids=lambda v: v["key"])
def test_key_id_vectors(vector: dict[str, str]) -> None:
    key = bytes.fromhex(vector["key"])
    assert key_id(key).hex() == vector["key_id"]
    assert namespace_of(key).hex() == vector["namespace"]


@pytest.mark.parametrize("vector", RECORDS["valid"], ids=lambda v: v["description"])
def test_valid_record_vectors(vector: dict[str, Any]) -> None:
    fields = {k: bytes.fromhex(vector[k]) for k in ("key", "subkey", "value", "owner_key")}
    record = Record(
        fields["key"],
        fields["subkey"],
        fields["value"],
        vector["expiration"],
        fields["owner_key"],
        bytes.fromhex(vector["signature"]),
    )
    assert decode_records(bytes.fromhex(vector["message"])) == [record]
    assert encode_records([record]).hex() == vector["message"]
    if vector["signature"]:
        signed = record_message(record.key, record.subkey, record.value, record.expiration)
        assert signed.hex() == vector["signed_message"]
        (owner,) = (
            ident
            for name, seed in VECTOR_SEEDS.items()
            if (ident := Identity.from_seed(seed)).public_key.hex() == vector["owner_key"]
            and RECORDS["signers"][name] == vector["owner_key"]
        )
        assert make_record(record.key, record.value, record.expiration, owner=owner) == record
    _check(record)


@pytest.mark.parametrize("vector", RECORDS["invalid"], ids=lambda v: v["description"])
def test_invalid_record_vectors(vector: dict[str, Any]) -> None:
    (record,) = decode_records(bytes.fromhex(vector["message"]))
    with rejected(vector["reason"]):
        _check(record)


@pytest.mark.parametrize("vector", RECORDS["messages"], ids=lambda v: v["description"])
def test_message_vectors(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["message"])
    if vector["reason"] is None:
        for record in decode_records(data):
            _check(record)
    else:
        with rejected(vector["reason"]):
            decode_records(data)


@pytest.mark.parametrize("vector", RECORDS["conflicts"], ids=lambda v: v["description"])
def test_conflict_vectors(vector: dict[str, Any]) -> None:
    (a,) = decode_records(bytes.fromhex(vector["a"]))
    (b,) = decode_records(bytes.fromhex(vector["b"]))
    winner = a if vector["winner"] == "a" else b
    assert merge([a, b]) == merge([b, a]) == {a.subkey: winner}
    for first, second in ((a, b), (b, a)):
        s = RecordStore(_vector_namespaces())
        s.put(first, RECORDS["now"])
        s.put(second, RECORDS["now"])
        assert s.get(a.id, RECORDS["now"]) == [winner]


# -- the cache of verified signatures -----------------------------------------------------------


def test_a_verified_record_is_not_verified_again_and_a_forgery_still_fails(
    identities: list[Identity], monkeypatch: pytest.MonkeyPatch
) -> None:
    from moshpit_trio.dht import records as records_module

    calls: list[bytes] = []
    real = records_module.verify_signature

    def counting(public_key: bytes, signature: bytes, message: bytes | memoryview) -> bool:
        calls.append(signature)
        return real(public_key, signature, message)

    monkeypatch.setattr(records_module, "verify_signature", counting)
    cache = VerifiedSignatures(size=2)
    record = make_record(AVG_KEY, b"v", NOW + 60, owner=identities[0])
    validate(record, OWNED, NOW, verified=cache)
    # an equal copy (another replica's, decoded anew) costs no verification
    copy = decode_records(encode_records([record]))[0]
    validate(copy, OWNED, NOW, verified=cache)
    assert len(calls) == 1 and cache.hits == 1
    # the same record with another value (the signature no longer covers it) is checked
    with rejected("signature"):
        validate(with_fields(record, value=b"w"), OWNED, NOW, verified=cache)
    assert len(calls) == 2
    # the checks that depend on the time still run for a cached record
    with rejected("expired"):
        validate(record, OWNED, NOW + 61, verified=cache)
    # bounded: the oldest record goes first
    others = [make_record(AVG_KEY, b"x", NOW + 60, owner=i) for i in identities[1:3]]
    for other in others:
        validate(other, OWNED, NOW, verified=cache)
    assert record not in cache and all(o in cache for o in others)
    with pytest.raises(ConfigError):
        VerifiedSignatures(size=0)


def test_accept_answer_checks_a_cached_record_without_verifying_it_again(
    identities: list[Identity],
) -> None:
    # (a row group's directory, handed over by a mate round after round, holds the same row
    # records for several rounds)
    ns = namespaces()
    cache = VerifiedSignatures()
    record = make_record(AVG_KEY, b"v", NOW + 60, owner=identities[0])
    forged = with_fields(make_record(AVG_KEY, b"v", NOW + 60, owner=identities[1]), value=b"x")
    assert accept_answer(AVG_KEY, [record, forged], ns, NOW, verified=cache) == [record]
    assert cache.hits == 0
    copy = decode_records(encode_records([record]))[0]
    assert accept_answer(AVG_KEY, [copy, forged], ns, NOW, verified=cache) == [record]
    assert cache.hits == 1  # the copy; the forgery is checked, and fails, again
    assert forged not in cache
    assert accept_answer(AVG_KEY, [copy], ns, NOW + 61, verified=cache) == []  # expired


def test_a_store_verifies_a_record_stored_again_only_once(identities: list[Identity]) -> None:
    cache = VerifiedSignatures()
    s = store(verified=cache)
    record = make_record(AVG_KEY, b"v", NOW + 60, owner=identities[0])
    assert s.put(record, NOW)
    assert not s.put(decode_records(encode_records([record]))[0], NOW)
    assert cache.hits == 1
