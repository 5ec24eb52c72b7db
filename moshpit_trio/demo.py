"""``moshpit demo``: a whole swarm on 127.0.0.1 training a small CNN on scikit-learn's digits.

The orchestrator (``run_demo``) starts one bootstrap peer (a DHT-only process that never imports
torch) and ``--peers`` training processes. Each trainer holds its own shard of the digits
training set and a ``MoshpitOptimizer`` that averages in the background every
``--round-period`` seconds; it prints one JSON line per event on stdout, which the orchestrator
reads (``selectors``, one thread) to draw the live table. Midway one trainer is killed with
SIGKILL, as a preempted machine would be, and restarted with the same key file: it downloads the
state from a live peer and catches up. At the end every trainer writes its parameters; the
summary gives each peer's test accuracy and the accuracy of the peers' mean model, a PNG plot of
accuracy and loss against time, and ``--json`` for machines.

    moshpit demo                       # 4 trainers, about a minute of training
    moshpit demo --peers 6 --seconds 90 --plot run.png --json
    moshpit demo --dashboard           # and a live page of the swarm (prints its URL)

With ``--dashboard [HOST:PORT]`` (default 127.0.0.1:8080) the orchestrator also starts
``moshpit dashboard`` for the swarm, prints its URL, and stops it with the rest at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, MoshpitError
from .identity import Identity

__all__ = ["DemoResult", "run_demo"]

RUN_ID = "digits-demo"
TEST_FRACTION = 0.2
DATA_SEED = 0
MODEL_SEED = 0


# -- the training process ------------------------------------------------------------------------


def _digits(index: int, peers: int) -> tuple[Any, Any, Any, Any]:
    """This trainer's shard of the training set, and the common test set (torch tensors)."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(DATA_SEED).permutation(len(x))
    x = (x[order] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y[order].astype(np.int64)
    n_test = int(len(x) * TEST_FRACTION)
    x_test, y_test, x_train, y_train = x[:n_test], y[:n_test], x[n_test:], y[n_test:]
    shard = slice(index, None, peers)
    return (
        torch.from_numpy(x_train[shard]),
        torch.from_numpy(y_train[shard]),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
    )


def make_model() -> Any:
    """The demo's CNN for 8x8 digits (about 40k parameters); the same init on every peer."""
    import torch
    from torch import nn

    torch.manual_seed(MODEL_SEED)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def accuracy(model: Any, x: Any, y: Any) -> float:
    import torch

    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def _emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


def trainer_main(args: argparse.Namespace) -> int:
    """One trainer process: train until ``--until`` (Unix time), reporting JSON lines."""
    import torch

    from .training.optimizer import MoshpitOptimizer

    torch.set_num_threads(1)
    x, y, x_test, y_test = _digits(args.index, args.peers)
    model = make_model()
    generator = torch.Generator().manual_seed(1000 + args.index + 7919 * args.incarnation)
    # Importing torch takes seconds on a busy machine; that is not part of the swarm's story.
    # The process loads, says so, and joins the swarm only when the orchestrator says "go"
    # (all trainers at once at the start; the restarted one when its downtime is over).
    torch.optim.SGD(make_model().parameters(), lr=0.1)  # the optimizer's own lazy imports
    _emit(event="ready", index=args.index)
    go = json.loads(sys.stdin.readline())
    t0, until = float(go["t0"]), float(go["until"])
    opt = MoshpitOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True),
        run_id=RUN_ID,
        bootstrap=[args.bootstrap],
        identity=args.key,
        grid=tuple(args.grid),
        average_every="background",
        round_period=args.round_period,
        batch_size=args.batch_size,
        samples_per_epoch=len(x) * args.peers,
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    _emit(
        event="started",
        index=args.index,
        peer=opt.peer_id,
        incarnation=args.incarnation,
        downloaded_from=opt.downloaded_from,
        step=opt.local_step,
        acc=accuracy(model, x_test, y_test),
        t=time.time() - t0,
    )
    running_loss: float | None = None
    next_report = 0.0
    rounds = ok = 0
    last_round: Any = None
    with opt:
        while (now := time.time()) < until:
            batch = torch.randint(len(x), (args.batch_size,), generator=generator)
            loss = loss_fn(model(x[batch]), y[batch])
            loss.backward()
            opt.step(loss=loss)
            opt.zero_grad()
            value = loss.item()
            running_loss = value if running_loss is None else 0.9 * running_loss + 0.1 * value
            report = opt.last_report
            if report is not None and report is not last_round:
                last_round = report
                rounds += 1
                ok += report.succeeded
            if now >= next_report:
                next_report = now + args.report_every
                _emit(
                    event="progress",
                    index=args.index,
                    t=now - t0,
                    step=opt.local_step,
                    loss=running_loss,
                    acc=accuracy(model, x_test, y_test),
                    group=len(last_round.members) if last_round is not None else 0,
                    round_s=last_round.seconds["total"] if last_round is not None else None,
                    rounds=rounds,
                    rounds_ok=ok,
                    epoch=opt.swarm.epoch,
                    live=opt.swarm.live_peers,
                )
            time.sleep(args.step_delay)  # leave the two cores to the other trainers too
    torch.save(model.state_dict(), args.out)
    _emit(
        event="done",
        index=args.index,
        t=time.time() - t0,
        step=opt.local_step,
        acc=accuracy(model, x_test, y_test),
        rounds=rounds,
        rounds_ok=ok,
    )
    return 0


