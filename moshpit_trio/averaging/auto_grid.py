"""``grid="auto"``: groups formed from whoever is live, balanced at any swarm size (sans-IO).

A fixed grid needs its shape chosen for a swarm size nobody knows, and keys drawn from PeerIDs
fill its lines unevenly: small swarms go solo, large ones need extra rounds. The auto grid
instead lays the live peers out as *rows* that persist from round to round and *columns* that
cross them, with both sizes following the live count ``N``:

* ``S`` rows (ids ``0 .. S-1``); row ``r`` should hold ``L_r = N // S + (r < N % S)`` peers
  (:func:`row_targets`), so row sizes differ by at most one. ``N <= max_group_size``: one row,
  the whole swarm in one group every round. Larger: :func:`plan_rows` picks ``S`` so that rows
  are at most ``max_group_size`` long, preferring an ``S`` that divides ``N`` (every row full)
  and, among those, rows about as long as there are rows.
* Inside its row a peer has a *position*: its place in the row as the row's last group(s)
  formed it (members by PeerID; a row too long for one group forms several, ordered by group
  id). Positions are thus dense: nobody who left holds one.
* Even rounds average along rows, odd rounds along columns: the peers at the same position in
  every row (:func:`column_of`; a row's one extra peer goes to column ``r mod C``, so column
  sizes differ by at most one too). With one row, every round is a row round.

When ``N = S * L`` and every row holds ``L``, a row round then a column round give every peer
the exact mean: the paper's 2-D grid, with ``M`` following ``N`` instead of configuration.
(2-D only: the column count grows past ``max_group_size`` beyond ``max_group_size**2`` peers,
and columns then form several groups each.)

Who is where is written down, not derived from PeerIDs: after each row round the first member
(lowest PeerID) of each group stores a :class:`RowRecord` (row, round, group id, size, reachable
members) under the run's *directory* key ``mp.avg/RUN/rows``, an owned record with one entry
per row group. Every peer reads it before a round (about ``S`` entries: bounded by the group
size while ``N <= max_group_size**2``) and turns it into a :class:`Layout`; from the layout every
peer computes the same :class:`Plan`:

* ``S`` stays as it is while it is feasible (rows no longer than ``max_group_size``, no row
  shorter than two), so churn does not reshuffle the swarm; otherwise it is planned afresh;
* excess places (positions past a row's target, and every place in a row ``>= S``) are paired,
  in (row, position) order, with missing places (rows short of their target, in row order):
  those peers move before the next row round (:meth:`Plan.place`), and the column round
  before that already puts them in the columns of their new places;
* a joiner takes a row with a missing place, at random weighted by how many are missing
  (:meth:`Plan.row_for_joiner`); with no directory yet it takes row 0, which then splits.

Everything here is plain functions of plain values, so the simulator
(``benchmarks/averaging_sim.py``, method ``moshpit-auto``) runs the very code the averager runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import msgspec

from ..errors import ConfigError
from .grid import GROUP_KEY_NAMESPACE

__all__ = [
    "DEFAULT_MAX_GROUP_SIZE",
    "Layout",
    "Plan",
    "RoundKind",
    "RowRecord",
    "balanced_capacity",
    "column_of",
    "directory_key",
    "overflow_row",
    "plan_rows",
    "round_kind",
    "row_targets",
]

DEFAULT_MAX_GROUP_SIZE = 32
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
    return record


def directory_key(run_id: str) -> str:
    """The DHT key of run ``run_id``'s directory of row groups (an owned key: one entry per
    writer, the first member of a row group)."""
    return f"{GROUP_KEY_NAMESPACE}/{run_id}/rows"


def _check_max(max_group_size: int) -> int:
    if isinstance(max_group_size, bool) or not isinstance(max_group_size, int):
        raise ConfigError(f"max_group_size must be an integer, got {max_group_size!r}")
    if max_group_size < 2:
        raise ConfigError(f"max_group_size must be at least 2, got {max_group_size}")
    return max_group_size


def feasible(n: int, rows: int, max_group_size: int) -> bool:
    """Can ``n`` peers sit in ``rows`` rows, none longer than the maximum, none shorter than 2
    (one row only while everyone fits in one group)?"""
    if rows == 1:
        return n <= max_group_size
    return (
        n > max_group_size
        and math.ceil(n / rows) <= max_group_size
        and n // rows >= 2
        # columns hold about one peer per row: no more rows than a group may hold, while
        # the swarm fits in max_group_size**2 at all
        and (rows <= max_group_size or n > max_group_size**2)
    )


def plan_rows(n: int, max_group_size: int = DEFAULT_MAX_GROUP_SIZE) -> int:
    """How many rows ``n`` live peers should sit in.

    >>> plan_rows(16), plan_rows(1024), plan_rows(900), plan_rows(768), plan_rows(61)
    (1, 32, 30, 24, 8)
    """
    _check_max(max_group_size)
    if n <= max_group_size:
        return 1
    lo = math.ceil(n / max_group_size)
    if lo > max_group_size:  # beyond max_group_size**2: the longest rows, columns past the max
        return lo
    candidates = [s for s in range(lo, max_group_size + 1) if feasible(n, s, max_group_size)]
    exact = [s for s in candidates if n % s == 0]
    pool = exact or candidates
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
    """Rows average in even rounds, columns in odd ones; with one row every round is a row's."""
    return "row" if rows <= 1 or round % 2 == 0 else "column"


