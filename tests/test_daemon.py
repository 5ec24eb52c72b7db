"""The daemon in one process: on the in-memory network under the virtual clock (status, rounds,
graceful stop, withdrawal, bootstrap retries, bandwidth caps), and training runs in threads.

The functions at the end are training entry points that the tests (and the real-process tests
in test_daemon_chaos.py) name in their configurations.
"""

from __future__ import annotations

import math
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import structlog
import trio

from moshpit_trio.config import DaemonConfig, parse_config
from moshpit_trio.daemon import (
    STATUS,
    Daemon,
    PeerStatus,
    RateLimitedNetwork,
    fetch_status,
    format_status,
    load_identity,
    training_identity_path,
)
from moshpit_trio.errors import IdentityError, MoshpitError, Rejected, RemoteError, UnknownHandler
from moshpit_trio.identity import Identity
from moshpit_trio.log import configure_logging
from moshpit_trio.testing import PINNED_UNIX_TIME, MemoryNetwork, pin_unix_time
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.transport import Transport, open_transport

RUN = "t"
PERIOD = 1.0


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr() -> Iterator[None]:
    """Daemons log warnings (a bootstrap that failed); send them to this test's stderr, not
    to a stream an earlier test configured and pytest has closed since."""
    saved = structlog.get_config()
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def averaging_config(
    tmp_path: Path,
    i: int,
    *,
    bootstrap: list[str] = (),  # type: ignore[assignment]
    allow: str = "[]",
    size: int = 1000,
    shutdown_timeout: float = 5.0,
    grid: str = "[3]",
    extra: str = "",
) -> DaemonConfig:
    boot = ", ".join(f'"{b}"' for b in bootstrap)
    text = f"""
[peer]
identity = "d{i}.pem"
listen = "h{i}:7070"
bootstrap = [{boot}]
shutdown_timeout = {shutdown_timeout}
[status]
allow = {allow}
[[runs]]
kind = "averaging"
run_id = "{RUN}"
grid = {grid}
size = {size}
round_period = {PERIOD}
round_timeout = 0.8
init = "random"
{extra}
"""
    return parse_config(text, source=str(tmp_path / f"d{i}.toml"))


def seeded(tmp_path: Path, i: int) -> Identity:
    """Fixed identities (written where the config expects them), so runs reproduce."""
    identity = Identity.from_seed(bytes([i + 1]) * 32)
    path = tmp_path / f"d{i}.pem"
    if not path.exists():
        identity.save(path)
    return identity


def pin_the_clock() -> None:
    """Unix time = 1.7e9 now, advancing with trio's clock, in this trio run (the DHT fixes its
    offset on first use). Rounds are slots of Unix time, so without this their phase against
    the virtual clock, and with it every timing in a test, would follow the wall clock. (Under
    a mock clock conftest pins it at the first use anyway; this pins it at the call.)"""
    pin_unix_time(PINNED_UNIX_TIME - trio.current_time())


@asynccontextmanager
async def daemons(
    tmp_path: Path, net: MemoryNetwork, n: int, **options: Any
) -> AsyncIterator[list[Daemon]]:
    pin_the_clock()
    first = seeded(tmp_path, 0)
    boot = [f"ws://h0:7070/{first.peer_id}"]
    async with trio.open_nursery() as nursery:
        out: list[Daemon] = []
        for i in range(n):
            seeded(tmp_path, i)
            config = averaging_config(tmp_path, i, bootstrap=boot if i else [], **options)
            daemon = Daemon(config, network=net.host(f"h{i}"))
            await nursery.start(daemon.run)
            out.append(daemon)
        yield out
        for daemon in out:
            daemon.request_stop()


@asynccontextmanager
async def admin_transport(net: MemoryNetwork, seed: int = 99) -> AsyncIterator[Transport]:
    identity = Identity.from_seed(bytes([seed]) * 32)
    async with open_transport(identity, listen=None, network=net.host(f"admin{seed}")) as t:
        yield t


