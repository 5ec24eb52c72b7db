"""``grid="auto"``: groups formed from whoever is live, balanced at any swarm size (sans-IO).

A fixed grid needs its shape chosen for a swarm size nobody knows, and keys drawn from PeerIDs
fill its lines unevenly: small swarms go solo, large ones need extra rounds. The auto grid
instead lays the live peers out as *rows* that persist from round to round and *columns* that
cross them, with both sizes following the live count ``N``. Two sizes bound them
(:func:`group_size_limits`): the *target* ``T`` (``target_group_size``, default 32) that rows
and columns are laid out for, and the *maximum* (``max_group_size``, default 40) past which a
key's announcers are cut into several groups. The room between the two takes the peers no
plan can place (one back from a round away, a joiner) without splitting a full row in half.

* ``S`` rows (ids ``0 .. S-1``); ``N`` is dealt to them as evenly as possible
  (:func:`row_targets`), so row sizes differ by at most one; the longer targets go to the rows
  that hold the most already, so a row short by a failed peer is not refilled from elsewhere
  (its peer, back, fills it again). ``N <= T``: one row,
  the whole swarm in one group every round. Larger: :func:`plan_rows` picks ``S`` so that rows
  are at most ``T`` long, preferring an ``S`` that divides ``N`` (every row full)
  and, among those, rows about as long as there are rows.
* Inside its row a peer has a *position*: its place in the row as the row's last group(s)
  formed it (members by PeerID; a row too long for one group forms several, ordered by group
  id). Positions are thus dense: nobody who left holds one.
* Rounds alternate between rows and columns, counted from the newest row round the directory
  shows (only row rounds write it): the round after it averages along columns, the peers at
  the same position in every row, and the one after that along rows again (:meth:`Plan.kind`).
  There are as many columns as the longer rows are long; the k-th shorter row leaves column
  ``k mod C`` out (its positions from there on shift one right), so no row puts two peers in
  one column, column sizes differ by at most one, and no column holds more peers than there
  are rows. With one row, every round is a row round.

When ``N = S * L`` and every row holds ``L``, a row round then a column round give every peer
the exact mean: the paper's 2-D grid, with ``M`` following ``N`` instead of configuration.
(2-D only: the column count grows past ``T`` beyond ``T**2`` peers, and columns past the
maximum then form several groups each.)

Who is where is written down, not derived from PeerIDs: after each row round the first member
(lowest PeerID) of each group stores a :class:`RowRecord` (row, round, group id, size, reachable
members) under the run's *directory* key ``mp.avg/RUN/rows``, an owned record with one entry
per row group. Every peer reads it before a round (about ``S`` entries: bounded by the group
size while ``N <= T**2``) and turns it into a :class:`Layout`; from the layout every
peer computes the same :class:`Plan`:

* ``S`` stays as it is while it is feasible (rows no longer than ``T``, no row
  shorter than two), so churn does not reshuffle the swarm; otherwise it is planned afresh;
* excess places (positions past a row's target, and every place in a row ``>= S``) are paired,
  in (row, position) order, with missing places (rows short of their target, in row order):
  those peers move before the next row round (:meth:`Plan.place`), and the column round
  before that already puts them in the columns of their new places;
* a joiner takes a row with room once the moves are made (its target below ``T``), at random
  weighted by how much (:meth:`Plan.row_for_joiner`), else one of the least full: the
  room up to the maximum takes it there. So does a peer
  whose row the plan no longer has and whose place the directory does not show (it was away
  when its cold row's peers were placed; :meth:`Plan.seat`). With no directory yet (a swarm
  starting all at once) it takes
  a random one of ``ceil(N / 4T)`` cold rows, ``N`` judged from the peers closest to
  the directory's key, the same for every reader (:func:`estimate_size_around`,
  :func:`cold_row`), so a key holds about four groups' worth, cut into balanced groups
  (past the DHT's 256 entries a key, it tries the rest of :func:`cold_start_rows`); cold
  rows are numbered past any planned row, so the next plan places everyone afresh;
* a client-mode peer never lands in a row or column where nobody listens (nobody there could
  lead it): the records say which members listen (:meth:`Plan.row`, :meth:`Plan.column_for`).

The directory is one key, so its replicas would serve the whole swarm if every peer read it
(at 256 in-memory peers they reached the 256-connection limit). Only a row group's first
member reads it before the column round; its group mates ask it for the signed records it read
and check them as a DHT read would (the averager's ``avg.RUN.dir`` call): one read per group.

Everything here is plain functions of plain values, so the simulator
(``benchmarks/averaging_sim.py``, method ``moshpit-auto``) runs the very code the averager runs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Literal

import msgspec

from ..errors import ConfigError
from .grid import GROUP_KEY_NAMESPACE

__all__ = [
    "COLD_ATTEMPTS",
    "COLD_GROUPS_PER_ROW",
    "COLD_READ_RATE",
    "COLD_READ_SPREAD_MAX",
    "COLD_ROW_BASE",
    "COLD_SETTLE",
    "DEFAULT_MAX_GROUP_SIZE",
    "DEFAULT_TARGET_GROUP_SIZE",
    "MAX_GROUP_SIZE_LIMIT",
    "Layout",
    "Plan",
    "RoundKind",
    "RowRecord",
    "block_of",
    "capacity_at",
    "cold_read_spread",
    "cold_row",
    "cold_rows",
    "cold_start_rows",
    "directory_key",
    "estimate_size",
    "estimate_size_around",
    "group_size_limits",
    "group_sizes",
    "listening_bits",
    "overflow_row",
    "plan_rows",
    "round_kind",
    "row_targets",
]

#: the group size rows are laid out for, and the largest group a key's announcers make
#: (``group_size_limits``)
DEFAULT_TARGET_GROUP_SIZE = 32
DEFAULT_MAX_GROUP_SIZE = 40
#: a DHT key holds at most this many entries: no group can be larger
MAX_GROUP_SIZE_LIMIT = 256
#: the first of the rows a cold start uses: past any row a plan makes, so that the first plan
#: after a cold start lays the rows out afresh and every cold place counts as one to move
COLD_ROW_BASE = 1 << 16
#: a row's directory entries older than this many rounds than the newest are read as gone
STALE_ROUNDS = 4

RoundKind = Literal["row", "column"]


class RowRecord(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One row group's entry in the run's directory, stored by its first member."""

    row: int
    round: int
    group_id: bytes
    size: int
    #: members that listen (not client-mode): the ones that can lead and reduce
    reachable: int
    #: which ones: bit i (of byte i // 8, least significant first) for the member at index i
    #: by PeerID; empty: the first ``reachable`` ones (all or none are the common cases)
    listening: bytes = b""


