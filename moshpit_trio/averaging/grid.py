"""The virtual grid of Moshpit All-Reduce: group keys and their rotation (sans-IO).

shared/MOSHPIT.md §1, Algorithm 1. Peers sit in a virtual grid of shape ``(M_0, ..., M_{d-1})``
(the paper's case is ``(M,) * d``). We count axes and rounds from 0 (the paper counts from 1).

Keys and axes
-------------
Nobody stores a whole cell. A peer knows its *group key* for the next round: its coordinates on
every axis but the one that round averages along. In round ``t`` groups average along axis
``a(t) = t mod d``, and the key lists the other coordinates in a fixed rotating order, starting
just after ``a(t)``::

    key_t = (x[(t+1) mod d], x[(t+2) mod d], ..., x[(t+d-1) mod d])       # d-1 integers

Peers with the same key for the same round form one group, which is one line of the grid along
``a(t)``. In it every peer gets an index ``c`` in ``[0, M_{a(t)})`` (:func:`within_group_index`),
which becomes its coordinate on ``a(t)``. The next key is Algorithm 1's
``C^t = (C^{t-1}[1:], c)`` (:func:`next_key`): dropping ``key_t[0]`` drops the coordinate on
axis ``(t+1) mod d = a(t+1)``, the axis the next round averages along, and appending ``c`` adds
the coordinate on ``a(t) = (t+1+d-1) mod d``. That is exactly the layout above for ``t+1``, so the
rotation needs no other bookkeeping, and a key's length never changes.

Example, shape ``(2, 3, 4)``, a peer at cell ``(1, 2, 3)``; ``c`` is the index it gets::

    round 0: averages along axis 0, key (2, 3) = (x1, x2), a group of 2, c = 0 -> cell (0, 2, 3)
    round 1: averages along axis 1, key (3, 0) = (x2, x0), a group of 3, c = 1 -> cell (0, 1, 3)
    round 2: averages along axis 2, key (0, 1) = (x0, x1), a group of 4, c = 2 -> cell (0, 1, 2)
    round 3: averages along axis 0, key (1, 2) = (x1, x2), ...

Key ranges depend on the round when the shape is not uniform: in round 1 above the key's first
coordinate is in ``[0, 4)`` and its second in ``[0, 2)`` (:func:`key_axes` says which axes).

Exactness. With ``N = prod(shape)`` peers, one per cell, no failures, and every group exactly
one line: after round 0 each peer holds the mean of its line along axis 0, a value that depends
only on the other coordinates; the indices in a line are distinct, so the peers again fill one
cell each, whatever the index rule. Round 1 then averages those line means along axis 1, and so
on: after ``d`` rounds every value is the mean over all axes, the exact global mean. Two peers
that averaged together get distinct indices, hence different keys next round.

Group formation (who is in a group, in which agreed order, under which group id) is the
matchmaker's business; this module only says which key a peer announces and how the agreed
group turns into the next key. Keeping the two apart leaves room for balancing the first rounds
(DESIGN.md, "Adaptive grid").

The seeded index rule must be computed identically by every member of a group, in any
implementation, so it is specified exactly in :func:`group_indices`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import operator
import re
from collections.abc import Sequence
from typing import Literal, TypeAlias

from ..dht.records import MAX_KEY_SIZE
from ..errors import ConfigError
from ..identity import PeerID

__all__ = [
    "GROUP_KEY_NAMESPACE",
    "MAX_RUN_ID_LENGTH",
    "Grid",
    "GroupKey",
    "IndexRule",
    "axis_of_round",
    "balanced_initial_keys",
    "check_key",
    "group_indices",
    "group_key_name",
    "initial_key",
    "key_axes",
    "key_from_coordinates",
    "next_key",
    "within_group_index",
]

GroupKey: TypeAlias = tuple[int, ...]
IndexRule: TypeAlias = Literal["random", "rank"]

GROUP_KEY_NAMESPACE = "mp.avg"
MAX_RUN_ID_LENGTH = 64
# Domain tags keep these hashes apart from every other sha256 the protocol computes over the
# same bytes (a PeerID is itself a sha256, and a group id may be one).
_INITIAL_KEY_DOMAIN = b"moshpit/1 grid initial key\x00"
_INDEX_DOMAIN = b"moshpit/1 grid index\x00"
_UINT64 = 1 << 64
_SHAPE_SEPARATOR = re.compile(r"\s*[xX×,]\s*")


def _as_int(value: object, what: str) -> int:
    """An exact integer (numpy integers welcome); bool and float are refused as typos."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {type(value).__name__}") from None


