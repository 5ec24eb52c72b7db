"""DHT records: what the DHT stores, who may write it, and which copy wins (sans-IO).

A record is ``(key, subkey, value, expiration, owner_key, signature)``. Records are addressed by
the 32-byte id of their key (:func:`key_id`) and, under one key, by their subkey. For each
``(key, subkey)`` the record with the later expiration wins, so a writer replaces its entry by
writing one that expires later, and withdraws it by writing an empty value (a *tombstone*) that
expires later. A record whose expiration has passed is gone.

The part of the key before its first ``/`` is its *namespace*, and a namespace's
:class:`NamespacePolicy` caps the TTL, the value size and the number of subkeys per key. In an
*owned* namespace the subkey is the writer's PeerID and the record must carry the writer's
Ed25519 signature, so no peer can write or withdraw another peer's entry.

Nothing here does I/O or reads a clock: callers pass ``now`` (unix seconds). The node validates
records on STORE and again on every record a lookup returns, because a remote may answer with
anything. protocol/SPEC.md ("DHT records") is the contract; this module follows it check for
check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import math
from collections.abc import Iterable, Iterator, Sequence

import msgspec

from ..errors import ConfigError, ProtocolError
from ..identity import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Identity, PeerID, verify_signature

__all__ = [
    "DEFAULT_POLICY",
    "KEY_DOMAIN",
    "MAX_KEY_SIZE",
    "MAX_SUBKEY_SIZE",
    "RECORD_DOMAIN",
    "NamespacePolicy",
    "Namespaces",
    "Record",
    "RecordRejected",
    "RecordStore",
    "VerifiedSignatures",
    "accept_answer",
    "decode_records",
    "encode_records",
    "key_id",
    "make_record",
    "merge",
    "namespace_of",
    "newer",
    "record_message",
    "validate",
]

KEY_DOMAIN = b"moshpit/1 dht key\x00"
RECORD_DOMAIN = b"moshpit/1 record\x00"
MAX_KEY_SIZE = 256
MAX_SUBKEY_SIZE = 64
KEY_ID_SIZE = 32
_NAMESPACE_SEPARATOR = b"/"
# What a stored record costs beyond its byte strings, for bytes_used: the float and the
# bookkeeping are roughly this much; the caps need an estimate, not an exact count.
_RECORD_OVERHEAD = 64


class RecordRejected(ProtocolError):
    """A record (or a message of records) that this peer refuses.

    ``reason`` is one of ``"malformed"``, ``"too-large"``, ``"expired"``, ``"ttl"``,
    ``"owner"``, ``"signature"``, ``"subkey"``, ``"full"``. Only ``"full"`` can happen to a
    record that is itself valid (this store has no room for it).
    """


def key_id(key: bytes) -> bytes:
    """The 32-byte DHT id of a user key: ``sha256("moshpit/1 dht key\\x00" + key)``."""
    return hashlib.sha256(KEY_DOMAIN + bytes(key)).digest()


def namespace_of(key: bytes) -> bytes:
    """The bytes of ``key`` before its first ``/``; ``b""`` for a key without one."""
    namespace, separator, _ = bytes(key).partition(_NAMESPACE_SEPARATOR)
    return namespace if separator else b""


class Record(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True, gc=False):
    """One DHT record; on the wire, the msgpack array of its six fields in this order.

    ``value == b""`` is a withdrawal (a tombstone): it takes part in the conflict rule like any
    record, so it replaces older copies everywhere, and readers treat the entry as absent.
    """

    # gc=False: a record holds only bytes and a float, so it can never be part of a cycle, and
    # a store of 100 000 records should not be walked by every garbage collection.

    key: bytes  # the user key, 1..256 bytes
    subkey: bytes  # b"" for a plain value; owned namespaces: the owner's PeerID; else <= 64 bytes
    value: bytes  # b"" means withdrawn
    expiration: float  # unix seconds
    owner_key: bytes  # b"" or the owner's 32-byte Ed25519 public key
    signature: bytes  # b"" or Sign(owner, RECORD_DOMAIN + msgpack([key, subkey, value, exp]))

    @property
    def id(self) -> bytes:
        """The 32-byte DHT id of this record's key."""
        return key_id(self.key)

    @property
    def withdrawn(self) -> bool:
        """True for a tombstone (an empty value)."""
        return not self.value

    @property
    def nbytes(self) -> int:
        """An estimate of the memory this record takes in a store (for ``max_bytes``)."""
        return (
            len(self.key)
            + len(self.subkey)
            + len(self.value)
            + len(self.owner_key)
            + len(self.signature)
            + _RECORD_OVERHEAD
        )

    def __repr__(self) -> str:
        # The default repr would print a 64 KiB value into a log line.
        value = repr(self.value) if len(self.value) <= 32 else f"<{len(self.value)} bytes>"
        signed = f", owner={PeerID.from_public_key(self.owner_key).short}" if self._owned() else ""
        return (
            f"Record(key={self.key[:64]!r}, subkey={self.subkey.hex()[:16] or '-'}, "
            f"value={value}, expiration={self.expiration!r}{signed})"
        )

    def _owned(self) -> bool:
        return isinstance(self.owner_key, bytes) and len(self.owner_key) == PUBLIC_KEY_SIZE


