"""The websocket after the handshake: envelopes read and written on the stream itself.

trio-websocket (over wsproto) runs the websocket upgrade and the handshake's three messages, and
then hands the stream over. From there on a connection's reader reads frames straight off the
stream, in its own task, and its writer writes them; this module is that websocket.

Why not keep trio-websocket for the envelopes too: it reads in a task of its own, parses with
wsproto's event generator and passes every message to its user over a memory channel. That is
two more trips through trio's scheduler and a few hundred Python calls per message, for some
150 envelopes per process per all-reduce round at eight peers on loopback: more interpreter
time than the envelopes' own checks. Here a message costs a header parse and its share of a
read: on a TCP socket one read takes every small frame queued (up to 64 KiB), and a payload
of ``frame_reads.MIN_WAIT`` bytes or more is read into a buffer of its own (its first bytes,
read with the frames before it, copied in), the rest waited for in the kernel
(``SO_RCVLOWAT``) and taken in one read as a rule. Other streams (in memory, a relay's pipe)
are read as they come.

The wire does not change: RFC 6455 frames as before, a client's masked (with the all-zero key,
see ``speedups.ENVELOPE_MASK``), whatever key the remote uses unmasked, pings answered,
fragmented messages joined, the close handshake kept. What the protocol leaves no room for
(text, reserved bits, extensions, a message over the size limit) ends the connection as
trio-websocket ended it: :class:`~moshpit_trio.errors.ProtocolError` (close code 1002) or,
for a message too large, close code 1009 before its payload is read.

Two pieces:

* :class:`HandshakeStream` is the stream trio-websocket runs over. It never reads past the
  frame being received and stops after the handshake's last message, so that nothing meant
  for the envelope reader is left in trio-websocket's buffers: the rest of the stream is
  handed over untouched (:meth:`HandshakeStream.detach`).
* :class:`WebSocket` reads and writes messages on that stream.

Every read keeps what it got if it is cancelled (only the stream's reads wait, nothing is
taken out of the buffer before the whole frame is in, and a large payload's own buffer keeps
how far it is filled), so a reader cancelled half-way through a frame leaves the websocket as
it was: :meth:`WebSocket.aclose` reads on from there to the remote's close frame.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

import numpy as np
import trio

from ..errors import ProtocolError
from .frame_reads import MIN_WAIT, FrameCursor, FrameSizedReceiveStream
from .speedups import ENVELOPE_MASK, INLINE_PAYLOAD, xor_mask

__all__ = ["HandshakeStream", "WebSocket", "WebSocketClosed"]

CONTINUATION: Final = 0x0
TEXT: Final = 0x1
BINARY: Final = 0x2
CLOSE: Final = 0x8
PING: Final = 0x9
PONG: Final = 0xA

#: close codes (RFC 6455 section 7.4.1)
NORMAL: Final = 1000
PROTOCOL_ERROR: Final = 1002
NO_STATUS: Final = 1005
ABNORMAL: Final = 1006
TOO_BIG: Final = 1009

_LENGTH16: Final = struct.Struct("!H")
_LENGTH64: Final = struct.Struct("!Q")
_HEAD16: Final = struct.Struct("!BBH")
_HEAD64: Final = struct.Struct("!BBQ")
_MAX_CONTROL: Final = 125
#: what one read takes at most between large payloads (all the small frames queued, as a rule)
_READ: Final = 64 * 1024
# Codes a close frame may carry (RFC 6455 7.4.1-7.4.2; 1004-1006 and 1015 are never sent).
_SENDABLE: Final = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013})


class WebSocketClosed(Exception):
    """The websocket ended: a close frame (``code``, ``reason``) in either direction, or the
    stream itself ended or broke (``code`` 1006, no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}".strip())


def frame_header(opcode: int, length: int, *, masked: bool) -> bytes:
    """The header of a final (FIN) frame of ``length`` payload bytes; when ``masked`` it ends
    with the all-zero masking key, so the payload goes out as it is."""
    first = 0x80 | opcode
    mask = 0x80 if masked else 0
    if length <= 125:
        head = bytes((first, mask | length))
    elif length <= 0xFFFF:
        head = _HEAD16.pack(first, mask | 126, length)
    else:
        head = _HEAD64.pack(first, mask | 127, length)
    return head + ENVELOPE_MASK if masked else head


def close_payload(code: int, reason: str) -> bytes:
    """A close frame's payload: the code, then the reason cut to fit (123 bytes of UTF-8)."""
    body = reason.encode()[: _MAX_CONTROL - 2].decode("utf-8", "ignore").encode()
    return _LENGTH16.pack(code) + body


