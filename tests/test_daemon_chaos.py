"""Peer daemons as real processes on 127.0.0.1: kill -9 mid-round and restart, SIGTERM
mid-round, a second signal, a DHT node without torch, and the command's errors.

Every process a test starts is ended in a ``finally`` (``Swarm.close``), and the test checks
that nothing was left running. Every line a daemon writes is a JSON log line, and the tests
read them as the record of what happened (rounds, groups, stops).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moshpit_trio.identity import Identity

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
MOSHPIT = [sys.executable, "-m", "moshpit_trio"]
#: what a graceful stop may take beyond shutdown_timeout: every connection's GOODBYE
#: (close_timeout 2 s + 1 s) and the interpreter's exit
CLOSE_SLACK = 3.0 + 1.5


class Daemon:
    """One ``moshpit peer`` process and its log (JSON lines on stderr, kept in a file)."""

    def __init__(self, name: str, config: Path, log: Path, argv: list[str] | None = None) -> None:
        self.name, self.config, self.log = name, config, log
        self.argv = argv or [*MOSHPIT, "peer", "--config", str(config)]
        self.process: subprocess.Popen[bytes] | None = None
        self.lives = 0
        self._read = 0  # lines of the log already returned by new_lines()
        #: the unfinished last lines of lives killed mid-write, ended by start() and skipped
        self._fragments: set[str] = set()

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        if self.log.exists():
            text = self.log.read_text()
            if text and not text.endswith("\n"):
                # SIGKILL can land mid-line: end that fragment so the next life's first line
                # is a line of its own, and remember it so lines() does not take it for JSON
                self._fragments.add(text[text.rfind("\n") + 1 :])
                with self.log.open("a") as log:
                    log.write("\n")
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO
            )
        self.lives += 1

    def lines(self) -> list[dict[str, Any]]:
        """Every complete log line so far, parsed (a line that is not JSON fails the test)."""
        text = self.log.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [
            json.loads(line)
            for line in complete.splitlines()
            if line.strip() and line not in self._fragments
        ]

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], timeout: float, after: int = 0
    ) -> dict[str, Any]:
        """The first log line from index ``after`` on that ``match``es; fails at ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines()
            for line in lines[after:]:
                if match(line):
                    return line
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited ({self.process.returncode}); log: {self.log}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no matching log line in {timeout} s; log: {self.log}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()


class Swarm:
    """Daemons of one test; ``close()`` ends whatever is still running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemons: list[Daemon] = []
        self.admin = Identity.generate()
        self.admin_key = root / "admin.pem"
        self.admin.save(self.admin_key)

    def add(self, name: str, text: str, argv_prefix: list[str] | None = None) -> Daemon:
        config = self.root / f"{name}.toml"
        config.write_text(text)
        argv = [*(argv_prefix or []), *MOSHPIT, "peer", "--config", str(config)]
        daemon = Daemon(name, config, self.root / f"{name}.log", argv)
        self.daemons.append(daemon)
        return daemon

    def close(self) -> list[str]:
        """Kill what still runs; returns the names of those that had to be killed."""
        left = [d.name for d in self.daemons if d.running]
        for d in self.daemons:
            d.kill()
        return left


@pytest.fixture
def swarm(tmp_path: Path) -> Iterator[Swarm]:
    s = Swarm(tmp_path)
    try:
        yield s
    finally:
        s.close()
        assert not any(d.running for d in s.daemons)


def peer_config(
    name: str,
    *,
    bootstrap: list[str],
    allow: str,
    run: str = "",
    shutdown_timeout: float = 3.0,
    limits: str = "",
    listen: str = "127.0.0.1:0",
) -> str:
    boot = ", ".join(f'"{b}"' for b in bootstrap)
    return f"""
[peer]
identity = "{name}.pem"
listen = "{listen}"
bootstrap = [{boot}]
shutdown_timeout = {shutdown_timeout}
[limits]
{limits}
[log]
format = "json"
level = "info"
[status]
allow = ["{allow}"]
{run}
"""


def averaging_run(
    size: int, period: float, timeout: float, grid: str, bandwidth: str = "1 Gbit/s"
) -> str:
    return f"""