_encode = msgspec.msgpack.Encoder().encode
_decode_records = msgspec.msgpack.Decoder(list[Record]).decode
# Everything msgspec's C decoder raises on hostile input: its own errors, ValueError (invalid
# UTF-8 and the like), RecursionError for deep nesting, OverflowError for huge ints.
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError, OverflowError)


def record_message(key: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    """The bytes an owner signs: ``RECORD_DOMAIN + msgpack([key, subkey, value, expiration])``.

    The array is re-encoded from the fields (records are stored and served again, so the bytes
    a writer sent are not kept): three bin values in their shortest form and the expiration
    always as a float64, which makes the encoding canonical. An expiration that arrived as a
    msgpack int is signed as the float64 of the same value.
    """
    return RECORD_DOMAIN + _encode((bytes(key), bytes(subkey), bytes(value), float(expiration)))


def make_record(
    key: bytes,
    value: bytes,
    expiration: float,
    *,
    subkey: bytes = b"",
    owner: Identity | None = None,
) -> Record:
    """Build a record; with ``owner``, sign it, and default the subkey to the owner's PeerID.

    Raises ConfigError for what no namespace accepts (an empty or oversize key or subkey, a
    non-finite expiration, a signed record whose subkey is not the owner's PeerID). The
    namespace's own rules are for :func:`validate`.
    """
    key, subkey, value = bytes(key), bytes(subkey), bytes(value)
    if not 1 <= len(key) <= MAX_KEY_SIZE:
        raise ConfigError(f"a DHT key is 1..{MAX_KEY_SIZE} bytes, got {len(key)}")
    if len(subkey) > MAX_SUBKEY_SIZE:
        raise ConfigError(f"a subkey is at most {MAX_SUBKEY_SIZE} bytes, got {len(subkey)}")
    if isinstance(expiration, bool) or not isinstance(expiration, int | float):
        raise ConfigError(f"expiration must be unix seconds, got {expiration!r}")
    expiration = float(expiration)
    if not math.isfinite(expiration):
        raise ConfigError(f"expiration must be finite, got {expiration!r}")
    if owner is None:
        return Record(key, subkey, value, expiration, b"", b"")
    peer_id = owner.peer_id.to_bytes()
    if subkey and subkey != peer_id:
        raise ConfigError(
            "a signed record's subkey is its owner's PeerID; leave subkey out to use it"
        )
    signature = owner.sign(record_message(key, peer_id, value, expiration))
    return Record(key, peer_id, value, expiration, owner.public_key, signature)


@dataclasses.dataclass(frozen=True, slots=True)
class NamespacePolicy:
    """The rules for keys in one namespace. Every peer of a swarm must use the same ones."""

    namespace: bytes
    max_ttl: float  # expiration - now must be <= max_ttl (plus the allowed clock skew)
    owned: bool = False  # subkey = writer's PeerID, signature required
    max_value_size: int = 64 * 1024
    max_subkeys: int = 256  # per key, tombstones included (they take room too)
    #: (owned only) a key is ``NAMESPACE/PEERID_TEXT`` and only that peer writes under it: a
    #: peer's own record (``mp.relay``) that nobody can crowd out by filling the key
    keyed_by_owner: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, bytes):
            raise ConfigError(f"a namespace is bytes, got {type(self.namespace).__name__}")
        if _NAMESPACE_SEPARATOR in self.namespace or len(self.namespace) >= MAX_KEY_SIZE:
            raise ConfigError(
                f"namespace {self.namespace!r}: at most {MAX_KEY_SIZE - 1} bytes and no '/'"
            )
        if not (math.isfinite(self.max_ttl) and self.max_ttl > 0):
            raise ConfigError(f"max_ttl must be a positive number of seconds, got {self.max_ttl}")
        if self.max_value_size < 0:
            raise ConfigError(f"max_value_size must be >= 0, got {self.max_value_size}")
        if self.max_subkeys < 1:
            raise ConfigError(f"max_subkeys must be >= 1, got {self.max_subkeys}")
        if self.keyed_by_owner and not self.owned:
            raise ConfigError("keyed_by_owner is for an owned namespace")


