"""Bad input and faults on the wire, on the in-memory network under a virtual clock.

Every scenario checks three things: the error is typed and says what happened, it is logged,
and nothing else of the peer is disturbed (an honest peer's calls go on over its own connection).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from moshpit_trio.errors import (
    ConfigError,
    ConnectionLost,
    CrossedIdleClose,
    DeadlineExceeded,
    HandshakeFailed,
    PeerBusy,
    Rejected,
    UnknownHandler,
)
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.wire.address import PeerAddress
from moshpit_trio.wire.connection import ConnectionLimits, Request, StreamRequest
from moshpit_trio.wire.envelope import DEFAULT_LIMITS, Direction, EnvelopeSealer, Kind
from moshpit_trio.wire.handshake import HandshakeInitiator
from moshpit_trio.wire.transport import SUBPROTOCOL, Transport, TransportLimits, open_transport

SMALL = TransportLimits(
    connection=ConnectionLimits(stream_chunk=64 * 1024, stream_window=256 * 1024),
    handshake_timeout=10.0,
)


async def echo(request: Request) -> bytes:
    return bytes(request.payload)


@asynccontextmanager
async def peer(
    net: MemoryNetwork, name: str, identity: Identity, **kwargs: Any
) -> AsyncIterator[Transport]:
    async with open_transport(
        identity, listen=f"{name}:0", network=net.host(name), **{"limits": SMALL, **kwargs}
    ) as transport:
        transport.register("echo", echo)
        yield transport


class RawClient:
    """A peer that does the handshake honestly and then sends whatever the test crafts."""

    def __init__(self, ws: WebSocketConnection, identity: Identity, result: Any) -> None:
        self.ws = ws
        self.identity = identity
        self.session = result.session
        self.key = result.keys.send
        self.receive_key = result.keys.receive  # the other direction's

    def sealer(
        self,
        recipient: Any,
        session: bytes | None = None,
        key: bytes | None = None,
        direction: Direction = Direction.INITIATOR_TO_RESPONDER,  # the raw client dialed
    ) -> EnvelopeSealer:
        return EnvelopeSealer(
            self.identity.peer_id,
            session or self.session,
            recipient,
            key or self.key,
            direction=direction,
        )


@asynccontextmanager
async def bare_websocket(
    net: MemoryNetwork, name: str, target: PeerAddress
) -> AsyncIterator[WebSocketConnection]:
    """A websocket to ``target`` from host ``name``, upgraded but not yet authenticated."""
    stream = await net.host(name).connect(target.host, target.port)
    async with trio.open_nursery() as nursery:
        yield await wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]
            target.hostport,
            f"/{target.peer_id}",
            subprotocols=[SUBPROTOCOL],
            max_message_size=64 * 1024 * 1024,
        )
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_client(
    net: MemoryNetwork, name: str, identity: Identity, target: PeerAddress
) -> AsyncIterator[RawClient]:
    async with bare_websocket(net, name, target) as ws:
        initiator = HandshakeInitiator(identity, target.peer_id)
        await ws.send_message(initiator.hello())
        response = await ws.get_message()
        assert isinstance(response, bytes)
        await ws.send_message(initiator.receive_response(response))
        assert initiator.result is not None
        yield RawClient(ws, identity, initiator.result)


def _flip(message: bytes, index: int) -> bytes:
    b = bytearray(message)
    b[index] ^= 0x01
    return bytes(b)


def _header_len(message: bytes) -> int:
    return int.from_bytes(message[:2], "big")


def _request(raw: RawClient, server: Transport, call_id: int = 1, payload: bytes = b"hi") -> bytes:
    return raw.sealer(server.peer_id).seal(
        Kind.REQUEST, call_id, payload, deadline_ms=5000, name="echo"
    )


Craft = Callable[[RawClient, Transport, Identity], list[bytes | str]]

# (scenario, what the raw peer sends, the reason the server must log)
VIOLATIONS: list[tuple[str, Craft, str]] = [
    ("tampered payload", lambda r, s, o: [_flip(_request(r, s), -20)], "mac"),
    ("tampered tag", lambda r, s, o: [_flip(_request(r, s), -1)], "mac"),
    (
        "tampered name",
        # the first sealed byte: the name "echo", encrypted
        lambda r, s, o: [_flip(m, 2 + _header_len(m)) for m in [_request(r, s)]],
        "mac",
    ),
    (
        "tampered header",
        # the header's last field, payload_len 2 -> 3, with one byte more to match
        lambda r, s, o: [_flip(m, 1 + _header_len(m)) + b"\x00" for m in [_request(r, s)]],
        "mac",
    ),
    ("truncated envelope", lambda r, s, o: [_request(r, s)[:-1]], "truncated"),
    (
        "sealed under the other direction's key",
        lambda r, s, o: [r.sealer(s.peer_id, key=r.receive_key).seal(Kind.CANCEL, 7)],
        "mac",
    ),
    (
        "reflected: the other direction's nonce",
        lambda r, s, o: [
            r.sealer(s.peer_id, direction=Direction.RESPONDER_TO_INITIATOR).seal(Kind.CANCEL, 7)
        ],
        "mac",
    ),
    ("replayed envelope", lambda r, s, o: [m := _request(r, s), m], "seq"),
    (
        "reordered envelopes",
        lambda r, s, o: (lambda sl: [sl.seal(Kind.CANCEL, 7), sl.seal(Kind.CANCEL, 8)][::-1])(
            r.sealer(s.peer_id)
        ),
        "seq",
    ),
    (
        "envelope for another recipient",
        lambda r, s, o: [
            r.sealer(o.peer_id).seal(Kind.REQUEST, 1, b"x", deadline_ms=100, name="echo")
        ],
        "mac",
    ),
    (
        "envelope from another session",
        lambda r, s, o: [
            r.sealer(s.peer_id, bytes(32)).seal(Kind.REQUEST, 1, b"", deadline_ms=9, name="echo")
        ],
        "mac",
    ),
    ("garbage bytes", lambda r, s, o: [b"\x00\x40" + b"\xff" * 200], "malformed"),
    ("huge header length", lambda r, s, o: [b"\xff" * 100], "too-large"),
    (
        "malformed msgpack",
        lambda r, s, o: [b"\x00\x05\xc1\xc1\xc1\xc1\xc1" + bytes(64)],
        "malformed",
    ),
    ("text message", lambda r, s, o: ["hello"], "malformed"),
    (
        "data for a stream never opened",
        lambda r, s, o: [r.sealer(s.peer_id).seal(Kind.STREAM_DATA, 99, b"zz")],
        "call-id",
    ),
    (
        "call id reused",
        lambda r, s, o: (
            lambda sl: [
                sl.seal(Kind.REQUEST, 5, b"", deadline_ms=100, name="echo"),
                sl.seal(Kind.REQUEST, 5, b"", deadline_ms=100, name="echo"),
            ]
        )(r.sealer(s.peer_id)),
        "call-id",
    ),
    (
        "request without a deadline",
        lambda r, s, o: [r.sealer(s.peer_id).seal(Kind.REQUEST, 1, b"", name="echo")],
        "malformed",
    ),
]


@pytest.mark.parametrize(
    ("craft", "reason"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS]
)
async def test_protocol_violation_closes_only_that_connection(
    autojump_clock: Any,
    identities: list[Identity],
    logs: list[dict[str, Any]],
    craft: Craft,
    reason: str,
) -> None:
    net = MemoryNetwork(seed=1, latency=0.01)
    async with peer(net, "s", identities[0]) as server, peer(net, "h", identities[1]) as honest:
        assert server.address is not None
        assert await honest.call(server.address, "echo", b"before", timeout=5) == b"before"
        async with raw_client(net, "m", identities[2], server.address) as raw:
            for message in craft(raw, server, identities[3]):
                await raw.ws.send_message(message)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await raw.ws.get_message()
            assert closed.value.reason.code == 1002
        violations = [e for e in logs if e["event"] == "protocol violation; closing"]
        assert [v["reason"] for v in violations] == [reason]
        assert await honest.call(server.address, "echo", b"after", timeout=5) == b"after"
        assert [c.remote_peer_id for c in server.connections()] == [honest.peer_id]


async def test_oversized_message_is_refused_before_it_is_buffered(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1, buffer_size=256 * 1024)
    async with peer(net, "s", identities[0]) as server, peer(net, "h", identities[1]) as honest:
        assert server.address is not None
        await honest.call(server.address, "echo", b"", timeout=5)
        async with raw_client(net, "m", identities[2], server.address) as raw:
            too_big = DEFAULT_LIMITS.max_message + 1
            # The server reads and counts this one as it arrives and closes the connection as
            # soon as the count passes the limit: the sender cannot push the whole message.
            with pytest.raises(ConnectionClosed) as closed, trio.fail_after(5):
                await raw.ws.send_message(bytes(too_big))
                while True:
                    await raw.ws.get_message()
            assert closed.value.reason.code == 1009
        assert any(e["event"] == "message over the size limit; closed" for e in logs)
        assert await honest.call(server.address, "echo", b"ok", timeout=5) == b"ok"


async def test_handshake_that_never_finishes_is_dropped_at_the_timeout(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1)
    async with peer(net, "s", identities[0]) as server:
        assert server.address is not None
        stream = await net.host("m").connect("s", server.address.port)
        await stream.send_all(b"GET /")  # ...and never another byte
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):
            while await stream.receive_some():
                pass
            raise trio.BrokenResourceError  # a clean EOF counts as dropped too
        assert trio.current_time() - start == pytest.approx(SMALL.handshake_timeout)
        # the server's log line may come a scheduling step after the client saw the drop
        await trio.testing.wait_all_tasks_blocked()
        assert any(e["event"] == "handshake timed out; dropped the connection" for e in logs)


async def test_connection_flood_beyond_the_limit(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1)
    limits = TransportLimits(max_connections=4, handshake_timeout=10.0)
    async with peer(net, "s", identities[0], limits=limits) as server:
        assert server.address is not None
        port = server.address.port
        squatters = [await net.host(f"x{i}").connect("s", port) for i in range(4)]
        async with peer(net, "h", identities[1]) as honest:
            start = trio.current_time()
            # Full: dialed again after each refusal (waits doubling from 50 ms, spread by a
            # hash of both ends) until the next wait would pass the deadline, then PeerBusy.
            waits: list[float] = []
            while sum(waits) + honest._busy_wait(server.peer_id, len(waits)) < 5:
                waits.append(honest._busy_wait(server.peer_id, len(waits)))
            with pytest.raises(PeerBusy, match="HTTP 503"):
                await honest.connect(server.address, timeout=5)
            assert trio.current_time() - start == pytest.approx(sum(waits))
            assert len(waits) == 7  # 0.05, 0.1, 0.2, 0.4, 0.8, 1, 1 s, each x 0.5-1.5
            refused = [e for e in logs if e["event"] == "dial failed"]
            assert len(refused) == len(waits) + 1
            # The listener counts every refusal, and warns at most once a second with how
            # many it refused since its last warning.
            assert server.refused_at_limit == len(waits) + 1
            warned = [e for e in logs if e["event"] == "connection refused: at the limit"]
            at = [sum(waits[:i]) for i in range(len(waits) + 1)]  # when each was refused
            expected, last, unwarned = [], -1e9, 0
            for t in at:
                unwarned += 1
                if t - last >= 1.0:
                    expected.append(unwarned)
                    last, unwarned = t, 0
            assert [e["refused"] for e in warned] == expected
            assert expected[0] == 1 and len(expected) < len(at)
            # once the squatters' handshakes time out, there is room again. They time out at
            # this very instant too: let them finish dropping before dialing (trio runs tasks
            # woken at the same time in a random order, so the dial could go first).
            await trio.sleep(SMALL.handshake_timeout)
            await trio.testing.wait_all_tasks_blocked()
            assert await honest.call(server.address, "echo", b"in", timeout=5) == b"in"
        for s in squatters:
            await s.aclose()


async def test_a_dial_turned_away_at_the_limit_gets_in_once_the_crowd_thins(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    # A crowd holds every connection of a peer for a moment: a dialer it turns away (HTTP
    # 503) comes back after short waits and gets in as soon as there is room, within its
    # call's time; a peer shutting down is answered 410 and not dialed again.
    limits = dataclasses.replace(SMALL, max_connections=3, idle_after=30.0)
    net = MemoryNetwork(seed=5)  # (no latency: a dial costs no time, the waits are all)
    gate = trio.Event()

    async def held(request: Request) -> bytes:
        await gate.wait()
        return b"done"

    async def release_at(t: float) -> None:
        await trio.sleep_until(t)
        gate.set()

    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        hub.register("held", held)
        assert hub.address is not None
        crowd = [
            await stack.enter_async_context(peer(net, f"p{i}", identities[1 + i])) for i in range(3)
        ]
        late = await stack.enter_async_context(peer(net, "late", identities[4]))
        async with trio.open_nursery() as nursery:
            for other in crowd:
                nursery.start_soon(partial(other.call, hub.address, "held", b"", timeout=50))
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            nursery.start_soon(release_at, start + 0.3)
            assert await late.call(hub.address, "echo", b"in", timeout=5) == b"in"
        # The calls end at 0.3 s; their connections may make room once quiet for
        # crowded_idle_after (0.5 s): the first dial at or after 0.8 s gets in.
        waits = [late._busy_wait(hub.peer_id, i) for i in range(8)]
        tries = next(n for n in range(1, 8) if sum(waits[:n]) >= 0.3 + limits.crowded_idle_after)
        assert trio.current_time() - start == pytest.approx(sum(waits[:tries]))
        assert sum(e["event"] == "dial failed" for e in logs) == tries
    # Shutting down: 410, HandshakeFailed at once (not PeerBusy, not dialed again).
    async with peer(net, "h2", identities[5]) as dialer, peer(net, "s2", identities[6]) as leaving:
        assert leaving.address is not None
        leaving._closing = True
        start = trio.current_time()
        with pytest.raises(HandshakeFailed, match="HTTP 410") as info:
            await dialer.connect(leaving.address, timeout=5)
        assert not isinstance(info.value, PeerBusy)
        assert trio.current_time() == start
        leaving._closing = False


def test_busy_waits_double_up_to_a_cap_and_differ_between_dialers(
    identities: list[Identity],
) -> None:
    # (the wait needs no network: a transport object's method of its ids)
    a, b, target = (i.peer_id for i in identities[:3])

    def wait(me: PeerID, attempt: int) -> float:
        t = Transport.__new__(Transport)
        t.peer_id = me
        return t._busy_wait(target, attempt)

    for attempt, base in enumerate([0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]):
        for me in (a, b):
            assert 0.5 * base <= wait(me, attempt) < 1.5 * base
        assert wait(a, attempt) == wait(a, attempt)  # the same run waits the same
    assert [wait(a, i) for i in range(8)] != [wait(b, i) for i in range(8)]


async def test_caller_deadline_cancels_the_remote_handler(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1)
    cancelled_at: list[float] = []

    async def slow(request: Request) -> bytes:
        try:
            await trio.sleep(100)
        finally:
            cancelled_at.append(trio.current_time())
        return b"too late"

    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        server.register("slow", slow)
        assert server.address is not None
        await client.connect(server.address)
        start = trio.current_time()
        with pytest.raises(DeadlineExceeded, match="did not answer 'slow' within 3 s"):
            await client.call(server.address, "slow", b"", timeout=3)
        assert trio.current_time() - start == pytest.approx(3.0)
        await trio.sleep(0.001)
        assert cancelled_at == [pytest.approx(start + 3.0)]
        assert await client.call(server.address, "echo", b"next", timeout=3) == b"next"


async def test_receiver_that_stops_reading_blocks_the_sender(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    net = MemoryNetwork(seed=1, bandwidth=100e6)
    window = SMALL.connection.stream_window
    chunk = SMALL.connection.stream_chunk
    requests: list[StreamRequest] = []

    async def lazy(request: StreamRequest) -> bytes:
        requests.append(request)
        async for _ in request:
            break  # read one chunk, then stop reading
        await trio.sleep_forever()
        return b""

    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        server.register_stream("lazy", lazy)
        assert server.address is not None
        sent = 0
        with pytest.raises(DeadlineExceeded):
            async with client.open_stream(server.address, "lazy", timeout=20) as stream:
                for _ in range(1000):  # 64 MiB if nothing stopped it
                    await stream.send(bytes(chunk))
                    sent += chunk
        # The sender got exactly one window, plus nothing: the chunk read freed less than the
        # half window after which credit is granted again. The receiver held at most a window.
        assert sent == window
        (request,) = requests
        assert sum(len(c) for c in request._chunks) == window - chunk


async def test_peer_killed_mid_stream(autojump_clock: Any, identities: list[Identity]) -> None:
    net = MemoryNetwork(seed=1, bandwidth=10e6)
    got = 0

    async def sink(request: StreamRequest) -> bytes:
        nonlocal got
        async for c in request:
            got += len(c)
        return b"done"

    async with peer(net, "c", identities[1]) as client, trio.open_nursery() as nursery:

        async def run_server(*, task_status: trio.TaskStatus[PeerAddress]) -> None:
            async with peer(net, "s", identities[0]) as server:
                server.register_stream("sink", sink)
                assert server.address is not None
                task_status.started(server.address)
                await trio.sleep_forever()

        address = await nursery.start(run_server)
        start = trio.current_time()

        async def kill_soon() -> None:
            await trio.sleep(1.0)
            net.kill("s")

        nursery.start_soon(kill_soon)
        with pytest.raises(ConnectionLost):
            async with client.open_stream(address, "sink", timeout=60) as stream:
                await stream.send(bytes(100 * 1024 * 1024))  # 10 s at 10 MB/s
                await stream.finish()
        # the loss is noticed when it happens, not at the 60 s deadline
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.05)
        assert 0 < got < 100 * 1024 * 1024
        assert client.connections() == []
        nursery.cancel_scope.cancel()


async def test_frozen_peer_costs_a_caller_its_deadline_and_nothing_more(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    net = MemoryNetwork(seed=1, latency=0.005)
    async with (
        peer(net, "s", identities[0]) as frozen,
        peer(net, "t", identities[2]) as alive,
        peer(net, "c", identities[1]) as client,
    ):
        assert frozen.address is not None and alive.address is not None
        await client.call(frozen.address, "echo", b"", timeout=5)
        await client.connect(alive.address)
        net.freeze("s")
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def call_frozen() -> None:
                assert frozen.address is not None
                with pytest.raises(DeadlineExceeded):
                    await client.call(frozen.address, "echo", b"", timeout=2)
                assert trio.current_time() - start == pytest.approx(2.0)

            nursery.start_soon(call_frozen)
            # meanwhile, calls to another peer go on at network speed
            for _ in range(10):
                assert await client.call(alive.address, "echo", b"x", timeout=2) == b"x"
            assert trio.current_time() - start == pytest.approx(10 * 0.01)
        # dialing a frozen peer fails by the deadline too
        net.freeze("s")
        async with peer(net, "d", identities[3]) as other:
            start = trio.current_time()
            with pytest.raises(DeadlineExceeded):
                await other.call(frozen.address, "echo", b"", timeout=1.5)
            assert trio.current_time() - start == pytest.approx(1.5)
        net.thaw("s")


async def test_replayed_handshake_is_refused(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1)
    async with peer(net, "s", identities[0]) as server:
        assert server.address is not None
        address = server.address
        # Record an honest initiator's HELLO and FINISH...
        initiator = HandshakeInitiator(identities[1], address.peer_id)
        recorded_hello = initiator.hello()
        async with bare_websocket(net, "m", address) as ws:
            await ws.send_message(recorded_hello)
            response = await ws.get_message()
            assert isinstance(response, bytes)
            recorded_finish = initiator.receive_response(response)
            await ws.send_message(recorded_finish)
        # ...and replay both on a new connection: the responder's fresh nonce defeats it.
        async with bare_websocket(net, "m", address) as ws:
            await ws.send_message(recorded_hello)
            await ws.get_message()
            await ws.send_message(recorded_finish)
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        failures = [e for e in logs if e["event"] == "incoming handshake broke the protocol"]
        assert failures and "signature" in failures[-1]["error"]


async def test_calls_beyond_the_limit_are_answered_busy(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    net = MemoryNetwork(seed=1)
    limits = TransportLimits(connection=ConnectionLimits(max_incoming_calls=2))
    release = trio.Event()

    async def wait(request: Request) -> bytes:
        await release.wait()
        return b"done"

    async with (
        peer(net, "s", identities[0], limits=limits) as server,
        peer(net, "c", identities[1]) as client,
    ):
        server.register("wait", wait)
        assert server.address is not None
        target = server.address
        results: list[bytes] = []
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(
                    lambda: _append(results, client.call(target, "wait", b"", timeout=5))
                )
            await trio.sleep(1)
            with pytest.raises(Rejected, match="too many calls"):
                await client.call(target, "wait", b"", timeout=5)
            release.set()
        assert results == [b"done", b"done"]
        assert await client.call(target, "echo", b"free again", timeout=5) == b"free again"


async def _append(results: list[bytes], call: Any) -> None:
    results.append(await call)


async def test_third_connection_from_one_peer_is_refused(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=1)
    async with peer(net, "s", identities[0]) as server:
        assert server.address is not None
        async with (
            raw_client(net, "m", identities[2], server.address),
            raw_client(net, "m", identities[2], server.address),
            raw_client(net, "m", identities[2], server.address) as third,
        ):
            with pytest.raises(ConnectionClosed):
                while True:
                    await third.ws.get_message()
            assert len(server.connections()) == 2
        assert any(e["event"] == "too many connections from one peer" for e in logs)


@pytest.mark.parametrize("seed", range(5))
async def test_many_concurrent_calls_on_one_connection(
    autojump_clock: Any, identities: list[Identity], seed: int
) -> None:
    # Call ids must reach the wire in increasing order however the scheduler orders the callers:
    # an id taken before the wait for a queue slot once let a later id overtake an earlier one,
    # and the receiver (rightly strict) closed the connection under every call on it.
    net = MemoryNetwork(seed=seed, latency=0.002)

    async def slow_echo(request: Request) -> bytes:
        await trio.sleep(0.01)
        return bytes(request.payload)

    async with (
        peer(net, "s", identities[0]) as server,
        peer(net, "c", identities[1]) as client,
    ):
        server.register("slow_echo", slow_echo)
        assert server.address is not None
        await client.connect(server.address)
        answers: dict[int, bytes] = {}

        async def one(i: int) -> None:
            answers[i] = await client.call(server.peer_id, "slow_echo", str(i).encode(), timeout=5)

        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(one, i)
        assert answers == {i: str(i).encode() for i in range(40)}
        assert len(client.connections()) == 1


async def test_goodbye_behind_a_backlog_takes_one_close_timeout(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # A peer leaving with a stream's chunks still queued on a slow link (a stream still
    # sending) says goodbye within one close_timeout in all: the wait for its writer to drain
    # the queue and the websocket's close handshake share that budget instead of each taking
    # it whole. (Chunks of a stream whose sender gave up are not in the queue any more: they
    # are dropped unsealed.)
    net = MemoryNetwork(seed=1, bandwidth=50e3)  # 256 KiB (a window) takes about 5 s
    close_timeout = SMALL.connection.close_timeout

    async def sink(request: StreamRequest) -> bytes:
        async for _ in request:
            pass
        return b""

    async with peer(net, "s", identities[0]) as server, trio.open_nursery() as nursery:
        server.register_stream("sink", sink)
        assert server.address is not None
        async with peer(net, "c", identities[1]) as client:
            await client.connect(server.address)

            async def send() -> None:
                with pytest.raises(ConnectionLost):
                    async with client.open_stream(server.address, "sink", timeout=60) as stream:
                        await stream.send(bytes(SMALL.connection.stream_window))

            nursery.start_soon(send)
            await trio.sleep(0.5)
            leaving = trio.current_time()
        # leaving the block closed the client's transport
        took = trio.current_time() - leaving
        assert took == pytest.approx(close_timeout, abs=0.01)
        assert client.connections() == []


async def test_idle_connections_beyond_the_cap_close_the_least_recently_used_first(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # A hub met four peers; it keeps one idle connection. Recent ones are never cut.
    limits = dataclasses.replace(SMALL, idle_connections=1, idle_after=30.0)
    net = MemoryNetwork(seed=3, latency=0.005)
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        assert hub.address is not None
        others = [
            await stack.enter_async_context(peer(net, f"p{i}", identities[1 + i])) for i in range(4)
        ]
        for other in others:  # p0 used first (least recently), p3 last
            await other.call(hub.address, "echo", b"x", timeout=5)
            await trio.sleep(10.0)
        # now: p0 silent for 40 s, p1 30 s, p2 20 s, p3 10 s: p0 and p1 count as idle
        assert len(hub.connections()) == 4
        late = await stack.enter_async_context(peer(net, "late", identities[5]))
        await late.call(hub.address, "echo", b"x", timeout=5)  # a new connection: trim
        await trio.sleep(1.0)
        remote = {c.remote_peer_id for c in hub.connections()}
        ids = [o.peer_id for o in others]
        assert ids[0] not in remote and ids[1] in remote  # one idle kept: the more recent
        assert {ids[2], ids[3], late.peer_id} <= remote
        # a closed idle connection is dialed again when needed
        await others[0].call(hub.address, "echo", b"y", timeout=5)


async def test_idle_connections_are_looked_for_at_most_once_a_tenth_of_idle_after(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # Looking is a pass over every connection; a new one within a tenth of idle_after (1 s
    # here) of the last look does not look again, so a connection that just turned idle is
    # closed by the next newcomer after that.
    limits = dataclasses.replace(SMALL, idle_connections=0, idle_after=10.0)
    net = MemoryNetwork(seed=3, latency=0.005)
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        assert hub.address is not None
        p0, p1, p2, p3 = [
            await stack.enter_async_context(peer(net, f"p{i}", identities[1 + i])) for i in range(4)
        ]

        def remote() -> set[PeerID]:
            return {c.remote_peer_id for c in hub.connections()}

        await p0.call(hub.address, "echo", b"x", timeout=5)
        await trio.sleep(9.8)
        await p1.call(hub.address, "echo", b"x", timeout=5)  # a look: p0 quiet 9.8 s, kept
        await trio.sleep(0.5)
        await p2.call(hub.address, "echo", b"x", timeout=5)  # 0.5 s after the look: none
        await trio.sleep(0.1)
        assert p0.peer_id in remote()  # idle for 0.4 s, not closed yet
        await trio.sleep(0.5)
        await p3.call(hub.address, "echo", b"x", timeout=5)  # 1.1 s after: a look
        await trio.sleep(0.1)
        assert p0.peer_id not in remote()
        assert {p1.peer_id, p2.peer_id, p3.peer_id} <= remote()


async def test_a_crowded_peer_makes_room_with_a_quiet_connection_and_refuses_only_busy_ones(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    # Everyone asks one peer at once (a cold start asks the directory's replicas): at the
    # limit, with nothing idle for idle_after, a connection quiet for crowded_idle_after
    # (nothing in flight) makes room; only when every one has a call in flight is a newcomer
    # turned away.
    limits = dataclasses.replace(SMALL, max_connections=3, idle_after=30.0)
    assert limits.crowded_idle_after == 0.2
    net = MemoryNetwork(seed=5, latency=0.005)
    gate = trio.Event()

    async def held(request: Request) -> bytes:
        await gate.wait()
        return b"done"

    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        hub.register("held", held)
        assert hub.address is not None
        others = [
            await stack.enter_async_context(peer(net, f"p{i}", identities[1 + i])) for i in range(5)
        ]
        for other in others[:3]:  # p0 first: the least recently used
            await other.call(hub.address, "echo", b"x", timeout=5)
            await trio.sleep(0.2)
        await trio.sleep(0.4)  # p0 quiet 0.8 s, p1 0.6 s, p2 0.4 s: none idle (30 s)
        assert await others[3].call(hub.address, "echo", b"in", timeout=5) == b"in"
        await trio.sleep(0.1)
        remote = {c.remote_peer_id for c in hub.connections()}
        ids = [o.peer_id for o in others]
        assert ids[0] not in remote and {ids[1], ids[2], ids[3]} <= remote
        assert not any(e["event"] == "connection refused: at the limit" for e in logs)
        # Now every connection has a call in flight: nothing can make room.
        async with trio.open_nursery() as nursery:
            for other in others[1:4]:
                nursery.start_soon(partial(other.call, hub.address, "held", b"", timeout=50))
            await trio.sleep(1.0)
            with pytest.raises(HandshakeFailed, match="HTTP 503"):
                await others[4].connect(hub.address, timeout=5)
            assert any(e["event"] == "connection refused: at the limit" for e in logs)
            gate.set()
        # p0, whose connection made room, dials again when it needs the hub (once the calls
        # that just ended have been quiet for crowded_idle_after: one of them makes room)
        await trio.sleep(0.5)
        assert await others[0].call(hub.address, "echo", b"again", timeout=5) == b"again"


async def test_a_pinned_connection_is_not_closed_as_idle(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # (a relay reservation pins its connection: the client-mode peer's only way in)
    limits = dataclasses.replace(SMALL, idle_connections=0, idle_after=30.0)
    net = MemoryNetwork(seed=4, latency=0.005)
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        assert hub.address is not None
        pinned, other = [
            await stack.enter_async_context(peer(net, f"p{i}", identities[1 + i])) for i in range(2)
        ]
        await pinned.call(hub.address, "echo", b"x", timeout=5)
        await other.call(hub.address, "echo", b"x", timeout=5)
        (conn,) = [c for c in hub.connections() if c.remote_peer_id == pinned.peer_id]
        conn.pinned_until = trio.current_time() + 100.0
        await trio.sleep(40.0)
        late = await stack.enter_async_context(peer(net, "late", identities[3]))
        await late.call(hub.address, "echo", b"x", timeout=5)
        await trio.sleep(1.0)
        remote = {c.remote_peer_id for c in hub.connections()}
        assert pinned.peer_id in remote and other.peer_id not in remote


async def test_ending_a_stream_while_a_chunk_waits_for_room_sends_the_end_after_it(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # A relay pipe closed by one task while another is sending on it (wire/relay.py): the
    # END must not overtake the chunk still waiting for room in the outbox. It did: the
    # receiver saw "chunk after the end of stream" and banned the sender for it.
    limits = dataclasses.replace(
        SMALL,
        connection=ConnectionLimits(stream_chunk=4096, stream_window=1 << 20, max_queued=2),
    )
    net = MemoryNetwork(seed=1, bandwidth=1e6)  # 4 ms a chunk: the outbox fills at once
    got: list[int] = []
    ended = trio.Event()

    async def count(request: StreamRequest) -> bytes:
        total = 0
        async for chunk in request:
            total += len(chunk)
        got.append(total)
        ended.set()
        await trio.sleep(0.5)  # still serving the stream when a late chunk would come
        return b""

    async with (
        peer(net, "s", identities[0], limits=limits) as server,
        peer(net, "c", identities[1], limits=limits) as client,
    ):
        server.register_stream("count", count)
        assert server.address is not None
        conn = await client.connect(server.address)
        async with conn.open_stream("count", timeout=10) as stream, trio.open_nursery() as n:
            failure: list[BaseException] = []

            async def send() -> None:
                try:
                    await stream.send(bytes(40 * 4096))
                except Exception as exc:
                    failure.append(exc)

            n.start_soon(send)
            await trio.sleep(0.01)  # a few chunks out, one waiting for room
            assert stream._queueing
            stream.end_nowait()
        with trio.fail_after(1):
            await ended.wait()
        await trio.sleep(0.5)
        server_conn = server.connection_to(client.peer_id)
        assert server_conn is not None and server_conn.protocol_error is None
        assert not server.bans
        # every chunk queued before the end arrived, and nothing after it; the sender was told
        (total,) = got
        assert 0 < total < 40 * 4096 and total % 4096 == 0
        assert len(failure) == 1


async def test_a_call_that_crosses_the_other_ends_idle_close_goes_out_again(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # Both ends close idle connections: the hub closes its idle connection to the client in
    # the same instant as the client calls on it. The GOODBYE and the request cross; the call
    # is made again on a new connection instead of failing.
    limits = dataclasses.replace(SMALL, idle_connections=0, idle_after=10.0)
    net = MemoryNetwork(seed=5, latency=0.005)
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        client = await stack.enter_async_context(peer(net, "c", identities[1]))
        assert hub.address is not None
        await client.call(hub.address, "echo", b"x", timeout=5)
        (first,) = client.connections()
        await trio.sleep(20.0)
        start = trio.current_time()
        assert hub._trim(0) == 1  # what a new connection at the hub would do, this instant
        answer = await client.call(hub.address, "echo", b"again", timeout=5)
        assert answer == b"again"
        assert first.closed and first.close_reason == "remote closed: idle"
        assert [c for c in client.connections() if not c.closed] != [first]
        # a round trip for the lost call, a dial and handshake, a round trip for the call
        assert trio.current_time() - start < 0.1


async def test_a_stream_that_crosses_the_other_ends_idle_close_says_so_and_the_peer_is_not_gone(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # As with a call (above), but a stream cannot be sent again by the transport (its body is
    # the caller's): it fails with CrossedIdleClose, which tells the caller that nothing of it
    # was served and that sending it again is safe; wait_gone does not take the idle close
    # for the peer's loss.
    limits = dataclasses.replace(SMALL, idle_connections=0, idle_after=10.0)
    net = MemoryNetwork(seed=5, latency=0.005)
    got: list[bytes] = []

    async def collect(request: StreamRequest) -> bytes:
        got.append(b"".join([bytes(c) async for c in request]))
        return b"ok"

    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0], limits=limits))
        client = await stack.enter_async_context(peer(net, "c", identities[1]))
        hub.register_stream("collect", collect)
        assert hub.address is not None
        await client.call(hub.address, "echo", b"x", timeout=5)
        async with trio.open_nursery() as watchers:
            gone: list[float] = []

            async def watch() -> None:
                await client.wait_gone(hub.peer_id)
                gone.append(trio.current_time())

            watchers.start_soon(watch)
            await trio.sleep(20.0)
            assert hub._trim(0) == 1  # the hub closes it as idle, this instant
            with pytest.raises(CrossedIdleClose):
                async with client.open_stream(hub.address, "collect", timeout=5) as stream:
                    await stream.send(b"part")
                    await stream.finish()
            assert got == []  # never served
            async with client.open_stream(hub.address, "collect", timeout=5) as stream:
                await stream.send(b"part")
                assert await stream.finish() == b"ok"
            assert got == [b"part"]
            assert gone == []  # the idle close was no loss
            net.kill("hub")  # a real loss is one
            await trio.sleep(1.0)
            assert len(gone) == 1
            watchers.cancel_scope.cancel()


async def test_a_connection_saying_goodbye_is_not_handed_out_for_new_calls(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    # This end closes a connection as idle (its GOODBYE still going out) just as a new call
    # to the same peer starts: the call gets a fresh connection, not the closing one, on
    # which it would be cut off.
    net = MemoryNetwork(seed=6, latency=0.005)
    async with AsyncExitStack() as stack:
        hub = await stack.enter_async_context(peer(net, "hub", identities[0]))
        client = await stack.enter_async_context(peer(net, "c", identities[1]))
        assert hub.address is not None
        await client.call(hub.address, "echo", b"x", timeout=5)
        (first,) = client.connections()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.aclose, "idle")
            while not first.closing:  # (it starts at the next scheduling point)
                await trio.lowlevel.checkpoint()
            assert not first.closed
            assert client.connection_to(hub.peer_id) is first  # still up, as far as it goes
            assert await client.call(hub.address, "echo", b"again", timeout=5) == b"again"
        second = client.connection_to(hub.peer_id)
        assert first.closed and second is not None and second is not first


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"max_connections": 0}, "at least 1"),
        ({"idle_connections": -1}, "idle_connections"),
        ({"idle_after": 0.0}, "idle_after positive"),
        ({"relayed_idle_after": 0.0}, "relayed_idle_after"),
        ({"crowded_idle_after": -0.1}, "crowded_idle_after"),
        ({"crowded_idle_after": 11.0}, "crowded_idle_after"),  # past idle_after (10 s)
        ({"handshake_timeout": 0.0}, "handshake_timeout"),
    ],
)
def test_transport_limits_that_cannot_work_are_config_errors(
    changes: dict[str, Any], why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        TransportLimits(**changes)


async def test_a_credit_does_not_wait_behind_chunks_queued_the_other_way(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    """A peer whose uplink is busy with its own stream's chunks still lets the remote's stream
    start at once: the STREAM_CREDIT it owes goes out before the chunks it has queued (only
    the envelope being written, 64 KiB, is ahead of it), not after them. Queued behind them,
    the credit would wait for the whole window on this slow uplink (256 KiB: about 5 s)."""
    net = MemoryNetwork(seed=1, latency=0.005)
    net.set_host("a", upload=50e3, download=10e6)
    window = SMALL.connection.stream_window
    chunk = SMALL.connection.stream_chunk

    async def sink(request: StreamRequest) -> bytes:
        async for _ in request:
            pass
        return b""

    async with peer(net, "a", identities[0]) as a, peer(net, "b", identities[1]) as b:
        a.register_stream("sink", sink)
        b.register_stream("sink", sink)
        assert a.address is not None and b.address is not None
        await a.connect(b.address)
        async with trio.open_nursery() as nursery:

            async def a_sends() -> None:
                async with a.open_stream(b.address, "sink", timeout=60) as stream:
                    await stream.send(bytes(window))  # a window's chunks, queued on a's uplink
                    await stream.finish()

            nursery.start_soon(a_sends)
            await trio.sleep(0.1)
            start = trio.current_time()
            async with b.open_stream(a.address, "sink", timeout=60) as stream:
                await stream.send(bytes(chunk))  # needs a's credit first
                took = trio.current_time() - start
                await stream.finish()
    # at most the chunk a is writing (64 KiB at 50 KB/s: 1.3 s) and round trips
    assert took < chunk / 50e3 + 0.2, took


async def test_chunks_of_a_stream_given_up_are_never_written(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    """Envelopes are sealed as the writer comes to them, so the chunks a stream had queued when
    its sender gave up are dropped, not sent, when they are views of memory that may change
    (an averager's parts are): only the one being written goes out. The connection goes on."""
    net = MemoryNetwork(seed=1, bandwidth=50e3)  # 256 KiB (a window) takes about 5 s
    chunk = SMALL.connection.stream_chunk
    got = 0

    async def sink(request: StreamRequest) -> bytes:
        nonlocal got
        async for c in request:
            got += len(c)
        return b""

    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        server.register_stream("sink", sink)
        assert server.address is not None
        await client.connect(server.address)
        with trio.move_on_after(0.5):
            async with client.open_stream(server.address, "sink", timeout=60) as stream:
                await stream.send(bytearray(SMALL.connection.stream_window))
        sent = client.bytes_sent
        await trio.sleep(10.0)  # the whole window would have crossed by now
        assert got <= chunk
        assert client.bytes_sent - sent <= chunk + 1024
        assert await client.call(server.address, "echo", b"x", timeout=5) == b"x"


async def test_a_stream_sent_in_smaller_chunks_arrives_in_them(
    autojump_clock: Any, identities: list[Identity]
) -> None:
    """``send(chunk=...)`` cuts finer than the connection's stream_chunk (a part over a slow
    link), never coarser, or in the sizes listed; a chunk that is not a positive int, or a
    list that is not of them or does not add up to the data, is refused before anything
    goes."""
    net = MemoryNetwork(seed=1, bandwidth=100e6)
    limit = SMALL.connection.stream_chunk
    sizes: list[list[int]] = []

    async def sizes_of(request: StreamRequest) -> bytes:
        sizes.append([len(c) async for c in request])
        return b""

    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        server.register_stream("sizes", sizes_of)
        assert server.address is not None
        for chunk in (1000, 4 * limit):
            async with client.open_stream(server.address, "sizes", timeout=20) as stream:
                await stream.send(bytes(2 * limit + 500), chunk=chunk)
                await stream.finish()
        # a list of sizes, in order (one over stream_chunk is cut at it)
        async with client.open_stream(server.address, "sizes", timeout=20) as stream:
            await stream.send(bytes(2 * limit + 500), chunk=[100, 2 * limit, 400])
            await stream.finish()
        for bad, match in (
            (0, "chunk must be a positive"),
            (-1, "chunk must be a positive"),
            (1.5, "chunk must be a positive"),
            (True, "chunk must be a positive"),
            ("1", "chunk must be a positive"),
            ([0, 1], "chunk sizes must be positive"),
            ([True], "chunk sizes must be positive"),
            ([1.0], "chunk sizes must be positive"),
            ([2], "add up to 2 bytes, not the 1 sent"),
            ([], "add up to 0 bytes, not the 1 sent"),
        ):
            with pytest.raises(ConfigError, match=match):
                async with client.open_stream(server.address, "sizes", timeout=20) as stream:
                    await stream.send(b"x", chunk=bad)  # type: ignore[arg-type]
    n = 2 * limit + 500
    assert sizes[0] == [1000] * (n // 1000) + [n % 1000]
    assert sizes[1] == [limit, limit, 500]
    assert sizes[2] == [100, limit, limit, 400]
    assert len(sizes) == 3  # (the streams whose send was refused were cancelled, not ended)


async def test_pacing_is_a_no_op_in_memory(autojump_clock: Any, identities: list[Identity]) -> None:
    """There is no kernel socket to pace in memory (nor through a relay): ``pace`` says so and
    changes nothing, and a bad rate is refused all the same."""
    net = MemoryNetwork(seed=1, bandwidth=100e6)
    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        assert server.address is not None
        assert await client.call(server.address, "echo", b"x", timeout=5) == b"x"
        (conn,) = client.connections()
        assert not conn.pace(1e6) and not conn.pace(None)
        assert conn.pacing is None
        with pytest.raises(ConfigError, match="pacing rate"):
            conn.pace(-1.0)


@pytest.mark.parametrize(
    ("handler_does", "answered_at", "caller_gets"),
    [
        ("answers", 1.0, b"yes"),
        ("rejects", 1.0, Rejected),
        ("fails", 1.0, Exception),
        ("outlasts the caller", 3.0, DeadlineExceeded),
    ],
)
async def test_a_call_is_answered_once_its_answer_is_sealed_or_the_call_ended(
    autojump_clock: Any,
    identities: list[Identity],
    handler_does: str,
    answered_at: float,
    caller_gets: Any,
) -> None:
    """``Request.answered``: set when the handler's answer is sealed (a response) or queued (an
    error), or when the call ended without one (the caller gave up at its 3 s deadline): never
    before, and never left unset for a caller to wait on forever."""
    net = MemoryNetwork(seed=1, latency=0.01)
    requests: list[Request] = []
    arrived = trio.Event()

    async def handler(request: Request) -> bytes:
        requests.append(request)
        arrived.set()
        await trio.sleep(100 if handler_does == "outlasts the caller" else 1.0)
        if handler_does == "rejects":
            raise Rejected("not now")
        if handler_does == "fails":
            raise ValueError("a bug")
        return b"yes"

    async with peer(net, "s", identities[0]) as server, peer(net, "c", identities[1]) as client:
        server.register("h", handler)
        assert server.address is not None
        await client.connect(server.address)
        got: list[Any] = []

        async def call() -> None:
            assert server.address is not None
            try:
                got.append(await client.call(server.address, "h", b"", timeout=3))
            except Exception as exc:
                got.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                start = trio.current_time()
                nursery.start_soon(call)
                await arrived.wait()
                assert not requests[0].answered.is_set()
                await requests[0].answered.wait()
                assert trio.current_time() - start == pytest.approx(0.01 + answered_at)
        if isinstance(caller_gets, bytes):
            assert got == [caller_gets]
        else:
            assert len(got) == 1 and isinstance(got[0], caller_gets)
        assert await client.call(server.address, "echo", b"next", timeout=3) == b"next"


async def counting_sink(request: StreamRequest) -> bytes:
    """A stream handler that answers with how many bytes it took."""
    n = 0
    async for chunk in request:
        n += len(chunk)
    return str(n).encode()


@pytest.mark.parametrize("seed", range(6))
async def test_envelopes_sealed_by_their_senders_and_by_the_writer_keep_their_order(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]], seed: int
) -> None:
    """An envelope with nothing queued ahead of it is sealed in its sender's task; the rest
    by the writer, credits first. Calls, answers, streams both ways and their credits, all at
    once from many tasks on one connection over a slow link (so that queues form and drain),
    never put a sequence number out of order: every call and stream completes, and no
    protocol violation is logged."""
    net = MemoryNetwork(seed=seed, latency=0.003, bandwidth=2e6)
    got: dict[str, int] = {}

    async with peer(net, "a", identities[0]) as a, peer(net, "b", identities[1]) as b:
        for t in (a, b):
            t.register_stream("sink", counting_sink)
        assert a.address is not None and b.address is not None
        await a.connect(b.address)
        targets = {"a": (a, b.address), "b": (b, a.address)}

        async def caller(side: str, i: int) -> None:
            src, dst = targets[side]
            for j in range(5):
                payload = bytes([i, j]) * (1 + 700 * ((i + j + seed) % 4))
                assert await src.call(dst, "echo", payload, timeout=30) == payload
                got[side + "call"] = got.get(side + "call", 0) + 1

        async def streamer(side: str, i: int) -> None:
            src, dst = targets[side]
            size = 40_000 + 97_000 * ((i + seed) % 5)
            async with src.open_stream(dst, "sink", timeout=60) as stream:
                await stream.send(bytearray(size))  # may change: chunks stay views until sealed
                assert await stream.finish() == str(size).encode()
            got[side + "stream"] = got.get(side + "stream", 0) + 1

        async with trio.open_nursery() as nursery:
            for side in ("a", "b"):
                for i in range(6):
                    nursery.start_soon(caller, side, i)
                    nursery.start_soon(streamer, side, i)
    assert got == {"acall": 30, "bcall": 30, "astream": 6, "bstream": 6}
    assert [e for e in logs if e["event"] == "protocol violation; closing"] == []


