"""Frame-sized reads: the websocket frame cursor (sans-IO) and the socket stream that uses it."""

from __future__ import annotations

import itertools
import socket
from typing import Any

import numpy as np
import pytest
import trio
import trio_websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, Ping

from moshpit_trio.wire import frame_reads
from moshpit_trio.wire.frame_reads import FrameCursor, FrameSizedReceiveStream, frame_sized

_HTTP = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"


def _header_size(payload: int, masked: bool) -> int:
    return 2 + (0 if payload < 126 else 2 if payload < 65536 else 8) + (4 if masked else 0)


def _wire(sizes: list[int], masked: bool) -> tuple[bytes, list[tuple[int, int, int]]]:
    """An HTTP head, then one frame per size as wsproto writes them (a client's are masked);
    and each frame's (start, header size, end) in the whole."""
    sender = Connection(ConnectionType.CLIENT if masked else ConnectionType.SERVER)
    wire = bytearray(_HTTP)
    frames = []
    for n in sizes:
        frame = sender.send(BytesMessage(data=bytes(n)) if n >= 0 else Ping(payload=b"p"))
        size = n if n >= 0 else 1
        frames.append((len(wire), _header_size(size, masked), len(wire) + len(frame)))
        wire += frame
    return bytes(wire), frames


def _truth(pos: int, frames: list[tuple[int, int, int]]) -> int:
    """What the current frame still lacks once ``pos`` bytes are in (the cursor's contract)."""
    if pos < len(_HTTP):
        return 1
    for start, header, end in frames:
        if start <= pos < end:
            into = pos - start
            if into < 2:
                return 2 - into
            if into < header:
                return header - into
            return end - pos
    return 2  # between frames (or after the last): the next header's first two bytes


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(
        st.one_of(st.integers(-1, 130), st.integers(65_530, 65_540), st.integers(70_000, 300_000)),
        max_size=6,
    ),
    masked=st.booleans(),
    cuts=st.lists(st.integers(0, 2_000_000), max_size=20),
)
def test_the_cursor_knows_what_the_frame_still_lacks(
    sizes: list[int], masked: bool, cuts: list[int]
) -> None:
    wire, frames = _wire(sizes, masked)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    cursor = FrameCursor()
    assert cursor.missing() == 1 and cursor.in_http
    for a, b in itertools.pairwise(points):
        cursor.feed(wire[a:b])
        assert cursor.missing() == _truth(b, frames), (a, b)
        assert cursor.in_http == (b < len(_HTTP))


def test_the_cursor_finds_the_end_of_the_http_head_split_across_reads() -> None:
    wire, _ = _wire([1000], masked=False)
    end = len(_HTTP)
    for cut in range(end - 4, end + 1):
        cursor = FrameCursor()
        cursor.feed(wire[:cut])
        assert cursor.in_http == (cut < end)
        cursor.feed(wire[cut : end + 4])  # the head's end, then the frame's first 4 bytes
        assert not cursor.in_http
        assert cursor.missing() == 1000 - 0  # 2 + 2 length bytes in: the payload is next


@settings(max_examples=100, deadline=None)
@given(
    parts=st.lists(
        st.tuples(st.sampled_from(["whole", "fragmented", "ping", "close"]), st.integers(0, 300)),
        max_size=6,
    ),
    cuts=st.lists(st.integers(0, 5_000), max_size=10),
)
def test_the_cursor_counts_data_messages_once_they_are_whole(
    parts: list[tuple[str, int]], cuts: list[int]
) -> None:
    """``messages`` goes up as the last byte of a message's final frame is fed: fragments,
    pings and close frames do not count; an empty message counts once its header is in."""
    sender = Connection(ConnectionType.SERVER)
    wire = bytearray(_HTTP)
    ends = []  # where each data message is whole
    for kind, n in parts:
        if kind == "whole":
            wire += sender.send(BytesMessage(data=bytes(n)))
            ends.append(len(wire))
        elif kind == "fragmented":
            wire += sender.send(BytesMessage(data=bytes(n), message_finished=False))
            wire += sender.send(Ping(payload=b"between"))
            wire += sender.send(BytesMessage(data=bytes(n), message_finished=True))
            ends.append(len(wire))
        elif kind == "ping":
            wire += sender.send(Ping(payload=bytes(min(n, 125))))
        else:
            wire += bytes((0x88, 2)) + (1000).to_bytes(2, "big")  # (wsproto sends no more after)
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    cursor = FrameCursor()
    for a, b in itertools.pairwise(points):
        cursor.feed(wire[a:b])
        assert cursor.messages == sum(1 for end in ends if end <= b), (a, b)