[[runs]]
kind = "averaging"
run_id = "chaos"
grid = {grid}
size = {size}
round_period = {period}
round_timeout = {timeout}
bandwidth = "{bandwidth}"
init = "random"
"""


def started(line: dict[str, Any]) -> bool:
    return line["event"] == "peer started"


def is_round(line: dict[str, Any]) -> bool:
    return line["event"] == "round"


def grouped(line: dict[str, Any]) -> bool:
    return line["event"] == "round" and len(line["members"]) >= 2


def status_json(swarm: Swarm, address: str) -> dict[str, Any]:
    proc = subprocess.run(
        [*MOSHPIT, "status", address, "--json", "--key", str(swarm.admin_key)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def stop_all(daemons: list[Daemon], shutdown_timeout: float) -> dict[str, float]:
    """SIGTERM every running daemon at once; each must exit 0 within its bound."""
    start = time.monotonic()
    for d in daemons:
        d.signal(signal.SIGTERM)
    took = {}
    for d in daemons:
        assert d.wait(shutdown_timeout + CLOSE_SLACK + 5) == 0, d.log.read_text()[-2000:]
        took[d.name] = round(time.monotonic() - start, 2)
    for d in daemons:
        assert took[d.name] <= shutdown_timeout + CLOSE_SLACK, took
    return took


# -- six daemons, two killed mid-round and restarted ------------------------------------------


@pytest.mark.timeout(180)
def test_six_daemons_survive_two_kill_9_mid_round_and_the_restarted_ones_rejoin(
    swarm: Swarm,
) -> None:
    period, shutdown = 2.0, 3.0
    run = averaging_run(size=50_000, period=period, timeout=1.6, grid="[3, 2]")
    allow = str(swarm.admin.peer_id)
    first = swarm.add("d0", peer_config("d0", bootstrap=[], allow=allow, run=run))
    first.start()
    boot = first.wait_for(started, 30)["address"]
    ds = [first] + [
        swarm.add(f"d{i}", peer_config(f"d{i}", bootstrap=[boot], allow=allow, run=run))
        for i in range(1, 6)
    ]
    for d in ds[1:]:
        d.start()
    ids = {d.name: d.wait_for(started, 60)["peer_id"] for d in ds}
    # Everyone averages with someone before the chaos begins.
    for d in ds:
        d.wait_for(grouped, 60)
    victims, survivors = [ds[2], ds[4]], [ds[0], ds[1], ds[3], ds[5]]
    killed_at: dict[str, float] = {}
    for v in victims:
        # kill -9 the moment it has entered a group: its groupmates are mid-round with it
        v.wait_for(lambda line: line["event"] == "group formed", 30, after=len(v.lines()))
        v.signal(signal.SIGKILL)
        v.wait(10)
        killed_at[v.name] = time.time()
    time.sleep(3 * period)  # the others go on without them
    marks = {v.name: len(v.lines()) for v in victims}
    for v in victims:
        v.start()  # the same config, so the same key file
    for v in victims:
        again = v.wait_for(started, 60, after=marks[v.name])
        assert again["peer_id"] == ids[v.name] and again["identity_created"] is False
    # The restarted ones rejoin: they average in groups again, and others group with them.
    rejoined_at = {}
    for v in victims:
        line = v.wait_for(grouped, 60, after=marks[v.name])
        rejoined_at[v.name] = line["round"]
    deadline = time.monotonic() + 60
    seen_with: set[str] = set()
    while seen_with != {v.name for v in victims}:
        assert time.monotonic() < deadline, f"no survivor grouped with {seen_with} ..."
        for v in victims:
            for s in survivors:
                if any(
                    grouped(line)
                    and ids[v.name] in line["members"]
                    and line["round"] >= rejoined_at[v.name]
                    for line in s.lines()
                ):
                    seen_with.add(v.name)
        time.sleep(0.2)
    status = status_json(swarm, boot)
    print("\nmoshpit status --json of d0 (chaos test):\n" + json.dumps(status, indent=2))
    took = stop_all(ds, shutdown)
    print("stop times (s):", took)

    # -- what the logs say ---------------------------------------------------------------
    logs = {d.name: d.lines() for d in ds}  # every line parsed as JSON, or the test fails
    for d in ds:
        text = d.log.read_text()
        assert text.endswith("\n")
        for raw in text.splitlines():
            json.loads(raw)
    gaps = {}
    for s in survivors:
        rounds = sorted({line["round"] for line in logs[s.name] if is_round(line)})
        gaps[s.name] = max(b - a for a, b in itertools.pairwise(rounds))
        killed_round = min(killed_at.values()) / period
        after_kill = [r for r in rounds if r >= killed_round]
        # the slots of the 3-period wait, and the one in which the restarted peers rejoin
        # (it can be the first after their restart: their announcement outdates the
        # survivors' verdict that they went silent)
        assert len(after_kill) >= 3 + 1, (s.name, rounds)
    print("largest gap between a survivor's rounds (slots):", gaps)
    # Never stopped: at most one slot skipped on these two busy cores, none in a row.
    assert max(gaps.values()) <= 2, gaps
    for d in ds:
        events = [line["event"] for line in logs[d.name]]
        assert events.count("stopped") == 1 and events[-1] == "stopped", d.name
        assert not [line for line in logs[d.name] if line.get("level") == "error"], d.name
    # d0's status: the fields, and counters that match its log
    assert status["peer_id"] == ids["d0"] and status["version"]
    assert status["uptime_s"] > 10 and status["routing_table_size"] >= 3
    assert status["addresses"] == [boot] and status["client_mode"] is False
    assert status["bytes_sent"] > 0 and status["bytes_received"] > 0
    (run_status,) = status["runs"]
    counted = sum(run_status[f"rounds_{k}"] for k in ("done", "partial", "failed"))
    logged_rounds = [line for line in logs["d0"] if is_round(line)]
    assert counted <= len(logged_rounds) and counted >= len(logged_rounds) - 2
    assert run_status["last_round"] is not None and run_status["last_round"]["spans"] is not None


# -- SIGTERM in the middle of a round ----------------------------------------------------------


@pytest.mark.timeout(120)
def test_sigterm_mid_round_exits_0_in_its_bound_and_groupmates_report_it_missing(
    swarm: Swarm,
) -> None:
    # The victim's upload is capped (250 kB/s), so its parts of the all-reduce (about 1 MB)
    # take about four seconds: a SIGTERM right after its group formed finds it mid-round, and
    # its bound (0.2 s) ends the round for it before it could finish. What it had already
    # queued keeps flowing during its goodbye (the connection's close_timeout, 2 s), so the
    # parts must take longer than bound + close_timeout, or they may arrive after all.
    bound = 0.2
    allow = str(swarm.admin.peer_id)
    # The others announce a bandwidth close to the victim's, so that it still reduces a span of
    # its own (spans are sized for the links: one far slower than the others' gets none).
    run = averaging_run(size=250_000, period=6.0, timeout=5.5, grid="[3]", bandwidth="300 kB/s")
    slow_run = averaging_run(
        size=250_000, period=6.0, timeout=5.5, grid="[3]", bandwidth="250 kB/s"
    )
    a = swarm.add("a", peer_config("a", bootstrap=[], allow=allow, run=run))
    a.start()
    boot = a.wait_for(started, 30)["address"]
    b = swarm.add("b", peer_config("b", bootstrap=[boot], allow=allow, run=run))
    victim = swarm.add(
        "victim",
        peer_config(
            "victim",
            bootstrap=[boot],
            allow=allow,
            run=slow_run,
            shutdown_timeout=bound,
            limits='upload_rate = "250 kB/s"',
        ),
    )
    b.start()
    victim.start()
    vid = victim.wait_for(started, 60)["peer_id"]
    for d in (a, b, victim):
        d.wait_for(grouped, 60)
    formed = victim.wait_for(
        lambda line: line["event"] == "group formed", 30, after=len(victim.lines())
    )
    victim.signal(signal.SIGTERM)
    signalled = time.monotonic()
    code = victim.wait(bound + CLOSE_SLACK + 5)
    took = time.monotonic() - signalled
    print(f"\nvictim: exit {code} {took:.2f} s after SIGTERM (bound {bound} s + goodbyes)")
    assert code == 0
    assert took <= bound + CLOSE_SLACK
    stopped = victim.wait_for(lambda line: line["event"] == "stopped", 1)
    assert stopped["rounds"] == "abandoned"
    slot = formed["round"]
    grouped_with_victim = 0
    for mate in (a, b):
        line = mate.wait_for(lambda line: is_round(line) and line["round"] == slot, 10)
        spans = [(r[:10], end - start, inc and len(inc)) for start, end, r, inc in line["spans"]]
        print(
            f"{mate.name}'s round {slot}: {line['outcome']}, excluded {line['excluded']}, "
            f"spans (reducer, size, members averaged) {spans}"
        )
        if vid not in line["members"]:
            continue  # it formed a group without the victim (the victim led another)
        grouped_with_victim += 1
        # The round finished, as "partial": the victim's average of its span never came back
        # (it left first), so that span kept this peer's own values, and the report names the
        # victim as that span's reducer. This peer's reducer left the victim's part out, as
        # "late" (the round's deadline came first), "withdrew" (the victim's abandoned round
        # reset its part streams before its goodbye) or "lost" (its connection ended first);
        # nobody else is missing.
        assert line["outcome"] == "partial", line
        assert set(line["excluded"].items()) <= {(vid, "late"), (vid, "withdrew"), (vid, "lost")}
        (victim_span,) = [span for span in line["spans"] if span[2] == vid]
        assert victim_span[3] is None
        for _, _, reducer, included in line["spans"]:
            if reducer != vid:
                assert included is not None and len(included) >= 2
        # and it goes on making rounds, without the victim
        after = mate.wait_for(lambda line: is_round(line) and line["round"] > slot, 10)
        assert vid not in after["members"]
    assert grouped_with_victim >= 1
    stop_all([a, b], 3.0)
    for d in (a, b, victim):
        assert not [line for line in d.lines() if line.get("level") == "error"]


# -- signals and start-up ------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_second_signal_exits_at_once(swarm: Swarm) -> None:
    # A training run that ignores the stop holds the graceful stop for its whole bound (30 s);
    # the second signal does not wait for it.
    run = """