def next_slot(daemon: Daemon) -> float:
    """Seconds from now to the next round boundary of the shared clock."""
    now = daemon.now()
    return (math.floor(now / PERIOD) + 1) * PERIOD - now


# -- identity --------------------------------------------------------------------------------


def test_identity_is_created_once_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.pem"
    made, created = load_identity(path)
    assert created and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, created_again = load_identity(path)
    assert not created_again and again.peer_id == made.peer_id
    path.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="not a PKCS8 PEM key"):
        load_identity(path)
    assert path.read_bytes() == b"garbage"  # a broken key file is reported, never replaced


def test_identity_with_a_passphrase_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "peer.pem"
    made, _ = load_identity(path, "PASS", {"PASS": "s3cret"})
    assert b"ENCRYPTED" in path.read_bytes()
    assert load_identity(path, "PASS", {"PASS": "s3cret"})[0].peer_id == made.peer_id
    with pytest.raises(MoshpitError, match="passphrase_env names PASS, but it is not set"):
        load_identity(path, "PASS", {})


def test_a_training_run_gets_its_own_key_file_next_to_the_daemons() -> None:
    base = Path("/var/lib/moshpit/peer.pem")
    a = training_identity_path(base, "digits")
    assert a.parent == base.parent and a.name.startswith("peer.digits-") and a.suffix == ".pem"
    assert training_identity_path(base, "a b") != training_identity_path(base, "a_b")


# -- status ----------------------------------------------------------------------------------


async def test_status_answers_allowed_callers_and_refuses_the_rest(
    autojump_clock: Any, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=1, latency=0.005)
    admin = Identity.from_seed(bytes([99]) * 32).peer_id
    async with daemons(tmp_path, net, 3, allow=f'["{admin}"]') as ds:
        started = trio.current_time()
        await trio.sleep(6 * PERIOD)
        async with admin_transport(net) as t:
            target = ds[0].peer.address
            assert target is not None
            status = await fetch_status(t, target, timeout=5)
        async with admin_transport(net, seed=98) as stranger:
            with pytest.raises(Rejected, match="allow list does not name it"):
                await fetch_status(stranger, target, timeout=5)
    assert status.peer_id == str(ds[0].identity.peer_id)
    assert status.addresses == [str(target)] and not status.client_mode
    assert status.uptime_s == pytest.approx(6 * PERIOD + 0.02, abs=0.02)
    assert status.started_at == pytest.approx(ds[0].started_at)
    assert status.routing_table_size == 2  # the other two daemons (the admin is a client)
    assert status.connections >= 2 and status.bytes_sent > 0 and status.bytes_received > 0
    (run,) = status.runs
    assert (run.run_id, run.kind, run.state, run.vector_size) == (RUN, "averaging", "running", 1000)
    # every slot since the start was used: 5 or 6 rounds, all but the first of all three peers
    # (the first may come before every daemon has joined)
    rounds = run.rounds_done + run.rounds_partial + run.rounds_failed
    assert rounds in (5, 6) and run.rounds_done >= rounds - 1
    assert run.bytes_sent == run.bytes_received > 0
    last = run.last_round
    assert last is not None and last.outcome == "done" and len(last.members) == 3
    assert sorted(last.members) == sorted(str(d.identity.peer_id) for d in ds)
    assert [(s.start, s.end) for s in last.spans] == [(0, 334), (334, 667), (667, 1000)]
    assert all(s.included is not None and len(s.included) == 3 for s in last.spans)
    assert started <= trio.current_time()
    # The reply went through msgspec's strict decoder; the table for people shows it all.
    table = format_status(status)
    assert status.peer_id in table and "3 members" in table and "done" in table


