"""averaging.auto_grid: row counts, targets, columns, the plan's moves, the directory's records,
and the exactness of a row round after a column round on the planned places."""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict

import msgspec
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging.auto_grid import (
    COLD_GROUPS_PER_ROW,
    COLD_ROW_BASE,
    DEFAULT_MAX_GROUP_SIZE,
    DEFAULT_TARGET_GROUP_SIZE,
    STALE_ROUNDS,
    Layout,
    Plan,
    RowRecord,
    capacity_at,
    cold_row,
    cold_rows,
    decode_record,
    encode_record,
    estimate_size,
    feasible,
    group_size_limits,
    group_sizes,
    listening_bits,
    overflow_row,
    plan_rows,
    round_kind,
    row_targets,
)
from moshpit_trio.errors import ConfigError

MAXES = st.integers(min_value=2, max_value=40)


def gid(k: int) -> bytes:
    return k.to_bytes(16, "big")


def layout_of(rows: dict[int, list[int]], round: int = 7, reachable: bool = True) -> Layout:
    """A layout whose row ``r`` holds groups of the given sizes (ids in order)."""
    records = []
    k = 0
    for row, sizes in rows.items():
        for size in sizes:
            records.append(RowRecord(row, round, gid(k), size, size if reachable else 0))
            k += 1
    return Layout.from_records(records)


@st.composite
def layouts(draw: st.DrawFn, max_total: int = 700) -> tuple[Layout, int]:
    """Any layout: rows with gaps, several groups per row of any size; and a max group size."""
    m = draw(st.integers(min_value=2, max_value=33))
    row_ids = draw(st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True))
    rows = {r: draw(st.lists(st.integers(1, 70), min_size=1, max_size=4)) for r in sorted(row_ids)}
    assume(sum(map(sum, rows.values())) <= max_total)
    return layout_of(rows), m


# -- plan_rows, row_targets ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 2000), m=MAXES)
def test_plan_rows_is_feasible(n: int, m: int) -> None:
    rows = plan_rows(n, m)
    targets = row_targets(n, rows)
    assert (rows == 1) == (n <= m)
    assert max(targets) <= m  # no row longer than a group may be
    if n > m * m:
        assert rows == math.ceil(n / m)  # the longest rows; columns then form several groups
    elif any(feasible(n, s, m) for s in range(1, m + 1)):
        assert feasible(n, rows, m)
        assert rows <= m and (rows == 1 or min(targets) >= 2)
        divisors = [s for s in range(1, m + 1) if feasible(n, s, m) and n % s == 0]
        if divisors:
            assert n % rows == 0, (n, m, rows, divisors)


def test_plan_rows_examples() -> None:
    assert [plan_rows(n) for n in (2, 32, 33, 512, 768, 900, 1024)] == [1, 1, 3, 16, 24, 30, 32]
    assert plan_rows(3, 2) == 2  # nothing is feasible (3 > 2, and a row of one): shortest rows
    assert plan_rows(32 * 32 + 1) == 33


