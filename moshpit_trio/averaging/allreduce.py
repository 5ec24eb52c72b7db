"""Butterfly all-reduce inside one group, with the failure rules of MOSHPIT.md §1.

The flat vector is cut into one span per member (``partition.spans``: sized for bandwidth;
``no_span`` members get none: client-mode ones, and relayed ones too when a listening member is
there to reduce). Then, all under stage deadlines:

1. *scatter*: every member streams its part of span j to member j (``avg.RUN.part``);
2. *reduce*: member j accumulates the parts (``reducer.SpanAccumulator``: a chunk counts whole
   or not at all; bad data is excluded and named) and averages span j range by range, each
   range as soon as every member still counted has delivered it (``SpanAccumulator.take``),
   over exactly those members, but never leaving a rest shorter than the range (a quick span
   is one or two ranges, not one per chunk: each range goes to every member); at the reduce
   deadline the members still incomplete are left out of the rest. Parts go in chunks sized
   for the link (``_part_chunk``), so over a slow one the ranges follow its sender closely;
3. *gather*: member j streams each range of its average, with the list of members it contains,
   to every member as soon as it is taken, while the parts of the next ranges are still coming
   in: one stream per member (``avg.RUN.result``) carries all the ranges, one record each
   (``result_stream``). Scatter and gather overlap: a member behind a slow link takes results
   in while its parts still go out.

A member keeps its own values for every range whose result did not reach it. So each member
knows, range by range, whose data its values contain, and every member that got a range of
span j's result got the same values with the same list: no member is left with a silently
mixed average.

A member lost mid-round is news at once, not at a deadline: each member watches the others it
depends on (everyone, for a reducer; the reducers, for a member without a span). When the last
connection to one ends (reset, closed, GOODBYE), or it stays silent for the progress timeout
(``wire.liveness.progress_timeout``: a frozen peer keeps its connections open and says
nothing), it is *lost* for this round: its part is left out of our span (``excluded``: "lost"
or "unresponsive"), we stop waiting for its span's result (we keep our own values there), and
our streams to it are cancelled, their unsent bytes dropped. The round then ends as soon as
everything still expected from the members left has arrived.

Incoming streams may arrive before this member has learned of the group (the leader's answer
reaches members at slightly different times): they wait for the round to be registered, under
their own deadline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import trio

from ..errors import ConfigError, CrossedIdleClose, MoshpitError, Rejected
from ..identity import PeerID
from ..wire.address import PeerAddress
from ..wire.connection import Connection, SendStream, StreamRequest
from ..wire.envelope import SharedPayload
from ..wire.liveness import MIN_PROGRESS_TIMEOUT, progress_timeout
from .compression import Codec, ValueRuns, codec
from .matchmaking import GroupInfo, MemberInfo
from .partition import spans as make_spans
from .reducer import BadContribution, SpanAccumulator
from .result_stream import RangeHeader, ResultRecords, range_record

__all__ = ["AllReduce", "RoundRegistry", "SpanReport"]


def no_span(members: Sequence[MemberInfo]) -> list[bool]:
    """Which members reduce nothing: client-mode ones, since every other member would have
    to reach them through a relay (each byte twice over the relay's links), unless nobody in
    the group listens; then the relayed ones reduce, and the relays carry the round."""
    if any(not m.client_mode for m in members):
        return [m.client_mode for m in members]
    return [not m.relayed for m in members]


@dataclasses.dataclass(frozen=True, slots=True)
class SpanReport:
    """What one span of this member's vector holds after the round."""

    start: int
    end: int
    reducer: PeerID
    #: the members whose data the span's values average; None: it kept this member's own values
    included: tuple[PeerID, ...] | None


class _PartHeader(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    group_id: bytes
    sender: int
    start: int
    end: int
    weight: float
    codec: str


class _ResultHeader(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """A result stream's header; the ranges follow in its body (``result_stream``)."""

    group_id: bytes
    codec: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Taken:
    """A range of our own span's average (offsets within the span); ``values`` None when
    nobody's data could be averaged there (then ``payload`` and ``record`` are None too).
    ``record``: the range's record header on a result stream, the same for every member."""

    start: int
    end: int
    values: np.ndarray | None
    included: tuple[int, ...]
    payload: SharedPayload | None
    record: bytes | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Received:
    """A range of span j's result as it arrived (offsets within the span): ``(offset in the
    range, values)`` pieces, and the members it averages."""

    start: int
    end: int
    pieces: list[tuple[int, np.ndarray]]
    included: tuple[int, ...]


def _report(reports: list[SpanReport], report: SpanReport) -> None:
    """Append ``report``, merged into the last one when it continues it with the same reducer
    and the same members (a span averaged in several ranges over the same members is one)."""
    if reports:
        last = reports[-1]
        if (last.end, last.reducer, last.included) == (
            report.start,
            report.reducer,
            report.included,
        ):
            reports[-1] = dataclasses.replace(last, end=report.end)
            return
    reports.append(report)


#: seconds of a part stream's share of its link per chunk (``AllReduce._part_chunk``)
PART_CHUNK_TIME = 0.1
_MIN_PART_CHUNK = 64 * 1024

#: chunk boundaries fall on multiples of this many bytes (whole values of every codec that
#: encodes values one by one)
_CHUNK_ALIGN = 4096


def _aligned(size: int) -> int:
    """``size`` rounded down to whole ``_CHUNK_ALIGN`` blocks (as it is when below one)."""
    return size if size < _CHUNK_ALIGN else size // _CHUNK_ALIGN * _CHUNK_ALIGN


def part_chunks(size: int, chunk: int, floor: int) -> list[int]:
    """The sizes of the chunks a part of ``size`` bytes is sent in: ``floor`` bytes first,
    doubling up to ``chunk`` while two chunks' worth is left after; then ``chunk`` bytes each
    while two chunks' worth is left; then halves of what is left down to ``floor``; then the
    rest (under ``2 * floor``). Boundaries fall on multiples of 4096 bytes (``chunk`` is
    rounded down to one, ``floor`` up).

    Why: reducer j averages a range once every member's chunk of it is in, and sends each
    average back to every member. Small first chunks start those results while the parts
    still flow (a member's links would otherwise carry only parts until the slowest of N - 1
    streams had delivered a whole chunk); small last chunks keep the range averaged after the
    last chunk small. Every chunk but the last is at most what follows it, so a reducer that
    never takes a range shorter than the rest of its span
    (``SpanAccumulator.take(no_short_rest=True)``) still takes each chunk as it comes.

    >>> [n >> 10 for n in part_chunks(10 << 20, 4 << 20, 512 << 10)]
    [512, 1024, 4096, 2304, 1152, 576, 576]
    """
    if chunk < 1 or floor < 1 or size < 0:
        raise ConfigError("chunk and floor must be positive, size at least 0")
    floor = -(-floor // _CHUNK_ALIGN) * _CHUNK_ALIGN
    chunk = max(chunk // _CHUNK_ALIGN * _CHUNK_ALIGN, floor)
    sizes: list[int] = []
    left = size
    n = floor
    while n < chunk and left - n >= 2 * chunk:
        sizes.append(n)
        left -= n
        n *= 2
    while left > 0:
        if left >= 2 * chunk:
            n = chunk
        elif left >= 2 * floor:
            n = left // 2 // _CHUNK_ALIGN * _CHUNK_ALIGN
        else:
            n = left
        sizes.append(n)
        left -= n
    return sizes


_encode = msgspec.msgpack.Encoder().encode
_part_decoder = msgspec.msgpack.Decoder(_PartHeader)
_result_decoder = msgspec.msgpack.Decoder(_ResultHeader)


class AllReduce:
    """One member's side of one group's all-reduce (made per round by the averager)."""

    def __init__(
        self,
        group: GroupInfo,
        me: PeerID,
        flat: np.ndarray,
        weight: float,
        *,
        codec_name: str,
        max_norm: float | None,
        borrow_flat: bool = False,
        in_place: bool = True,
        pace: bool = False,
    ) -> None:
        self.group = group
        self.me = me
        self.index = group.index_of(me)
        self.flat = flat
        self.weight = weight
        self.codec: Codec = codec(codec_name)
        self.members = group.members
        self.spans = make_spans(
            len(flat),
            [m.bandwidth for m in group.members],
            client_mode=no_span(group.members),
        )
        start, end = self.spans[self.index]
        self.accumulator = (
            SpanAccumulator(end - start, len(self.members), max_norm=max_norm)
            if end > start
            else None
        )
        # Our span's average, range by range as the accumulator takes them; `reduced` is the
        # whole list once the span is settled (every range taken), None before.
        self._ranges: list[_Taken] = []
        self._ranges_changed = trio.Event()
        self._settled = trio.Event()
        self.reduced: list[_Taken] | None = None
        # span j's result, as the ranges that arrived (each whole, with the members it averages)
        self.results: dict[int, list[_Received]] = {}
        self._claimed: dict[int, list[tuple[int, int]]] = {}  # ranges arrived or arriving
        self.all_results = trio.Event()
        self.excluded: dict[int, str] = {}
        self._progress_timeout = MIN_PROGRESS_TIMEOUT
        self.bytes_sent = 0
        self.bytes_received = 0
        # With borrow_flat, parts are encrypted straight from `flat` (no copy) when the codec's
        # bytes are the values' own. Each chunk is read as it is sealed; what waits in a queue
        # is ciphertext of its own, so `flat` is free again once its sends have returned.
        self._borrow = borrow_flat and self.codec.name == "none" and _NATIVE_IS_WIRE
        # in_place: the round's values are written into `flat`; else only listed in `pieces`.
        self._in_place = in_place
        #: after run(): ``(start, values)`` for every span whose average this member now holds
        self.pieces: list[tuple[int, np.ndarray]] = []
        self._expected_results = {
            j for j, (s, e) in enumerate(self.spans) if e > s and j != self.index
        }
        if not self._expected_results:
            self.all_results.set()
        #: members lost during the round (connection ended, or silent), and how
        self.lost: dict[int, str] = {}
        #: with ``pace``: the bytes/s at which we send to each member (``pacing_rates``)
        self.rates: dict[int, float] = self.pacing_rates() if pace else {}
        self._paced: list[Connection] = []  # the connections whose sending we capped
        # our streams to each member, so that losing it cancels them
        self._sends: dict[int, list[trio.CancelScope]] = {}

    # -- this member's own run ---------------------------------------------------------------

    async def run(
        self,
        transport: Any,
        run_id: str,
        reduce_deadline: float,
        deadline: float,
        *,
        progress_timeout: float = MIN_PROGRESS_TIMEOUT,
    ) -> list[SpanReport]:
        """Scatter, reduce, gather; returns the per-span report. Never raises a peer's failure.

        A member silent for ``progress_timeout`` seconds while we depend on it is lost for the
        round (see the module docstring)."""
        self._progress_timeout = progress_timeout
        if self.accumulator is not None:
            start, end = self.spans[self.index]
            # Our own part may be bad (NaN, over the norm bound): the accumulator then leaves
            # us out of our own span's average and names us in `excluded`.
            with contextlib.suppress(BadContribution):
                self._add(self.index, 0, self.flat[start:end], self.weight)
        try:
            async with trio.open_nursery() as watchers:
                for i in self._depends_on():
                    watchers.start_soon(self._watch, transport, i, progress_timeout)
                await self._exchange(transport, run_id, reduce_deadline, deadline)
                # Everything we send and wait for is over: nobody needs watching any more.
                watchers.cancel_scope.cancel()
        finally:
            # Whatever goes over these connections next (the DHT, the next round) is not ours
            # to pace.
            for conn in self._paced:
                conn.pace(None)
        return self._apply()

    async def _exchange(
        self, transport: Any, run_id: str, reduce_deadline: float, deadline: float
    ) -> None:
        async with trio.open_nursery() as nursery:
            for j, (start, end) in enumerate(self.spans):
                if j != self.index and end > start:
                    nursery.start_soon(self._send_part, transport, run_id, j, reduce_deadline)
            if self.accumulator is not None:
                # Each range of our span's average goes out as soon as it is taken, while the
                # parts of the rest are still coming in.
                for i in range(len(self.members)):
                    if i != self.index:
                        nursery.start_soon(self._send_results, transport, run_id, i, deadline)
                with trio.move_on_at(reduce_deadline):
                    await self._settled.wait()
                self._settle()
            with trio.move_on_at(deadline):
                await self.all_results.wait()

    def pacing_rates(self) -> dict[int, float]:
        """The rate (bytes/s) at which we send to each member we send anything to: our
        announced bandwidth, shared among the members in proportion to the bytes we send each
        (our part of its span, and our average of ours), so that our flows all end together,
        as soon as our uplink allows.

        Why: a member sends to N - 1 others at once, over N - 1 TCP connections that share its
        uplink, and TCP shares it unevenly over the fraction of a second a round takes (one
        flow crowded out for a while, another ahead, a reducer waiting on the slow one while
        its own uplink sits idle). Each flow capped at its share keeps them in step; the
        pacing is the kernel's (``Connection.pace``), so it costs no CPU here. (Rates that
        make every flow of the group end together at the busiest link's time were slower on
        uneven links: they hold a fast member's parts back to that time, and the averages
        that wait on those parts come later.)"""
        sizes = [
            self.codec.encoded_size(end - start) if end > start else 0 for start, end in self.spans
        ]
        me = self.index
        sent = {j: sizes[me] + sizes[j] for j in range(len(self.members)) if j != me}
        total = sum(sent.values())
        if total <= 0:
            return {}
        bandwidth = self.members[me].bandwidth
        return {j: bandwidth * n / total for j, n in sent.items() if n > 0}

    def progress_timeout(self, window: float, bandwidth: float, stream_chunk: int) -> float:
        """How long a member may stay silent in this run before it counts as lost
        (``wire.liveness.progress_timeout``), from ``bandwidth``, the slowest member's.

        Its link is shared by the N - 1 streams it sends or takes at once, each of which may
        keep us waiting for one message: a stream chunk, or the whole part when that is
        smaller. Four such messages at a stream's share of the link, but never less than four
        chunks at the whole link (the rule before streams were counted): an announced
        bandwidth can be higher than the link really is."""
        largest_part = max(self.codec.encoded_size(end - start) for start, end in self.spans)
        message = max(1, min(stream_chunk, largest_part))
        return max(
            progress_timeout(window=window, bandwidth=bandwidth, chunk=stream_chunk),
            progress_timeout(
                window=window,
                bandwidth=bandwidth,
                chunk=message,
                streams=max(1, len(self.members) - 1),
            ),
        )

    # -- members lost mid-round --------------------------------------------------------------

    def _depends_on(self) -> list[int]:
        """The members whose loss changes what we wait for or send: all of them when we reduce
        a span (their parts come to us, our average goes to them), else the reducers."""
        others = [i for i in range(len(self.members)) if i != self.index]
        if self.accumulator is not None:
            return others
        return [i for i in others if self.spans[i][1] > self.spans[i][0]]

    async def _watch(self, transport: Any, i: int, progress_timeout: float) -> None:
        """Lose member ``i`` when its last connection ends, or when it stays silent (no
        message at all: not a chunk, not a credit, not an answer to a ping) for
        ``progress_timeout``."""
        member = self.members[i]
        peer = PeerID(member.peer_id)
        async with trio.open_nursery() as nursery:

            async def connection_ends() -> None:
                # (an idle close is no loss: one end closed a connection that had nothing in
                # flight just as this round began; the sends dial again)
                await transport.wait_gone(peer)
                self._lose(i, "lost")
                nursery.cancel_scope.cancel()

            nursery.start_soon(connection_ends)
            await self._let_it_dial(transport, i, trio.current_time() + progress_timeout)
            await transport.wait_silent(self._target(member), progress_timeout)
            self._lose(i, "unresponsive")
            nursery.cancel_scope.cancel()

    def _lose(self, i: int, reason: str) -> None:
        """Member ``i`` is gone for this round: stop waiting for it and sending to it."""
        if i in self.lost:
            return
        self.lost[i] = reason
        for scope in self._sends.pop(i, ()):
            scope.cancel()
        acc = self.accumulator
        if (
            acc is not None
            and self.reduced is None
            and not acc.complete(i)
            and i not in acc.excluded
        ):
            acc.exclude(i, reason)
            self._advance()
        if i in self._expected_results and not self._result_complete(i):
            self._expected_results.discard(i)
            self._check_results()

    def _advance(self) -> None:
        """Take every range of our span that can be averaged now, and wake the result
        senders. Each range is encoded once for every member (and encrypted for each as it is
        sent); everyone else gets it through the codec, so we keep exactly what they get:
        members holding a range of span j hold the same values. Uncompressed, the average
        itself goes out (nothing writes to it: it is ours alone and only ever read)."""
        acc = self.accumulator
        assert acc is not None
        taken = False
        # (no_short_rest: a range is never followed by a shorter one, so a span that arrives
        # quickly is one or two records per member, each encrypted once for each, not one per
        # chunk)
        while (got := acc.take(no_short_rest=True)) is not None:
            taken = True
            values, payload = got.values, None
            if values is not None:
                if self.codec.name == "none" and _NATIVE_IS_WIRE:
                    payload = SharedPayload.borrow(values.data)
                else:
                    payload = SharedPayload(self.codec.encode(values))
                    if self.codec.name != "none":
                        values = self.codec.decode(payload.data, len(values))
            record = None
            if payload is not None:
                at = self.spans[self.index][0] + got.start
                record = range_record(at, at + got.end - got.start, list(got.included))
            self._ranges.append(_Taken(got.start, got.end, values, got.included, payload, record))
        if acc.finalized and self.reduced is None:
            self.excluded = dict(acc.excluded)
            self.reduced = self._ranges
            self._settled.set()
            taken = True  # (the result senders wait for this too)
        if taken:
            self._ranges_changed.set()
            self._ranges_changed = trio.Event()

    def _settle(self) -> None:
        """The reduce stage is over: senders still incomplete are left out of the rest of our
        span ("late"), which is averaged over the others now."""
        acc = self.accumulator
        assert acc is not None
        if self.reduced is not None:
            return
        for i in range(len(self.members)):
            if not acc.complete(i) and i not in acc.excluded:
                acc.exclude(i, "late")
        self._advance()

    def _result_complete(self, j: int) -> bool:
        start, end = self.spans[j]
        return sum(r.end - r.start for r in self.results.get(j, ())) == end - start

    def _check_results(self) -> None:
        if all(self._result_complete(j) for j in self._expected_results):
            self.all_results.set()

    def _apply(self) -> list[SpanReport]:
        ids = self.group.peer_ids
        reports: list[SpanReport] = []
        for j, (start, end) in enumerate(self.spans):
            if end <= start:
                continue
            # what arrived for span j (or our own average of it): ranges within the span, each
            # (start, end, [(offset in the range, values)], members)
            got: list[tuple[int, int, list[tuple[int, np.ndarray]], tuple[int, ...]]]
            if j == self.index:
                got = [
                    (r.start, r.end, [(0, r.values)], r.included)
                    for r in self.reduced or ()
                    if r.values is not None
                ]
            else:
                got = [(r.start, r.end, r.pieces, r.included) for r in self.results.get(j, ())]
            pos = 0
            for a, b, pieces, included in sorted(got, key=lambda r: r[0]):
                if a > pos:
                    _report(reports, SpanReport(start + pos, start + a, ids[j], None))
                for offset, values in pieces:
                    at = start + a + offset
                    self.pieces.append((at, values))
                    if self._in_place:
                        self.flat[at : at + len(values)] = values
                members = tuple(ids[i] for i in included)
                _report(reports, SpanReport(start + a, start + b, ids[j], members))
                pos = b
            if pos < end - start:
                _report(reports, SpanReport(start + pos, end, ids[j], None))
        return reports

    async def _let_it_dial(self, transport: Any, i: int, by: float) -> None:
        """Between two relayed members, only the one with the lower PeerID opens a circuit;
        the other waits for it (until ``by`` at most, then dials itself). Both need each other
        at once in a group where both reduce, and two circuits per pair would spend twice the
        relay's per-peer circuits (and each end's incoming streams), for nothing."""
        me, member = self.members[self.index], self.members[i]
        if not (me.relayed and member.relayed) or me.peer_id < member.peer_id:
            return
        with trio.move_on_at(by):
            await transport.wait_connected(PeerID(member.peer_id))

    @staticmethod
    def _target(member: MemberInfo) -> PeerAddress | PeerID:
        if member.client_mode:
            return PeerID(member.peer_id)
        return PeerAddress.parse(member.address)

    async def _send_part(self, transport: Any, run_id: str, j: int, deadline: float) -> None:
        start, end = self.spans[j]
        header = _PartHeader(
            self.group.group_id, self.index, start, end, self.weight, self.codec.name
        )
        # If reducer j fails or refuses us, its span keeps our values (and the report says so).
        payload = (
            SharedPayload.borrow(self.flat[start:end].data)
            if self._borrow
            else self.codec.encode(self.flat[start:end])
        )

        size = min(self._part_chunk(j), _aligned(transport.limits.connection.stream_chunk))

        async def body(stream: SendStream) -> int:
            chunk: int | list[int] = size
            if stream.connection in self._paced and self.codec.itemsize is not None:
                # Paced, a chunk takes its flow's share of the link to arrive, all round
                # long: smaller chunks first and last, so that the averages start coming back
                # sooner, and the range averaged after the last chunk is small (part_chunks).
                # On four 1 Gbit/s links, paced: 0.58 s a round with them, 0.70 s without,
                # 0.67 s with only the small last ones. (Unpaced they gained 3% there and
                # cost 5% of the round on loopback, where every range is CPU: so only paced.
                # A codec that does not encode values one by one is decoded only once the
                # part is in.)
                chunk = part_chunks(len(payload), size, max(_MIN_PART_CHUNK, size // 8))
            await stream.send(payload, chunk=chunk)
            return len(payload)

        name = f"avg.{run_id}.part"
        await self._stream_to(transport, j, name, _encode(header), body, deadline)

    def _part_chunk(self, j: int) -> int:
        """Bytes per chunk of our part to reducer ``j``: what our stream to it moves in
        ``PART_CHUNK_TIME`` at its share of the slower of our two links (each carries N - 1
        streams at once), at least 64 KiB (the connection caps it at its ``stream_chunk``).

        Reducer j averages a range once every member delivered it, and a chunk counts whole:
        over a slow link, 4 MiB chunks would keep j's ranges, and so the averages coming back
        to us, seconds behind the parts we send, and the last range's results would all come
        after our last chunk went out, where they could have come while it went.

        A multiple of 4096 bytes: a chunk that ended inside a value would have the receiver
        join the value's bytes with the whole next chunk (``ValueRuns``), one more copy of
        nearly every byte of the part (the default 1e8 bytes/s, shared by three streams,
        made chunks of 3,333,333 bytes; aligned, a loopback round of 10M floats among four
        took an eighth less time and CPU)."""
        share = min(self.members[self.index].bandwidth, self.members[j].bandwidth) / max(
            1, len(self.members) - 1
        )
        return max(_MIN_PART_CHUNK, _aligned(int(share * PART_CHUNK_TIME)))

    async def _send_results(self, transport: Any, run_id: str, i: int, deadline: float) -> None:
        """Stream every range of our span's average to member ``i`` as the ranges are taken,
        all on one stream (``result_stream``): a range never waits for an answer to the one
        before, which would come back over member i's uplink behind the parts it is still
        sending. If member i is gone (or refuses the stream), it keeps its own values for the
        ranges it did not get, and its report says so."""
        # Nothing to open until there is a range to send (a span nobody's data reached has none).
        while not any(r.payload is not None for r in self._ranges):
            if self.reduced is not None:
                return
            await self._ranges_changed.wait()

        async def body(stream: SendStream) -> int:
            sent = size = 0
            while True:
                changed = self._ranges_changed
                while sent < len(self._ranges):
                    r = self._ranges[sent]
                    sent += 1
                    if r.payload is None:  # (nobody's average there: everyone keeps theirs)
                        continue
                    assert r.record is not None
                    await stream.send(r.record)
                    await stream.send(r.payload)
                    size += len(r.payload)
                if self.reduced is not None and sent == len(self._ranges):
                    return size
                await changed.wait()

        header = _encode(_ResultHeader(self.group.group_id, self.codec.name))
        await self._stream_to(transport, i, f"avg.{run_id}.result", header, body, deadline)

    async def _stream_to(
        self,
        transport: Any,
        i: int,
        name: str,
        header: bytes,
        body: Callable[[SendStream], Awaitable[int]],
        deadline: float,
    ) -> bool:
        """Open a stream to member ``i`` and send it what ``body`` sends (returning how many
        bytes); whether the receiver took all of it (then they count in ``bytes_sent``).
        (``body`` runs again from its start on a new connection when the first one was closed
        as idle before it was served.)"""
        timeout = deadline - trio.current_time()
        if timeout <= 0 or i in self.lost:
            return False
        # Losing member i cancels this (its unsent chunks are dropped, never queued).
        with trio.CancelScope() as scope:
            self._sends.setdefault(i, []).append(scope)
            try:
                patience = trio.current_time() + self._progress_timeout
                await self._let_it_dial(transport, i, min(deadline, patience))
                for again in (False, True):
                    timeout = deadline - trio.current_time()  # (what the waits left)
                    if timeout <= 0:
                        return False
                    try:
                        async with transport.open_stream(
                            self._target(self.members[i]), name, header, timeout=timeout
                        ) as stream:
                            self._pace(i, stream.connection)
                            size = await body(stream)
                            await stream.finish()
                    except CrossedIdleClose:
                        if again:
                            return False
                        continue  # never served there: once more, on a new connection
                    self.bytes_sent += size
                    return True
            except MoshpitError:
                return False
        return False

    def _pace(self, i: int, conn: Connection) -> None:
        """Cap what we send over ``conn`` at member i's rate (``pacing_rates``), once."""
        rate = self.rates.get(i)
        if rate is not None and conn not in self._paced and conn.pace(rate):
            self._paced.append(conn)

    # -- what other members send us ----------------------------------------------------------

    def _add(self, sender: int, offset: int, values: np.ndarray, weight: float) -> None:
        """Hand a run of ``sender``'s part to the accumulator, which keeps it without a copy:
        received runs are views of buffers nothing else holds (the decrypted envelopes), and
        our own part is a view of ``flat``, which nothing writes to before the span is
        averaged."""
        assert self.accumulator is not None
        try:
            self.accumulator.add(sender, offset, values, weight, keep=True)
        finally:
            self._advance()

    async def on_part(self, request: StreamRequest, header: _PartHeader) -> bytes:
        if not 0 <= header.sender < len(self.members) or header.sender == self.index:
            raise Rejected("bad sender index")
        if self.members[header.sender].peer_id != request.peer.to_bytes():
            raise Rejected("a part must come from the member it names")
        start, end = self.spans[self.index]
        if (header.start, header.end) != (start, end) or self.accumulator is None:
            raise Rejected("that span is not reduced here")
        if header.codec != self.codec.name:
            raise Rejected("wrong codec")
        sender = header.sender
        try:
            # Each run of whole values goes to the accumulator as it arrives (no joined copy
            # of the part), so the ranges it completes are averaged and sent on at once. The
            # run that completes the part waits for the end of the stream: the part is
            # complete only once the sender said that was all, and no more than it announced
            # came.
            pending: tuple[int, np.ndarray] | None = None
            async with contextlib.aclosing(self._values(request, end - start)) as runs:
                async for offset, values in runs:
                    if self.reduced is not None:
                        raise Rejected("too late: the span was already reduced")
                    if offset + len(values) < end - start:
                        self._add(sender, offset, values, header.weight)
                    else:
                        pending = (offset, values)
            if self.reduced is not None:
                raise Rejected("too late: the span was already reduced")
            if pending is not None:
                self._add(sender, *pending, header.weight)
        except BadContribution as exc:
            # the accumulator excluded it already when the check was its own; make sure
            if sender not in self.accumulator.excluded:
                self.accumulator.exclude(sender, exc.reason)
            self._advance()
            raise Rejected(f"bad contribution ({exc.reason}): {exc.detail}") from None
        except trio.Cancelled:
            # Cut off before its deadline: the sender gave up on us (say after taking us for
            # frozen) or its connection ended, so the rest of this part is not coming. (At
            # the deadline it is merely late, and the reduce leaves it out as such.)
            if trio.current_time() < request.deadline:
                self._lose(sender, _cut_off_by(request))
            raise
        return b""

    async def _values(
        self, request: StreamRequest, count: int
    ) -> AsyncGenerator[tuple[int, np.ndarray], None]:
        """Decode a stream of ``count`` encoded values as ``(offset, values)`` runs, as the
        chunks arrive when the codec encodes values one by one (the arrays are views of the
        received bytes), else in one piece at the end. BadContribution("length") as soon as
        more bytes than ``count`` values arrive, or at the end when fewer did."""
        runs = ValueRuns(self.codec, count)
        size = runs.left
        received = 0
        async for chunk in request:
            received += len(chunk)
            self.bytes_received += len(chunk)
            if len(chunk) > runs.left:
                raise BadContribution("length", f"more than the {size} bytes of {count} values")
            run = runs.feed(chunk)
            if run is not None:
                yield run
        if runs.left:
            raise BadContribution("length", f"{received} bytes, not the {size} of {count} values")

    async def on_result(self, request: StreamRequest, header: _ResultHeader) -> bytes:
        j = next(
            (k for k, m in enumerate(self.members) if m.peer_id == request.peer.to_bytes()), None
        )
        if j is None or j == self.index or j not in self._expected_results:
            raise Rejected("no result expected from that peer")
        if header.codec != self.codec.name:
            raise Rejected("the result does not match the span")
        # Each range is kept as the pieces it arrived in, and counts only once it is whole and
        # checked (a result range counts whole or not at all); the ranges before it stay.
        records = ResultRecords(self.codec)
        current: _Received | None = None
        try:
            async for chunk in request:
                before = records.value_bytes
                for item in records.feed(chunk):
                    if isinstance(item, RangeHeader):
                        current = self._claim_range(j, item)
                        continue
                    assert current is not None
                    if item.values is not None:
                        if not _all_finite(item.values):
                            raise Rejected("non-finite values in a result")
                        current.pieces.append((item.offset, item.values))
                    if item.last:
                        self.results.setdefault(j, []).append(current)
                        current = None
                        self._check_results()
                # (the values' bytes, as for parts: framing is not counted)
                self.bytes_received += records.value_bytes - before
            if not records.between_records:
                raise BadContribution("length", "the stream ended inside a range")
        except BadContribution as exc:
            self._unclaim(j, current)
            raise Rejected(f"bad result: {exc}") from None
        except Rejected:
            self._unclaim(j, current)
            raise
        except trio.Cancelled:
            self._unclaim(j, current)
            # Cut off before its deadline (the reducer gave up on us, say after taking us for
            # frozen): the rest of its result is not coming, and waiting would hold us to our
            # deadline.
            if trio.current_time() < request.deadline and not self._result_complete(j):
                self._lose(j, _cut_off_by(request))
            raise
        return b""

    def _claim_range(self, j: int, header: RangeHeader) -> _Received:
        """Check a range of span j's result announced by its record header, and hold its place
        (no other range of span j may overlap it) until it is whole or refused."""
        span_start, span_end = self.spans[j]
        claimed = self._claimed.setdefault(j, [])
        if not span_start <= header.start < header.end <= span_end or any(
            a < header.end and header.start < b for a, b in claimed
        ):
            raise Rejected("the result does not match the span")
        included = header.included
        if (
            not included
            or len(set(included)) != len(included)
            or not all(0 <= i < len(self.members) for i in included)
        ):
            raise Rejected("bad list of included members")
        claimed.append((header.start, header.end))
        return _Received(
            header.start - span_start, header.end - span_start, [], tuple(sorted(included))
        )

    def _unclaim(self, j: int, received: _Received | None) -> None:
        """Give back the place of a range refused or cut off before it was whole."""
        if received is not None:
            span_start = self.spans[j][0]
            self._claimed[j].remove((span_start + received.start, span_start + received.end))


# The "none" codec's bytes are little-endian float32: the flat vector's own bytes on a
# little-endian machine, so they can go out as they are.
_NATIVE_IS_WIRE = sys.byteorder == "little"


def _cut_off_by(request: StreamRequest) -> str:
    """Why an incoming stream ended early: its connection ended ("lost"), or its sender
    cancelled it ("withdrew")."""
    return "lost" if request.connection.closed else "withdrew"


def _all_finite(values: np.ndarray) -> bool:
    """Whether every value is finite: one sum (NaN and ±Inf propagate through it), and the
    elementwise check only when the sum overflowed."""
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.add.reduce(values))):
            return True
    return bool(np.isfinite(values).all())


class RoundRegistry:
    """Rounds in progress by group id, so incoming streams find theirs (and wait for it)."""

    def __init__(self) -> None:
        self._rounds: dict[bytes, AllReduce] = {}
        self._changed = trio.Event()
        # Group ids of finished rounds (the latest few): a straggler for one is refused at
        # once instead of waiting for a round that will never come back.
        self._finished: dict[bytes, None] = {}

    def add(self, round: AllReduce) -> None:
        self._rounds[round.group.group_id] = round
        self._changed.set()
        self._changed = trio.Event()

    def remove(self, round: AllReduce) -> None:
        self._rounds.pop(round.group.group_id, None)
        self._finished[round.group.group_id] = None
        while len(self._finished) > 64:
            del self._finished[next(iter(self._finished))]

    async def wait_for(self, group_id: bytes) -> AllReduce:
        while group_id not in self._rounds:
            if group_id in self._finished:
                raise Rejected("that round is over")
            await self._changed.wait()
        return self._rounds[group_id]

    async def on_part(self, request: StreamRequest) -> bytes:
        try:
            header = _part_decoder.decode(request.header)
        except msgspec.DecodeError:
            raise Rejected("malformed part header") from None
        round = await self.wait_for(header.group_id)
        return await round.on_part(request, header)

    async def on_result(self, request: StreamRequest) -> bytes:
        try:
            header = _result_decoder.decode(request.header)
        except msgspec.DecodeError:
            raise Rejected("malformed result header") from None
        round = await self.wait_for(header.group_id)
        return await round.on_result(request, header)