async def test_averaging_daemons_reach_the_mean_of_their_vectors(
    autojump_clock: Any, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=2, latency=0.005)
    async with daemons(tmp_path, net, 3) as ds:
        services = [d.services[0] for d in ds]
        start = [s.vector.copy() for s in services]  # type: ignore[attr-defined]
        assert not np.allclose(start[0], start[1])  # "random": seeded by each PeerID
        await trio.sleep(3 * PERIOD)
        target = np.mean(start, axis=0)
        for s in services:
            np.testing.assert_allclose(s.vector, target, rtol=1e-5, atol=1e-6)  # type: ignore[attr-defined]
        means = {round(s.status().vector_mean or 0.0, 5) for s in services}
        assert means == {round(float(target.mean(dtype=np.float64)), 5)}


async def test_status_call_from_a_peer_that_is_no_daemon_and_a_garbled_reply(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=3, latency=0.005)
    async with (
        open_transport(Identity.from_seed(b"\x07" * 32), listen="x:1", network=net.host("x")) as x,
        admin_transport(net) as t,
    ):
        assert x.address is not None
        with pytest.raises(UnknownHandler):
            await fetch_status(t, x.address, timeout=5)
        replies = [b"\x93\x01\x02", msgspec.msgpack.encode({"peer_id": 3}), b"\x00" * 1_100_000]

        async def liar(request: Request) -> bytes:
            return replies.pop(0)

        x.register(STATUS, liar)
        with pytest.raises(RemoteError, match="not a status reply"):
            await fetch_status(t, x.address, timeout=5)
        with pytest.raises(RemoteError, match="not a status reply"):
            await fetch_status(t, x.address, timeout=5)
        with pytest.raises(RemoteError, match="status reply of 1100000 bytes"):
            await fetch_status(t, x.address, timeout=5)


async def test_anyone_may_ask_when_allow_is_star(autojump_clock: Any, tmp_path: Path) -> None:
    net = MemoryNetwork(seed=4, latency=0.005)
    async with daemons(tmp_path, net, 1, allow='["*"]') as ds, admin_transport(net, 50) as t:
        assert ds[0].peer.address is not None
        status = await fetch_status(t, ds[0].peer.address, timeout=5)
    assert isinstance(status, PeerStatus) and status.runs[0].state in ("starting", "running")


# -- graceful stop ---------------------------------------------------------------------------


def rounds_logged(logs: list[dict[str, Any]], slot: int) -> dict[str, dict[str, Any]]:
    """The daemons' "round" log lines for round ``slot``, by the logging peer's short id."""
    return {e["peer"]: e for e in logs if e["event"] == "round" and e["round"] == slot}


