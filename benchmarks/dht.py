"""DHT at scale: stores and gets across a swarm, with churn or frozen peers.

A swarm of ``--nodes`` peers (default 256) on the in-memory network (``moshpit_trio.testing``:
the real websocket, handshake, envelope and DHT code over simulated links) runs under
``trio.testing.MockClock``, so every latency it reports is *virtual* time: what the protocol
would take on links of ``--latency-ms`` one-way delay (default 20 ms, each link drawn within
``--jitter-ms`` of it), independent of how fast this machine is. Wall seconds are reported too.
With ``--real`` the peers (default 32) run on real loopback websockets (127.0.0.1 only) in
``--procs`` OS processes driven by this one, and latencies are real milliseconds.

The run:

1. Build: peers join one at a time, each bootstrapping from up to three random live peers.
2. ``--rounds`` rounds (default 5) of ``--round-s`` seconds each. In every round, random live
   peers store ``--keys`` keys under ``bench/...`` with ``--subkeys`` explicit subkeys (one
   writer per subkey) and ``--owned`` keys under the owned namespace ``mp.avg/...`` (each
   written by ``--subkeys`` owners, the subkey being the owner's PeerID); when the stores are
   done, ``--readers`` other peers read each new key back, and ``--reread`` keys from earlier
   rounds are read again. A get succeeds when every subkey whose store succeeded comes back
   with the value written (a store succeeds when at least one *other* peer accepted it; the
   writer's own copy does not count).
3. Faults begin with round 1 (round 0 is the baseline) and are spread over rounds 1.. at random
   times in the first three quarters of each round, while stores and gets run:
   ``--churn F`` kills ``F x nodes`` peers (the in-memory network resets every connection of the
   host, the peer's tasks are cancelled: a crash, not a goodbye) and starts as many new ones,
   with new identities, bootstrapping from random live peers; ``--freeze F`` instead freezes
   ``F x nodes`` peers: alive, connections open, silent. In ``--real`` mode the unit of failure
   is a whole process (SIGKILL, then a fresh process with new peers; or SIGSTOP for freezing),
   so the fraction is rounded to whole processes and the actual one is reported.
   Peers never issue operations while a fault is pending on them (an operation lost with its
   issuer says nothing about the DHT), and each peer runs one operation at a time, so the
   ``hops`` read from ``peer.dht.last_lookup`` right after a get belong to that get.

Output: a table per round, then totals and targets; ``--json`` prints one JSON object instead:
``nodes``, ``churn``, ``freeze``, ``mode``, ``latency_ms``, ``store_success``, ``get_success``,
``get_success_after_churn`` (gets of keys stored after the faults began, i.e. in rounds >= 1;
null without faults), ``get_p50_ms`` / ``get_p99_ms`` (every get, failed ones included, at the
time they took to fail), ``get_p50_ms_faulty`` / ``get_p99_ms_faulty`` (gets issued once the
faults began), ``get_p50_ms_baseline`` (round 0's gets, before any fault) and
``faulty_vs_baseline`` (the first over the second), ``mean_hops``, ``wall_s``, ``rounds`` (per
round) and ``targets``, each with its value, limit and an honest ``pass``. ``--out FILE``
also writes that object to FILE.

Targets: ``get_success >= 0.99``; ``mean_hops <= log2(nodes)``; with churn,
``get_success_after_churn >= 0.99``; with freezing, ``get_p50_ms_faulty < 1000`` and
``faulty_vs_baseline <= 1.1`` (frozen peers cost a lookup at most a moment).

Wall time: the in-memory swarm keeps hundreds of thousands of live objects, which CPython's
default collector thresholds rescan over and over (measured: 73 s against 55 s for 256 peers and
one round). By default the benchmark therefore freezes what exists after start-up and raises
the first generation's threshold (``--gc tuned``); ``--gc default`` keeps CPython's settings.
Virtual-time results do not depend on it. ``--profile FILE`` writes a cProfile dump.

    python benchmarks/dht.py                       # 256 peers, no faults
    python benchmarks/dht.py --churn 0.3
    python benchmarks/dht.py --freeze 0.3 --json
    python benchmarks/dht.py --real                # 32 peers in 4 processes on 127.0.0.1
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import structlog  # noqa: E402
import trio  # noqa: E402
import trio.testing  # noqa: E402

from moshpit_trio.dht.node import DHTSettings, DHTValue  # noqa: E402
from moshpit_trio.errors import MoshpitError  # noqa: E402
from moshpit_trio.identity import Identity  # noqa: E402
from moshpit_trio.peer import Peer, open_peer  # noqa: E402
from moshpit_trio.testing import MemoryNetwork, pin_unix_time  # noqa: E402

UNOWNED_TTL = 3600.0
OWNED_TTL = 300.0  # the mp.avg namespace's cap
BOOTSTRAP_PEERS = 3
FAULT_SPAN = 0.75  # faults land in the first three quarters of a round
STORE_SPAN = 0.4  # stores start in the first 40% of a round
GET_START, GET_END = 0.5, 0.9  # gets start in this part of the round (after the stores)
_CHILD_DEADLINE = 900.0  # a child process ends itself after this long, whatever the parent does
_OP_TIMEOUT = 60.0  # real mode: the parent gives up on one operation after this long
_SCRIPT = str(Path(__file__).resolve())


@dataclasses.dataclass
class Config:
    nodes: int = 256
    rounds: int = 5
    churn: float = 0.0
    freeze: float = 0.0
    seed: int = 0
    latency_ms: float = 20.0
    jitter_ms: float = 5.0
    round_s: float = 20.0
    keys: int = 16
    owned: int = 8
    subkeys: int = 3
    readers: int = 2
    reread: int = 16
    value_size: int = 64
    real: bool = False
    procs: int = 4
    gc_mode: str = "tuned"

    def check(self) -> None:
        if self.nodes < 2:
            raise SystemExit("--nodes must be at least 2")
        if self.rounds < 1:
            raise SystemExit("--rounds must be at least 1")
        if not (0 <= self.churn < 1 and 0 <= self.freeze < 1):
            raise SystemExit("--churn and --freeze are fractions in [0, 1)")
        if self.churn and self.freeze:
            raise SystemExit("--churn and --freeze are separate experiments; pick one")
        if (self.churn or self.freeze) and self.rounds < 2:
            raise SystemExit("faults begin with round 1: use --rounds 2 or more")
        if self.subkeys < 1 or self.readers < 0 or self.keys < 0 or self.owned < 0:
            raise SystemExit("--subkeys must be >= 1; --keys, --owned, --readers >= 0")
        if self.real and not 1 <= self.procs <= self.nodes:
            raise SystemExit("--procs must be between 1 and --nodes")


# --------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class StoreResult:
    remote: int  # replicas on other peers that accepted it
    ms: float
    subkey: bytes
    error: str | None = None


@dataclasses.dataclass
class GetResult:
    found: dict[bytes, bytes] | None
    ms: float
    hops: int
    queried: int
    error: str | None = None


@dataclasses.dataclass
class Op:
    kind: str  # "store" | "get"
    round: int
    key_round: int
    owned: bool
    ok: bool
    ms: float
    hops: int = 0
    queried: int = 0
    replicas: int = 0
    wrong: bool = False  # a get that found a value other than the one written
    error: str | None = None


@dataclasses.dataclass
class RoundInfo:
    round: int
    live: int = 0
    killed: int = 0
    joined: int = 0
    frozen: int = 0
    join_failed: int = 0
    started_at: float = 0.0
    seconds: float = 0.0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    # nearest rank: the smallest value with at least q of the values at or below it
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _rate(ops: list[Op]) -> float | None:
    return sum(o.ok for o in ops) / len(ops) if ops else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------
# Drivers: where the peers live. Both expose the same calls to the workload.


@dataclasses.dataclass(eq=False)
class Slot:
    """One peer of the run (dead ones stay, marked)."""

    index: int
    name: str
    unit: int  # the failure unit: the peer itself in memory, its process in real mode
    peer_id: bytes = b""
    address: str = ""
    ready: bool = False
    dead: bool = False
    frozen: bool = False
    busy: bool = False
    lock: trio.Lock = dataclasses.field(default_factory=trio.Lock)
    # memory mode
    peer: Peer | None = None
    scope: trio.CancelScope | None = None


def _identity(seed: int, index: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(f"moshpit-bench/{seed}/{index}".encode()).digest())


class MemoryDriver:
    """Peers in this process on a ``MemoryNetwork``; time is trio's (virtual under MockClock)."""

    unit_size = 1

    def __init__(self, cfg: Config, nursery: trio.Nursery) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.net = MemoryNetwork(seed=cfg.seed, latency=cfg.latency_ms / 1000)
        self.slots: list[Slot] = []
        self.settings = DHTSettings()
        self._link_rng = random.Random(f"links/{cfg.seed}")

    async def join(self, bootstrap: list[Slot]) -> Slot | None:
        index = len(self.slots)
        slot = Slot(index, f"h{index}", unit=index)
        self.slots.append(slot)
        jitter = self.cfg.jitter_ms / 1000
        if jitter:
            base = self.cfg.latency_ms / 1000
            for other in self.slots[:-1]:
                if not other.dead:
                    latency = max(0.0, base + self._link_rng.uniform(-jitter, jitter))
                    self.net.set_link(slot.name, other.name, latency=latency)
        try:
            slot.peer = await self.nursery.start(
                self._run_peer, slot, [b.address for b in bootstrap]
            )
        except MoshpitError:
            slot.dead = True
            self.net.kill(slot.name)
            return None
        slot.peer_id = slot.peer.id.to_bytes()
        slot.address = str(slot.peer.address)
        slot.ready = True
        return slot

    async def _run_peer(
        self, slot: Slot, bootstrap: list[str], *, task_status: trio.TaskStatus[Peer]
    ) -> None:
        with trio.CancelScope() as scope:
            slot.scope = scope
            async with open_peer(
                _identity(self.cfg.seed, slot.index),
                listen=f"{slot.name}:0",
                network=self.net.host(slot.name),
                bootstrap=bootstrap,
                dht=self.settings,
            ) as peer:
                task_status.started(peer)
                await trio.sleep_forever()

    async def kill_unit(self, unit: int) -> list[Slot]:
        slot = self.slots[unit]
        slot.dead = True
        self.net.kill(slot.name)
        if slot.scope is not None:
            slot.scope.cancel()
        return [slot]

    async def replace_unit(self, unit: int, bootstrap: Callable[[], list[Slot]]) -> list[Slot]:
        new = await self.join(bootstrap())
        return [new] if new is not None else []

    async def freeze_unit(self, unit: int) -> list[Slot]:
        slot = self.slots[unit]
        slot.frozen = True
        self.net.freeze(slot.name)
        return [slot]

    async def store(
        self, slot: Slot, key: str, value: bytes, ttl: float, subkey: bytes | None
    ) -> StoreResult:
        assert slot.peer is not None
        dht = slot.peer.dht
        start = trio.current_time()
        try:
            n = await dht.store(key, value, ttl, subkey=subkey)
            error = None
        except MoshpitError as exc:
            n, error = 0, f"{type(exc).__name__}: {exc}"
        ms = (trio.current_time() - start) * 1000
        # store() counts this peer's own copy too (a listening peer always keeps one)
        return StoreResult(max(0, n - 1), ms, subkey if subkey is not None else slot.peer_id, error)

    async def get(self, slot: Slot, key: str) -> GetResult:
        assert slot.peer is not None
        dht = slot.peer.dht
        start = trio.current_time()
        try:
            got = await dht.get(key)
        except MoshpitError as exc:
            # no checkpoint since the lookup ended: last_lookup is this get's
            stats = dht.last_lookup
            ms = (trio.current_time() - start) * 1000
            return GetResult(None, ms, stats.hops, stats.queried, f"{type(exc).__name__}: {exc}")
        stats = dht.last_lookup
        ms = (trio.current_time() - start) * 1000
        return GetResult(_flatten(got), ms, stats.hops, stats.queried)

    def now(self) -> float:
        return trio.current_time()

    def connects(self) -> int:
        """Connections dialed so far, across the whole network."""
        return sum(s.connects for s in self.net.stats().values())

    async def close(self) -> None:
        # Crash everyone first: a graceful goodbye from hundreds of peers only costs wall time.
        for slot in self.slots:
            if not slot.dead:
                self.net.kill(slot.name)


