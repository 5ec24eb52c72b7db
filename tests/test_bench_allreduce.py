"""Smoke test of benchmarks/allreduce.py: its moshpit arm, 2 real peer processes, one round."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "allreduce.py"
FLOATS = 100_000


def _two_processes(arm: str, rounds: int) -> dict[str, Any]:
    """The benchmark's JSON for one arm, 2 processes of FLOATS values, no warm-up."""
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            *("--arms", arm, "--peers", "2", "--floats", str(FLOATS)),
            *("--rounds", str(rounds), "--warmup", "0", "--timeout", "25", "--json", "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def _two_processes_checksum() -> float:
    """The checksum of the mean of v_0 = base and v_1 = 2 * base + 1, computed here on its own."""
    base = (np.arange(FLOATS) % 997) / 997
    mean = ((base + (2 * base + 1)) / 2).astype(np.float32)
    return float(np.sum(mean, dtype=np.float64))


@pytest.mark.slow
def test_moshpit_arm_two_processes_average_exactly() -> None:
    out = _two_processes("moshpit", rounds=1)
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

    (row,) = out["arms"]["moshpit"]["rounds"]
    assert row["groups"] == [2, 2]
    assert row["checksums_agree"]  # both processes hold exactly the same vector
    assert row["max_error"] <= 1e-6
    assert row["checksum"] == pytest.approx(_two_processes_checksum(), rel=1e-9)


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("allreduce_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_links_rates_parse_like_tc() -> None:
    bench = _bench()
    assert bench.parse_links("1gbit", 4) == [1e9] * 4
    assert bench.parse_links("100mbit, 250mbit,500mbit,1.5gbit", 4) == [1e8, 2.5e8, 5e8, 1.5e9]
    assert bench.parse_links("800kbit", 2) == [8e5, 8e5]
    for bad in ("1gbps", "fast", "0mbit", "-1mbit", "1gbit,2gbit", ""):
        with pytest.raises(ValueError):
            bench.parse_links(bad, 4)


def test_links_lower_bounds() -> None:
    bench = _bench()
    floats, mbit = 10_000_000, 1e6
    # equal links: both arms move 1.5x the vector (40 MB) each way per peer at 1 Gbit/s
    equal = bench.lower_bounds(4, floats, [1000 * mbit] * 4)
    assert equal["moshpit"] == pytest.approx(0.48)
    assert equal["gloo"] == pytest.approx(0.48)
    # mixed links: the ring goes at 100 Mbit/s; the 100 Mbit/s peer reduces nothing (its link
    # is too slow for a span: partition.spans), so it moves the 40 MB vector each way, and the
    # two fastest ones, with 1/6 and 5/6 of it, finish sooner (40 MB * 8/3 at 1 Gbit/s)
    mixed = bench.lower_bounds(4, floats, [100 * mbit, 250 * mbit, 500 * mbit, 1000 * mbit])
    assert mixed["gloo"] == pytest.approx(4.8)
    assert mixed["moshpit"] == pytest.approx(3.2, rel=1e-6)
    # in two phases: the slow peer uploads its parts (the whole vector), then downloads the
    # results (as much); on equal links the two phases cost nothing more
    assert mixed["moshpit_phased"] == pytest.approx(2 * 3.2, rel=1e-6)
    assert equal["moshpit_phased"] == pytest.approx(0.48)
    # 400, 500, 500, 500 Mbit/s: every link gets a span, and all four finish at once: the slow
    # one reduces 500/3800 of the vector (an equal cut would need 40 MB * 1.5 at 50 MB/s, 1.2 s)
    close = bench.lower_bounds(4, floats, [400 * mbit] + [500 * mbit] * 3)
    assert close["moshpit"] == pytest.approx(40e6 * (1 + 2 * 500 / 3800) / 50e6, rel=1e-6)


def test_links_say_clearly_when_they_cannot_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _bench()
    monkeypatch.setattr(bench.os, "geteuid", lambda: 1000)
    assert bench.main(["--links", "1gbit"]) == 2
    assert "--links needs root (this is uid 1000)" in capsys.readouterr().err
    monkeypatch.setattr(bench.os, "geteuid", lambda: 0)
    monkeypatch.setattr(bench.shutil, "which", lambda tool: None if tool == "tc" else "/x")
    assert bench.main(["--links", "1gbit"]) == 2
    assert "--links needs tc (iproute2)" in capsys.readouterr().err


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_links_make_namespaces_and_remove_every_one() -> None:
    bench = _bench()
    why = bench.links_unusable()
    if why is not None:
        pytest.skip(why)
    links = bench.Links([1e9, 1e8])
    try:
        links.open()
        listed = _namespaces()
        assert all(name in listed for name in (links.hub, *links.names))
        assert all(tx >= 0 and rx >= 0 for tx, rx in links.counters())
        shaped = subprocess.run(
            ["ip", "netns", "exec", links.names[1], "tc", "qdisc", "show", "dev", links.ifnames[1]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "tbf" in shaped and "100Mbit" in shaped
    finally:
        links.close()
    listed = _namespaces()
    assert not any(name in listed for name in (links.hub, *links.names))
    # A set-up that fails half-way (tc refuses a zero rate) removes what it made, then raises.
    broken = bench.Links([1e9, 0.0])
    with pytest.raises(bench.LinksFailed):
        broken.open()
    listed = _namespaces()
    assert not any(name in listed for name in (broken.hub, *broken.names))


@pytest.mark.slow
def test_floor_arm_two_processes_average_exactly() -> None:
    """The floor yardstick averages what the moshpit arm does, to the same bits, and its
    figures land in the JSON beside the ratio they give."""
    out = _two_processes("floor", rounds=2)
    assert out["failures"] == {"floor": 0}
    assert out["floor_s"] > 0
    assert out["ratio_vs_floor"] is None and out["floor_ratio_vs_gloo"] is None  # arms not run
    for row in out["arms"]["floor"]["rounds"]:
        assert row["checksums_agree"]
        assert row["max_error"] <= 1e-6
        assert row["checksum"] == pytest.approx(_two_processes_checksum(), rel=1e-9)


def test_floor_arm_is_refused_with_links() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arms", "moshpit,floor", "--links", "1gbit"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "floor listen on 127.0.0.1" in done.stderr
