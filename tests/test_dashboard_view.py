"""SwarmView (sans-IO): records and status replies in, the dashboard's JSON out."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.daemon import (
    HeldRelay,
    HeldRelaysStatus,
    PeerStatus,
    RelayLimitsSummary,
    RelayStatus,
    RoundSummary,
    RunStatus,
)
from moshpit_trio.dashboard.view import MAX_TEXT, Limits, SwarmView
from moshpit_trio.dht.records import Record
from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.training.progress import PeerProgress, encode_progress
from moshpit_trio.wire.relay_table import RelayLimits

RUN = "viewtest"
KEY = b"mp.progress/" + RUN.encode()
T0 = 1_700_000_000.0


def pid(i: int) -> PeerID:
    return Identity.from_seed(i.to_bytes(4, "big") * 8).peer_id


def progress(i: int, **fields: Any) -> PeerProgress:
    base: dict[str, Any] = {
        "peer_id": pid(i),
        "epoch": 0,
        "samples_in_epoch": 100,
        "samples": 100,
        "step": 10,
        "samples_per_s": 10.0,
        "address": None,
        "time": T0,
        "loss": 1.0,
        "started": T0 - 10,
    }
    base.update(fields)
    return PeerProgress(**base)


def record(p: PeerProgress, ttl: float = 15.0, value: bytes | None = None) -> Record:
    return Record(
        key=KEY,
        subkey=p.peer_id.to_bytes(),
        value=encode_progress(p) if value is None else value,
        expiration=p.time + ttl,
        owner_key=b"",
        signature=b"",
    )


def raw(i: int, value: bytes, expiration: float = T0 + 15) -> Record:
    return Record(KEY, pid(i).to_bytes(), value, expiration, b"", b"")


def feed(view: SwarmView, *records: Record, now: float = T0) -> None:
    view.ingest_records({r.subkey: r for r in records}, now)


def rows(view: SwarmView, now: float = T0, **kw: Any) -> dict[str, dict[str, Any]]:
    return {r["peer_id"]: r for r in view.peers(now, limit=200, **kw)["peers"]}


def strict_json(data: Any) -> Any:
    """What the page's JSON.parse would see: no NaN, no infinity."""
    return json.loads(msgspec.json.encode(data), parse_constant=_refuse)


def _refuse(name: str) -> Any:
    raise AssertionError(f"{name} in JSON")


def test_honest_records_make_rows_totals_and_a_history_point() -> None:
    view = SwarmView(RUN)
    feed(
        view,
        record(progress(1, samples=300, samples_per_s=5.0, loss=0.5)),
        record(progress(2, samples=200, samples_per_s=7.0, loss=0.7, address=None)),
        record(progress(3, samples=100, samples_per_s=1.0, loss=2.0, epoch=1)),
    )
    s = view.summary(T0)
    assert s["peers"]["live"] == 3 and s["peers"]["ok"] == 3
    assert s["samples"] == 600 and s["samples_per_s"] == 13.0
    assert s["epoch"] == 1 and s["loss"] == 0.7  # the median of 0.5, 0.7, 2.0
    by_id = rows(view)
    assert by_id[str(pid(1))]["samples"] == 300
    assert by_id[str(pid(1))]["uptime_s"] == 10.0
    assert by_id[str(pid(2))]["client_mode"] is True
    point = view.tick(T0)
    assert (point["live"], point["samples"], point["loss"]) == (3, 600, 0.7)
    assert view.history()["points"] == [point]


def test_records_expire_are_withdrawn_and_replaced_only_by_fresher_ones() -> None:
    view = SwarmView(RUN)
    first = record(progress(1, samples=100), ttl=15)
    feed(view, first)
    newer = record(progress(1, samples=150, time=T0 + 5), ttl=15)
    feed(view, newer, now=T0 + 5)
    feed(view, first, now=T0 + 6)  # a replica that missed the update
    assert rows(view, T0 + 6)[str(pid(1))]["samples"] == 150
    feed(view, now=T0 + 7)  # a read that found nothing: the entry stays until it expires
    assert view.summary(T0 + 7)["peers"]["live"] == 1
    assert view.summary(T0 + 20.0)["peers"]["live"] == 0  # expired at T0 + 20
    feed(view, record(progress(2)))
    feed(view, Record(KEY, pid(2).to_bytes(), b"", T0 + 16, b"", b""), now=T0 + 1)
    assert str(pid(2)) not in rows(view, T0 + 1)