[[runs]]
kind = "training"
run_id = "stuck"
entry = "tests.test_daemon:stubborn_entry"
round_period = 1.0
"""
    d = swarm.add("d", peer_config("d", bootstrap=[], allow="*", run=run, shutdown_timeout=30.0))
    d.start()
    d.wait_for(lambda line: line["event"] == "training started", 60)
    d.signal(signal.SIGTERM)
    d.wait_for(lambda line: line["event"] == "stopping", 10)
    time.sleep(0.3)
    assert d.running  # still waiting for the training run
    d.signal(signal.SIGINT)
    start = time.monotonic()
    assert d.wait(5) == 128 + signal.SIGINT
    assert time.monotonic() - start < 2.0
    last = d.lines()[-1]
    assert last["event"] == "second signal: exiting at once" and last["signal"] == "SIGINT"


@pytest.mark.timeout(60)
def test_a_training_run_that_ignores_sigterm_is_abandoned_at_the_bound(swarm: Swarm) -> None:
    run = """
[[runs]]
kind = "training"
run_id = "stuck"
entry = "tests.test_daemon:stubborn_entry"
round_period = 1.0
"""
    d = swarm.add("d", peer_config("d", bootstrap=[], allow="*", run=run, shutdown_timeout=1.0))
    d.start()
    d.wait_for(lambda line: line["event"] == "training started", 60)
    took = stop_all([d], 1.0)
    assert took["d"] >= 1.0
    assert d.wait_for(lambda line: line["event"] == "stopped", 1)["rounds"] == "abandoned"


@pytest.mark.timeout(60)
def test_a_dht_node_starts_fast_and_never_imports_torch(swarm: Swarm) -> None:
    d = swarm.add(
        "boot",
        peer_config("boot", bootstrap=[], allow="*"),
        argv_prefix=[],
    )
    d.argv = [sys.executable, "-X", "importtime", *d.argv[1:]]
    begin = time.monotonic()
    d.start()
    # -X importtime writes its table on stderr too: read the log by hand
    deadline = time.monotonic() + 30
    while '"peer started"' not in d.log.read_text():
        assert time.monotonic() < deadline and d.running
        time.sleep(0.02)
    startup = time.monotonic() - begin
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 0
    text = d.log.read_text()
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    print(f"\nDHT node: 'peer started' {startup:.2f} s after launch; {len(imported)} modules")
    assert "moshpit_trio.daemon" in imported  # the table is complete
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    assert "moshpit_trio.training" not in imported
    assert startup < 10.0  # two busy cores; about 1 s when idle


def test_a_bad_config_exits_2_naming_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[peer]\nlisten = "nowhere"\n')
    proc = subprocess.run(
        [*MOSHPIT, "peer", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert f"{config}: [peer] listen: expected HOST:PORT" in proc.stderr
    proc = subprocess.run(
        [*MOSHPIT, "peer", "--config", str(config), "--listen", "127.0.0.1:0", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "MOSHPIT_LOG_LEVEL": "debug"},
    )
    assert proc.returncode == 0, proc.stderr
    checked = json.loads(proc.stdout)
    assert checked["peer"]["listen"] == "127.0.0.1:0" and checked["log"]["level"] == "debug"


def test_a_taken_port_exits_2_naming_the_file_and_key_in_a_json_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "busy.toml"
        config.write_text(f'[peer]\nidentity = "k.pem"\nlisten = "127.0.0.1:{port}"\n')
        proc = subprocess.run(
            [*MOSHPIT, "peer", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
    assert proc.returncode == 2
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert lines[-1]["event"] == "daemon failed" and lines[-1]["level"] == "error"
    assert lines[-1]["error"].startswith(f"{config}: [peer] listen: cannot listen on 127.0.0.1:")


def test_status_of_an_address_where_nobody_listens_is_a_clear_error(tmp_path: Path) -> None:
    peer = Identity.generate().peer_id
    proc = subprocess.run(
        [*MOSHPIT, "status", f"ws://127.0.0.1:9/{peer}", "--timeout", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("moshpit: error:") and "127.0.0.1:9" in proc.stderr
