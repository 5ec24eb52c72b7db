"""The body of a result stream (``avg.RUN.result``), sans-IO: a reducer's averaged ranges, one
record after another, on one stream per member and round.

A record is a range's header, then its values::

    u32 big-endian  length of the header
    msgpack         [start, end, included]       (RangeHeader)
    bytes           codec.encoded_size(end - start): the range's average, encoded

One stream carries every range, so a range costs no stream of its own: no STREAM_OPEN to wait
a credit for, no answer to wait for before the next one may go, however slow the member's link
back to the reducer (its answers queue there behind its own parts). ``ResultRecords`` cuts
such a body back into ranges from chunks of any size (a relay may cut them differently from
the sender); it checks framing only, the caller checks what a header says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import msgspec
import numpy as np

from .compression import Codec, ValueRuns
from .reducer import BadContribution

__all__ = ["MAX_RANGE_HEADER", "RangeHeader", "RangeValues", "ResultRecords", "range_record"]

#: a record header's largest length: a range of a group of 256 (the largest) lists 256 indices
MAX_RANGE_HEADER = 4096


class RangeHeader(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    start: int
    end: int
    included: list[int]


_encode = msgspec.msgpack.Encoder().encode
_decode_header = msgspec.msgpack.Decoder(RangeHeader).decode


def range_record(start: int, end: int, included: list[int]) -> bytes:
    """The length and header that go before a range's values."""
    header = _encode(RangeHeader(start, end, included))
    return len(header).to_bytes(4, "big") + header


@dataclasses.dataclass(frozen=True, slots=True)
class RangeValues:
    """Values of the current range: ``offset`` within it; ``last``: the range is complete."""

    offset: int
    values: np.ndarray | None
    last: bool


class ResultRecords:
    """Feed it a result stream's chunks; it yields each record's ``RangeHeader`` as soon as it
    has one, then the range's values as ``RangeValues`` (as runs of whole values while they
    arrive when the codec encodes values one by one, else in one piece once all are in), the
    last one with ``last`` set. Raises ``BadContribution`` for bad framing: a header too long
    or not decodable, an empty or reversed range."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._held: list[memoryview] = []  # bytes of a length or a header not complete
        self._held_bytes = 0
        self._need = 4  # bytes the length or the header still lacks
        self._header = False  # reading a header (else a length), when not in values
        self._values: ValueRuns | None = None  # the current range's, until it is whole
        #: bytes of values taken in so far (everything but the lengths and headers)
        self.value_bytes = 0

    @property
    def between_records(self) -> bool:
        """Whether every record fed so far is complete (a stream may end here)."""
        return self._values is None and not self._held_bytes and not self._header

    def feed(self, chunk: memoryview) -> Iterator[RangeHeader | RangeValues]:
        data = chunk
        while data:
            if self._values is not None:
                values = self._values
                take = min(values.left, len(data))
                run = values.feed(data[:take])
                data = data[take:]
                self.value_bytes += take
                if not values.left:
                    self._values = None
                if run is not None:
                    yield RangeValues(run[0], run[1], not values.left)
                elif not values.left:  # (cannot happen: the last byte completes a value)
                    yield RangeValues(0, None, True)
                continue
            take = min(self._need - self._held_bytes, len(data))
            self._held.append(data[:take])
            self._held_bytes += take
            data = data[take:]
            if self._held_bytes < self._need:
                return
            raw = b"".join(self._held)
            self._held.clear()
            self._held_bytes = 0
            if not self._header:
                length = int.from_bytes(raw, "big")
                if not 0 < length <= MAX_RANGE_HEADER:
                    raise BadContribution("framing", f"a range header of {length} bytes")
                self._header, self._need = True, length
                continue
            try:
                header = _decode_header(raw)
            except msgspec.DecodeError:
                raise BadContribution("framing", "a range header that does not decode") from None
            if not header.start < header.end:
                raise BadContribution("framing", f"an empty range [{header.start}, {header.end})")
            self._header, self._need = False, 4
            self._values = ValueRuns(self._codec, header.end - header.start)
            yield header
