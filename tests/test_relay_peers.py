"""Relays at the peer level: a client-mode peer publishes its relays in the DHT, others find
them there and call it by PeerID alone; when its relay dies it moves to another one."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, ConnectionLost
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.relays import (
    MAX_RELAYS,
    RELAY_NAMESPACE,
    decode_relays,
    encode_relays,
    find_relays,
    relay_key,
    rendezvous_order,
)
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.address import PeerAddress
from moshpit_trio.wire.connection import Request
from moshpit_trio.wire.relay_table import RelayLimits

HOP = 0.01


def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i]) * 32)


async def echo(request: Request) -> bytes:
    return bytes(request.payload)


@asynccontextmanager
async def peers(
    n_relays: int, *, a_client_mode: bool = False
) -> AsyncIterator[tuple[MemoryNetwork, list[Peer], Peer, Peer]]:
    net = MemoryNetwork(latency=HOP)
    async with AsyncExitStack() as stack:
        relays: list[Peer] = []
        for i in range(n_relays):
            name = f"r{i}"
            bootstrap = [relays[0].address] if relays else []
            relays.append(
                await stack.enter_async_context(
                    open_peer(
                        ident(1 + i),
                        listen=f"{name}:0",
                        network=net.host(name),
                        bootstrap=[b for b in bootstrap if b is not None],
                        relay=RelayLimits(),
                    )
                )
            )
        addresses = [r.address for r in relays if r.address is not None]
        c = await stack.enter_async_context(
            open_peer(
                ident(10),
                client_mode=True,
                network=net.host("c"),
                bootstrap=addresses[:1],
                relays=addresses,
            )
        )
        a = await stack.enter_async_context(
            open_peer(
                ident(11),
                listen="a:0",
                client_mode=a_client_mode,
                network=net.host("a"),
                bootstrap=addresses[:1],
            )
        )
        c.transport.register("echo", echo)
        yield net, relays, c, a


async def test_a_client_mode_peer_is_called_by_its_peer_id_through_the_relay_it_published(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peers(1) as (_, (r,), c, a):
        assert r.address is not None
        assert await find_relays(a.dht, c.id) == [r.address]
        assert await a.transport.call(c.id, "echo", b"hi", timeout=5) == b"hi"
        conn = a.transport.connection_to(c.id)
        assert conn is not None and conn.via == r.id


async def test_when_its_relay_dies_the_peer_moves_to_another_and_is_reached_there(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a is in client mode too: the two can only ever meet through a relay
    async with peers(2, a_client_mode=True) as (net, relays, c, a):
        # c holds both relays, in its own (rendezvous) order: it publishes them so, and a
        # dials through the first
        assert c.relay_keeper is not None
        addresses = [r.address for r in relays if r.address is not None]
        assert c.relay_keeper.relays == rendezvous_order(c.id, addresses)
        by_address = {r.address: (f"r{i}", r) for i, r in enumerate(relays)}
        (name0, r0), (_, r1) = [by_address[address] for address in c.relay_keeper.relays]
        assert r0.address is not None and r1.address is not None
        assert await find_relays(a.dht, c.id) == [r0.address, r1.address]
        assert await a.transport.call(c.id, "echo", b"one", timeout=5) == b"one"
        first = a.transport.connection_to(c.id)
        assert first is not None and first.via == r0.id
        net.kill(name0)
        killed = trio.current_time()
        await first.wait_closed()
        assert trio.current_time() == killed  # the circuit ends with its relay, at once
        assert await a.transport.call(c.id, "echo", b"two", timeout=5) == b"two"
        second = a.transport.connection_to(c.id)
        assert second is not None and second.via == r1.id
        # the dead relay is no longer a route to c: the next dial does not try it first
        assert a.transport.relay.routes[c.id] == [r1.address]
        # within a second (not at a reservation's or a record's expiry) c publishes r1 alone
        await trio.sleep(1.0)
        assert await find_relays(a.dht, c.id) == [r1.address]


def test_relay_records_encode_and_decode() -> None:
    owner = ident(3).peer_id
    relays = [PeerAddress("h", 1000 + i, ident(20 + i).peer_id) for i in range(MAX_RELAYS)]
    value = encode_relays(relays)
    assert len(value) <= RELAY_NAMESPACE.max_value_size
    assert decode_relays(value, owner) == relays
    assert RELAY_NAMESPACE.owned and relay_key(owner) == f"mp.relay/{owner}"
    with pytest.raises(ConfigError):
        encode_relays([])
    with pytest.raises(ConfigError):
        encode_relays(relays + relays[:1])
    # garbage, bad addresses, the owner itself and repeats are left out
    mixed = [str(relays[0]), "nonsense", f"ws://h:1/{owner}", str(relays[0]), str(relays[1])]
    assert decode_relays(msgspec.msgpack.encode(mixed), owner) == relays[:1]
    assert decode_relays(b"\xc1", owner) == []
    assert decode_relays(msgspec.msgpack.encode([1, 2]), owner) == []


async def test_a_client_mode_peer_cannot_offer_relaying(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(ConfigError):
        async with open_peer(ident(1), client_mode=True, relay=RelayLimits()):
            pass  # pragma: no cover


async def test_a_record_nobody_else_holds_is_not_published_until_the_peer_joins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=HOP)
    async with open_peer(ident(1), listen="r:0", network=net.host("r"), relay=RelayLimits()) as r:
        assert r.address is not None
        # reserves on r but joins nobody (as a daemon does before its own bootstrap)
        async with open_peer(
            ident(10), client_mode=True, network=net.host("c"), relays=[r.address], relay_want=1
        ) as c:
            keeper = c.relay_keeper
            assert keeper is not None and list(keeper.held) == [r.address]
            assert keeper.published == ()
            assert keeper.republish_at == pytest.approx(trio.current_time() + 5.0)  # retried
            assert keeper.publish_error == "Unreachable: no other peer took the record"
            await c.dht.bootstrap([r.address])
            keeper.wake()
            # one store: a lookup on r and the store itself, two round trips
            await trio.sleep(4 * HOP - 0.001)
            assert keeper.published == ()
            await trio.sleep(0.002)
            assert keeper.published == (r.address,) and keeper.publish_error is None
            assert await find_relays(r.dht, c.id) == [r.address]


async def test_a_relayed_call_in_flight_fails_with_a_typed_error_when_the_relay_dies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with peers(1) as (net, _, c, a):

        async def slow(request: Request) -> bytes:
            await trio.sleep(50)
            return b""

        c.transport.register("slow", slow)
        await a.transport.call(c.id, "echo", b"", timeout=5)
        async with trio.open_nursery() as nursery:

            async def kill() -> None:
                await trio.sleep(0.5)
                net.kill("r0")

            nursery.start_soon(kill)
            start = trio.current_time()
            with pytest.raises(ConnectionLost):
                await a.transport.call(c.id, "slow", b"", timeout=30)
            assert trio.current_time() - start == pytest.approx(0.5)


async def test_what_a_peer_remembers_about_others_relays_stays_bounded(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long-lived peer looks up thousands of peers over its life: the routes it learned and
    # the peers it found without relays are capped (the oldest go), not kept forever.
    from moshpit_trio.errors import Unreachable
    from moshpit_trio.wire import relay as relay_module
    from moshpit_trio.wire import transport as transport_module

    monkeypatch.setattr(relay_module, "MAX_ROUTED", 3)
    monkeypatch.setattr(transport_module, "_MAX_UNRESOLVED", 3)
    net = MemoryNetwork(latency=HOP)
    async with open_peer(ident(1), listen="a:0", network=net.host("a")) as a:
        endpoint = a.transport.relay
        relay = PeerAddress.parse(f"ws://r:1/{ident(2).peer_id}")
        others = [ident(20 + i).peer_id for i in range(5)]
        for peer in others:
            endpoint.add_route(peer, relay)
        assert list(endpoint.routes) == others[2:]
        endpoint.routes.clear()

        lookups: list[object] = []

        async def nothing_published(peer: object) -> list[PeerAddress]:
            lookups.append(peer)
            return []

        endpoint.resolver = nothing_published
        for peer in others:
            with pytest.raises(Unreachable):
                await a.transport.connect(peer, timeout=1)
        assert lookups == others
        unresolved = a.transport._unresolved
        assert len(unresolved) == 3 and list(unresolved) == others[2:]
        # a peer still remembered is not looked up again; one dropped from memory is
        with pytest.raises(Unreachable):
            await a.transport.connect(others[4], timeout=1)
        with pytest.raises(Unreachable):
            await a.transport.connect(others[0], timeout=1)
        assert lookups == [*others, others[0]]


async def test_a_relayed_connection_idle_for_two_seconds_closes_and_frees_its_circuit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A relay grants each peer few circuits; an averaging peer meets new group mates every
    # round. A relayed connection with nothing in flight for relayed_idle_after (2 s) closes,
    # whatever the idle count; the next call opens a circuit again.
    async with peers(1, a_client_mode=True) as (_, (r,), c, a):
        assert await a.transport.call(c.id, "echo", b"one", timeout=5) == b"one"
        conn = a.transport.connection_to(c.id)
        assert conn is not None and conn.via == r.id
        quiet_since = conn.last_active
        await trio.sleep_until(quiet_since + 1.9)
        assert not conn.closing
        await trio.sleep_until(quiet_since + 2.6)
        assert conn.closed and conn.close_reason in ("idle", "remote closed: idle")  # either end
        assert r.transport.relay_service is not None
        assert not r.transport.relay_service.table.live()  # the circuit is gone at the relay
        assert await a.transport.call(c.id, "echo", b"two", timeout=5) == b"two"


# -- rendezvous order (sans-IO) -----------------------------------------------------------------


def _relay(i: int) -> PeerAddress:
    return PeerAddress(f"r{i}", 7000, ident(100 + i).peer_id)


@given(
    me=st.binary(min_size=32, max_size=32),
    picks=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=12),
    drop=st.integers(min_value=0, max_value=9),
)
def test_rendezvous_order_is_the_peers_own_and_stable(
    me: bytes, picks: list[int], drop: int
) -> None:
    peer = PeerID(me)
    relays = [_relay(i) for i in picks]
    order = rendezvous_order(peer, relays)
    assert sorted(order, key=str) == sorted(set(relays), key=str)  # each once, none added
    assert rendezvous_order(peer, list(reversed(relays))) == order  # the list's order is moot
    # a relay leaving the list moves nobody else: the others keep their relative order
    gone = _relay(drop)
    assert rendezvous_order(peer, [r for r in relays if r != gone]) == [
        r for r in order if r != gone
    ]


def test_volunteers_given_one_list_spread_over_all_of_it() -> None:
    relays = [_relay(i) for i in range(4)]
    firsts = {r: 0 for r in relays}
    for i in range(2000):
        volunteer = PeerID(hashlib.sha256(i.to_bytes(4, "big")).digest())
        firsts[rendezvous_order(volunteer, relays)[0]] += 1
    # each relay is the first choice of about a quarter of the volunteers (500 +- 4.3 sd)
    assert all(400 <= n <= 600 for n in firsts.values()), firsts