DEFAULT_POLICY = NamespacePolicy(b"", max_ttl=24 * 3600)


class Namespaces:
    """The registered namespace policies; a key of an unregistered namespace gets the default."""

    __slots__ = ("_default", "_policies")

    def __init__(
        self,
        policies: Iterable[NamespacePolicy] = (),
        *,
        default: NamespacePolicy = DEFAULT_POLICY,
    ) -> None:
        self._default = default
        self._policies: dict[bytes, NamespacePolicy] = {}
        for policy in policies:
            self.register(policy)

    def register(self, policy: NamespacePolicy) -> None:
        """Add a namespace. Registering the same policy twice is fine; another one for a
        namespace already registered is a ConfigError (two services would disagree on it)."""
        existing = self._policies.get(policy.namespace)
        if existing is not None and existing != policy:
            raise ConfigError(
                f"namespace {policy.namespace!r} is already registered with other rules"
            )
        self._policies[policy.namespace] = policy

    def policy_for(self, key: bytes) -> NamespacePolicy:
        return self._policies.get(namespace_of(key), self._default)

    def __iter__(self) -> Iterator[NamespacePolicy]:
        """The registered policies (not the default)."""
        return iter(list(self._policies.values()))


class VerifiedSignatures:
    """The last ``size`` records whose signatures verified here, so that a copy that comes
    again (from each of a key's replicas in one lookup, in each poll of a key, as a store
    that a republish repeats) costs a set look-up instead of an Ed25519 verification.

    A hit needs the whole record to be equal (key, subkey, value, expiration, owner key and
    signature), so it can only skip the check of bytes already checked. One per node: a
    simulated swarm's peers do not share one.
    """

    __slots__ = ("_records", "hits", "size")

    def __init__(self, size: int = 256) -> None:
        if size < 1:
            raise ConfigError("the cache holds at least one record")
        self.size = size
        self._records: dict[Record, None] = {}
        self.hits = 0

    def __contains__(self, record: object) -> bool:
        if record in self._records:
            self.hits += 1
            return True
        return False

    def add(self, record: Record) -> None:
        if len(self._records) >= self.size:
            # Oldest first (dicts keep insertion order): a bounded cache, never a growing one.
            del self._records[next(iter(self._records))]
        self._records[record] = None


