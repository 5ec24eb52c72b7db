"""Read a large websocket frame's payload out of the socket in one piece, in one read.

A multi-megabyte envelope is one websocket frame, and the websocket layer can do nothing with it
until the whole frame is there (``speedups.FrameBuffer`` holds it until then). Two costs come
from reading it as the bytes happen to arrive:

* Wake-ups. A socket is readable as soon as one packet is in, so the reader wakes, reads what
  came and sleeps again: on a 1 Gbit/s link about 60 KB a time, some 1,200 trips through trio's
  scheduler, trio-websocket and wsproto per process per all-reduce round of 10M floats.
* A copy. A payload read in several pieces must be joined into one ``bytes`` before it can be
  decrypted: one more pass over every received byte (on loopback, about a sixth of a round's
  CPU), the only copy between the kernel's and the decryption's.

The kernel can wait for us: with ``SO_RCVLOWAT`` set to ``L``, ``epoll`` reports the socket
readable only once ``L`` bytes are queued (or at end of stream, or when the receive window is
nearly shut: the kernel never lets this deadlock a connection). :class:`FrameCursor` follows the
stream's websocket framing (RFC 6455 section 5.2, after the HTTP upgrade).
:class:`FrameSizedReceiveStream` uses it so that a payload of :data:`MIN_WAIT` bytes or more
comes out of the socket as one ``bytes`` object that nothing downstream copies again:

* between frames it looks at the next header without taking it (``MSG_PEEK``); when that frame's
  payload is large it reads the header alone, so the payload's first bytes are not taken with
  it and cut off from the rest;
* inside a large payload it sets the mark to what the payload still lacks (the kernel caps it at
  half the receive buffer: 4 MiB with ``TcpNetwork``'s buffers) and reads no further than the
  payload's end, in one read once the mark is reached.

Every read and write here goes to the socket under trio's directly (``_raw_socket``): trio's
own socket calls end each success with a trip through the scheduler, which these skip (the
comment above ``FrameSizedReceiveStream._recv`` says why that is sound, and what it saves).

That is how trio-websocket reads the upgrade and the handshake. After it, the connection's
own websocket (``websocket.WebSocket``) follows the frames itself and reads through
:meth:`FrameSizedReceiveStream.receive_raw` (every small frame queued, in one read) and
:meth:`FrameSizedReceiveStream.receive_into` (a large payload into its own buffer, waited for
with the same mark).

When the mark falls short (a payload over the kernel's cap, an early wake-up) the payload comes
in more than one piece and is joined as before: only the speed changes. It never waits for a
byte the frame does not need, so a peer that sends a frame and then waits for an answer is read
as soon as the frame is whole. Small frames (calls, pings) are read as they come: below
:data:`MIN_WAIT` the mark stays at 1.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable
from typing import Final, TypeVar

import trio

__all__ = ["MAX_WAIT", "MIN_WAIT", "FrameCursor", "FrameSizedReceiveStream", "frame_sized"]

#: The most one read waits for and takes. Linux caps the mark lower anyway, at half the
#: receive buffer (4 MiB with ``TcpNetwork``'s); this bounds what a frame header announcing
#: exabytes can make us ask of the kernel, or allocate, when no ``max_bytes`` is given.
MAX_WAIT: Final = 16 * 1024 * 1024
#: Payloads from this size on are read whole; below it a read takes what is there (no system
#: call to change the mark, no look at the header first).
MIN_WAIT: Final = 64 * 1024

#: a read's size when nobody says (trio's own default)
_DEFAULT_READ: Final = 65536

_HTTP_END: Final = b"\r\n\r\n"
_MAX_HEADER: Final = 14  # 2 + an 8-byte length + a 4-byte masking key
_SO_RCVLOWAT: Final = getattr(socket, "SO_RCVLOWAT", None)
_T = TypeVar("_T")


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

    __slots__ = ("_ends_message", "_header", "_in_http", "_payload_left", "_tail", "messages")

    def __init__(self) -> None:
        self._in_http = True
        self._tail = b""  # in the HTTP head: its last 3 bytes, to find a split "\r\n\r\n"
        self._header = bytearray()  # the frame header read so far
        self._payload_left = 0
        self._ends_message = False  # the current frame is the last (FIN) of a data message
        #: data messages (text or binary) received whole so far; control frames not counted
        self.messages = 0

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
                if not self._payload_left and self._ends_message:
                    self.messages += 1
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
            # FIN set, and a data opcode (continuation 0, text 1, binary 2; control ones >= 8)
            self._ends_message = header[0] & 0x80 != 0 and header[0] & 0x0F < 8
            header.clear()
            if not self._payload_left and self._ends_message:
                self.messages += 1

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

    @property
    def at_boundary(self) -> bool:
        """Between two frames (past the HTTP upgrade): the next byte starts a frame header."""
        return not self._in_http and not self._payload_left and not self._header

    @property
    def payload_left(self) -> int:
        """Bytes of the current frame's payload still to come (0 outside a payload)."""
        return self._payload_left

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