def _flatten(got: DHTValue | dict[bytes, DHTValue] | None) -> dict[bytes, bytes] | None:
    if got is None:
        return None
    if isinstance(got, DHTValue):
        return {b"": got.value}
    return {sk: v.value for sk, v in got.items()}


# --------------------------------------------------------------------------------------------
# The workload, the same in both modes


@dataclasses.dataclass
class KeyRecord:
    key: str
    round: int
    owned: bool
    expected: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    writers: set[int] = dataclasses.field(default_factory=set)


class Workload:
    def __init__(self, cfg: Config, driver: Any) -> None:
        self.cfg = cfg
        self.driver = driver
        self.rng = random.Random(f"workload/{cfg.seed}")
        self.ops: list[Op] = []
        self.rounds: list[RoundInfo] = []
        self.keys: list[KeyRecord] = []
        self.victims: set[int] = set()  # units with a fault pending or done
        self.build_s = 0.0
        self.build_join_failed = 0

    # -- choosing peers ----------------------------------------------------------------------

    def live(self) -> list[Slot]:
        return [s for s in self.driver.slots if s.ready and not s.dead and not s.frozen]

    def eligible(self, exclude: set[int]) -> list[Slot]:
        return [
            s
            for s in self.live()
            if s.unit not in self.victims and s.index not in exclude and not s.busy
        ]

    def pick(self, exclude: set[int]) -> Slot:
        for candidates in (
            self.eligible(exclude),
            [s for s in self.live() if s.unit not in self.victims and s.index not in exclude],
            [s for s in self.live() if s.unit not in self.victims],
        ):
            if candidates:
                return self.rng.choice(candidates)
        raise RuntimeError("no live peer left to issue operations")

    def bootstrap_for(self) -> list[Slot]:
        live = [s for s in self.live() if s.unit not in self.victims] or self.live()
        return self.rng.sample(live, min(BOOTSTRAP_PEERS, len(live)))

    # -- phases ------------------------------------------------------------------------------

    async def build(self) -> None:
        start = time.perf_counter()
        while len(self.live()) < self.cfg.nodes:
            if await self.driver.join(self.bootstrap_for()) is None:
                self.build_join_failed += 1
                if self.build_join_failed > self.cfg.nodes:
                    raise RuntimeError("the swarm could not be built: joins keep failing")
        self.build_s = time.perf_counter() - start

    def fault_plan(self) -> list[int]:
        """How many failure units get the fault in each round (0 in round 0)."""
        fraction = self.cfg.churn or self.cfg.freeze
        plan = [0] * self.cfg.rounds
        if not fraction:
            return plan
        units = max(1, round(fraction * self.cfg.nodes / self.driver.unit_size))
        spread = self.cfg.rounds - 1
        done = 0
        for r in range(1, self.cfg.rounds):
            cum = math.ceil(units * r / spread)
            plan[r] = cum - done
            done = cum
        return plan

    async def run(self) -> None:
        plan = self.fault_plan()
        for r in range(self.cfg.rounds):
            await self.round(r, plan[r])

    async def round(self, r: int, faults: int) -> None:
        cfg = self.cfg
        d = self.driver
        info = RoundInfo(r, started_at=d.now())
        self.rounds.append(info)
        t0 = d.now()
        units = sorted({s.unit for s in self.live() if s.unit not in self.victims})
        chosen = self.rng.sample(units, min(faults, max(0, len(units) - 1)))
        self.victims.update(chosen)
        fault_times = sorted(self.rng.uniform(0, FAULT_SPAN * cfg.round_s) for _ in chosen)
        new_keys: list[KeyRecord] = []
        for j in range(cfg.keys):
            new_keys.append(KeyRecord(f"bench/{cfg.seed}/r{r}/k{j}", r, owned=False))
        for j in range(cfg.owned):
            new_keys.append(KeyRecord(f"mp.avg/bench/{cfg.seed}/r{r}/g{j}", r, owned=True))

        async def at(offset: float, fn: Callable[[], Awaitable[None]]) -> None:
            await _sleep_until(d, t0 + offset)
            await fn()

        async def fault(unit: int) -> None:
            if cfg.churn:
                killed = await d.kill_unit(unit)
                info.killed += len(killed)
                joined = await d.replace_unit(unit, self.bootstrap_for)
                info.joined += len(joined)
                info.join_failed += len(killed) - len(joined)
            else:
                info.frozen += len(await d.freeze_unit(unit))

        async with trio.open_nursery() as faults_nursery:
            for unit, t in zip(chosen, fault_times, strict=True):
                faults_nursery.start_soon(at, t, _bind(fault, unit))
            # stores
            async with trio.open_nursery() as nursery:
                for rec in new_keys:
                    for i in range(cfg.subkeys):
                        offset = self.rng.uniform(0, STORE_SPAN * cfg.round_s)
                        nursery.start_soon(at, offset, _bind(self.store, rec, i))
            self.keys.extend(new_keys)
            # gets of this round's keys, then of earlier ones
            reads: list[KeyRecord] = []
            for rec in new_keys:
                if rec.expected:
                    reads.extend([rec] * cfg.readers)
            older = [k for k in self.keys if k.round < r and k.expected]
            reads.extend(self.rng.sample(older, min(cfg.reread, len(older))))
            async with trio.open_nursery() as nursery:
                for rec in reads:
                    offset = self.rng.uniform(GET_START * cfg.round_s, GET_END * cfg.round_s)
                    nursery.start_soon(at, offset, _bind(self.get, rec, r))
        await _sleep_until(d, t0 + cfg.round_s)
        info.live = len(self.live())
        info.seconds = d.now() - t0

    async def store(self, rec: KeyRecord, i: int) -> None:
        slot = self.pick(exclude=rec.writers)
        rec.writers.add(slot.index)
        value = f"{rec.key}#{i}:".encode() + self.rng.randbytes(self.cfg.value_size)
        subkey = None if rec.owned else f"s{i}".encode()
        ttl = OWNED_TTL if rec.owned else UNOWNED_TTL
        async with _exclusive(slot):
            res = await self.driver.store(slot, rec.key, value, ttl, subkey)
        ok = res.error is None and res.remote >= 1
        if ok:
            rec.expected[res.subkey] = value
        self.ops.append(
            Op("store", rec.round, rec.round, rec.owned, ok, res.ms, replicas=res.remote,
               error=res.error)
        )  # fmt: skip

    async def get(self, rec: KeyRecord, r: int) -> None:
        slot = self.pick(exclude=rec.writers)
        async with _exclusive(slot):
            res = await self.driver.get(slot, rec.key)
        found = res.found or {}
        missing = [sk for sk in rec.expected if sk not in found]
        wrong = any(found[sk] != v for sk, v in rec.expected.items() if sk in found)
        ok = res.error is None and not missing and not wrong
        error = res.error
        if error is None and not ok:
            error = "wrong value" if wrong else f"{len(missing)} of {len(rec.expected)} missing"
        self.ops.append(
            Op("get", r, rec.round, rec.owned, ok, res.ms, hops=res.hops, queried=res.queried,
               wrong=wrong, error=error)
        )  # fmt: skip


