"""Relays at the daemon level, on the in-memory network under the virtual clock: a bootstrap
daemon with the default configuration relays, two client-mode daemons (the default: they reserve
on their bootstrap nodes) reach each other through it, and ``status`` shows both sides."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio

from moshpit_trio.cli import _status
from moshpit_trio.config import parse_config
from moshpit_trio.daemon import Daemon, _TrainingService, fetch_status, format_status
from moshpit_trio.errors import RelayRefused
from moshpit_trio.identity import Identity
from moshpit_trio.log import configure_logging
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.address import InvalidAddress
from moshpit_trio.wire.relay_table import RelayLimits
from moshpit_trio.wire.transport import open_transport

HOP = 0.01
ADMIN = Identity.from_seed(bytes([99]) * 32)


@pytest.fixture(autouse=True)
def log_to_this_tests_stderr() -> Iterator[None]:
    saved = structlog.get_config()
    configure_logging("console", "warning", stream=sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def seeded(tmp_path: Path, name: str, seed: int) -> Identity:
    identity = Identity.from_seed(bytes([seed]) * 32)
    path = tmp_path / f"{name}.pem"
    if not path.exists():
        identity.save(path)
    return identity


def boot_address(tmp_path: Path) -> str:
    return f"ws://boot:7070/{seeded(tmp_path, 'boot', 1).peer_id}"


def bootstrap_config(tmp_path: Path) -> str:
    # what peers/bootstrap.toml says, less the comments: no [relay] section at all
    return (
        '[peer]\nidentity = "boot.pem"\nlisten = "boot:7070"\n'
        f'[status]\nallow = ["{ADMIN.peer_id}"]\n'
    )


def volunteer_config(tmp_path: Path, name: str, extra: str = "") -> str:
    return (
        f'[peer]\nidentity = "{name}.pem"\nclient_mode = true\n'
        f'bootstrap = ["{boot_address(tmp_path)}"]\n[status]\nallow = ["*"]\n{extra}'
    )


@asynccontextmanager
async def swarm(tmp_path: Path, net: MemoryNetwork) -> AsyncIterator[tuple[Daemon, Daemon, Daemon]]:
    from tests.test_daemon import pin_the_clock

    pin_the_clock()
    seeded(tmp_path, "a", 2)
    seeded(tmp_path, "b", 3)
    async with trio.open_nursery() as nursery:
        made = []
        for name, text in [
            ("boot", bootstrap_config(tmp_path)),
            ("a", volunteer_config(tmp_path, "a")),
            ("b", volunteer_config(tmp_path, "b")),
        ]:
            config = parse_config(text, source=str(tmp_path / f"{name}.toml"))
            daemon = Daemon(config, network=net.host(name))
            await nursery.start(daemon.run)
            made.append(daemon)
        boot, a, b = made
        yield boot, a, b
        for daemon in made:
            daemon.request_stop()


async def test_two_client_mode_daemons_reach_each_other_through_the_bootstrap_daemon(
    autojump_clock: Any, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=21, latency=HOP)
    async with swarm(tmp_path, net) as (boot, a, b):
        assert boot.config.relay.offer and boot.peer.transport.relay_service is not None
        assert a.config.relay.relays == (boot_address(tmp_path),)
        # Each reserved before joining (its record then reached nobody) and published as soon
        # as it joined, not at the keeper's 5 s retry.
        await trio.sleep(1.0)
        boot_addr = str(boot.peer.address)
        for d in (a, b):
            keeper = d.peer.relay_keeper
            assert keeper is not None and [str(r) for r in keeper.published] == [boot_addr]
        await trio.sleep(9.0)

        # a asks b for its status by PeerID alone: the DHT names b's relay, a opens a circuit
        start = trio.current_time()
        b_status = await fetch_status(a.peer.transport, b.peer.id, timeout=5)
        first = trio.current_time() - start
        conn = a.peer.transport.connection_to(b.peer.id)
        assert conn is not None and conn.via == boot.peer.id
        # Over the circuit, once it is up: a -> boot -> b and back, four hops exactly.
        start = trio.current_time()
        await fetch_status(a.peer.transport, b.peer.id, timeout=5)
        assert trio.current_time() - start == pytest.approx(4 * HOP)
        # The first one also looked b's record up in the DHT (2 round trips, through the
        # bootstrap node) and set the circuit up as in tests/test_relay.py (circuit request 4
        # hops, each hop's stream credit 2, upgrade + handshake + the call 12): 20 hops.
        assert first == pytest.approx(20 * HOP)

        # b's own view: it holds a reservation on the bootstrap node and published it
        assert b_status.client_mode and b_status.relay is None
        held = b_status.relays
        assert held is not None and held.listed == [boot_addr] and held.want == 2
        assert [h.address for h in held.held] == [boot_addr]
        assert held.published == [boot_addr] and held.publish_error is None
        # renewed at half of the 120 s granted; the record is stored again at half its TTL
        (h,) = held.held
        assert 0 < h.renews_in <= 60.0 and h.renews_in < h.expires_in <= 120.0
        assert held.republish_in is not None and 0 < held.republish_in <= 60.0

        async with open_transport(ADMIN, listen=None, network=net.host("admin")) as t:
            boot_status = await fetch_status(t, boot_addr, timeout=5)
        # an operator asks a client-mode daemon through its relay (`moshpit status ID --via`)
        via = await _status(ADMIN, str(a.peer.id), 5, [boot_addr], network=net.host("admin2"))
        assert via.peer_id == str(a.peer.id) and via.relays.published == [boot_addr]
        with pytest.raises(InvalidAddress, match="or a PeerID with --via RELAY_ADDRESS"):
            await _status(ADMIN, str(a.peer.id), 5, None, network=net.host("admin3"))
        nobody = Identity.from_seed(bytes([77]) * 32).peer_id  # holds no reservation there
        with pytest.raises(RelayRefused, match="no reservation"):
            await _status(ADMIN, str(nobody), 5, [boot_addr], network=net.host("admin4"))
    relay = boot_status.relay
    assert relay is not None and boot_status.relays is None
    assert relay.limits.max_reservations == RelayLimits().max_reservations
    assert relay.reservations == 2
    assert sorted(r.peer for r in relay.reserved) == sorted([str(a.peer.id), str(b.peer.id)])
    assert relay.circuits == relay.circuits_opened == 1 and relay.refusals == {}
    (circuit,) = relay.live
    assert (circuit.initiator, circuit.target, circuit.attached) == (
        str(a.peer.id),
        str(b.peer.id),
        2,
    )
    # the handshake, two status calls and their replies went through it, and nothing else
    assert relay.bytes_forwarded == circuit.bytes > 2 * len(b_status.peer_id)
    assert relay.bans == 0

    table = format_status(boot_status)
    assert (
        "relay      offered: 2 of 128 reservations, 1 of 256 circuits (16 a peer), 1 opened in all"
        in table
    )
    assert f"circuit  {str(a.peer.id)[:10]} -> {str(b.peer.id)[:10]}" in table
    assert "refused: nothing; bans 0" in table
    client_table = format_status(b_status)
    assert "relays     1 held of 2 wanted, from 1 listed" in client_table
    assert f"held     {boot_addr}: renewed in" in client_table
    assert "record   published: 1 relay, stored again in" in client_table


async def test_status_says_when_a_peer_neither_relays_nor_is_reachable(
    autojump_clock: Any, tmp_path: Path
) -> None:
    net = MemoryNetwork(seed=22, latency=HOP)
    from tests.test_daemon import pin_the_clock

    pin_the_clock()
    seeded(tmp_path, "boot", 1)
    seeded(tmp_path, "c", 4)
    no_relay = bootstrap_config(tmp_path) + "[relay]\noffer = false\n"
    async with trio.open_nursery() as nursery:
        boot = Daemon(
            parse_config(no_relay, source=str(tmp_path / "boot.toml")), network=net.host("boot")
        )
        await nursery.start(boot.run)
        c = Daemon(
            parse_config(volunteer_config(tmp_path, "c"), source=str(tmp_path / "c.toml")),
            network=net.host("c"),
        )
        await nursery.start(c.run)
        await trio.sleep(10.0)
        boot_status, c_status = boot.status(), c.status()
        boot.request_stop()
        c.request_stop()
    assert boot_status.relay is None and boot.peer.transport.relay_service is None
    assert "relay      not offered ([relay] offer)" in format_status(boot_status)
    # c keeps asking (its listed relay refuses: "not-a-relay") and publishes nothing
    held = c_status.relays
    assert held is not None and held.held == [] and held.published == []
    assert held.republish_in is None
    text = format_status(c_status)
    assert "relays     0 held of 2 wanted, from 1 listed" in text
    assert "record   not published: nobody can reach this peer" in text


def test_a_client_mode_daemons_training_peer_keeps_reservations_and_a_trainers_does_not(
    tmp_path: Path,
) -> None:
    run = '[[runs]]\nkind = "training"\nrun_id = "tr"\nentry = "m:f"\n'

    class Stub:  # the running peer, as _make_context reads it
        address: Any = None

    for client, text in [
        (True, volunteer_config(tmp_path, "v", run + "[relay]\nwant = 1\n")),
        (False, f'[peer]\nidentity = "t.pem"\nlisten = "127.0.0.1:7070"\n{run}'),
    ]:
        daemon = Daemon(parse_config(text, source=str(tmp_path / "x.toml")))
        daemon._peer = Stub()  # type: ignore[assignment]
        service = daemon.services[0]
        assert isinstance(service, _TrainingService)
        options = service._make_context().optimizer_options
        if client:
            assert (options["relays"], options["relay_want"]) == ([boot_address(tmp_path)], 1)
        else:
            assert options["relays"] == []
        assert not daemon.config.relay.offer  # a daemon with runs does not relay by default