@given(n=st.integers(0, 5000), rows=st.integers(1, 200))
def test_row_targets_deal_evenly(n: int, rows: int) -> None:
    targets = row_targets(n, rows)
    assert len(targets) == rows and sum(targets) == n
    assert max(targets) - min(targets) <= 1
    assert targets == sorted(targets, reverse=True)


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, "32", True, None])
def test_bad_target_group_size_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        plan_rows(100, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Plan.of(layout_of({0: [3]}), bad)  # type: ignore[arg-type]


def test_round_kind() -> None:
    assert [round_kind(t, 1) for t in range(3)] == ["row"] * 3
    assert [round_kind(t, 5) for t in range(4)] == ["row", "column", "row", "column"]


@pytest.mark.parametrize("cold_round", [10, 11])
def test_the_round_after_a_row_round_averages_columns_whatever_its_number(
    cold_round: int,
) -> None:
    # An empty directory: every round is a row round (a cold start), odd or even.
    empty = Plan.of(Layout.from_records([]), 32)
    assert {empty.kind(cold_round), empty.kind(cold_round + 1)} == {"row"}
    # The cold round's groups wrote the directory: the next round averages columns, the one
    # after that rows, and a peer reading a directory one row round old agrees.
    cold = [RowRecord(COLD_ROW_BASE + r, cold_round, gid(r), 30, 30) for r in range(8)]
    plan = Plan.of(Layout.from_records(cold), 32)
    assert plan.rows == 15  # 240 peers: 15 rows of 16
    assert [plan.kind(cold_round + d) for d in (1, 2, 3, 4)] == ["column", "row", "column", "row"]
    planned = [RowRecord(r, cold_round + 2, gid(100 + r), 16, 16) for r in range(15)]
    newer = Plan.of(Layout.from_records(cold + planned), 32)
    for later in range(cold_round + 3, cold_round + 7):
        assert newer.kind(later) == plan.kind(later)


@given(announced=st.integers(0, 600), m=MAXES)  # a DHT key holds 256 announcers
def test_group_sizes_cut_into_the_fewest_even_groups(announced: int, m: int) -> None:
    sizes = group_sizes(announced, m)
    assert sum(sizes) == announced
    assert len(sizes) == math.ceil(announced / m)
    if sizes:
        assert max(sizes) <= m and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)
        # a leader at each group's first place fills exactly that group
        offset = 0
        for size in sizes:
            assert capacity_at(offset, announced, m) == size
            assert capacity_at(offset + size - 1, announced, m) == size
            offset += size


# -- columns ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 1024), m=st.integers(2, 32))
def test_columns_at_targets_are_balanced_and_cross_every_row_once(n: int, m: int) -> None:
    """With every row at its target: no row puts two peers in one column (row-mates are spread
    over different groups next round), column sizes differ by at most one, and no column holds
    more peers than there are rows (so none exceeds the group size while rows <= m)."""
    rows = plan_rows(n, m)
    plan = Plan.of(layout_of({r: [t] for r, t in enumerate(row_targets(n, rows))}), m)
    assert plan.rows == rows
    rng = random.Random(0)
    sizes: Counter[int] = Counter()
    for r, target in enumerate(plan.targets):
        in_row = Counter(plan.column(r, q, rng) for q in range(target))
        assert max(in_row.values()) == 1
        sizes.update(in_row)
    assert set(sizes) == set(range(plan.columns))
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert max(sizes.values()) <= plan.rows


def test_a_row_short_by_a_failure_keeps_the_short_target_and_its_peer_its_column() -> None:
    # 32 rows of 32, two of them (5 and 9) short by one: a failed peer each. Nobody moves; the
    # short rows leave different columns out; a peer back (place unknown) fills its row's.
    sizes = {r: [32] for r in range(32)}
    sizes[5], sizes[9] = [31], [31]
    plan = Plan.of(layout_of(sizes), 32)
    assert plan.targets == tuple(31 if r in (5, 9) else 32 for r in range(32))
    assert plan.columns == 32
    rng = random.Random(0)
    assert all(plan.place(r, q) == (r, q) for r in range(32) for q in range(sizes[r][0]))
    left_out = {r: set(range(32)) - {plan.column(r, q, rng) for q in range(31)} for r in (5, 9)}
    assert left_out[5] != left_out[9] and all(len(c) == 1 for c in left_out.values())
    assert {plan.column(5, None, rng)} == left_out[5]
    # A peer with no known place in a full row: one of the columns left out.
    assert plan.column(0, None, rng) in left_out[5] | left_out[9]


# -- the plan's moves ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(drawn=layouts())
def test_places_are_exactly_the_planned_places(drawn: tuple[Layout, int]) -> None:
    """For any layout, the peers' places after the moves fill every planned place exactly once,
    and a peer already within its row's target stays where it is."""
    layout, m = drawn
    plan = Plan.of(layout, m)
    assert sum(plan.targets) == layout.total and len(plan.targets) == plan.rows
    assert max(plan.targets) - min(plan.targets) <= 1
    places = []
    for row in layout.rows:
        for position in range(layout.size(row)):
            place = plan.place(row, position)
            if row < plan.rows and position < plan.targets[row]:
                assert place == (row, position)
            places.append(place)
    wanted = [(r, q) for r, target in enumerate(plan.targets) for q in range(target)]
    assert sorted(places) == wanted  # type: ignore[type-var]