_record_decoder = msgspec.msgpack.Decoder(RowRecord)
_encode = msgspec.msgpack.Encoder().encode


def encode_record(record: RowRecord) -> bytes:
    return _encode(record)


def decode_record(raw: bytes | memoryview) -> RowRecord | None:
    """A directory entry, or None when it is malformed or out of range (an untrusted record)."""
    try:
        record = _record_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    if (
        not 0 <= record.row < 1 << 20
        or record.round < 0
        or not 1 <= record.size <= 1 << 16
        or not 0 <= record.reachable <= record.size
        or len(record.group_id) != 16
    ):
        return None
    if record.listening and (
        len(record.listening) != (record.size + 7) // 8
        or int.from_bytes(record.listening, "little") >> record.size
        or int.from_bytes(record.listening, "little").bit_count() != record.reachable
    ):
        return None
    return record


def listening_bits(flags: Sequence[bool]) -> bytes:
    """The ``listening`` bitmap of a group whose members, by PeerID, listen or not.

    >>> listening_bits([True, False, True]), listening_bits([False] * 9)
    (b'\\x05', b'\\x00\\x00')
    """
    value = sum(1 << i for i, flag in enumerate(flags) if flag)
    return value.to_bytes((len(flags) + 7) // 8, "little")


def _listens(record_bits: bytes, reachable: int, index: int) -> bool:
    if record_bits:
        return bool(record_bits[index // 8] >> (index % 8) & 1)
    return index < reachable


def directory_key(run_id: str) -> str:
    """The DHT key of run ``run_id``'s directory of row groups (an owned key: one entry per
    writer, the first member of a row group)."""
    return f"{GROUP_KEY_NAMESPACE}/{run_id}/rows"


def _check_size(group_size: int, name: str = "target_group_size") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ConfigError(f"{name} must be an integer, got {group_size!r}")
    if group_size < 2:
        raise ConfigError(f"{name} must be at least 2, got {group_size}")
    return group_size


def group_size_limits(
    target: int | None = None, most: int | None = None, *, fixed_grid: bool = False
) -> tuple[int, int]:
    """The (target, maximum) group sizes of a run, from what its configuration says (None: not
    said). The target lays the rows out; the maximum is what a key's announcers are cut at.

    The room between them is for the peers a plan cannot place: one back from a round away,
    joiners. With rows as long as the maximum, the 33rd announcer of a 32-peer row made two
    half groups (17 + 16) of it, a whole round of mixing lost in that row; below the maximum
    it joins the group. Neither given: 32 and 40. Only the target: a quarter more (at least
    one). Only the maximum: the target is 32, or the maximum if that is smaller (no room).

    ``fixed_grid``: the run has a fixed grid, whose axes size its groups; either size given
    is then a mistake.

    >>> group_size_limits(), group_size_limits(16), group_size_limits(None, 16)
    ((32, 40), (16, 20), (16, 16))
    """
    if fixed_grid and (target, most) != (None, None):
        raise ConfigError(
            "target_group_size and max_group_size are for grid='auto'; "
            "a fixed grid's axes size groups"
        )
    if target is not None:
        _check_size(target)
    if most is not None:
        _check_size(most, "max_group_size")
    if target is None:
        target = DEFAULT_TARGET_GROUP_SIZE if most is None else min(DEFAULT_TARGET_GROUP_SIZE, most)
    if most is None:
        most = min(MAX_GROUP_SIZE_LIMIT, target + max(1, target // 4))
    if not target <= most <= MAX_GROUP_SIZE_LIMIT:
        raise ConfigError(
            f"expected target_group_size <= max_group_size <= {MAX_GROUP_SIZE_LIMIT} (a DHT key "
            f"holds {MAX_GROUP_SIZE_LIMIT} entries), got {target} and {most}"
        )
    return target, most


def feasible(n: int, rows: int, group_size: int) -> bool:
    """Can ``n`` peers sit in ``rows`` rows, none longer than the target group size, none
    shorter than 2 (one row only while everyone fits in one group)?"""
    if rows == 1:
        return n <= group_size
    return (
        n > group_size
        and math.ceil(n / rows) <= group_size
        and n // rows >= 2
        # columns hold about one peer per row: no more rows than a group should hold, while
        # the swarm fits in group_size**2 at all
        and (rows <= group_size or n > group_size**2)
    )


def plan_rows(n: int, group_size: int = DEFAULT_TARGET_GROUP_SIZE) -> int:
    """How many rows ``n`` live peers should sit in.

    >>> plan_rows(16), plan_rows(1024), plan_rows(900), plan_rows(768), plan_rows(61)
    (1, 32, 30, 24, 8)
    """
    _check_size(group_size)
    if n <= group_size:
        return 1
    lo = math.ceil(n / group_size)
    if lo > group_size:  # beyond group_size**2: the longest rows, columns past the target
        return lo
    candidates = [s for s in range(lo, group_size + 1) if feasible(n, s, group_size)]
    exact = [s for s in candidates if n % s == 0]
    # Nothing feasible (3 peers, groups of at most 2): the shortest rows; one is short of 2.
    pool = exact or candidates or [lo]
    # Rows about as long as there are rows: the smallest groups on both kinds of round.
    return min(pool, key=lambda s: (abs(s - n / s), s))


def row_targets(n: int, rows: int) -> list[int]:
    """How many peers each row should hold: ``n`` dealt as evenly as possible, the longer rows
    first.

    >>> row_targets(33, 2), row_targets(10, 3)
    ([17, 16], [4, 3, 3])
    """
    base, extra = divmod(n, rows)
    return [base + (1 if r < extra else 0) for r in range(rows)]


def round_kind(round: int, rows: int) -> RoundKind:
    """Rows average in even rounds, columns in odd ones (``round`` counted from the newest row
    round, see :meth:`Plan.kind`); with one row every round is a row's."""
    return "row" if rows <= 1 or round % 2 == 0 else "column"


def group_sizes(announced: int, max_group_size: int) -> list[int]:
    """How ``announced`` peers under one key are cut into groups: as few groups of at most
    ``max_group_size`` as possible, sizes differing by at most one, the larger ones first
    (33 under 32: 17 + 16, not 32 + a solo peer; 97: 25 + 24 + 24 + 24).

    >>> group_sizes(33, 32), group_sizes(97, 32), group_sizes(5, 32), group_sizes(0, 32)
    ([17, 16], [25, 24, 24, 24], [5], [])
    """
    if announced <= 0:
        return []
    groups = math.ceil(announced / max_group_size)
    base, extra = divmod(announced, groups)
    return [base + (1 if k < extra else 0) for k in range(groups)]


def block_of(place: int, announced: int, max_group_size: int) -> tuple[int, int]:
    """The places ``[first, end)`` of the group that ``place`` falls in when ``announced``
    peers are cut as :func:`group_sizes` says.

    >>> block_of(30, 97, 32), block_of(0, 5, 32)
    ((25, 49), (0, 5))
    """
    offset = 0
    for size in group_sizes(announced, max_group_size):
        if place < offset + size:
            return offset, offset + size
        offset += size
    return offset, offset + 1


def capacity_at(place: int, announced: int, max_group_size: int) -> int:
    """The size of the group that starts at ``place`` when the announcers, in their agreed
    order, are cut as :func:`group_sizes` says (a leader at ``place`` fills that many).

    >>> capacity_at(0, 97, 32), capacity_at(25, 97, 32), capacity_at(5, 5, 32)
    (25, 24, 5)
    """
    offset = 0
    for size in group_sizes(announced, max_group_size):
        if place < offset + size:
            return size
        offset += size
    return max(1, min(max_group_size, announced))


def overflow_row(attempt: int, rng: random.Random) -> int:
    """The row to try next when a joiner with no directory to go by found the row it tried
    full (the DHT keeps at most 256 entries under a key): rows 0, 1, ..., 7 in turn (each fills
    before the next is tried, so no row is left with a straggler alone), then one of rows
    8-15, 16-31, ... at random, so that even a huge swarm starting all at once spreads out in
    a few more tries.

    >>> rng = random.Random(1)
    >>> [overflow_row(a, rng) for a in range(8)], 8 <= overflow_row(8, rng) < 16
    ([0, 1, 2, 3, 4, 5, 6, 7], True)
    """
    if attempt < 8:
        return max(attempt, 0)
    low = 1 << (attempt - 5)
    return rng.randrange(low, 2 * low)


def estimate_size(own: bytes, nearest: Sequence[bytes], k: int) -> int:
    """How many peers the DHT holds, judged from the ``nearest`` peers a routing table knows
    around ``own`` id (sorted or not; at most ``k`` of them).

    A table that knows fewer than ``k`` peers knows them all (a lookup of its own id walked the
    whole swarm): their count plus one. Otherwise ids are uniform, so the i-th nearest XOR
    distance is about ``i / N`` of the id space; a least-squares fit over the ``k`` nearest
    gives ``N`` within about ``1 / sqrt(k)`` (20%: enough to size a cold start's rows).

    >>> estimate_size(bytes(32), [bytes(31) + bytes([i]) for i in (1, 2)], 20)
    3
    """
    if len(nearest) < k:
        return len(nearest) + 1
    me = int.from_bytes(own, "big")
    distances = sorted(int.from_bytes(other, "big") ^ me for other in nearest)[:k]
    weighted = sum(i * d for i, d in enumerate(distances, 1))
    squares = sum(i * i for i in range(1, len(distances) + 1))
    space = 1 << (8 * len(own))
    if weighted <= 0:
        return len(nearest) + 1
    return max(len(nearest) + 1, round(space * squares / weighted))


def estimate_size_around(key: bytes, closest: Sequence[bytes]) -> int:
    """How many peers the DHT holds, judged from the ``closest`` peers a lookup of ``key`` (a
    32-byte id) ended with: the same least-squares fit as :func:`estimate_size`, always made
    (a lookup stops at a few of the closest; fewer than that says nothing more). Every peer
    that looks the same key up finds about the same peers, so every peer judges about the same
    size: what a cold start needs for all to pick among the same rows.

    >>> estimate_size_around(bytes(32), [(i << 250).to_bytes(32, "big") for i in range(1, 11)])
    64
    >>> estimate_size_around(bytes(32), [])
    1
    """
    return estimate_size(key, closest, len(closest))


def cold_rows(estimate: int, group_size: int = DEFAULT_TARGET_GROUP_SIZE) -> int:
    """How many cold rows a swarm of about ``estimate`` peers starts in: one per
    :data:`COLD_GROUPS_PER_ROW` groups of the target size, rounded up (an estimate a third
    low still leaves a 256-peer swarm two keys, not one key as full as the DHT allows).

    >>> cold_rows(1024), cold_rows(100), cold_rows(200), cold_rows(1024, 8)
    (8, 1, 2, 32)
    """
    _check_size(group_size)
    return max(1, -(-estimate // (COLD_GROUPS_PER_ROW * group_size)))


def cold_row(estimate: int, rng: random.Random, group_size: int = DEFAULT_TARGET_GROUP_SIZE) -> int:
    """The row a peer with no directory to go by starts in (a swarm starting all at once): one
    of :func:`cold_rows` at random, so that each cold row's key holds a few groups' worth of
    announcers, which the matchmaker cuts into groups of sizes differing by at most one, not
    the whole swarm, whose every reader would read all of it, several times.

    Why a few groups' worth, not one: a key's count is binomial, and the matchmaker cuts it
    into as few groups as the maximum allows. At one group's worth a key (32 rows at 1024
    peers) the groups were 6 to 32 peers (median 21); at four (8 rows of about 128, spread
    about 11), 26 to 40 (median 34). In ``benchmarks/averaging_sim.py`` (N = 1024, p = 0.01,
    40 seeds) the variance after the cold round went from 10**-1.28 to 10**-1.42, and after
    the column round that follows (with the room up to the maximum too) from 10**-2.87 to
    10**-3.15 (the paper's full 32 x 32 grid: 10**-1.41 and 10**-3.18). An estimate off by
    half still keeps a key well under the DHT's 256.
    Cold rows are numbered from :data:`COLD_ROW_BASE`: the next plan lays the rows out afresh
    and moves everyone to their planned places.

    >>> cold_row(40, random.Random(0)) - COLD_ROW_BASE
    0
    >>> 0 <= cold_row(1024, random.Random(0)) - COLD_ROW_BASE < 8
    True
    """
    return COLD_ROW_BASE + rng.randrange(cold_rows(estimate, group_size))


#: rows a peer with no directory tries before it sits the round out (see ``cold_start_rows``)
COLD_ATTEMPTS = 10
#: how many groups' worth of peers a cold row's key holds (see ``cold_row``)
COLD_GROUPS_PER_ROW = 4

#: peers with no row read the run's directory spread over time at about this many a second
#: (``cold_read_spread``), and never later than ``COLD_READ_SPREAD_MAX`` into the round
COLD_READ_RATE = 600.0
COLD_READ_SPREAD_MAX = 1.5
#: at a cold start, a key's announcers are not judged complete (two reads alike) before this
#: long past the end of the spread: the last reader's lookup and its announcement's store
#: (a few hundred ms each in a swarm of a thousand). Judged complete earlier, the first
#: announcers cut their key into groups without the later ones, who were left to make small
#: groups or none (66 solo peers and 117 groups for 32 cold rows at 1024 peers).
COLD_SETTLE = 1.0


def cold_read_spread(estimate: int) -> float:
    """Over how many seconds from the round's start peers with no row (all of them, at a cold
    start) should spread their reads of the run's directory, judged from the swarm's size.

    Every such peer reads the directory's key, whose replicas are the same ten peers for
    everyone: at a 1024-peer cold start they were dialed a thousand times at one instant and
    turned most dials away at their connection limit (256). A replica takes a reader's
    connection for about a third of a second (handshake, the read, then quiet until
    ``crowded_idle_after`` lets a newcomer in), so a few hundred a second is what it can take.
    Small swarms hardly wait: 0.05 s at 32 peers, 0.43 s at 256, 1.5 s from 900 on.

    >>> cold_read_spread(32), cold_read_spread(1024)
    (0.05333333333333334, 1.5)
    """
    return min(COLD_READ_SPREAD_MAX, max(0, estimate) / COLD_READ_RATE)


def cold_start_rows(
    estimate: int,
    rng: random.Random,
    group_size: int = DEFAULT_TARGET_GROUP_SIZE,
    attempts: int = COLD_ATTEMPTS,
) -> Iterator[int]:
    """The rows a peer with no directory to go by tries, in order, moving on while a row's key
    is full: its ``cold_row``, then the overflow rows past the cold ones (``overflow_row``'s
    0-7 in turn, then wider and wider random ranges: 256 announcers a key each). Drawn lazily,
    as they are tried. The averager and ``benchmarks/averaging_sim.py`` both start cold
    through this.

    >>> [r - COLD_ROW_BASE for r in cold_start_rows(64, random.Random(0))]
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 15]
    """
    yield cold_row(estimate, rng, group_size)
    past = COLD_ROW_BASE + cold_rows(estimate, group_size)
    for attempt in range(attempts - 1):
        yield past + overflow_row(attempt, rng)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The rows as the directory shows them: per row, its groups from the row's latest round,
    ordered by group id; a member's position is its group's offset plus its index in it."""

    #: row -> [(group_id, size, reachable)], groups ordered by id
    rows: Mapping[int, Sequence[tuple[bytes, int, int]]]
    #: the newest round any entry is from (-1: an empty directory)
    round: int = -1
    #: group id -> its ``RowRecord.listening`` bitmap
    listening: Mapping[bytes, bytes] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[RowRecord]) -> Layout:
        latest: dict[int, int] = {}
        kept: list[RowRecord] = []
        for record in records:
            kept.append(record)
            latest[record.row] = max(latest.get(record.row, -1), record.round)
        newest = max(latest.values(), default=-1)
        # Cold rows are left for good by the first planned row round: once a planned row is
        # newer than a cold row's entry, its peers are counted where they went.
        planned = max((r for row, r in latest.items() if row < COLD_ROW_BASE), default=-1)
        rows: dict[int, dict[bytes, tuple[int, int]]] = {}
        bits: dict[bytes, bytes] = {}
        for record in kept:
            if record.round != latest[record.row] or record.round < newest - STALE_ROUNDS:
                continue
            if record.row >= COLD_ROW_BASE and record.round < planned:
                continue
            rows.setdefault(record.row, {})[record.group_id] = (record.size, record.reachable)
            bits[record.group_id] = record.listening
        return cls(
            rows={
                row: [(gid, *groups[gid]) for gid in sorted(groups)]
                for row, groups in sorted(rows.items())
            },
            round=newest,
            listening=bits,
        )

    def listeners(self) -> Iterable[tuple[int, int]]:
        """The (row, position) of every member that listens (can lead and reduce)."""
        for row, groups in self.rows.items():
            offset = 0
            for gid, size, reachable in groups:
                if reachable:
                    for index in range(size):
                        if _listens(self.listening.get(gid, b""), reachable, index):
                            yield row, offset + index
                offset += size

    @functools.cached_property
    def _sizes(self) -> dict[int, int]:
        # every plan asks for each row's size many times (once per peer placed)
        return {row: sum(size for _, size, _ in groups) for row, groups in self.rows.items()}

    def size(self, row: int) -> int:
        return self._sizes.get(row, 0)

    def reachable(self, row: int) -> int:
        return sum(r for _, _, r in self.rows.get(row, ()))

    @property
    def total(self) -> int:
        return sum(self._sizes.values())

    def position(self, row: int, group_id: bytes, index: int) -> int | None:
        """The position of the member at ``index`` of group ``group_id`` in ``row``; None when
        the directory does not show that group (its entry was not stored, or is stale)."""
        offset = 0
        for gid, size, _ in self.rows.get(row, ()):
            if gid == group_id:
                return offset + index if 0 <= index < size else None
            offset += size
        return None


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every peer that read the same directory agrees on: rows, their targets, moves."""

    layout: Layout
    rows: int
    targets: tuple[int, ...]
    #: the target group size the rows are laid out for (``group_size_limits``)
    group_size: int

    @classmethod
    def of(cls, layout: Layout, group_size: int = DEFAULT_TARGET_GROUP_SIZE) -> Plan:
        _check_size(group_size)
        n = layout.total
        current = max(layout.rows, default=-1) + 1
        if n == 0:
            rows = 1
        elif current >= 1 and feasible(n, current, group_size):
            rows = current  # churn alone does not reshuffle the swarm
        else:
            rows = plan_rows(n, group_size)
        # The even targets, the longer ones dealt to the rows that hold the most already (ties:
        # the lower row): a row that lost a peer to a failure keeps the shorter target, so
        # nobody moves in and the peer, back, fits in its own row again. Dealt in row order
        # instead, a long target on such a row drew a peer in from elsewhere, and with rows as
        # long as a group may be the returning peer then made one too many: two half groups.
        dealt = row_targets(max(n, 0), rows)
        by_size = sorted(range(rows), key=lambda r: (-layout.size(r), r))
        targets = [0] * rows
        for r, target in zip(by_size, dealt, strict=True):
            targets[r] = target
        return cls(layout, rows, tuple(targets), group_size)

    @property
    def total(self) -> int:
        return self.layout.total

    @property
    def columns(self) -> int:
        """How many columns a column round has: the longer rows' target length. A shorter row
        leaves one column out (:meth:`column`), so a column never holds more peers than there
        are rows, and no row puts two peers in one column."""
        return max(1, max(self.targets, default=1))

    @functools.cached_property
    def _skipped(self) -> dict[int, int]:
        """The column each shorter row leaves out: the k-th shorter row (in row order) skips
        column ``k mod columns``, so columns differ in size by at most one."""
        columns = self.columns
        short = [r for r, target in enumerate(self.targets) if target < columns]
        return {r: k % columns for k, r in enumerate(short)}

    @functools.cached_property
    def _emptiest(self) -> list[int]:
        """The columns with the fewest planned members."""
        counts = collections.Counter(self._skipped.values())
        most = max(counts.values(), default=0)
        return [c for c in range(self.columns) if counts.get(c, 0) == most]

    def kind(self, round: int) -> RoundKind:
        """Row or column round: alternating from the directory's newest row round, whose
        records were written after it (the round after it a column round, the one after that
        a row round; the same for everyone who read the same directory). Counted from the round
        number alone (rows on even rounds), a cold start that fell on an odd round, rows
        whatever the number since the directory was empty, was followed by a second row round
        on the plan's fresh rows, each a block of consecutive cold places: it mixed almost
        nothing (a 256-peer swarm's variance went from 3.1e-2 to 2.8e-2, where a column round
        takes it to 3e-4)."""
        if self.layout.round < 0:
            return round_kind(round, self.rows)
        return round_kind(round - self.layout.round, self.rows)

    def _missing_place(self, k: int) -> tuple[int, int] | None:
        """The ``k``-th missing place (row, position), rows in order, positions ascending."""
        for row, target in enumerate(self.targets):
            size = self.layout.size(row)
            short = max(0, target - size)
            if k < short:
                return row, size + k
            k -= short
        return None

    def place(self, row: int, position: int | None) -> tuple[int, int | None]:
        """Where the peer at ``position`` of ``row`` sits once the plan's moves are made: the
        same place, unless it is an excess place, which fills the matching missing one. The
        column round before the moves already uses these places, so that the rows formed
        after it hold one peer of every column. ``position`` None (the directory does not show
        this peer's group): it stays in its row, place unknown."""
        target = self.targets[row] if row < self.rows else 0
        if position is None:
            return (row if row < self.rows else self._least_full()), None
        if position < target:
            return row, position
        # The excess places in (row, position) order, paired with the missing ones in order.
        k = 0
        for r in sorted(self.layout.rows):
            t = self.targets[r] if r < self.rows else 0
            if r == row:
                k += position - t
                break
            k += max(0, self.layout.size(r) - t)
        found = self._missing_place(k)
        if found is None:  # a position past what the directory shows (a stale entry)
            return (row if row < self.rows else self._least_full()), None
        return found

    def column(self, row: int, position: int | None, rng: random.Random) -> int:
        """The column a peer averages in on a column round: its place's position, a shorter
        row's positions from its left-out column on shifted one right. A peer whose place is
        not known (it was away, or its group's entry is missing) takes its row's left-out
        column, or one of the emptiest columns."""
        dest, place = self.place(row, position)
        skipped = self._skipped.get(dest)
        if place is None:
            # Most often a peer back from a failure: its row left its place empty (and, being
            # short, a column out), so it takes that column; else one of the emptiest.
            return skipped if skipped is not None else rng.choice(self._emptiest)
        if skipped is None or place < skipped:
            return place
        return place + 1

    def _least_full(self) -> int:
        fill = [self.layout.size(r) - t for r, t in enumerate(self.targets)]
        return fill.index(min(fill))

    def expected(self, kind: RoundKind, index: int) -> int:
        """How many peers the plan puts in row ``index`` (``kind="row"``) or column ``index``:
        once that many have announced there, nobody else is expected."""
        if kind == "row":
            return self.targets[index] if 0 <= index < self.rows else 0
        if not 0 <= index < self.columns:
            return 0
        return sum(1 for r in range(self.rows) if self._skipped.get(r) != index)

    # -- client-mode peers: never in a group without a member that listens -------------------

    @functools.cached_property
    def _led(self) -> tuple[frozenset[int], frozenset[int]]:
        """The rows and the columns that will hold a listening member once the moves are made
        (empty when nobody listens: then any place will do)."""
        rows: set[int] = set()
        columns: set[int] = set()
        rng = random.Random(0)  # unused: listeners' places are known
        for row, position in self.layout.listeners():
            dest, place = self.place(row, position)
            rows.add(dest)
            if place is not None:
                columns.add(self.column(row, position, rng))
        return frozenset(rows), frozenset(columns)

    def seat(self, row: int | None, position: int | None) -> int | None:
        """The row a peer goes by in this plan: its own, or None when it is to place itself as
        a joiner does (:meth:`row_for_joiner`, :meth:`column_for` with no row). That is a peer
        in no row, and one whose row the plan does not have (a cold row, once everyone in it
        was placed) and whose place the directory does not show (it was away then): sent to
        the least full row, every such peer would land in the same one, and split it."""
        if row is None or (position is None and row >= self.rows):
            return None
        return row

    def row(self, row: int, position: int | None, *, reachable: bool = True) -> int:
        """The row the peer at ``position`` of ``row`` averages in on a row round: its place's
        (:meth:`place`). A client-mode peer (``reachable=False``) whose row would have nobody
        who listens (nobody to lead it) takes the least full row that has one instead."""
        dest = self.place(row, position)[0]
        if reachable:
            return dest
        led = self._led[0]
        if not led or dest in led:
            return dest
        fill = {r: self.layout.size(r) - self.targets[r] for r in sorted(led) if r < self.rows}
        if not fill:
            return dest
        low = min(fill.values())
        return next(r for r, f in fill.items() if f == low)

    def column_for(
        self, row: int | None, position: int | None, rng: random.Random, *, reachable: bool = True
    ) -> int:
        """The column a peer averages in on a column round: :meth:`column`, or for a peer in no
        row one of the emptiest columns. A client-mode peer (``reachable=False``) whose column
        would have nobody who listens takes the next column (in order, wrapping) that has one."""
        column = rng.choice(self._emptiest) if row is None else self.column(row, position, rng)
        if reachable:
            return column
        # (only now: _led places every listening member of the swarm, a thousand at 1024 peers,
        # and every peer plans for itself)
        led = self._led[1]
        if not led or column in led:
            return column
        return min(led, key=lambda c: (c - column) % self.columns)

    def row_for_joiner(self, rng: random.Random, *, reachable: bool = True) -> int:
        """A row for a peer not in any: one with room once the plan's moves are made (a target
        below the target group size), at random weighted by how much (joiners arriving
        together spread out), else one of the least full, where the room between the target
        and the maximum group size takes it (past the maximum the row would average as two
        half groups). The plan's missing places are no guide, since its own moves fill every
        one of them. A
        client-mode joiner (``reachable=False``) prefers rows with a reachable member, who can
        lead it."""
        rows = range(self.rows)
        if not reachable:
            led = [r for r in rows if self.layout.reachable(r) > 0]
            rows = led or list(rows)  # type: ignore[assignment]
        room = [r for r in rows for _ in range(max(0, self.group_size - self.targets[r]))]
        if room:
            return rng.choice(room)
        fill = {r: self.layout.size(r) - self.targets[r] for r in rows}
        low = min(fill.values())
        return rng.choice([r for r, f in fill.items() if f == low])
