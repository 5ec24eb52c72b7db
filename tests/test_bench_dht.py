"""Smoke test of benchmarks/dht.py: a tiny in-memory run under the virtual clock."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "dht.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("moshpit_bench_dht", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault", ["churn", "freeze"])
async def test_tiny_swarm_with_faults(autojump_clock: Any, bench: ModuleType, fault: str) -> None:
    cfg = bench.Config(
        nodes=16, rounds=2, keys=3, owned=2, subkeys=2, readers=1, reread=3, **{fault: 0.25}
    )
    result = await bench.memory_benchmark(cfg)
    for key in (
        "nodes",
        "churn",
        "freeze",
        "mode",
        "latency_ms",
        "store_success",
        "get_success",
        "get_success_after_churn",
        "get_p50_ms",
        "get_p99_ms",
        "mean_hops",
        "wall_s",
        "targets",
    ):
        assert key in result, key
    assert result["mode"] == "memory" and result["nodes"] == 16
    assert result[fault] == 0.25 and result[f"{fault}_actual"] == 0.25
    assert result["stores"] == 2 * (3 + 2) * 2 and result["gets"] > 0
    assert result["store_success"] >= 0.9
    assert result["get_success"] >= 0.9 and result["get_success_after_churn"] >= 0.9
    assert result["get_wrong_values"] == 0
    assert 0 < result["get_p50_ms"] <= result["get_p99_ms"]
    assert 1 <= result["mean_hops"] <= 4
    assert result["targets"]["mean_hops"]["pass"]
    if fault == "churn":
        assert result["killed"] == result["joined"] == 4
    else:
        assert result["frozen"] == 4
    table = io.StringIO()
    bench.print_table(result, out=table)
    assert "virtual time" in table.getvalue() and "target:" in table.getvalue()
