"""benchmarks/swarm.py on a tiny swarm under the virtual clock: the figures mean what they say."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "swarm.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moshpit_bench_swarm", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


async def test_balanced_grid_holds_the_exact_mean_after_d_rounds(
    autojump_clock: Any, bench: ModuleType
) -> None:
    # 16 peers dealt one per cell of 4x4: two rounds give every peer the global mean
    cfg = bench.Config(peers=16, rounds=3, grid="4x4", balanced_keys=True)
    out = await bench.swarm_benchmark(cfg)
    rows = out["rows"]
    assert [r["group_min"] for r in rows] == [4, 4, 4]
    assert [r["group_max"] for r in rows] == [4, 4, 4]
    assert rows[0]["var_global"] > 1e-3 and rows[1]["var_global"] < 1e-12
    assert out["rounds_to_1e9"] == out["rounds_to_1e9_live"] == 2
    assert out["solo_rounds"] == 0 and out["killed"] == 0
    for r in rows:
        assert r["live"] == r["reported"] == 16 and r["missing"] == 0
        # a round's traffic: at least the all-reduce's parts and results, both ways
        assert r["msgs_sent"] == pytest.approx(r["msgs_received"])
        assert r["msgs_sent"] >= 2 * 3 and r["bytes_sent"] > 0
        # every step returns by its timeout, and the matchmaking is part of it
        assert 0 < r["matchmaking_s"] <= r["step_s"] <= cfg.timeout
    text = io.StringIO()
    bench.print_table(
        {**out, **bench._reference(cfg, 2), "peak_rss_mb": 0.0, "library_warnings": {}}, text
    )
    assert "rounds to 1e-9: 2" in text.getvalue()


async def test_killed_peers_leave_the_statistics(autojump_clock: Any, bench: ModuleType) -> None:
    cfg = bench.Config(peers=12, rounds=3, grid="auto", fail=0.3, seed=1)
    out = await bench.swarm_benchmark(cfg)
    rows = out["rows"]
    assert out["killed"] == sum(r["killed"] for r in rows) > 0
    live = 12
    for r in rows:
        live -= r["killed"]
        assert r["live"] == live  # killed peers stay dead
        assert r["missing"] == 0  # every survivor's step returned by the snapshot


def test_bad_arguments_are_refused(bench: ModuleType) -> None:
    with pytest.raises(SystemExit, match="--grid"):
        bench.Config(grid="4y4").check()
    with pytest.raises(SystemExit, match="--fail"):
        bench.Config(fail=1.0).check()
    with pytest.raises(SystemExit, match="--timeout"):
        bench.Config(timeout=10.0, period=10.0).check()
    with pytest.raises(SystemExit, match="--balanced-keys"):
        bench.Config(balanced_keys=True).check()


async def test_peers_join_in_concurrent_batches(autojump_clock: Any, bench: ModuleType) -> None:
    # batches of 8 join at once: the build takes a few joins' time, not one per peer, and every
    # peer still averages from the first round
    cfg = bench.Config(peers=17, rounds=1, grid="auto", join_batch=8)
    batched = await bench.swarm_benchmark(cfg)
    one_by_one = await bench.swarm_benchmark(bench.Config(peers=17, rounds=1, join_batch=1))
    assert batched["join_batch"] == 8 and one_by_one["join_batch"] == 1
    # peer 0, then 2 batches of 8: 3 joins' time against 17
    assert batched["build_virtual_s"] < one_by_one["build_virtual_s"] / 3
    for out in (batched, one_by_one):
        (row,) = out["rows"]
        assert row["live"] == row["reported"] == 17 and row["solo"] == 0
    with pytest.raises(SystemExit, match="--join-batch"):
        bench.Config(join_batch=0).check()


def test_a_seed_repeats_its_rounds(bench: ModuleType) -> None:
    # Two whole runs (each a trio run of its own, as the command line makes them): the round
    # numbers, variances, groups and virtual times are the same. (Message and dial counts may
    # still differ by a few: not everything that orders the in-memory network's events is
    # seeded.)
    def outcome(out: dict[str, Any]) -> list[tuple[Any, ...]]:
        return [
            (r["round"], r["var_global"], r["groups"], r["group_min"], r["group_max"], r["step_s"])
            for r in out["rows"]
        ]

    cfg = bench.Config(peers=12, rounds=3, grid="auto", seed=3)
    first, second = (bench.run(cfg) for _ in range(2))
    assert outcome(first) == outcome(second)
    # rounds are slots of Unix time, pinned to the virtual clock: the first comes a slot or two
    # after Unix time 1.7e9 (the build and a round's notice), whatever the date
    slot = 1_700_000_000 // int(cfg.period)
    assert slot < first["rows"][0]["round"] <= slot + 3
