"""Smoke test of benchmarks/allreduce.py: its moshpit arm, 2 real peer processes, one round."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "allreduce.py"
FLOATS = 100_000


@pytest.mark.slow
def test_moshpit_arm_two_processes_average_exactly() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--arms", "moshpit", "--peers", "2", "--floats", str(FLOATS)),
            *("--rounds", "1", "--warmup", "0", "--timeout", "25", "--json", "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for key in (
        "peers",
        "floats",
        "moshpit_round_s",
        "moshpit_allreduce_s",
        "gloo_s",
        "ratio_vs_gloo",
        "hivemind_s",
    ):
        assert key in out, key
    assert (out["peers"], out["floats"]) == (2, FLOATS)
    assert out["moshpit_round_s"] > 0
    assert 0 < out["moshpit_allreduce_s"] <= out["moshpit_round_s"]
    assert out["gloo_s"] is None and out["ratio_vs_gloo"] is None  # gloo was not run
    assert out["hivemind_s"] is None
    assert out["failures"] == {"moshpit": 0}

    # The mean of v_0 = base and v_1 = 2 * base + 1, computed here on its own.
    base = (np.arange(FLOATS) % 997) / 997
    mean = ((base + (2 * base + 1)) / 2).astype(np.float32)
    (row,) = out["arms"]["moshpit"]["rounds"]
    assert row["groups"] == [2, 2]
    assert row["checksums_agree"]  # both processes hold exactly the same vector
    assert row["max_error"] <= 1e-6
    assert row["checksum"] == pytest.approx(float(np.sum(mean, dtype=np.float64)), rel=1e-9)
