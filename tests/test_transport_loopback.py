"""The transport over real loopback TCP (127.0.0.1 only; every socket closed by the test)."""

from __future__ import annotations

import hashlib
import socket
import struct
import sys

import numpy as np
import pytest
import trio
import trio.testing

from moshpit_trio.errors import (
    ConfigError,
    HandshakeFailed,
    Rejected,
    RemoteError,
    UnknownHandler,
    Unreachable,
)
from moshpit_trio.identity import Identity
from moshpit_trio.wire.address import InvalidAddress, PeerAddress
from moshpit_trio.wire.connection import Request, StreamRequest
from moshpit_trio.wire.streams import pacer_for
from moshpit_trio.wire.transport import open_transport

pytestmark = pytest.mark.slow


async def echo(request: Request) -> bytes:
    return bytes(request.payload)


async def test_echo_both_ways_over_one_connection(identities: list[Identity]) -> None:
    async with (
        open_transport(identities[0]) as a,
        open_transport(identities[1], listen=None) as b,  # client mode: never listens
    ):
        a.register("echo", echo)
        b.register("echo", echo)
        assert a.address is not None and b.address is None
        assert await b.call(str(a.address), "echo", b"ping", timeout=5) == b"ping"
        # a reaches the client-mode peer b by its PeerID, over the connection b opened
        assert await a.call(b.peer_id, "echo", b"pong", timeout=5) == b"pong"
        assert len(a.connections()) == 1 and len(b.connections()) == 1
        assert a.connections()[0].remote_peer_id == b.peer_id


async def test_stream_of_64_mib_arrives_intact(identities: list[Identity]) -> None:
    data = np.random.default_rng(0).integers(0, 256, 64 * 1024 * 1024, dtype=np.uint8)

    async def sink(request: StreamRequest) -> bytes:
        digest = hashlib.sha256()
        async for chunk in request:
            digest.update(chunk)
        return digest.digest()

    async with open_transport(identities[0]) as a, open_transport(identities[1]) as b:
        a.register_stream("sink", sink)
        assert a.address is not None
        async with b.open_stream(a.address, "sink", b"header", timeout=60) as stream:
            await stream.send(data)
            answer = await stream.finish()
    assert answer == hashlib.sha256(data.tobytes()).digest()


async def test_remote_errors_are_typed(identities: list[Identity]) -> None:
    async def refuse(request: Request) -> bytes:
        raise Rejected("not today")

    async def crash(request: Request) -> bytes:
        raise KeyError("boom")

    async with open_transport(identities[0]) as a, open_transport(identities[1]) as b:
        a.register("refuse", refuse)
        a.register("crash", crash)
        a.register("echo", echo)
        target = a.address
        assert target is not None
        with pytest.raises(UnknownHandler, match="no handler named 'nope'"):
            await b.call(target, "nope", b"", timeout=5)
        with pytest.raises(Rejected, match="not today"):
            await b.call(target, "refuse", b"", timeout=5)
        with pytest.raises(RemoteError, match="KeyError"):
            await b.call(target, "crash", b"", timeout=5)
        # none of that disturbed the connection
        assert await b.call(target, "echo", b"still here", timeout=5) == b"still here"
        assert len(b.connections()) == 1


async def test_dial_checks_the_peer_id(identities: list[Identity]) -> None:
    async with open_transport(identities[0]) as a, open_transport(identities[1]) as b:
        assert a.address is not None
        wrong = PeerAddress(a.address.host, a.address.port, identities[2].peer_id)
        with pytest.raises(HandshakeFailed, match="refused the connection"):
            await b.call(wrong, "echo", b"", timeout=5)
        assert b.connections() == [] and a.connections() == []


async def test_nobody_listening_is_unreachable(identities: list[Identity]) -> None:
    async with open_transport(identities[0]) as a, open_transport(identities[1]) as b:
        assert a.address is not None
        port = a.address.port
    async with open_transport(identities[1]) as b:
        dead = PeerAddress("127.0.0.1", port, identities[0].peer_id)
        with pytest.raises(Unreachable, match="cannot reach"):
            await b.call(dead, "echo", b"", timeout=5)


@pytest.mark.parametrize(
    "bad",
    [
        "http://127.0.0.1:1/x",
        "ws://127.0.0.1/mpaaaa",
        "ws://127.0.0.1:99999/" + "mp" + "a" * 52,
        "ws://127.0.0.1:80/notapeerid",
        "ws://127.0.0.1:80",
        "wss://127.0.0.1:80/" + "mp" + "a" * 52,
        "ws://ho st:80/" + "mp" + "a" * 52,
    ],
)
async def test_bad_addresses_are_refused_before_dialing(
    identities: list[Identity], bad: str
) -> None:
    async with open_transport(identities[0], listen=None) as a:
        with pytest.raises(InvalidAddress):
            await a.call(bad, "echo", b"", timeout=5)


