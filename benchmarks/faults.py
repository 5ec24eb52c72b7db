"""Faults: what a killed or frozen peer costs N real processes that average, and whether every
survivor holds exactly what its round report says (moshpit, and hivemind beside it).

N OS processes on 127.0.0.1 (``--peers``, default 4) each own a float32 vector of ``--floats``
elements (default 2M) and average it round after round on the timing ``peers/volunteer.toml``
ships: a round starts at every multiple of ``--period`` seconds of Unix time (5 s) and gets
``--timeout`` seconds (4 s). moshpit: each process is an ``open_peer`` with one
``MoshpitAverager`` (grid ``(N,)``, ``round_period``); process 0 is the others' bootstrap.
hivemind (``--with-hivemind``): each is a ``hivemind.DHT`` and ``DecentralizedAverager``
(``target_group_size`` N) whose ``step`` is called at the same slot boundaries, with the same
budget split: ``min_matchmaking_time`` = 40% of the timeout (moshpit's matchmaking share),
``allreduce_timeout`` = the rest, ``request_timeout`` = half of ``min_matchmaking_time`` (below
it, as hivemind recommends); everything else as it comes (``allow_retries`` included: a step
whose all-reduce fails before its deadline looks for a group again).

The victim is always the last process (never the bootstrap). Scenarios, in this order
(``--scenarios``), each after a round in which all N averaged together:

``stop_mid``     SIGSTOP the victim mid all-reduce (a laptop that sleeps: connections stay
                 open, nothing answers); SIGCONT once every survivor has finished its next
                 round; then count the victim's rounds until it averages again.
``kill_mid``     SIGKILL the victim mid all-reduce.
``kill_formed``  SIGKILL the victim the moment its "group formed" line reaches this process.

"Mid all-reduce" is ``--mid-delay`` seconds after the victim's "group formed" (moshpit's log
line; hivemind's ``StepControl.stage`` turning ``RUNNING_ALLREDUCE``); by default half the
slowest all-reduce of the last healthy round, so the signal lands in its middle. A killed
victim is started again (same identity) when another scenario follows. Every signal goes to
the victim's whole process group (hivemind runs a daemon and an averaging process under it).

Correctness: in round r, process i starts from ``before(i, r)`` (uniform in [i, i + 1), seeded
by (seed, i, r)) and steps with weight i + 1; after the step it writes its vector to a file and
its report to this process: per span, which members' data it averages (None: its own values
kept). At the end every report is checked element by element against the values it names,
computed from ``before`` and the weights (as ``tests/test_averager.py`` does; a hivemind step
names its gathered group for the whole vector on success and nothing on failure), and the
elements that differ are counted (``mismatched_elements``; tolerance rtol 1e-5, atol 1e-6;
kept values must be exact).

Per scenario: ``fault_round_s`` (the survivors' fault round, from its slot start to the end of
their step, slowest survivor), ``s_after_fault`` (from the signal to the end of the slowest
survivor's fault round), ``next_round_averaged`` (1 when every survivor's next round, i.e. its
next step, was a group of exactly the survivors with every span averaged over all of them;
else 0), ``next_round_offset`` (in which slot that next step was: 1 = the very next; a fault
round that overran the period pushes it later), ``next_round_s`` and ``next_round_matchmaking_s``
(slowest survivor), ``rounds_to_rejoin`` (the victim's rounds after SIGCONT, or after its
restart, up to and including the first in which it averaged with others; 1 = the first),
``rounds_to_full`` (rounds from then until all N averaged together), ``mismatched_elements`` and
``reports_checked`` (every report of every process from the fault round until the next
scenario's), ``fault_after_formed_s``, ``attempts`` (faults made: a signal that went out after
every survivor had ended its round measured nothing, so the victim is put back and a later
round faulted, up to 3 times), and each survivor's fault round (group size, whether it
succeeded, whom it lost and how, its mismatched elements).

    python benchmarks/faults.py                               # table
    python benchmarks/faults.py --json                        # one JSON object on stdout
    python benchmarks/faults.py --floats 100000 --period 2 --timeout 1.6     # about 25 s
    python benchmarks/faults.py --with-hivemind --hivemind-python /path/to/venv/bin/python

hivemind is never a dependency of this project; see ``benchmarks/allreduce.py`` for a venv that
sees this one's torch. Without it the hivemind figures are null and ``hivemind_note`` says why.

JSON keys: ``peers``, ``floats``, ``period``, ``timeout``, ``cores``, ``scenarios`` (names),
``moshpit`` and ``hivemind`` (null when not run): each ``{"baseline": {round, round_s,
allreduce_s, matchmaking_s, mismatched_elements, reports_checked}, "mid_delay_s",
"scenarios": {name: figures}, "mismatched_elements", "reports_checked", "error"}``;
summaries ``worst_fault_round_s``, ``worst_s_after_fault``, ``next_rounds_averaged``
(scenarios whose next round averaged the survivors), ``mismatched_elements`` (every report of
the run), and the same with a ``hivemind_`` prefix, ``hivemind_note``, ``seconds``.
``--out FILE`` also writes the JSON object to FILE; ``--keep-logs`` keeps every process's log
(JSON lines for moshpit) and prints where.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HOST = "127.0.0.1"
ARMS = ("moshpit", "hivemind")
SCENARIOS = ("stop_mid", "kill_mid", "kill_formed")
MATCHMAKING_FRACTION = 0.4  # MoshpitAverager's default, used for hivemind's split too
RTOL, ATOL = 1e-5, 1e-6
_START_TIMEOUT = 90.0  # a process must be up (peer open, averager ready) within this
_STOP_GRACE = 6.0  # a process told to stop may say its goodbyes for this long
MISSED_TRIES = 3  # faults made per scenario while each one misses its round (see run_scenario)


class BenchFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# The values every process starts each round from (the orchestrator recomputes them to check).


def before_values(seed: int, rank: int, round_: int, floats: int) -> np.ndarray:
    """Process ``rank``'s vector at the start of round ``round_``: uniform in [rank, rank + 1)."""
    rng = np.random.default_rng([seed, rank, round_])
    return rng.random(floats, dtype=np.float32) + np.float32(rank)


