"""Wake the websocket reader once per chunk of a frame, not once per few packets.

A multi-megabyte envelope is one websocket frame, and the websocket layer can do nothing with it
until the whole frame is there (``speedups.FrameBuffer`` holds it until then). Yet a socket is
readable as soon as one packet is in, so the reader wakes, reads what came and goes back to
sleep, over and over: on a 1 Gbit/s link about 60 KB a time, some 1,200 wake-ups per process
per all-reduce round of 10M floats, each a trip through trio's scheduler, trio-websocket and
wsproto. With four peers on two cores that Python work, not the link, set the round's pace.

The kernel can wait for us: with ``SO_RCVLOWAT`` set to ``L``, ``epoll`` reports the socket
readable only once ``L`` bytes are queued (or at end of stream, or when the receive window is
nearly shut: the kernel never lets this deadlock a connection). :class:`FrameCursor` follows the
stream's websocket framing (RFC 6455 section 5.2, after the HTTP upgrade) to know how many bytes
the frame being received still lacks; :class:`FrameSizedReceiveStream` asks the kernel to wait
for that many (up to :data:`MAX_WAIT`) before it reads. The reads are then about a megabyte each.

It never waits for a byte the frame does not need: the low-water mark is at most what completes
the current frame (2, a header's first bytes, between frames), so a peer that sends a frame
and then waits for an answer is read as soon as the frame is whole, as before. Small frames
(calls, pings) are read as they come: below :data:`MIN_WAIT` the mark stays at 1.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Final

import trio

__all__ = ["MAX_WAIT", "MIN_WAIT", "FrameCursor", "FrameSizedReceiveStream", "frame_sized"]

#: The most a read waits for. Linux caps the mark at half the receive buffer anyway (4 MiB with
#: ``TcpNetwork``'s 8 MiB); a megabyte keeps the reads large while the kernel's queue stays well
#: inside the window.
MAX_WAIT: Final = 1024 * 1024
#: Below this many missing bytes a read takes what is there (no system call to change the mark).
MIN_WAIT: Final = 64 * 1024

_HTTP_END: Final = b"\r\n\r\n"
_SO_RCVLOWAT: Final = getattr(socket, "SO_RCVLOWAT", None)


class FrameCursor:
    """Where a byte stream stands in its websocket framing (sans-IO).

    Feed it every byte read, in order, from the start of the connection: first the HTTP upgrade
    (request or response, up to the blank line that ends its head), then frames. :meth:`missing`
    says how many more bytes the frame being received needs to be whole.

    >>> cursor = FrameCursor()
    >>> cursor.feed(b"HTTP/1.1 101 Switching Protocols\\r\\n\\r\\n")
    >>> cursor.missing()  # a frame header starts next: at least 2 bytes
    2
    >>> cursor.feed(bytes([0x82, 126]) + (1000).to_bytes(2, "big") + bytes(10))
    >>> cursor.missing()  # 990 bytes of the 1000-byte payload still to come
    990
    """

    __slots__ = ("_header", "_in_http", "_payload_left", "_tail")

    def __init__(self) -> None:
        self._in_http = True
        self._tail = b""  # in the HTTP head: its last 3 bytes, to find a split "\r\n\r\n"
        self._header = bytearray()  # the frame header read so far
        self._payload_left = 0

    @property
    def in_http(self) -> bool:
        """Still in the HTTP upgrade (before the first frame)."""
        return self._in_http

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        i = 0
        if self._in_http:
            seen = self._tail + bytes(view)
            end = seen.find(_HTTP_END)
            if end < 0:
                self._tail = seen[-3:]
                return
            self._in_http = False
            self._tail = b""
            i = end + len(_HTTP_END) - (len(seen) - n)
        header = self._header
        while i < n:
            if self._payload_left:
                take = min(self._payload_left, n - i)
                self._payload_left -= take
                i += take
                continue
            size = self._header_size()
            take = min(size - len(header), n - i)
            header += view[i : i + take]
            i += take
            if len(header) < 2:
                break
            size = self._header_size()
            if len(header) < size:
                continue  # its extended length or masking key is still to come
            self._payload_left = self._payload_length()
            header.clear()

    def _header_size(self) -> int:
        """The current header's size as far as it is known (2 until its second byte is in)."""
        header = self._header
        if len(header) < 2:
            return 2
        code = header[1] & 0x7F
        return 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if header[1] & 0x80 else 0)

    def _payload_length(self) -> int:
        header = self._header
        code = header[1] & 0x7F
        if code == 126:
            return int.from_bytes(header[2:4], "big")
        if code == 127:
            return int.from_bytes(header[2:10], "big")
        return code

    def missing(self) -> int:
        """Bytes still to arrive before the current frame is whole (at least 1). In the HTTP
        upgrade, 1: its length is not known."""
        if self._in_http:
            return 1
        if self._payload_left:
            return self._payload_left
        header = self._header
        if len(header) < 2:
            return 2 - len(header)
        # The header's second byte is in, so its size is known; the payload's length may not be.
        return self._header_size() - len(header)


class FrameSizedReceiveStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` carrying a websocket, whose reads wait in the kernel for the rest
    of the frame being received (up to :data:`MAX_WAIT`); everything else is passed through.

    Where ``SO_RCVLOWAT`` cannot be set (another platform, another kind of socket), it reads as
    the plain stream does.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._cursor = FrameCursor()
        self._mark = 1  # the socket's SO_RCVLOWAT as we last set it (1: the kernel's default)
        self._usable = _SO_RCVLOWAT is not None

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._stream.socket

    def _set_mark(self, mark: int) -> None:
        if mark == self._mark:
            return
        try:
            self._stream.socket.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, mark)  # type: ignore[arg-type]
        except OSError:
            self._usable = False  # not here: read as a plain stream from now on
            with contextlib.suppress(OSError):
                self._stream.socket.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)  # type: ignore[arg-type]
            self._mark = 1
            return
        self._mark = mark

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._usable:
            wait = min(self._cursor.missing(), MAX_WAIT)
            if wait >= MIN_WAIT:
                self._set_mark(wait)
                if self._usable:
                    # Readable once `wait` bytes are queued (or at end of stream).
                    await trio.lowlevel.wait_readable(self._stream.socket)
            else:
                self._set_mark(1)
        data = await self._stream.receive_some(max_bytes)
        self._cursor.feed(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


def frame_sized(stream: trio.abc.Stream) -> trio.abc.Stream:
    """``stream`` with frame-sized reads when it is a TCP socket (``TcpNetwork``'s); any other
    stream (in memory, a relay's pipe, a rate-limited wrapper) as it is."""
    if isinstance(stream, trio.SocketStream):
        return FrameSizedReceiveStream(stream)
    return stream