def bootstrap_main(args: argparse.Namespace) -> int:
    """The bootstrap peer: DHT only, no torch; prints its address, runs until SIGTERM."""
    import trio

    from .peer import open_peer

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with open_peer(Identity.generate(), listen="127.0.0.1:0") as peer:
                _emit(event="bootstrap", address=str(peer.address))
                async for _ in signals:
                    return

    trio.run(serve)
    return 0


# -- the orchestrator ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Trainer:
    index: int
    key: Path
    out: Path
    log: Path
    process: subprocess.Popen[str] | None = None
    incarnation: int = 0
    state: str = "starting"
    last: dict[str, Any] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    downloaded_from: str | None = None
    buffer: str = ""


@dataclasses.dataclass
class DemoResult:
    """What ``run_demo`` measured (``--json`` prints ``as_json()``)."""

    peers: int
    seconds: float
    final_accuracy: float
    per_peer_accuracy: dict[str, float]
    restarted_peer: str | None
    restarted_peer_downloaded: bool
    restarted_peer_caught_up: bool
    #: seconds after the start when the peer was killed, and when it rejoined
    killed_at: float
    restarted_at: float
    rounds: dict[str, dict[str, int]]
    plot: str | None
    history: dict[str, list[dict[str, Any]]]
    #: with --dashboard: its URL, and what its /api/swarm said (the most live peers it
    #: counted, and the most samples it showed; trainers withdraw their records at the end)
    dashboard: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("history")
        return out


