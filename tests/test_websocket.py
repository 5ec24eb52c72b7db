"""The websocket after the handshake (wire/websocket.py): frames read and written on the stream
itself, checked against wsproto (what trio-websocket speaks) on the other end."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from moshpit_trio.errors import ProtocolError
from moshpit_trio.wire.frame_reads import MIN_WAIT, FrameSizedReceiveStream, frame_sized
from moshpit_trio.wire.websocket import (
    HandshakeStream,
    WebSocket,
    WebSocketClosed,
    close_payload,
    frame_header,
    parse_close,
)

from .test_frame_reads import record_marks, tcp_pair

MAX = 1 << 20


def _pair(*, client: bool, max_message: int = MAX) -> tuple[WebSocket, Any]:
    """Our WebSocket on one end of an in-memory stream (``client``: it dialed), and the raw
    other end, where a test writes what the remote sends and reads what we send."""
    ours, remote = trio.testing.memory_stream_pair()
    return WebSocket(ours, client=client, max_message=max_message), remote


def _remote(client: bool) -> Connection:
    """wsproto as the remote: the server when we are the client."""
    return Connection(ConnectionType.SERVER if client else ConnectionType.CLIENT)


async def _events(remote: Any, proto: Connection, count: int = 1) -> list[Any]:
    """The next ``count`` things we sent, as wsproto's events."""
    events: list[Any] = []
    with trio.fail_after(5):
        while len(events) < count:
            proto.receive_data(await remote.receive_some())
            events += proto.events()
    return events


# -- sans-IO ----------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 5_000_000])
@pytest.mark.parametrize("masked", [False, True])
def test_a_frame_header_is_the_one_wsproto_reads(length: int, masked: bool) -> None:
    receiver = Connection(ConnectionType.SERVER if masked else ConnectionType.CLIENT)
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    receiver.receive_data(frame_header(0x2, length, masked=masked) + payload)
    events = list(receiver.events())
    assert len(events) == 1 and isinstance(events[0], BytesMessage)
    assert events[0].data == payload and events[0].message_finished


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (1005, "")),
        (struct.pack("!H", 1000), (1000, "")),
        (struct.pack("!H", 1002) + b"seq", (1002, "seq")),
        (struct.pack("!H", 4999) + "é".encode(), (4999, "é")),
        (struct.pack("!H", 3000), (3000, "")),
    ],
)
def test_a_close_frame_says_its_code_and_reason(payload: bytes, expected: tuple[int, str]) -> None:
    assert parse_close(payload) == expected


@pytest.mark.parametrize(
    "payload",
    [
        b"\x03",  # one byte: no room for a code
        struct.pack("!H", 999),
        struct.pack("!H", 1005),  # never sent: it means "no code"
        struct.pack("!H", 1006),
        struct.pack("!H", 1015),
        struct.pack("!H", 2999),
        struct.pack("!H", 5000),
        struct.pack("!H", 1000) + b"\xff\xfe",  # not UTF-8
    ],
)
def test_a_close_frame_rfc_6455_forbids_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="malformed"):
        parse_close(payload)


@given(code=st.sampled_from([1000, 1002, 1009, 4000]), reason=st.text(max_size=200))
def test_a_close_payload_fits_a_control_frame_and_reads_back(code: int, reason: str) -> None:
    payload = close_payload(code, reason)
    assert len(payload) <= 125
    got_code, got_reason = parse_close(payload)
    assert got_code == code and reason.startswith(got_reason)


