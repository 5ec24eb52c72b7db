"""Every script in benchmarks/ runs at a tiny size, as a user starts it, and its ``--json`` has
every headline figure: a benchmark that breaks (an import, a refused call, a renamed key) fails
CI here instead of being found by the next person who runs it.

The sizes are tiny, so the figures say nothing about speed; what is checked is that each is
there, a finite number, and sane in sign. The benchmarks' own tests (test_bench_*.py,
test_averaging_sim.py) check what the numbers mean.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

Figures = dict[str, Any]


def _keys(*names: str) -> Callable[[Any], Figures]:
    def pick(out: Any) -> Figures:
        return {name: out.get(name) for name in names}

    return pick


def _averaging_sim(rows: Any) -> Figures:
    figures: Figures = {}
    for row in rows:
        for key in ("rounds_1e9", "rounds_1e4"):
            figures[f"{row['method']} N={row['n']} p={row['p']}: {key}"] = row.get(key)
        if row["method"] == "moshpit-auto":  # its solo check: N = 2..64 at p = 0 among them
            figures[f"moshpit-auto N={row['n']} p={row['p']}: solo_rounds"] = row.get("solo_rounds")
    return figures


def _training(out: Any) -> Figures:
    figures = _keys("speedup_vs_gossip", "speedup_vs_allreduce", "wall_s")(out)
    for name, scenario in out["scenarios"].items():
        for method, row in scenario["methods"].items():
            for key in ("time_to_target_s", "final_accuracy", "bytes_per_peer", "comm_share"):
                figures[f"{name}/{method}: {key}"] = row.get(key)
    return figures


def _faults(out: Any) -> Figures:
    figures = _keys(
        "worst_fault_round_s", "worst_s_after_fault", "next_rounds_averaged", "mismatched_elements"
    )(out)
    for name, row in out["moshpit"]["scenarios"].items():
        for key in ("fault_round_s", "s_after_fault", "next_round_averaged", "mismatched_elements"):
            figures[f"{name}: {key}"] = row.get(key)
    figures["stop_mid: rounds_to_rejoin"] = out["moshpit"]["scenarios"]["stop_mid"].get(
        "rounds_to_rejoin"
    )
    return figures


def _swarm(out: Any) -> Figures:
    figures = _keys(
        "peers", "rounds_to_1e9", "rounds_to_1e9_live", "solo_rounds", "wall_s", "peak_rss_mb"
    )(out)
    for row in out["rows"]:
        for key in ("var_global", "group_mean", "msgs_sent", "bytes_received", "step_s"):
            figures[f"round {row['index']}: {key}"] = row.get(key)
    return figures


@dataclasses.dataclass(frozen=True)
class Bench:
    args: tuple[str, ...]
    headline: Callable[[Any], Figures]
    timeout: float = 90.0
    #: figures that are ``None`` by design in a tiny run, each with what must explain it
    optional: dict[str, str] = dataclasses.field(default_factory=dict)


# One entry per script in benchmarks/ (test_every_benchmark_is_here keeps it so).
TABLE: dict[str, Bench] = {
    "allreduce.py": Bench(
        (
            *("--arms", "moshpit,gloo", "--peers", "2", "--floats", "100000"),
            *("--rounds", "1", "--warmup", "0", "--timeout", "60", "--quiet"),
        ),
        _keys(
            "moshpit_round_s",
            "moshpit_matchmaking_s",
            "moshpit_allreduce_s",
            "gloo_s",
            "ratio_vs_gloo",
            "allreduce_ratio_vs_gloo",
        ),
        # hivemind is never our dependency: without it the JSON says why it is missing
        optional={"hivemind_s": "hivemind_note", "speedup_vs_hivemind": "hivemind_note"},
    ),
    "averaging_sim.py": Bench(
        ("--n", "16", "--grids", "4x4", "--p", "0,0.01", "--seeds", "0", "--rounds", "12"),
        _averaging_sim,
    ),
    "dht.py": Bench(
        (
            *("--nodes", "16", "--rounds", "2", "--keys", "3", "--owned", "2"),
            *("--subkeys", "2", "--readers", "1", "--reread", "2", "--freeze", "0.25"),
        ),
        _keys(
            "store_success",
            "store_p50_ms",
            "get_success",
            "get_p50_ms",
            "get_p99_ms",
            "get_p50_ms_faulty",
            "get_p50_ms_baseline",
            "faulty_vs_baseline",
            "mean_hops",
            "wall_s",
        ),
    ),
    "faults.py": Bench(
        ("--floats", "100000", "--period", "2", "--timeout", "1.6", "--quiet"),
        _faults,
        timeout=120.0,
        # hivemind is never our dependency: without it the JSON says why it is missing
        optional={
            "hivemind_worst_s_after_fault": "hivemind_note",
            "hivemind_mismatched_elements": "hivemind_note",
        },
    ),
    "relay.py": Bench(
        ("--peers", "3", "--floats", "20000", "--rounds", "2", "--warmup", "1", "--quiet"),
        _keys(
            "direct_round_s",
            "relayed_round_s",
            "ratio_round_s",
            "direct_bytes_per_peer",
            "relayed_bytes_per_peer",
            "ratio_bytes_per_peer",
            "relay_bytes_per_round",
            "rounds_succeeded_direct",
            "rounds_succeeded_relayed",
            "mismatched_elements",
            "wall_s",
        ),
    ),
    "swarm.py": Bench(
        # 8 peers: grid "auto" puts them in one group, so round 1 already holds the mean
        ("--peers", "8", "--rounds", "3"),
        _swarm,
        # the numpy reference needs averaging_sim.py's method for the grid; sim_note says
        # when it is missing
        optional={"sim_rounds_to_1e9": "sim_note", "rounds_vs_sim": "sim_note"},
    ),
    "training.py": Bench(
        (
            *("--peers", "4", "--max-time", "60", "--hidden", "64", "--lr", "0.2"),
            *("--target-acc", "0.3", "--after-target", "1", "--preempt-rate", "8"),
            # constrained, uneven links and a small padded state: communication matters
            *("--downtime", "2", "--pad-to", "50000", "--bandwidth", "2e6"),
            *("--link-spread", "8", "--quiet"),
        ),
        _training,
    ),
    "wire_throughput.py": Bench(
        ("--size-mib", "4", "--repeat", "1", "--calls-seconds", "0.3"),
        _keys(
            "ws_mb_s",
            "tcp_mb_s",
            "ratio",
            "signed_calls_per_s",
            "bare_ws_mb_s",
            "bare_ratio",
        ),
    ),
}


def test_every_benchmark_is_here() -> None:
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(TABLE), (
        "add each new benchmark to TABLE (tiny arguments, headline figures); "
        f"missing: {sorted(scripts - set(TABLE))}, gone: {sorted(set(TABLE) - scripts)}"
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("script", sorted(TABLE))
def test_benchmark_runs_tiny_and_reports_every_headline_figure(script: str) -> None:
    bench = TABLE[script]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *bench.args, "--json"],
        capture_output=True,
        text=True,
        timeout=bench.timeout,
        check=False,
    )
    # (--quiet benchmarks say what failed in their JSON, not on stderr)
    assert done.returncode == 0, (done.stderr[-4000:], done.stdout[-4000:])
    out = json.loads(done.stdout)
    figures = bench.headline(out)
    assert figures, "no headline figures found"
    missing = sorted(name for name, value in figures.items() if value is None)
    assert not missing, f"{script}: null headline figures {missing}; stderr: {done.stderr[-2000:]}"
    for name, value in figures.items():
        assert isinstance(value, int | float) and not isinstance(value, bool), (name, value)
        assert math.isfinite(value) and value >= 0, (name, value)
    for name, why in bench.optional.items():
        assert name in out, name
        if out[name] is None:
            assert isinstance(out.get(why), str) and out[why], f"{name} is null with no {why}"