def _check_round(round: object) -> int:
    r = _as_int(round, "a round")
    if r < 0:
        raise ConfigError(f"rounds are counted from 0, got {r}")
    return r


@dataclasses.dataclass(frozen=True, slots=True)
class Grid:
    """The shape ``(M_0, ..., M_{d-1})`` of the virtual grid; ``d >= 1``, every ``M >= 1``.

    >>> Grid.parse("4x4")
    Grid(shape=(4, 4))
    >>> Grid.parse((2, 3, 4)).size
    24
    """

    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        raw: object = self.shape
        if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
            raise ConfigError(
                f"a grid shape is a sequence of axis sizes such as (4, 4), got {raw!r}"
            )
        shape = tuple(_as_int(m, "a grid axis size") for m in raw)
        if not shape:
            raise ConfigError("a grid needs at least one axis")
        if any(m < 1 for m in shape):
            raise ConfigError(f"every grid axis size must be at least 1, got {shape}")
        # Normalise a list or numpy ints into a tuple of ints, so equal grids compare and hash
        # equal (frozen: the only way in is object.__setattr__).
        object.__setattr__(self, "shape", shape)

    @property
    def d(self) -> int:
        """The number of axes."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of cells, ``prod(shape)``: the swarm size for which rounds are exact."""
        return math.prod(self.shape)

    @classmethod
    def parse(cls, value: Grid | tuple[int, ...] | list[int] | str) -> Grid:
        """A grid from ``"4x4"`` / ``"2x3x4"`` / ``"32"`` or a sequence of axis sizes."""
        if isinstance(value, Grid):
            return value
        if isinstance(value, str):
            text = value.strip()
            parts = _SHAPE_SEPARATOR.split(text) if text else []
            if not parts or not all(p.isdecimal() and p.isascii() for p in parts):
                raise ConfigError(
                    f"cannot read grid {value!r}: expected axis sizes joined by 'x', like '4x4'"
                )
            return cls(tuple(int(p) for p in parts))
        if isinstance(value, tuple | list):
            return cls(tuple(value))
        raise ConfigError(
            f"a grid is a string like '4x4' or a sequence like (4, 4), got {type(value).__name__}"
        )

    def __str__(self) -> str:
        return "x".join(map(str, self.shape))


def axis_of_round(grid: Grid, round: int) -> int:
    """The axis groups average along in round ``round`` (counted from 0): ``round mod d``."""
    return _check_round(round) % grid.d


def key_axes(grid: Grid, round: int) -> tuple[int, ...]:
    """The axes a round's key covers, in key order: ``(t+1, ..., t+d-1) mod d``."""
    t = _check_round(round)
    return tuple((t + 1 + j) % grid.d for j in range(grid.d - 1))


def key_from_coordinates(grid: Grid, cell: Sequence[int], round: int) -> GroupKey:
    """The key for round ``round`` of the peer at ``cell`` (a full d-coordinate cell)."""
    if len(cell) != grid.d:
        raise ConfigError(f"a cell of grid {grid} has {grid.d} coordinates, got {len(cell)}")
    coords = tuple(_as_int(x, "a grid coordinate") for x in cell)
    for axis, x in enumerate(coords):
        if not 0 <= x < grid.shape[axis]:
            raise ConfigError(f"coordinate {x} is outside axis {axis} of grid {grid}")
    return tuple(coords[axis] for axis in key_axes(grid, round))


def _key_from_number(grid: Grid, number: int, round: int) -> GroupKey:
    """Mixed-radix digits of ``number`` over the round's key axes, first axis least significant."""
    key = []
    for axis in key_axes(grid, round):
        number, digit = divmod(number, grid.shape[axis])
        key.append(digit)
    return tuple(key)


def _key_space(grid: Grid, round: int) -> int:
    # The product of all axes but the averaging one; with d = 1 there is one (empty) key.
    return grid.size // grid.shape[axis_of_round(grid, round)]


