"""Make trio-websocket + wsproto move multi-megabyte messages at memory speed.

(A peer's envelopes no longer pass through either: after the handshake, ``wire/websocket.py``
reads and writes the frames itself. What remains here is for what still does: the handshake's
messages, the bare-websocket arms of ``benchmarks/wire_throughput.py``, and anyone else's
wsproto in the process; plus the malloc tuning, which every large buffer benefits from.)

Out of the box a 4 MiB binary message through wsproto costs 10-30 ms of CPU when a websocket
client sends it (masked) and 2-10 ms the other way, before the socket is even touched;
``benchmarks/wire_throughput.py`` measures whole connections between two processes. Where the
time goes, and what :func:`install` does about each, without forking either library (CPU per
4 MiB message inside wsproto, stock -> installed, on the project's 2-core VM):

* **Masking** (client-to-server frames, RFC 6455 section 5.3). wsproto masks in pure Python with
  eight strided slice/translate passes plus copies: about 7 ms per 4 MiB each way.
  ``wsproto.frame_protocol.XorMaskerSimple`` becomes :class:`FastXorMasker`, which XORs eight
  bytes at a time with numpy, in place: about 0.1 ms. Byte-identical, including the key rotation
  that continues a mask across partial frames.
* **Copies on send.** ``FrameProtocol._serialize_frame`` copies the payload five times
  (``bytearray`` conversions, concatenations) and ``Connection.send`` once more to get ``bytes``.
  :func:`_serialize_frame` writes the same frame as one ``bytes`` with one copy (unmasked) or
  one XOR pass plus one copy (masked); wsproto and trio-websocket pass exact ``bytes`` on to
  ``send_all`` untouched. Send: masked 11-15 ms -> 0.8 ms, unmasked 1.9 ms -> 0.5 ms.
* **Copies and events on receive.** ``Buffer`` copies every read into one growing bytearray and
  slices copies out; the decoder emits every partial frame as an event, which trio-websocket
  collects and joins. :class:`FrameBuffer` keeps reads as they are, holds a frame (up to
  ``WHOLE_FRAME_LIMIT``) until it is complete and hands it out in one piece, as ``bytes`` when
  unmasked so nothing downstream copies it again. Receive, 256 KiB reads: masked 12 ms ->
  1.1 ms, unmasked 1.8 ms -> 0.6 ms.
* **Receive size.** trio-websocket reads 4 KiB at a time by default: a thousand reads and, in
  stock wsproto, a thousand partial-frame events per 4 MiB message (29 ms masked, 10 ms
  unmasked). Pass :data:`RECEIVE_BUFFER_SIZE` as ``receive_buffer_size``.
* **Allocator.** Every copy is a fresh multi-megabyte block; glibc serves those with ``mmap`` and
  returns them with ``munmap`` (or trims the heap top), so every copy page-faults its pages in
  again, zero-filled by the kernel (on this VM a fresh 4 MiB copy costs 5-10x a reused one, and
  raw TCP itself ran at 1.1-1.8 GB/s untuned against 2-3.3 GB/s tuned). :func:`tune_malloc` sets
  ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with ``mallopt`` so such blocks stay on the heap.
  No-op off glibc.

The three wsproto patches are module/class attributes replaced by :func:`install` only on the
wsproto versions they were written against (``_WSPROTO_TESTED``) and put back by
:func:`uninstall`; ``tests/test_speedups.py`` checks each against the original (hypothesis).
Everything here is process-global and idempotent: call :func:`install` once at start-up, before
connections are opened. ``MOSHPIT_NO_SPEEDUPS=1`` turns it into a no-op.
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

__all__ = [
    "ENVELOPE_MASK",
    "INLINE_PAYLOAD",
    "RECEIVE_BUFFER_SIZE",
    "RECOMMENDED_CHUNK",
    "WHOLE_FRAME_LIMIT",
    "FastXorMasker",
    "FrameBuffer",
    "SpeedupReport",
    "install",
    "installed",
    "masked_copy",
    "tune_malloc",
    "uninstall",
    "xor_mask",
]

#: ``receive_buffer_size`` to give trio-websocket: how much one ``receive_some`` may return.
#: Just over the largest envelope frame (a 4 MiB stream chunk and its envelope header), so that
#: ``frame_reads`` can take a whole payload in one read and it reaches the decryption uncopied.
#: Below 256 KiB the per-read Python work shows (4 KiB reads: 3.4 ms per 4 MiB masked).
RECEIVE_BUFFER_SIZE: Final = 4 * 1024 * 1024 + 64 * 1024

#: Payload bytes per stream message that measured best (see ``benchmarks/wire_throughput.py``):
#: per-message costs (event dispatch, signing, a credit round trip) fade out by 1-4 MiB.
RECOMMENDED_CHUNK: Final = 4 * 1024 * 1024

#: The mallopt thresholds :func:`tune_malloc` sets. glibc caps ``M_MMAP_THRESHOLD`` at
#: 32 MiB on 64-bit (``4 * 1024 * 1024 * sizeof(long)``); anything larger makes mallopt fail.
MMAP_THRESHOLD: Final = 32 * 1024 * 1024
TRIM_THRESHOLD: Final = 256 * 1024 * 1024

# wsproto versions whose frame_protocol we have read (1.2 differs: its masker returns bytes and its
# decoder hands payloads on without converting them, so there the patches are skipped). In 1.3:
# * XorMaskerSimple(masking_key) is constructed per masked frame (FrameDecoder.parse_header,
#   FrameProtocol._serialize_frame); process(bytearray) -> bytearray is called once per (partial)
#   frame on a bytearray the caller has just created and owns alone, and whose result it may
#   extend (``+=``) before converting it with ``bytes(...)``.
# * Buffer() is constructed once per FrameDecoder; the decoder calls feed, consume_exactly,
#   consume_at_most, commit, rollback and len() and nothing else (no other module touches it).
# * FrameProtocol._serialize_frame(opcode, payload, fin) returns the frame, which
#   Connection.send appends to ``b""`` and WSConnection.send appends to ``b""`` again.
_WSPROTO_TESTED: Final = ((1, 3),)

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

_HEADER16: Final = struct.Struct("!BBH")
_HEADER64: Final = struct.Struct("!BBQ")

#: :class:`FrameBuffer` holds back frames up to this size until they are complete; larger ones
#: are handed on in pieces as they arrive, as stock wsproto does (correct, only slower). Just
#: above the largest envelope (4 MiB payload + header), so what a hostile peer can make a
#: connection hold before trio-websocket's ``max_message_size`` check sees it stays about what
#: that check allows anyway.
WHOLE_FRAME_LIMIT: Final = 4 * 1024 * 1024 + 64 * 1024

#: The masking key ``websocket.WebSocket`` gives a client's envelope frames: all zeros, so masking
#: them is no pass at all, on either side. RFC 6455 masks client frames so that a script in a
#: browser cannot choose the bytes that cross a proxy (its section 10.3); an envelope's body is
#: AES-GCM ciphertext under a session key, which nobody can choose, and a peer is not a browser
#: running others' scripts (a malicious peer could pick any key anyway: the server cannot tell).
#: The handshake's frames, sent before there is a key, keep wsproto's random keys. A receiver
#: reads whatever key a frame carries; this one unmasks for free (``websocket.WebSocket``
#: skips the pass for it).
ENVELOPE_MASK: Final = bytes(4)

# Below this many bytes numpy's per-call overhead costs more than Python's big-int XOR.
_SMALL: Final = 512


def xor_mask(data: bytearray | memoryview, key: bytes) -> None:
    """XOR ``data`` in place with the 4-byte ``key`` repeated (key byte ``i % 4`` at offset i)."""
    n = len(data)
    if n == 0:
        return
    if n < _SMALL:
        reps = (n + 3) // 4
        masked = int.from_bytes(data, "little") ^ int.from_bytes((key * reps)[:n], "little")
        data[:] = masked.to_bytes(n, "little")
        return
    key8 = np.frombuffer(key * 2, dtype=np.uint64)
    view = np.frombuffer(data, dtype=np.uint8)
    body = n - n % 8
    words = view[:body].view(np.uint64)
    np.bitwise_xor(words, key8, out=words)
    if body != n:
        tail = view[body:]
        np.bitwise_xor(tail, np.frombuffer(key * 2, dtype=np.uint8)[: n - body], out=tail)
    # The arrays export the bytearray's buffer; drop them now so the caller may resize it.
    del words, view


def masked_copy(payload: bytes | bytearray | memoryview, key: bytes) -> list[Any]:
    """``payload`` XOR the repeated ``key``, as buffers to concatenate (one pass, no copy back).

    Returns ``[body, tail]`` where ``body`` is a numpy array of the first ``len - len % 8`` bytes
    and ``tail`` the last few bytes; ``b"".join(header_parts + masked_copy(...))`` then writes the
    whole frame with a single copy.
    """
    n = len(payload)
    body = n - n % 8
    key8 = key * 2
    src = np.frombuffer(payload, dtype=np.uint8)
    out: list[Any] = [np.bitwise_xor(src[:body].view(np.uint64), np.frombuffer(key8, np.uint64))]
    if body != n:
        out.append(np.bitwise_xor(src[body:], np.frombuffer(key8, np.uint8)[: n - body]))
    return out


def _masked_into(out: np.ndarray, payload: bytes | memoryview, key: bytes) -> None:
    """``out[:] = payload`` XOR the repeated ``key``: one pass, no intermediate copy."""
    n = len(payload)
    body = n - n % 8
    key8 = key * 2
    src = np.frombuffer(payload, dtype=np.uint8)
    if body:
        words = out[:body].view(np.uint64)
        np.bitwise_xor(src[:body].view(np.uint64), np.frombuffer(key8, np.uint64), out=words)
    if body != n:
        np.bitwise_xor(src[body:], np.frombuffer(key8, np.uint8)[: n - body], out=out[body:])


class MaskedPayload:
    """A masked frame payload as the pieces it arrived in, not yet joined or unmasked.

    :class:`FrameBuffer` hands one to the decoder's masker instead of a ``bytearray`` copy
    (only while :class:`FastXorMasker` is the masker, and only for payloads of 512 bytes or
    more); :meth:`FastXorMasker.process` unmasks the pieces straight into one new buffer. The
    pieces are views of received ``bytes``, so nothing can change them meanwhile.
    """

    __slots__ = ("pieces", "size")

    def __init__(self, pieces: list[memoryview], size: int) -> None:
        self.pieces = pieces
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)


class FastXorMasker:
    """Drop-in for ``wsproto.frame_protocol.XorMaskerSimple``, vectorised.

    Same constructor and ``process``; the result is byte-for-byte what the original returns, and
    the key is rotated by ``len(data) % 4`` after each call exactly as the original does, so a
    frame masked or unmasked in several pieces comes out the same as in one.

    Deliberate differences in what comes back (never in its bytes): given a
    :class:`MaskedPayload` (from :class:`FrameBuffer`) it returns new ``bytes``; given a
    ``bytearray``,
    ``process`` masks it *in place* and returns that same object instead of a masked copy (both
    wsproto call sites pass a bytearray they have just created and never look at again, and
    :class:`FrameBuffer` hands masked payloads out as bytearrays for this); given ``bytes`` of
    512 bytes or more it returns new ``bytes``, so the decoder's ``bytes(payload)`` that follows
    copies nothing.
    """

    __slots__ = ("_masking_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        if len(masking_key) != 4:
            raise ValueError(f"a websocket masking key is 4 bytes, got {len(masking_key)}")
        self._masking_key = bytes(masking_key)

    def process(self, data: bytes | bytearray | memoryview | MaskedPayload) -> bytes | bytearray:
        key = self._masking_key
        if key == ENVELOPE_MASK:
            # XOR with zeros changes nothing (and rotating zeros is zeros): no pass.
            if type(data) is bytes or type(data) is bytearray:
                return data
            return bytes(data)
        n = len(data)
        rotation = n % 4
        if rotation:
            self._masking_key = key[rotation:] + key[:rotation]
        if isinstance(data, MaskedPayload):
            # Unmask piece by piece into one buffer (one pass), then one copy into bytes.
            out = np.empty(n, dtype=np.uint8)
            pos = 0
            for piece in data.pieces:
                turn = pos % 4
                _masked_into(out[pos : pos + len(piece)], piece, key[turn:] + key[:turn])
                pos += len(piece)
            return out.tobytes()
        if type(data) is bytearray:
            xor_mask(data, key)
            return data
        if n >= _SMALL and type(data) is bytes:
            return b"".join(masked_copy(data, key))
        buf = bytearray(data)
        xor_mask(buf, key)
        return buf


class FrameBuffer:
    """Drop-in for ``wsproto.frame_protocol.Buffer`` that hands over whole frames.

    wsproto's buffer copies every received chunk into one growing ``bytearray`` (``feed``) and
    slices copies out of it; its decoder turns whatever part of a frame has arrived into an
    event, so a 4 MiB message read in pieces becomes many partial-frame events, each copied,
    wrapped, queued, and finally joined by trio-websocket: four copies of every byte plus
    Python work per piece. This buffer

    * keeps the received ``bytes`` objects as they are (``feed`` copies nothing),
    * answers ``consume_at_most(n)`` for ``0 < n <= WHOLE_FRAME_LIMIT`` with nothing until all
      ``n`` bytes are there, so the decoder waits and then emits the frame in one event (no
      partial events, no join), and
    * hands out an unmasked payload as ``bytes`` (one copy, or none when a received chunk is
      exactly the payload). The original hands out a ``bytearray`` that the decoder then copies
      with ``bytes(...)``; for ``bytes`` that call, the decoder's ``payload += b""`` and
      trio-websocket's one-part join all return the object itself. So a server-to-client
      payload is copied once on its way from the socket to ``get_message()``.
    * hands out a masked payload of 512 bytes or more as a :class:`MaskedPayload` (its pieces,
      uncopied), which :class:`FastXorMasker` unmasks straight into new ``bytes``: two passes
      over the data where a ``bytearray`` copy, an in-place unmask and the decoder's
      ``bytes(...)`` make three. Smaller ones (and all of them while wsproto's own masker is
      in place) come as a ``bytearray``, unmasked in place. "Masked" is recognised by the
      decoder's 4-byte ``consume_exactly`` (the masking key; extended lengths are 2 or 8
      bytes) since the last frame header began; were that guess ever wrong, only the speed
      would change: the null masker hands a ``MaskedPayload`` on unchanged and the decoder's
      ``bytes(...)`` joins it (``__bytes__``).
    * hands out a payload masked with the all-zero key (:data:`ENVELOPE_MASK`, every envelope a
      client sends) as unmasked: XOR with zeros is no change, so it costs what a server's
      frame costs.

    For larger requests it returns what is there, like the original, so a peer announcing a
    huge frame still runs into trio-websocket's ``max_message_size`` as the bytes arrive; what
    this buffer holds back is bounded by ``WHOLE_FRAME_LIMIT`` (plus one read).
    """

    __slots__ = ("_chunks", "_masked", "_offset", "_size", "bytes_used")

    def __init__(self, initial_bytes: bytes | None = None) -> None:
        self._chunks: deque[bytes] = deque()
        self._masked = False  # the current frame's header carried a masking key
        self._offset = 0  # committed bytes already dropped from the front of _chunks[0]
        self._size = 0  # bytes held, from _offset on (consumed-but-uncommitted included)
        self.bytes_used = 0  # consumed but not yet committed
        if initial_bytes:
            self.feed(initial_bytes)

    def feed(self, new_bytes: bytes | bytearray | memoryview) -> None:
        if not new_bytes:
            return
        # Keep immutable bytes as they are; anything mutable is snapshotted, as the original's
        # ``+=`` did.
        chunk = new_bytes if type(new_bytes) is bytes else bytes(new_bytes)
        self._chunks.append(chunk)
        self._size += len(chunk)

    def _pieces(self, start: int, nbytes: int) -> list[memoryview]:
        """Views of the ``nbytes`` held bytes from position ``start`` (relative to the front)."""
        pos = self._offset + start
        pieces: list[memoryview] = []
        for chunk in self._chunks:
            if pos >= len(chunk):
                pos -= len(chunk)
                continue
            take = min(len(chunk) - pos, nbytes)
            pieces.append(memoryview(chunk)[pos : pos + take])
            nbytes -= take
            pos = 0
            if not nbytes:
                break
        return pieces

    def _gather(self, start: int, nbytes: int) -> bytes:
        """``nbytes`` held bytes from ``start`` as ``bytes``: a received chunk itself when it is
        exactly that, else one copy."""
        pieces = self._pieces(start, nbytes)
        if len(pieces) == 1:
            piece = pieces[0]
            whole: bytes = piece.obj  # type: ignore[assignment]  # feed() stores only bytes
            return whole if len(piece) == len(whole) else bytes(piece)
        return b"".join(pieces)

    def _gather_masked(self, start: int, nbytes: int) -> bytearray | MaskedPayload:
        """A masked payload: its pieces as a :class:`MaskedPayload` for :class:`FastXorMasker`
        when that is installed and they are 512 bytes or more, else a copy in a new
        ``bytearray`` for the masker to unmask in place."""
        pieces = self._pieces(start, nbytes)
        if nbytes >= _SMALL and "masker" in _applied:
            return MaskedPayload(pieces, nbytes)
        return bytearray(pieces[0]) if len(pieces) == 1 else bytearray().join(pieces)

    def consume_at_most(self, nbytes: int) -> bytes | bytearray | MaskedPayload:
        available = self._size - self.bytes_used
        if nbytes > available:
            if nbytes <= WHOLE_FRAME_LIMIT:
                return b""  # wait for the rest of the frame
            nbytes = available
        if nbytes <= 0:
            return b""
        data = (
            self._gather_masked(self.bytes_used, nbytes)
            if self._masked
            else self._gather(self.bytes_used, nbytes)
        )
        self.bytes_used += nbytes
        return data

    def consume_exactly(self, nbytes: int) -> bytes | None:
        if self._size - self.bytes_used < nbytes:
            return None
        if nbytes <= 0:
            return b""
        data = self._gather(self.bytes_used, nbytes)
        self.bytes_used += nbytes
        if nbytes == 4:
            # A masking key: the payload that follows is masked, unless the key is all zeros
            # (an envelope's, see ENVELOPE_MASK), when it is handed out as unmasked bytes.
            self._masked = data != ENVELOPE_MASK
        elif nbytes == 2 and self.bytes_used == 2:
            self._masked = False  # the first two bytes of a frame header
        return data

    def commit(self) -> None:
        drop = self.bytes_used
        self._size -= drop
        self.bytes_used = 0
        drop += self._offset
        chunks = self._chunks
        while chunks and drop >= len(chunks[0]):
            drop -= len(chunks.popleft())
        self._offset = drop

    def rollback(self) -> None:
        self.bytes_used = 0

    def __len__(self) -> int:
        return self._size


def _serialize_frame(
    self: Any, opcode: Any, payload: bytes | bytearray | memoryview = b"", fin: bool = True
) -> bytes:
    """Replacement for ``wsproto.frame_protocol.FrameProtocol._serialize_frame``.

    Writes the same RFC 6455 frame (same header encoding, same ``os.urandom(4)`` masking key for
    clients) as one ``bytes`` built with a single copy of the payload, where the original makes
    five (``bytearray`` conversions, concatenations) and then ``Connection.send`` a sixth to turn
    its ``bytearray`` into ``bytes``; ``b"" + some_bytes`` returns ``some_bytes`` itself, so
    returning exact ``bytes`` lets wsproto and trio-websocket pass it to ``send_all`` untouched.
    Connections with extensions (permessage-deflate) take the original path unchanged.
    """
    if self.extensions:
        return bytes(_state["original_serialize"](self, opcode, payload, fin))
    if not isinstance(payload, (bytes, bytearray)):
        payload = bytes(payload)
    n = len(payload)
    first = (0x80 if fin else 0) | int(opcode)
    mask_bit = 0x80 if self.client else 0
    if n <= 125:
        header = bytes((first, mask_bit | n))
    elif opcode.iscontrol():
        raise ValueError("payload too long for control frame")
    elif n <= 0xFFFF:
        header = _HEADER16.pack(first, mask_bit | 126, n)
    else:
        header = _HEADER64.pack(first, mask_bit | 127, n)
    if not self.client:
        return header + payload
    key = os.urandom(4)
    if n < _SMALL:
        masked = bytearray(payload)
        xor_mask(masked, key)
        return header + key + masked
    return b"".join([header, key, *masked_copy(payload, key)])


#: Below this many payload bytes a message goes out as one write (head and payload joined):
#: a copy that small costs less than a second system call and trio checkpoint
#: (``websocket.WebSocket.send_message``).
INLINE_PAYLOAD: Final = 64 * 1024


@dataclass(frozen=True)
class SpeedupReport:
    """What :func:`install` managed to do in this process."""

    masker: bool
    frames: bool
    buffer: bool
    malloc: bool
    wsproto_version: str


# name -> original attribute value, for every patch currently applied.
_applied: dict[str, Any] = {}
_state: dict[str, Any] = {}


def _wsproto_version() -> tuple[str, tuple[int, ...]]:
    import wsproto

    text = str(getattr(wsproto, "__version__", "0"))
    parts: list[int] = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return text, tuple(parts)


def _patches() -> dict[str, tuple[Any, str, Any]]:
    """The monkeypatches: name -> (owner, attribute, replacement)."""
    import wsproto.frame_protocol as frame_protocol

    return {
        "masker": (frame_protocol, "XorMaskerSimple", FastXorMasker),
        "frames": (frame_protocol.FrameProtocol, "_serialize_frame", _serialize_frame),
        "buffer": (frame_protocol, "Buffer", FrameBuffer),
    }


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Keep multi-megabyte blocks on glibc's heap; return whether both settings took.

    ``False`` (and nothing changed) off Linux/glibc. Idempotent; the settings are process-wide and
    also reach every other C extension's large allocations, which is what we want for tensors too.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process: libc's
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    ok_mmap: bool = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok_trim: bool = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return ok_mmap and ok_trim


def install(
    *,
    masker: bool = True,
    frames: bool = True,
    buffer: bool = True,
    malloc: bool = True,
) -> SpeedupReport:
    """Apply the speedups (idempotent; safe to call from every entry point).

    ``masker``: wsproto's ``XorMaskerSimple`` becomes :class:`FastXorMasker`. ``frames``:
    ``FrameProtocol._serialize_frame`` becomes the single-copy :func:`_serialize_frame`. Both
    only on wsproto versions whose ``frame_protocol`` this was written against; on others they
    are skipped and the report says so. ``malloc``: :func:`tune_malloc`.
    Set ``MOSHPIT_NO_SPEEDUPS=1`` in the environment to make this a no-op (to compare, or to rule
    it out when debugging).
    """
    version_text, version = _wsproto_version()
    if os.environ.get("MOSHPIT_NO_SPEEDUPS"):
        return SpeedupReport(False, False, False, False, version_text)
    wanted = {"masker": masker, "frames": frames, "buffer": buffer}
    if version[:2] in _WSPROTO_TESTED:
        for name, (owner, attribute, replacement) in _patches().items():
            if wanted[name] and name not in _applied:
                _applied[name] = owner.__dict__[attribute]
                if name == "frames":
                    _state["original_serialize"] = _applied[name]
                setattr(owner, attribute, replacement)
    if malloc and not _state.get("malloc"):
        _state["malloc"] = tune_malloc()
    return SpeedupReport(
        masker="masker" in _applied,
        frames="frames" in _applied,
        buffer="buffer" in _applied,
        malloc=bool(_state.get("malloc")),
        wsproto_version=version_text,
    )


def installed() -> bool:
    """Whether every wsproto patch is in place."""
    return all(
        getattr(owner, attribute) is replacement
        for owner, attribute, replacement in _patches().values()
    )


def uninstall() -> None:
    """Put wsproto's originals back (for benchmarks and tests; malloc settings stay)."""
    patches = _patches()
    for name in list(_applied):
        owner, attribute, _ = patches[name]
        setattr(owner, attribute, _applied.pop(name))
