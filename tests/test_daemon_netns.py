"""Daemons in separate network namespaces, joined by veth links shaped with ``tc tbf``.

Three peers upload at 20, 100 and 400 Mbit/s. The same rounds run twice: once with each
daemon announcing its own link rate as its ``bandwidth`` (spans sized from it), once with
every daemon announcing the same. Spans sized for the links must finish rounds sooner; the test
prints both round times and the span sizes (``pytest -s``).

Needs root, ``ip netns`` and ``tc`` with the tbf qdisc; skipped cleanly otherwise. Every
namespace and link it makes is named after this process and removed in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_daemon_chaos import Daemon, Swarm, grouped, peer_config, started, stop_all
from tests.test_daemon_chaos import swarm as swarm  # the fixture

pytestmark = pytest.mark.slow

#: upload rate of each peer's link, Mbit/s
RATES = (20, 100, 400)
SUBNET = "10.213.47"
SIZE = 500_000  # float32 elements: 2 MB per peer
PERIOD, TIMEOUT = 4.0, 3.5
ROUNDS = 4  # whole rounds measured per configuration


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


class Namespaces:
    """A hub namespace with a bridge, and one namespace per peer with a veth link to it;
    each peer's egress (its upload) shaped with tbf."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}"
        self.hub = f"mphub{tag}"
        self.peers = [f"mpp{tag}x{i}" for i in range(len(RATES))]
        self.made: list[str] = []

    def setup(self) -> None:
        _ip("netns", "add", self.hub)
        self.made.append(self.hub)
        hub = ["netns", "exec", self.hub]
        _ip(*hub, "ip", "link", "add", "br0", "type", "bridge")
        _ip(*hub, "ip", "link", "set", "br0", "up")
        for i, (ns, rate) in enumerate(zip(self.peers, RATES, strict=True)):
            _ip("netns", "add", ns)
            self.made.append(ns)
            inside, outside = f"mpva{os.getpid() % 100000}{i}", f"mpvb{os.getpid() % 100000}{i}"
            _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
            _ip("link", "set", inside, "netns", ns)
            _ip("link", "set", outside, "netns", self.hub)
            peer = ["netns", "exec", ns]
            _ip(*peer, "ip", "link", "set", "lo", "up")
            _ip(*peer, "ip", "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", inside)
            _ip(*peer, "ip", "link", "set", inside, "up")
            _ip(*hub, "ip", "link", "set", outside, "master", "br0")
            _ip(*hub, "ip", "link", "set", outside, "up")
            burst = max(64, rate * 1000 // 8 // 100)  # kbytes: 10 ms at the rate, 64 kB at least
            subprocess.run(
                [
                    *("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inside),
                    *("root", "tbf", "rate", f"{rate}mbit", "burst", f"{burst}kb"),
                    *("latency", "100ms"),
                ],
                check=True,
                capture_output=True,
                timeout=20,
            )

    def teardown(self) -> None:
        # Deleting a namespace deletes the links in it (the veth pairs go with either end).
        for ns in reversed(self.made):
            _ip("netns", "del", ns, check=False)
        self.made.clear()


def _netns_usable() -> str | None:
    """None when namespaces and tbf work here; otherwise why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs ip and tc (iproute2)"
    probe = Namespaces()
    probe.hub = f"mpprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe.hub)
        probe.made.append(probe.hub)
        done = subprocess.run(
            [
                *("ip", "netns", "exec", probe.hub, "tc", "qdisc", "add", "dev", "lo"),
                *("root", "tbf", "rate", "1mbit", "burst", "32kb", "latency", "50ms"),
            ],
            capture_output=True,
            timeout=20,
        )
        if done.returncode != 0:
            return f"tc tbf does not work here: {done.stderr.decode(errors='replace').strip()}"
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace: {exc}"
    finally:
        probe.teardown()
    return None


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    why = _netns_usable()
    if why is not None:
        pytest.skip(why)
    ns = Namespaces()
    try:
        ns.setup()
        yield ns
    finally:
        ns.teardown()
        leftover = _ip("netns", "list").stdout
        assert ns.hub not in leftover and not any(p in leftover for p in ns.peers)


def _measure(
    swarm: Swarm, ns: Namespaces, label: str, bandwidths: list[str]
) -> list[dict[str, Any]]:
    """Run the three daemons with these announced bandwidths; the first ROUNDS whole rounds
    (all three members, every span averaged) that peer 0 logs."""
    allow = str(swarm.admin.peer_id)
    daemons: list[Daemon] = []
    boot: list[str] = []
    for i, (netns, bandwidth) in enumerate(zip(ns.peers, bandwidths, strict=True)):
        run = f"""
[[runs]]
kind = "averaging"
run_id = "{label}"
grid = [3]
size = {SIZE}
round_period = {PERIOD}
round_timeout = {TIMEOUT}
bandwidth = "{bandwidth}"
init = "random"
"""
        name = f"{label}{i}"
        text = peer_config(
            name, bootstrap=boot, allow=allow, run=run, listen=f"{SUBNET}.{i + 1}:7070"
        )
        d = swarm.add(name, text, argv_prefix=["ip", "netns", "exec", netns])
        d.start()
        if i == 0:
            boot = [d.wait_for(started, 30)["address"]]
        daemons.append(d)
    whole: list[dict[str, Any]] = []
    seen = 0
    while len(whole) < ROUNDS:
        line = daemons[0].wait_for(grouped, PERIOD * 4, after=seen)
        seen = daemons[0].lines().index(line) + 1
        if line["outcome"] == "done" and len(line["members"]) == 3:
            whole.append(line)
    stop_all(daemons, 3.0)
    return whole


def _describe(lines: list[dict[str, Any]], ids: dict[str, int]) -> tuple[float, str]:
    totals = [line["seconds"]["allreduce"] for line in lines]
    spans = {ids[r]: end - start for start, end, r, _ in lines[0]["spans"]}
    sizes = ", ".join(f"{RATES[i]} Mbit/s: {spans[i]}" for i in sorted(spans))
    return statistics.median(totals), sizes


@pytest.mark.timeout(240)
def test_spans_sized_for_the_links_finish_rounds_sooner(
    swarm: Swarm, namespaces: Namespaces
) -> None:
    sized = _measure(swarm, namespaces, "prop", [f"{rate} Mbit/s" for rate in RATES])
    equal = _measure(swarm, namespaces, "equal", ["100 Mbit/s"] * len(RATES))
    ids = {}
    for d in swarm.daemons:
        ids[d.wait_for(started, 1)["peer_id"]] = int(d.name[-1])
    sized_time, sized_spans = _describe(sized, ids)
    equal_time, equal_spans = _describe(equal, ids)
    report = (
        f"\nnetns + tbf, uploads {RATES} Mbit/s, {SIZE} float32 ({SIZE * 4 / 1e6:.1f} MB) per "
        f"peer, {ROUNDS} whole rounds each:\n"
        f"  link-sized spans:   all-reduce median {sized_time:.3f} s "
        f"(rounds: {[line['seconds']['allreduce'] for line in sized]}); "
        f"span sizes {sized_spans}\n"
        f"  equal spans:        all-reduce median {equal_time:.3f} s "
        f"(rounds: {[line['seconds']['allreduce'] for line in equal]}); "
        f"span sizes {equal_spans}\n"
        f"  link-sized / equal = {sized_time / equal_time:.2f}"
    )
    print(report)
    Path(swarm.root / "netns-report.txt").write_text(report)
    assert sized_time < equal_time
