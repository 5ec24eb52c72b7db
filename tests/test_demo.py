"""`moshpit demo` end to end: real processes on 127.0.0.1, one killed and restarted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)  # four processes importing torch on two busy cores take a while
def test_demo_trains_restarts_a_peer_and_reports(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    proc = subprocess.run(
        [
            # argv[0] is the interpreter itself: a child started as "python" with
            # executable= resolves its prefix from PATH, which need not be this venv's
            *(sys.executable, "-m", "moshpit_trio", "demo", "--peers", "3", "--seconds", "24"),
            *("--json", "--plot", str(plot), "--logs", str(tmp_path / "logs")),
            *("--dashboard", "127.0.0.1:0"),
        ],
        capture_output=True,
        text=True,
        timeout=220,
        cwd=tmp_path,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["peers"] == 3
    assert result["seconds"] == 24
    assert set(result["per_peer_accuracy"]) == {"peer-0", "peer-1", "peer-2"}
    for acc in [result["final_accuracy"], *result["per_peer_accuracy"].values()]:
        assert 0.0 <= acc <= 1.0
    # the killed peer came back as itself and started from a live peer's state
    assert result["restarted_peer"] == "peer-1"
    assert result["restarted_peer_downloaded"] is True
    # the exit status says whether it caught up, and so does the JSON
    assert (proc.returncode == 0) == result["restarted_peer_caught_up"]
    # the swarm learned something in 24 s (10 classes: chance is 0.1)
    assert result["final_accuracy"] > 0.5
    assert sum(r["rounds_ok"] for r in result["rounds"].values()) > 0
    assert plot.stat().st_size > 10_000
    # every process ended: the orchestrator waited for or killed each one
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
    assert logs == ["bootstrap.log", "dashboard.log", "peer-0.log", "peer-1.log", "peer-2.log"]
    # --dashboard: its URL was printed, and its page followed the swarm (all three trainers)
    dashboard = result["dashboard"]
    assert f"moshpit demo: dashboard at {dashboard['url']}" in proc.stderr
    assert dashboard["url"].startswith("http://127.0.0.1:")
    assert dashboard["most_live_peers"] == 3 and dashboard["most_samples"] > 0


def test_demo_refuses_bad_arguments() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moshpit_trio", "demo", "--peers", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--peers must be at least 2" in proc.stderr