async def test_stop_lets_the_round_in_progress_finish(
    autojump_clock: Any, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    # Slow links: a round's all-reduce takes a good part of a second.
    net = MemoryNetwork(seed=5, latency=0.005, bandwidth=2e6)
    async with daemons(tmp_path, net, 3, size=100_000, shutdown_timeout=5.0) as ds:
        victim = ds[1]
        await trio.sleep(3 * PERIOD)
        last = victim.services[0].last_round
        assert last is not None and last.outcome == "done"
        # Stop half-way through the next round's all-reduce (same timings every time).
        into = last.seconds["matchmaking"] + last.seconds["allreduce"] / 2
        await trio.sleep(next_slot(victim) + into)
        slot = math.floor(victim.now() / PERIOD)
        stopped_at = trio.current_time()
        victim.request_stop()
        with trio.fail_after(10):
            while victim.shutdown is None:  # noqa: ASYNC110 - virtual time, polled cheaply
                await trio.sleep(0.01)
        took = trio.current_time() - stopped_at
        assert victim.shutdown == "finished"
        # it waited for the rest of its round only: about half of the all-reduce
        assert 0 < took < last.seconds["allreduce"]
        await trio.sleep(0.5)
    done = victim.services[0].last_round
    assert done is not None and done.round == slot and done.outcome == "done"
    # everyone's round with it was whole
    logged = rounds_logged(logs, slot)
    assert len(logged) == 3
    assert all(e["outcome"] == "done" and len(e["members"]) == 3 for e in logged.values())


async def test_stop_abandons_a_round_past_the_bound_and_groupmates_see_it_missing(
    autojump_clock: Any, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=6, latency=0.005, bandwidth=2e6)
    async with daemons(tmp_path, net, 3, size=100_000, shutdown_timeout=0.05) as ds:
        victim = ds[1]
        vid = str(victim.identity.peer_id)
        await trio.sleep(3 * PERIOD)
        last = victim.services[0].last_round
        assert last is not None and last.outcome == "done"
        into = last.seconds["matchmaking"] + 0.02  # just after the group formed
        await trio.sleep(next_slot(victim) + into)
        rounds_before = sum(victim.services[0].rounds.values())
        slot = math.floor(victim.now() / PERIOD)
        stopped_at = trio.current_time()
        victim.request_stop()
        with trio.fail_after(10):
            while victim.shutdown is None:  # noqa: ASYNC110 - virtual time, polled cheaply
                await trio.sleep(0.01)
        assert victim.shutdown == "abandoned"
        assert trio.current_time() - stopped_at == pytest.approx(0.05, abs=0.011)
        assert sum(victim.services[0].rounds.values()) == rounds_before  # cancelled: no report
        await trio.sleep(2 * PERIOD)
        assert all(o.services[0].state == "running" for o in (ds[0], ds[2]))
    logged = rounds_logged(logs, slot)
    assert victim.identity.peer_id.short not in logged
    assert len(logged) == 2
    for line in logged.values():
        # the victim was in the group, and is named as missing where its part did not come
        assert vid in line["members"] and line["outcome"] == "partial"
        # late, or cut off at once: its streams cancelled ("withdrew"), its connections
        # closed ("lost")
        assert set(line["excluded"].items()) <= {(vid, "late"), (vid, "withdrew"), (vid, "lost")}
        for _, _, reducer, included in line["spans"]:
            if reducer == vid:
                assert included is None  # its span's result never came: own values kept
            else:
                assert included is not None and len(included) >= 2
    # (Whether the victim's own parts arrived depends on how far its writer got: data it had
    # queued still leaves during its goodbye. Where they did not, it is excluded.)
    # and the next round is a whole one, of the two that are left
    after = rounds_logged(logs, slot + 1)
    assert len(after) == 2
    assert all(e["outcome"] == "done" and len(e["members"]) == 2 for e in after.values())


async def test_stop_withdraws_the_announcement_of_the_round_in_progress(
    autojump_clock: Any, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=7, latency=0.005)
    async with daemons(tmp_path, net, 3, shutdown_timeout=5.0) as ds:
        victim = ds[2]
        await trio.sleep(2 * PERIOD)
        # The round has begun: the victim has read the run's directory and announced where the
        # plan puts it (a few network round trips of 5 ms), and is matchmaking (three peers in
        # one group are done 20-25 ms into the round: at 10 ms its announcement is there, at
        # 25 its round is past matchmaking).
        await trio.sleep(next_slot(victim) + 0.015)
        averager = victim.services[0]._averager  # type: ignore[attr-defined]
        key = averager.announcement
        assert key is not None
        records = await ds[0].peer.dht.get_records(key)
        assert records[victim.identity.peer_id.to_bytes()].value != b""
        victim.request_stop()
        await trio.sleep(0.2)
        records = await ds[0].peer.dht.get_records(key)
        assert records[victim.identity.peer_id.to_bytes()].value == b""  # a tombstone


async def test_a_daemon_retries_bootstrapping_until_a_peer_answers(
    autojump_clock: Any, tmp_path: Path, logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=8, latency=0.005)
    pin_the_clock()
    first = seeded(tmp_path, 0)
    seeded(tmp_path, 1)
    boot = [f"ws://h0:7070/{first.peer_id}"]
    late = Daemon(averaging_config(tmp_path, 1, bootstrap=boot), network=net.host("h1"))
    early = Daemon(averaging_config(tmp_path, 0), network=net.host("h0"))
    async with trio.open_nursery() as nursery:
        await nursery.start(late.run)
        await trio.sleep(2.5)  # attempts at 0 and 1 fail; the next is at 3
        assert len(late.peer.dht.table) == 0
        await nursery.start(early.run)
        await trio.sleep(1.0)
        assert first.peer_id in late.peer.dht.table
        late.request_stop()
        early.request_stop()
    failures = [e for e in logs if e["event"] == "bootstrap failed; retrying"]
    assert [f["retry_in"] for f in failures] == [1.0, 2.0]
    assert any(e["event"] == "joined the swarm" for e in logs)


async def test_a_stop_before_joining_starts_no_run(autojump_clock: Any, tmp_path: Path) -> None:
    net = MemoryNetwork(seed=9, latency=0.005)
    pin_the_clock()
    first = seeded(tmp_path, 0)
    seeded(tmp_path, 1)
    lonely = Daemon(
        averaging_config(tmp_path, 1, bootstrap=[f"ws://h0:7070/{first.peer_id}"]),
        network=net.host("h1"),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(lonely.run)
        await trio.sleep(5.0)
        lonely.request_stop()
    assert lonely.shutdown == "finished"
    service = lonely.services[0]
    assert not service.started and service.state == "stopped"  # nobody to average with


# -- bandwidth caps --------------------------------------------------------------------------


@pytest.mark.parametrize(("upload", "download"), [(1e5, None), (None, 1e5)])
async def test_rate_limited_network_caps_a_transfer(
    autojump_clock: Any, upload: float | None, download: float | None
) -> None:
    net = MemoryNetwork(seed=10, latency=0.001)
    payload = bytes(1_000_000)

    async def sink(request: Any) -> bytes:
        n = 0
        async for chunk in request:
            n += len(chunk)
        return str(n).encode()

    a_net = RateLimitedNetwork(net.host("a"), upload=upload, download=download)
    async with (
        open_transport(Identity.from_seed(b"\x0a" * 32), listen="b:1", network=net.host("b")) as b,
        open_transport(Identity.from_seed(b"\x0b" * 32), listen="a:1", network=a_net) as a,
    ):
        b.register_stream("sink", sink)
        assert b.address is not None
        if upload:  # a sends a megabyte to b
            await a.connect(b.address, timeout=5)
            start = trio.current_time()
            async with a.open_stream(b.address, "sink", timeout=60) as stream:
                await stream.send(payload)
                assert await stream.finish() == b"1000000"
            moved = a.bytes_sent
        else:  # b sends a megabyte to a, which reads it slowly
            a.register_stream("sink", sink)
            assert a.address is not None
            await b.connect(a.address, timeout=5)
            start = trio.current_time()
            async with b.open_stream(a.address, "sink", timeout=60) as stream:
                await stream.send(payload)
                assert await stream.finish() == b"1000000"
            moved = a.bytes_received
        took = trio.current_time() - start
    # 1 MB at 100 kB/s: ten seconds, less the burst the pacer lets through at once (64 KiB)
    assert moved > 1_000_000
    assert moved / 1e5 - 0.66 - 0.05 <= took <= moved / 1e5 + 0.05


async def test_a_paced_read_cancelled_mid_wait_loses_no_bytes(autojump_clock: Any) -> None:
    """A read that the download pacer holds back and that is then cancelled keeps its bytes:
    the next reads return them, in order (the pacer already counted them)."""
    left, right = trio.testing.memory_stream_pair()
    limited = RateLimitedNetwork(MemoryNetwork().host("a"), upload=None, download=1e5).wrap(right)
    sent = bytes(range(256)) * 1024  # 256 KiB: past the burst, so reads get paced
    await left.send_all(sent)
    got = bytearray()
    cancelled = 0
    for _ in range(100):  # bounded: lost bytes would leave the loop waiting for more
        with trio.move_on_after(0.1) as scope:  # shorter than a 64 KiB piece takes at 100 kB/s
            got += await limited.receive_some(50_000)
        cancelled += scope.cancelled_caught
        if len(got) >= len(sent):
            break
    assert cancelled > 0  # the case under test happened
    assert bytes(got) == sent
    assert trio.current_time() == pytest.approx((len(sent) - 64 * 1024) / 1e5, abs=0.11)


def test_rate_limited_network_refuses_bad_rates() -> None:
    with pytest.raises(MoshpitError, match="upload rate must be positive"):
        RateLimitedNetwork(MemoryNetwork().host("a"), upload=-1.0, download=None)


# -- training runs (threads; real time) -----------------------------------------------------


def training_config(tmp_path: Path, entry: str, shutdown_timeout: float = 5.0) -> DaemonConfig:
    text = f"""
[peer]
identity = "t.pem"
listen = "127.0.0.1:0"
shutdown_timeout = {shutdown_timeout}
[[runs]]
kind = "training"
run_id = "tr"
entry = "{entry}"
round_period = 1.0
options = {{ steps_per_second = 100 }}
"""
    return parse_config(text, source=str(tmp_path / "t.toml"))


async def test_a_training_run_is_called_with_its_context_and_stops_when_asked(
    tmp_path: Path,
) -> None:
    daemon = Daemon(training_config(tmp_path, "tests.test_daemon:polite_entry"))
    SEEN.clear()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            while not SEEN:  # noqa: ASYNC110 - the thread reports once it runs
                await trio.sleep(0.01)
            service = daemon.services[0]
            assert service.state == "running"
            daemon.request_stop()
    context = SEEN[0]
    assert context.run_id == "tr" and dict(context.options) == {"steps_per_second": 100}
    assert context.identity == training_identity_path(tmp_path / "t.pem", "tr")
    assert context.listen == "127.0.0.1:0"
    assert context.bootstrap == [str(daemon.peer.address)]  # the daemon itself first
    assert context.optimizer_options["round_period"] == 1.0
    assert context.should_stop()
    assert service.state == "stopped" and daemon.shutdown == "finished"


async def test_a_training_run_that_ignores_the_stop_is_abandoned_at_the_bound(
    tmp_path: Path,
) -> None:
    release = threading.Event()
    STUBBORN.append(release)
    try:
        daemon = Daemon(
            training_config(tmp_path, "tests.test_daemon:stubborn_entry", shutdown_timeout=0.3)
        )
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(daemon.run)
                await trio.sleep(0.5)
                start = time.monotonic()
                daemon.request_stop()
        assert daemon.shutdown == "abandoned"
        assert 0.3 <= time.monotonic() - start < 3.0
    finally:
        release.set()  # let the abandoned thread end
        STUBBORN.clear()


async def test_a_failing_training_run_stops_the_daemon_with_its_error(tmp_path: Path) -> None:
    daemon = Daemon(training_config(tmp_path, "tests.test_daemon:failing_entry"))
    with (
        trio.fail_after(30),
        pytest.RaisesGroup(
            pytest.RaisesExc(MoshpitError, match="training run 'tr' failed: ValueError"),
            flatten_subgroups=True,
        ),
    ):
        await daemon.run()
    assert daemon.services[0].state == "failed"


async def test_an_entry_point_that_does_not_exist(tmp_path: Path) -> None:
    daemon = Daemon(training_config(tmp_path, "tests.no_such_module:main"))
    with (
        trio.fail_after(30),
        pytest.RaisesGroup(
            pytest.RaisesExc(MoshpitError, match="cannot load the entry point"),
            flatten_subgroups=True,
        ),
    ):
        await daemon.run()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_training_run_trains_with_a_moshpit_optimizer(tmp_path: Path) -> None:
    """The whole path with torch: context.optimizer() makes a MoshpitOptimizer (its own peer,
    its own key file); the status shows its local step; the stop closes it."""
    daemon = Daemon(training_config(tmp_path, "tests.test_daemon:torch_entry"))
    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            service = daemon.services[0]
            while (service.status().local_step or 0) < 20:  # noqa: ASYNC110
                await trio.sleep(0.1)
            # its background rounds are counted (solo ones: it is alone in its run)
            while service.status().rounds_failed < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)
            daemon.request_stop()
    status = service.status()
    assert status.rounds_done == status.rounds_partial == 0
    assert status.last_round is not None and len(status.last_round.members) == 1
    assert service.state == "stopped" and daemon.shutdown == "finished"
    assert training_identity_path(tmp_path / "t.pem", "tr").exists()


# -- entry points ----------------------------------------------------------------------------

SEEN: list[Any] = []
STUBBORN: list[threading.Event] = []


def polite_entry(context: Any) -> None:
    SEEN.append(context)
    while not context.should_stop():
        time.sleep(0.01)


def stubborn_entry(context: Any) -> None:
    """Ignores the stop; in a test process it is released at the end, in a daemon process it
    ends with the process."""
    release = STUBBORN[0] if STUBBORN else threading.Event()
    release.wait(3600)


def failing_entry(context: Any) -> None:
    raise ValueError("no data")


def torch_entry(context: Any) -> None:
    import torch

    model = torch.nn.Linear(4, 1)
    with context.optimizer(torch.optim.SGD(model.parameters(), lr=0.01)) as opt:
        while not context.should_stop():
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            time.sleep(0.01)


# -- serve(): signals ------------------------------------------------------------------------


async def test_serve_stops_on_the_first_signal_and_calls_the_hard_exit_on_the_second(
    autojump_clock: Any, tmp_path: Path
) -> None:
    import os
    import signal

    net = MemoryNetwork(seed=11, latency=0.005, bandwidth=2e6)
    pin_the_clock()
    seeded(tmp_path, 0)
    # A long bound: the graceful stop waits for the round in progress.
    config = averaging_config(tmp_path, 0, size=100_000, shutdown_timeout=30.0)
    exits: list[int] = []
    async with trio.open_nursery() as nursery:
        first: Daemon = await nursery.start(
            lambda task_status: serve_quietly(config, net, exits, task_status)
        )
        helper_config = averaging_config(
            tmp_path, 1, bootstrap=[str(first.peer.address)], size=100_000
        )
        seeded(tmp_path, 1)
        helper = Daemon(helper_config, network=net.host("h1"))
        await nursery.start(helper.run)
        await trio.sleep(3 * PERIOD + next_slot(first) + 0.05)  # a round is in progress
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0.01)
        assert first.shutdown is None and not exits  # stopping, not stopped
        os.kill(os.getpid(), signal.SIGUSR1)
        await trio.sleep(0.01)
        assert exits == [128 + signal.SIGUSR1]
        helper.request_stop()
    assert first.shutdown == "finished"  # (the test's hard exit does not exit)