def initial_key(grid: Grid, peer_id: PeerID | bytes, *, round: int = 0) -> GroupKey:
    """The key a peer starts from (at ``round``, 0 unless it joins later), derived from its id.

    ``sha256("moshpit/1 grid initial key\\0" + id)`` read as a big-endian integer, reduced
    modulo the number of keys and written in mixed radix over the round's key axes. Uniform over
    the key space up to a bias below ``keys / 2**256``; deterministic, so a restarted peer
    starts where it started before.
    """
    raw = peer_id.to_bytes() if isinstance(peer_id, PeerID) else peer_id
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) == 0:
        raise ConfigError(f"an initial key is derived from a PeerID, got {peer_id!r}")
    digest = hashlib.sha256(_INITIAL_KEY_DOMAIN + bytes(raw)).digest()
    number = int.from_bytes(digest, "big") % _key_space(grid, round)
    return _key_from_number(grid, number, round)


def check_key(grid: Grid, key: Sequence[int], round: int) -> GroupKey:
    """``key`` as a tuple of ints when it is a valid key for ``round``; ConfigError otherwise.

    Valid: ``d-1`` integers, the j-th in ``[0, M)`` for the j-th axis of :func:`key_axes`.
    """
    if isinstance(key, str | bytes | bytearray) or not isinstance(key, Sequence):
        raise ConfigError(f"a group key is a sequence of integers, got {type(key).__name__}")
    if len(key) != grid.d - 1:
        raise ConfigError(
            f"a group key of grid {grid} has {grid.d - 1} coordinates, got {len(key)}"
        )
    checked = tuple(_as_int(x, "a group key coordinate") for x in key)
    for x, axis in zip(checked, key_axes(grid, round), strict=True):
        if not 0 <= x < grid.shape[axis]:
            raise ConfigError(
                f"group key {checked} is not a key of grid {grid} in round {round}: "
                f"coordinate {x} for axis {axis} is outside [0, {grid.shape[axis]})"
            )
    return checked


def group_key_name(run_id: str, key: GroupKey, round: int) -> str:
    """The DHT key under which peers of ``run_id`` announce ``key`` for ``round``.

    ``mp.avg/{run_id}/{round}/{k0.k1...}`` in the owned matchmaking namespace ``mp.avg``.
    The round is part of the name, so a late announcement for an old round never joins a new
    round's group.
    """
    if not isinstance(run_id, str):
        raise ConfigError(f"a run id is a str, got {type(run_id).__name__}")
    if not run_id or len(run_id) > MAX_RUN_ID_LENGTH:
        raise ConfigError(f"a run id has 1 to {MAX_RUN_ID_LENGTH} characters, got {run_id!r}")
    if "/" in run_id:
        raise ConfigError(f"a run id cannot contain '/', got {run_id!r} ('/' splits DHT keys)")
    if not run_id.isprintable():
        raise ConfigError(f"a run id cannot contain control characters, got {run_id!r}")
    t = _check_round(round)
    raw: object = key  # typed as a tuple, but a caller may hand anything
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        raise ConfigError(f"a group key is a sequence of integers, got {type(raw).__name__}")
    coords = [_as_int(x, "a group key coordinate") for x in raw]
    if any(x < 0 for x in coords):
        raise ConfigError(f"group key coordinates are non-negative, got {tuple(coords)}")
    name = f"{GROUP_KEY_NAMESPACE}/{run_id}/{t}/{'.'.join(map(str, coords))}"
    # A run id of 64 non-ASCII characters can take 256 bytes on its own.
    if len(name.encode("utf-8")) > MAX_KEY_SIZE:
        raise ConfigError(
            f"the DHT key for run {run_id!r} would exceed {MAX_KEY_SIZE} bytes; "
            "use a shorter run id"
        )
    return name