def validate(
    record: Record,
    policy: NamespacePolicy,
    now: float,
    *,
    max_clock_skew: float = 30.0,
    verified: VerifiedSignatures | None = None,
) -> None:
    """Raise RecordRejected unless ``record`` is acceptable under ``policy`` at ``now``.

    Checks run cheapest first and the signature last, so a flood of junk costs no Ed25519
    verifications: field types (``malformed``), sizes (``malformed``/``too-large``/``subkey``),
    expiry (``expired``), TTL (``ttl``), owner fields (``owner``), signature (``signature``).
    """
    key, subkey, value = record.key, record.subkey, record.value
    owner_key, signature, expiration = record.owner_key, record.signature, record.expiration
    # Records built locally skip msgspec's type checks, so check the types too.
    if not (
        type(key) is bytes
        and type(subkey) is bytes
        and type(value) is bytes
        and type(owner_key) is bytes
        and type(signature) is bytes
        and type(expiration) in (float, int)
    ):
        raise RecordRejected("malformed", "a record field has the wrong type")
    if not math.isfinite(expiration):
        raise RecordRejected("malformed", f"expiration {expiration!r} is not a finite number")
    if not key:
        raise RecordRejected("malformed", "empty key")
    if len(key) > MAX_KEY_SIZE:
        raise RecordRejected("too-large", f"key of {len(key)} bytes; the cap is {MAX_KEY_SIZE}")
    if policy.owned:
        if len(subkey) != KEY_ID_SIZE:
            raise RecordRejected(
                "subkey", f"in an owned namespace the subkey is a PeerID, got {len(subkey)} bytes"
            )
    elif len(subkey) > MAX_SUBKEY_SIZE:
        raise RecordRejected(
            "subkey", f"subkey of {len(subkey)} bytes; the cap is {MAX_SUBKEY_SIZE}"
        )
    if len(value) > policy.max_value_size:
        raise RecordRejected(
            "too-large", f"value of {len(value)} bytes; the cap is {policy.max_value_size}"
        )
    if expiration <= now:
        raise RecordRejected("expired", f"expired {now - expiration:.3f} s ago")
    if expiration > now + policy.max_ttl + max_clock_skew:
        raise RecordRejected(
            "ttl",
            f"expires in {expiration - now:.0f} s; namespace {policy.namespace!r} allows "
            f"{policy.max_ttl:g} s",
        )
    if bool(owner_key) != bool(signature):
        raise RecordRejected("owner", "owner_key and signature go together")
    if not owner_key:
        if policy.owned:
            raise RecordRejected("owner", "records in an owned namespace must be signed")
        return
    if len(owner_key) != PUBLIC_KEY_SIZE:
        raise RecordRejected("owner", f"owner_key of {len(owner_key)} bytes; it is 32")
    if len(signature) != SIGNATURE_SIZE:
        raise RecordRejected("signature", f"signature of {len(signature)} bytes; it is 64")
    if policy.owned and PeerID.from_public_key(owner_key).to_bytes() != subkey:
        raise RecordRejected("owner", "the subkey is another peer's PeerID")
    if policy.keyed_by_owner and key != policy.namespace + b"/" + str(PeerID(subkey)).encode():
        raise RecordRejected("owner", "only the peer a key names writes under it")
    if verified is not None and record in verified:
        return
    if not verify_signature(
        owner_key, signature, record_message(key, subkey, value, float(expiration))
    ):
        raise RecordRejected("signature", "the record's signature does not verify")
    if verified is not None:
        verified.add(record)


def _rank(record: Record) -> tuple[float, bytes, bytes, bytes]:
    """The conflict rule as a sort key: the larger rank wins.

    Later expiration first; at equal expiration the larger (value, signature), so that every
    replica picks the same winner whatever order copies arrive in. owner_key last makes the
    order total (it can only matter for two signatures that both verify under different keys).
    """
    return (record.expiration, record.value, record.signature, record.owner_key)


def newer(a: Record, b: Record) -> bool:
    """True when ``a`` wins over ``b`` by the conflict rule (same key and subkey assumed)."""
    return _rank(a) > _rank(b)


def merge(records: Iterable[Record]) -> dict[bytes, Record]:
    """Combine records of one key (e.g. from several replicas): the winner per subkey.

    Neither validates nor drops expired records; do that first (see :func:`accept_answer`).
    """
    out: dict[bytes, Record] = {}
    for record in records:
        current = out.get(record.subkey)
        if current is None or _rank(record) > _rank(current):
            out[record.subkey] = record
    return out


