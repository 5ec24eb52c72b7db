"""The dashboard as a person sees it: a real swarm, the dashboard, and a real headless Chromium.

The swarm is ``dashboard_swarm.training_swarm`` (four numpy trainers and a bootstrap daemon on
the in-memory network, in real time: the browser cannot run on a virtual clock), plus two
peers that publish bad records: one claims a billion samples, one's record carries HTML in its
address. The test opens the page and checks what a person would look at: the peer count, a
row per peer, a loss curve with points, the bad records marked and shown as text, and the
numbers changing after the swarm's next round without a reload. It saves a screenshot
(``dashboard.png`` in the test's tmp_path).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
import trio

from moshpit_trio.dashboard import Dashboard, SwarmView, open_dashboard
from moshpit_trio.dashboard.app import DashboardApp
from moshpit_trio.dashboard.server import _serve_http
from moshpit_trio.identity import Identity
from moshpit_trio.peer import open_peer
from moshpit_trio.training.progress import PeerProgress, encode_progress, progress_key

from .cdp import find_chromium, open_browser
from .dashboard_swarm import ADMIN, RUN, Swarm, training_swarm
from .test_dashboard_view import T0, feed, progress, record

pytestmark = [
    pytest.mark.slow,
    # Skipped only where no Chromium can be found, and never in CI (CI=true), which installs
    # it (.ci/run): there a missing browser is a failure, not a skip.
    pytest.mark.skipif(
        find_chromium() is None and not os.environ.get("CI"),
        reason="no chromium on this machine (apt-get install chromium; .ci/run does)",
    ),
]

XSS = '<img src=x onerror="document.title=1">'


async def round_seen(swarm: Swarm, dash: Dashboard) -> None:
    """One swarm round, then wait until the dashboard has read all of its records."""
    await swarm.round()
    with trio.fail_after(10):
        while dash.view.summary(dash.peer.dht.now())["samples"] != swarm.total_samples:
            await dash.collector.read_done.wait()


async def test_a_person_watching_the_swarm_sees_it_train(tmp_path: Path) -> None:
    async with (
        training_swarm(tmp_path, 4) as swarm,
        open_dashboard(
            ADMIN,
            run_id=RUN,
            bootstrap=[swarm.bootstrap],
            listen="127.0.0.1:0",
            network=swarm.net.host("dash"),
            interval=0.3,
        ) as dash,
        # Two more peers of the swarm, each publishing a bad record under its own entry.
        open_peer(
            Identity.from_seed(b"L" * 32),
            listen="liar:7000",
            network=swarm.net.host("liar"),
            bootstrap=[swarm.bootstrap],
        ) as liar,
        open_peer(
            Identity.from_seed(b"M" * 32),
            listen="mallory:7000",
            network=swarm.net.host("mallory"),
            bootstrap=[swarm.bootstrap],
        ) as mallory,
    ):
        for _ in range(3):
            await round_seen(swarm, dash)
        now = liar.dht.now()
        lie = PeerProgress(
            liar.id, 0, 10**9, 10**9, 5, 50.0, None, now, loss=0.0001, started=now - 10
        )
        key = progress_key(RUN)
        await liar.dht.store(key, encode_progress(lie), ttl=120)
        html = msgspec.msgpack.encode([0, 0, 0, 0, 0.0, XSS, now])
        await mallory.dht.store(key, html, ttl=120)
        honest = swarm.total_samples
        assert honest == 4 * 3 * 80

        async with open_browser(tmp_path, height=1400) as page:
            await page.goto(dash.url)
            trainers = [str(t.peer.id) for t in swarm.trainers]
            everyone = [*trainers, str(swarm.daemon.peer.id), str(liar.id), str(mallory.id)]
            # The peer count: 4 trainers, the bootstrap daemon (it answers the dashboard's
            # status calls), the liar and mallory.
            await page.wait_for("document.getElementById('live-peers').textContent === '7'")
            rows = await page.wait_for(
                "(() => { const r = [...document.querySelectorAll('#peers tbody tr.peer-row')]"
                ".map(tr => tr.dataset.peer); return r.length === 7 ? r : null })()"
            )
            assert sorted(rows) == sorted(everyone)  # a row per peer
            assert await page.eval("document.getElementById('samples').textContent") == "960"
            for pid in trainers:
                cells = await row_cells(page, pid)
                assert cells["samples"] == "240" and cells["rounds"] == "3 / 0 / 0"
                assert cells["mode"] == "public" and cells["state"].startswith("ok")
            daemon = await row_cells(page, str(swarm.daemon.peer.id))
            assert daemon["state"].startswith("ok daemon") and daemon["status"].startswith("ok")
            # The bootstrap daemon relays for client-mode peers ([relay] offer = "auto"): its
            # load, from its status reply. Nobody here needs it.
            assert daemon["mode"] == "public" + "relay for 0, 0 circuits"  # two lines

            # The loss curve: a line and one dot per reading, at least one per round so far.
            points = await page.eval("document.querySelectorAll('#loss-chart circle.point').length")
            assert points >= 3
            assert await page.eval("!!document.querySelector('#loss-chart polyline')")
            loss_text = await page.eval("document.getElementById('loss').textContent")
            assert float(loss_text) > 0

            # The liar: marked suspect, with why, and left out of the total (960, not 10^9).
            liar_cells = await row_cells(page, str(liar.id))
            assert liar_cells["state"].startswith("suspect")
            assert "1,000,000,000 samples in 10 s of uptime" in liar_cells["state"]
            # Mallory's HTML is shown as text, never made into an element.
            mallory_cells = await row_cells(page, str(mallory.id))
            assert mallory_cells["state"].startswith("malformed") and XSS in mallory_cells["state"]
            assert await page.eval("document.querySelectorAll('img').length") == 0
            assert await page.eval("document.title") == "moshpit dashboard"

            # The next round: the page updates by itself (no reload: the marker survives).
            await page.eval("window.__sameDocument = 42")
            before = await page.eval("document.getElementById('loss-chart').dataset.points")
            await round_seen(swarm, dash)
            assert swarm.total_samples == 1280
            await page.wait_for("document.getElementById('samples').textContent === '1,280'")
            for pid in trainers:
                await page.wait_for(
                    f"document.querySelector('tr[data-peer=\"{pid}\"] td.rounds').textContent"
                    " === '4 / 0 / 0'"
                )
                assert (await row_cells(page, pid))["samples"] == "320"
            await page.wait_for(
                "Number(document.getElementById('loss-chart').dataset.points) > " + str(before)
            )
            assert await page.eval("window.__sameDocument") == 42
            summary_round = await page.eval("document.getElementById('last-round').textContent")
            assert summary_round == "#3"  # rounds 0..3 done: the fourth is #3

            shot = await page.screenshot(tmp_path / "dashboard.png")
            assert shot.stat().st_size > 20_000
            assert page.errors == [], page.errors
    print(f"screenshot: {shot}")  # pytest -s shows where to look


async def row_cells(page: object, peer_id: str) -> dict[str, str]:
    """The text of each cell of a peer's row, by the cell's class."""
    text = await page.eval(  # type: ignore[attr-defined]
        "JSON.stringify(Object.fromEntries([...document.querySelector("
        f"'tr[data-peer=\"{peer_id}\"]').cells].map(td => [td.classList[0], td.textContent])))"
    )
    return dict(json.loads(text))


async def test_the_page_stays_usable_at_a_thousand_peers(tmp_path: Path) -> None:
    """A thousand peers' records (the DHT returns at most 256 a read, so they are fed to the
    view directly here): the page shows them 50 at a time, pages, filters, and stays quick."""
    view = SwarmView("thousand")
    records = [
        record(progress(i, samples=1000 + i, last_round=7, group=bytes([i % 250]) * 8,
                        group_size=4, loss=1.0 + i / 1000))
        for i in range(1000)
    ]  # fmt: skip
    feed(view, *records)
    view.tick(T0)
    app = DashboardApp(view, lambda: T0 + 1)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(_serve_http, app, "127.0.0.1:0")
        async with open_browser(tmp_path) as page:
            started = trio.current_time()
            await page.goto(url)
            await page.wait_for("document.getElementById('live-peers').textContent === '1,000'")
            loaded = trio.current_time() - started
            info = "document.getElementById('page-info').textContent"
            assert await page.wait_for(f"{info} === '1–50 of 1,000' && {info}") == "1–50 of 1,000"
            assert await page.eval("document.querySelectorAll('#peers tbody tr').length") == 50
            first = await page.eval("document.querySelector('#peers tbody td.samples').textContent")
            assert first == "1,999"  # sorted by samples, the largest first
            await page.eval("document.getElementById('next').click()")
            await page.wait_for(f"{info} === '51–100 of 1,000'")
            await page.eval(
                "(() => { const f = document.getElementById('filter'); f.value = "
                f"'{progress(123).peer_id}'; f.dispatchEvent(new Event('input')) }})()"
            )
            await page.wait_for(f"{info} === '1–1 of 1'")
            groups = await page.eval("document.querySelectorAll('#groups li').length")
            assert groups == 21  # the 20 biggest groups, and "… and 230 more"
            assert loaded < 10, f"the page took {loaded:.1f} s to show 1000 peers"
            assert page.errors == [], page.errors
        nursery.cancel_scope.cancel()
