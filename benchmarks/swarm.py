"""Swarm: N real peers average round after round on the in-memory network, in virtual time.

``--peers`` peers (default 256) each run the library as a user would: ``open_peer`` (the real
websocket, handshake, envelope, DHT code) on the in-memory network of ``moshpit_trio.testing``
(links of ``--latency-ms`` one-way delay, default 20 ms, unlimited bandwidth) and one
``MoshpitAverager`` over a float32 vector of ``--dim`` values (default 1: a scalar) drawn from
N(0, 1), with ``round_period`` ``--period`` seconds (default 10) so that every peer starts each
round on the same slot of the shared clock, and ``step(timeout=--timeout)`` (default 8 s, below
the period). The whole run is under ``trio.testing.MockClock(autojump_threshold=0)``, so every
duration below is *virtual* unless it says wall.

The run:

1. Build: peer 0 starts the swarm; the others join in batches of ``--join-batch`` (default 32)
   that join concurrently, as real joiners do, each peer bootstrapping from up to three random
   peers of earlier batches. The next batch starts when every peer of this one has joined
   (``open_peer`` returned). One at a time (``--join-batch 1``) 1024 peers take ~1300 virtual
   seconds to join, longer than the DHT's 600 s bucket refresh interval.
2. Every peer calls ``step()`` for ``--rounds`` consecutive slots (default 6), all starting on
   the first slot boundary after the build.
3. ``--fail P``: in every round, each live peer is killed with probability P (its host is killed
   on the network, ``MemoryNetwork.kill``: every connection reset, no goodbye; its tasks are
   cancelled), at a random moment of the round's step window (uniform in [slot, slot +
   timeout)). Killed peers stay dead and leave the statistics from then on.
4. Halfway between the end of a round's step window and the next slot (every step returns by
   its timeout) the values of the live peers are read.

Per round (table row and ``--json`` ``rows``):

``var_global``  mean over the live peers of (x - m0)^2 / v0, m0 and v0 being the mean and the
                (population) variance of *all* initial values: how far the swarm is from the
                answer it set out to compute. Averaging keeps the sum of a group's values, so
                without failures the live mean stays m0 and this is also the spread. A killed
                peer takes part of the sum with it, so with ``--fail`` it levels off at the
                square of the drift of the mean.
``var_live``    the variance of the live peers' values around their own current mean, over v0
                (``benchmarks/averaging_sim.py``'s metric: agreement).
``groups``      group sizes min / mean / max over the groups that formed (distinct group ids
                among the reports, size >= 2).
``solo``        peers whose step formed no group (a solo round); ``failed`` steps that formed
                a group but did not average every span over all of its members; the progress
                line (and ``why_failed`` in the JSON rows) says what those steps reported about
                the members they did without.
``msgs``        protocol messages per peer, sent / received: envelopes (requests, responses,
                stream chunks, credits, control) counted by each connection as it writes or
                reads them (``Transport.messages_sent`` / ``messages_received``); the
                handshake's messages and the websocket's own frames are not envelopes.
``kB``          bytes of those envelopes per peer, sent / received (``Transport.bytes_sent`` /
                ``bytes_received``). Both count *all* of a peer's traffic from one snapshot to
                the next (DHT lookups and maintenance included, not only averaging), divided
                by the peers live at the round's start (killed ones' traffic included).
``dials``       connections a peer dialed in the round (each a websocket upgrade and a signed
                handshake), per peer; ``connections_per_peer`` below says how many stay open.
``step_s``      the slowest step (virtual seconds, start of the slot to return) and
                ``mm_s`` the slowest matchmaking.
``wall_s``      wall seconds from the previous snapshot to this one.

Headline (``--json``): ``peers``, ``rounds_to_1e9`` (first round after which ``var_global`` <=
1e-9; null if not within ``--rounds``), ``rounds_to_1e9_live`` (the same for ``var_live``),
``solo_rounds`` (solo steps over the whole run), ``wall_s`` (the whole run: build, rounds,
teardown), ``build_wall_s``, ``virtual_s``, ``peak_rss_mb`` (this process's peak resident set,
from ``getrusage``), ``connections_per_peer`` (open connections per live peer at the end),
``grid``, ``fail``, ``killed``, ``library_warnings``, ``rows``. ``--out FILE`` also writes it.
Progress (the build, then each round) goes to stderr as the run goes.

Reference in the same run: ``averaging_sim`` (the numpy simulation of
``benchmarks/averaging_sim.py``) on the same N with the grid method that matches ``--grid``
(``moshpit-auto`` for "auto" when that method exists, ``moshpit-grid-random`` for an explicit
grid, which is what the averager's PeerID-derived keys do; ``moshpit-grid-balanced`` with
``--balanced-keys``) and p = ``--fail``: its rounds to
1e-9 for seed ``--seed`` (``sim_rounds_to_1e9``) and ``rounds_vs_sim`` (this run's over the
simulation's). The simulation's failures are per-round absences, not deaths, so with ``--fail``
the two are not the same experiment; the ratio is given only without failures.

Wall time: like ``benchmarks/dht.py``, what exists after start-up is frozen for CPython's
collector and the first generation's threshold raised (``--gc default`` keeps CPython's).

    python benchmarks/swarm.py                     # 256 peers, grid "auto"
    python benchmarks/swarm.py --peers 1024
    python benchmarks/swarm.py --fail 0.01 --json
    python benchmarks/swarm.py --grid 16x16        # an explicit grid, for comparison
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import logging
import math
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import structlog  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402

from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport  # noqa: E402
from moshpit_trio.averaging.grid import Grid, balanced_initial_keys  # noqa: E402
from moshpit_trio.errors import ConfigError  # noqa: E402
from moshpit_trio.identity import Identity  # noqa: E402
from moshpit_trio.peer import Peer, open_peer  # noqa: E402
from moshpit_trio.testing import MemoryNetwork, pin_unix_time  # noqa: E402

RUN_ID = "swarm"
BOOTSTRAP_PEERS = 3
THRESHOLD = 1e-9


@dataclasses.dataclass
class Config:
    peers: int = 256
    rounds: int = 6
    fail: float = 0.0
    grid: str = "auto"
    seed: int = 0
    dim: int = 1
    latency_ms: float = 20.0
    period: float = 10.0
    timeout: float = 8.0
    gc_mode: str = "tuned"
    balanced_keys: bool = False
    join_batch: int = 32

    def check(self) -> None:
        if self.peers < 2:
            raise SystemExit("--peers must be at least 2")
        if self.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        if not 0 <= self.fail < 1:
            raise SystemExit("--fail is a probability in [0, 1)")
        if self.dim < 1:
            raise SystemExit("--dim must be at least 1")
        if self.join_batch < 1:
            raise SystemExit("--join-batch must be at least 1")
        if not 0 < self.timeout < self.period:
            raise SystemExit("--timeout must be positive and below --period")
        if self.latency_ms < 0:
            raise SystemExit("--latency-ms must be non-negative")
        if not self.is_auto:
            try:
                Grid.parse(self.grid)
            except ConfigError as exc:
                raise SystemExit(f"--grid: {exc}") from None
        elif self.balanced_keys:
            raise SystemExit("--balanced-keys is for an explicit --grid")

    @property
    def is_auto(self) -> bool:
        return self.grid.strip().lower() == "auto"


@dataclasses.dataclass(eq=False)
class Member:
    """One simulated peer: its host, its peer, its values, its reports."""

    index: int
    host: str
    values: np.ndarray
    peer: Peer | None = None
    scope: trio.CancelScope | None = None
    dead: bool = False
    reports: dict[int, RoundReport] = dataclasses.field(default_factory=dict)


def _identity(seed: int, index: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(f"moshpit-swarm/{seed}/{index}".encode()).digest())


class Swarm:
    def __init__(self, cfg: Config, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.net = MemoryNetwork(seed=cfg.seed, latency=cfg.latency_ms / 1000)
        self.rng = random.Random(f"swarm/{cfg.seed}")
        values = np.random.default_rng(cfg.seed).standard_normal((cfg.peers, cfg.dim))
        self.initial = values.astype(np.float32)
        self.members = [Member(i, f"h{i}", self.initial[i].copy()) for i in range(cfg.peers)]
        self.keys: list[tuple[int, ...]] | None = None
        if cfg.balanced_keys:
            self.keys = balanced_initial_keys(Grid.parse(cfg.grid), cfg.peers)
        self.go = trio.Event()

    def live(self) -> list[Member]:
        return [m for m in self.members if not m.dead]

    async def build(self) -> None:
        # Peer 0 starts the swarm alone; then batches of ``join_batch`` peers join at once, each
        # bootstrapping from peers of earlier batches (as real joiners do: concurrently, from
        # whoever is already there). One at a time, 1024 peers took ~1300 virtual seconds to
        # join, past the DHT's 600 s bucket refresh, so the early peers spent the build
        # refreshing; in batches the build stays far below it.
        first, rest = self.members[0], self.members[1:]
        first.peer = await self.nursery.start(self._run_member, first, [])
        batch = self.cfg.join_batch
        for start in range(0, len(rest), batch):
            joined = [b.peer for b in self.members[: start + 1] if b.peer is not None]
            async with trio.open_nursery() as joining:
                for m in rest[start : start + batch]:
                    boot = self.rng.sample(joined, min(BOOTSTRAP_PEERS, len(joined)))
                    joining.start_soon(self._join, m, [str(p.address) for p in boot])
            done = min(start + batch, len(rest)) + 1
            if done // 128 > (start + 1) // 128 or done == len(self.members):
                _progress(
                    f"joined {done} peers: {trio.current_time():.1f} s virtual, "
                    f"peak RSS {_peak_rss_mb():.0f} MB"
                )

    async def _join(self, m: Member, bootstrap: list[str]) -> None:
        m.peer = await self.nursery.start(self._run_member, m, bootstrap)

    async def _run_member(
        self, m: Member, bootstrap: list[str], *, task_status: trio.TaskStatus[Peer]
    ) -> None:
        cfg = self.cfg
        with trio.CancelScope() as scope:
            m.scope = scope
            async with open_peer(
                _identity(cfg.seed, m.index),
                listen=f"{m.host}:0",
                network=self.net.host(m.host),
                bootstrap=bootstrap,
            ) as peer:
                averager = MoshpitAverager(
                    peer,
                    RUN_ID,
                    [m.values],
                    grid=cfg.grid,
                    round_period=cfg.period,
                    initial_key=None if self.keys is None else self.keys[m.index],
                )
                async with averager:
                    task_status.started(peer)
                    await self.go.wait()
                    for _ in range(cfg.rounds):
                        report = await averager.step(timeout=cfg.timeout)
                        m.reports[report.round] = report
                    await trio.sleep_forever()  # stay reachable until the run ends

    def kill(self, m: Member) -> None:
        m.dead = True
        self.net.kill(m.host)
        if m.scope is not None:
            m.scope.cancel()

    def counters(self) -> dict[int, tuple[int, int, int, int, int]]:
        stats = self.net.stats()
        out = {}
        for m in self.members:
            if m.peer is not None:
                t = m.peer.transport
                dialed = stats[m.host].connects if m.host in stats else 0
                out[m.index] = (
                    t.messages_sent,
                    t.messages_received,
                    t.bytes_sent,
                    t.bytes_received,
                    dialed,
                )
        return out

    async def close(self) -> None:
        # Crash everyone: a graceful goodbye from hundreds of peers only costs wall time.
        for m in self.members:
            if not m.dead:
                self.net.kill(m.host)


async def _kill_at(swarm: Swarm, m: Member, when: float) -> None:
    await trio.sleep_until(when)
    if not m.dead:
        swarm.kill(m)


def _round_row(
    swarm: Swarm,
    round_: int,
    live_at_start: list[Member],
    killed: int,
    before: dict[int, tuple[int, int, int, int, int]],
    after: dict[int, tuple[int, int, int, int, int]],
    m0: np.ndarray,
    v0: float,
) -> dict[str, Any]:
    live = swarm.live()
    x = np.array([m.values for m in live], dtype=np.float64)
    var_global = float(np.mean((x - m0) ** 2) / v0) if len(live) else None
    var_live = float(np.mean(np.var(x, axis=0)) / v0) if len(live) else None
    reports = [m.reports[round_] for m in live_at_start if round_ in m.reports]
    groups: dict[bytes, int] = {}
    for r in reports:
        if r.group_id is not None and len(r.members) > 1:
            groups[r.group_id] = len(r.members)
    sizes = list(groups.values())
    n = max(1, len(live_at_start))
    totals = [0, 0, 0, 0, 0]
    for m in live_at_start:
        b, a = before.get(m.index, (0,) * 5), after.get(m.index, (0,) * 5)
        for k in range(5):
            totals[k] += a[k] - b[k]
    return {
        "round": round_,
        "live": len(live),
        "killed": killed,
        "reported": len(reports),
        # a live peer whose step did not return by the snapshot: should never happen
        "missing": sum(1 for m in live if round_ not in m.reports),
        "var_global": var_global,
        "var_live": var_live,
        "groups": len(sizes),
        "group_min": min(sizes) if sizes else None,
        "group_mean": float(np.mean(sizes)) if sizes else None,
        "group_max": max(sizes) if sizes else None,
        "solo": sum(1 for r in reports if r.group_id is None or len(r.members) < 2),
        "failed": sum(1 for r in reports if len(r.members) > 1 and not r.succeeded),
        "why_failed": _why_failed(reports),
        "msgs_sent": totals[0] / n,
        "msgs_received": totals[1] / n,
        "bytes_sent": totals[2] / n,
        "bytes_received": totals[3] / n,
        "dials": totals[4] / n,
        "step_s": max((r.seconds["total"] for r in reports), default=None),
        "matchmaking_s": max((r.seconds["matchmaking"] for r in reports), default=None),
    }


def _why_failed(reports: list[RoundReport]) -> dict[str, int]:
    """What the failed steps said about the members they did without: per reason, how many
    (member, reporter) pairs gave it ("excluded:late": a reducer left a part out as late;
    "lost:unresponsive": a peer stopped waiting for a silent member; ...)."""
    why: dict[str, int] = {}
    for r in reports:
        if len(r.members) > 1 and not r.succeeded:
            reasons = [f"excluded:{v}" for v in r.excluded.values()]
            reasons += [f"lost:{v}" for v in r.lost.values()]
            for reason in reasons or ["no reason given"]:
                why[reason] = why.get(reason, 0) + 1
    return dict(sorted(why.items()))


async def swarm_benchmark(cfg: Config) -> dict[str, Any]:
    """The run, in the current trio run (under a MockClock for virtual time)."""
    # Rounds are slots of Unix time: tied to the virtual clock, a seed repeats its run.
    pin_unix_time()
    wall0 = time.perf_counter()
    virtual0 = trio.current_time()
    rows: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        swarm = Swarm(cfg, nursery)
        try:
            await swarm.build()
            build_wall = time.perf_counter() - wall0
            build_virtual = trio.current_time() - virtual0
            _progress(
                f"built {cfg.peers} peers: {build_wall:.1f} s wall, {build_virtual:.1f} s "
                f"virtual, peak RSS {_peak_rss_mb():.0f} MB"
            )
            if cfg.gc_mode == "tuned":
                gc.collect()
                gc.freeze()
            m0 = swarm.initial.astype(np.float64).mean(axis=0)
            v0 = float(np.mean(np.var(swarm.initial.astype(np.float64), axis=0)))
            first = rows_start = None
            peer0 = swarm.members[0].peer
            assert peer0 is not None
            clock = peer0.dht
            # Start the steps just after a slot boundary, so that every peer's first step waits
            # for the same next boundary (the averager takes the slot's index as the round).
            await trio.sleep(cfg.period - clock.now() % cfg.period + 0.01 * cfg.period)
            first = math.floor(clock.now() / cfg.period) + 1
            swarm.go.set()
            before = swarm.counters()
            wall_mark = time.perf_counter()
            kill_rng = random.Random(f"kills/{cfg.seed}")
            async with trio.open_nursery() as kills:
                for i in range(cfg.rounds):
                    round_ = first + i
                    slot_at = trio.current_time() + (round_ * cfg.period - clock.now())
                    live_at_start = swarm.live()
                    victims = [m for m in live_at_start if kill_rng.random() < cfg.fail]
                    for m in victims:
                        when = slot_at + kill_rng.uniform(0, cfg.timeout)
                        kills.start_soon(_kill_at, swarm, m, when)
                    # every step of the round returns by slot + timeout; read between that
                    # and the next slot
                    await trio.sleep_until(slot_at + (cfg.timeout + cfg.period) / 2)
                    after = swarm.counters()
                    row = _round_row(
                        swarm, round_, live_at_start, len(victims), before, after, m0, v0
                    )
                    row["index"] = i + 1
                    now_wall = time.perf_counter()
                    row["wall_s"] = now_wall - wall_mark
                    wall_mark = now_wall
                    rows.append(row)
                    _progress(
                        f"round {i + 1}: var_global {row['var_global']:.2e}, solo {row['solo']}, "
                        f"failed {row['failed']}"
                        + (f" {row['why_failed']}" if row["why_failed"] else "")
                        + f", {row['wall_s']:.1f} s wall, "
                        f"peak RSS {_peak_rss_mb():.0f} MB"
                    )
                    before = after
            rows_start = first
            live = swarm.live()
            conns = sum(
                len(m.peer.transport.connections()) for m in live if m.peer is not None
            ) / max(1, len(live))
        finally:
            await swarm.close()
            nursery.cancel_scope.cancel()
    wall_s = time.perf_counter() - wall0
    return {
        "peers": cfg.peers,
        "rounds": cfg.rounds,
        "first_round": rows_start,
        "grid": cfg.grid,
        "fail": cfg.fail,
        "seed": cfg.seed,
        "dim": cfg.dim,
        "latency_ms": cfg.latency_ms,
        "period": cfg.period,
        "timeout": cfg.timeout,
        "join_batch": cfg.join_batch,
        "rounds_to_1e9": _rounds_to(rows, "var_global"),
        "rounds_to_1e9_live": _rounds_to(rows, "var_live"),
        "solo_rounds": sum(r["solo"] for r in rows),
        "failed_rounds": sum(r["failed"] for r in rows),
        "killed": sum(r["killed"] for r in rows),
        "wall_s": wall_s,
        "build_wall_s": build_wall,
        "build_virtual_s": build_virtual,
        "virtual_s": trio.current_time() - virtual0,
        "connections_per_peer": conns,
        "rows": rows,
    }


def _rounds_to(rows: list[dict[str, Any]], key: str) -> int | None:
    for row in rows:
        if row[key] is not None and row[key] <= THRESHOLD:
            return int(row["index"])
    return None


def _seed_trio_scheduler(seed: int) -> None:
    """trio reverses batches of ready tasks at random (unseeded, on purpose); seeding its
    private generator where it exists makes runs repeat more closely (as benchmarks/dht.py)."""
    r = getattr(getattr(trio, "_core", None), "_run", None)
    rng = getattr(r, "_r", None)
    if isinstance(rng, random.Random):
        rng.seed(f"trio/{seed}")


def _progress(line: str) -> None:
    """A line on stderr as the run goes (a 1024-peer run takes many minutes)."""
    print(f"swarm: {line}", file=sys.stderr, flush=True)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(cfg: Config) -> dict[str, Any]:
    cfg.check()
    if cfg.gc_mode == "tuned":
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    _seed_trio_scheduler(cfg.seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    result: dict[str, Any] = trio.run(swarm_benchmark, cfg, clock=clock)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["gc"] = cfg.gc_mode
    result.update(_reference(cfg, result["rounds_to_1e9"]))
    return result


def _reference(cfg: Config, rounds: int | None) -> dict[str, Any]:
    """The numpy simulation of benchmarks/averaging_sim.py on the same N, p and seed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        import averaging_sim as sim
    finally:
        sys.path.pop(0)
    methods = getattr(sim, "ALL_METHODS", {})
    if cfg.is_auto:
        method, grid_text = "moshpit-auto", None
    elif cfg.balanced_keys:
        method, grid_text = "moshpit-grid-balanced", cfg.grid
    else:
        method, grid_text = "moshpit-grid-random", cfg.grid
    out: dict[str, Any] = {
        "sim_method": method,
        "sim_rounds_to_1e9": None,
        "rounds_vs_sim": None,
        "sim_note": None,
    }
    if method not in methods:
        out["sim_note"] = f"averaging_sim.py has no method {method!r} here"
        return out
    # (the auto method sizes its groups from N; the grid argument is only a placeholder there)
    grid = Grid.parse(grid_text) if grid_text is not None else Grid((cfg.peers,))
    variances = sim.run(method, cfg.peers, cfg.fail, grid, cfg.seed, rounds=sim.CAP, stop=None)
    ref = sim.rounds_to(variances / variances[0], THRESHOLD)
    out["sim_rounds_to_1e9"] = ref
    if cfg.fail > 0:
        out["sim_note"] = "the simulation's failures are absences, not deaths: no ratio"
    elif ref is not None and rounds is not None:
        out["rounds_vs_sim"] = rounds / ref
    return out