# -- reading ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    client=st.booleans(),
    messages=st.lists(
        st.tuples(
            st.one_of(
                st.integers(0, 300), st.integers(65_530, 65_540), st.integers(100_000, 300_000)
            ),
            st.integers(1, 4),  # fragments
            st.booleans(),  # a ping before it
        ),
        min_size=1,
        max_size=5,
    ),
    cuts=st.lists(st.integers(0, 2_000_000), max_size=12),
)
def test_messages_read_whole_however_the_stream_cuts_them(
    client: bool, messages: list[tuple[int, int, bool]], cuts: list[int]
) -> None:
    """What wsproto sends (random masking keys from a client, fragments, pings between them)
    comes out message by message, whatever pieces the bytes arrive in; every ping is answered
    with a pong carrying its payload."""
    remote_proto = _remote(client)
    wire = bytearray()
    expected = []
    pings = []
    for i, (size, fragments, ping) in enumerate(messages):
        data = bytes([i]) * size
        if ping:
            pings.append(bytes([i, 7]))
            wire += remote_proto.send(Ping(payload=pings[-1]))
        step = -(-size // fragments) or 1
        parts = [data[j : j + step] for j in range(0, size, step)] or [b""]
        for k, part in enumerate(parts):
            wire += remote_proto.send(BytesMessage(data=part, message_finished=k == len(parts) - 1))
        expected.append(data)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})

    async def main() -> None:
        ws, remote = _pair(client=client)
        got = []
        async with trio.open_nursery() as nursery:

            async def feed() -> None:
                for a, b in itertools.pairwise(points):
                    await remote.send_all(wire[a:b])
                    await trio.testing.wait_all_tasks_blocked()

            nursery.start_soon(feed)
            for _ in expected:
                got.append(bytes(await ws.get_message()))
        assert got == expected
        events = await _events(remote, remote_proto, len(pings)) if pings else []
        assert [e.payload for e in events if isinstance(e, Pong)] == pings

    trio.run(main)


async def test_a_large_payload_read_alone_is_handed_on_as_it_came() -> None:
    """No copy between the stream and the envelope reader: a payload that a read returned by
    itself (frame_reads reads large ones so) is that very object."""

    class Pieces(trio.abc.ReceiveStream):
        def __init__(self, pieces: list[bytes]) -> None:
            self.pieces = pieces

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            await trio.lowlevel.checkpoint()
            return self.pieces.pop(0)

        async def aclose(self) -> None:
            pass

    payload = bytes(300_000)
    stream = Pieces([frame_header(0x2, len(payload), masked=False), payload])
    ws = WebSocket(stream, client=True, max_message=MAX)  # type: ignore[arg-type]
    assert await ws.get_message() is payload


VIOLATIONS: list[tuple[str, bool, Callable[[], bytes]]] = [
    ("text message", True, lambda: Connection(ConnectionType.SERVER).send(TextMessage(data="hi"))),
    ("reserved bits", True, lambda: bytes((0x80 | 0x40 | 0x2, 1)) + b"x"),
    ("a masked frame to a client", True, lambda: bytes((0x82, 0x81)) + bytes(4) + b"x"),
    ("an unmasked frame to a server", False, lambda: bytes((0x82, 1)) + b"x"),
    ("a continuation with no message", True, lambda: bytes((0x80, 1)) + b"x"),
    (
        "a new message inside a fragmented one",
        True,
        lambda: bytes((0x02, 1)) + b"x" + bytes((0x82, 1)) + b"y",
    ),
    ("an unknown data opcode", True, lambda: bytes((0x83, 1)) + b"x"),
    ("an unknown control opcode", True, lambda: bytes((0x8B, 0))),
    (
        "a long control frame",
        True,
        lambda: bytes((0x89, 126)) + struct.pack("!H", 126) + bytes(126),
    ),
    ("a fragmented control frame", True, lambda: bytes((0x09, 0))),
    ("a 1-byte close frame", True, lambda: bytes((0x88, 1)) + b"\x03"),
]


@pytest.mark.parametrize(
    ("client", "craft"), [v[1:] for v in VIOLATIONS], ids=[v[0] for v in VIOLATIONS]
)
async def test_what_rfc_6455_or_the_protocol_forbids_is_a_protocol_error(
    client: bool, craft: Callable[[], bytes]
) -> None:
    ws, remote = _pair(client=client)
    await remote.send_all(craft())
    with pytest.raises(ProtocolError, match="malformed"):
        await ws.get_message()


async def test_a_message_over_the_limit_is_refused_before_its_payload_arrives(
    autojump_clock: Any,
) -> None:
    """Close code 1009 as soon as the header says how large it is: the payload is never read,
    let alone held (none of it was even sent)."""
    ws, remote = _pair(client=True, max_message=1000)
    await remote.send_all(frame_header(0x2, 1001, masked=False))
    start = trio.current_time()
    with pytest.raises(WebSocketClosed) as closed:
        await ws.get_message()
    assert closed.value.code == 1009 and trio.current_time() == start
    (event,) = await _events(remote, _remote(True))
    assert isinstance(event, CloseConnection) and event.code == 1009
    with pytest.raises(WebSocketClosed):  # and it stays closed
        await ws.get_message()