def accept_answer(
    key: bytes,
    records: Iterable[Record],
    namespaces: Namespaces,
    now: float,
    *,
    max_clock_skew: float = 30.0,
    verified: VerifiedSignatures | None = None,
) -> list[Record]:
    """The records a lookup for ``key`` may believe: of that key, valid, merged by subkey.

    Records of another key, invalid ones and forgeries are dropped (compare lengths to count
    them). At most the policy's ``max_subkeys`` are kept, those expiring last (ties by
    subkey), so a node answering with ten thousand subkeys cannot make the reader hold more
    than a store would. Sorted by subkey. ``verified``: a node's cache of records whose
    signatures it checked lately (see ``validate``).
    """
    key = bytes(key)
    policy = namespaces.policy_for(key)
    good: list[Record] = []
    for record in records:
        if record.key != key:
            continue
        try:
            validate(record, policy, now, max_clock_skew=max_clock_skew, verified=verified)
        except RecordRejected:
            continue
        good.append(record)
    merged = list(merge(good).values())
    if len(merged) > policy.max_subkeys:
        merged.sort(key=lambda r: (-r.expiration, r.subkey))
        del merged[policy.max_subkeys :]
    merged.sort(key=lambda r: r.subkey)
    return merged


class RecordStore:
    """The records this node holds for others: validated, one winner per (key, subkey), capped.

    Expired records are invisible at once and freed by :meth:`expire` (and whenever a cap is
    reached). A heap of expirations makes expiring cost in proportion to what expires.
    """

    __slots__ = (
        "_bytes",
        "_count",
        "_heap",
        "_keys",
        "max_bytes",
        "max_clock_skew",
        "max_keys",
        "namespaces",
        "verified",
    )

    def __init__(
        self,
        namespaces: Namespaces,
        *,
        max_keys: int = 100_000,
        max_bytes: int = 256 * 1024 * 1024,
        max_clock_skew: float = 30.0,
        verified: VerifiedSignatures | None = None,
    ) -> None:
        if max_keys < 1 or max_bytes < 1:
            raise ConfigError("max_keys and max_bytes must be >= 1")
        self.namespaces = namespaces
        self.max_keys = max_keys
        self.max_bytes = max_bytes
        self.max_clock_skew = max_clock_skew
        self.verified = verified
        self._keys: dict[bytes, dict[bytes, Record]] = {}
        self._count = 0
        self._bytes = 0
        # (expiration, key id, subkey) for every record stored; entries of records since
        # replaced stay until they come up (or until _compact) and are skipped then.
        self._heap: list[tuple[float, bytes, bytes]] = []

    def put(self, record: Record, now: float) -> bool:
        """Validate and store ``record``; True if it was stored (new or replacing an older
        copy), False if the copy already here wins or is the same. Raises RecordRejected for an
        invalid record, and with reason ``"full"`` when a cap leaves no room for it."""
        policy = self.namespaces.policy_for(record.key)
        validate(record, policy, now, max_clock_skew=self.max_clock_skew, verified=self.verified)
        kid = record.id
        subkeys = self._keys.get(kid)
        existing = subkeys.get(record.subkey) if subkeys is not None else None
        if existing is not None and existing.expiration > now and _rank(existing) >= _rank(record):
            return False
        growth = record.nbytes - (existing.nbytes if existing is not None else 0)
        if self._over_caps(kid, subkeys, existing, growth, policy):
            # Expired records still count until freed: free them, then look again.
            self.expire(now)
            subkeys = self._keys.get(kid)
            existing = subkeys.get(record.subkey) if subkeys is not None else None
            growth = record.nbytes - (existing.nbytes if existing is not None else 0)
            reason = self._over_caps(kid, subkeys, existing, growth, policy)
            if reason:
                raise RecordRejected("full", reason)
        if subkeys is None:
            subkeys = self._keys[kid] = {}
        subkeys[record.subkey] = record
        if existing is None:
            self._count += 1
        self._bytes += growth
        heapq.heappush(self._heap, (float(record.expiration), kid, record.subkey))
        if len(self._heap) > 2 * self._count + 1024:
            self._compact()
        return True

    def _over_caps(
        self,
        kid: bytes,
        subkeys: dict[bytes, Record] | None,
        existing: Record | None,
        growth: int,
        policy: NamespacePolicy,
    ) -> str:
        """Why storing would break a cap ("" if it would not)."""
        if subkeys is None and len(self._keys) >= self.max_keys:
            return f"this store holds {self.max_keys} keys"
        if existing is None and subkeys is not None and len(subkeys) >= policy.max_subkeys:
            return f"the key has {policy.max_subkeys} subkeys, the namespace's cap"
        if self._bytes + growth > self.max_bytes:
            return f"this store holds {self._bytes} of {self.max_bytes} bytes"
        return ""

    def get(self, key_id: bytes, now: float) -> list[Record]:
        """The unexpired records of one key, tombstones included, sorted by subkey."""
        subkeys = self._keys.get(bytes(key_id))
        if not subkeys:
            return []
        return sorted((r for r in subkeys.values() if r.expiration > now), key=_by_subkey)

    def expire(self, now: float) -> int:
        """Free every record whose expiration is at or before ``now``; return how many."""
        heap, dropped = self._heap, 0
        while heap and heap[0][0] <= now:
            _, kid, subkey = heapq.heappop(heap)
            subkeys = self._keys.get(kid)
            record = subkeys.get(subkey) if subkeys is not None else None
            # A replaced record's entry finds its successor, which expires no earlier; it is
            # freed here only if it has expired too (its own entry then finds nothing).
            if subkeys is None or record is None or record.expiration > now:
                continue
            del subkeys[subkey]
            if not subkeys:
                del self._keys[kid]
            self._count -= 1
            self._bytes -= record.nbytes
            dropped += 1
        return dropped

    def _compact(self) -> None:
        """Rebuild the heap from the records held, dropping the entries of replaced ones."""
        self._heap = [
            (float(r.expiration), kid, sk)
            for kid, subkeys in self._keys.items()
            for sk, r in subkeys.items()
        ]
        heapq.heapify(self._heap)

    def records(self) -> Iterator[Record]:
        """Every record held (expired ones not yet freed included), for republishing."""
        for subkeys in list(self._keys.values()):
            yield from list(subkeys.values())

    def __len__(self) -> int:
        """Records held: the unexpired ones plus expired ones not yet freed by expire()."""
        return self._count

    @property
    def bytes_used(self) -> int:
        """The estimated size of the records held (the sum of ``Record.nbytes``)."""
        return self._bytes


