"""How float32 values travel between group members: none, fp16, 8-bit (sans-IO).

Every codec turns a float32 vector into bytes and back. Decoding reads bytes from the network,
so whatever they hold it raises nothing but :class:`~.reducer.BadContribution` (tag
``"length"``, when the bytes are not exactly ``count`` encoded values); values that decode to
NaN or ±Inf are returned as such for the reducer to reject ("nonfinite"). All formats are
little-endian.

``"none"``  float32 as is: ``4 * count`` bytes, exact.

``"fp16"``  IEEE half precision: ``2 * count`` bytes. Relative error at most 2**-11 (about 4.9e-4)
            for magnitudes in the normal range [6.1e-5, 65504]; absolute error at most 2**-25
            (about 3e-8) below it. Finite values beyond ±65504 saturate to ±65504 instead of
            becoming Inf (which the reducer would reject); NaN and ±Inf stay NaN and ±Inf.

``"8bit"``  blockwise linear quantisation: the values are cut into blocks of :data:`BLOCK`
            (4096), and each block is sent as its minimum and step (two float32) and one uint8
            code per value, ``x ≈ min + step * code`` with ``step = (max - min) / 255``. Layout:
            every block's min, then every block's step, then all the codes;
            ``count + 8 * ceil(count / 4096)`` bytes, about 3.99x smaller than float32.
            Error bound, for every value x of a block with extremes lo and hi:

                |x - decoded(x)| <= (hi - lo) / 510 * (1 + 2**-10)
                                    + 2**-22 * max(|lo|, |hi|) + 2**-140

            (half a step; the rest covers float32 rounding while choosing the code, of the step
            and of the reconstruction; 2**-140 ≈ 7e-43 only matters for a block whose step is
            a float32 subnormal). A constant block is exact. A block holding NaN or ±Inf
            decodes to NaN or ±Inf throughout, so a non-finite local value is never silently
            made finite.
"""

from __future__ import annotations

import operator
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from .reducer import BadContribution

__all__ = ["BLOCK", "FP16", "NONE", "UINT8", "Codec", "ValueRuns", "codec"]

FloatArray = npt.NDArray[np.float32]
Buffer = bytes | bytearray | memoryview

BLOCK = 4096

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_FP16_MAX = float(np.finfo(np.float16).max)
_F32_MAX = float(np.finfo(np.float32).max)
# The 8-bit codec works through this many blocks at a time (1 MiB of float32), in cache.
_ROWS = 64


class Codec(Protocol):
    """Encodes float32 vectors to bytes and decodes them back."""

    name: str
    #: bytes per value when every value is encoded on its own (so any run of whole values
    #: decodes by itself, chunk by chunk); None when values are encoded in blocks
    itemsize: int | None

    def encode(self, values: FloatArray) -> bytes:
        """``values`` (a 1-D float32 array, contiguous or not) as bytes."""
        ...

    def decode(self, data: Buffer, count: int) -> FloatArray:
        """``count`` float32 values from ``data``; BadContribution("length") unless ``data``
        holds exactly ``count`` values. The result may be a read-only view of ``data``."""
        ...

    def encoded_size(self, count: int) -> int:
        """The exact number of bytes ``count`` values encode to."""
        ...


def _expect(data: Buffer, count: int, size: int) -> memoryview:
    """``data`` as a flat byte view, or BadContribution("length") if it is not ``size`` bytes."""
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError) as error:
        raise BadContribution("length", f"not a flat byte buffer: {error}") from None
    if view.nbytes != size:
        raise BadContribution(
            "length", f"{view.nbytes} bytes cannot hold {count} values (expected {size})"
        )
    return view


def _count(count: int) -> int:
    try:
        count = operator.index(count)
    except TypeError:
        raise BadContribution("length", f"not a value count: {count!r}") from None
    if count < 0:
        raise BadContribution("length", f"negative value count {count}")
    return count


class _NoCompression:
    name = "none"
    itemsize: int | None = 4

    def encode(self, values: FloatArray) -> bytes:
        return np.ascontiguousarray(values, dtype=_F32).tobytes()

    def decode(self, data: Buffer, count: int) -> FloatArray:
        count = _count(count)
        view = _expect(data, count, 4 * count)
        return np.frombuffer(view, dtype=_F32).astype(np.float32, copy=False)

    def encoded_size(self, count: int) -> int:
        return 4 * count