async def test_fragments_over_the_limit_together_are_refused() -> None:
    ws, remote = _pair(client=True, max_message=1000)
    proto = _remote(True)
    await remote.send_all(proto.send(BytesMessage(data=bytes(600), message_finished=False)))
    await remote.send_all(proto.send(BytesMessage(data=bytes(600), message_finished=True)))
    with pytest.raises(WebSocketClosed) as closed:
        await ws.get_message()
    assert closed.value.code == 1009


async def test_a_cancelled_read_loses_nothing(autojump_clock: Any) -> None:
    """Cancelled with a frame's header and half its payload in: the next read returns the
    whole message, and the one after it."""
    ws, remote = _pair(client=False)
    proto = _remote(False)
    first = proto.send(BytesMessage(data=bytes(range(200)) * 1000))
    await remote.send_all(first[:2])
    with trio.move_on_after(1):
        await ws.get_message()
    await remote.send_all(first[2:100_000])
    with trio.move_on_after(1):
        await ws.get_message()
    await remote.send_all(first[100_000:] + proto.send(BytesMessage(data=b"next")))
    assert await ws.get_message() == bytes(range(200)) * 1000
    assert await ws.get_message() == b"next"


@pytest.mark.parametrize("how", ["eof", "closed"])
async def test_a_stream_that_ends_without_a_close_frame_is_1006(how: str) -> None:
    ws, remote = _pair(client=True)
    await remote.send_all(frame_header(0x2, 10, masked=False) + b"half")
    if how == "eof":
        await remote.aclose()
    else:
        await ws._stream.aclose()
    with pytest.raises(WebSocketClosed) as closed:
        await ws.get_message()
    assert closed.value.code == 1006


# -- writing and closing ----------------------------------------------------------------------


