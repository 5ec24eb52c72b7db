"""A small real swarm for the dashboard's tests, on the in-memory network, in real time.

A DHT-only daemon (the bootstrap peer; its ``[status] allow`` names the dashboard's key) and
``n`` trainers. Each trainer is a peer with a ``ProgressTracker`` and a ``MoshpitAverager``
over a linear model that it fits to its own shard of a regression problem with numpy SGD: its
loss is the real mean squared error of its batches, its samples are the rows it used, its
rounds are real Moshpit rounds. Nothing the dashboard shows is made up by the test; the test
only decides *when* the swarm takes its next round (``await swarm.round()``), so it can check
the page before and after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import numpy as np
import trio

from moshpit_trio.averaging.averager import MoshpitAverager, RoundReport
from moshpit_trio.config import parse_config
from moshpit_trio.daemon import Daemon
from moshpit_trio.identity import Identity
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.training.progress import ProgressTracker

RUN = "dash-test"
FEATURES = 8
BATCH = 16
STEPS_PER_ROUND = 5
ADMIN = Identity.from_seed(b"a" * 32)


@dataclasses.dataclass(eq=False)
class Trainer:
    index: int
    peer: Peer
    tracker: ProgressTracker
    averager: MoshpitAverager
    weights: np.ndarray
    x: np.ndarray
    y: np.ndarray
    rng: np.random.Generator
    step: int = 0
    samples: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    reports: list[RoundReport] = dataclasses.field(default_factory=list)

    def local_steps(self, lr: float = 0.05) -> None:
        for _ in range(STEPS_PER_ROUND):
            rows = self.rng.integers(0, len(self.x), BATCH)
            xb, yb = self.x[rows], self.y[rows]
            error = xb @ self.weights - yb
            loss = float(np.mean(error**2))
            self.weights -= lr * (2.0 / BATCH) * (xb.T @ error).astype(np.float32)
            self.step += 1
            self.samples += BATCH
            self.losses.append(loss)
            self.tracker.report(samples=BATCH, step=self.step, loss=loss)

    async def round(self, timeout: float) -> RoundReport:
        self.local_steps()
        report = await self.averager.step(weight=float(BATCH * STEPS_PER_ROUND), timeout=timeout)
        self.reports.append(report)
        self.tracker.record_round(report)
        await self.tracker.refresh()  # publish now, as the background loop would soon
        return report


@dataclasses.dataclass(eq=False)
class Swarm:
    net: MemoryNetwork
    bootstrap: str
    daemon: Daemon
    trainers: list[Trainer]
    round_timeout: float

    async def round(self) -> list[RoundReport]:
        """Every trainer: a few local steps, one averaging round, one publication."""
        reports: list[RoundReport] = [None] * len(self.trainers)  # type: ignore[list-item]

        async def one(t: Trainer) -> None:
            reports[t.index] = await t.round(self.round_timeout)

        async with trio.open_nursery() as nursery:
            for t in self.trainers:
                nursery.start_soon(one, t)
        return reports

    @property
    def total_samples(self) -> int:
        return sum(t.samples for t in self.trainers)


@asynccontextmanager
async def training_swarm(
    tmp_path: Path, n: int = 4, *, seed: int = 0, round_timeout: float = 5.0
) -> AsyncIterator[Swarm]:
    net = MemoryNetwork(seed=seed, latency=0.002)
    config = parse_config(
        f"""
[peer]
identity = "boot.pem"
listen = "boot:7070"
[status]
allow = ["{ADMIN.peer_id}"]
""",
        source=str(tmp_path / "boot.toml"),
    )
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal(FEATURES).astype(np.float32)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        daemon = Daemon(config, network=net.host("boot"))
        await nursery.start(daemon.run)
        bootstrap = str(daemon.peer.address)
        trainers = []
        for i in range(n):
            peer = await stack.enter_async_context(
                open_peer(
                    Identity.from_seed(bytes([i + 1]) * 32),
                    listen=f"t{i}:7000",
                    network=net.host(f"t{i}"),
                    bootstrap=[bootstrap],
                )
            )
            weights = np.zeros(FEATURES, np.float32)
            averager = await stack.enter_async_context(
                MoshpitAverager(peer, RUN, [weights], grid=(n,))
            )
            x = rng.standard_normal((200, FEATURES)).astype(np.float32)
            # each shard is shifted a little: peers that never averaged would disagree
            y = x @ (truth + 0.3 * rng.standard_normal(FEATURES).astype(np.float32))
            tracker = ProgressTracker(peer, RUN, publish_interval=30.0)
            trainers.append(
                Trainer(i, peer, tracker, averager, weights, x, y, np.random.default_rng(i))
            )
        for t in trainers:
            await t.tracker.refresh()
        yield Swarm(net, bootstrap, daemon, trainers, round_timeout)
        daemon.request_stop()