def _bind(fn: Callable[..., Awaitable[None]], *args: Any) -> Callable[[], Awaitable[None]]:
    return lambda: fn(*args)


@contextlib.asynccontextmanager
async def _exclusive(slot: Slot) -> Any:
    async with slot.lock:
        slot.busy = True
        try:
            yield
        finally:
            slot.busy = False


async def _sleep_until(driver: Any, when: float) -> None:
    delay = when - driver.now()
    if delay > 0:
        await trio.sleep(delay)


# --------------------------------------------------------------------------------------------
# Summary


def summarize(cfg: Config, work: Workload, wall_s: float, extra: dict[str, Any]) -> dict[str, Any]:
    stores = [o for o in work.ops if o.kind == "store"]
    gets = [o for o in work.ops if o.kind == "get"]
    faulty = bool(cfg.churn or cfg.freeze)
    gets_after = [o for o in gets if o.key_round >= 1] if faulty else []
    gets_faulty = [o for o in gets if o.round >= 1] if faulty else []
    get_ms = [o.ms for o in gets]
    faulty_ms = [o.ms for o in gets_faulty]
    baseline_ms = [o.ms for o in gets if o.round == 0]
    killed = sum(ri.killed for ri in work.rounds)
    frozen = sum(ri.frozen for ri in work.rounds)
    errors: dict[str, int] = {}
    for o in work.ops:
        if o.error:
            kind = f"{o.kind}: {o.error.split(':')[0]}"
            errors[kind] = errors.get(kind, 0) + 1
    per_round = []
    for ri in work.rounds:
        rs = [o for o in stores if o.round == ri.round]
        rg = [o for o in gets if o.round == ri.round]
        per_round.append(
            {
                "round": ri.round,
                "live": ri.live,
                "killed": ri.killed,
                "joined": ri.joined,
                "join_failed": ri.join_failed,
                "frozen": ri.frozen,
                "stores": len(rs),
                "store_success": _rate(rs),
                "gets": len(rg),
                "get_success": _rate(rg),
                "get_p50_ms": _percentile([o.ms for o in rg], 0.5),
                "get_p99_ms": _percentile([o.ms for o in rg], 0.99),
                "mean_hops": _mean([o.hops for o in rg]),
                "seconds": ri.seconds,
            }
        )
    result: dict[str, Any] = {
        "mode": "real" if cfg.real else "memory",
        "time": "wall" if cfg.real else "virtual",
        "nodes": cfg.nodes,
        "churn": cfg.churn,
        "freeze": cfg.freeze,
        "churn_actual": killed / cfg.nodes,
        "freeze_actual": frozen / cfg.nodes,
        "latency_ms": None if cfg.real else cfg.latency_ms,
        "jitter_ms": None if cfg.real else cfg.jitter_ms,
        "rounds_count": cfg.rounds,
        "round_s": cfg.round_s,
        "seed": cfg.seed,
        "stores": len(stores),
        "store_success": _rate(stores),
        "store_replicas_mean": _mean([o.replicas for o in stores]),
        "store_p50_ms": _percentile([o.ms for o in stores], 0.5),
        "gets": len(gets),
        "get_success": _rate(gets),
        "get_success_before_churn": _rate([o for o in gets if o.key_round == 0])
        if faulty
        else None,
        "get_success_after_churn": _rate(gets_after) if faulty else None,
        "gets_after_churn": len(gets_after),
        "get_wrong_values": sum(o.wrong for o in gets),
        "get_p50_ms": _percentile(get_ms, 0.5),
        "get_p99_ms": _percentile(get_ms, 0.99),
        "get_p50_ms_faulty": _percentile(faulty_ms, 0.5),
        "get_p99_ms_faulty": _percentile(faulty_ms, 0.99),
        # round 0, before any fault: the same run's own no-fault reference
        "get_p50_ms_baseline": _percentile(baseline_ms, 0.5) if faulty else None,
        "faulty_vs_baseline": _ratio(
            _percentile(faulty_ms, 0.5), _percentile(baseline_ms, 0.5) if faulty else None
        ),
        "get_max_ms": max(get_ms, default=None),
        "mean_hops": _mean([o.hops for o in gets]),
        "max_hops": max((o.hops for o in gets), default=None),
        "mean_queried": _mean([o.queried for o in gets]),
        "killed": killed,
        "joined": sum(ri.joined for ri in work.rounds),
        "join_failed": sum(ri.join_failed for ri in work.rounds) + work.build_join_failed,
        "frozen": frozen,
        "errors": errors,
        "build_wall_s": work.build_s,
        "wall_s": wall_s,
        "rounds": per_round,
        **extra,
    }
    result["targets"] = _targets(cfg, result)
    return result