def test_place_examples() -> None:
    # 40 peers in one row of three groups: not feasible with rows of 32, planned as 5 rows of 8
    # (a divisor, rows about as long as there are rows); the excess fills rows 1-4 in order.
    plan = Plan.of(layout_of({0: [16, 16, 8]}), 32)
    assert (plan.rows, plan.targets) == (5, (8,) * 5)
    assert plan.place(0, 7) == (0, 7)
    assert [plan.place(0, q) for q in (8, 15, 16, 39)] == [(1, 0), (1, 7), (2, 0), (4, 7)]
    # Churn alone keeps the rows: 3 rows stay 3 (feasible) though plan_rows(61) would say 8.
    plan = Plan.of(layout_of({0: [21], 1: [20], 2: [20]}), 32)
    assert plan.rows == 3 and plan.targets == (21, 20, 20)
    # Unknown places: stay in the row; a row past the plan goes to the least full one.
    assert plan.place(1, None) == (1, None)
    plan = Plan.of(layout_of({0: [20], 1: [20], 40: [2]}), 32)
    assert plan.rows == 6 and plan.place(40, None) == (2, None)


@settings(max_examples=150, deadline=None)
@given(
    side=st.tuples(st.integers(2, 12), st.integers(2, 12)),
    cuts=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    seed=st.integers(0, 2**32),
)
def test_a_column_round_then_a_row_round_is_exact(
    side: tuple[int, int], cuts: list[int], seed: int
) -> None:
    """N = S * L peers from any starting layout: a column round on the planned places, then a
    row round, leaves every peer with the exact mean (when the plan's row count divides N)."""
    s, length = side
    n, m = s * length, max(s, length)
    assume(n > m)
    # A random starting layout of n peers: groups of random sizes dealt to random rows.
    rng = random.Random(seed)
    rows: dict[int, list[int]] = defaultdict(list)
    left = n
    for cut in cuts:
        if left == 0:
            break
        size = min(cut, left)
        rows[rng.randrange(2 * s)].append(size)
        left -= size
    if left:
        rows[0].append(left)
    layout = layout_of(dict(rows))
    plan = Plan.of(layout, m)
    assume(n % plan.rows == 0)
    peers = [(r, q) for r in layout.rows for q in range(layout.size(r))]
    x = np.random.default_rng(seed).normal(size=n)
    mean = x.mean()
    for kind in ("column", "row"):
        keys: dict[int, list[int]] = defaultdict(list)
        for i, (r, q) in enumerate(peers):
            key = plan.column(r, q, rng) if kind == "column" else plan.place(r, q)[0]
            keys[key].append(i)
        for members in keys.values():
            rng.shuffle(members)
            start = 0
            for size in group_sizes(len(members), m):
                group = members[start : start + size]
                start += size
                x[group] = x[group].mean()
    np.testing.assert_allclose(x, mean, rtol=0, atol=1e-12)


# -- the directory ------------------------------------------------------------------------------


def test_records_round_trip() -> None:
    record = RowRecord(3, 12, gid(9), 31, 30)
    assert decode_record(encode_record(record)) == record
    assert decode_record(memoryview(encode_record(record))) == record