class _Float16:
    name = "fp16"
    itemsize: int | None = 2

    def encode(self, values: FloatArray) -> bytes:
        with np.errstate(over="ignore"):
            half = np.asarray(values, dtype=np.float32).astype(_F16)
        # A finite value past the half-precision range became ±Inf, which the reducer would
        # reject: saturate it to ±65504 instead (real ±Inf stays Inf, NaN stays NaN).
        overflow = np.isinf(half)
        if overflow.any():
            overflow &= np.isfinite(values)
            half[overflow] = np.copysign(_FP16_MAX, half[overflow])
        return half.tobytes()

    def decode(self, data: Buffer, count: int) -> FloatArray:
        count = _count(count)
        view = _expect(data, count, 2 * count)
        return np.frombuffer(view, dtype=_F16).astype(np.float32)

    def encoded_size(self, count: int) -> int:
        return 2 * count


class _Blockwise8Bit:
    name = "8bit"
    itemsize: int | None = None  # every block's min and step come first, then the codes

    def encode(self, values: FloatArray) -> bytes:
        values = np.ascontiguousarray(values, dtype=np.float32)
        count = values.shape[0]
        blocks = -(-count // BLOCK)
        full = count // BLOCK
        out = np.empty(count + 8 * blocks, dtype=np.uint8)
        lo = out[: 4 * blocks].view(_F32)
        step = out[4 * blocks : 8 * blocks].view(_F32)
        codes = out[8 * blocks :]
        head = values[: full * BLOCK].reshape(full, BLOCK)
        tail = values[full * BLOCK :]
        with np.errstate(invalid="ignore", over="ignore"):
            hi = np.empty(blocks, dtype=np.float32)
            head.min(axis=1, out=lo[:full])
            head.max(axis=1, out=hi[:full])
            if tail.shape[0]:
                lo[full], hi[full] = tail.min(), tail.max()
            # In float64: hi - lo overflows float32 when values pass ±1.7e38 on both sides.
            span = hi.astype(np.float64) - lo
            step[:] = span / 255
            # Codes come from the float32 step actually sent, so the decoder rebuilds exactly
            # what was chosen. A constant block gets step 0 and all codes 0 (exact).
            inverse = np.zeros(blocks, dtype=np.float32)
            np.divide(1, step, out=inverse, where=step > 0)
            # Rows in groups that fit in cache, each value read once and its code written once.
            # A finite block needs no clipping: x - lo >= 0, and (hi - lo) * inverse rounds to
            # at most 255. Codes of a non-finite block are meaningless (its min or step makes it
            # decode to NaN or Inf), so the invalid casts there are harmless.
            tmp = np.empty((_ROWS, BLOCK), dtype=np.float32)
            for r in range(0, full, _ROWS):
                n = min(_ROWS, full - r)
                t = tmp[:n]
                np.subtract(head[r : r + n], lo[r : r + n, None], out=t)
                t *= inverse[r : r + n, None]
                np.rint(t, out=t)
                np.copyto(codes[r * BLOCK : (r + n) * BLOCK].reshape(n, BLOCK), t, casting="unsafe")
            if tail.shape[0]:
                t = tmp[0, : tail.shape[0]]
                np.subtract(tail, lo[full], out=t)
                t *= inverse[full]
                np.rint(t, out=t)
                np.copyto(codes[full * BLOCK :], t, casting="unsafe")
            # Redo in float64 the rare blocks where float32 overflows: x - lo in a block wider
            # than float32's range, or 1 / step when the step is deep in the subnormals.
            awkward = (span > _F32_MAX) | ((step > 0) & np.isinf(inverse))
            for b in np.flatnonzero(np.isfinite(span) & awkward):
                block = values[b * BLOCK : (b + 1) * BLOCK].astype(np.float64)
                q = np.rint((block - float(lo[b])) / float(step[b]))
                codes[b * BLOCK : b * BLOCK + block.shape[0]] = np.clip(q, 0, 255)
        return out.tobytes()

    def decode(self, data: Buffer, count: int) -> FloatArray:
        count = _count(count)
        blocks = -(-count // BLOCK)
        full = count // BLOCK
        view = _expect(data, count, count + 8 * blocks)
        lo = np.frombuffer(view, dtype=_F32, count=blocks).astype(np.float32)
        step = np.frombuffer(view, dtype=_F32, count=blocks, offset=4 * blocks).astype(np.float32)
        codes = np.frombuffer(view, dtype=np.uint8, offset=8 * blocks)
        out = np.empty(count, dtype=np.float32)
        head = out[: full * BLOCK].reshape(full, BLOCK)
        with np.errstate(invalid="ignore", over="ignore"):
            for r in range(0, full, _ROWS):
                n = min(_ROWS, full - r)
                t = head[r : r + n]
                rows = codes[r * BLOCK : (r + n) * BLOCK].reshape(n, BLOCK)
                np.multiply(rows, step[r : r + n, None], out=t)
                t += lo[r : r + n, None]
            if full < blocks:
                t = out[full * BLOCK :]
                np.multiply(codes[full * BLOCK :], step[full], out=t)
                t += lo[full]
            # step * code + lo can overflow float32 only in a block reaching the end of float32's
            # range; redo those in float64 and clip: rounding of the step may have pushed the
            # top code a hair past the largest float32, which is no reason to decode Inf.
            reach = np.abs(lo.astype(np.float64)) + 255.0 * step.astype(np.float64)
            wide = reach > _F32_MAX * (1 - 2.0**-20)
            for b in np.flatnonzero(wide & np.isfinite(lo) & np.isfinite(step)):
                part = codes[b * BLOCK : (b + 1) * BLOCK].astype(np.float64)
                part = part * float(step[b]) + float(lo[b])
                out[b * BLOCK : b * BLOCK + part.shape[0]] = np.clip(part, -_F32_MAX, _F32_MAX)
        return out

    def encoded_size(self, count: int) -> int:
        return count + 8 * -(-count // BLOCK)


NONE: Codec = _NoCompression()
FP16: Codec = _Float16()
UINT8: Codec = _Blockwise8Bit()

_CODECS: dict[str, Codec] = {c.name: c for c in (NONE, FP16, UINT8)}


def codec(name: str) -> Codec:
    """The codec called ``name``: "none", "fp16" or "8bit"; ConfigError otherwise."""
    try:
        return _CODECS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown compression {name!r}: choose one of {', '.join(_CODECS)}"
        ) from None


class ValueRuns:
    """Decodes ``count`` values of ``codec`` from bytes that arrive in pieces of any size
    (sans-IO): as runs of whole values while they come when the codec encodes values one by
    one (views of the received bytes where a piece holds whole values; a value cut between
    two pieces is rejoined), else in one piece once all the bytes are in."""

    def __init__(self, codec: Codec, count: int) -> None:
        self.codec = codec
        self.count = count
        #: encoded bytes still to come
        self.left = codec.encoded_size(count)
        self._offset = 0
        self._held: list[memoryview] = []  # a partial value, or everything of a blocked codec

    def feed(self, piece: memoryview) -> tuple[int, FloatArray] | None:
        """Take ``piece`` (at most ``left`` bytes); the ``(offset, values)`` run it completes,
        if any."""
        if len(piece) > self.left:
            raise ValueError(f"{len(piece)} bytes fed where {self.left} were left")
        if not piece:
            return None
        self.left -= len(piece)
        itemsize = self.codec.itemsize
        if itemsize is None:
            self._held.append(piece)
            if self.left:
                return None
            whole = b"".join(self._held)
            self._held.clear()
            return 0, self.codec.decode(whole, self.count)
        data: bytes | memoryview = piece
        if self._held:
            data = b"".join((*self._held, piece))
            self._held.clear()
        usable = len(data) - len(data) % itemsize
        if usable < len(data):
            self._held.append(memoryview(data)[usable:])
        if not usable:
            return None
        n = usable // itemsize
        run = self._offset, self.codec.decode(memoryview(data)[:usable], n)
        self._offset += n
        return run