def test_a_billion_samples_is_suspect_and_left_out() -> None:
    view = SwarmView(RUN)
    honest = [record(progress(i, samples=1000 * i)) for i in range(1, 5)]
    liar = record(progress(9, samples=1_000_000_000, samples_per_s=20.0))
    feed(view, *honest, liar)
    row = rows(view)[str(pid(9))]
    assert row["state"] == "suspect" and row["samples"] == 1_000_000_000
    assert any("1,000,000,000 samples in 10 s of uptime" in p for p in row["problems"])
    assert any("over 100x the other peers' median" in p for p in row["problems"])
    s = view.summary(T0)
    assert s["samples"] == 10_000 and s["peers"]["suspect"] == 1
    board = view.leaderboard()["entries"]
    assert [e["peer_id"] for e in board] == [str(pid(i)) for i in (4, 3, 2, 1)]


def test_a_liar_with_a_long_claimed_uptime_is_still_an_outlier() -> None:
    view = SwarmView(RUN)
    honest = [record(progress(i, samples=20_000 + i)) for i in range(1, 5)]
    liar = record(progress(9, samples=10**12, started=T0 - 10**8, samples_per_s=1.0))
    feed(view, *honest, liar)
    assert rows(view)[str(pid(9))]["state"] == "suspect"
    assert view.summary(T0)["samples"] == sum(20_000 + i for i in range(1, 5))


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"samples_per_s": 5e6}, "samples/s; at most"),
        ({"time": T0 + 3600, "started": T0}, "in the future"),
        ({"samples_in_epoch": 500, "samples": 100}, "more samples in this epoch"),
        ({"epoch": 7}, "epoch 7 is ahead"),
    ],
)
def test_impossible_claims_are_named(fields: dict[str, Any], problem: str) -> None:
    view = SwarmView(RUN)
    feed(view, record(progress(1)), record(progress(2)), record(progress(3, **fields)))
    row = rows(view)[str(pid(3))]
    assert row["state"] == "suspect" and any(problem in p for p in row["problems"])


def test_samples_must_grow_plausibly_within_one_life() -> None:
    view = SwarmView(RUN, Limits(max_samples_per_s=100.0, clock_skew=5.0))
    feed(view, record(progress(1, samples=100)))
    feed(view, record(progress(1, samples=50, time=T0 + 1)), now=T0 + 1)
    assert any("went down" in p for p in rows(view, T0 + 1)[str(pid(1))]["problems"])
    feed(view, record(progress(1, samples=100_000, time=T0 + 2)), now=T0 + 2)
    # 99 950 more in 1 s: the rate check with the uptime catches it too; growth names it
    assert any("grew by" in p for p in rows(view, T0 + 2)[str(pid(1))]["problems"])
    # a restart (a new `started`) may begin again from zero
    restarted = progress(1, samples=10, samples_in_epoch=10, time=T0 + 3, started=T0 + 2.5)
    feed(view, record(restarted), now=T0 + 3)
    assert rows(view, T0 + 3)[str(pid(1))]["state"] == "ok"


def test_malformed_and_oversized_records_are_shown_with_the_reason() -> None:
    view = SwarmView(RUN)
    feed(
        view,
        record(progress(1)),
        raw(2, b"\xc1 not msgpack"),
        raw(3, b"\x90" + bytes(5000)),
        raw(4, msgspec.msgpack.encode([0, 0, 0, 0, 0.0, "<img src=x onerror=alert(1)>", T0])),
    )
    by_id = rows(view)
    assert by_id[str(pid(2))]["state"] == "malformed"
    assert "undecodable" in by_id[str(pid(2))]["problems"][0]
    assert "cap is 1024" in by_id[str(pid(3))]["problems"][0]
    bad_address = by_id[str(pid(4))]["problems"][0]
    assert "bad address" in bad_address  # passed on as text; the page shows it as text
    assert all(len(p) <= MAX_TEXT for r in by_id.values() for p in r["problems"])
    s = view.summary(T0)
    assert s["peers"]["malformed"] == 3 and s["samples"] == 100