def run_demo(
    *,
    peers: int = 4,
    seconds: float = 60.0,
    kill_at: float | None = None,
    downtime: float = 8.0,
    round_period: float = 2.0,
    plot: str | None = "moshpit-demo.png",
    live: bool = True,
    lr: float = 0.005,
    batch_size: int = 32,
    step_delay: float = 0.05,
    report_every: float = 0.5,
    logs: str | None = None,
    dashboard: str | None = None,
) -> DemoResult:
    """Run the demo; ``logs`` keeps every process's log (and key files) in that directory;
    ``dashboard`` ("HOST:PORT") also serves ``moshpit dashboard`` for the swarm there."""
    if not isinstance(peers, int) or peers < 2:
        raise ConfigError(f"--peers must be at least 2, got {peers!r}")
    if not seconds >= 10:
        raise ConfigError(f"--seconds must be at least 10, got {seconds!r}")
    kill_at = seconds * 0.35 if kill_at is None else kill_at
    if not (kill_at > 0 and kill_at + downtime < seconds * 0.8):
        raise ConfigError("the peer must be killed and restarted well before the end")
    if logs is not None:
        workdir = Path(logs)
        workdir.mkdir(parents=True, exist_ok=True)
        for stale in workdir.glob("peer-*.pem"):
            stale.unlink()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="moshpit-demo-"))
    trainers = [
        _Trainer(i, workdir / f"peer-{i}.pem", workdir / f"peer-{i}.pt", workdir / f"peer-{i}.log")
        for i in range(peers)
    ]
    for t in trainers:
        Identity.generate().save(t.key)
    victim = trainers[1]
    standby = _Trainer(victim.index, victim.key, victim.out, victim.log, incarnation=1)
    boot: subprocess.Popen[str] | None = None
    files = contextlib.ExitStack()  # log files and pipes, closed however the run ends
    try:
        boot_log = files.enter_context((workdir / "bootstrap.log").open("w"))
        boot = subprocess.Popen(
            [sys.executable, "-m", "moshpit_trio.demo", "bootstrap"],
            stdout=subprocess.PIPE,
            stderr=boot_log,
            text=True,
        )
        address = _read_bootstrap_address(boot, timeout=30.0)
        grid = _grid_for(peers)
        watch: _DashboardWatch | None = None
        if dashboard is not None:
            dash_log = files.enter_context((workdir / "dashboard.log").open("w"))
            watch = _DashboardWatch.start(address, dashboard, dash_log)
            files.callback(watch.stop)
            print(f"moshpit demo: dashboard at {watch.url}", file=sys.stderr, flush=True)

        def start(t: _Trainer) -> None:
            t.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "moshpit_trio.demo",
                    "trainer",
                    "--index",
                    str(t.index),
                    "--peers",
                    str(peers),
                    "--bootstrap",
                    address,
                    "--key",
                    str(t.key),
                    "--out",
                    str(t.out),
                    "--incarnation",
                    str(t.incarnation),
                    "--grid",
                    *map(str, grid),
                    "--round-period",
                    repr(round_period),
                    "--lr",
                    repr(lr),
                    "--batch-size",
                    str(batch_size),
                    "--step-delay",
                    repr(step_delay),
                    "--report-every",
                    repr(report_every),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=files.enter_context(t.log.open("a")),
                text=True,
            )
            t.state = "starting"
            for pipe in (t.process.stdin, t.process.stdout):
                if pipe is not None:
                    files.callback(_close_quietly, pipe)
            os.set_blocking(t.process.stdout.fileno(), False)  # type: ignore[union-attr]

        # The victim's second life is started now too, and waits (loaded, not yet a peer) for
        # its turn: importing torch takes seconds, much longer on a busy machine, and is no
        # part of what the demo shows, which is how a returning peer rejoins the swarm.
        for t in [*trainers, standby]:
            start(t)
        display = _Display(trainers, seconds, live)
        killed = restarted = False
        with display:
            ready_by = time.time() + 180.0
            while not all(t.state == "ready" for t in [*trainers, standby]):
                _pump([*trainers, standby], timeout=0.25)
                display.update(0.0)
                failed = [t.index for t in [*trainers, standby] if t.state == "failed"]
                if failed or time.time() > ready_by:
                    raise MoshpitError(
                        f"trainers {failed or 'not ready in 180 s'} did not start; "
                        f"see the logs in {workdir}"
                    )
            t0 = time.time()
            go = json.dumps({"t0": t0, "until": t0 + seconds}) + "\n"
            for t in trainers:
                _say(t, go)
            while True:
                now = time.time() - t0
                if not killed and now >= kill_at:
                    assert victim.process is not None
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait()
                    victim.state, killed = "killed", True
                elif killed and not restarted and now >= kill_at + downtime:
                    victim.process, victim.incarnation = standby.process, standby.incarnation
                    victim.buffer = standby.buffer
                    _say(victim, go)
                    restarted = True
                _pump(trainers, timeout=0.25)
                display.update(now)
                if watch is not None:
                    watch.poll()
                ended = all(
                    t.process is not None and t.process.poll() is not None for t in trainers
                )
                if ended and killed and restarted:
                    break
                if now > seconds + 60:  # a trainer that hangs past its end is a bug: stop it
                    raise MoshpitError(
                        "trainers did not finish within 60 s of the end; logs in " + str(workdir)
                    )
        _pump(trainers, timeout=0)
        for t in trainers:
            assert t.process is not None
            if t.process.returncode != 0 or not t.out.exists():
                raise MoshpitError(
                    f"trainer {t.index} failed (exit {t.process.returncode}); see {t.log}"
                )
        result = _summarize(trainers, victim, seconds, plot, (kill_at, kill_at + downtime))
        if watch is not None:
            result.dashboard = watch.result()
        return result
    finally:
        for t in [*trainers, standby]:
            if t.process is not None and t.process.poll() is None:
                t.process.kill()
                t.process.wait()
        if boot is not None:
            boot.terminate()
            try:
                boot.wait(10)
            except subprocess.TimeoutExpired:
                boot.kill()
                boot.wait()
            if boot.stdout is not None:
                boot.stdout.close()
        files.close()
        if logs is None:
            shutil.rmtree(workdir, ignore_errors=True)