class _Draws:
    """Uniform integers from a sha256 counter-mode stream (the seeded index rule's generator).

    Block ``i`` is ``sha256(seed + i as 8 bytes big-endian)``; each block gives four 8-byte
    big-endian words, used in order.
    """

    __slots__ = ("_block", "_counter", "_seed", "_words")

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._counter = 0
        self._words: list[int] = []

    def _word(self) -> int:
        if not self._words:
            block = hashlib.sha256(self._seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
            # Reversed, so pop() hands the words out first to last.
            self._words = [int.from_bytes(block[i : i + 8], "big") for i in (24, 16, 8, 0)]
        return self._words.pop()

    def below(self, bound: int) -> int:
        """Uniform in ``[0, bound)``: rejection sampling, so no residue is favoured."""
        limit = _UINT64 - _UINT64 % bound
        while True:
            word = self._word()
            if word < limit:
                return word % bound


def group_indices(
    group_id: bytes, size: int, grid: Grid, round: int, *, rule: IndexRule = "random"
) -> list[int]:
    """The indices of all ``size`` members of a group, by position in the agreed order.

    ``rank``: position ``j`` gets ``j mod M``, ``M`` the size of the round's axis.

    ``random``: position ``j`` gets ``perm[j mod M]``, where ``perm`` is a permutation of
    ``range(M)`` drawn by Fisher-Yates (``for i = M-1 down to 1: swap perm[i], perm[below(i+1)]``)
    from :class:`_Draws` seeded with ``sha256("moshpit/1 grid index\\0" + group_id)``; ``below``
    rejects words at or above ``2**64 - 2**64 mod bound``. Indices are distinct while
    ``size <= M``; a larger group (the matchmaker should have split it) wraps around.
    """
    if not isinstance(group_id, bytes | bytearray | memoryview):
        raise ConfigError(f"a group id is bytes, got {type(group_id).__name__}")
    n = _as_int(size, "a group size")
    if n < 0:
        raise ConfigError(f"a group size is non-negative, got {n}")
    m = grid.shape[axis_of_round(grid, round)]
    if rule == "rank":
        return [j % m for j in range(n)]
    if rule != "random":
        raise ConfigError(f"the index rule is 'random' or 'rank', got {rule!r}")
    draws = _Draws(hashlib.sha256(_INDEX_DOMAIN + bytes(group_id)).digest())
    perm = list(range(m))
    for i in range(m - 1, 0, -1):
        j = draws.below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return [perm[j % m] for j in range(n)]


def within_group_index(
    group_id: bytes,
    members: Sequence[PeerID],
    me: PeerID,
    grid: Grid,
    round: int,
    *,
    rule: IndexRule = "random",
) -> int:
    """``me``'s index in its group (its next coordinate on the round's axis), in ``[0, M)``.

    ``members`` is the group's agreed order (every member must see the same). ``rank`` is
    ``me``'s position modulo ``M``; ``random`` is the seeded rule of :func:`group_indices`, which
    mixes better when groups are not full (the paper's and hivemind's choice, and ours).
    ValueError when ``me`` is not a member or a member appears twice.
    """
    order = list(members)
    if len(set(order)) != len(order):
        raise ValueError("a group lists some member twice")
    try:
        position = order.index(me)
    except ValueError:
        raise ValueError(f"{me!r} is not a member of this group") from None
    return group_indices(group_id, len(order), grid, round, rule=rule)[position]


def next_key(grid: Grid, key: GroupKey, index: int, round: int) -> GroupKey:
    """The key for round ``round + 1``, after averaging in ``round`` under ``key``, at ``index``.

    ``(key + (index,))[1:]``: Algorithm 1's ``(C[1:], c)``; with ``d = 1`` the key stays empty.
    """
    checked = check_key(grid, key, round)
    axis = axis_of_round(grid, round)
    c = _as_int(index, "a within-group index")
    if not 0 <= c < grid.shape[axis]:
        raise ConfigError(
            f"index {c} is outside [0, {grid.shape[axis]}) for axis {axis} of grid {grid}"
        )
    return (*checked, c)[1:]


def balanced_initial_keys(grid: Grid, n: int, *, round: int = 0) -> list[GroupKey]:
    """Keys for ``n`` peers with every key's count within one of every other's.

    Peer ``i`` gets key number ``i mod K`` (K keys). With ``n = prod(shape)`` every key holds
    exactly ``M`` peers, one full line per group, the start that makes rounds exact. For tests
    and benchmarks; a real swarm starts from :func:`initial_key`.
    """
    count = _as_int(n, "a number of peers")
    if count < 0:
        raise ConfigError(f"a number of peers is non-negative, got {count}")
    keys = _key_space(grid, round)
    return [_key_from_number(grid, i % keys, round) for i in range(count)]
