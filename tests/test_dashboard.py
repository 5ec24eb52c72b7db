"""The dashboard end to end, without a browser: a real swarm (in-memory network, real time),
the dashboard's peer reading it, its HTTP server on 127.0.0.1, and the JSON API."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from moshpit_trio.config import parse_config
from moshpit_trio.daemon import Daemon
from moshpit_trio.dashboard import open_dashboard
from moshpit_trio.errors import ConfigError

from .dashboard_swarm import ADMIN, RUN, Swarm, training_swarm

pytestmark = pytest.mark.slow


async def get(url: str) -> tuple[int, dict[str, str], bytes]:
    """One HTTP GET (urllib, in a worker thread), whatever the status."""

    def fetch() -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await trio.to_thread.run_sync(fetch)


async def api(base: str, path: str) -> Any:
    status, _, body = await get(base + path)
    assert status == 200, (path, status, body)
    return json.loads(body)


async def wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Poll ``check()`` (async) until it returns something truthy; fail at the deadline."""
    # Polling, not an event: what is checked is another program's answer (HTTP, a browser).
    with trio.move_on_after(timeout):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(0.1)
    raise AssertionError(f"not seen within {timeout} s")


def closed_daemon(tmp_path: Path, swarm: Swarm) -> Daemon:
    """A daemon in the swarm whose [status] allow list does not name the dashboard's key."""
    config = parse_config(
        f"""
[peer]
identity = "closed.pem"
listen = "closed:7070"
bootstrap = ["{swarm.bootstrap}"]
[status]
allow = []
""",
        source=str(tmp_path / "closed.toml"),
    )
    return Daemon(config, network=swarm.net.host("closed"))


async def test_the_api_shows_the_swarm_as_it_is(tmp_path: Path) -> None:
    async with (
        training_swarm(tmp_path, 4) as swarm,
        trio.open_nursery() as nursery,
        open_dashboard(
            ADMIN,
            run_id=RUN,
            bootstrap=[swarm.bootstrap],
            listen="127.0.0.1:0",
            network=swarm.net.host("dash"),
            interval=0.2,
        ) as dash,
    ):
        base = dash.url.rstrip("/")
        closed = await nursery.start(closed_daemon(tmp_path, swarm).run)
        for _ in range(2):
            reports = await swarm.round()
        assert all(r.succeeded and len(r.members) == 4 for r in reports)

        async def caught_up() -> Any:
            s = await api(base, "/api/swarm")
            return s if s["samples"] == swarm.total_samples else None

        summary = await wait_for(caught_up)
        assert summary["run"] == RUN
        assert summary["peers"]["trainers"] == 4 and summary["peers"]["ok"] == 4
        # the published loss of each trainer is the mean of its last round's batches
        last_means = [statistics.fmean(t.losses[-5:]) for t in swarm.trainers]
        assert summary["loss"] == pytest.approx(statistics.median(last_means))
        assert summary["last_round"] == {"round": 1, "groups": 1, "peers": 4, "solo": 0}

        page = await api(base, "/api/peers?sort=peer_id&order=asc")
        trainers = {str(t.peer.id): t for t in swarm.trainers}
        rows = {r["peer_id"]: r for r in page["peers"]}
        assert set(trainers) <= set(rows)
        for pid, t in trainers.items():
            row = rows[pid]
            assert row["state"] == "ok" and row["kind"] == "trainer"
            assert row["samples"] == t.samples == 160 and row["step"] == t.step == 10
            assert row["rounds"] == {"done": 2, "partial": 0, "solo": 0}
            assert row["client_mode"] is False and row["address"] == str(t.peer.address)
            assert row["bytes_sent"] > 0 and row["bytes_received"] > 0
            assert row["last_round"]["size"] == 4

        # the bootstrap daemon answers status to the dashboard's key; trainers have no status
        async def daemon_seen() -> Any:
            r = await api(base, "/api/peers?state=ok")
            by_id = {x["peer_id"]: x for x in r["peers"]}
            d = by_id.get(str(swarm.daemon.peer.id))
            return d if d is not None and d["status"] is not None else None

        d = await wait_for(daemon_seen)
        assert d["kind"] == "daemon" and d["status"]["outcome"] == "ok"
        assert d["status"]["report"]["version"] and d["uptime_s"] > 0

        async def trainers_asked() -> Any:
            r = {x["peer_id"]: x for x in (await api(base, "/api/peers"))["peers"]}
            outcomes = [(r[p]["status"] or {}).get("outcome") for p in trainers]
            return outcomes if all(o == "no status call" for o in outcomes) else None

        await wait_for(trainers_asked)

        # a daemon that does not allow the dashboard's key: shown, refused, with its reason
        async def refused() -> Any:
            status, _, body = await get(f"{base}/api/peers/{closed.peer.id}")
            if status == 404:
                return None  # not asked yet
            r = json.loads(body)
            return r if r["peer"]["status"]["outcome"] == "refused" else None

        row = (await wait_for(refused))["peer"]
        assert row["kind"] == "daemon" and "allow list" in row["status"]["detail"]
        closed.request_stop()

        groups = await api(base, "/api/groups")
        assert groups["round"] == 1 and groups["total_groups"] == 1
        assert groups["groups"][0]["members"] == sorted(trainers)
        board = await api(base, "/api/leaderboard")
        assert {e["peer_id"]: e["samples"] for e in board["entries"]} == {p: 160 for p in trainers}
        history = await api(base, "/api/history?points=50")
        assert history["points"] and history["points"][-1]["samples"] == swarm.total_samples
        one = await api(base, f"/api/peers/{swarm.trainers[0].peer.id}")
        assert one["peer"]["samples"] == 160 and one["credit"]["samples"] == 160

        # a peer that lies about its samples: shown as suspect, left out of the totals
        liar = swarm.trainers[3]
        liar.tracker._samples = 10**9  # what a modified client would publish
        await liar.tracker.refresh()

        async def liar_flagged() -> Any:
            r = await api(base, "/api/peers?state=suspect")
            return r["peers"] if r["total"] == 1 else None

        (flagged,) = await wait_for(liar_flagged)
        assert flagged["peer_id"] == str(liar.peer.id) and flagged["samples"] == 10**9
        assert any("samples" in p for p in flagged["problems"])
        summary = await api(base, "/api/swarm")
        assert summary["samples"] == 3 * 160 and summary["peers"]["suspect"] == 1