async def test_a_later_stream_sends_before_its_grant_and_saves_a_round_trip(
    autojump_clock: Any, identities: list[Identity], logs: list[dict[str, Any]]
) -> None:
    """The first stream on a connection waits a round trip for its grant, which shows the
    receiver's window; every later stream on it sends that much at once, before its own grant
    comes (which then only confirms it): the same stream takes one round trip less. Sent to a
    handler that does not exist, the early chunks are ignored there, the sender is told
    UnknownHandler, and the connection goes on."""
    latency = 0.01
    net = MemoryNetwork(seed=1, latency=latency)
    window = SMALL.connection.stream_window

    async with peer(net, "a", identities[0]) as a, peer(net, "b", identities[1]) as b:
        b.register_stream("sink", counting_sink)
        assert b.address is not None
        conn = await a.connect(b.address)
        assert conn.stream_window is None
        took = []
        for _ in range(3):
            start = trio.current_time()
            async with a.open_stream(b.address, "sink", timeout=10) as stream:
                await stream.send(bytes(window))  # a whole window: no grant needed after it
                assert await stream.finish() == str(window).encode()
            took.append(round(trio.current_time() - start, 9))
        assert conn.stream_window == window
        # open, grant, data + end, answer: two round trips; then open + data + end, answer: one
        assert took == [4 * latency, 2 * latency, 2 * latency], took
        with pytest.raises(UnknownHandler):
            async with a.open_stream(b.address, "nobody", timeout=10) as stream:
                await stream.send(bytes(window))
                await stream.finish()
        assert await a.call(b.address, "echo", b"still", timeout=5) == b"still"
        assert a.connection_to(b.peer_id) is conn
    assert [e for e in logs if e["event"] == "protocol violation; closing"] == []