def weight_of(rank: int) -> float:
    return float(rank + 1)


# --------------------------------------------------------------------------------------------
# Child processes. stdout carries one JSON line per message to the orchestrator ("ready",
# "formed", "round", "error"); closing stdin tells a child to stop. Everything else a child
# prints goes to stderr (a log file of the orchestrator's).


class Control:
    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # stray prints (libraries, logs) must not corrupt the protocol

    def send(self, **message: Any) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()


def _dump(spec: dict[str, Any], round_: int, values: np.ndarray) -> str:
    path = Path(spec["dump"]) / f"{spec['rank']}-{round_}.npy"
    np.save(path, values)
    return str(path)


def _moshpit_child(spec: dict[str, Any], ctl: Control) -> None:
    import structlog
    import trio

    rank, floats, period, timeout = spec["rank"], spec["floats"], spec["period"], spec["timeout"]

    def on_formed(_logger: Any, _method: str, event: Any) -> Any:
        # The averager logs "group formed" the moment matchmaking returns a group: the
        # orchestrator times its mid-round faults from this message.
        if event.get("event") == "group formed":
            ctl.send(op="formed", round=event["round"], group=event["group"], at=time.time())
        return event

    structlog.configure(
        processors=[
            on_formed,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(20),  # info
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )

    from moshpit_trio import Identity, open_peer
    from moshpit_trio.averaging.averager import MoshpitAverager

    identity = Identity.from_seed(bytes.fromhex(spec["key_seed"]))
    vec = np.zeros(floats, dtype=np.float32)

    async def watch_stdin(cancel: trio.CancelScope) -> None:
        stdin = trio.lowlevel.FdStream(os.dup(0))
        while await stdin.receive_some():
            pass
        cancel.cancel()  # the orchestrator closed our stdin: stop

    async def main() -> None:
        async with open_peer(identity, listen=f"{HOST}:0", bootstrap=spec["bootstrap"]) as peer:
            averager = MoshpitAverager(
                peer, "faults", [vec], grid=(spec["peers"],), initial_key=(), round_period=period
            )
            async with averager, trio.open_nursery() as nursery:
                nursery.start_soon(watch_stdin, nursery.cancel_scope)
                ctl.send(op="ready", address=str(peer.address), peer_id=str(peer.id))
                while True:
                    round_ = await averager.wait_for_round()
                    np.copyto(vec, before_values(spec["seed"], rank, round_, floats))
                    start = time.time()
                    report = await averager.step(weight=weight_of(rank), timeout=timeout)
                    end = time.time()
                    ctl.send(
                        op="round",
                        round=report.round,
                        start=start,
                        end=end,
                        members=[str(m) for m in report.members],
                        spans=[
                            [
                                s.start,
                                s.end,
                                None if s.included is None else [str(p) for p in s.included],
                            ]
                            for s in report.spans
                        ],
                        succeeded=report.succeeded,
                        seconds=report.seconds,
                        lost={str(p): why for p, why in report.lost.items()},
                        excluded={str(p): why for p, why in report.excluded.items()},
                        file=_dump(spec, report.round, vec),
                    )

    trio.run(main)


def _hivemind_child(spec: dict[str, Any], ctl: Control) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    torch.set_num_threads(1)
    rank, floats, period, timeout = spec["rank"], spec["floats"], spec["period"], spec["timeout"]
    matchmaking = MATCHMAKING_FRACTION * timeout
    dht = hivemind.DHT(
        start=True, host_maddrs=[f"/ip4/{HOST}/tcp/0"], initial_peers=spec["bootstrap"]
    )
    averager = None
    try:
        averager = hivemind.DecentralizedAverager(
            [torch.zeros(floats)],
            dht,
            prefix="faults",
            target_group_size=spec["peers"],
            min_group_size=2,
            min_matchmaking_time=matchmaking,
            request_timeout=matchmaking / 2,
            allreduce_timeout=timeout - matchmaking,
            start=True,
        )
        ctl.send(op="ready", address=[str(a) for a in dht.get_visible_maddrs()], peer_id=str(rank))
        while True:
            round_ = math.floor(time.time() / period) + 1
            # sleep until the slot, but stop at once if the orchestrator closes our stdin
            ready, _, _ = select.select([sys.stdin], [], [], max(round_ * period - time.time(), 0))
            if ready and not sys.stdin.readline():
                break
            if ready:
                continue
            with averager.get_tensors() as tensors:
                tensors[0].copy_(
                    torch.from_numpy(before_values(spec["seed"], rank, round_, floats))
                )
            start = time.time()
            control = averager.step(
                gather=rank, weight=weight_of(rank), timeout=timeout, wait=False
            )
            formed = None
            while not control.done():
                if formed is None and control.stage == AveragingStage.RUNNING_ALLREDUCE:
                    formed = time.time()
                    ctl.send(op="formed", round=round_, group=None, at=formed)
                time.sleep(0.002)
            try:
                gathered = control.result()
            except Exception as exc:  # hivemind reports a failed step by raising
                print(f"round {round_}: {type(exc).__name__}: {exc}", file=sys.stderr)
                gathered = None
            end = time.time()
            me = str(rank)
            if gathered:
                members = [str(r) for r in gathered.values()]
                spans: list[Any] = [[0, floats, members]]
            else:
                members, spans = [me], []
            with averager.get_tensors() as tensors:
                file = _dump(spec, round_, tensors[0].numpy())
            ctl.send(
                op="round",
                round=round_,
                start=start,
                end=end,
                members=members,
                spans=spans,
                succeeded=bool(gathered) and len(members) > 1,
                seconds={
                    "matchmaking": (formed or end) - start,
                    "allreduce": end - (formed or end),
                    "total": end - start,
                },
                lost={},
                excluded={},
                file=file,
            )
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


_CHILDREN: dict[str, Callable[[dict[str, Any], Control], None]] = {
    "moshpit": _moshpit_child,
    "hivemind": _hivemind_child,
}


def _child_main(role: str, spec_text: str) -> int:
    spec = json.loads(spec_text)
    ctl = Control()
    try:
        _CHILDREN[role](spec, ctl)
    except BaseException as exc:
        ctl.send(op="error", error=f"{type(exc).__name__}: {exc}")
        raise
    return 0


# --------------------------------------------------------------------------------------------
# Orchestrator: the children, their messages, the faults.


class Child:
    """One peer process (a new one per life) and every message it sent, in order."""

    def __init__(self, arm: str, rank: int, base: dict[str, Any], python: str, work: Path):
        self.arm, self.rank, self.base, self.python = arm, rank, base, python
        self.log = work / f"{arm}-{rank}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.events: list[dict[str, Any]] = []
        self.life = 0
        self.peer_id = ""
        self.address: Any = None
        self._buf = b""
        self.mark = 0

    def start(self, bootstrap: list[str]) -> None:
        spec = {**self.base, "rank": self.rank, "bootstrap": bootstrap}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(self.python, str(Path(__file__).resolve())),
                    *("--role", self.arm, "--spec", json.dumps(spec)),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                # its own process group: a signal reaches every process it starts
                start_new_session=True,
            )
        self.life += 1
        self._buf = b""
        self.mark = len(self.events)  # this life's messages start here

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def feed(self) -> None:
        """Read what the child wrote (called when its stdout is readable)."""
        assert self.proc is not None and self.proc.stdout is not None
        data = os.read(self.proc.stdout.fileno(), 1 << 16)
        if not data:
            self.proc.stdout.close()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.strip():
                message = json.loads(line)
                message["life"] = self.life
                self.events.append(message)

    def end(self) -> None:
        """SIGCONT (a stopped process could not die of anything else), then SIGKILL the group."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _is_round(e: dict[str, Any]) -> bool:
    return bool(e.get("op") == "round")


def _averaged_with_others(line: dict[str, Any]) -> bool:
    return len(line["members"]) > 1 and any(
        s[2] is not None and len(s[2]) > 1 for s in line["spans"]
    )


class Swarm:
    """N children of one arm; reads their messages as they come."""

    def __init__(self, arm: str, cfg: argparse.Namespace, work: Path, python: str) -> None:
        self.arm, self.cfg, self.work = arm, cfg, work
        dump = work / f"{arm}-vectors"
        dump.mkdir()
        base = {
            "peers": cfg.peers,
            "floats": cfg.floats,
            "period": cfg.period,
            "timeout": cfg.timeout,
            "seed": cfg.seed,
            "dump": str(dump),
        }
        self.children = [
            Child(arm, rank, {**base, "key_seed": os.urandom(32).hex()}, python, work)
            for rank in range(cfg.peers)
        ]
        self.rank_of: dict[str, int] = {}

    # -- reading ------------------------------------------------------------------------

    def pump(self, until: float) -> None:
        """Take in every message that arrives before ``until`` (wall time), or one batch."""
        readable = {
            c.proc.stdout.fileno(): c
            for c in self.children
            if c.proc is not None and c.proc.stdout is not None and not c.proc.stdout.closed
        }
        if not readable:
            time.sleep(max(0.0, min(until - time.time(), 0.05)))
            return
        ready, _, _ = select.select(list(readable), [], [], max(0.0, until - time.time()))
        for fd in ready:
            readable[fd].feed()
        for child in self.children:
            for e in child.events:
                if e.get("op") == "error":
                    raise BenchFailed(f"{self.arm} process {child.rank}: {e['error']}")

    def wait_event(
        self,
        child: Child,
        match: Callable[[dict[str, Any]], bool],
        deadline: float,
        start: int = 0,
    ) -> dict[str, Any] | None:
        """The first message of ``child`` from index ``start`` on that matches, or None."""
        while True:
            for e in child.events[start:]:
                if match(e):
                    return e
            if time.time() >= deadline:
                return None
            self.pump(min(deadline, time.time() + 0.5))

    def round_line(self, child: Child, round_: int) -> dict[str, Any] | None:
        """``child``'s report of round ``round_``; None if it skipped it or never ends it."""
        # a step that overruns its timeout is measured too, up to three more periods
        deadline = round_ * self.cfg.period + self.cfg.timeout + 3 * self.cfg.period
        line = self.wait_event(
            child, lambda e: _is_round(e) and e["round"] >= round_, deadline=deadline
        )
        return line if line is not None and line["round"] == round_ else None

    def next_line(self, child: Child, after: int) -> dict[str, Any] | None:
        """``child``'s first report of a round after ``after``; None if none within three
        periods of the next round's timeout."""
        deadline = (after + 1) * self.cfg.period + self.cfg.timeout + 3 * self.cfg.period
        return self.wait_event(child, lambda e: _is_round(e) and e["round"] > after, deadline)

    def wait_full_round(self, after: int, rounds: int) -> int | None:
        """The first round after ``after`` that all N averaged together (within ``rounds``
        rounds from now), or None."""
        deadline = time.time() + rounds * self.cfg.period + self.cfg.timeout + 2.0
        n = self.cfg.peers
        while True:
            full: list[set[int]] = []
            for child in self.children:
                full.append(
                    {
                        e["round"]
                        for e in child.events
                        if _is_round(e)
                        and e["round"] > after
                        and e["succeeded"]
                        and len(e["members"]) == n
                    }
                )
            common = set.intersection(*full)
            if common:
                return min(common)
            if time.time() >= deadline:
                return None
            self.pump(min(deadline, time.time() + 0.5))

    # -- life -----------------------------------------------------------------------------

    def start_all(self) -> None:
        first = self.children[0]
        first.start([])
        self._ready(first)
        bootstrap = first.address if isinstance(first.address, list) else [first.address]
        self.bootstrap = bootstrap
        for child in self.children[1:]:
            child.start(bootstrap)
        for child in self.children[1:]:
            self._ready(child)

    def restart(self, child: Child) -> None:
        child.end()
        child.start(self.bootstrap)
        self._ready(child)

    def _ready(self, child: Child) -> None:
        ready = self.wait_event(
            child, lambda e: e.get("op") == "ready", time.time() + _START_TIMEOUT, child.mark
        )
        if ready is None:
            raise BenchFailed(
                f"{self.arm} process {child.rank} not ready in {_START_TIMEOUT} s:\n" + child.tail()
            )
        child.peer_id, child.address = ready["peer_id"], ready["address"]
        self.rank_of[child.peer_id] = child.rank

    def stop(self) -> None:
        """Ask every child to stop (stdin closed), give them a moment, then end them all."""
        for child in self.children:
            if child.proc is not None and child.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    child.proc.stdin.close()
        until = time.time() + _STOP_GRACE
        for child in self.children:
            if child.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=max(until - time.time(), 0.01))
        self.close()

    def close(self) -> None:
        for child in self.children:
            child.end()

    # -- figures --------------------------------------------------------------------------

    def lines_of(self, round_: int) -> dict[int, dict[str, Any]]:
        return {
            c.rank: e
            for c in self.children
            for e in c.events
            if _is_round(e) and e["round"] == round_
        }