@pytest.mark.parametrize(
    "fields",
    [
        [-1, 0, gid(1), 3, 3],  # negative row
        [1 << 20, 0, gid(1), 3, 3],  # row out of range
        [0, -1, gid(1), 3, 3],  # negative round
        [0, 0, gid(1), 0, 0],  # empty group
        [0, 0, gid(1), (1 << 16) + 1, 0],  # too big a group
        [0, 0, gid(1), 3, 4],  # more reachable than members
        [0, 0, gid(1), 3, -1],
        [0, 0, b"short", 3, 3],  # group id not 16 bytes
        [0, 0, "text", 3, 3],  # wrong types
        [True, 0, gid(1), 3, 3],
        [0, 0, gid(1), 3.0, 3],
        [0, 0, gid(1), 3],  # a field missing
        [0, 0, gid(1), 3, 3, 0],  # a field too many
        {"row": 0},
        None,
    ],
)
def test_malformed_records_are_dropped(fields: object) -> None:
    assert decode_record(msgspec.msgpack.encode(fields)) is None


@given(raw=st.binary(max_size=64))
def test_decoding_any_bytes_never_raises(raw: bytes) -> None:
    record = decode_record(raw)
    assert record is None or isinstance(record, RowRecord)


def test_layout_keeps_each_rows_latest_round_and_drops_stale_rows() -> None:
    newest = 20
    records = [
        RowRecord(0, newest, gid(1), 10, 10),
        RowRecord(0, newest - 2, gid(2), 32, 32),  # row 0's older round: superseded
        RowRecord(1, newest - STALE_ROUNDS, gid(4), 7, 0),  # old, but not stale
        RowRecord(1, newest - STALE_ROUNDS, gid(3), 5, 2),
        RowRecord(2, newest - STALE_ROUNDS - 1, gid(5), 9, 9),  # stale: its row is gone
    ]
    layout = Layout.from_records(records)
    assert layout.round == newest
    assert dict(layout.rows) == {0: [(gid(1), 10, 10)], 1: [(gid(3), 5, 2), (gid(4), 7, 0)]}
    assert (layout.size(1), layout.reachable(1), layout.total) == (12, 2, 22)
    assert layout.size(2) == 0
    # Positions: group offset (groups by id) plus the index inside the group.
    assert layout.position(1, gid(3), 4) == 4
    assert layout.position(1, gid(4), 0) == 5
    assert layout.position(1, gid(4), 7) is None  # past the group's size
    assert layout.position(0, gid(2), 0) is None  # superseded: not shown
    assert layout.position(2, gid(5), 0) is None  # stale


def test_empty_directory() -> None:
    layout = Layout.from_records([])
    plan = Plan.of(layout)
    assert (layout.round, layout.total, plan.rows, plan.targets) == (-1, 0, 1, (0,))
    assert plan.row_for_joiner(random.Random(0)) == 0


# -- joiners ------------------------------------------------------------------------------------


def test_overflow_rows_go_in_turn_then_double_in_range() -> None:
    rng = random.Random(3)
    assert overflow_row(-2, rng) == 0
    assert [overflow_row(attempt, rng) for attempt in range(8)] == list(range(8))
    for attempt in range(8, 14):
        seen = {overflow_row(attempt, rng) for _ in range(400)}
        low = 1 << (attempt - 5)
        assert seen <= set(range(low, 2 * low))
        assert len(seen) >= min(low, 50)


def test_joiners_go_where_there_is_room_weighted_by_how_much() -> None:
    # 32 rows of 32 (as long as a group may be), three of them one short after a failure: a
    # joiner goes to one of those three (one more would make a full row 33 peers, two half
    # groups), each as likely.
    sizes = {r: [32] for r in range(32)}
    sizes[3], sizes[17], sizes[30] = [31], [31], [31]
    plan = Plan.of(layout_of(sizes), 32)
    rng = random.Random(5)
    picks = Counter(plan.row_for_joiner(rng) for _ in range(3000))
    assert set(picks) == {3, 17, 30}
    assert min(picks.values()) > 850
    # Rows of 19 and 18 with groups of at most 20: room for one and for two.
    plan = Plan.of(layout_of({0: [19], 1: [18]}), 20)
    assert plan.targets == (19, 18)
    picks = Counter(plan.row_for_joiner(rng) for _ in range(4000))
    assert set(picks) == {0, 1}
    assert 1.6 < picks[1] / picks[0] < 2.4  # two places of room against one
    # The plan's missing places are no guide: its own moves fill them (row 1's excess peer
    # fills row 0's missing place), and the joiner goes where the room is.
    plan = Plan.of(layout_of({0: [29], 1: [31, 1], 2: [31]}), 32)
    assert plan.targets == (30, 31, 31)  # row 0 misses a place, row 1 has one too many
    assert {plan.row_for_joiner(rng) for _ in range(300)} == {0, 1, 2}


