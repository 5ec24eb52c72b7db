"""Averaging simulation: the Moshpit paper's §4.1 experiment, in-process with numpy.

How many rounds do N peers need to agree on the average of their values when peers fail at
random? Each of N peers holds one scalar drawn from N(0, 1). Every round, each peer fails
independently with probability p: a failed peer keeps its value, sends nothing and receives
nothing that round. After every round we measure the variance of the N estimates around their
current mean (``np.var``, population variance) and report, over seeds 0-9, the mean number of
rounds until it is at most 1e-9 and, in parentheses, 1e-4. A seed that does not get there within
50 rounds counts as 50 (the paper's cap); the table marks such a mean with ``+`` and the JSON
gives the count of such seeds as ``unreached_1e9`` / ``unreached_1e4``.

Methods (``--methods``):

``allreduce``            All-Reduce with restarts: everyone gets the exact average in a round
                         where no peer failed; a round with any failure achieves nothing.
``gossip``               Gossip on a ring: every live peer replaces its value by the mean of
                         itself and its two ring neighbours, over the neighbours that are live
                         (weights 1/3 each, renormalised). Synchronous: all use last round's
                         values.
``sgp``                  SGP / PushSum on a time-varying exponential graph with 2 out-edges:
                         in round t peer i pushes to i + 2**k1 and i + 2**k2 (mod N) with
                         k1 = 2t mod L, k2 = (2t+1) mod L, L = ceil(log2 N), so the hops cycle
                         through 1, 2, 4, ... two at a time. A live peer splits its (x, w)
                         equally between itself and its live out-peers (pushes to a failed peer
                         are not made, so no mass is lost). The estimate is x / w.
``random-groups``        Each round the live peers are shuffled into floor(n_live / M) groups of
                         M (the leftovers join groups 0, 1, ... round-robin; one group if fewer
                         than M are live) and every group averages exactly.
``moshpit-paper``        Moshpit as the paper simulates it: the peers sit at N distinct random
                         cells of the grid, fixed for the whole run; round t averages, over the
                         live peers, every line of the grid along axis t mod d.
``moshpit-grid-random``  Moshpit with this package's key rotation (moshpit_trio.averaging.grid):
``moshpit-grid-rank``    random PeerIDs, initial keys from ``initial_key()`` (NOT balanced, to
                         show what an unbalanced start costs), groups = the live peers with the
                         same key, the within-group index by the seeded ``random`` rule or the
                         ``rank`` rule, then ``next_key()``.
``moshpit-auto``         ``grid="auto"`` (moshpit_trio.averaging.auto_grid), the very functions
                         the averager calls, run for every simulated peer: each round each live
                         peer reads the run's directory (``Layout.from_records``), computes the
                         ``Plan`` and announces under its row (row rounds: ``Plan.place``, a
                         peer with no row, or none the plan has (``Plan.seat``),
                         ``Plan.row_for_joiner``, with an empty directory the
                         rows of ``cold_start_rows`` for the size ``estimate_size_around``
                         judges) or its column (``Plan.column``; a peer with no
                         row picks a column at random); announcers under one key are cut into
                         groups as ``group_sizes`` cuts them; after a row round each group's
                         lowest-id member stores its ``RowRecord``. The grid is ignored (rows
                         and columns follow the live count, laid out for groups of 32; keys
                         are cut into groups of at most 40, the library's defaults), so it runs
                         once per (N, p), shown in the first grid's block. Its JSON rows add
                         ``solo_rounds`` (live peer-rounds spent in a group of one, over all
                         seeds), ``rounds_run`` and ``overfull_keys`` (keys of planned rounds
                         that got more announcers than the plan expected and than one group
                         holds, so were cut into smaller groups than planned: a joiner or a
                         peer back from an absence one too many; per round run in the table).

Opt-in (not in the default run): ``moshpit-grid-balanced``, the random rule from
``balanced_initial_keys()`` dealt to the peers in random order, which shows what the key
rotation does from a perfect start (N = M^d, p = 0: exactly d rounds).

Choices, where the issue leaves them open:

* Common random numbers: for one (seed, N, p) every method sees the same initial values and the
  same failures (a separate generator draws each round's failures, the same sequence for every
  method), so differences between methods are not sampling noise.
* The mean only drifts where averaging is not weight-preserving. Group methods (all-reduce,
  random groups, both Moshpits) keep the sum among the participants exactly. Ring gossip keeps it
  with no failures (its matrix is doubly stochastic) but not with them: a peer next to a failed
  one averages over two instead of three, a row- but not column-stochastic step, so the mean
  moves a little. PushSum keeps the sums of x and w exactly, but its estimates x / w do not sum
  to a fixed value before they agree. Hence the metric is the variance around the *current* mean
  of the estimates, which is what "agreement" means for every method.
* In the grid methods a group has at most M members, M being the size of the round's axis. More
  live peers under one key are shuffled and cut into groups of M and a last, smaller group, as a
  leader-based matchmaker fills groups in arrival order. Inside a group the agreed order is by
  PeerID, and the group id is sha256 of the sorted member ids followed by the round (8 bytes,
  big-endian), the same as tests/test_grid.py. A failed peer averages with nobody but still
  advances its key as a group of one (MOSHPIT.md §1: a peer that finds nobody keeps its value and
  still advances its key); under the rank rule that puts every failed peer at index 0.
* The grid side M for random groups is the grid's first axis (32 on 32x32, 8 on 8x8x8).
* ``moshpit-paper`` needs N <= cells; the paper's pairs satisfy that (8x8x8 only for N = 512).
* ``moshpit-auto`` models the DHT and the matchmaker as follows. A directory entry is
  stored at once and everyone reads all of them next round (no lost or late stores). A key
  takes at most 256 announcers (the DHT's cap): a peer that finds its cold-start row full tries
  the next of ``cold_start_rows``; past the cap on any other key it is refused and counted
  alone. A cold start judges the swarm's size as the averager does, from the peers its read
  of the directory's key found closest to it: modelled as exact, the 10 live peers closest
  by XOR to a random key (8-byte ids), the same for every peer. The
  announcers under a key arrive in a random order, and the matchmaker's order is arbitrary
  (a shuffle). Group ids are sha256 of the sorted members' 16-byte ids and the round, cut to
  16 bytes. Every peer is reachable (no client-mode peers). A failed peer does not announce,
  so its row's next entry leaves it out; when it is back its old group is no longer in the
  directory and its place is unknown: it goes back to its row (``Plan.place(row, None)``), or
  places itself as a joiner when the plan no longer has that row (``Plan.seat``).
* The solo check (``--solo-n``, default 2-64; only when moshpit-auto runs): moshpit-auto at
  p = 0 for each N, 10 whole rounds (not stopped at 1e-9) per seed, solo rounds counted; one
  table line, and one JSON row per N.

Seeds and generators are numpy's PCG64 from SeedSequence((seed, N, p in ppm, stream)), so a row
reproduces alone (``--n 768 --p 0.005 --seeds 3``) exactly as inside the full run.

    python benchmarks/averaging_sim.py                        # the full table (about 40 s)
    python benchmarks/averaging_sim.py --n 1024 --p 0,0.005 --methods moshpit-paper,gossip
    python benchmarks/averaging_sim.py --json > benchmarks/results/averaging.json
    python benchmarks/averaging_sim.py --plot benchmarks/results/figure3.png

``--json`` prints a list of rows ``{n, p, grid, method, rounds_1e9, rounds_1e4, seeds,
unreached_1e9, unreached_1e4}`` (moshpit-auto's also ``solo_rounds, rounds_run,
overfull_keys``) on stdout
(the table then goes to stderr). ``--plot`` draws the paper's Figure 3 panels (32x32:
N=1024 p=0, N=1024 p=0.005, N=768 p=0.005): variance against round on a log scale, the mean
over the seeds, one line per method; it needs matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moshpit_trio.averaging.auto_grid import (  # noqa: E402
    DEFAULT_MAX_GROUP_SIZE,
    DEFAULT_TARGET_GROUP_SIZE,
    Layout,
    Plan,
    RowRecord,
    cold_start_rows,
    estimate_size_around,
    group_sizes,
)
from moshpit_trio.averaging.grid import (  # noqa: E402
    Grid,
    GroupKey,
    IndexRule,
    axis_of_round,
    balanced_initial_keys,
    group_indices,
    initial_key,
    next_key,
)
from moshpit_trio.dht.node import DHTSettings  # noqa: E402
from moshpit_trio.identity import PeerID  # noqa: E402

FloatArray = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

THRESHOLDS = (1e-9, 1e-4)
CAP = 50
DEFAULT_N = (512, 768, 900, 1024)
DEFAULT_P = (0.0, 0.001, 0.005, 0.01)
DEFAULT_SEEDS = tuple(range(10))
PAPER_GRID = "32x32"
EXTRA_GRIDS = {512: "8x8x8"}  # the paper's 3-D grid is run for N = 512 only
# Methods that ignore the grid: run once per (N, p), in the first grid's block.
AUTO_METHODS = frozenset({"moshpit-auto"})
AUTO_GRID = f"auto (groups of {DEFAULT_TARGET_GROUP_SIZE}, at most {DEFAULT_MAX_GROUP_SIZE})"
# The solo check: moshpit-auto at p = 0 for every N here, SOLO_ROUNDS rounds each, never stopped.
SOLO_N = range(2, 65)
SOLO_ROUNDS = 10
# The paper's Figure 3: (N, p) on 32x32.
PLOT_PANELS = ((1024, 0.0), (1024, 0.005), (768, 0.005))


class Averaging(Protocol):
    """One method's state for one run: every peer's current estimate of the average."""

    def step(self, t: int, live: BoolArray) -> None: ...

    def estimates(self) -> FloatArray: ...


# -- baselines -----------------------------------------------------------------------------------


class AllReduceRestarts:
    def __init__(self, x0: FloatArray, grid: Grid, rng: np.random.Generator) -> None:
        self.x = x0.copy()

    def step(self, t: int, live: BoolArray) -> None:
        # One failure anywhere aborts the whole collective; the next round starts it again.
        if live.all():
            self.x[:] = self.x.mean()

    def estimates(self) -> FloatArray:
        return self.x


class RingGossip:
    def __init__(self, x0: FloatArray, grid: Grid, rng: np.random.Generator) -> None:
        self.x = x0.copy()

    def step(self, t: int, live: BoolArray) -> None:
        alive = live.astype(np.float64)
        # np.roll(v, 1)[i] is v[i-1], the left neighbour; np.roll(v, -1)[i] is v[i+1].
        left_alive, right_alive = np.roll(alive, 1), np.roll(alive, -1)
        total = self.x + left_alive * np.roll(self.x, 1) + right_alive * np.roll(self.x, -1)
        mixed = total / (1.0 + left_alive + right_alive)
        self.x = np.where(live, mixed, self.x)

    def estimates(self) -> FloatArray:
        return self.x


class PushSum:
    def __init__(self, x0: FloatArray, grid: Grid, rng: np.random.Generator) -> None:
        self.x = x0.copy()
        self.w = np.ones_like(x0)
        self.n = len(x0)
        self.index = np.arange(self.n)
        self.levels = max(1, (self.n - 1).bit_length())  # hops 2^k < N: k in [0, L)

    def step(self, t: int, live: BoolArray) -> None:
        n, levels = self.n, self.levels
        targets = [(self.index + (1 << ((2 * t + j) % levels))) % n for j in (0, 1)]
        # A push happens when both ends are live this round.
        pushes = [(live & live[target]).astype(np.float64) for target in targets]
        share = 1.0 / (1.0 + pushes[0] + pushes[1])  # failed peers: no pushes, keep it all
        new_x, new_w = self.x * share, self.w * share
        for target, pushed in zip(targets, pushes, strict=True):
            new_x += np.bincount(target, weights=self.x * share * pushed, minlength=n)
            new_w += np.bincount(target, weights=self.w * share * pushed, minlength=n)
        self.x, self.w = new_x, new_w

    def estimates(self) -> FloatArray:
        result: FloatArray = self.x / self.w
        return result


def _average_labelled(x: FloatArray, who: np.ndarray, labels: np.ndarray, count: int) -> None:
    """Replace ``x[who]`` by the mean of the peers in ``who`` with the same label."""
    sums = np.bincount(labels, weights=x[who], minlength=count)
    sizes = np.bincount(labels, minlength=count)
    x[who] = sums[labels] / sizes[labels]


class RandomGroups:
    def __init__(self, x0: FloatArray, grid: Grid, rng: np.random.Generator) -> None:
        self.x = x0.copy()
        self.m = grid.shape[0]
        self.rng = rng

    def step(self, t: int, live: BoolArray) -> None:
        who = self.rng.permutation(np.flatnonzero(live))
        k = len(who)
        if k == 0:
            return
        groups = max(1, k // self.m)
        position = np.arange(k)
        full = groups * self.m
        # The first groups*M shuffled peers fill the groups in blocks of M; the rest (fewer
        # than M) are dealt round-robin. With k < M, groups = 1 and every position is < full.
        labels = np.where(position < full, position // self.m, (position - full) % groups)
        _average_labelled(self.x, who, labels, groups)

    def estimates(self) -> FloatArray:
        return self.x


# -- Moshpit ---------------------------------------------------------------------------------------


class MoshpitPaper:
    """Fixed distinct cells; round t averages every grid line along axis t mod d."""

    def __init__(self, x0: FloatArray, grid: Grid, rng: np.random.Generator) -> None:
        n = len(x0)
        if n > grid.size:
            raise ValueError(f"moshpit-paper puts {n} peers at distinct cells of {grid}: too many")
        self.x = x0.copy()
        self.grid = grid
        cells = rng.choice(grid.size, size=n, replace=False)
        coords = np.unravel_index(cells, grid.shape)
        # lines[a][i]: the id of peer i's line along axis a (its cell with coordinate a zeroed).
        self.lines = []
        for axis in range(grid.d):
            projected = list(coords)
            projected[axis] = np.zeros(n, dtype=np.intp)
            self.lines.append(np.ravel_multi_index(tuple(projected), grid.shape))

    def step(self, t: int, live: BoolArray) -> None:
        who = np.flatnonzero(live)
        labels = self.lines[t % self.grid.d][who]
        _average_labelled(self.x, who, labels, self.grid.size)

    def estimates(self) -> FloatArray:
        return self.x


class MoshpitGrid:
    """Moshpit rounds driven by moshpit_trio.averaging.grid, one peer at a time."""

    def __init__(
        self,
        x0: FloatArray,
        grid: Grid,
        rng: np.random.Generator,
        *,
        rule: IndexRule,
        balanced: bool = False,
    ) -> None:
        n = len(x0)
        self.x = x0.copy()
        self.grid = grid
        self.rule = rule
        self.rng = rng
        ids = [PeerID(rng.bytes(32)) for _ in range(n)]
        self.raw = [pid.to_bytes() for pid in ids]
        # The agreed order inside a group is by PeerID; rank[i] is peer i's place in that order.
        self.rank = [0] * n
        for place, i in enumerate(sorted(range(n), key=self.raw.__getitem__)):
            self.rank[i] = place
        if balanced:
            keys = balanced_initial_keys(grid, n)
            self.keys = [keys[j] for j in rng.permutation(n)]
        else:
            self.keys = [initial_key(grid, pid) for pid in ids]

    def _advance(self, group: list[int], key: GroupKey, t: int, new_keys: list[GroupKey]) -> None:
        group.sort(key=self.rank.__getitem__)
        tail = t.to_bytes(8, "big")
        group_id = hashlib.sha256(b"".join(self.raw[i] for i in group) + tail).digest()
        indices = group_indices(group_id, len(group), self.grid, t, rule=self.rule)
        for i, c in zip(group, indices, strict=True):
            new_keys[i] = next_key(self.grid, key, c, t)

    def step(self, t: int, live: BoolArray) -> None:
        m = self.grid.shape[axis_of_round(self.grid, t)]
        buckets: dict[GroupKey, list[int]] = defaultdict(list)
        new_keys = list(self.keys)
        alive = live.tolist()
        for i, key in enumerate(self.keys):
            if alive[i]:
                buckets[key].append(i)
            else:
                self._advance([i], key, t, new_keys)  # a group of one: value kept, key moves on
        for key, members in buckets.items():
            if len(members) > m:
                members = [members[j] for j in self.rng.permutation(len(members))]
            for start in range(0, len(members), m):
                group = members[start : start + m]
                if len(group) > 1:
                    self.x[group] = self.x[group].mean()
                self._advance(group, key, t, new_keys)
        self.keys = new_keys

    def estimates(self) -> FloatArray:
        return self.x


#: how many of the closest peers a DHT read converges on
NEAR_WIDTH = DHTSettings().near_width


class MoshpitAuto:
    """``grid="auto"``: every round runs moshpit_trio.averaging.auto_grid as each peer would.

    Each round every live peer reads the directory (``Layout.from_records``), computes the same
    ``Plan`` and announces under the key it names: ``("row", r)`` on a row round, ``("column",
    c)`` on a column round. The announcers under one key are cut into groups of
    ``group_sizes``; after a row round each group's lowest-id member stores its
    ``RowRecord``. The grid passed in is ignored: the layout follows the live count.
    """

    #: the DHT keeps at most this many announcers under one key
    KEY_CAP = 256

    def __init__(
        self,
        x0: FloatArray,
        grid: Grid,
        rng: np.random.Generator,
        *,
        target_group_size: int = DEFAULT_TARGET_GROUP_SIZE,
        max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
    ) -> None:
        n = len(x0)
        self.x = x0.copy()
        # the plan lays rows out for the target; a key's announcers are cut at the maximum
        self.target = target_group_size
        self.m = max_group_size
        self.rng = rng
        # The library draws from a random.Random (a joiner's row, an unknown place's column).
        self.draw = random.Random(int(rng.integers(2**63)))
        self.ids = [rng.bytes(16) for _ in range(n)]
        # their first 8 bytes as numbers, and the directory key's: XOR distances for the cold
        # start's size estimate
        self.id64 = np.array([int.from_bytes(b[:8], "big") for b in self.ids], dtype=np.uint64)
        self.directory_id = np.uint64(int.from_bytes(rng.bytes(8), "big"))
        # Where each peer last averaged on a row round: its row, and (group id, index in it).
        self.row: list[int | None] = [None] * n
        self.group: list[tuple[bytes, int] | None] = [None] * n
        # The run's directory: one entry per storing peer, replaced when it stores again.
        self.directory: dict[bytes, RowRecord] = {}
        #: live peer-rounds in which the peer's group was itself alone
        self.solo_rounds = 0
        #: keys of a planned round that got more announcers than the plan expected there and
        #: than one group may hold, so that they were cut into smaller groups than planned
        #: (33 under a maximum of 32: 17 + 16). Peers whose place the plan does not know
        #: (joiners, peers back from an absence) are who push a key over.
        self.overfull_keys = 0
        #: the size of every group formed (one entry per group per round)
        self.group_sizes: list[int] = []

    def _cold_estimate(self, live: BoolArray) -> int:
        # What the averager does: it has just read the (empty) directory, and judges the
        # swarm's size from the peers that lookup found closest to the directory's key
        # (estimate_size_around). Lookups are modelled as exact, as every DHT read here is:
        # everyone finds the same NEAR_WIDTH live peers, so everyone judges the same size.
        distances = self.id64[live] ^ self.directory_id
        width = min(NEAR_WIDTH, len(distances))
        nearest = np.sort(np.partition(distances, width - 1)[:width]) ^ self.directory_id
        closest = [int(v).to_bytes(8, "big") for v in nearest]
        return estimate_size_around(int(self.directory_id).to_bytes(8, "big"), closest)

    def _cold_row(self, estimate: int, counts: dict[tuple[str, int], int]) -> int | None:
        # The rows of cold_start_rows while the tried key is full; None when all of them were.
        for row in cold_start_rows(estimate, self.draw, self.target):
            if counts.get(("row", row), 0) < self.KEY_CAP:
                return row
        return None

    def step(self, t: int, live: BoolArray) -> None:
        layout = Layout.from_records(self.directory.values())
        plan = Plan.of(layout, self.target)
        kind = plan.kind(t)
        keys: dict[tuple[str, int], list[int]] = defaultdict(list)
        counts: dict[tuple[str, int], int] = defaultdict(int)
        estimate: int | None = None  # a cold start's size estimate, the same for everyone
        # Announce in a random arrival order (it decides who finds a key full).
        for i in self.rng.permutation(np.flatnonzero(live)).tolist():
            row, group = self.row[i], self.group[i]
            position = None if row is None or group is None else layout.position(row, *group)
            row = plan.seat(row, position)
            key: tuple[str, int]
            if kind == "row":
                if row is None and not layout.rows:
                    if estimate is None:
                        estimate = self._cold_estimate(live)
                    cold = self._cold_row(estimate, counts)
                    if cold is None:  # every row it tried was full: it sits the round out
                        self.solo_rounds += 1
                        self.group_sizes.append(1)
                        continue
                    r = cold
                elif row is None:
                    r = plan.row_for_joiner(self.draw)
                else:
                    r = plan.row(row, position)
                key = ("row", r)
            else:
                key = ("column", plan.column_for(row, position, self.draw))
            counts[key] += 1
            keys[key].append(i)
        for key, members in keys.items():
            if layout.rows and len(members) > max(self.m, plan.expected(*key)):
                self.overfull_keys += 1
            # The DHT refuses announcers past its cap: they find nobody this round.
            refused = max(0, len(members) - self.KEY_CAP)
            self.solo_rounds += refused
            self.group_sizes.extend([1] * refused)
            members = members[: self.KEY_CAP]
            # The matchmaker's order (record expiry, then PeerID) is arbitrary: shuffle.
            members = [members[j] for j in self.rng.permutation(len(members))]
            start = 0
            for size in group_sizes(len(members), self.m):
                group = members[start : start + size]
                start += size
                self.group_sizes.append(len(group))
                if len(group) == 1:
                    self.solo_rounds += 1
                else:
                    self.x[group] = self.x[group].mean()
                if key[0] == "row":
                    self._record(key[1], t, group)

    def _record(self, row: int, t: int, group: list[int]) -> None:
        order = sorted(group, key=self.ids.__getitem__)
        tail = t.to_bytes(8, "big")
        group_id = hashlib.sha256(b"".join(self.ids[i] for i in order) + tail).digest()[:16]
        for index, i in enumerate(order):
            self.row[i], self.group[i] = row, (group_id, index)
        # Every member is reachable here (no client-mode peers in this simulation).
        self.directory[self.ids[order[0]]] = RowRecord(row, t, group_id, len(order), len(order))

    def estimates(self) -> FloatArray:
        return self.x


Factory = Callable[[FloatArray, Grid, np.random.Generator], Averaging]

METHODS: dict[str, Factory] = {
    "allreduce": AllReduceRestarts,
    "gossip": RingGossip,
    "sgp": PushSum,
    "random-groups": RandomGroups,
    "moshpit-paper": MoshpitPaper,
    "moshpit-grid-random": lambda x, g, r: MoshpitGrid(x, g, r, rule="random"),
    "moshpit-grid-rank": lambda x, g, r: MoshpitGrid(x, g, r, rule="rank"),
    "moshpit-auto": MoshpitAuto,
}
EXTRA_METHODS: dict[str, Factory] = {
    "moshpit-grid-balanced": lambda x, g, r: MoshpitGrid(x, g, r, rule="random", balanced=True),
}
ALL_METHODS = {**METHODS, **EXTRA_METHODS}
# A fixed generator stream per method, from its name: adding a method or reordering them
# leaves every other method's random choices as they were.
_STREAM = {
    name: int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") for name in ALL_METHODS
}


# -- running -------------------------------------------------------------------------------------


def _generator(seed: int, n: int, p: float, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence((seed, n, round(p * 1_000_000), stream)))


def run(
    method: str,
    n: int,
    p: float,
    grid: Grid,
    seed: int,
    *,
    rounds: int = CAP,
    stop: float | None = min(THRESHOLDS),
) -> FloatArray:
    """Variance after 0, 1, ... rounds; ends early once it is at most ``stop`` (None: never)."""
    return run_sim(method, n, p, grid, seed, rounds=rounds, stop=stop)[0]


def run_sim(
    method: str,
    n: int,
    p: float,
    grid: Grid,
    seed: int,
    *,
    rounds: int = CAP,
    stop: float | None = min(THRESHOLDS),
) -> tuple[FloatArray, Averaging]:
    """As :func:`run`, and the method's state at the end (moshpit-auto counts solo rounds)."""
    x0 = _generator(seed, n, p, 0).normal(size=n)
    failures = _generator(seed, n, p, 1)
    sim = ALL_METHODS[method](x0, grid, _generator(seed, n, p, _STREAM[method]))
    variances = [float(np.var(x0))]
    everyone = np.ones(n, dtype=bool)
    for t in range(rounds):
        live = failures.random(n) >= p if p > 0 else everyone
        sim.step(t, live)
        variances.append(float(np.var(sim.estimates())))
        if stop is not None and variances[-1] <= stop:
            break
    return np.asarray(variances), sim