class _DashboardWatch:
    """``moshpit dashboard`` for the demo's swarm, in its own process (it needs no torch)."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.most_live = 0
        self.most_samples = 0
        self._next = 0.0

    @classmethod
    def start(cls, bootstrap: str, listen: str, log: IO[str]) -> _DashboardWatch:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "moshpit_trio", "dashboard", "--bootstrap", bootstrap),
                *("--run", RUN_ID, "--listen", listen, "--no-status"),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert process.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(process.stdout, selectors.EVENT_READ)
            ready = sel.select(30.0)
        line = process.stdout.readline() if ready else ""
        if not line.startswith("dashboard: "):
            _end(process)
            raise MoshpitError(
                f"the dashboard did not start on {listen} (is the port free? is hypercorn "
                "installed: pip install 'moshpit-trio[dashboard]'?)"
            )
        return cls(process, line.split()[1])

    def poll(self) -> None:
        """Every few seconds: what the page would show now (for the demo's result)."""
        if time.time() < self._next:
            return
        self._next = time.time() + 3.0
        try:
            with urllib.request.urlopen(self.url + "api/swarm", timeout=2) as response:
                summary = json.loads(response.read())
        except (OSError, ValueError):
            return  # a busy machine: the next poll will do
        self.most_live = max(self.most_live, int(summary["peers"]["live"]))
        self.most_samples = max(self.most_samples, int(summary["samples"]))

    def result(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "most_live_peers": self.most_live,
            "most_samples": self.most_samples,
        }

    def stop(self) -> None:
        _end(self.process)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _end(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _grid_for(peers: int) -> tuple[int, int]:
    """A square 2-D grid with about one peer per cell: groups of about sqrt(peers)."""
    side = max(2, round(peers**0.5))
    return (side, side)


def _close_quietly(pipe: IO[str]) -> None:
    with contextlib.suppress(OSError):  # a pipe to a killed process may not flush
        pipe.close()


def _say(t: _Trainer, line: str) -> None:
    assert t.process is not None and t.process.stdin is not None
    t.process.stdin.write(line)
    t.process.stdin.flush()


def _read_bootstrap_address(boot: subprocess.Popen[str], timeout: float) -> str:
    assert boot.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(boot.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise MoshpitError(f"the bootstrap peer did not start within {timeout:g} s")
    line = boot.stdout.readline()
    try:
        return str(json.loads(line)["address"])
    except (ValueError, KeyError, TypeError):
        raise MoshpitError(f"the bootstrap peer said {line!r}, not its address") from None


def _pump(trainers: list[_Trainer], timeout: float) -> None:
    """Read whatever JSON lines the trainers have written (one thread; ``selectors``)."""
    with selectors.DefaultSelector() as sel:
        for t in trainers:
            if (
                t.process is not None
                and t.process.stdout is not None
                and not t.process.stdout.closed
            ):
                sel.register(t.process.stdout, selectors.EVENT_READ, t)
        if not sel.get_map():
            time.sleep(timeout)
            return
        for key, _ in sel.select(timeout):
            t = key.data
            stream: IO[str] = key.fileobj  # type: ignore[assignment]
            chunk = stream.read()
            if not chunk:
                if t.process.poll() is not None:
                    stream.close()
                    if t.state != "killed":
                        t.state = "done" if t.process.returncode == 0 else "failed"
                continue
            t.buffer += chunk
            *lines, t.buffer = t.buffer.split("\n")
            for line in lines:
                _take(t, line)


def _take(t: _Trainer, line: str) -> None:
    try:
        event = json.loads(line)
    except ValueError:
        return
    kind = event.get("event")
    if kind == "ready":
        t.state = "ready"
    elif kind == "started":
        t.state = "restarted" if t.incarnation else "running"
        t.downloaded_from = event.get("downloaded_from")
    elif kind == "done":
        t.state = "done"
    t.last.update(event)
    if kind in ("started", "progress", "done"):
        t.history.append(event)


class _Display:
    """A live table (rich) on a terminal; a line every few seconds otherwise."""

    def __init__(self, trainers: list[_Trainer], seconds: float, live: bool) -> None:
        self.trainers = trainers
        self.seconds = seconds
        self.live: Any = None
        self._next_line = 0.0
        if live and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=4)

    def __enter__(self) -> _Display:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, now: float) -> None:
        if self.live is not None:
            self.live.update(self._table(now))
        elif now >= self._next_line:
            self._next_line = now + 5.0
            cells = ", ".join(
                f"{t.index}:{t.state} step {t.last.get('step', 0)} acc {t.last.get('acc', 0):.3f}"
                for t in self.trainers
            )
            print(f"[{max(now, 0):5.1f}s] {cells}", file=sys.stderr, flush=True)

    def _table(self, now: float) -> Any:
        from rich.table import Table

        table = Table(title=f"moshpit demo: {max(now, 0):.0f} / {self.seconds:.0f} s")
        for column in ("peer", "state", "step", "loss", "acc", "group", "last round", "rounds ok"):
            table.add_column(column, justify="right")
        for t in self.trainers:
            last = t.last
            round_s = last.get("round_s")
            table.add_row(
                f"{t.index} {str(last.get('peer', ''))[:10]}",
                t.state,
                str(last.get("step", "")),
                f"{last['loss']:.3f}" if last.get("loss") is not None else "",
                f"{last['acc']:.3f}" if "acc" in last else "",
                str(last.get("group", "")),
                f"{round_s:.2f} s" if round_s is not None else "",
                f"{last.get('rounds_ok', 0)}/{last.get('rounds', 0)}",
            )
        return table


def _summarize(
    trainers: list[_Trainer],
    victim: _Trainer,
    seconds: float,
    plot: str | None,
    down: tuple[float, float],
) -> DemoResult:
    import torch

    model = make_model()
    states = [torch.load(t.out) for t in trainers]
    mean = {k: sum(s[k] for s in states) / len(states) for k in states[0]}
    model.load_state_dict(mean)
    _, _, x_test, y_test = _digits(0, 1)
    per_peer: dict[str, float] = {}
    for t, s in zip(trainers, states, strict=True):
        m = make_model()
        m.load_state_dict(s)
        per_peer[f"peer-{t.index}"] = accuracy(m, x_test, y_test)
    others = [a for name, a in per_peer.items() if name != f"peer-{victim.index}"]
    downloaded = victim.downloaded_from is not None
    caught_up = downloaded and per_peer[f"peer-{victim.index}"] >= min(others) - 0.02
    rounds = {
        f"peer-{t.index}": {
            "rounds": int(t.last.get("rounds", 0)),
            "rounds_ok": int(t.last.get("rounds_ok", 0)),
        }
        for t in trainers
    }
    history = {f"peer-{t.index}": t.history for t in trainers}
    if plot:
        _plot(history, plot, down)
    return DemoResult(
        peers=len(trainers),
        seconds=seconds,
        final_accuracy=accuracy(model, x_test, y_test),
        per_peer_accuracy=per_peer,
        restarted_peer=f"peer-{victim.index}",
        restarted_peer_downloaded=downloaded,
        restarted_peer_caught_up=caught_up,
        killed_at=down[0],
        restarted_at=down[1],
        rounds=rounds,
        plot=plot or None,
        history=history,
    )


def _plot(history: dict[str, list[dict[str, Any]]], path: str, down: tuple[float, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, events in history.items():
        # a restarted peer's two lives are drawn as one line with a gap where it was down
        times: list[float] = []
        accs: list[float] = []
        losses: list[float] = []
        for e in events:
            if e.get("event") == "started" and times:
                times.append(float("nan"))
                accs.append(float("nan"))
                losses.append(float("nan"))
            times.append(e["t"])
            accs.append(e.get("acc", float("nan")))
            loss = e.get("loss")
            losses.append(float(loss) if loss is not None else float("nan"))
        acc_ax.plot(times, accs, label=name)
        loss_ax.plot(times, losses, label=name)
    for ax in (acc_ax, loss_ax):
        ax.axvspan(*down, color="grey", alpha=0.15, label="one peer down")
    acc_ax.set(xlabel="seconds", ylabel="test accuracy", title="accuracy per peer")
    loss_ax.set(xlabel="seconds", ylabel="training loss (running mean)", title="loss per peer")
    loss_ax.set_yscale("log")
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_summary(result: DemoResult, out: IO[str]) -> None:
    print(f"moshpit demo: {result.peers} peers, {result.seconds:g} s of training", file=out)
    print(f"{'peer':<8} {'accuracy':>9} {'rounds ok':>10}", file=out)
    for name, acc in result.per_peer_accuracy.items():
        r = result.rounds[name]
        mark = "  (killed and restarted)" if name == result.restarted_peer else ""
        print(f"{name:<8} {acc:>9.3f} {r['rounds_ok']:>4}/{r['rounds']:<5}{mark}", file=out)
    print(f"mean model accuracy: {result.final_accuracy:.3f}", file=out)
    print(
        f"{result.restarted_peer} was killed (SIGKILL) at {result.killed_at:.0f} s and rejoined "
        f"at {result.restarted_at:.0f} s",
        file=out,
    )
    print(
        f"restarted peer downloaded state: {result.restarted_peer_downloaded}; "
        f"caught up (within 2 points): {result.restarted_peer_caught_up}",
        file=out,
    )
    if result.plot:
        print(f"plot: {result.plot}", file=out)
    if result.dashboard:
        d = result.dashboard
        print(
            f"dashboard: {d['url']} (stopped now; it counted up to {d['most_live_peers']} live "
            f"peers and {d['most_samples']} samples)",
            file=out,
        )


@contextlib.contextmanager
def _quiet_broken_pipe() -> Iterator[None]:
    with contextlib.suppress(BrokenPipeError):
        yield


def main(argv: list[str] | None = None) -> int:
    """``python -m moshpit_trio.demo trainer|bootstrap ...``: the demo's child processes."""
    parser = argparse.ArgumentParser(prog="python -m moshpit_trio.demo")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("bootstrap")
    p.set_defaults(func=bootstrap_main)
    p = sub.add_parser("trainer")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--peers", type=int, required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--grid", type=int, nargs="+", default=[2, 2])
    p.add_argument("--incarnation", type=int, default=0)
    p.add_argument("--round-period", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--step-delay", type=float, default=0.05)
    p.add_argument("--report-every", type=float, default=0.5)
    p.set_defaults(func=trainer_main)
    args = parser.parse_args(argv)
    from .log import configure_logging

    configure_logging("console", "info")
    with _quiet_broken_pipe():
        return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