def column_of(position: int, row: int, columns: int) -> int:
    """The column of the peer at ``position`` in ``row`` when rows hold ``columns`` or one more:
    a row's extra peer goes to column ``row mod columns``, spreading the extras.

    >>> [column_of(p, 0, 3) for p in range(4)], column_of(3, 1, 3)
    ([0, 1, 2, 0], 1)
    """
    if columns < 1:
        raise ConfigError(f"a layout has at least one column, got {columns}")
    if position < columns:
        return position
    return (row + position - columns) % columns


def balanced_capacity(announced: int, max_group_size: int) -> int:
    """The group size that cuts ``announced`` peers under one key into as few groups of at most
    ``max_group_size`` as possible, sizes differing by at most one (33 and 32: 17 + 16, not
    32 + a solo peer).

    >>> balanced_capacity(33, 32), balanced_capacity(64, 32), balanced_capacity(5, 32)
    (17, 32, 5)
    """
    if announced <= max_group_size:
        return max(announced, 1)
    groups = math.ceil(announced / max_group_size)
    return math.ceil(announced / groups)


def overflow_row(attempt: int, rng: random.Random) -> int:
    """The row to try next when a joiner with no directory to go by found the row it tried
    full (the DHT keeps at most 256 entries under a key): row 0 first, then one of rows 1,
    2-3, 4-7, ... at random, so that a swarm starting all at once spreads over a few rows
    in a few tries instead of all piling into one.

    >>> overflow_row(0, random.Random(1)), overflow_row(1, random.Random(1))
    (0, 1)
    """
    if attempt <= 0:
        return 0
    low = 1 << (attempt - 1)
    return rng.randrange(low, 2 * low)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The rows as the directory shows them: per row, its groups from the row's latest round,
    ordered by group id; a member's position is its group's offset plus its index in it."""

    #: row -> [(group_id, size, reachable)], groups ordered by id
    rows: Mapping[int, Sequence[tuple[bytes, int, int]]]
    #: the newest round any entry is from (-1: an empty directory)
    round: int = -1

    @classmethod
    def from_records(cls, records: Iterable[RowRecord]) -> Layout:
        latest: dict[int, int] = {}
        kept: list[RowRecord] = []
        for record in records:
            kept.append(record)
            latest[record.row] = max(latest.get(record.row, -1), record.round)
        newest = max(latest.values(), default=-1)
        rows: dict[int, dict[bytes, tuple[int, int]]] = {}
        for record in kept:
            if record.round != latest[record.row] or record.round < newest - STALE_ROUNDS:
                continue
            rows.setdefault(record.row, {})[record.group_id] = (record.size, record.reachable)
        return cls(
            rows={
                row: [(gid, *groups[gid]) for gid in sorted(groups)]
                for row, groups in sorted(rows.items())
            },
            round=newest,
        )

    def size(self, row: int) -> int:
        return sum(size for _, size, _ in self.rows.get(row, ()))

    def reachable(self, row: int) -> int:
        return sum(r for _, _, r in self.rows.get(row, ()))

    @property
    def total(self) -> int:
        return sum(self.size(row) for row in self.rows)

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
    max_group_size: int

    @classmethod
    def of(cls, layout: Layout, max_group_size: int = DEFAULT_MAX_GROUP_SIZE) -> Plan:
        _check_max(max_group_size)
        n = layout.total
        current = max(layout.rows, default=-1) + 1
        if n == 0:
            rows = 1
        elif current >= 1 and feasible(n, current, max_group_size):
            rows = current  # churn alone does not reshuffle the swarm
        else:
            rows = plan_rows(n, max_group_size)
        return cls(layout, rows, tuple(row_targets(max(n, 0), rows)), max_group_size)

    @property
    def total(self) -> int:
        return self.layout.total

    @property
    def columns(self) -> int:
        """How many columns a column round has: the shorter rows' target length."""
        return max(1, min(self.targets, default=1))

    def kind(self, round: int) -> RoundKind:
        return round_kind(round, self.rows)

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
        """The column a peer averages in on a column round (at random when its place is not
        known: it is new, or its group's entry is missing)."""
        dest, place = self.place(row, position)
        if place is None:
            return rng.randrange(self.columns)
        return column_of(place, dest, self.columns)

    def _least_full(self) -> int:
        fill = [self.layout.size(r) - t for r, t in enumerate(self.targets)]
        return fill.index(min(fill))

    def row_for_joiner(self, rng: random.Random, *, reachable: bool = True) -> int:
        """A row for a peer not in any: one with a missing place, at random weighted by how many
        (joiners arriving together spread out), else the least full. A client-mode joiner
        (``reachable=False``) prefers rows with a reachable member, who can lead it."""
        rows = range(self.rows)
        if not reachable:
            led = [r for r in rows if self.layout.reachable(r) > 0]
            rows = led or list(rows)  # type: ignore[assignment]
        missing = [r for r in rows for _ in range(max(0, self.targets[r] - self.layout.size(r)))]
        if missing:
            return rng.choice(missing)
        fill = {r: self.layout.size(r) - self.targets[r] for r in rows}
        low = min(fill.values())
        return rng.choice([r for r, f in fill.items() if f == low])