def test_groups_of_the_last_round_the_peers_agree_on() -> None:
    view = SwarmView(RUN)
    feed(
        view,
        record(progress(1, last_round=5, group=b"AAAAAAAA", group_size=2)),
        record(progress(2, last_round=5, group=b"AAAAAAAA", group_size=2)),
        record(progress(3, last_round=5, group=b"BBBBBBBB", group_size=3)),
        record(progress(4, last_round=5, group=b"", group_size=1)),
        record(progress(5, last_round=4, group=b"CCCCCCCC", group_size=2)),
        record(progress(6, last_round=10**9, group=b"DDDDDDDD", group_size=2)),  # alone there
    )
    g = view.groups()
    assert g["round"] == 5 and g["total_groups"] == 2 and g["solo"] == 1 and g["behind"] == 1
    assert [x["group"] for x in g["groups"]] == [b"BBBBBBBB".hex(), b"AAAAAAAA".hex()]
    assert g["groups"][1]["members"] == sorted([str(pid(1)), str(pid(2))])
    assert g["sizes"] == {"2": 1, "3": 1}
    assert view.summary(T0)["last_round"] == {"round": 5, "groups": 2, "peers": 4, "solo": 1}


def test_the_leaderboard_keeps_every_life_and_peers_that_left() -> None:
    view = SwarmView(RUN)
    feed(view, record(progress(1, samples=500, rounds_done=3)), record(progress(2, samples=100)))
    # peer 1 restarts (a new `started`) and does 200 more; the first life's 500 stay
    later = progress(1, samples=200, rounds_done=1, time=T0 + 10, started=T0 + 5)
    feed(view, record(later), now=T0 + 10)
    entries = view.leaderboard()["entries"]
    assert (entries[0]["peer_id"], entries[0]["samples"], entries[0]["rounds_averaged"]) == (
        str(pid(1)),
        700,
        4,
    )
    # peer 2's record expires (at T0 + 15): it stays on the board, no longer live
    assert {e["peer_id"]: e["live"] for e in view.leaderboard()["entries"]} == {
        str(pid(1)): True,
        str(pid(2)): True,
    }
    view.summary(T0 + 16)
    assert {e["peer_id"]: e["live"] for e in view.leaderboard()["entries"]} == {
        str(pid(1)): True,
        str(pid(2)): False,
    }


def test_a_thousand_peers_page_sort_and_filter() -> None:
    view = SwarmView(RUN)
    feed(view, *(record(progress(i, samples=1000 + i, last_round=1, group=bytes([i % 251]) * 8,
                                 group_size=4)) for i in range(1000)))  # fmt: skip
    started = time.perf_counter()
    page = view.peers(T0, offset=950, limit=50, sort="samples", order="desc")
    summary = view.summary(T0)
    groups = view.groups(limit=20)
    board = view.leaderboard(limit=20)
    view.tick(T0)
    elapsed = time.perf_counter() - started
    assert page["total"] == 1000 and len(page["peers"]) == 50
    assert [r["samples"] for r in page["peers"]] == list(range(1049, 999, -1))
    assert summary["peers"]["live"] == 1000 and len(groups["groups"]) == 20
    assert groups["total_groups"] == 251 and len(board["entries"]) == 20
    assert len(msgspec.json.encode(page)) < 64 * 1024  # a page, not the swarm
    assert elapsed < 1.0, f"one poll's worth of answers took {elapsed:.3f} s at 1000 peers"
    only = view.peers(T0, query=str(pid(7))[:20])
    assert only["total"] >= 1 and str(pid(7)) in {r["peer_id"] for r in only["peers"]}
    asc = view.peers(T0, sort="peer_id", order="asc", limit=3)["peers"]
    assert [r["peer_id"] for r in asc] == sorted(str(pid(i)) for i in range(1000))[:3]