def rounds_to(
    variances: Sequence[float] | FloatArray, threshold: float, cap: int = CAP
) -> int | None:
    """The first round after which the variance is at most ``threshold``; None if not by cap."""
    for t in range(1, min(len(variances), cap + 1)):
        if variances[t] <= threshold:
            return t
    return None


@dataclass(frozen=True)
class Config:
    n: int
    p: float
    grid: Grid


@dataclass
class Row:
    config: Config
    method: str
    curves: list[FloatArray]
    #: moshpit-auto: per seed, live peer-rounds spent alone (None for the other methods)
    solos: list[int] | None = None
    #: moshpit-auto: per seed, keys cut into smaller groups than planned (``overfull_keys``)
    overfull: list[int] | None = None

    def stats(self, threshold: float, cap: int = CAP) -> tuple[float, int]:
        """Mean rounds (unreached counted as the cap) and the number of unreached seeds."""
        reached = [rounds_to(c, threshold, cap) for c in self.curves]
        unreached = sum(r is None for r in reached)
        return float(np.mean([cap if r is None else r for r in reached])), unreached

    def as_json(self, cap: int = CAP) -> dict[str, Any]:
        r9, u9 = self.stats(1e-9, cap)
        r4, u4 = self.stats(1e-4, cap)
        row: dict[str, Any] = {
            "n": self.config.n,
            "p": self.config.p,
            "grid": AUTO_GRID if self.method in AUTO_METHODS else str(self.config.grid),
            "method": self.method,
            "rounds_1e9": r9,
            "rounds_1e4": r4,
            "seeds": len(self.curves),
            "unreached_1e9": u9,
            "unreached_1e4": u4,
        }
        if self.solos is not None:
            row["solo_rounds"] = sum(self.solos)
            row["rounds_run"] = sum(len(c) - 1 for c in self.curves)
        if self.overfull is not None:
            row["overfull_keys"] = sum(self.overfull)
        return row


