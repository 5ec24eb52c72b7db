"""A failed peer costs its group a moment, never the swarm: four daemons as real processes on
127.0.0.1, on the timing ``peers/volunteer.toml`` ships (rounds every 5 s, 4 s each).

- SIGKILL a member mid all-reduce: its connections are reset, and the survivors' round ends
  within a second of the kill (not at the 4 s timeout), naming it lost; their next round
  averages the three of them.
- The killed member comes back with the same key and averages with all four again.
- SIGSTOP a member mid-round (a laptop that sleeps: connections stay open, nothing answers): the
  survivors' round still ends by its timeout, and their *next* round averages the three of them
  together (the frozen peer is neither leader nor member). SIGCONT: the fourth rejoins.

Every process is ended by the ``swarm`` fixture, which checks that none is left running.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any

import pytest

from .test_daemon_chaos import (
    Daemon,
    Swarm,
    averaging_run,
    is_round,
    peer_config,
    started,
    swarm,  # noqa: F401  (the fixture)
)

pytestmark = pytest.mark.slow

PERIOD, TIMEOUT = 5.0, 4.0
# 1M float32 (4 MB) under an 8 MB/s upload cap: the scatter alone takes about 0.4 s, so a kill
# a moment after "group formed" lands in the middle of the all-reduce.
SIZE = 1_000_000
LIMITS = 'upload_rate = "8 MB/s"'


def finished_at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def round_line(d: Daemon, number: int, timeout: float) -> dict[str, Any]:
    return d.wait_for(lambda line: is_round(line) and line["round"] == number, timeout)


def group_formed(size: int) -> Any:
    return lambda line: line["event"] == "group formed" and line["group"] == size


def wait_for_a_full_round(ds: list[Daemon], timeout: float) -> int:
    """The number of a round, logged from now on, that every daemon of ``ds`` averaged with
    all of them."""
    marks = [len(d.lines()) for d in ds]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        full: list[set[int]] = []
        for d, mark in zip(ds, marks, strict=True):
            assert d.running, f"{d.name} exited; log: {d.log}"
            full.append(
                {
                    int(ln["round"])
                    for ln in d.lines()[mark:]
                    if is_round(ln) and len(ln["members"]) == len(ds) and ln["outcome"] == "done"
                }
            )
        common = set.intersection(*full)
        if common:
            return min(common)
        time.sleep(0.1)
    pytest.fail(f"no round averaged all {len(ds)} daemons within {timeout} s")


@pytest.mark.timeout(300)
def test_kill_and_freeze_cost_one_round_at_most_and_the_peer_comes_back(
    swarm: Swarm,  # noqa: F811
) -> None:
    run = averaging_run(size=SIZE, period=PERIOD, timeout=TIMEOUT, grid="[4]")
    allow = str(swarm.admin.peer_id)
    first = swarm.add("f0", peer_config("f0", bootstrap=[], allow=allow, run=run, limits=LIMITS))
    first.start()
    boot = first.wait_for(started, 60)["address"]
    ds = [first] + [
        swarm.add(
            f"f{i}", peer_config(f"f{i}", bootstrap=[boot], allow=allow, run=run, limits=LIMITS)
        )
        for i in range(1, 4)
    ]
    for d in ds[1:]:
        d.start()
    ids = {d.name: d.wait_for(started, 60)["peer_id"] for d in ds}
    wait_for_a_full_round(ds, 60)

    # -- SIGKILL mid all-reduce ------------------------------------------------------------
    victim, survivors = ds[3], ds[:3]
    formed = victim.wait_for(group_formed(4), 3 * PERIOD, after=len(victim.lines()))
    time.sleep(0.2)  # into the scatter (about 0.4 s at this upload cap)
    victim.signal(signal.SIGKILL)
    killed = time.time()
    victim.wait(10)
    number = int(formed["round"])
    for d in survivors:
        line = round_line(d, number, 2 * PERIOD)
        took = finished_at(line) - killed
        assert took <= 1.0, (d.name, took, line)
        assert line["outcome"] in ("partial", "done"), line
        if line["outcome"] == "partial":
            # it stopped waiting for the victim because it learned it was gone, not at a deadline
            assert line["lost"].get(ids[victim.name]) in ("lost", "unresponsive"), line
    for d in survivors:
        line = round_line(d, number + 1, 2 * PERIOD)
        assert sorted(line["members"]) == sorted(ids[s.name] for s in survivors), line
        assert line["outcome"] == "done", line

    # -- the killed member comes back as itself ---------------------------------------------
    victim.start()
    assert victim.wait_for(started, 60, after=len(victim.lines()))["peer_id"] == ids[victim.name]
    wait_for_a_full_round(ds, 8 * PERIOD)

    # -- SIGSTOP mid-round, then SIGCONT ----------------------------------------------------
    frozen, survivors = ds[2], [ds[0], ds[1], ds[3]]
    formed = frozen.wait_for(group_formed(4), 3 * PERIOD, after=len(frozen.lines()))
    time.sleep(0.2)
    frozen.signal(signal.SIGSTOP)
    stopped_at = time.time()
    try:
        number = int(formed["round"])
        for d in survivors:
            line = round_line(d, number, 2 * PERIOD)
            # by its timeout, whatever the frozen peer holds up (it ends earlier when the
            # silence is found first)
            assert finished_at(line) - stopped_at <= TIMEOUT, (d.name, line)
        for d in survivors:
            line = round_line(d, number + 1, 2 * PERIOD)
            assert sorted(line["members"]) == sorted(ids[s.name] for s in survivors), line
            assert line["outcome"] == "done", line
    finally:
        frozen.signal(signal.SIGCONT)
    wait_for_a_full_round(ds, 8 * PERIOD)