def test_the_cursor_reads_a_64_bit_length() -> None:
    cursor = FrameCursor()
    cursor.feed(_HTTP + bytes([0x82, 127]) + (5 << 30).to_bytes(8, "big") + bytes(7))
    assert cursor.missing() == (5 << 30) - 7


# ---- the stream over real sockets ---------------------------------------------------------


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a TCP connection on 127.0.0.1."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return client, server


def record_marks(monkeypatch: pytest.MonkeyPatch, usable: bool) -> list[int]:
    """The SO_RCVLOWAT marks FrameSizedReceiveStreams set from now on, in order; with
    ``usable`` False, a platform where the option cannot be set (none is, none recorded)."""
    marks: list[int] = []
    real_set_mark = FrameSizedReceiveStream._set_mark

    def set_mark(self: FrameSizedReceiveStream, mark: int) -> None:
        if not usable:
            self._usable = False
            return
        marks.append(mark)
        real_set_mark(self, mark)

    monkeypatch.setattr(FrameSizedReceiveStream, "_set_mark", set_mark)
    return marks


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("usable", [True, False])
async def test_a_websocket_over_frame_sized_reads(
    monkeypatch: pytest.MonkeyPatch, usable: bool, raw: bool
) -> None:
    """Big messages arrive whole and the reads wait for the whole payload; a small message
    right after one is read at once (the mark is back down), so a peer that sends and then
    waits for an answer is answered. Where the socket option cannot be set, the stream reads
    as a plain one. The same through trio's own socket calls, where its socket is not one we
    can call directly (``raw`` False)."""
    marks = record_marks(monkeypatch, usable)
    sizes = [3 << 20, 10, 200_000, 5, (4 << 20) - 100, 0]
    kwargs: dict[str, Any] = {"max_message_size": 8 << 20}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = await tcp_pair()
            wrapped = frame_sized(client_stream)
            assert isinstance(wrapped, FrameSizedReceiveStream)
            assert wrapped.socket is client_stream.socket
            # on a TCP socket, the calls go to the socket under trio's
            assert isinstance(wrapped._raw, socket.socket)
            assert wrapped._raw.fileno() == client_stream.socket.fileno()
            if not raw:
                wrapped._raw = None

            async def serve() -> None:
                request = await trio_websocket.wrap_server_stream(nursery, server_stream, **kwargs)
                ws = await request.accept()
                for n in sizes:  # each message waits for the client's answer to the last
                    await ws.send_message(bytes([n % 251]) * n)
                    assert await ws.get_message() == str(n).encode()
                await ws.aclose()

            nursery.start_soon(serve)
            ws = await trio_websocket.wrap_client_stream(
                nursery, wrapped, "127.0.0.1", "/", **kwargs
            )
            for n in sizes:
                message = await ws.get_message()
                assert message == bytes([n % 251]) * n
                await ws.send_message(str(n).encode())
            if usable:  # between frames the kernel's mark is back to 1
                got = client_stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)
                assert got == 1
            await ws.aclose()
    if usable:
        # each large payload's wait starts at its whole size (its header was read alone)
        assert {3 << 20, 200_000, (4 << 20) - 100} <= set(marks)
        assert marks[-1] == 1
    else:
        assert marks == []