async def serve_quietly(
    config: DaemonConfig,
    net: MemoryNetwork,
    exits: list[int],
    task_status: trio.TaskStatus[Daemon],
) -> None:
    import signal

    from moshpit_trio.daemon import serve

    code = await serve(
        config,
        network=net.host("h0"),
        signals=(signal.SIGUSR1,),
        on_second_signal=exits.append,
        task_status=task_status,
    )
    assert code == 0


def test_a_private_daemon_admits_its_own_training_peers(tmp_path: Path) -> None:
    member = Identity.from_seed(b"\x05" * 32).peer_id
    text = f"""
[peer]
identity = "d.pem"
[access]
allowlist = ["{member}"]
[[runs]]
kind = "training"
run_id = "tr"
entry = "nowhere:main"
"""
    config = parse_config(text, source=str(tmp_path / "d.toml"))
    daemon = Daemon(config)
    trainer_key = training_identity_path(tmp_path / "d.pem", "tr")
    assert trainer_key.exists()  # made now, so its PeerID can be listed
    trainer = Identity.load(trainer_key).peer_id
    assert daemon.access.allowlist == frozenset({member, trainer})
    # an open swarm stays open
    open_config = parse_config(
        text.replace(f'allowlist = ["{member}"]', ""), source=str(tmp_path / "o.toml")
    )
    assert Daemon(open_config).access.allowlist is None