@pytest.mark.parametrize("client", [False, True])
@pytest.mark.parametrize("size", [0, 100, 70_000, 2_000_000])
async def test_what_we_send_wsproto_reads(client: bool, size: int) -> None:
    ws, remote = _pair(client=client)
    payload = memoryview(bytes(range(256)) * (size // 256 + 1))[:size]
    await ws.send_message(b"head", payload)
    await ws.send_message(b"second")
    events: list[Any] = []
    proto = _remote(client)
    while len(events) < 2:
        proto.receive_data(await remote.receive_some())
        events += [e for e in proto.events() if isinstance(e, BytesMessage)]
    assert [bytes(e.data) for e in events] == [b"head" + bytes(payload), b"second"]


async def test_the_remotes_close_is_answered_and_ends_the_websocket(autojump_clock: Any) -> None:
    ws, remote = _pair(client=True)
    proto = _remote(True)
    await remote.send_all(proto.send(BytesMessage(data=b"last")))
    await remote.send_all(proto.send(CloseConnection(code=1000, reason="bye")))
    assert await ws.get_message() == b"last"
    with pytest.raises(WebSocketClosed) as closed:
        await ws.get_message()
    assert (closed.value.code, closed.value.reason) == (1000, "bye")
    (event,) = await _events(remote, proto)
    assert isinstance(event, CloseConnection) and event.code == 1000
    with pytest.raises(WebSocketClosed):
        await ws.send_message(b"too late")
    start = trio.current_time()
    await ws.aclose()  # nothing left to wait for
    assert trio.current_time() == start
    assert await remote.receive_some() == b""  # the stream is closed


async def test_aclose_reads_on_to_the_remotes_close(autojump_clock: Any) -> None:
    """Our close frame goes out at once; messages the remote had sent are dropped; aclose
    returns when the remote's close arrives (at 3 s), and the stream is then closed."""
    ws, remote = _pair(client=False)
    proto = _remote(False)

    async def remote_side() -> None:
        (event,) = await _events(remote, proto)
        assert isinstance(event, CloseConnection) and event.code == 1002
        assert event.reason == "seq: replayed"
        # (wsproto sends nothing after a close frame has come; a peer may, until it reads it)
        await remote.send_all(frame_header(0x2, 9, masked=True) + b"in flight")
        await trio.sleep(3)
        await remote.send_all(proto.send(CloseConnection(code=1002)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(remote_side)
        await ws.aclose(1002, "seq: replayed")
        assert trio.current_time() == 3
    assert await remote.receive_some() == b""


async def test_aclose_on_a_silent_remote_ends_at_the_callers_deadline(autojump_clock: Any) -> None:
    ws, remote = _pair(client=True)
    with trio.move_on_after(2):
        await ws.aclose()
    assert trio.current_time() == 2
    (event,) = await _events(remote, _remote(True))
    assert isinstance(event, CloseConnection) and event.code == 1000
    assert await remote.receive_some() == b""  # closed all the same


async def test_a_broken_stream_fails_the_write_and_aclose_does_not_wait() -> None:
    ws, remote = _pair(client=True)
    await remote.aclose()
    with pytest.raises(WebSocketClosed) as closed:
        for _ in range(100):  # the in-memory stream notices on a write after the remote closed
            await ws.send_message(b"x", bytes(100_000))
    assert closed.value.code == 1006
    with trio.fail_after(1):
        await ws.aclose()


# -- the handover from trio-websocket -----------------------------------------------------------


@pytest.mark.parametrize("then", [[b"envelope"], [b"a", bytes(300_000), b"c"]])
async def test_the_stream_is_handed_over_at_the_first_byte_after_the_handshake(
    then: list[bytes],
) -> None:
    """trio-websocket runs the upgrade and three messages over HandshakeStreams; whatever each
    side sends next, sent at once and before the other side has even read the handshake's
    last message, is read by our WebSocket on the detached streams, none of it by
    trio-websocket."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client_hs = HandshakeStream(client_raw, messages=1)
    server_hs = HandshakeStream(server_raw, messages=2)
    got: dict[str, list[bytes]] = {}
    async with trio.open_nursery() as outer:

        async def server() -> None:
            async with trio.open_nursery() as nursery:
                request = await trio_websocket.wrap_server_stream(nursery, server_hs)
                tws = await request.accept()
                assert await tws.get_message() == b"hello"
                await tws.send_message(b"reply")
                assert await tws.get_message() == b"finish"
                ws = WebSocket(server_hs.detach(), client=False, max_message=MAX)
                for message in then:
                    await ws.send_message(message[:1], memoryview(message)[1:])
                got["server"] = [bytes(await ws.get_message()) for _ in then]
                nursery.cancel_scope.cancel()

        async def client() -> None:
            async with trio.open_nursery() as nursery:
                tws = await trio_websocket.wrap_client_stream(
                    nursery,
                    client_hs,  # type: ignore[arg-type]
                    "peer",
                    "/x",
                )
                await tws.send_message(b"hello")
                assert await tws.get_message() == b"reply"
                await tws.send_message(b"finish")
                ws = WebSocket(client_hs.detach(), client=True, max_message=MAX)
                for message in then:
                    await ws.send_message(message[:1], memoryview(message)[1:])
                got["client"] = [bytes(await ws.get_message()) for _ in then]
                nursery.cancel_scope.cancel()

        outer.start_soon(server)
        outer.start_soon(client)
    assert got == {"server": then, "client": then}


async def test_a_remote_that_sends_before_it_is_answered_is_never_handed_over(
    autojump_clock: Any,
) -> None:
    """A dialer that sends its messages with its upgrade request, not waiting for the 101:
    they are read with the request. Nothing read past the handshake is lost silently: the
    handshake does not finish (the listener drops it at its handshake timeout, here 10 s),
    and the stream cannot be handed over."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    server_hs = HandshakeStream(server_raw, messages=1)
    proto = Connection(ConnectionType.CLIENT)
    request = (
        b"GET /x HTTP/1.1\r\nHost: peer\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await client_raw.send_all(
        request
        + proto.send(BytesMessage(data=b"hello"))
        + proto.send(BytesMessage(data=b"too early"))
    )
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(10) as handshake:
            tws = await (await trio_websocket.wrap_server_stream(nursery, server_hs)).accept()
            await tws.get_message()
        assert handshake.cancelled_caught and trio.current_time() == 10
        with pytest.raises(ProtocolError, match="before it was answered"):
            server_hs.detach()
        nursery.cancel_scope.cancel()


# -- over a TCP socket: reads past frame boundaries, large payloads into their own buffer -------


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("client", [False, True])
@pytest.mark.parametrize("usable", [True, False])
async def test_over_a_socket_large_payloads_are_read_into_a_buffer_of_their_own(
    monkeypatch: pytest.MonkeyPatch, client: bool, usable: bool, raw: bool
) -> None:
    """On a TCP socket the reader takes every small frame queued in one read, and reads a
    payload of MIN_WAIT bytes or more into a buffer of its own, the bytes read with the
    frames before it copied in first, the rest waited for in the kernel (the mark set to
    what is missing, then back to 1 for the small frames after it). What the remote's
    wsproto sends (random masking keys from a client, a small message right behind a large
    one) comes out whole; where the mark cannot be set, the same, read as it comes; and the
    same through trio's own socket calls (``raw`` False: a socket we cannot call directly)."""
    marks = record_marks(monkeypatch, usable)
    sizes = [10, 3 << 20, 5, 200_000, 70_000, 0, (4 << 20) - 100, 7]
    proto = _remote(client)
    wire = b"".join(
        proto.send(BytesMessage(data=bytes([i % 251]) * n)) for i, n in enumerate(sizes)
    )
    with trio.fail_after(20):
        ours, theirs = await tcp_pair()
        async with ours, theirs:
            stream = frame_sized(ours)
            assert isinstance(stream, FrameSizedReceiveStream)
            stream._cursor.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")  # (as if upgraded)
            if not raw:
                stream._raw = None
            ws = WebSocket(stream, client=client, max_message=8 << 20)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(theirs.send_all, wire)
                for i, n in enumerate(sizes):
                    message = await ws.get_message()
                    assert bytes(message) == bytes([i % 251]) * n, (i, n)
                    # large ones in a buffer of their own, not in the bytes a read returned
                    own = isinstance(getattr(message, "obj", None), np.ndarray)
                    assert own == (n >= MIN_WAIT), (i, n)
    if usable:
        assert marks and marks[-1] == 1 and max(marks) > MIN_WAIT


async def test_over_a_socket_a_cancelled_large_read_keeps_what_it_has() -> None:
    """Cancelled while a large payload is half in: the next read finishes that payload from
    where it was, then reads the message after it."""
    payload = bytes(range(256)) * 4000  # 1,024,000 bytes
    frame = frame_header(0x2, len(payload), masked=False) + payload
    with trio.fail_after(20):
        ours, theirs = await tcp_pair()
        async with ours, theirs:
            ws = WebSocket(frame_sized(ours), client=True, max_message=8 << 20)
            ws._stream._cursor.feed(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")  # type: ignore[attr-defined]
            await theirs.send_all(frame[:60_000])  # (what a socket's buffer takes unread)
            with trio.move_on_after(0.2) as scope:
                await ws.get_message()
            assert scope.cancelled_caught and ws._large is not None
            assert ws._large.filled > 0
            async with trio.open_nursery() as nursery:
                rest = frame[60_000:] + frame_header(0x2, 4, masked=False) + b"next"
                nursery.start_soon(theirs.send_all, rest)
                assert bytes(await ws.get_message()) == payload
                assert bytes(await ws.get_message()) == b"next"


async def test_over_a_socket_a_stream_cut_inside_a_large_payload_is_1006() -> None:
    with trio.fail_after(20):
        ours, theirs = await tcp_pair()
        async with ours:
            ws = WebSocket(frame_sized(ours), client=True, max_message=8 << 20)
            await theirs.send_all(frame_header(0x2, 500_000, masked=False) + bytes(100_000))
            await theirs.aclose()
            with pytest.raises(WebSocketClosed) as closed:
                await ws.get_message()
            assert closed.value.code == 1006 and "ended without a close frame" in str(closed.value)