def _queued_bytes(sock: Any) -> int:
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def test_reads_follow_the_frames_and_a_queued_large_payload_is_one_read() -> None:
    """No read ever takes bytes of two frames, nor a large payload's (MIN_WAIT or more) header
    together with its first bytes, however the bytes arrive. With everything already queued
    (kernel buffers that hold it all), the reads are exactly: a small frame whole, a large
    frame's header, then its payload in one read."""
    from moshpit_trio.wire.streams import _tune

    sizes = [300_000, 10, 0, -1, 100_000, 200_000, 5, 65_535, 65_536]
    wire, frames = _wire(sizes, masked=True)
    body = wire[len(_HTTP) :]
    offset = len(_HTTP)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = await tcp_pair()
            for stream in (client_stream, server_stream):
                _tune(stream.socket)
            wrapped = FrameSizedReceiveStream(server_stream)
            wrapped._cursor.feed(_HTTP)
            sent = trio.Event()

            async def send() -> None:
                await client_stream.send_all(body)
                sent.set()

            nursery.start_soon(send)
            # Loopback delivers as it sends; buffers too small for it all hold the sender up.
            with trio.move_on_after(1):
                await sent.wait()
            all_queued = _queued_bytes(server_stream.socket) == len(body)
            reads: list[bytes] = []
            while sum(map(len, reads)) < len(body):
                reads.append(bytes(await wrapped.receive_some(4 << 20)))
            await client_stream.aclose()
            await wrapped.aclose()
    assert b"".join(reads) == body
    # the cuts no read may cross: frame ends, and a large payload's start
    cuts = {end - offset for _, _, end in frames}
    cuts |= {
        start + header - offset
        for (start, header, _), n in zip(frames, sizes, strict=True)
        if n >= frame_reads.MIN_WAIT
    }
    pos = 0
    for chunk in reads:
        assert not any(pos < cut < pos + len(chunk) for cut in cuts), (pos, len(chunk))
        pos += len(chunk)
    if all_queued:
        expected = []
        for (start, header, end), n in zip(frames, sizes, strict=True):
            if n >= frame_reads.MIN_WAIT:
                expected += [header, end - start - header]
            else:
                expected.append(end - start)
        assert [len(r) for r in reads] == expected


@settings(max_examples=200, deadline=None)
@given(
    size=st.one_of(st.integers(0, 130), st.integers(65_530, 65_540), st.integers(1, 1 << 40)),
    masked=st.booleans(),
    cut=st.integers(0, 14),
)
def test_a_frame_head_is_read_only_once_it_is_all_there(size: int, masked: bool, cut: int) -> None:
    header = _header_size(size, masked)
    code = size if size < 126 else 126 if size < 65536 else 127
    raw = bytes([0x82, (0x80 if masked else 0) | code])
    if code == 126:
        raw += size.to_bytes(2, "big")
    elif code == 127:
        raw += size.to_bytes(8, "big")
    raw += bytes(4) if masked else b""
    assert len(raw) == header
    got = frame_reads._frame_head(raw[:cut] if cut < header else raw + b"payload")
    assert got == (None if cut < header else (header, size))