# --------------------------------------------------------------------------------------------


def _count_library_warnings() -> dict[str, int]:
    """Count the library's warnings and errors by event (shown on stderr too); drop the rest
    (every peer logs every round at info)."""
    counts: dict[str, int] = {}
    renderer = structlog.dev.ConsoleRenderer(colors=False)

    def count(logger: Any, method: str, event: dict[str, Any]) -> Any:
        name = f"{method}: {event.get('event')}"
        counts[name] = counts.get(name, 0) + 1
        return renderer(logger, method, event)

    structlog.configure(
        processors=[count],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return counts


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(r: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    print(
        f"{r['peers']} peers, grid {r['grid']}, fail {r['fail']:g}, seed {r['seed']}; "
        f"in-memory network, {r['latency_ms']:g} ms links, virtual time (MockClock); "
        f"round_period {r['period']:g} s, step timeout {r['timeout']:g} s",
        file=out,
    )
    print(
        f"{'round':>5} {'live':>5} {'kill':>4} {'var_global':>10} {'var_live':>10} "
        f"{'groups':>6} {'min/mean/max':>14} {'solo':>4} {'fail':>4} "
        f"{'msgs out/in':>13} {'kB out/in':>15} {'dials':>5} "
        f"{'step_s':>6} {'mm_s':>5} {'wall_s':>6}",
        file=out,
    )
    for row in r["rows"]:
        sizes = (
            f"{row['group_min']}/{row['group_mean']:.1f}/{row['group_max']}"
            if row["group_min"] is not None
            else "-"
        )
        print(
            f"{row['index']:>5} {row['live']:>5} {row['killed']:>4} "
            f"{_fmt(row['var_global'], '10.2e')} {_fmt(row['var_live'], '10.2e')} "
            f"{row['groups']:>6} {sizes:>14} {row['solo']:>4} {row['failed']:>4} "
            f"{row['msgs_sent']:>6.0f}/{row['msgs_received']:<6.0f} "
            f"{row['bytes_sent'] / 1e3:>7.1f}/{row['bytes_received'] / 1e3:<7.1f} "
            f"{row['dials']:>5.1f} "
            f"{_fmt(row['step_s'], '6.2f')} {_fmt(row['matchmaking_s'], '5.2f')} "
            f"{row['wall_s']:>6.1f}",
            file=out,
        )
        if row["missing"]:
            print(f"      {row['missing']} live peers had not reported this round", file=out)
    sim = (
        f"{r['sim_method']} simulation: {_fmt(r['sim_rounds_to_1e9'], 'd')}"
        + (f", ratio {r['rounds_vs_sim']:.2f}" if r["rounds_vs_sim"] is not None else "")
        + (f" ({r['sim_note']})" if r["sim_note"] else "")
    )
    print(
        f"rounds to 1e-9: {_fmt(r['rounds_to_1e9'], 'd')} (around the initial mean), "
        f"{_fmt(r['rounds_to_1e9_live'], 'd')} (agreement); {sim}",
        file=out,
    )
    print(
        f"solo steps {r['solo_rounds']}, failed steps {r['failed_rounds']}, killed "
        f"{r['killed']}; connections per live peer at the end {r['connections_per_peer']:.1f}",
        file=out,
    )
    print(
        f"wall {r['wall_s']:.1f} s (build {r['build_wall_s']:.1f} s), virtual "
        f"{r['virtual_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB",
        file=out,
    )
    if r["library_warnings"]:
        print(f"library warnings: {r['library_warnings']}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=256, help="peers (default 256)")
    parser.add_argument("--rounds", type=int, default=6, help="averaging rounds (default 6)")
    parser.add_argument(
        "--fail",
        type=float,
        default=0.0,
        help="each live peer killed with this probability each round (default 0)",
    )
    parser.add_argument(
        "--grid", default="auto", help='"auto" (default) or an explicit shape like 16x16'
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=1, help="values per peer (default 1)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="one-way link latency")
    parser.add_argument("--period", type=float, default=10.0, help="round_period, seconds")
    parser.add_argument("--timeout", type=float, default=8.0, help="step timeout, seconds")
    parser.add_argument(
        "--balanced-keys",
        action="store_true",
        help="explicit grid: peer i starts at key i mod K (balanced_initial_keys) instead of "
        "the key its PeerID gives",
    )
    parser.add_argument(
        "--join-batch",
        type=int,
        default=32,
        help="peers that join at once during the build (default 32; 1: one at a time)",
    )
    parser.add_argument("--gc", choices=["tuned", "default"], default="tuned", dest="gc_mode")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    cfg = Config(
        peers=args.peers,
        rounds=args.rounds,
        fail=args.fail,
        grid=args.grid,
        seed=args.seed,
        dim=args.dim,
        latency_ms=args.latency_ms,
        period=args.period,
        timeout=args.timeout,
        gc_mode=args.gc_mode,
        balanced_keys=args.balanced_keys,
        join_batch=args.join_batch,
    )
    warnings = _count_library_warnings()
    result = run(cfg)
    result["library_warnings"] = warnings
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