def _by_subkey(record: Record) -> bytes:
    return record.subkey


def encode_records(records: Sequence[Record]) -> bytes:
    """A msgpack array of records, each the array of its six fields."""
    return _encode(list(records))


def _array_length(data: memoryview) -> int:
    """The element count of the msgpack array ``data`` starts with (-1 if it starts with none)."""
    if not data:
        return -1
    first = data[0]
    if 0x90 <= first <= 0x9F:
        return first & 0x0F
    if first == 0xDC and len(data) >= 3:
        return int.from_bytes(data[1:3], "big")
    if first == 0xDD and len(data) >= 5:
        return int.from_bytes(data[1:5], "big")
    return -1


def decode_records(data: bytes | memoryview, *, max_records: int = 1024) -> list[Record]:
    """Decode a message of :func:`encode_records`, strictly.

    Raises RecordRejected (``"too-large"`` for more than ``max_records`` records, else
    ``"malformed"``) for anything that is not exactly one array of well-typed six-field
    records with finite expirations, and never another exception type. The records are not
    validated: run :func:`validate` on each (one bad record should cost only itself).
    """
    try:
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
    except (TypeError, ValueError):
        raise RecordRejected("malformed", "records must be a flat buffer of bytes") from None
    # Read the count from the array header before decoding, so a claim of a million records
    # is refused without building any of them.
    count = _array_length(view)
    if count < 0:
        raise RecordRejected("malformed", "records must be one msgpack array")
    if count > max_records:
        raise RecordRejected("too-large", f"{count} records; the cap is {max_records}")
    try:
        records = _decode_records(view)
    except _DECODE_ERRORS as exc:
        raise RecordRejected("malformed", f"bad records: {exc}") from None
    for record in records:
        # msgspec accepts NaN and infinities as floats; no expiration may be either.
        if not math.isfinite(record.expiration):
            raise RecordRejected("malformed", f"expiration {record.expiration!r}")
    return records
