"""Relayed connections end to end, on the in-memory network under the virtual clock.

Three hosts: ``r`` listens and relays, ``c`` is in client mode (it only dials out) and holds a
reservation on ``r``, ``a`` listens but has no way to reach ``c`` but through ``r``. Every link
has 10 ms of latency, so the times asserted count hops: a call over the circuit is four hops
(a -> r -> c and back), 40 ms.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
import trio.testing

from moshpit_trio.errors import (
    ConnectionLost,
    DeadlineExceeded,
    HandshakeFailed,
    Rejected,
    RelayRefused,
)
from moshpit_trio.identity import Identity
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.access import AccessPolicy, RateLimits
from moshpit_trio.wire.connection import Request, SendStream, StreamRequest
from moshpit_trio.wire.relay import RelayPipe, RelayService
from moshpit_trio.wire.relay_table import Circuit, RelayLimits
from moshpit_trio.wire.transport import Transport, open_transport

LATENCY = 0.01
HOP = LATENCY
T0 = 0.0


@dataclass
class Swarm:
    net: MemoryNetwork
    r: Transport
    c: Transport
    a: Transport
    started: float
    seen: list[tuple[str, bytes]] = field(default_factory=list)


def msgpack(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


def _ids() -> list[Identity]:
    return [Identity.from_seed(bytes([i]) * 32) for i in range(1, 9)]


@asynccontextmanager
async def swarm(
    relay: type[RelayService] = RelayService,
    limits: RelayLimits | None = None,
    *,
    reserve: bool = True,
    access: AccessPolicy | None = None,
) -> AsyncIterator[Swarm]:
    net = MemoryNetwork(latency=LATENCY)
    ids = _ids()
    started = trio.current_time()
    async with AsyncExitStack() as stack:
        r = await stack.enter_async_context(
            open_transport(ids[0], listen="r:0", network=net.host("r"), access=access)
        )
        c = await stack.enter_async_context(
            open_transport(ids[1], listen=None, network=net.host("c"))
        )
        a = await stack.enter_async_context(
            open_transport(ids[2], listen="a:0", network=net.host("a"))
        )
        r.relay_service = relay(r, limits)
        s = Swarm(net, r, c, a, started)

        async def echo(request: Request) -> bytes:
            s.seen.append((request.peer.short, bytes(request.payload)))
            return bytes(request.payload)

        async def total(request: StreamRequest) -> bytes:
            data = await request.read_all(1 << 30)
            s.seen.append((request.peer.short, data[:16]))
            return len(data).to_bytes(8, "big") + data[-8:]

        c.register("echo", echo)
        c.register_stream("total", total)
        a.register("echo", echo)
        if reserve:
            assert r.address is not None
            await c.relay.reserve(r.address, 60, timeout=5)
            a.relay.add_route(c.peer_id, r.address)
        yield s


async def test_a_call_through_the_relay_is_end_to_end_and_takes_exact_hops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm() as s:
        # c dialed r (1 RTT connect, 1 upgrade, 1 handshake) and reserved (1 RTT): 80 ms.
        assert trio.current_time() - s.started == pytest.approx(8 * HOP)
        start = trio.current_time()
        assert await s.a.call(s.c.peer_id, "echo", b"hello", timeout=5) == b"hello"
        # a dials r: 60 ms. CONNECT a -> r -> c and back: 40. Each hop's first chunk waits
        # for that hop's stream credit: 20. Upgrade, HELLO/RESPONSE, the call: 3 x 40.
        assert trio.current_time() - start == pytest.approx(24 * HOP)
        start = trio.current_time()
        assert await s.a.call(s.c.peer_id, "echo", b"again", timeout=5) == b"again"
        assert trio.current_time() - start == pytest.approx(4 * HOP)
        # The callee saw the caller's own authenticated PeerID, not the relay's.
        assert s.seen == [(s.a.peer_id.short, b"hello"), (s.a.peer_id.short, b"again")]
        conn = s.a.connection_to(s.c.peer_id)
        assert conn is not None and conn.via == s.r.peer_id
        back = s.c.connection_to(s.a.peer_id)
        assert back is not None and back.via == s.r.peer_id
        # ... and the client-mode peer calls back over the same circuit.
        start = trio.current_time()
        assert await s.c.call(s.a.peer_id, "echo", b"back", timeout=5) == b"back"
        assert trio.current_time() - start == pytest.approx(4 * HOP)
        assert s.r.relay_service is not None
        assert s.r.relay_service.table.circuits == 1


async def test_a_stream_through_the_relay_delivers_every_byte_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    data = bytes(range(256)) * 2048  # 512 KiB: one chunk, within every window
    async with swarm() as s:
        await s.a.call(s.c.peer_id, "echo", b"", timeout=5)  # the circuit is up
        start = trio.current_time()
        async with s.a.open_stream(s.c.peer_id, "total", timeout=10) as stream:
            await stream.send(data)
            answer = await stream.finish()
        assert answer == len(data).to_bytes(8, "big") + data[-8:]
        assert s.seen[-1] == (s.a.peer_id.short, data[:16])
        # Unlimited bandwidth: the stream costs its round trips only (open + data, then the
        # answer), whatever the window and the chunks: 2 x 40 ms.
        assert trio.current_time() - start == pytest.approx(8 * HOP)
        # The relay counts what it forwarded: the data, the answer, and the ends' framing
        # (websocket, envelopes, the handshake), which adds little.
        assert s.r.relay_service is not None
        forwarded = s.r.relay_service.bytes_forwarded
        assert len(data) + 16 < forwarded < len(data) + 4096, forwarded


class RecordingRelay(RelayService):
    """A relay that keeps a copy of every byte it forwards."""

    forwarded: list[bytes]

    async def _forward(self, out: SendStream, circuit: Circuit, chunk: memoryview) -> None:
        type(self).forwarded.append(bytes(chunk))
        await super()._forward(out, circuit, chunk)


async def test_the_relay_sees_only_ciphertext(autojump_clock: trio.testing.MockClock) -> None:
    RecordingRelay.forwarded = []
    secret = b"the secret gradient 0123456789" * 10
    async with swarm(RecordingRelay) as s:
        assert await s.a.call(s.c.peer_id, "echo", secret, timeout=5) == secret
    seen = b"".join(RecordingRelay.forwarded)
    assert len(seen) > len(secret)  # it did carry the call ...
    assert secret[:30] not in seen  # ... encrypted: neither the payload
    assert b"echo" not in seen  # nor the handler's name


class Tamper(RelayService):
    """A relay that does ``action`` to the ``nth`` chunk of at least ``size`` bytes that goes to
    ``towards`` (after the handshake, the only chunks that large are envelopes)."""

    action = "flip"
    towards = "c"
    size = 1000
    nth = 1
    delay = 0.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.count = 0

    async def _forward(self, out: SendStream, circuit: Circuit, chunk: memoryview) -> None:
        towards_c = out._conn.remote_peer_id == circuit.target
        if self.action == "delay":
            await trio.sleep(self.delay)
            await out.send(chunk)
            return
        if len(chunk) < self.size or towards_c != (self.towards == "c"):
            await out.send(chunk)
            return
        self.count += 1
        if self.count != self.nth:
            await out.send(chunk)
        elif self.action == "flip":
            flipped = bytearray(chunk)
            flipped[-1] ^= 0x01
            await out.send(bytes(flipped))
        elif self.action == "drop":
            pass
        elif self.action == "duplicate":
            await out.send(chunk)
            await out.send(chunk)


def tamper(action: str, towards: str = "c", delay: float = 0.0) -> type[Tamper]:
    return type("T", (Tamper,), {"action": action, "towards": towards, "delay": delay})


async def test_a_flipped_bit_towards_the_callee_fails_the_connection_and_delivers_nothing(
    autojump_clock: trio.testing.MockClock,
    logs: list[dict[str, object]],
) -> None:
    payload = b"x" * 2000
    async with swarm(tamper("flip", "c")) as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        start = trio.current_time()
        with pytest.raises(ConnectionLost):
            await s.a.call(s.c.peer_id, "echo", payload, timeout=5)
        # c refused the envelope (mac) on arrival, two hops out, and closed: two hops back.
        assert trio.current_time() - start == pytest.approx(4 * HOP)
        assert payload not in [seen for _, seen in s.seen]
        assert any(e.get("reason") == "mac" for e in logs)
        # Nobody is banned for it: the relay may be the one that tampered.
        assert s.c.bans == [] and s.a.bans == []


async def test_a_flipped_bit_towards_the_caller_fails_its_call_and_drops_the_route(
    autojump_clock: trio.testing.MockClock,
    logs: list[dict[str, object]],
) -> None:
    payload = b"y" * 2000
    async with swarm(tamper("flip", "a")) as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        start = trio.current_time()
        with pytest.raises(ConnectionLost):
            await s.a.call(s.c.peer_id, "echo", payload, timeout=5)
        # the request's 2 hops, the flipped answer's 2 hops: a refuses it on arrival.
        assert trio.current_time() - start == pytest.approx(4 * HOP)
        assert any(e.get("reason") == "mac" for e in logs)
        assert s.a.bans == [] and s.c.bans == []
        assert s.a.relay.routes[s.c.peer_id] == []  # that relay is not used for c again


async def test_a_dropped_envelope_is_caught_by_the_next_one(
    autojump_clock: trio.testing.MockClock,
    logs: list[dict[str, object]],
) -> None:
    async with swarm(tamper("drop", "c")) as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        start = trio.current_time()
        results: list[str] = []

        async def call(payload: bytes) -> None:
            try:
                await s.a.call(s.c.peer_id, "echo", payload, timeout=5)
                results.append("ok")
            except ConnectionLost:
                results.append("lost")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, b"1" * 2000)  # dropped by the relay
            await trio.sleep(0.1)
            nursery.start_soon(call, b"2" * 2000)  # arrives with a sequence number too far
        assert results == ["lost", "lost"]
        assert trio.current_time() - start == pytest.approx(0.1 + 4 * HOP)
        assert [seen for _, seen in s.seen] == [b"up"]
        assert any(e.get("reason") == "seq" for e in logs)


async def test_a_duplicated_envelope_is_refused_and_the_call_runs_once(
    autojump_clock: trio.testing.MockClock,
    logs: list[dict[str, object]],
) -> None:
    async with swarm(tamper("duplicate", "c")) as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        conn = s.a.connection_to(s.c.peer_id)
        assert conn is not None
        # The genuine copy runs; the replay right behind it is refused on arrival (seq) and c
        # closes the connection. Whether the genuine call's answer left before that is up to
        # the scheduler on c: the caller has its answer, or the connection failed under it.
        try:
            answer: bytes | None = await s.a.call(s.c.peer_id, "echo", b"3" * 2000, timeout=5)
        except ConnectionLost:
            answer = None
        assert answer in (None, b"3" * 2000)
        assert [seen for _, seen in s.seen] == [b"up", b"3" * 2000]  # it ran once
        assert any(e.get("reason") == "seq" for e in logs)
        with trio.fail_after(1):
            await conn.wait_closed()
        # ... and the next call goes through, over a new connection
        assert await s.a.call(s.c.peer_id, "echo", b"after", timeout=5) == b"after"
        assert s.a.connection_to(s.c.peer_id) is not conn


async def test_a_relay_that_delays_costs_time_and_the_deadline_bounds_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm(tamper("delay", delay=0.5)) as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=30)
        start = trio.current_time()
        assert await s.a.call(s.c.peer_id, "echo", b"late", timeout=5) == b"late"
        assert trio.current_time() - start == pytest.approx(4 * HOP + 2 * 0.5)
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded):
            await s.a.call(s.c.peer_id, "echo", b"too late", timeout=0.8)
        assert trio.current_time() - start == pytest.approx(0.8)


async def test_reservation_and_circuit_limits_are_refused_with_typed_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limits = RelayLimits(max_reservations=1, max_circuits_per_peer=1)
    ids = _ids()
    async with swarm(limits=limits) as s:
        assert s.r.address is not None
        async with open_transport(ids[3], listen=None, network=s.net.host("d")) as d:
            with pytest.raises(RelayRefused) as refused:
                await d.relay.reserve(s.r.address, 60, timeout=5)
            assert refused.value.code == "reservations-full"
            # c renews: still one reservation, so that is allowed
            assert await s.c.relay.reserve(s.r.address, 30, timeout=5) == 30.0
            # a circuit to a peer that holds no reservation
            s.a.relay.add_route(d.peer_id, s.r.address)
            with pytest.raises(RelayRefused) as refused:
                await s.a.call(d.peer_id, "echo", b"", timeout=5)
            assert refused.value.code == "no-reservation"
            await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
            # c has its one circuit: another peer's circuit to c is refused
            async with open_transport(ids[4], listen="e:0", network=s.net.host("e")) as e:
                e.relay.add_route(s.c.peer_id, s.r.address)
                with pytest.raises(RelayRefused) as refused:
                    await e.call(s.c.peer_id, "echo", b"", timeout=5)
                assert refused.value.code == "circuits-per-peer"


async def test_a_peer_that_does_not_relay_says_so(autojump_clock: trio.testing.MockClock) -> None:
    async with swarm(reserve=False) as s:
        s.r.registry.unregister("relay.reserve")
        assert s.r.address is not None
        with pytest.raises(RelayRefused) as refused:
            await s.c.relay.reserve(s.r.address, 60, timeout=5)
        assert refused.value.code == "not-a-relay"


async def test_the_total_circuit_limit(autojump_clock: trio.testing.MockClock) -> None:
    ids = _ids()
    async with swarm(limits=RelayLimits(max_circuits=1)) as s:
        assert s.r.address is not None
        await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        async with open_transport(ids[4], listen="e:0", network=s.net.host("e")) as e:
            e.relay.add_route(s.c.peer_id, s.r.address)
            with pytest.raises(RelayRefused) as refused:
                await e.call(s.c.peer_id, "echo", b"", timeout=5)
            assert refused.value.code == "circuits-full"


async def test_a_reservation_expires_and_ends_with_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm(reserve=False) as s:
        assert s.r.address is not None and s.r.relay_service is not None
        assert await s.c.relay.reserve(s.r.address, 1.0, timeout=5) == 1.0
        s.a.relay.add_route(s.c.peer_id, s.r.address)
        await trio.sleep(1.0)
        with pytest.raises(RelayRefused) as refused:
            await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        assert refused.value.code == "no-reservation"
        await s.c.relay.reserve(s.r.address, 60, timeout=5)
        conn = s.c.connection_to(s.r.peer_id)
        assert conn is not None
        await conn.aclose("going away")
        with pytest.raises(RelayRefused) as refused:
            await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        assert refused.value.code == "no-reservation"


async def test_the_relay_dying_ends_the_relayed_connection_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm() as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        a_side = s.a.connection_to(s.c.peer_id)
        c_side = s.c.connection_to(s.a.peer_id)
        assert a_side is not None and c_side is not None

        async def slow(request: Request) -> bytes:
            await trio.sleep(100)
            return b""

        s.c.register("slow", slow)
        killed_at = 0.0
        async with trio.open_nursery() as nursery:

            async def kill() -> None:
                nonlocal killed_at
                await trio.sleep(1.0)
                killed_at = trio.current_time()
                s.net.kill("r")

            nursery.start_soon(kill)
            with pytest.raises(ConnectionLost):
                await s.a.call(s.c.peer_id, "slow", b"", timeout=60)
        # not the call's deadline, nor a liveness timeout: the moment the relay died
        assert trio.current_time() == killed_at
        await c_side.wait_closed()
        assert trio.current_time() == killed_at
        assert a_side.closed and c_side.closed


async def test_a_circuit_ends_at_its_lifetime_and_the_next_call_opens_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm(limits=RelayLimits(circuit_lifetime=2.0)) as s:
        assert s.r.relay_service is not None
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        first = s.a.connection_to(s.c.peer_id)
        assert first is not None
        # c reserved (80 ms), a dialed r (60), its CONNECT reached r 10 ms later: the circuit
        # opened there and then, and ends 2 s later; a learns it one hop after.
        opened = s.started + 15 * HOP
        await first.wait_closed()
        assert trio.current_time() == pytest.approx(opened + 2.0 + HOP)
        assert await s.a.call(s.c.peer_id, "echo", b"again", timeout=5) == b"again"
        second = s.a.connection_to(s.c.peer_id)
        assert second is not None and second is not first
        assert s.r.relay_service.table.circuits == 1


async def test_a_direct_connection_is_preferred_once_there_is_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm() as s:
        await s.a.call(s.c.peer_id, "echo", b"up", timeout=5)
        assert s.a.address is not None
        await s.c.call(s.a.address, "echo", b"direct", timeout=5)  # c dials a itself
        conn = s.a.connection_to(s.c.peer_id)
        assert conn is not None and conn.via is None
        back = s.c.connection_to(s.a.peer_id)
        assert back is not None and back.via is None


async def test_a_flood_of_refused_circuit_requests_gets_the_requester_banned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = AccessPolicy(rates=RateLimits(ban_after_refusals=3, refusal_window=10.0))
    async with swarm(access=policy) as s:
        assert s.r.address is not None
        nobody = Identity.from_seed(b"\x77" * 32).peer_id
        s.a.relay.add_route(nobody, s.r.address)
        codes: list[str] = []
        for _ in range(3):
            with pytest.raises(RelayRefused) as refused:
                await s.a.call(nobody, "echo", b"", timeout=5)
            codes.append(refused.value.code)
        assert codes == ["no-reservation"] * 3
        # The fourth refusal bans: the relay closes a's connection (the answer may be lost
        # with it) and refuses a at the handshake from then on.
        to_relay = s.a.connection_to(s.r.peer_id)
        assert to_relay is not None
        with pytest.raises((RelayRefused, ConnectionLost)):
            await s.a.call(nobody, "echo", b"", timeout=5)
        answered = trio.current_time()
        await to_relay.wait_closed()  # the GOODBYE came right behind the answer
        assert trio.current_time() == answered
        assert [b.peer for b in s.r.bans] == [s.a.peer_id]
        service = s.r.relay_service
        assert service is not None and service.bans == 1  # what `moshpit status` shows
        assert service.table.refusals["no-reservation"] == 4
        with pytest.raises(HandshakeFailed, match="banned"):
            await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        # the reserved peer and its reservation are untouched
        assert s.r.relay_service is not None
        assert s.r.relay_service.table.reservation(s.c.peer_id, trio.current_time()) is not None


async def test_malformed_relay_messages_are_refused_and_nothing_else_breaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm() as s:
        assert s.r.address is not None
        for name, body in [
            ("relay.reserve", b""),
            ("relay.reserve", msgpack((True,))),
            ("relay.reserve", msgpack((1, 2))),
            ("relay.connect", msgpack((b"short", b"x" * 16))),
            ("relay.connect", msgpack((s.c.peer_id.to_bytes(), b"x" * 15))),
            ("relay.connect", msgpack(("text", b"x" * 16))),
        ]:
            with pytest.raises(Rejected):
                await s.a.call(s.r.address, name, body, timeout=5)
        answer = await s.a.call(s.r.address, "relay.reserve", msgpack((0,)), timeout=5)
        assert answer == msgpack(("malformed", "ttl_ms 0 out of range", 0))
        # a stream for a circuit that does not exist, to the relay and to an endpoint
        with pytest.raises(Rejected, match="circuit"):
            async with s.a.open_stream(
                s.r.address, "relay.up", msgpack((b"z" * 16,)), timeout=5
            ) as st:
                await st.send(b"data")
                await st.finish()
        with pytest.raises(Rejected, match="circuit"):
            async with s.r.open_stream(
                s.a.peer_id, "relay.down", msgpack((b"z" * 16,)), timeout=5
            ) as st:
                await st.send(b"data")
                await st.finish()
        # a peer c holds no reservation with cannot announce circuits to it
        assert s.a.address is not None
        await s.c.call(s.a.address, "echo", b"", timeout=5)  # c dials a; a calls back on it
        body = msgpack((s.r.peer_id.to_bytes(), b"q" * 16, 1000))
        answer = await s.a.call(s.c.peer_id, "relay.incoming", body, timeout=5)
        assert answer == msgpack(("no-reservation", "we hold no reservation with you", 0))
        # ... and the relay still relays
        s.a.relay.add_route(s.c.peer_id, s.r.address)
        await s.c.connection_to(s.a.peer_id).aclose("bye")  # type: ignore[union-attr]
        assert await s.a.call(s.c.peer_id, "echo", b"fine", timeout=5) == b"fine"


async def test_a_circuit_is_paced_to_its_bytes_per_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate, burst = 256 * 1024.0, 64 * 1024.0
    limits = RelayLimits(circuit_bytes_per_s=rate, circuit_burst=burst)
    data = bytes(1024 * 1024)
    async with swarm(limits=limits) as s:
        assert s.r.relay_service is not None
        await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        (circuit,) = s.r.relay_service.table._circuits.values()
        before, start = circuit.forwarded, trio.current_time()
        async with s.a.open_stream(s.c.peer_id, "total", timeout=30) as stream:
            await stream.send(data)
            await stream.finish()
        elapsed, moved = trio.current_time() - start, circuit.forwarded - before
        # Every byte of the stream (and its answer) waited for the budget, which the set-up
        # left nearly full; at most the burst went unpaced, and the round trips add 8 hops.
        assert (moved - burst) / rate <= elapsed <= moved / rate + 8 * HOP
        assert elapsed > 3.5  # 1 MiB at 256 KiB/s: not the 80 ms of an unpaced circuit


async def test_a_pipe_hands_out_a_chunk_in_pieces_and_ends_cleanly_or_broken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with swarm() as s:
        await s.a.call(s.c.peer_id, "echo", b"", timeout=5)
        relay = s.a.connection_to(s.r.peer_id)
        assert relay is not None
        pipe = RelayPipe(relay, b"p" * 16, s.c.peer_id)
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                await pipe._in_send.send(b"abcdefgh")
                await pipe._in_send.send(b"ij")
                pipe._in_send.close()

            nursery.start_soon(feed)
            assert await pipe.receive_some(3) == b"abc"
            assert await pipe.receive_some(3) == b"def"
            assert await pipe.receive_some() == b"gh"
            assert await pipe.receive_some(100) == b"ij"
            assert await pipe.receive_some() == b""  # the relay ended the stream: EOF
            assert await pipe.receive_some() == b""
        broken = RelayPipe(relay, b"q" * 16, s.c.peer_id)
        broken._break("the relay ended the circuit")
        with pytest.raises(trio.BrokenResourceError):
            await broken.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await broken.send_all(b"x")
        await broken.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await broken.receive_some()