async def test_the_server_answers_bad_requests_plainly(tmp_path: Path) -> None:
    async with (
        training_swarm(tmp_path, 2) as swarm,
        open_dashboard(
            ADMIN,
            run_id=RUN,
            bootstrap=[swarm.bootstrap],
            listen="127.0.0.1:0",
            network=swarm.net.host("dash"),
            status=False,
        ) as dash,
    ):
        base = dash.url.rstrip("/")
        status, headers, body = await get(base + "/")
        assert status == 200 and b'<script src="/static/app.js"' in body
        csp = headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert headers["x-content-type-options"] == "nosniff"
        status, headers, _ = await get(base + "/static/app.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        for path, code in [
            ("/api/peers?limit=100000", 400),
            ("/api/peers?limit=-1", 400),
            ("/api/peers?sort=__class__", 400),
            ("/api/history?points=abc", 400),
            ("/api/peers/not-a-peer", 400),
            (f"/api/peers/{ADMIN.peer_id}", 404),
            ("/api/nothing", 404),
            ("/../../etc/passwd", 404),
            ("/api/peers?q=" + "x" * 3000, 400),
        ]:
            status, headers, body = await get(base + path)
            assert status == code, path
            assert headers["content-type"] == "application/json" and "error" in json.loads(body)
        endpoints = await api(base, "/api")
        assert "/api/swarm" in endpoints["endpoints"]

        def post() -> int:
            request = urllib.request.Request(base + "/api/swarm", data=b"x", method="POST")
            try:
                urllib.request.urlopen(request, timeout=10)
            except urllib.error.HTTPError as exc:
                return exc.code
            return 200

        assert await trio.to_thread.run_sync(post) == 405


async def test_open_dashboard_says_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match="HOST:PORT"):
        async with open_dashboard(ADMIN, run_id=RUN, bootstrap=["x"], listen="8080"):
            pass
    with pytest.raises(ConfigError, match="run_id"):
        async with open_dashboard(ADMIN, run_id="", bootstrap=["x"], listen="127.0.0.1:0"):
            pass
    with pytest.raises(ConfigError, match="--bootstrap"):
        async with open_dashboard(ADMIN, run_id=RUN, bootstrap=[], listen="127.0.0.1:0"):
            pass


def test_moshpit_dashboard_command_serves_a_real_swarm(tmp_path: Path) -> None:
    """The command, on real sockets: a bootstrap peer process, then `moshpit dashboard`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    boot = subprocess.Popen(
        [sys.executable, "-m", "moshpit_trio.demo", "bootstrap"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    dash = None
    try:
        assert boot.stdout is not None
        address = json.loads(boot.stdout.readline())["address"]
        dash = subprocess.Popen(
            [
                *(sys.executable, "-m", "moshpit_trio", "dashboard", "--bootstrap", address),
                *("--run", "nothing-yet", "--listen", "127.0.0.1:0"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert dash.stdout is not None
        line = dash.stdout.readline()
        assert line.startswith("dashboard: http://127.0.0.1:"), line
        url = line.split()[1]
        with urllib.request.urlopen(url + "api/swarm", timeout=10) as response:
            summary = json.loads(response.read())
        assert summary["run"] == "nothing-yet" and summary["peers"]["live"] == 0
        dash.send_signal(signal.SIGINT)
        assert dash.wait(timeout=20) == 0
    finally:
        for process in (dash, boot):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process is not None:
                for pipe in (process.stdout, process.stderr):
                    if pipe is not None:
                        pipe.close()