def default_configs(
    ns: Sequence[int], ps: Sequence[float], grids: Sequence[str] | None
) -> list[Config]:
    """The paper's pairs (32x32 for every N, 8x8x8 for N = 512), or ``grids`` for every N."""
    configs = []
    for n in ns:
        names = (
            list(grids) if grids else [PAPER_GRID, *([EXTRA_GRIDS[n]] if n in EXTRA_GRIDS else [])]
        )
        for name in names:
            for p in ps:
                configs.append(Config(n, p, Grid.parse(name)))
    return configs


def _solos(sim: Averaging) -> int:
    return int(getattr(sim, "solo_rounds", 0))


def _overfull(sim: Averaging) -> int:
    return int(getattr(sim, "overfull_keys", 0))


def simulate(
    configs: Sequence[Config],
    methods: Sequence[str],
    seeds: Sequence[int],
    *,
    rounds: int = CAP,
    full_curves: Callable[[Config], bool] = lambda c: False,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    rows = []
    done_auto: set[tuple[str, int, float]] = set()
    for config in configs:
        started = time.perf_counter()
        stop = None if full_curves(config) else min(THRESHOLDS)
        for method in methods:
            if method == "moshpit-paper" and config.n > config.grid.size:
                continue  # distinct cells are impossible; said in the docstring
            if method in AUTO_METHODS:
                if (method, config.n, config.p) in done_auto:
                    continue  # the grid is ignored: once per (N, p) is enough
                done_auto.add((method, config.n, config.p))
            runs = [
                run_sim(method, config.n, config.p, config.grid, s, rounds=rounds, stop=stop)
                for s in seeds
            ]
            auto = method in AUTO_METHODS
            solos = [_solos(sim) for _, sim in runs] if auto else None
            overfull = [_overfull(sim) for _, sim in runs] if auto else None
            rows.append(Row(config, method, [curve for curve, _ in runs], solos, overfull))
        if progress:
            progress(
                f"N={config.n} p={config.p} {config.grid}: {time.perf_counter() - started:.1f}s"
            )
    return rows


def solo_check(ns: Sequence[int], seeds: Sequence[int], *, rounds: int = SOLO_ROUNDS) -> list[Row]:
    """moshpit-auto at p = 0 for each N in ``ns``: ``rounds`` whole rounds (not stopped at the
    threshold, so that later rounds are counted too), solo rounds counted per seed."""
    rows = []
    for n in ns:
        runs = [
            run_sim("moshpit-auto", n, 0.0, Grid((n,)), s, rounds=rounds, stop=None) for s in seeds
        ]
        config = Config(n, 0.0, Grid((n,)))
        rows.append(
            Row(
                config,
                "moshpit-auto",
                [c for c, _ in runs],
                [_solos(r) for _, r in runs],
                [_overfull(r) for _, r in runs],
            )
        )
    return rows


def format_solo_check(rows: Sequence[Row], cap: int = CAP) -> str:
    """One line: the solo rounds over the whole range of N, and the slowest N to 1e-9."""
    if not rows:
        return ""
    ns = [r.config.n for r in rows]
    solos = sum(sum(r.solos or ()) for r in rows)
    with_solos = [r.config.n for r in rows if sum(r.solos or ())]
    slowest = max(rows, key=lambda r: r.stats(1e-9, cap)[0])
    r9, u9 = slowest.stats(1e-9, cap)
    return (
        f"moshpit-auto, p = 0, N = {min(ns)}..{max(ns)}, {len(rows[0].curves[0]) - 1} rounds x "
        f"{len(rows[0].curves)} seeds each: {solos} solo peer-rounds"
        + (f" (at N = {', '.join(map(str, with_solos))})" if with_solos else "")
        + f"; slowest to 1e-9: N = {slowest.config.n}, {r9:.1f}{'+' if u9 else ''} rounds"
    )


def format_table(rows: Sequence[Row], cap: int = CAP) -> str:
    """One block per (N, grid): methods down, p across, "rounds to 1e-9 (to 1e-4)"."""
    blocks: dict[tuple[int, str], dict[str, dict[float, str]]] = {}
    ps: dict[tuple[int, str], list[float]] = defaultdict(list)
    for row in rows:
        block = (row.config.n, str(row.config.grid))
        r9, u9 = row.stats(1e-9, cap)
        r4, u4 = row.stats(1e-4, cap)
        cell = f"{r9:.1f}{'+' if u9 else ''} ({r4:.1f}{'+' if u4 else ''})"
        blocks.setdefault(block, {}).setdefault(row.method, {})[row.config.p] = cell
        if row.config.p not in ps[block]:
            ps[block].append(row.config.p)
    width = max([len(m) for row in rows for m in [row.method]] + [6])
    lines = [
        f"Rounds to variance <= 1e-9 (to <= 1e-4), mean over {len(rows[0].curves) if rows else 0} "
        f"seeds, capped at {cap}; '+': some seeds never got there (counted as {cap})."
    ]
    for (n, grid), by_method in blocks.items():
        columns = ps[(n, grid)]
        lines.append("")
        lines.append(f"N = {n}, grid {grid}")
        lines.append(
            f"  {'method':<{width}}" + "".join(f"  {'p = ' + str(p):>15}" for p in columns)
        )
        for method, cells in by_method.items():
            lines.append(
                f"  {method:<{width}}" + "".join(f"  {cells.get(p, '-'):>15}" for p in columns)
            )
    auto = [row for row in rows if row.solos is not None]
    if auto:
        lines.append("")
        lines.append(
            f"moshpit-auto ignores the grid ({AUTO_GRID}: rows and columns follow the live "
            f"count); solo peer-rounds, all seeds: "
            + ", ".join(f"N={r.config.n} p={r.config.p}: {sum(r.solos or ())}" for r in auto)
        )
        lines.append(
            "moshpit-auto keys cut into smaller groups than planned (a joiner or a returning "
            "peer one too many), per round run: "
            + ", ".join(
                f"N={r.config.n} p={r.config.p}: "
                f"{sum(r.overfull or ()) / max(1, sum(len(c) - 1 for c in r.curves)):.2f}"
                for r in auto
            )
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path) -> None:
    import matplotlib  # lazily: only --plot needs it (the 'bench' extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        [r for r in rows if (r.config.n, r.config.p, str(r.config.grid)) == (n, p, PAPER_GRID)]
        for n, p in PLOT_PANELS
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharey=True)
    for ax, (n, p), panel in zip(np.atleast_1d(axes), PLOT_PANELS, panels, strict=True):
        for row in panel:
            length = min(len(c) for c in row.curves)
            mean = np.mean([c[:length] for c in row.curves], axis=0)
            # Exact averages leave variances of ~1e-33 or exactly 0, which a log axis cannot show.
            # Dashed: our key rotation, so it stands apart from the paper's Moshpit it overlaps.
            style = "--" if row.method.startswith("moshpit-grid") else "-"
            ax.plot(np.arange(length), np.maximum(mean, 1e-30), style, label=row.method)
        for threshold in THRESHOLDS:
            ax.axhline(threshold, color="grey", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1e-12, 10)
        ax.set_xlim(0, CAP)
        ax.set_title(f"N = {n}, p = {p}, grid {PAPER_GRID}")
        ax.set_xlabel("round")
    np.atleast_1d(axes)[0].set_ylabel("variance around the mean")
    np.atleast_1d(axes)[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _numbers(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            low, high = part.split("-", 1)
            seeds.extend(range(int(low), int(high) + 1))
        elif part.strip():
            seeds.append(int(part))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--n", default=",".join(map(str, DEFAULT_N)), help="peer counts, e.g. 1024,768"
    )
    parser.add_argument(
        "--p", default=",".join(map(str, DEFAULT_P)), help="failure rates, e.g. 0,0.005"
    )
    parser.add_argument(
        "--grids", help="grids for every N, e.g. 32x32,8x8x8 (default: 32x32, and 8x8x8 for N=512)"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"from {', '.join(ALL_METHODS)}",
    )
    parser.add_argument("--seeds", default="0-9", help="e.g. 0-9, or 0,3,5")
    parser.add_argument("--rounds", type=int, default=CAP, help="the cap on rounds")
    parser.add_argument(
        "--solo-n",
        default=f"{SOLO_N.start}-{SOLO_N.stop - 1}",
        help="peer counts for moshpit-auto's solo check at p = 0 (e.g. 2-64; '' to skip)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the Figure 3 panels")
    args = parser.parse_args(argv)

    try:
        ns = _numbers(args.n, int)
        ps = _numbers(args.p, float)
        seeds = _seeds(args.seeds)
        grids = _numbers(args.grids, str) if args.grids else None
        solo_ns = _seeds(args.solo_n) if "moshpit-auto" in args.methods.split(",") else []
        configs = default_configs(ns, ps, grids)
    except ValueError as exc:
        parser.error(str(exc))
    methods = _numbers(args.methods, str)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods or not seeds or args.rounds < 1:
        parser.error(f"unknown method(s) {unknown}, or no methods, no seeds, or --rounds < 1")
    if any(not 0 <= p < 1 for p in ps) or any(n < 2 for n in [*ns, *solo_ns]):
        parser.error("--p must be in [0, 1) and --n and --solo-n at least 2")

    def in_plot(config: Config) -> bool:
        return (
            args.plot is not None
            and str(config.grid) == PAPER_GRID
            and ((config.n, config.p) in PLOT_PANELS)
        )

    # The plot's panels need whole curves: run them (with the chosen methods and seeds) even
    # when --n/--p leave them out, and do not stop them early.
    if args.plot is not None:
        have = {(c.n, c.p, str(c.grid)) for c in configs}
        configs += [
            Config(n, p, Grid.parse(PAPER_GRID))
            for n, p in PLOT_PANELS
            if (n, p, PAPER_GRID) not in have
        ]
        plotted_only = {(n, p) for n, p in PLOT_PANELS if (n, p, PAPER_GRID) not in have}
    else:
        plotted_only = set()

    out = sys.stderr if args.json else sys.stdout
    started = time.perf_counter()
    rows = simulate(
        configs,
        methods,
        seeds,
        rounds=args.rounds,
        full_curves=in_plot,
        progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True),
    )
    solo_rows = solo_check(solo_ns, seeds)
    elapsed = time.perf_counter() - started
    table_rows = [
        r
        for r in rows
        if not ((r.config.n, r.config.p) in plotted_only and str(r.config.grid) == PAPER_GRID)
    ]
    print(format_table(table_rows, args.rounds), file=out)
    if solo_rows:
        print(format_solo_check(solo_rows, args.rounds), file=out)
    runs = f"{len(configs)} settings x {len(methods)} methods x {len(seeds)} seeds"
    if solo_rows:
        runs += f", and the solo check ({len(solo_rows)} N)"
    print(f"\n{runs} in {elapsed:.1f}s", file=out, flush=True)
    if args.json:
        print(json.dumps([r.as_json(args.rounds) for r in [*table_rows, *solo_rows]], indent=1))
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
