"""benchmarks/faults.py's check of a round report against the values it names: it finds every
element that is not what the report says, and nothing else. (The benchmark itself runs in
test_benchmarks_smoke.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py"
N = 1000


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moshpit_bench_faults", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def swarm(bench: ModuleType) -> dict[str, np.ndarray]:
    """Three members' vectors before a round (members "0", "1", "2", weights 1, 2, 3)."""
    return {str(rank): bench.before_values(7, rank, 42, N) for rank in range(3)}


def average(values: dict[str, np.ndarray], names: list[str], part: slice) -> np.ndarray:
    w = [float(int(p) + 1) for p in names]
    mean = sum(wi * values[p][part].astype(np.float64) for wi, p in zip(w, names, strict=True))
    return (mean / sum(w)).astype(np.float32)


def count(bench: ModuleType, values: dict[str, np.ndarray], spans: list, now: np.ndarray) -> int:
    n: int = bench.mismatches(
        spans, now, values["0"], values.__getitem__, lambda p: float(int(p) + 1)
    )
    return n


def test_the_vectors_differ_by_member_and_round_and_repeat(bench: ModuleType) -> None:
    a = bench.before_values(0, 1, 5, N)
    np.testing.assert_array_equal(a, bench.before_values(0, 1, 5, N))
    assert a.dtype == np.float32 and a.min() >= 1 and a.max() < 2
    assert not np.array_equal(a - 1, bench.before_values(0, 0, 5, N))
    assert not np.array_equal(a, bench.before_values(0, 1, 6, N))


def test_a_true_report_has_no_mismatch(bench: ModuleType, swarm: dict[str, np.ndarray]) -> None:
    now = swarm["0"].copy()
    now[:400] = average(swarm, ["0", "1", "2"], slice(0, 400))
    now[400:700] = average(swarm, ["0", "2"], slice(400, 700))  # "1" left out of this span
    spans = [[0, 400, ["0", "1", "2"]], [400, 700, ["0", "2"]], [700, N, None]]
    assert count(bench, swarm, spans, now) == 0


def test_a_span_that_averages_other_members_than_it_names_counts_whole(
    bench: ModuleType, swarm: dict[str, np.ndarray]
) -> None:
    now = swarm["0"].copy()
    now[:500] = average(swarm, ["0", "1"], slice(0, 500))  # but the report says all three
    now[500:] = average(swarm, ["0", "1", "2"], slice(500, N))
    spans = [[0, 500, ["0", "1", "2"]], [500, N, ["0", "1", "2"]]]
    assert count(bench, swarm, spans, now) == 500


def test_kept_values_must_be_exact_and_unnamed_elements_are_kept_values(
    bench: ModuleType, swarm: dict[str, np.ndarray]
) -> None:
    now = swarm["0"].copy()
    now[10] = np.nextafter(now[10], np.float32(10))  # one ulp off in a kept span
    now[900] += 1  # beyond every span: must be own values
    assert count(bench, swarm, [[0, 500, None]], now) == 2


def test_a_step_that_failed_but_changed_values_counts_what_changed(
    bench: ModuleType, swarm: dict[str, np.ndarray]
) -> None:
    """hivemind's failed step names no group (no spans), so every value must be kept; one that
    applied the average to part of the vector before failing leaves that part wrong."""
    now = swarm["0"].copy()
    assert count(bench, swarm, [], now) == 0
    now[:300] = average(swarm, ["0", "1", "2"], slice(0, 300))
    assert count(bench, swarm, [], now) == 300