def test_history_is_thinned_evenly_and_keeps_the_newest_point() -> None:
    view = SwarmView(RUN, Limits(history=100))
    for i in range(250):
        view.tick(T0 + i)
    h = view.history(points=10)
    assert h["total"] == 100 and len(h["points"]) == 10
    assert h["points"][0]["t"] == T0 + 150 and h["points"][-1]["t"] == T0 + 249
    with pytest.raises(ConfigError):
        view.history(points=1)


def status_of(peer: PeerID, **changes: Any) -> PeerStatus:
    run = RunStatus(
        run_id=RUN,
        kind="averaging",
        state="running",
        rounds_done=4,
        rounds_partial=1,
        rounds_failed=2,
        bytes_sent=10,
        bytes_received=20,
        last_round=RoundSummary(
            round=9,
            outcome="done",
            members=[str(peer), str(pid(99))],
            spans=[],
            excluded={},
            bytes_sent=1,
            bytes_received=1,
            seconds={"total": 0.5},
            finished_at=T0,
        ),
    )
    fields: dict[str, Any] = {
        "peer_id": str(peer),
        "version": "0.1.0",
        "uptime_s": 30.0,
        "started_at": T0 - 30,
        "addresses": [f"ws://h:1/{peer}"],
        "client_mode": False,
        "routing_table_size": 3,
        "connections": 2,
        "bytes_sent": 1000,
        "bytes_received": 2000,
        "runs": [run],
    }
    fields.update(changes)
    return PeerStatus(**fields)


def test_status_answers_make_daemon_rows_and_refusals_show() -> None:
    view = SwarmView(RUN)
    daemon, refusing, trainer = pid(50), pid(51), pid(1)
    for p in (daemon, refusing, trainer):
        view.note_address(p, f"ws://h:1/{p}")
    feed(view, record(progress(1)))
    assert {p for p, _ in view.status_targets(T0, 10)} == {daemon, refusing, trainer}
    view.ingest_status(daemon, T0, status=status_of(daemon))
    view.ingest_status(refusing, T0, outcome="refused", error="status: not answered")
    view.ingest_status(trainer, T0, outcome="no status call")
    assert view.status_targets(T0 + 1, 10) == []
    assert [p for p, _ in view.status_targets(T0 + 11, 10)] == [daemon]  # ok: every 10 s
    by_id = rows(view, T0 + 1)
    d = by_id[str(daemon)]
    assert d["kind"] == "daemon" and d["bytes_sent"] == 1000 and d["uptime_s"] == 31.0
    assert d["rounds"] == {"done": 4, "partial": 1, "solo": 2}
    assert d["last_round"] == {"round": 9, "group": "", "size": 2}
    assert by_id[str(refusing)]["status"]["outcome"] == "refused"
    assert by_id[str(trainer)]["status"]["outcome"] == "no status call"
    assert view.summary(T0 + 1)["peers"]["daemons"] == 2
    # a daemon that stops answering leaves the table after Limits.status_stale
    view.ingest_status(daemon, T0 + 20, outcome="unreachable", error="reset")
    assert str(daemon) in rows(view, T0 + 20)
    assert str(daemon) not in rows(view, T0 + 120)


@pytest.mark.parametrize(
    "changes",
    [
        {"uptime_s": math.nan},
        {"uptime_s": math.inf},
        {"bytes_sent": -5},
        {"connections": 2**70},
        {"peer_id": str(pid(77))},
    ],
)
def test_a_status_reply_that_cannot_be_true_is_a_bad_reply(changes: dict[str, Any]) -> None:
    view = SwarmView(RUN)
    view.ingest_status(pid(50), T0, status=status_of(pid(50), **changes))
    row = view.peer(pid(50), T0)
    assert row is not None and row["peer"]["status"]["outcome"] == "bad reply"
    strict_json(row)