def _frame_head(data: bytes) -> tuple[int, int] | None:
    """``(header size, payload length)`` of the frame header ``data`` starts with, or None
    while ``data`` holds less than the whole header."""
    if len(data) < 2:
        return None
    code = data[1] & 0x7F
    size = 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if data[1] & 0x80 else 0)
    if len(data) < size:
        return None
    if code == 126:
        return size, int.from_bytes(data[2:4], "big")
    if code == 127:
        return size, int.from_bytes(data[2:10], "big")
    return size, code


def _raw_socket(stream: trio.SocketStream) -> socket.socket | None:
    """The standard library socket under ``stream``'s trio socket, or None where trio keeps
    none we know of (then trio's own calls are used)."""
    raw = getattr(stream.socket, "_sock", None)
    return raw if isinstance(raw, socket.socket) else None


class _StreamErrors:
    """``with _STREAM_ERRORS:`` turns OSErrors into what trio's streams report: a socket
    closed here is ClosedResourceError, anything else BrokenResourceError. (A plain class and
    one shared instance: it wraps every read and write, where a generator-based context
    manager would build two objects a call.)"""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        if isinstance(exc, OSError):
            if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


_STREAM_ERRORS: Final = _StreamErrors()


async def _when_readable(raw: socket.socket, read: Callable[[], _T]) -> _T:
    """``read()`` on ``raw``, waiting in trio while the socket has nothing (cancellation is
    checked first; errors are mapped as trio maps them)."""
    await trio.lowlevel.checkpoint_if_cancelled()
    with _STREAM_ERRORS:
        while True:
            try:
                return read()
            except BlockingIOError:
                pass
            await trio.lowlevel.wait_readable(raw)