def _slowest(lines: list[dict[str, Any] | None], key: str) -> float | None:
    if not lines or any(line is None for line in lines):
        return None
    return round(max(line["seconds"][key] for line in lines if line is not None), 4)


def run_scenario(
    swarm: Swarm, name: str, after: int, mid_delay: float, restart: bool
) -> tuple[dict[str, Any], int]:
    """One fault; returns its figures and the last round it looked at."""
    cfg = swarm.cfg
    victim, survivors = swarm.children[-1], swarm.children[:-1]
    n = cfg.peers
    sig = signal.SIGSTOP if name.startswith("stop") else signal.SIGKILL
    delay = 0.0 if name == "kill_formed" else mid_delay
    # A fault whose signal went out after every survivor had ended its round measured nothing
    # (a busy machine read the victim's "formed" line late): put the victim back and fault a
    # later round, MISSED_TRIES times in all.
    out: dict[str, Any] = {"signal": signal.Signals(sig).name}
    try:
        for attempt in range(1, MISSED_TRIES + 1):
            formed = swarm.wait_event(
                victim,
                lambda e, after=after: (
                    e.get("op") == "formed" and e["round"] > after and e["group"] in (n, None)
                ),
                time.time() + 4 * cfg.period,
            )
            if formed is None:
                raise BenchFailed(f"{name}: the victim formed no group of {n} in 4 rounds")
            f = int(formed["round"])
            time.sleep(max(0.0, formed["at"] + delay - time.time()))
            victim.signal(sig)
            at = time.time()
            if sig == signal.SIGKILL and victim.proc is not None:
                victim.proc.wait()
            fault = [swarm.round_line(s, f) for s in survivors]
            ends = [line["end"] - at for line in fault if line is not None]
            missed = bool(ends) and len(ends) == len(fault) and max(ends) < 0
            if not missed or attempt == MISSED_TRIES:
                break
            if sig == signal.SIGSTOP:
                victim.signal(signal.SIGCONT)
            else:
                swarm.restart(victim)
            after = max([f, *(line["round"] for line in fault if line is not None)])
        out["fault_round"] = f
        out["fault_after_formed_s"] = round(at - formed["at"], 4)
        out["attempts"] = attempt
        if missed:
            out["error"] = (
                f"the signal came {-max(ends):.3f} s after every survivor's round {f} had "
                f"ended, {attempt} times (the machine was too busy to hit the round; run it "
                "again on a quieter one)"
            )
        out["fault_round_s"] = _slowest(fault, "total")
        out["s_after_fault"] = (
            round(max(ends), 4) if len(ends) == len(fault) and "error" not in out else None
        )
        out["survivors"] = {
            str(s.rank): None
            if line is None
            else {
                "group": len(line["members"]),
                "succeeded": line["succeeded"],
                "victim_in_group": victim.peer_id in line["members"],
                "lost": {str(swarm.rank_of.get(p, p)): why for p, why in line["lost"].items()},
                "excluded": {
                    str(swarm.rank_of.get(p, p)): why for p, why in line["excluded"].items()
                },
            }
            for s, line in zip(survivors, fault, strict=True)
        }
        # a survivor's next round: its next step, normally in the very next slot (a fault round
        # that overran the period makes it skip slots: next_round_offset says how many)
        nxt = [swarm.next_line(s, f) for s in survivors]
        offsets = [line["round"] - f for line in nxt if line is not None]
        out["next_round_offset"] = max(offsets) if len(offsets) == len(nxt) else None
        them = sorted(s.peer_id for s in survivors)
        out["next_round_averaged"] = int(
            all(
                line is not None and line["succeeded"] and sorted(line["members"]) == them
                for line in nxt
            )
        )
        out["next_round_groups"] = [None if line is None else len(line["members"]) for line in nxt]
        out["next_round_s"] = _slowest(nxt, "total")
        out["next_round_matchmaking_s"] = _slowest(nxt, "matchmaking")
    finally:
        if sig == signal.SIGSTOP:
            victim.signal(signal.SIGCONT)
    back = time.time()
    last = max([f + 1, *(line["round"] for line in nxt if line is not None)])
    out["rounds_to_rejoin"] = out["rounds_to_full"] = None
    if sig == signal.SIGKILL and not restart:
        return out, last
    mark = len(victim.events)
    if sig == signal.SIGKILL:
        swarm.restart(victim)
        back = time.time()

    def after_back(e: dict[str, Any]) -> bool:
        return _is_round(e) and e["start"] >= back

    rejoined = swarm.wait_event(
        victim,
        lambda e: after_back(e) and _averaged_with_others(e),
        time.time() + cfg.rejoin_rounds * cfg.period + cfg.timeout + 2.0,
        mark,
    )
    mine = [e for e in victim.events[mark:] if after_back(e)]
    if rejoined is None:
        out["error"] = f"the victim did not average again in {cfg.rejoin_rounds} rounds"
        return out, max([last, *(e["round"] for e in mine)])
    first = mine[0]["round"]
    out["rounds_to_rejoin"] = rejoined["round"] - first + 1
    full = swarm.wait_full_round(after=first - 1, rounds=cfg.rejoin_rounds)
    if full is None:
        out["error"] = f"all {n} did not average together again in {cfg.rejoin_rounds} rounds"
        return out, max(last, rejoined["round"])
    out["rounds_to_full"] = full - first + 1
    return out, full