def test_with_every_row_as_long_as_a_group_joiners_spread_over_all() -> None:
    plan = Plan.of(layout_of({0: [32], 1: [32], 2: [32]}), 32)
    rng = random.Random(1)
    assert {plan.row_for_joiner(rng) for _ in range(100)} == {0, 1, 2}


def test_with_every_row_at_its_target_joiners_spread_over_all() -> None:
    plan = Plan.of(layout_of({0: [20], 1: [20], 2: [20]}), 32)
    rng = random.Random(1)
    assert {plan.row_for_joiner(rng) for _ in range(100)} == {0, 1, 2}


def test_client_mode_joiners_prefer_rows_with_a_reachable_member() -> None:
    records = [
        RowRecord(0, 4, gid(0), 15, 0),
        RowRecord(1, 4, gid(1), 15, 3),
        RowRecord(2, 4, gid(2), 13, 0),  # misses a place, but nobody there can lead
    ]
    plan = Plan.of(Layout.from_records(records), 32)
    rng = random.Random(2)
    assert {plan.row_for_joiner(rng, reachable=False) for _ in range(200)} == {1}
    assert 2 in {plan.row_for_joiner(rng) for _ in range(200)}
    # Nobody reachable anywhere: any row will do, those with room first.
    plan = Plan.of(layout_of({0: [20], 1: [19]}, reachable=False), 20)
    assert {plan.row_for_joiner(rng, reachable=False) for _ in range(200)} == {1}


def test_a_peer_whose_row_is_gone_and_place_unknown_is_seated_as_a_joiner() -> None:
    # A cold start's rows (past COLD_ROW_BASE) were placed afresh by the plan of round 2, and
    # then the planned rows' entries replaced them. A peer that was away in round 2 still has
    # its cold row, and the directory no longer shows its group.
    cold = COLD_ROW_BASE + 3
    plan = Plan.of(layout_of({r: [31] for r in range(32)}), 32)
    assert plan.seat(cold, None) is None  # a joiner: row_for_joiner, or a random column
    assert plan.seat(None, None) is None
    assert plan.seat(5, None) == 5  # back in a row the plan still has: its own row's hole
    assert plan.seat(5, 7) == 5
    # Not all of them to the least full row: ten such peers spread over the rows with room.
    rng = random.Random(4)
    rows = Counter(plan.row_for_joiner(rng) for _ in range(10))
    assert max(rows.values()) <= 3
    assert Counter(plan.place(cold, None)[0] for _ in range(10)) == {0: 10}  # what place says


def test_default_group_sizes() -> None:
    assert (DEFAULT_TARGET_GROUP_SIZE, DEFAULT_MAX_GROUP_SIZE) == group_size_limits() == (32, 40)
    assert plan_rows(DEFAULT_TARGET_GROUP_SIZE) == 1
    assert plan_rows(DEFAULT_TARGET_GROUP_SIZE + 1) > 1


@pytest.mark.parametrize(
    ("target", "most", "limits"),
    [
        (None, None, (32, 40)),
        (16, None, (16, 20)),  # the maximum follows the target: a quarter more
        (2, None, (2, 3)),  # at least one more
        (3, None, (3, 4)),
        (250, None, (250, 256)),  # never past what a DHT key holds
        (256, None, (256, 256)),
        (None, 16, (16, 16)),  # only the maximum, below the default target: no room
        (None, 64, (32, 64)),
        (None, 2, (2, 2)),
        (8, 8, (8, 8)),  # both: as given
        (8, 100, (8, 100)),
    ],
)
def test_group_size_limits(target: int | None, most: int | None, limits: tuple[int, int]) -> None:
    assert group_size_limits(target, most) == limits