class FrameSizedReceiveStream(trio.abc.HalfCloseableStream):
    """A ``trio.SocketStream`` carrying a websocket, whose reads follow its frames: none runs
    past the end of the frame being received, and a payload of :data:`MIN_WAIT` bytes or more
    is waited for in the kernel (up to :data:`MAX_WAIT`) and read alone, in one piece when the
    kernel's mark allows. Everything else is passed through.

    Where ``SO_RCVLOWAT`` cannot be set (another platform, another kind of socket), it reads as
    the plain stream does.
    """

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._raw = _raw_socket(stream)
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
        size = await self._read_size(max_bytes)
        data = await self._recv(_DEFAULT_READ if size is None else size)
        self._cursor.feed(data)
        return data

    # _recv and send_all are trio's socket calls less one thing. Each of trio's checks for
    # cancellation, makes the system call, and after a success yields to the scheduler (a
    # cancel-shielded checkpoint), so that every call is a schedule point. A websocket
    # message takes several such calls on each side: at N=8 on loopback some two thousand
    # trips through trio's run loop per process and round. These still check for
    # cancellation first and wait in trio (wait_readable / wait_writable) when the socket
    # is not ready; what is gone is only the yield after a call that did not wait. Nothing
    # loops on them without yielding elsewhere: trio-websocket hands every message on over
    # a memory channel (a schedule point), and our writer takes each from its queue.

    async def _recv(self, size: int, flags: int = 0) -> bytes:
        if size < 1:
            raise ValueError("a read takes at least one byte")
        raw = self._raw
        if raw is None:
            if flags:
                return await self._stream.socket.recv(size, flags)
            return await self._stream.receive_some(size)
        return await _when_readable(raw, lambda: raw.recv(size, flags))

    async def _read_size(self, max_bytes: int | None) -> int | None:
        """How much the next read takes: never past the end of the frame being received (so
        every frame starts a read of its own, and a large payload is never cut off from its
        first bytes), having waited in the kernel for all of a large payload."""
        cursor = self._cursor
        if not self._usable or cursor.in_http:
            return max_bytes
        left = min(cursor.payload_left, MAX_WAIT)
        if left >= MIN_WAIT:
            self._set_mark(left)
            if self._usable:
                # Readable once `left` bytes are queued (or at end of stream).
                await trio.lowlevel.wait_readable(self._stream.socket)
        else:
            self._set_mark(1)
            if cursor.at_boundary:
                left = await self._frame_start(max_bytes)
            elif not left:
                left = cursor.missing()  # the rest of a header
        return left if max_bytes is None else min(left, max_bytes)

    async def _frame_start(self, max_bytes: int | None) -> int:
        """What to read of the frame whose header is next: the header alone when its payload
        is large, else the whole frame. A look at the queued bytes (``MSG_PEEK``, which waits
        as the read would until something is there) tells which."""
        try:
            head = await self._recv(_MAX_HEADER, socket.MSG_PEEK)
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError):
            head = b""
        if not head:
            # End of stream, or an error: the read itself reports it as the plain stream does.
            return MAX_WAIT if max_bytes is None else max_bytes
        known = _frame_head(head)
        if known is None:
            return len(head)  # a header not all here yet: the part that is
        header, payload = known
        return header if payload >= MIN_WAIT else header + payload

    # -- for a reader that follows the frames itself ------------------------------------------

    # websocket.WebSocket parses the frames after the handshake and knows what it needs: these
    # two read for it, past frame boundaries, without the cursor (which they leave behind:
    # receive_some must not be used once they are).

    async def receive_raw(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` of what is queued, waiting until something is (b"" at end of
        stream)."""
        self._set_mark(1)
        return await self._recv(max_bytes)

    async def receive_into(self, view: memoryview) -> int:
        """Read into ``view``, having waited in the kernel for all of it when it is
        :data:`MIN_WAIT` bytes or more (up to :data:`MAX_WAIT`, and the kernel's own cap);
        how many bytes came (0 at end of stream)."""
        want = len(view)
        if want < 1:
            raise ValueError("a read takes at least one byte")
        if want >= MIN_WAIT and self._usable:
            self._set_mark(min(want, MAX_WAIT))
            if self._usable:
                await trio.lowlevel.wait_readable(self._stream.socket)
        else:
            self._set_mark(1)
        raw = self._raw
        if raw is None:
            data = await self._stream.receive_some(want)
            view[: len(data)] = data
            return len(data)
        return await _when_readable(raw, lambda: raw.recv_into(view, want))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raw = self._raw
        if raw is None:
            await self._stream.send_all(data)
            return
        if self._stream.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await trio.lowlevel.checkpoint_if_cancelled()
        with _STREAM_ERRORS, memoryview(data) as view:
            flat = view if view.format == "B" and view.ndim == 1 else view.cast("B")
            if not flat and raw.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed")
            sent = 0
            while sent < len(flat):
                try:
                    sent += raw.send(flat[sent:])
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(raw)

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
