"""Smoke test of benchmarks/averaging_sim.py on tiny swarms: the methods do what they claim."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from moshpit_trio.averaging.auto_grid import DEFAULT_MAX_GROUP_SIZE, DEFAULT_TARGET_GROUP_SIZE
from moshpit_trio.averaging.grid import Grid

SEEDS = (0, 1)


def _load() -> ModuleType:
    # benchmarks/ is scripts, not a package: load the file by path.
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "averaging_sim.py"
    spec = importlib.util.spec_from_file_location("averaging_sim", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sim = _load()


def rounds(method: str, n: int, p: float, grid: str, threshold: float = 1e-9) -> list[int | None]:
    return [
        sim.rounds_to(sim.run(method, n, p, Grid.parse(grid), seed), threshold) for seed in SEEDS
    ]


@pytest.mark.parametrize(("n", "grid"), [(16, "4x4"), (27, "3x3x3"), (24, "2x3x4")])
@pytest.mark.parametrize("method", ["moshpit-paper", "moshpit-grid-balanced"])
def test_full_grid_without_failures_is_exact_in_d_rounds(n: int, grid: str, method: str) -> None:
    assert rounds(method, n, 0.0, grid) == [Grid.parse(grid).d] * len(SEEDS)


def test_allreduce_takes_one_round_without_failures() -> None:
    assert rounds("allreduce", 64, 0.0, "8x8") == [1, 1]
    # With failures certain every round it never completes.
    assert rounds("allreduce", 64, 0.5, "8x8") == [None, None]


def test_gossip_is_slower_than_moshpit() -> None:
    gossip = rounds("gossip", 64, 0.0, "8x8", threshold=1e-4)
    for method in ("moshpit-paper", "moshpit-grid-random", "moshpit-grid-rank", "random-groups"):
        moshpit = rounds(method, 64, 0.0, "8x8", threshold=1e-4)
        for g, m in zip(gossip, moshpit, strict=True):
            assert m is not None, method
            assert g is None or g > m, method  # None: gossip did not get there in 50 rounds


@pytest.mark.parametrize("method", sorted(sim.ALL_METHODS))
def test_every_method_converges_under_failures(method: str) -> None:
    if method == "allreduce":
        return  # with p = 0.1 and 64 peers a whole round without a failure is rare
    # A ring of 64 mixes slowly: its variance shrinks by about 0.6% a round.
    cap = 3000 if method == "gossip" else 50
    for seed in SEEDS:
        curve = sim.run(method, 64, 0.1, Grid((8, 8)), seed, rounds=cap, stop=1e-4)
        assert curve[-1] <= 1e-4 < curve[0], method


@pytest.mark.parametrize(
    "method",
    ["random-groups", "moshpit-paper", "moshpit-grid-random", "moshpit-grid-rank", "moshpit-auto"],
)
def test_group_averaging_keeps_the_sum_and_never_raises_the_variance(method: str) -> None:
    rng = np.random.default_rng(5)
    x0 = rng.normal(size=48)
    state = sim.ALL_METHODS[method](x0, Grid((8, 8)), np.random.default_rng(6))
    previous = float(np.var(x0))
    for t in range(8):
        state.step(t, rng.random(48) > 0.2)
        assert np.isclose(state.estimates().sum(), x0.sum(), rtol=0, atol=1e-9)
        now = float(np.var(state.estimates()))
        assert now <= previous + 1e-15
        previous = now


def test_pushsum_keeps_its_mass_under_failures() -> None:
    rng = np.random.default_rng(1)
    x0 = rng.normal(size=40)
    state = sim.PushSum(x0, Grid((8, 8)), rng)
    for t in range(20):
        state.step(t, rng.random(40) > 0.3)
    assert np.isclose(state.x.sum(), x0.sum()) and np.isclose(state.w.sum(), 40)


def test_main_prints_json_rows(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--n", "16", "--p", "0,0.1", "--grids", "4x4", "--seeds", "0-1", "--json"]
    assert sim.main([*argv, "--methods", "allreduce,moshpit-paper"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert {(r["p"], r["method"]) for r in rows} == {
        (p, m) for p in (0.0, 0.1) for m in ("allreduce", "moshpit-paper")
    }
    for row in rows:
        assert set(row) >= {"n", "p", "grid", "method", "rounds_1e9", "rounds_1e4"}
        assert row["n"] == 16 and row["grid"] == "4x4" and row["seeds"] == 2
        assert 1 <= row["rounds_1e4"] <= row["rounds_1e9"] <= 50
    assert "N = 16, grid 4x4" in captured.err  # the table, on stderr beside the JSON


def test_main_rejects_unknown_methods(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        sim.main(["--methods", "moshpit,nope"])


@pytest.mark.parametrize(("n", "most"), [(2, 1), (32, 1), (64, 3), (100, 3), (512, 3)])
def test_auto_grid_reaches_the_mean_in_a_few_rounds_with_nobody_alone(n: int, most: int) -> None:
    """grid="auto" at p = 0: one group of all up to 32 peers (exact in one round); beyond, a
    cold start over keys of about four groups' worth, then a column round and a row round on
    planned places; never a peer alone, never a group past the maximum."""
    for seed in SEEDS:
        curve, state = sim.run_sim("moshpit-auto", n, 0.0, Grid((n,)), seed, rounds=8, stop=None)
        assert 1 <= sim.rounds_to(curve, 1e-9) <= most
        assert state.solo_rounds == 0
        assert max(state.group_sizes) <= DEFAULT_MAX_GROUP_SIZE


def test_auto_grid_rows_report_solo_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--n", "40", "--p", "0,0.1", "--grids", "8x8", "--seeds", "0-1", "--solo-n", "2-5"]
    assert sim.main([*argv, "--methods", "moshpit-paper,moshpit-auto", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    auto = [r for r in rows if r["method"] == "moshpit-auto"]
    assert {(r["n"], r["p"]) for r in auto} == {
        (40, 0.0),
        (40, 0.1),
        (2, 0),
        (3, 0),
        (4, 0),
        (5, 0),
    }
    for row in auto:
        assert row["grid"].startswith("auto") and row["solo_rounds"] >= 0
        assert row["rounds_run"] >= row["seeds"]
    check = [r for r in auto if r["n"] <= 5]
    assert all(r["solo_rounds"] == 0 and r["rounds_run"] == 10 * 2 for r in check)
    assert "solo peer-rounds" in captured.err and "N = 2..5" in captured.err
    assert all("solo_rounds" not in r for r in rows if r["method"] != "moshpit-auto")
    assert all(r["overfull_keys"] >= 0 for r in auto)
    assert all("overfull_keys" not in r for r in rows if r["method"] != "moshpit-auto")
    assert "cut into smaller groups than planned" in captured.err


def test_overfull_keys_count_the_stragglers_that_split_a_planned_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At p = 0 everyone holds a planned place after the cold round: no key gets more than the
    # plan expects. At N = 32**2 and p = 0.01, the rows and columns are full but for the
    # places the absent peers left, and the peers back from an absence (or that missed the
    # cold round) pick among those at random: some keys get one too many. The room between
    # the target (32) and the maximum (40) takes them; with no room, they split their keys.
    for n in (64, 1024):
        _, calm = sim.run_sim("moshpit-auto", n, 0.0, Grid((n,)), 0, rounds=6, stop=None)
        assert calm.overfull_keys == 0
    _, roomy = sim.run_sim("moshpit-auto", 1024, 0.01, Grid((1024,)), 0, rounds=6, stop=None)
    assert roomy.overfull_keys == 0
    assert max(roomy.group_sizes) > DEFAULT_TARGET_GROUP_SIZE  # the room was used
    monkeypatch.setitem(
        sim.ALL_METHODS,
        "moshpit-auto",
        lambda x, g, r: sim.MoshpitAuto(x, g, r, max_group_size=DEFAULT_TARGET_GROUP_SIZE),
    )
    _, tight = sim.run_sim("moshpit-auto", 1024, 0.01, Grid((1024,)), 0, rounds=6, stop=None)
    assert tight.overfull_keys > 0
    assert max(tight.group_sizes) == DEFAULT_TARGET_GROUP_SIZE