def mismatches(
    spans: list[Any],
    now: np.ndarray,
    own: np.ndarray,
    values_of: Callable[[str], np.ndarray],
    weight: Callable[[str], float],
) -> int:
    """Elements of ``now`` that differ from what a report's ``spans`` name: per span
    ``[start, end, included]``, the weighted average of the ``included`` members' values before
    the round (``values_of``, ``weight``), or this member's ``own`` values where ``included`` is
    None and wherever no span reaches (as tests/test_averager.py::check_report_is_true)."""
    bad = 0
    covered = np.zeros(len(now), dtype=bool)
    for start, end, included in spans:
        part = slice(start, end)
        covered[part] = True
        if included is None:
            bad += int(np.count_nonzero(now[part] != own[part]))
            continue
        w = [weight(p) for p in included]
        expect = sum(
            wi * values_of(p)[part].astype(np.float64) for wi, p in zip(w, included, strict=True)
        ) / sum(w)
        bad += int(np.count_nonzero(~np.isclose(now[part], expect, rtol=RTOL, atol=ATOL)))
    bad += int(np.count_nonzero(now[~covered] != own[~covered]))
    return bad


def check_reports(swarm: Swarm) -> dict[tuple[int, int], int]:
    """Per (round, process): elements that differ from what its report names."""
    cfg = swarm.cfg
    found: dict[tuple[int, int], int] = {}
    cache: dict[tuple[int, int], np.ndarray] = {}

    def before(rank: int, round_: int) -> np.ndarray:
        if (rank, round_) not in cache:
            cache[(rank, round_)] = before_values(cfg.seed, rank, round_, cfg.floats)
        return cache[(rank, round_)]

    def rank_of(peer_id: str) -> int:
        if peer_id not in swarm.rank_of:
            raise BenchFailed(f"a report names a peer that is none of ours: {peer_id}")
        return swarm.rank_of[peer_id]

    lines = sorted(
        ((e["round"], c.rank, e) for c in swarm.children for e in c.events if _is_round(e)),
        key=lambda t: (t[0], t[1]),
    )
    for round_, rank, line in lines:
        for key in [k for k in cache if k[1] < round_]:
            del cache[key]
        now = np.load(line["file"])
        os.unlink(line["file"])
        found[(round_, rank)] = mismatches(
            line["spans"],
            now,
            before(rank, round_),
            lambda p, r=round_: before(rank_of(p), r),
            lambda p: weight_of(rank_of(p)),
        )
    return found