@pytest.mark.parametrize(
    ("target", "most", "message"),
    [
        (33, 32, "target_group_size <= max_group_size <= 256"),
        (None, 257, "<= 256"),
        (257, None, "<= 256"),
        (1, None, "target_group_size must be at least 2"),
        (None, 1, "max_group_size must be at least 2"),
        (8.0, None, "target_group_size must be an integer"),
        (None, "40", "max_group_size must be an integer"),
        (True, None, "target_group_size must be an integer"),
    ],
)
def test_bad_group_size_limits(target: object, most: object, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        group_size_limits(target, most)  # type: ignore[arg-type]


@settings(max_examples=200)
@given(target=st.none() | st.integers(2, 256), most=st.none() | st.integers(2, 256))
def test_group_size_limits_keep_what_is_given(target: int | None, most: int | None) -> None:
    if target is not None and most is not None and most < target:
        with pytest.raises(ConfigError):
            group_size_limits(target, most)
        return
    t, m = group_size_limits(target, most)
    assert 2 <= t <= m <= 256
    assert target is None or t == target
    assert most is None or m == most


def test_a_peer_back_from_a_round_away_fits_a_full_row_without_splitting_it() -> None:
    # 32 rows of 32 (the target): a returning peer (place unknown) makes its row 33, which
    # the maximum (40) still takes as one group; a row as long as the maximum would not.
    layout = layout_of({r: [32] for r in range(32)})
    plan = Plan.of(layout)
    assert plan.rows == 32 and plan.targets == (32,) * 32
    assert plan.row(5, None) == 5
    assert group_sizes(32 + 1, DEFAULT_MAX_GROUP_SIZE) == [33]
    assert group_sizes(32 + 1, DEFAULT_TARGET_GROUP_SIZE) == [17, 16]
    # A joiner at a full swarm: no row has room below the target, so one of the least full,
    # which the room to the maximum takes.
    assert plan.row_for_joiner(random.Random(1)) in range(32)


# -- client-mode peers are never placed where nobody listens --------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 32), min_size=2, max_size=12),
    listeners=st.data(),
    m=st.integers(8, 32),
)
def test_a_client_mode_peer_always_lands_with_a_listener(
    sizes: list[int], listeners: st.DataObject, m: int
) -> None:
    records = []
    flags_of: dict[tuple[int, int], bool] = {}
    for row, size in enumerate(sizes):
        flags = listeners.draw(st.lists(st.booleans(), min_size=size, max_size=size))
        for index, flag in enumerate(flags):
            flags_of[(row, index)] = flag
        records.append(RowRecord(row, 9, gid(row), size, sum(flags), listening_bits(flags)))
    layout = Layout.from_records(records)
    plan = Plan.of(layout, m)
    rng = random.Random(3)
    # Where everyone ends up on the next row round and on a column round (rows being one group
    # per key here, the few over m aside, which split by group_sizes).
    rows: dict[int, list[bool]] = defaultdict(list)
    columns: dict[int, list[bool]] = defaultdict(list)
    for (row, index), listens in flags_of.items():
        rows[plan.row(row, index, reachable=listens)].append(listens)
        columns[plan.column_for(row, index, rng, reachable=listens)].append(listens)
    if not any(flags_of.values()):
        return  # nobody listens: nothing to lead anyone
    for members in [*rows.values(), *columns.values()]:
        assert any(members), "a group of client-mode peers only"
    # peers that listen are placed as before: the plan's places
    for (row, index), listens in flags_of.items():
        if listens:
            assert plan.row(row, index) == plan.place(row, index)[0]