def parse_close(payload: bytes | bytearray | memoryview) -> tuple[int, str]:
    """``(code, reason)`` of a received close frame's payload; ProtocolError when it is not
    one RFC 6455 allows (a lone byte, a code never sent, a reason that is not UTF-8)."""
    if not payload:
        return NO_STATUS, ""
    if len(payload) < 2:
        raise ProtocolError("malformed", "a close frame with a 1-byte payload")
    (code,) = _LENGTH16.unpack_from(payload)
    if code not in _SENDABLE and not 3000 <= code <= 4999:
        raise ProtocolError("malformed", f"close code {code} is not one a peer may send")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("malformed", "a close reason that is not UTF-8") from None
    return code, reason


class WebSocket:
    """Binary messages on a stream whose websocket upgrade and handshake are done.

    ``client``: this side dialed, so it masks what it sends and must receive no masked frame
    (and the other way round). ``max_message``: a larger message (one frame or the sum of its
    fragments) is refused with close code 1009 before its payload is read.

    One task reads (:meth:`get_message`), any number write (:meth:`send_message`, one frame
    at a time under a lock, which the reader takes too to answer pings and close frames).
    """

    def __init__(self, stream: trio.abc.Stream, *, client: bool, max_message: int) -> None:
        self._stream = stream
        self._client = client
        self._max_message = max_message
        # A TCP socket: read past frame boundaries (all the small frames queued, in one read),
        # and a large payload straight into a buffer of its own, waited for in the kernel.
        self._direct = stream if isinstance(stream, FrameSizedReceiveStream) else None
        # A large payload being read into its own buffer (kept if the read is cancelled).
        self._large: _LargePayload | None = None
        # Received bytes not yet taken: pieces as the stream returned them, so that a payload
        # that came in one read is handed on without a copy (on a TCP socket a large one has
        # a buffer of its own instead: _large).
        self._pieces: deque[bytes | bytearray | memoryview] = deque()
        self._buffered = 0
        # A fragmented message being received: its payloads so far, their size, its opcode.
        self._fragments: list[bytes | bytearray | memoryview] = []
        self._fragmented_size = 0
        self._fragmented_opcode: int | None = None
        self._send_lock = trio.Lock()
        self._sent_close = False
        # The stream broke under a write: nothing more can go out. (A write cancelled half-way
        # is not counted: most streams end send_all with a schedule point, so a cancelled one
        # has usually sent it all, and there is no telling. A close frame after a cut frame
        # reads as garbage to the remote, which then ends the connection too, as it would
        # have anyway: trio-websocket did the same.)
        self._send_broken = False
        #: why the websocket ended, once it has (a close frame received, the stream ended)
        self.closed: WebSocketClosed | None = None
        self._stream_closed = False

    # -- reading ------------------------------------------------------------------------------

    async def get_message(self) -> bytes | bytearray | memoryview:
        """The next binary message, whole. Answers pings on the way. Raises WebSocketClosed
        when the websocket has ended (the remote's close frame is answered first), and
        ProtocolError when the remote broke RFC 6455 or sent text."""
        while True:
            if self.closed is not None:
                raise WebSocketClosed(self.closed.code, self.closed.reason)
            fin, opcode, payload = await self._frame()
            if opcode >= CLOSE:
                await self._control(opcode, payload)
                continue
            if opcode == TEXT:
                raise ProtocolError("malformed", "text message on a binary protocol")
            if opcode == CONTINUATION:
                if self._fragmented_opcode is None:
                    raise ProtocolError("malformed", "a continuation frame with no message")
            elif self._fragmented_opcode is not None:
                raise ProtocolError("malformed", "a new message inside a fragmented one")
            elif fin:
                return payload
            else:
                self._fragmented_opcode = opcode
            self._fragments.append(payload)
            self._fragmented_size += len(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments = []
                self._fragmented_size = 0
                self._fragmented_opcode = None
                return message

    async def _control(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        if opcode == PING:
            if not self._sent_close:
                await self._write_frame(PONG, bytes(payload))
        elif opcode == CLOSE:
            code, reason = parse_close(payload)
            self.closed = WebSocketClosed(code, reason)
            # Answer with the same code (RFC 6455 5.5.1); the remote closes the stream.
            await self._send_close(NORMAL if code == NO_STATUS else code, "")
        elif opcode != PONG:
            raise ProtocolError("malformed", f"websocket opcode {opcode:#x}")

    async def _frame(self) -> tuple[bool, int, bytes | bytearray | memoryview]:
        """The next frame: ``(fin, opcode, payload)``, unmasked. Only ``_fill`` waits, and no
        byte is taken before the whole frame is in, so a cancelled call loses nothing (a large
        payload read into its own buffer keeps what it has in ``_large``)."""
        if self._large is not None:
            return await self._finish_large()
        await self._fill(2)
        first, second = self._peek(2)
        if first & 0x70:
            raise ProtocolError("malformed", "websocket frame with reserved bits set")
        fin = bool(first & 0x80)
        opcode = first & 0x0F
        masked = bool(second & 0x80)
        if masked == self._client:
            side = "to a client" if self._client else "from a client"
            raise ProtocolError(
                "malformed", f"{'a masked' if masked else 'an unmasked'} frame {side}"
            )
        code = second & 0x7F
        size = 2 + (2 if code == 126 else 8 if code == 127 else 0) + (4 if masked else 0)
        if size > 2:
            await self._fill(size)
        head = self._peek(size)
        if code == 126:
            (length,) = _LENGTH16.unpack_from(head, 2)
        elif code == 127:
            (length,) = _LENGTH64.unpack_from(head, 2)
        else:
            length = code
        if opcode >= CLOSE:
            if opcode > PONG:
                raise ProtocolError("malformed", f"websocket opcode {opcode:#x}")
            if not fin or length > _MAX_CONTROL:
                raise ProtocolError("malformed", "a fragmented or long control frame")
        elif opcode > BINARY:
            raise ProtocolError("malformed", f"websocket opcode {opcode:#x}")
        elif (opcode == CONTINUATION and self._fragmented_size + length > self._max_message) or (
            length > self._max_message
        ):
            # Refused while it arrives: its payload is never read, let alone held.
            await self._refuse_too_big(length)
        key = bytes(head[size - 4 : size]) if masked else ENVELOPE_MASK
        if self._direct is not None and length >= MIN_WAIT:
            self._take(size)
            view = np.empty(length, dtype=np.uint8).data  # (no zero-filling pass)
            have = min(self._buffered, length)
            if have:  # the payload's first bytes, read with the frames before it
                view[:have] = self._take(have)
            self._large = _LargePayload(fin, opcode, key, view, have)
            return await self._finish_large()
        await self._fill(size + length)
        self._take(size)
        payload = self._take(length)
        if key != ENVELOPE_MASK:
            unmasked = bytearray(payload)
            xor_mask(unmasked, key)
            return fin, opcode, unmasked
        return fin, opcode, payload

    async def _refuse_too_big(self, length: int) -> None:
        reason = f"message over the size limit ({length} > {self._max_message} bytes)"
        self.closed = WebSocketClosed(TOO_BIG, reason)
        await self._send_close(TOO_BIG, "message too big")
        raise WebSocketClosed(TOO_BIG, reason)

    async def _finish_large(self) -> tuple[bool, int, memoryview]:
        large = self._large
        assert large is not None and self._direct is not None
        view = large.view
        while large.filled < len(view):
            try:
                got = await self._direct.receive_into(view[large.filled :])
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._broke(f"the stream broke: {exc}") from None
            if not got:
                raise self._broke("the stream ended without a close frame")
            large.filled += got
        self._large = None
        if large.key != ENVELOPE_MASK:
            xor_mask(view, large.key)
        return large.fin, large.opcode, view

    def _broke(self, reason: str) -> WebSocketClosed:
        self.closed = WebSocketClosed(ABNORMAL, reason)
        return WebSocketClosed(ABNORMAL, reason)

    async def _fill(self, size: int) -> None:
        """Until ``size`` bytes are buffered; what a read returns is kept even if the next one
        is cancelled."""
        direct = self._direct
        while self._buffered < size:
            data: bytes | bytearray
            try:
                if direct is not None:
                    data = await direct.receive_raw(max(_READ, size - self._buffered))
                else:
                    data = await self._stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise self._broke(f"the stream broke: {exc}") from None
            if not data:
                raise self._broke("the stream ended without a close frame")
            self._pieces.append(data)
            self._buffered += len(data)

    def _peek(self, size: int) -> bytes | bytearray | memoryview:
        """The first ``size`` buffered bytes (all there), not taken."""
        first = self._pieces[0]
        if len(first) >= size:
            return first[:size]
        out = bytearray()
        for piece in self._pieces:  # a header cut across reads: join only what it needs
            out += piece[: size - len(out)]
            if len(out) == size:
                break
        return out

    def _take(self, size: int) -> bytes | bytearray | memoryview:
        """Take the first ``size`` buffered bytes (all there): a piece as it came when it is
        exactly that, else a view of one piece, else the pieces joined."""
        pieces = self._pieces
        self._buffered -= size
        if not size:
            return b""
        first = pieces[0]
        n = len(first)
        if n == size:
            return pieces.popleft()
        if n > size:
            view = memoryview(first)
            pieces[0] = view[size:]
            return view[:size]
        out = []
        while size:
            first = pieces[0]
            n = len(first)
            if n <= size:
                out.append(pieces.popleft())
                size -= n
            else:
                view = memoryview(first)
                out.append(view[:size])
                pieces[0] = view[size:]
                size = 0
        return b"".join(out)

    # -- writing ------------------------------------------------------------------------------

    async def send_message(self, head: bytes, payload: bytes | memoryview = b"") -> None:
        """Send ``head + payload`` as one binary message without joining them (a large
        ``payload`` goes from the caller's buffer to the stream as it is; the caller leaves it
        alone until this returns). Raises WebSocketClosed once the websocket is closing."""
        if self._sent_close or self.closed is not None:
            reason = self.closed.reason if self.closed is not None else "closing"
            raise WebSocketClosed(self.closed.code if self.closed else NORMAL, reason)
        first = frame_header(BINARY, len(head) + len(payload), masked=self._client) + head
        if len(payload) < INLINE_PAYLOAD:
            await self._write((first + bytes(payload),))
        else:
            await self._write((first, payload))

    async def _send_close(self, code: int, reason: str) -> bool:
        """Send our close frame unless one went out (or cannot: the stream broke under a
        write); whether it went out now."""
        if self._sent_close or self._send_broken:
            return False
        self._sent_close = True
        try:
            await self._write_frame(CLOSE, close_payload(code, reason))
        except WebSocketClosed:
            return False
        return True

    async def _write_frame(self, opcode: int, payload: bytes) -> None:
        await self._write((frame_header(opcode, len(payload), masked=self._client) + payload,))

    async def _write(self, pieces: tuple[bytes | memoryview, ...]) -> None:
        if self._send_broken:
            raise WebSocketClosed(ABNORMAL, "the stream broke under an earlier write")
        # The lock is nearly always free (the connection's writer is the only one sending
        # envelopes): taken without acquire()'s yield to the scheduler then.
        lock = self._send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            for piece in pieces:
                await self._stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._send_broken = True
            if self.closed is None:
                self.closed = WebSocketClosed(ABNORMAL, f"the stream broke: {exc}")
            raise WebSocketClosed(ABNORMAL, self.closed.reason) from None
        finally:
            lock.release()

    # -- closing ------------------------------------------------------------------------------

    async def aclose(self, code: int = NORMAL, reason: str = "") -> None:
        """The close handshake: send a close frame (unless one went out), read on (dropping
        messages) until the remote's close frame or the end of the stream, then close the
        stream. Waiting for the remote's close means it has read all we sent before we close
        the socket (closing with unread bytes resets the connection, which may throw away
        what the remote has not read yet). Bound it with a cancel scope: a frozen peer never
        answers."""
        if self._stream_closed:
            return
        try:
            if not self._sent_close and not await self._send_close(code, reason):
                return  # the stream is broken: nobody will answer
            while self.closed is None:
                try:
                    await self.get_message()
                except (WebSocketClosed, ProtocolError):
                    return
        finally:
            self._stream_closed = True
            await trio.aclose_forcefully(self._stream)


class _LargePayload:
    """A large payload being read into its own buffer: the frame's fields and how far it is."""

    __slots__ = ("filled", "fin", "key", "opcode", "view")

    def __init__(self, fin: bool, opcode: int, key: bytes, view: memoryview, filled: int) -> None:
        self.fin = fin
        self.opcode = opcode
        self.key = key
        self.view = view
        self.filled = filled


class HandshakeStream(trio.abc.HalfCloseableStream):
    """The stream trio-websocket runs the websocket upgrade and the handshake over, so that
    it reads no byte past the handshake's last message.

    Its reads never run past the end of the frame being received, and once ``messages`` data
    messages have been received whole, a read waits forever (the reader task trio-websocket
    keeps waits there until its nursery is cancelled). :meth:`detach` then hands the stream
    on, positioned at the first byte after the handshake.

    The upgrade's HTTP head is read as it comes: a dialer sends nothing after its request
    until it has the answer, and a listener nothing after its answer until the first message.
    A remote that does not wait has bytes taken with its head; :meth:`detach` sees it and
    fails the connection.
    """

    def __init__(self, stream: trio.abc.Stream, messages: int) -> None:
        self._stream = stream
        self._cursor = FrameCursor()
        self._messages = messages

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        cursor = self._cursor
        if cursor.messages >= self._messages and cursor.at_boundary:
            await trio.sleep_forever()
        size = max_bytes if cursor.in_http else cursor.missing()
        if max_bytes is not None and size is not None:
            size = min(size, max_bytes)
        data = await self._stream.receive_some(size)
        cursor.feed(data)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self._stream, "send_eof", None)
        if send_eof is None:
            raise trio.ClosedResourceError("this stream cannot be half-closed")
        await send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def detach(self) -> trio.abc.Stream:
        """The stream, to read and write envelopes on. ProtocolError if more than the
        handshake's messages were read with it (they are lost in trio-websocket's buffer)."""
        cursor = self._cursor
        if cursor.messages != self._messages or not cursor.at_boundary:
            raise ProtocolError(
                "malformed",
                f"{cursor.messages} websocket messages read with the handshake's "
                f"{self._messages}: the remote sent before it was answered",
            )
        return self._stream