def run_arm(arm: str, cfg: argparse.Namespace, python: str) -> dict[str, Any]:
    """Start the swarm, run every scenario, end every process whatever happens, check."""
    work = Path(tempfile.mkdtemp(prefix=f"faults-{arm}-"))
    swarm = Swarm(arm, cfg, work, python)
    result: dict[str, Any] = {"scenarios": {}, "error": None}
    windows: list[tuple[str, int]] = []  # (name, first round) in order
    try:
        try:
            swarm.start_all()
            settle = max(6, int(30 / cfg.period))
            first = swarm.wait_full_round(after=-1, rounds=settle)
            if first is None:
                raise BenchFailed(f"all {cfg.peers} never averaged together in {settle} rounds")
            base = swarm.wait_full_round(after=first, rounds=settle)
            if base is None:
                raise BenchFailed("no second round of all N")
            lines = list(swarm.lines_of(base).values())
            result["baseline"] = {
                "round": base,
                "round_s": _slowest(lines, "total"),
                "allreduce_s": _slowest(lines, "allreduce"),
                "matchmaking_s": _slowest(lines, "matchmaking"),
            }
            allreduce = result["baseline"]["allreduce_s"] or 0.0
            mid = cfg.mid_delay if cfg.mid_delay is not None else allreduce / 2
            result["mid_delay_s"] = round(mid, 4)
            after = base
            windows.append(("baseline", 0))
            for i, name in enumerate(cfg.scenarios):
                if time.time() >= cfg.deadline:
                    raise BenchFailed(f"--budget reached before {name}")
                figures, after = run_scenario(
                    swarm, name, after, mid, restart=i + 1 < len(cfg.scenarios)
                )
                windows.append((name, figures["fault_round"]))
                result["scenarios"][name] = figures
                if not cfg.json:
                    print(f"  {arm} {name}: done", file=sys.stderr)
                if figures.get("error"):
                    raise BenchFailed(f"{name}: {figures['error']}")
            swarm.stop()
        except BenchFailed as exc:
            result["error"] = str(exc)
            tails = "\n".join(f"--- {c.log.name}\n{c.tail()}" for c in swarm.children)
            if not cfg.quiet:
                print(f"{arm}: {exc}\n{tails}", file=sys.stderr)
        finally:
            swarm.close()
        try:
            found = check_reports(swarm)
        except BenchFailed as exc:
            result["error"] = f"{result['error'] or ''} checking: {exc}".strip()
            found = {}
        totals = {name: [0, 0] for name, _ in windows}
        for (round_, _rank), bad in found.items():
            name = next((n for n, r in reversed(windows) if round_ >= r), "baseline")
            totals.setdefault(name, [0, 0])
            totals[name][0] += bad
            totals[name][1] += 1
        for name, figures in result["scenarios"].items():
            figures["mismatched_elements"], figures["reports_checked"] = totals[name]
            for rank, survivor in (figures.get("survivors") or {}).items():
                if survivor is not None:
                    survivor["mismatched"] = found.get((figures["fault_round"], int(rank)))
        if "baseline" in result:
            bad, count = totals["baseline"]
            result["baseline"].update(mismatched_elements=bad, reports_checked=count)
        result["mismatched_elements"] = sum(found.values())
        result["reports_checked"] = len(found)
    finally:
        swarm.close()
        if cfg.keep_logs:
            shutil.rmtree(work / f"{arm}-vectors", ignore_errors=True)
            print(f"{arm}: process logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


# --------------------------------------------------------------------------------------------


def _hivemind_available(python: str) -> str | None:
    """None if hivemind imports in ``python``, else why not (never imported in this process)."""
    try:
        probe = subprocess.run(
            [python, "-c", "import hivemind"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {python}: {exc}"
    if probe.returncode == 0:
        return None
    if "No module named 'hivemind'" in probe.stderr:
        return "not installed"
    return "import failed: " + (probe.stderr.strip().splitlines() or ["?"])[-1]


def _summary(res: dict[str, Any] | None) -> dict[str, Any]:
    if res is None:
        return {
            "worst_fault_round_s": None,
            "worst_s_after_fault": None,
            "next_rounds_averaged": None,
            "mismatched_elements": None,
        }
    rows = list(res["scenarios"].values())

    def worst(key: str) -> float | None:
        values = [r.get(key) for r in rows]
        return max(values) if values and all(v is not None for v in values) else None

    return {
        "worst_fault_round_s": worst("fault_round_s"),
        "worst_s_after_fault": worst("s_after_fault"),
        "next_rounds_averaged": sum(r.get("next_round_averaged") or 0 for r in rows),
        "mismatched_elements": res.get("mismatched_elements"),
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(out: dict[str, Any]) -> str:
    head = (
        f"{'arm':<9}{'scenario':<13}{'round s':>8}{'after s':>8}{'next avg':>9}"
        f"{'next s':>8}{'next mm s':>10}{'rejoin':>7}{'full':>5}{'mismatch':>10}{'checked':>8}"
    )
    lines = [head, "-" * len(head)]
    for arm in ARMS:
        res = out.get(arm)
        if res is None:
            lines.append(f"{arm:<9}not run: {out.get(f'{arm}_note') or '-'}")
            continue
        base = res.get("baseline") or {}
        lines.append(
            f"{arm:<9}{'(no fault)':<13}{_fmt(base.get('round_s')):>8}{'':>8}{'':>9}{'':>8}"
            f"{_fmt(base.get('matchmaking_s')):>10}{'':>7}{'':>5}"
            f"{_fmt(base.get('mismatched_elements')):>10}{_fmt(base.get('reports_checked')):>8}"
            f"   all-reduce {_fmt(base.get('allreduce_s'))} s (a healthy round, slowest peer)"
        )
        for name, r in res["scenarios"].items():
            lost = "; ".join(
                f"{rank}: group {s['group']}{' ok' if s['succeeded'] else ''}"
                + (f" lost {s['lost']}" if s["lost"] else "")
                + (f" {s['mismatched']} wrong" if s.get("mismatched") else "")
                for rank, s in (r.get("survivors") or {}).items()
                if s is not None
            )
            lines.append(
                f"{arm:<9}{name:<13}{_fmt(r.get('fault_round_s')):>8}"
                f"{_fmt(r.get('s_after_fault')):>8}{_fmt(r.get('next_round_averaged')):>9}"
                f"{_fmt(r.get('next_round_s')):>8}{_fmt(r.get('next_round_matchmaking_s')):>10}"
                f"{_fmt(r.get('rounds_to_rejoin')):>7}{_fmt(r.get('rounds_to_full')):>5}"
                f"{_fmt(r.get('mismatched_elements')):>10}{_fmt(r.get('reports_checked')):>8}"
                f"   signal {_fmt(r.get('fault_after_formed_s'), 3)} s after formed; {lost}"
                + (
                    f"; next round {r['next_round_offset']} slots later"
                    if (r.get("next_round_offset") or 1) > 1
                    else ""
                )
            )
        if res.get("error"):
            lines.append(f"{arm:<9}error: {res['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="processes (one group of N)")
    parser.add_argument("--floats", type=int, default=2_000_000, help="float32 elements")
    parser.add_argument("--period", type=float, default=5.0, help="round period (s)")
    parser.add_argument("--timeout", type=float, default=4.0, help="round timeout (s)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma separated: {', '.join(SCENARIOS)}"
    )
    parser.add_argument(
        "--mid-delay",
        type=float,
        help="seconds after 'group formed' for the mid faults (default: half the healthy "
        "all-reduce)",
    )
    parser.add_argument(
        "--rejoin-rounds", type=int, default=6, help="rounds a victim gets to average again"
    )
    parser.add_argument("--seed", type=int, default=0, help="of the vectors")
    parser.add_argument("--with-hivemind", action="store_true", help="add hivemind if installed")
    parser.add_argument(
        "--hivemind-python",
        default=sys.executable,
        help="interpreter for the hivemind processes (one whose environment has hivemind)",
    )
    parser.add_argument("--budget", type=float, default=900.0, help="whole benchmark (s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (path on stderr)"
    )
    parser.add_argument("--quiet", action="store_true", help="no process log tails on errors")
    parser.add_argument("--role", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role:
        return _child_main(args.role, args.spec)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if any(s not in SCENARIOS for s in args.scenarios) or not args.scenarios:
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if args.peers < 3 or args.floats < args.peers:
        parser.error("need --peers >= 3 (two survivors to average) and --floats >= peers")
    if not 0 < args.timeout < args.period:
        parser.error("need 0 < --timeout < --period")
    if args.rejoin_rounds < 1:
        parser.error("need --rejoin-rounds >= 1")
    started = time.monotonic()
    args.deadline = time.time() + args.budget

    arms = ["moshpit"]
    hivemind_note: str | None = "not run (pass --with-hivemind)"
    if args.with_hivemind:
        hivemind_note = _hivemind_available(args.hivemind_python)
        if hivemind_note is None:
            arms.append("hivemind")
    results: dict[str, Any] = {}
    for arm in arms:
        python = args.hivemind_python if arm == "hivemind" else sys.executable
        results[arm] = run_arm(arm, args, python)
        if arm == "hivemind" and results[arm]["error"]:
            hivemind_note = results[arm]["error"]

    ours, theirs = _summary(results.get("moshpit")), _summary(results.get("hivemind"))
    out: dict[str, Any] = {
        "peers": args.peers,
        "floats": args.floats,
        "period": args.period,
        "timeout": args.timeout,
        "cores": os.cpu_count(),
        "scenarios": args.scenarios,
        **ours,
        **{f"hivemind_{k}": v for k, v in theirs.items()},
        "hivemind_note": hivemind_note,
        "moshpit": results.get("moshpit"),
        "hivemind": results.get("hivemind"),
        "seconds": round(time.monotonic() - started, 1),
    }
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out))
    else:
        print(_table(out))
        print(
            f"\npeers={args.peers} floats={args.floats:,} period={args.period}s "
            f"timeout={args.timeout}s; {out['seconds']}s\n"
            "round s: the survivors' fault round (slowest); after s: from the signal to its end; "
            "next avg: 1 when the next round averaged exactly the survivors; next mm s: its "
            "matchmaking; rejoin / full: rounds after SIGCONT or restart until the victim "
            "averages again / all N do; mismatch: elements (all reports from the fault round "
            "on) that differ from what their reports name"
        )
    return 1 if results["moshpit"]["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
