"""benchmarks/relay.py's pure parts: the check of a round report against the values it names
(every wrong element found, nothing else), the summaries and the ratios. (The benchmark itself
runs in test_benchmarks_smoke.py.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "relay.py"
N = 1000


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moshpit_bench_relay", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def before(bench: ModuleType) -> dict[str, np.ndarray]:
    return {str(rank): bench.before_values(3, rank, 5, N) for rank in range(3)}


def weights(bench: ModuleType) -> dict[str, float]:
    return {str(rank): bench.weight_of(rank) for rank in range(3)}


def mean_of(before: dict[str, np.ndarray], names: list[str], part: slice) -> np.ndarray:
    w = [float(int(p) + 1) for p in names]
    total = sum(wi * before[p][part].astype(np.float64) for wi, p in zip(w, names, strict=True))
    return np.asarray(total / sum(w)).astype(np.float32)


def test_before_values_are_seeded_and_in_range(bench: ModuleType) -> None:
    a = bench.before_values(1, 2, 3, N)
    np.testing.assert_array_equal(a, bench.before_values(1, 2, 3, N))
    assert a.dtype == np.float32 and a.min() >= 2.0 and a.max() < 3.0
    assert not np.array_equal(a, bench.before_values(1, 2, 4, N))


def test_a_true_report_has_no_mismatch(bench: ModuleType, before: dict[str, np.ndarray]) -> None:
    everyone = ("0", "1", "2")
    spans = [
        bench.Span(0, 400, everyone),
        bench.Span(400, 700, ("0", "2")),
        bench.Span(700, N, None),
    ]
    now = np.concatenate(
        [
            mean_of(before, list(everyone), slice(0, 400)),
            mean_of(before, ["0", "2"], slice(400, 700)),
            before["1"][700:],
        ]
    )
    assert bench.mismatched(spans, "1", before, weights(bench), now) == 0


def test_every_wrong_element_is_counted(bench: ModuleType, before: dict[str, np.ndarray]) -> None:
    everyone = ("0", "1", "2")
    spans = [bench.Span(0, 500, everyone), bench.Span(500, N, None)]
    now = np.concatenate([mean_of(before, list(everyone), slice(0, 500)), before["1"][500:]])
    now[[3, 17, 499]] += 1e-3  # off the mean by far more than the tolerance
    now[600] = np.nextafter(now[600], np.float32(10))  # kept values must be exact
    assert bench.mismatched(spans, "1", before, weights(bench), now) == 4
    # the mean of the wrong members (unweighted) is wrong almost everywhere
    wrong = np.mean([before[p][:500] for p in everyone], axis=0).astype(np.float32)
    now[:500] = wrong
    assert bench.mismatched(spans, "1", before, weights(bench), now) >= 490


def test_a_solo_round_must_keep_every_value(
    bench: ModuleType, before: dict[str, np.ndarray]
) -> None:
    now = before["2"].copy()
    assert bench.mismatched([], "2", before, weights(bench), now) == 0
    now[-1] += 1
    assert bench.mismatched([], "2", before, weights(bench), now) == 1


def test_elements_no_span_covers_are_mismatched(
    bench: ModuleType, before: dict[str, np.ndarray]
) -> None:
    now = before["0"].copy()
    assert bench.mismatched([bench.Span(0, 900, None)], "0", before, weights(bench), now) == 100


def test_summaries_and_ratios(bench: ModuleType) -> None:
    rows = [
        {
            "round_s": t,
            "matchmaking_s": 0.1,
            "allreduce_s": t - 0.1,
            "wall_s": t,
            "bytes_per_peer": 10.0,
            "link_bytes_per_peer": 12.0,
            "relay_bytes": 40.0,
            "relay_cpu_s": 0.5,
            "peers_cpu_s": 1.0,
            "succeeded": ok,
            "mismatched_elements": bad,
        }
        for t, ok, bad in ((1.0, True, 0), (3.0, False, 2), (2.0, True, 0))
    ]
    out = bench.summarize(rows)
    assert out["round_s"] == 2.0 and out["round_worst_s"] == 3.0
    assert out["rounds_succeeded"] == 2 and out["mismatched_elements"] == 2
    assert out["relay_bytes_per_round"] == 40.0
    empty = bench.summarize([])
    assert empty["round_s"] is None and empty["rounds_succeeded"] == 0
    assert bench.ratio(3.0, 1.5) == 2.0
    assert bench.ratio(None, 1.0) is None and bench.ratio(1.0, 0.0) is None


def test_unthrottled_limits_never_hold_a_round_back(bench: ModuleType) -> None:
    from moshpit_trio.wire.relay_table import Pacer, RelayLimits

    limits = bench.relay_limits(default=False)
    # a day of a 10 GB/s relay fits in the burst alone
    assert limits.circuit_burst >= 1e15 and limits.total_burst >= 1e15
    assert limits.total_bytes_per_s >= 1e15 and limits.circuit_bytes_per_s >= 1e15
    assert bench.relay_limits(default=True) == RelayLimits()
    # the pacer releases a thousand 100 MB bookings at once, at the instant they are made
    pacer = Pacer(limits.total_bytes_per_s, limits.total_burst, now=5.0)
    assert all(pacer.reserve(100_000_000, now=5.0) == 5.0 for _ in range(1000))


@pytest.mark.parametrize(
    "argv",
    [["--peers", "1"], ["--floats", "0"], ["--rounds", "0"], ["--timeout", "-1"]],
)
def test_bad_arguments_are_refused(bench: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2