async def test_bad_arguments(identities: list[Identity]) -> None:
    async with open_transport(identities[0]) as a:
        with pytest.raises(ConfigError, match="already registered"):
            a.register("x", echo)
            a.register("x", echo)
        with pytest.raises(ConfigError, match="timeout"):
            await a.call(identities[1].peer_id, "x", b"", timeout=-1)
        with pytest.raises(ConfigError, match="itself"):
            assert a.address is not None
            await a.call(a.address, "x", b"", timeout=1)
        with pytest.raises(Unreachable, match="no address known"):
            await a.call(identities[1].peer_id, "x", b"", timeout=1)
    with pytest.raises(ConfigError, match="Identity"):
        async with open_transport("not an identity"):  # type: ignore[arg-type]
            pass


async def test_closing_the_transport_ends_the_calls_of_its_peers(
    identities: list[Identity],
) -> None:
    entered = trio.Event()
    cancelled = trio.Event()

    async def hang(request: Request) -> bytes:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError

    async def serve_a(*, task_status: trio.TaskStatus[PeerAddress]) -> None:
        async with open_transport(identities[0]) as a:
            a.register("hang", hang)
            assert a.address is not None
            task_status.started(a.address)
            await entered.wait()
        # leaving the block closed a, while b's call was in a's handler

    async with open_transport(identities[1]) as b, trio.open_nursery() as nursery:
        target = await nursery.start(serve_a)
        with pytest.raises(Unreachable, match="ended"):
            await b.call(target, "hang", b"", timeout=30)
    # a's transport is closed by now, and it cancelled the handler on its way out
    assert cancelled.is_set()


async def test_listening_on_a_taken_port_is_a_clear_error(identities: list[Identity]) -> None:
    async with open_transport(identities[0]) as a:
        assert a.address is not None
        with pytest.raises(ConfigError, match=r"cannot listen on 127\.0\.0\.1"):
            async with open_transport(identities[1], listen=f"127.0.0.1:{a.address.port}"):
                pass


async def test_errors_leave_the_block_unwrapped(identities: list[Identity]) -> None:
    with pytest.raises(Unreachable):  # not an ExceptionGroup around it
        async with open_transport(identities[0], listen=None) as a:
            await a.call(identities[1].peer_id, "echo", b"", timeout=1)


def _pacing_rate(sock: trio.socket.SocketType) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, getattr(socket, "SO_MAX_PACING_RATE", 47), 8)
    return int(struct.unpack("=Q", raw)[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_MAX_PACING_RATE is Linux's")
async def test_a_pacer_sets_and_lifts_the_kernels_pacing_rate() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with listeners[0], await trio.open_tcp_stream("127.0.0.1", port) as stream:
        pace = pacer_for(stream)
        assert pace is not None
        unpaced = _pacing_rate(stream.socket)
        pace(12_500_000.0)
        assert _pacing_rate(stream.socket) == 12_500_000
        pace(3e10)  # above 2**32 bytes/s: the kernel takes 64 bits
        assert _pacing_rate(stream.socket) == 30_000_000_000
        pace(float("inf"))
        assert _pacing_rate(stream.socket) == unpaced == (1 << 64) - 1
        pace(1.0)
        pace(None)
        assert _pacing_rate(stream.socket) == unpaced
    # nothing to pace in memory, or over a socket that is not TCP
    left, _ = trio.testing.memory_stream_pair()
    assert pacer_for(left) is None
    a, b = trio.socket.socketpair()
    with a, b:
        assert pacer_for(trio.SocketStream(a)) is None


async def test_connections_pace_over_tcp_only(identities: list[Identity]) -> None:
    """``Connection.pace`` caps a TCP connection's sending (both ends can), lifts it with None,
    and refuses a rate that is not a positive number (in memory it is a no-op: test_wire_faults)."""
    async with open_transport(identities[0]) as a, open_transport(identities[1]) as b:
        a.register("echo", echo)
        assert a.address is not None
        assert await b.call(a.address, "echo", b"x", timeout=5) == b"x"
        (conn,) = b.connections()
        (theirs,) = a.connections()
        assert conn.pacing is None
        assert conn.pace(1e6) and theirs.pace(2e6)
        assert (conn.pacing, theirs.pacing) == (1e6, 2e6)
        # paced at 1 MB/s, a 256 KiB answer still comes (the cap only spaces packets out)
        assert await b.call(a.address, "echo", bytes(256 * 1024), timeout=5) == bytes(256 * 1024)
        assert conn.pace(None) and conn.pacing is None
        for bad in (0, -1.0, True, "fast", float("nan")):
            with pytest.raises(ConfigError, match="pacing rate"):
                conn.pace(bad)  # type: ignore[arg-type]
        assert conn.pacing is None
