"""averaging.grid: keys, rotation, within-group indices, and the exactness of a perfect grid."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging.grid import (
    Grid,
    GroupKey,
    IndexRule,
    axis_of_round,
    balanced_initial_keys,
    check_key,
    group_indices,
    group_key_name,
    initial_key,
    key_axes,
    key_from_coordinates,
    next_key,
    within_group_index,
)
from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import PeerID

RULES: tuple[IndexRule, ...] = ("random", "rank")


def random_ids(n: int, seed: int) -> list[PeerID]:
    rng = np.random.default_rng(seed)
    return [PeerID(rng.bytes(32)) for _ in range(n)]


def group_id_of(members: list[PeerID], round: int) -> bytes:
    """How these tests (and the benchmark) name a group: sha256 of the sorted ids + round."""
    return hashlib.sha256(
        b"".join(m.to_bytes() for m in members) + round.to_bytes(8, "big")
    ).digest()


def simulate(
    grid: Grid,
    ids: list[PeerID],
    keys: list[GroupKey],
    values: np.ndarray,
    rounds: int,
    rule: IndexRule,
) -> tuple[np.ndarray, list[list[GroupKey]]]:
    """Moshpit rounds with no failures: peers with the same key form a group, ordered by PeerID.

    Returns the values and the keys before each round (and after the last).
    """
    x = values.astype(np.float64).copy()
    history = [list(keys)]
    for t in range(rounds):
        groups: dict[GroupKey, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            groups[key].append(i)
        new_keys = list(keys)
        for key, members in groups.items():
            members.sort(key=lambda i: ids[i])
            order = [ids[i] for i in members]
            gid = group_id_of(order, t)
            x[members] = x[members].mean()
            for i in members:
                index = within_group_index(gid, order, ids[i], grid, t, rule=rule)
                new_keys[i] = next_key(grid, key, index, t)
        keys = new_keys
        history.append(list(keys))
    return x, history


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4), (8, 8), (3, 3, 3), (2, 3, 4), (4, 1, 3), (6,)])
@pytest.mark.parametrize("rule", RULES)
def test_perfect_grid_is_exact_after_d_rounds(shape: tuple[int, ...], rule: IndexRule) -> None:
    # Both rules give the members of a full line distinct indices, so the peers fill one cell
    # each again after every round, which is all exactness needs (see the module docstring).
    grid = Grid(shape)
    n = grid.size
    ids = random_ids(n, seed=n)
    values = np.random.default_rng(n).normal(size=n)
    keys = balanced_initial_keys(grid, n)
    x, history = simulate(grid, ids, keys, values, grid.d, rule)
    np.testing.assert_allclose(x, values.mean(), rtol=0, atol=1e-12)
    # Every round's groups are full lines: M peers under each key of the round's key space.
    for t, keys_t in enumerate(history[:-1]):
        counts = Counter(keys_t)
        assert set(counts.values()) == {grid.shape[axis_of_round(grid, t)]}
        assert len(counts) == n // grid.shape[axis_of_round(grid, t)]


@pytest.mark.parametrize("shape", [(4, 4), (3, 3, 3), (2, 3, 4)])
def test_one_round_short_is_not_exact(shape: tuple[int, ...]) -> None:
    # d rounds are needed, not just sufficient: the test above is not vacuous.
    grid = Grid(shape)
    values = np.random.default_rng(0).normal(size=grid.size)
    x, _ = simulate(
        grid,
        random_ids(grid.size, 0),
        balanced_initial_keys(grid, grid.size),
        values,
        grid.d - 1,
        "random",
    )
    assert np.ptp(x) > 1e-3


@pytest.mark.parametrize("rule", RULES)
def test_partners_get_different_keys_next_round(rule: IndexRule) -> None:
    grid = Grid((4, 4, 4))
    n = 40  # not a full grid, so groups are short or crowded: partners must still split up
    ids = random_ids(n, 7)
    keys = [initial_key(grid, pid) for pid in ids]
    _, history = simulate(grid, ids, keys, np.zeros(n), 6, rule)
    checked = Counter[int]()
    for before, after in itertools.pairwise(history):
        groups: dict[GroupKey, list[int]] = defaultdict(list)
        for i, key in enumerate(before):
            groups[key].append(i)
        for members in groups.values():
            # A group of more than M would have been split by the matchmaker; this simulation
            # does not split, so only groups of at most M are promised distinct next keys.
            if len(members) <= 4:
                assert len({after[i] for i in members}) == len(members)
                checked[len(members)] += 1
    assert checked[2] > 0 and checked[3] > 0 and checked[4] > 0


# -- keys and rotation ---------------------------------------------------------------------------


def test_rotation_follows_the_docstring_example() -> None:
    grid = Grid((2, 3, 4))
    cell = [1, 2, 3]
    key = key_from_coordinates(grid, cell, 0)
    assert key == (2, 3) and key_axes(grid, 0) == (1, 2)
    seen = []
    for t, c in enumerate([0, 1, 2]):
        axis = axis_of_round(grid, t)
        cell[axis] = c
        key = next_key(grid, key, c, t)
        assert key == key_from_coordinates(grid, cell, t + 1)
        seen.append(key)
    assert seen == [(3, 0), (0, 1), (1, 2)]
    assert (
        key_axes(grid, 1) == (2, 0) and key_axes(grid, 2) == (0, 1) and key_axes(grid, 3) == (1, 2)
    )


def test_one_axis_grid_has_the_empty_key() -> None:
    grid = Grid((5,))
    assert initial_key(grid, bytes(32)) == ()
    assert next_key(grid, (), 3, 0) == ()
    assert key_axes(grid, 4) == ()
    assert group_key_name("r", (), 2) == "mp.avg/r/2/"


shapes = st.lists(st.integers(1, 6), min_size=1, max_size=4).map(lambda s: Grid(tuple(s)))


@st.composite
def cells_and_rounds(draw: st.DrawFn) -> tuple[Grid, list[int], int, int]:
    grid = draw(shapes)
    cell = [draw(st.integers(0, m - 1)) for m in grid.shape]
    t = draw(st.integers(0, 50))
    c = draw(st.integers(0, grid.shape[axis_of_round(grid, t)] - 1))
    return grid, cell, t, c


@settings(max_examples=300)
@given(cells_and_rounds())
def test_next_key_moves_the_cell_along_the_rounds_axis(
    case: tuple[Grid, list[int], int, int],
) -> None:
    grid, cell, t, c = case
    key = key_from_coordinates(grid, cell, t)
    assert check_key(grid, key, t) == key
    new = next_key(grid, key, c, t)
    assert len(new) == grid.d - 1
    assert check_key(grid, new, t + 1) == new  # in range for the next round's axes
    cell[axis_of_round(grid, t)] = c
    assert new == key_from_coordinates(grid, cell, t + 1)
    if grid.d > 1:
        assert new[-1] == c and new[:-1] == key[1:]


@settings(max_examples=200)
@given(shapes, st.integers(0, 30), st.binary(min_size=32, max_size=32))
def test_initial_key_is_valid_and_deterministic(grid: Grid, t: int, raw: bytes) -> None:
    key = initial_key(grid, PeerID(raw), round=t)
    assert check_key(grid, key, t) == key
    assert initial_key(grid, raw, round=t) == key


def test_initial_key_is_uniform() -> None:
    grid = Grid((16, 16))
    counts = Counter(initial_key(grid, pid) for pid in random_ids(3200, 3))
    assert len(counts) == 16
    # 200 expected per key, standard deviation about 13.7: 4.5 sigma either side.
    assert all(140 <= c <= 260 for c in counts.values()), counts


@settings(max_examples=200)
@given(shapes, st.integers(0, 300), st.integers(0, 10))
def test_balanced_keys_are_balanced(grid: Grid, n: int, t: int) -> None:
    keys = balanced_initial_keys(grid, n, round=t)
    assert len(keys) == n
    for key in keys:
        check_key(grid, key, t)
    space = grid.size // grid.shape[axis_of_round(grid, t)]
    counts = [Counter(keys).get(k, 0) for k in set(keys)] + [0] * (space - len(set(keys)))
    assert max(counts) - min(counts) <= 1


# -- within-group index ------------------------------------------------------------------------


@settings(max_examples=300)
@given(shapes, st.integers(0, 20), st.binary(max_size=40), st.data())
def test_indices_in_range_and_distinct_in_a_group_of_at_most_m(
    grid: Grid, t: int, gid: bytes, data: st.DataObject
) -> None:
    m = grid.shape[axis_of_round(grid, t)]
    size = data.draw(st.integers(1, 3 * m))
    for rule in RULES:
        indices = group_indices(gid, size, grid, t, rule=rule)
        assert len(indices) == size
        assert all(0 <= c < m for c in indices)
        if size <= m:
            assert len(set(indices)) == size
        # Beyond M the indices wrap around: each is used floor or ceil of size/M times.
        used = Counter(indices)
        assert max(used.values()) - min(used.get(c, 0) for c in range(m)) <= 1


@settings(max_examples=100)
@given(st.integers(1, 12), st.integers(0, 12), st.data())
def test_within_group_index_matches_group_indices(m: int, seed: int, data: st.DataObject) -> None:
    grid = Grid((m, m))
    members = random_ids(data.draw(st.integers(1, m)), seed)
    gid = group_id_of(sorted(members), 0)
    for rule in RULES:
        all_indices = group_indices(gid, len(members), grid, 0, rule=rule)
        mine = [within_group_index(gid, members, me, grid, 0, rule=rule) for me in members]
        assert mine == all_indices


def test_rank_rule_is_the_position() -> None:
    grid = Grid((3, 3))
    members = random_ids(5, 1)
    assert [within_group_index(b"g", members, p, grid, 0, rule="rank") for p in members] == [
        0,
        1,
        2,
        0,
        1,
    ]


def test_random_rule_is_pinned_and_seeded_by_the_group_id() -> None:
    # Every member computes its own index, so every implementation and process must draw the
    # same permutation (no Python hash(), no global random): these vectors pin the generator
    # described in group_indices().
    assert group_indices(bytes(32), 8, Grid((8, 8)), 0) == [7, 5, 2, 6, 0, 4, 1, 3]
    assert group_indices(b"moshpit", 5, Grid((5,)), 0) == [1, 2, 4, 3, 0]
    perms = {tuple(group_indices(bytes([i]), 8, Grid((8, 8)), 0)) for i in range(50)}
    assert len(perms) > 40  # different groups, different permutations


def test_within_group_index_errors() -> None:
    grid = Grid((4, 4))
    a, b, c = random_ids(3, 2)
    with pytest.raises(ValueError, match="not a member"):
        within_group_index(b"g", [a, b], c, grid, 0)
    with pytest.raises(ValueError, match="twice"):
        within_group_index(b"g", [a, b, a], a, grid, 0)
    with pytest.raises(ConfigError, match="index rule"):
        within_group_index(b"g", [a, b], a, grid, 0, rule="fastest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        within_group_index("g", [a, b], a, grid, 0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="counted from 0"):
        within_group_index(b"g", [a, b], a, grid, -1)


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shape"),
    [
        ("4x4", (4, 4)),
        (" 2 x 3 X4 ", (2, 3, 4)),
        ("32", (32,)),
        ((4, 4), (4, 4)),
        ([8, 8, 8], (8, 8, 8)),
    ],
)
def test_grid_parse(value: object, shape: tuple[int, ...]) -> None:
    grid = Grid.parse(value)  # type: ignore[arg-type]
    assert grid.shape == shape and grid.d == len(shape)
    assert grid.size == int(np.prod(shape))
    assert Grid.parse(str(grid)) == grid and Grid.parse(grid) is grid


@pytest.mark.parametrize(
    "value",
    [
        "",
        "4x",
        "x4",
        "4x0",
        "-1x4",
        "4.5x4",
        "abc",
        "４x4",
        (),
        [],
        (0,),
        (4, -1),
        (True, 2),
        (4.0, 4),
        4,
        None,
        b"4x4",
    ],
)
def test_grid_parse_rejects(value: object) -> None:
    with pytest.raises(ConfigError):
        Grid.parse(value)  # type: ignore[arg-type]


def test_grid_normalises_its_shape() -> None:
    assert Grid([4, 4]) == Grid((np.int64(4), 4)) == Grid((4, 4))  # type: ignore[arg-type]
    assert hash(Grid([4, 4])) == hash(Grid((4, 4)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Grid("44")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "round"),
    [
        ((1,), 0),  # too short
        ((1, 2, 3), 0),  # too long
        ((3, 0), 0),  # round 0 covers axes (1, 2): 3 is outside axis 1 of size 3
        ((3, 2), 1),  # round 1 covers axes (2, 0): 2 is outside axis 0 of size 2
        ((-1, 0), 0),
        ((True, 0), 0),
        ((1.0, 0), 0),
        ("12", 0),
        (b"\x01\x02", 0),
        (None, 0),
        ((1, 1), -1),
        ((1, 1), 1.0),
    ],
)
def test_check_key_rejects(key: object, round: object) -> None:
    with pytest.raises(ConfigError):
        check_key(Grid((2, 3, 4)), key, round)  # type: ignore[arg-type]


def test_check_key_ranges_follow_the_round() -> None:
    grid = Grid((2, 3, 4))
    assert check_key(grid, [2, 3], 0) == (2, 3)
    assert check_key(grid, (np.int64(3), 1), 1) == (3, 1)  # type: ignore[arg-type]
    assert check_key(grid, (1, 2), 2) == (1, 2)


def test_next_key_rejects_an_index_outside_the_axis() -> None:
    grid = Grid((2, 3, 4))
    with pytest.raises(ConfigError, match="outside"):
        next_key(grid, (0, 0), 2, 0)  # axis 0 has size 2
    assert next_key(grid, (0, 0), 2, 1) == (0, 2)  # axis 1 has size 3
    with pytest.raises(ConfigError):
        next_key(grid, (0, 5), 0, 0)


def test_group_key_name() -> None:
    assert group_key_name("exp1", (3, 14), 7) == "mp.avg/exp1/7/3.14"
    assert group_key_name("x" * 64, (0,), 0) == "mp.avg/" + "x" * 64 + "/0/0"
    assert group_key_name("ünï", (0,), 0).startswith("mp.avg/ünï/")


@pytest.mark.parametrize(
    ("run_id", "key", "round"),
    [
        ("", (0,), 0),
        ("a/b", (0,), 0),
        ("x" * 65, (0,), 0),
        ("tab\there", (0,), 0),
        (b"exp1", (0,), 0),
        ("exp1", (0,), -1),
        ("exp1", (-1,), 0),
        ("exp1", "01", 0),
        ("exp1", (0,), True),
        ("𝕏" * 64, (0,), 0),  # 64 characters but 256 bytes: the DHT key would be too long
    ],
)
def test_group_key_name_rejects(run_id: object, key: object, round: object) -> None:
    with pytest.raises(ConfigError):
        group_key_name(run_id, key, round)  # type: ignore[arg-type]


def test_axis_of_round() -> None:
    grid = Grid((4, 4, 4))
    assert [axis_of_round(grid, t) for t in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert axis_of_round(Grid((9,)), 5) == 0
    with pytest.raises(ConfigError):
        axis_of_round(grid, -1)


def test_initial_key_and_balanced_keys_reject() -> None:
    with pytest.raises(ConfigError):
        initial_key(Grid((4, 4)), b"")
    with pytest.raises(ConfigError):
        initial_key(Grid((4, 4)), "mpabc")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        balanced_initial_keys(Grid((4, 4)), -1)