def test_a_client_mode_joiner_in_a_column_round_takes_a_column_with_a_listener() -> None:
    # rows of 4 where only the member at index 0 of each listens: column 0 alone has listeners
    flags = [True, False, False, False]
    records = [RowRecord(r, 3, gid(r), 4, 1, listening_bits(flags)) for r in range(10)]
    plan = Plan.of(Layout.from_records(records), 32)
    assert plan.rows == 10 and plan.columns == 4
    rng = random.Random(0)
    assert {plan.column_for(None, None, rng, reachable=False) for _ in range(50)} == {0}
    assert {plan.column_for(3, 2, rng, reachable=False) for _ in range(5)} == {0}
    assert plan.column_for(3, 2, rng) == 2


@pytest.mark.parametrize(
    "record",
    [
        RowRecord(0, 1, bytes(16), 3, 2, b"\x07"),  # three bits for a count of two
        RowRecord(0, 1, bytes(16), 3, 1, b"\x08"),  # a bit past the group's size
        RowRecord(0, 1, bytes(16), 9, 1, b"\x01"),  # one byte for nine members
    ],
)
def test_a_listening_bitmap_that_disagrees_is_refused(record: RowRecord) -> None:
    assert decode_record(encode_record(record)) is None


# -- a cold start: the swarm's size from the routing table, cold rows ----------------------------


def test_a_small_table_knows_everyone_and_a_full_one_estimates_the_swarm() -> None:
    own = bytes(32)
    assert estimate_size(own, [], 20) == 1
    assert estimate_size(own, [bytes([i]) * 32 for i in range(1, 8)], 20) == 8
    # the k nearest of N uniform ids: within a factor of two of N, and about N on average
    rng = random.Random(5)
    for n in (64, 256, 1024, 4096):
        estimates = []
        for _ in range(30):
            ids = [rng.randbytes(32) for _ in range(n)]
            me = int.from_bytes(ids[0], "big")
            nearest = sorted(ids[1:], key=lambda i: int.from_bytes(i, "big") ^ me)[:20]
            estimates.append(estimate_size(ids[0], nearest, 20))
        assert all(n / 2 <= e <= 2 * n for e in estimates), (n, sorted(estimates))
        assert 0.8 * n <= float(np.median(estimates)) <= 1.25 * n, (n, sorted(estimates))


@given(estimate=st.integers(min_value=1, max_value=100_000), seed=st.integers(0, 2**32))
def test_cold_rows_hold_about_four_groups_and_lie_past_every_planned_row(
    estimate: int, seed: int
) -> None:
    row = cold_row(estimate, random.Random(seed))
    count = cold_rows(estimate)
    assert COLD_ROW_BASE <= row < COLD_ROW_BASE + count
    assert count == max(1, math.ceil(estimate / (COLD_GROUPS_PER_ROW * DEFAULT_TARGET_GROUP_SIZE)))
    # at most four groups' worth a key (half the 256 a DHT key holds, at the default target),
    # and more than two where there is more than one key
    per_key = estimate / count
    assert per_key <= COLD_GROUPS_PER_ROW * DEFAULT_TARGET_GROUP_SIZE
    if count > 1:
        assert per_key > 2 * DEFAULT_TARGET_GROUP_SIZE
    assert plan_rows(estimate) <= COLD_ROW_BASE


def test_the_first_plan_after_a_cold_start_places_everyone_afresh() -> None:
    # 40 peers in two cold rows (uneven), then a planned row round wrote only rows 0 and 1:
    # the cold entries are gone from the layout then (their peers moved), not counted twice.
    cold = [
        RowRecord(COLD_ROW_BASE, 10, gid(1), 25, 25),
        RowRecord(COLD_ROW_BASE + 1, 10, gid(2), 15, 15),
    ]
    layout = Layout.from_records(cold)
    plan = Plan.of(layout)
    assert layout.total == 40 and plan.rows == plan_rows(40) == 5
    assert plan.targets == (8,) * 5
    # every cold place is one to move, to a distinct planned place
    places = {plan.place(r.row, p) for r in cold for p in range(r.size)}
    assert places == {(row, p) for row in range(5) for p in range(8)}
    after = [*cold, RowRecord(0, 12, gid(3), 8, 8), RowRecord(1, 12, gid(4), 8, 8)]
    assert Layout.from_records(after).total == 16