def test_bad_page_arguments_are_config_errors() -> None:
    view = SwarmView(RUN)
    for kw in (
        {"sort": "__class__"},
        {"order": "sideways"},
        {"limit": 0},
        {"limit": 10_000},
        {"offset": -1},
        {"state": "<b>"},
    ):
        with pytest.raises(ConfigError):
            view.peers(T0, **kw)
    with pytest.raises(ConfigError):
        view.ingest_status(pid(1), T0, outcome="fine")
    with pytest.raises(ConfigError):
        Limits(max_samples_per_s=0)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_any_bytes_in_any_entry_never_break_the_json(values: list[bytes]) -> None:
    view = SwarmView(RUN)
    feed(view, *(raw(i, v) for i, v in enumerate(values)))
    view.tick(T0)
    for data in (
        view.summary(T0),
        view.peers(T0),
        view.groups(),
        view.leaderboard(),
        view.history(),
    ):
        strict_json(data)


@settings(max_examples=150, deadline=None)
@given(
    samples=st.integers(min_value=0, max_value=2**63 - 1),
    rate=st.floats(min_value=0, max_value=1e300),
    loss=st.none() | st.floats(min_value=-1e300, max_value=1e300),
    started=st.none() | st.floats(min_value=0, max_value=T0),
)
def test_decodable_lies_never_break_the_json(
    samples: int, rate: float, loss: float | None, started: float | None
) -> None:
    view = SwarmView(RUN)
    liar = progress(9, samples=samples, samples_in_epoch=0, samples_per_s=rate, loss=loss,
                    started=started)  # fmt: skip
    feed(view, record(progress(1)), record(liar))
    view.tick(T0)
    strict_json(view.summary(T0))
    strict_json(view.peers(T0))
    strict_json(view.leaderboard())


def test_relayed_volunteers_and_relays_show_how_they_are_reached() -> None:
    """A client-mode record says how many relays hold it; a client-mode daemon's status says
    which relays it holds, a relay's status the load it carries."""
    view = SwarmView(RUN)
    feed(
        view,
        record(progress(1, relays=2)),
        record(progress(2)),  # client mode, no relay: it only dials out
        record(progress(3, address=f"ws://h:1/{pid(3)}")),
    )
    relay, volunteer = pid(50), pid(51)
    for p in (relay, volunteer):
        view.note_address(p, f"ws://h:1/{p}")
    offered = RelayStatus(
        limits=RelayLimitsSummary(**dataclasses.asdict(RelayLimits())),
        reservations=7,
        circuits=3,
        circuits_opened=40,
        bytes_forwarded=10**6,
        refusals={},
        bans=0,
        reserved=[],
        live=[],
    )
    held = HeldRelaysStatus(
        listed=[f"ws://h:1/{relay}"],
        want=1,
        held=[HeldRelay(f"ws://h:1/{relay}", 10.0, 20.0)],
        published=[f"ws://h:1/{relay}"],
        republish_in=5.0,
        publish_error=None,
    )
    view.ingest_status(relay, T0, status=status_of(relay, relay=offered))
    view.ingest_status(
        volunteer,
        T0,
        status=status_of(volunteer, addresses=[], client_mode=True, relays=held),
    )
    by_id = rows(view)
    assert (by_id[str(pid(1))]["client_mode"], by_id[str(pid(1))]["relays"]) == (True, 2)
    assert (by_id[str(pid(2))]["client_mode"], by_id[str(pid(2))]["relays"]) == (True, 0)
    assert (by_id[str(pid(3))]["client_mode"], by_id[str(pid(3))]["relays"]) == (False, None)
    assert by_id[str(relay)]["relaying"] == {"reservations": 7, "circuits": 3}
    assert by_id[str(relay)]["relays"] is None
    assert (by_id[str(volunteer)]["client_mode"], by_id[str(volunteer)]["relays"]) == (True, 1)
    assert by_id[str(volunteer)]["relaying"] is None
    peers = view.summary(T0)["peers"]
    assert (peers["client_mode"], peers["relayed"]) == (2, 1)  # the trainers' records