async def test_a_socket_that_refuses_the_option_reads_as_a_plain_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        wrapped = FrameSizedReceiveStream(client_stream)

        def refuse(*args: Any) -> None:
            raise OSError("not here")

        monkeypatch.setattr(client_stream.socket, "setsockopt", refuse)
        wrapped._cursor.feed(_HTTP + bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big"))
        await server_stream.send_all(b"x" * 100)
        assert await wrapped.receive_some(1000) == b"x" * 100  # no wait for the rest
        assert not wrapped._usable
        await wrapped.aclose()
        await server_stream.aclose()


async def test_only_tcp_sockets_are_wrapped() -> None:
    a, _b = trio.testing.memory_stream_pair()
    assert frame_sized(a) is a


async def test_tcp_network_streams_keep_a_megabyte_unsent_in_the_kernel() -> None:
    """trio's 16 KiB TCP_NOTSENT_LOWAT is raised, so a send() can queue a megabyte."""
    from moshpit_trio.wire.streams import TcpNetwork

    if not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        pytest.skip("no TCP_NOTSENT_LOWAT on this platform")
    network = TcpNetwork()

    async def handler(stream: trio.abc.Stream) -> None:
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(network.serve, "127.0.0.1", 0, handler)
            stream = await network.connect(host, port)
            assert isinstance(stream, trio.SocketStream)
            got = stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
            assert got == 1024 * 1024
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_closed_stream_reports_closed_as_the_plain_stream_does() -> None:
    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        wrapped = FrameSizedReceiveStream(client_stream)
        wrapped._cursor.feed(_HTTP + bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big"))
        await wrapped.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await wrapped.receive_some(1000)
        await server_stream.aclose()


async def test_a_peer_that_closes_mid_frame_ends_the_read() -> None:
    """End of stream wakes a read that waits for the rest of a frame."""
    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        wrapped = FrameSizedReceiveStream(client_stream)
        wrapped._cursor.feed(_HTTP + bytes([0x82, 127]) + (1 << 20).to_bytes(8, "big"))
        await server_stream.send_all(b"y" * 10)
        await server_stream.aclose()
        got = b""
        while chunk := await wrapped.receive_some(1000):
            got += chunk
        assert got == b"y" * 10
        await wrapped.aclose()


class _RecordingSocket:
    def __init__(self) -> None:
        self.options: dict[tuple[int, int], int] = {}

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options[(level, option)] = value


@pytest.mark.parametrize(
    ("rmem_max", "wmem_max", "pinned"),
    [
        (4 << 20, 4 << 20, {socket.SO_RCVBUF, socket.SO_SNDBUF}),  # granted whole: asked for
        (212_992, 212_992, set()),  # a stock kernel's caps: left to autotuning
        (8 << 20, 212_992, {socket.SO_RCVBUF}),
        (None, None, {socket.SO_RCVBUF, socket.SO_SNDBUF}),  # caps unknown: asked for
    ],
)
def test_socket_buffers_are_asked_for_only_where_the_kernel_grants_them_whole(
    monkeypatch: pytest.MonkeyPatch, rmem_max: int | None, wmem_max: int | None, pinned: set[int]
) -> None:
    from moshpit_trio.wire import streams

    caps = {"/proc/sys/net/core/rmem_max": rmem_max, "/proc/sys/net/core/wmem_max": wmem_max}
    monkeypatch.setattr(streams, "_kernel_cap", caps.__getitem__)
    sock = _RecordingSocket()
    streams._tune(sock)
    buffers = {opt for (level, opt) in sock.options if opt in (socket.SO_RCVBUF, socket.SO_SNDBUF)}
    assert buffers == pinned
    assert all(sock.options[(socket.SOL_SOCKET, opt)] == 4 << 20 for opt in pinned)


def test_a_kernel_cap_is_read_from_its_sysctl_file(tmp_path: Any) -> None:
    from moshpit_trio.wire.streams import _kernel_cap

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_text("212992\n")
    bad.write_text("lots\n")
    assert _kernel_cap(str(good)) == 212_992
    assert _kernel_cap(str(bad)) is None
    assert _kernel_cap(str(tmp_path / "missing")) is None


def _plain(wrapped: FrameSizedReceiveStream, raw: bool) -> FrameSizedReceiveStream:
    """``wrapped``, its socket calls made directly (``raw``) or through trio's own."""
    assert wrapped._raw is not None
    if not raw:
        wrapped._raw = None
    return wrapped


@pytest.mark.parametrize("raw", [True, False])
async def test_writes_after_a_close_or_an_eof_are_refused_alike(raw: bool) -> None:
    """Direct or through trio, a stream reports its own close and its EOF as trio's streams
    do (ClosedResourceError), and a write that fits goes out whole."""
    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        wrapped = _plain(FrameSizedReceiveStream(client_stream), raw)
        payload = np.arange(1000, dtype=np.float32)
        await wrapped.send_all(memoryview(payload))  # a view of floats: its bytes go out
        got = b""
        while len(got) < payload.nbytes:
            got += await server_stream.receive_some(1 << 16)
        assert got == payload.tobytes()
        await wrapped.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await wrapped.send_all(b"after the eof")
        assert await server_stream.receive_some(10) == b""
        await wrapped.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await wrapped.send_all(b"after the close")
        with pytest.raises(trio.ClosedResourceError):
            await wrapped.receive_some(10)
        await server_stream.aclose()


@pytest.mark.parametrize("raw", [True, False])
async def test_a_reset_connection_is_broken_for_reads_and_writes(raw: bool) -> None:
    """A peer that resets the connection (RST) breaks it: the next read or write raises
    BrokenResourceError, direct or through trio."""
    import struct

    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        reader = _plain(FrameSizedReceiveStream(client_stream), raw)
        # SO_LINGER with a zero timeout: close() sends a reset
        server_stream.socket.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        await server_stream.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await reader.receive_some(10)
        with pytest.raises(trio.BrokenResourceError):
            while True:  # the reset may be learned from the first write's answer
                await reader.send_all(b"x" * 1000)
        await reader.aclose()


@pytest.mark.parametrize("raw", [True, False])
async def test_socket_calls_stay_cancellable(raw: bool) -> None:
    """A cancelled task's write sends nothing, and a read waiting for bytes that never come
    is ended by its cancel scope, direct or through trio."""
    with trio.fail_after(10):
        client_stream, server_stream = await tcp_pair()
        wrapped = _plain(FrameSizedReceiveStream(client_stream), raw)
        with trio.CancelScope() as scope:
            scope.cancel()
            await wrapped.send_all(b"never sent")
        assert scope.cancelled_caught
        with trio.move_on_after(0.05) as waited:
            await wrapped.receive_some(10)
        assert waited.cancelled_caught
        await wrapped.send_all(b"sent")
        assert await server_stream.receive_some(100) == b"sent"
        await wrapped.aclose()
        await server_stream.aclose()