def _target(value: float | None, limit: float, op: str) -> dict[str, Any]:
    if value is None:
        passed = False
    elif op == ">=":
        passed = value >= limit
    elif op == "<=":
        passed = value <= limit
    else:
        passed = value < limit
    return {"value": value, "limit": limit, "op": op, "pass": passed}


def _targets(cfg: Config, r: dict[str, Any]) -> dict[str, Any]:
    t = {
        "get_success": _target(r["get_success"], 0.99, ">="),
        "mean_hops": _target(r["mean_hops"], math.log2(cfg.nodes), "<="),
    }
    if cfg.churn:
        t["get_success_after_churn"] = _target(r["get_success_after_churn"], 0.99, ">=")
    if cfg.freeze:
        t["get_p50_ms_faulty"] = _target(r["get_p50_ms_faulty"], 1000.0, "<")
        t["faulty_vs_baseline"] = _target(r["faulty_vs_baseline"], 1.1, "<=")
    return t


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def print_table(r: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout
    unit = "virtual ms" if r["mode"] == "memory" else "wall ms"
    if r["mode"] == "memory":
        where = (
            f"in-memory network, virtual time (MockClock), {r['latency_ms']:g} ms one-way "
            f"latency ± {r['jitter_ms']:g} ms"
        )
    else:
        where = f"real loopback websockets, {r['procs']} processes, wall-clock time"
    fault = (
        f"churn {r['churn']:g} (actual {r['churn_actual']:.3f})"
        if r["churn"]
        else f"freeze {r['freeze']:g} (actual {r['freeze_actual']:.3f})"
        if r["freeze"]
        else "no faults"
    )
    print(f"DHT benchmark: {r['nodes']} peers, {where}; {fault}; seed {r['seed']}", file=out)
    print(f"latencies in {unit}", file=out)
    header = (
        f"{'round':>5} {'live':>5} {'killed':>6} {'joined':>6} {'frozen':>6} {'stores':>7} "
        f"{'store ok':>8} {'gets':>5} {'get ok':>7} {'p50':>8} {'p99':>8} {'hops':>5}"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for row in r["rounds"]:
        print(
            f"{row['round']:>5} {row['live']:>5} {row['killed']:>6} {row['joined']:>6} "
            f"{row['frozen']:>6} {row['stores']:>7} {_fmt(row['store_success'], '.3f'):>8} "
            f"{row['gets']:>5} {_fmt(row['get_success'], '.3f'):>7} "
            f"{_fmt(row['get_p50_ms']):>8} {_fmt(row['get_p99_ms']):>8} "
            f"{_fmt(row['mean_hops'], '.2f'):>5}",
            file=out,
        )
    print("-" * len(header), file=out)
    lines = [
        ("stores", f"{r['stores']}, success {_fmt(r['store_success'], '.4f')}, "
         f"{_fmt(r['store_replicas_mean'], '.2f')} remote replicas on average, "
         f"p50 {_fmt(r['store_p50_ms'])} ms"),
        ("gets", f"{r['gets']}, success {_fmt(r['get_success'], '.4f')}, "
         f"p50 {_fmt(r['get_p50_ms'])} ms, p99 {_fmt(r['get_p99_ms'])} ms, "
         f"max {_fmt(r['get_max_ms'])} ms, wrong values {r['get_wrong_values']}"),
    ]  # fmt: skip
    if r["churn"] or r["freeze"]:
        lines.append(
            (
                "after faults",
                f"keys stored after faults began: {r['gets_after_churn']} gets, success "
                f"{_fmt(r['get_success_after_churn'], '.4f')} (keys stored before: "
                f"{_fmt(r['get_success_before_churn'], '.4f')}); gets issued during faults: "
                f"p50 {_fmt(r['get_p50_ms_faulty'])} ms, p99 {_fmt(r['get_p99_ms_faulty'])} ms "
                f"({_fmt(r['faulty_vs_baseline'], '.2f')}x round 0's p50, "
                f"{_fmt(r['get_p50_ms_baseline'])} ms)",
            )
        )
    lines += [
        ("lookups", f"mean hops {_fmt(r['mean_hops'], '.2f')} (max {_fmt(r['max_hops'])}), "
         f"{_fmt(r['mean_queried'], '.1f')} peers queried per get"),
        ("peers", f"killed {r['killed']}, joined {r['joined']}, frozen {r['frozen']}, "
         f"failed joins {r['join_failed']}"),
    ]  # fmt: skip
    if r["errors"]:
        lines.append(("errors", ", ".join(f"{k} x{v}" for k, v in sorted(r["errors"].items()))))
    warned = r.get("library_warnings")
    if warned:
        text = ", ".join(f"{k} x{v}" for k, v in sorted(warned.items(), key=lambda kv: -kv[1]))
        lines.append(("log", text))
    wall = f"{r['wall_s']:.1f} s (building the swarm {r['build_wall_s']:.1f} s)"
    if r["mode"] == "memory":
        wall += f"; {r['virtual_s']:.1f} s of virtual time; gc {r['gc']}"
        lines.append(
            (
                "connections",
                f"{r['connects_build']} dialed while building, {r['connects_rounds']} during the "
                f"rounds; {r['connections_per_peer_end']:.1f} open per live peer at the end",
            )
        )
    lines.append(("wall", wall))
    for name, text in lines:
        print(f"{name + ':':<14}{text}", file=out)
    for name, t in r["targets"].items():
        verdict = "PASS" if t["pass"] else "FAIL"
        print(
            f"{'target:':<14}{name} {t['op']} {t['limit']:.4g}: {_fmt(t['value'], '.4g')} "
            f"{verdict}",
            file=out,
        )


# --------------------------------------------------------------------------------------------
# In-memory mode


async def memory_benchmark(cfg: Config) -> dict[str, Any]:
    """Run the in-memory benchmark in the current trio run (use a MockClock for virtual time)
    and return the result object that ``--json`` prints."""
    cfg.check()
    pin_unix_time()  # record expiry is Unix time: tied to the virtual clock, a seed repeats
    wall0 = time.perf_counter()
    virtual0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        driver = MemoryDriver(cfg, nursery)
        work = Workload(cfg, driver)
        try:
            await work.build()
            connects_build = driver.connects()
            await work.run()
            connects_run = driver.connects() - connects_build
            live = [s.peer for s in work.live() if s.peer is not None]
            per_peer = sum(len(p.transport.connections()) for p in live) / max(1, len(live))
        finally:
            await driver.close()
            nursery.cancel_scope.cancel()
    wall_s = time.perf_counter() - wall0
    extra = {
        "virtual_s": trio.current_time() - virtual0,
        "gc": cfg.gc_mode,
        # every connection costs a websocket upgrade and a handshake (2 signatures, 2 checks,
        # an X25519 exchange on each side)
        "connects_build": connects_build,
        "connects_rounds": connects_run,
        "connections_per_peer_end": per_peer,
    }
    return summarize(cfg, work, wall_s, extra)


def _seed_trio_scheduler(seed: int) -> None:
    """trio reverses each batch of ready tasks at random (an unseeded generator, on purpose);
    seeding it makes runs repeat more closely. Private to trio, so only where it exists;
    deadline ties can still fall either way, so runs are close, not always identical."""
    r = getattr(getattr(trio, "_core", None), "_run", None)
    rng = getattr(r, "_r", None)
    if isinstance(rng, random.Random):
        rng.seed(f"trio/{seed}")


def run_memory(cfg: Config, profile: Path | None = None) -> dict[str, Any]:
    if cfg.gc_mode == "tuned":
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
    _seed_trio_scheduler(cfg.seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    if profile is None:
        return trio.run(memory_benchmark, cfg, clock=clock)
    prof = cProfile.Profile()
    try:
        return prof.runcall(trio.run, memory_benchmark, cfg, clock=clock)  # type: ignore[no-any-return]
    finally:
        prof.dump_stats(profile)


# --------------------------------------------------------------------------------------------
# Real mode: the parent drives --procs child processes over JSON lines on stdin/stdout


class Child:
    """One child process and its request/response bookkeeping (parent side)."""

    def __init__(self, unit: int, process: trio.Process, errlog: Any) -> None:
        self.unit = unit
        self.process = process
        self.errlog = errlog
        self.pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self.send_lock = trio.Lock()
        self.dead = False
        self.stopped = False

    async def reader(self) -> None:
        buf = b""
        assert self.process.stdout is not None
        try:
            while True:
                data = await self.process.stdout.receive_some(65536)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    waiter = self.pending.pop(msg["id"], None)
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.dead = True
            for event, holder in self.pending.values():
                holder.append({"error": "the child process ended"})
                event.set()
            self.pending.clear()

    async def request(self, rid: int, timeout: float, **fields: Any) -> dict[str, Any]:
        if self.dead:
            return {"error": "the child process ended"}
        event, holder = trio.Event(), []
        self.pending[rid] = (event, holder)
        line = json.dumps({"id": rid, **fields}).encode() + b"\n"
        try:
            async with self.send_lock:
                assert self.process.stdin is not None
                await self.process.stdin.send_all(line)
            with trio.fail_after(timeout):
                await event.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.pending.pop(rid, None)
            return {"error": "the child process ended"}
        except trio.TooSlowError:
            self.pending.pop(rid, None)
            return {"error": f"TimeoutError: no answer in {timeout:g} s"}
        reply: dict[str, Any] = holder[0]
        return reply


class RealDriver:
    """Peers in child processes on real loopback websockets; time is wall-clock."""

    def __init__(self, cfg: Config, nursery: trio.Nursery, tmpdir: str) -> None:
        self.cfg = cfg
        self.nursery = nursery
        self.tmpdir = tmpdir
        self.slots: list[Slot] = []
        self.children: dict[int, Child] = {}
        self.unit_size = math.ceil(cfg.nodes / cfg.procs)
        self._ids = iter(range(1, 1 << 62))
        self._next_unit = 0

    def now(self) -> float:
        return trio.current_time()

    async def spawn(self) -> Child:
        unit = self._next_unit
        self._next_unit += 1
        errlog = open(os.path.join(self.tmpdir, f"child{unit}.log"), "wb")  # noqa: ASYNC230, SIM115
        process = await trio.lowlevel.open_process(
            [sys.executable, _SCRIPT, "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            cwd=str(ROOT),
        )
        child = Child(unit, process, errlog)
        self.children[unit] = child
        self.nursery.start_soon(child.reader)
        return child

    async def start_procs(self) -> None:
        for _ in range(self.cfg.procs):
            await self.spawn()

    def _unit_for_new_slot(self) -> int:
        live_units = [u for u, c in self.children.items() if not c.dead and not c.stopped]
        counts = {
            u: sum(1 for s in self.slots if s.unit == u and not s.dead and s.ready)
            for u in live_units
        }
        return min(live_units, key=lambda u: (counts[u], u))

    async def join(self, bootstrap: list[Slot], unit: int | None = None) -> Slot | None:
        index = len(self.slots)
        unit = self._unit_for_new_slot() if unit is None else unit
        slot = Slot(index, f"p{index}", unit=unit)
        self.slots.append(slot)
        seed = hashlib.sha256(f"moshpit-bench/{self.cfg.seed}/{index}".encode()).hexdigest()
        reply = await self.children[unit].request(
            next(self._ids),
            _OP_TIMEOUT,
            op="start",
            slot=index,
            seed=seed,
            bootstrap=[b.address for b in bootstrap],
        )
        if "error" in reply:
            slot.dead = True
            print(f"join of {slot.name} failed: {reply['error']}", file=sys.stderr)
            return None
        slot.peer_id = bytes.fromhex(reply["peer_id"])
        slot.address = reply["address"]
        slot.ready = True
        return slot

    async def kill_unit(self, unit: int) -> list[Slot]:
        child = self.children[unit]
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()  # SIGKILL: the kernel closes its sockets, nobody says goodbye
        await child.process.wait()
        child.dead = True
        killed = [s for s in self.slots if s.unit == unit and not s.dead]
        for s in killed:
            s.dead = True
        return killed

    async def replace_unit(self, unit: int, bootstrap: Callable[[], list[Slot]]) -> list[Slot]:
        count = sum(1 for s in self.slots if s.unit == unit and s.ready)
        child = await self.spawn()
        joined = []
        for _ in range(count):
            slot = await self.join(bootstrap(), unit=child.unit)
            if slot is not None:
                joined.append(slot)
        return joined

    async def freeze_unit(self, unit: int) -> list[Slot]:
        child = self.children[unit]
        os.kill(child.process.pid, signal.SIGSTOP)  # alive, sockets open, silent
        child.stopped = True
        frozen = [s for s in self.slots if s.unit == unit and not s.dead]
        for s in frozen:
            s.frozen = True
        return frozen

    async def store(
        self, slot: Slot, key: str, value: bytes, ttl: float, subkey: bytes | None
    ) -> StoreResult:
        reply = await self.children[slot.unit].request(
            next(self._ids),
            _OP_TIMEOUT,
            op="store",
            slot=slot.index,
            key=key,
            value=value.hex(),
            ttl=ttl,
            subkey=None if subkey is None else subkey.hex(),
        )
        if "error" in reply:
            return StoreResult(0, reply.get("ms", 0.0), subkey or slot.peer_id, reply["error"])
        return StoreResult(reply["remote"], reply["ms"], bytes.fromhex(reply["subkey"]))

    async def get(self, slot: Slot, key: str) -> GetResult:
        reply = await self.children[slot.unit].request(
            next(self._ids), _OP_TIMEOUT, op="get", slot=slot.index, key=key
        )
        found = reply.get("found")
        return GetResult(
            _unhex(found),
            reply.get("ms", 0.0),
            reply.get("hops", 0),
            reply.get("queried", 0),
            reply.get("error"),
        )

    async def close(self) -> None:
        """End every child: wake stopped ones, close their stdin (which asks them to leave),
        give them 5 s, then SIGKILL what is left."""
        for child in self.children.values():
            _end_child(child, kill=False)
        with trio.move_on_after(5):
            for child in self.children.values():
                await child.process.wait()
        self.kill_all()
        with trio.move_on_after(5):
            for child in self.children.values():
                await child.process.wait()

    def kill_all(self) -> None:
        for child in self.children.values():
            _end_child(child, kill=True)
            with contextlib.suppress(OSError):
                child.errlog.close()


def _unhex(found: dict[str, str] | None) -> dict[bytes, bytes] | None:
    if found is None:
        return None
    return {bytes.fromhex(k): bytes.fromhex(v) for k, v in found.items()}


def _end_child(child: Child, *, kill: bool) -> None:
    process = child.process
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if child.stopped:
            os.kill(process.pid, signal.SIGCONT)
        if kill:
            process.kill()
            return
    if process.stdin is not None:
        # closing stdin is how the parent asks a child to leave
        with contextlib.suppress(Exception):
            process.stdin.close()  # type: ignore[attr-defined]


async def real_benchmark(cfg: Config, *, max_wall: float) -> dict[str, Any]:
    """Run the benchmark on real loopback websockets, in child processes; every child is
    ended (SIGKILL at the latest) before this returns or raises."""
    cfg.check()
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moshpit-bench-dht-") as tmpdir:
        driver: RealDriver | None = None
        finished = False
        try:
            async with trio.open_nursery() as nursery:
                driver = RealDriver(cfg, nursery, tmpdir)
                work = Workload(cfg, driver)
                try:
                    with trio.fail_after(max_wall):
                        await driver.start_procs()
                        await work.build()
                        await work.run()
                finally:
                    with trio.CancelScope(shield=True):
                        await driver.close()
                    nursery.cancel_scope.cancel()
            finished = True
        finally:
            if driver is not None:
                driver.kill_all()
                if not finished:
                    _dump_child_logs(tmpdir)
            warnings = _count_child_warnings(tmpdir)
    assert driver is not None
    wall_s = time.perf_counter() - wall0
    extra = {"procs": cfg.procs, "peers_per_proc": driver.unit_size, "library_warnings": warnings}
    return summarize(cfg, work, wall_s, extra)


def _dump_child_logs(tmpdir: str) -> None:
    for name in sorted(os.listdir(tmpdir)):
        with contextlib.suppress(OSError):
            tail = Path(tmpdir, name).read_bytes()[-3000:].decode(errors="replace")
            if tail.strip():
                print(f"--- {name} (last lines) ---\n{tail}", file=sys.stderr)


# -- the child process -----------------------------------------------------------------------


async def _child_main() -> None:
    # stdout carries the protocol; anything else printed goes to stderr instead
    out_fd = os.dup(1)
    os.dup2(2, 1)
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(out_fd)
    send_lock = trio.Lock()
    slots: dict[int, tuple[Peer, trio.Lock]] = {}

    async def reply(rid: int, **fields: Any) -> None:
        async with send_lock:
            await stdout.send_all(json.dumps({"id": rid, **fields}).encode() + b"\n")

    async def run_peer(
        seed: str, bootstrap: list[str], *, task_status: trio.TaskStatus[Peer]
    ) -> None:
        identity = Identity.from_seed(bytes.fromhex(seed))
        async with open_peer(identity, listen="127.0.0.1:0", bootstrap=bootstrap) as peer:
            task_status.started(peer)
            await trio.sleep_forever()

    async def handle(msg: dict[str, Any]) -> None:
        rid = msg["id"]
        op = msg["op"]
        try:
            if op == "start":
                peer = await nursery.start(run_peer, msg["seed"], msg["bootstrap"])
                slots[msg["slot"]] = (peer, trio.Lock())
                await reply(rid, address=str(peer.address), peer_id=peer.id.to_bytes().hex())
                return
            peer, lock = slots[msg["slot"]]
            async with lock:
                start = trio.current_time()
                if op == "store":
                    subkey = bytes.fromhex(msg["subkey"]) if msg["subkey"] is not None else None
                    n = await peer.dht.store(
                        msg["key"], bytes.fromhex(msg["value"]), msg["ttl"], subkey=subkey
                    )
                    ms = (trio.current_time() - start) * 1000
                    used = subkey if subkey is not None else peer.id.to_bytes()
                    await reply(rid, remote=max(0, n - 1), ms=ms, subkey=used.hex())
                elif op == "get":
                    try:
                        got = await peer.dht.get(msg["key"])
                        error = None
                    except MoshpitError as exc:
                        got, error = None, f"{type(exc).__name__}: {exc}"
                    stats = peer.dht.last_lookup
                    ms = (trio.current_time() - start) * 1000
                    flat = _flatten(got)
                    await reply(
                        rid,
                        found=None if flat is None else {k.hex(): v.hex() for k, v in flat.items()},
                        ms=ms,
                        hops=stats.hops,
                        queried=stats.queried,
                        **({"error": error} if error else {}),
                    )
                else:
                    await reply(rid, error=f"unknown op {op!r}")
        except MoshpitError as exc:
            await reply(rid, error=f"{type(exc).__name__}: {exc}")

    with trio.move_on_after(_CHILD_DEADLINE):
        async with trio.open_nursery() as nursery:
            buf = b""
            while True:
                data = await stdin.receive_some(65536)
                if not data:
                    break  # the parent closed our stdin (or died): leave
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    nursery.start_soon(handle, json.loads(line))
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------------------------


def _count_library_warnings(level: str) -> dict[str, int]:
    """Log library warnings and errors at ``level`` and above to stderr, and count every one of
    them (by event) for the summary, so a quiet run still shows what went wrong."""
    counts: dict[str, int] = {}
    shown = logging.getLevelName(level.upper())
    renderer = structlog.dev.ConsoleRenderer(colors=False)

    def count(logger: Any, method: str, event: dict[str, Any]) -> Any:
        name = f"{method}: {event.get('event')}"
        counts[name] = counts.get(name, 0) + 1
        if logging.getLevelName(method.upper()) < shown:
            raise structlog.DropEvent
        return renderer(logger, method, event)

    structlog.configure(
        processors=[structlog.processors.TimeStamper(fmt="iso", utc=True), count],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    return counts


def _count_child_warnings(tmpdir: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in sorted(os.listdir(tmpdir)):
        with contextlib.suppress(OSError):
            for line in Path(tmpdir, name).read_text(errors="replace").splitlines():
                for level in ("warning", "error"):
                    marker = f"[{level}"
                    if marker in line:
                        event = line.split("]", 1)[1].strip().split("  ")[0] if "]" in line else ""
                        key = f"{level}: {event}"
                        counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, help="peers (default 256; 32 with --real)")
    parser.add_argument("--rounds", type=int, default=5, help="store/get rounds (default 5)")
    parser.add_argument("--churn", type=float, default=0.0, help="fraction of peers replaced")
    parser.add_argument("--freeze", type=float, default=0.0, help="fraction of peers frozen")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="one-way link latency")
    parser.add_argument("--jitter-ms", type=float, default=5.0, help="per-link spread of it")
    parser.add_argument(
        "--round-s", type=float, help="seconds per round (default 20 virtual; 5 with --real)"
    )
    parser.add_argument("--keys", type=int, default=16, help="bench/... keys per round")
    parser.add_argument("--owned", type=int, default=8, help="mp.avg/... keys per round")
    parser.add_argument("--subkeys", type=int, default=3, help="writers per key")
    parser.add_argument("--readers", type=int, default=2, help="gets per new key")
    parser.add_argument("--reread", type=int, default=16, help="gets of older keys per round")
    parser.add_argument("--real", action="store_true", help="real loopback, several processes")
    parser.add_argument("--procs", type=int, default=4, help="processes with --real")
    parser.add_argument("--max-wall", type=float, default=600.0, help="--real: give up after")
    parser.add_argument("--gc", choices=["tuned", "default"], default="tuned", dest="gc_mode")
    parser.add_argument(
        "--log-level",
        default="error",
        help="library log lines shown on stderr (all warnings "
        "are counted in the summary either way)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--profile", type=Path, help="in-memory mode: write a cProfile dump")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        trio.run(_child_main)
        return 0
    cfg = Config(
        nodes=args.nodes or (32 if args.real else 256),
        rounds=args.rounds,
        churn=args.churn,
        freeze=args.freeze,
        seed=args.seed,
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        round_s=args.round_s or (5.0 if args.real else 20.0),
        keys=args.keys,
        owned=args.owned,
        subkeys=args.subkeys,
        readers=args.readers,
        reread=args.reread,
        real=args.real,
        procs=args.procs,
        gc_mode=args.gc_mode,
    )
    cfg.check()
    if cfg.real:
        result = trio.run(lambda: real_benchmark(cfg, max_wall=args.max_wall))
    else:
        warnings = _count_library_warnings(args.log_level)
        result = run_memory(cfg, args.profile)
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
