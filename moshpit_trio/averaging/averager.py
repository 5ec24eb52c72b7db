"""MoshpitAverager: Moshpit All-Reduce rounds over a peer, one ``step()`` at a time.

    averager = MoshpitAverager(peer, run_id="exp1", tensors=[w, b], grid=(4, 4))
    async with averager:
        report = await averager.step(weight=n_samples, timeout=30)   # averages w, b in place

A step is one round of MOSHPIT.md Algorithm 1: announce under (run, key, round) and form a group
(``matchmaking``), all-reduce inside it (``allreduce``), then rotate the key (``grid``). Each
stage runs under its own deadline inside the step's ``timeout``; whatever fails, the step returns
by then with a ``RoundReport`` that says exactly what the tensors now hold.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import numpy as np
import trio

from ..dht.records import (
    Record,
    RecordRejected,
    accept_answer,
    decode_records,
    encode_records,
    key_id,
)
from ..dht.routing import Contact
from ..errors import ConfigError, MoshpitError, Rejected
from ..identity import PeerID
from ..log import get_logger
from ..wire.connection import Request
from .allreduce import AllReduce, RoundRegistry, SpanReport
from .auto_grid import (
    COLD_ATTEMPTS,
    COLD_SETTLE,
    Layout,
    Plan,
    RowRecord,
    cold_read_spread,
    cold_start_rows,
    decode_record,
    directory_key,
    encode_record,
    estimate_size,
    estimate_size_around,
    group_size_limits,
    listening_bits,
)
from .compression import codec as find_codec
from .grid import (
    Grid,
    GroupKey,
    check_key,
    group_key_name,
    next_key,
    within_group_index,
)
from .grid import (
    initial_key as default_initial_key,
)
from .matchmaking import (
    RELAYED_BANDWIDTH,
    RELAYED_GROUP_MAX,
    GroupInfo,
    KeyFull,
    Matchmaker,
    MemberInfo,
)
from .partition import TensorLayout, flatten, write_pieces

__all__ = ["MoshpitAverager", "RoundReport"]

_encode_round = msgspec.msgpack.Encoder().encode
_decode_round = msgspec.msgpack.Decoder(int).decode


@dataclasses.dataclass(eq=False)
class _DirectoryShare:
    """The directory as this peer read it for ``round``, for the members of its last row group
    (who ask for it rather than read the key themselves)."""

    round: int
    members: frozenset[bytes]
    ready: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: the signed records read (None: the read failed; the members read it themselves)
    records: list[Record] | None = None


@dataclasses.dataclass(frozen=True)
class RoundReport:
    """What one ``step()`` did, truthfully."""

    round: int
    #: None for a solo round (no group formed)
    group_id: bytes | None
    #: the group in its agreed order (just this peer in a solo round)
    members: tuple[PeerID, ...]
    index: int
    key_before: GroupKey
    key_after: GroupKey
    #: per span of the flat vector: which members' data it now averages (None: local values)
    spans: tuple[SpanReport, ...]
    #: members this peer's reducer left out of its span, and why ("late", "nonfinite", ...)
    excluded: dict[PeerID, str]
    bytes_sent: int
    bytes_received: int
    #: seconds per stage: "matchmaking", "allreduce", "total"
    seconds: dict[str, float]
    #: members this peer lost mid-round, and how: "lost" (the connection ended),
    #: "unresponsive" (silent for the progress timeout), "withdrew" (it cut off its stream to
    #: us before its deadline); it stopped waiting for them then
    lost: dict[PeerID, str] = dataclasses.field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        """A group of two or more formed and every span averages over all of its members."""
        return len(self.members) > 1 and all(
            s.included is not None and len(s.included) == len(self.members) for s in self.spans
        )


class MoshpitAverager:
    """Averages ``tensors`` in place with the peers of run ``run_id``, round after round.

    ``grid`` is the virtual grid's shape, e.g. ``(32, 32)``; ``initial_key`` this peer's starting
    key (d-1 integers; by default derived from its PeerID); ``min_group_size`` the smallest group
    a leader keeps (smaller ones disband into solo rounds); ``compression`` one of "none",
    "fp16", "8bit"; ``bandwidth`` this peer's, in bytes/s, for sizing spans; ``index_rule``
    "random" (seeded by the group id) or "rank"; ``max_norm`` refuses parts with a larger L2 norm.

    ``pace=True`` paces what a round sends to each member (the kernel's pacing of each TCP
    connection, on Linux; nothing elsewhere, in memory or through a relay): ``bandwidth``
    shared among the members in proportion to what each gets, so that those flows end
    together (``AllReduce.pacing_rates``). Unpaced, the N - 1 flows that share an uplink
    crowd each other out by turns. Turn it on where ``bandwidth`` is what this peer's uplink
    really carries: announced lower, it caps the round's sends at it.

    With ``grid="auto"`` (the default) groups are formed from the live peers
    (``auto_grid``): ``target_group_size`` (default 32) is the group size rows and columns are
    laid out for, ``max_group_size`` (default a quarter more: 40) the largest group ever
    formed; the room between them takes a peer back from an absence without splitting its
    row in two. Give one, and the other follows (``auto_grid.group_size_limits``).

    ``round_period`` (seconds) aligns rounds to the swarm's clock: ``step()`` first waits for
    the next multiple of ``round_period`` of Unix time (``peer.dht.now()``) and takes that
    slot's index as its round number. Peers that step at different paces, skip rounds, or
    restart then still meet under the same round number; without it each averager counts its
    own rounds from 0, which suits peers that step in lockstep. The wait is not part of
    ``step()``'s ``timeout``, which bounds the round itself (keep it below the period).
    """

    def __init__(
        self,
        peer: Any,
        run_id: str,
        tensors: Sequence[Any],
        grid: Sequence[int] | str = "auto",
        *,
        initial_key: Sequence[int] | None = None,
        min_group_size: int = 2,
        target_group_size: int | None = None,
        max_group_size: int | None = None,
        compression: str = "none",
        bandwidth: float = 1e8,
        index_rule: Literal["random", "rank"] = "random",
        max_norm: float | None = None,
        matchmaking_fraction: float = 0.4,
        round_period: float | None = None,
        pace: bool = False,
    ) -> None:
        self.peer = peer
        if not isinstance(pace, bool):
            raise ConfigError(f"pace is True or False, not {pace!r}")
        self.pace = pace
        #: None for grid="auto" (groups from the live peers: ``auto_grid``)
        self.grid: Grid | None = (
            None if isinstance(grid, str) and grid.strip().lower() == "auto" else Grid.parse(grid)  # type: ignore[arg-type]
        )
        #: grid="auto": the group size rows are laid out for, and the largest group
        self.target_group_size, self.max_group_size = group_size_limits(
            target_group_size, max_group_size, fixed_grid=self.grid is not None
        )
        if self.grid is None and initial_key is not None:
            raise ConfigError("initial_key is for a fixed grid; grid='auto' places peers itself")
        if min_group_size > self.max_group_size:
            raise ConfigError("min_group_size cannot exceed max_group_size")
        #: this round's largest group (grid="auto": smaller in a run where nobody listens)
        self._most = self.max_group_size
        group_key_name(run_id, (0,) * (1 if self.grid is None else self.grid.d - 1), 0)
        self.run_id = run_id
        self.tensors = list(tensors)
        self.layout = TensorLayout.of(self.tensors)
        self.codec_name = find_codec(compression).name
        if index_rule not in ("random", "rank"):
            raise ConfigError(f"index_rule is 'random' or 'rank', got {index_rule!r}")
        self.index_rule: Literal["random", "rank"] = index_rule
        if max_norm is not None and not max_norm > 0:
            raise ConfigError("max_norm must be positive")
        self.max_norm = max_norm
        if not 0 < matchmaking_fraction < 1:
            raise ConfigError("matchmaking_fraction must be in (0, 1)")
        self.matchmaking_fraction = matchmaking_fraction
        if round_period is not None and not (
            isinstance(round_period, int | float)
            and math.isfinite(round_period)
            and round_period > 0
        ):
            raise ConfigError(f"round_period must be positive seconds, got {round_period!r}")
        self.round_period = round_period
        #: the next round's number (with ``round_period``: the lowest the next slot may have)
        self.round = 0
        if self.grid is None:
            self.key: GroupKey = ()
        elif initial_key is not None:
            self.key = check_key(self.grid, initial_key, 0)
        else:
            self.key = default_initial_key(self.grid, peer.id)
        #: grid="auto": this peer's row (None until it joins one) and its last row group as
        #: (group id, index among the members by PeerID): its place in the directory
        self.row: int | None = None
        self._row_group: tuple[bytes, int] | None = None
        self._rng = random.Random(peer.id.to_bytes())
        # (its own generator: the grid's draws stay what averaging_sim.py draws)
        self._spread_rng = random.Random(b"cold read " + peer.id.to_bytes())
        #: the spread of this round's directory read (``cold_read_spread``; 0 with a row)
        self._spread = 0.0
        #: how long this round's read of the directory took (0 without one)
        self._read_took = 0.0
        self._layout = Layout(rows={})
        #: the round whose column round read ``_layout`` (None: the last read was not for one)
        self._column_read: int | None = None
        #: the round of the last directory read from the DHT, and the peers nearest its key
        self._directory_near: tuple[int, list[bytes]] | None = None
        #: how many times this averager read the run's directory from the DHT, and how many
        #: times it got it from a group mate instead (for tests and benchmarks)
        self.directory_reads = 0
        self.directory_handed = 0
        #: grid="auto": the round (after a row round) for which the member of this peer's row
        #: group that reads the directory for the group is ``_dir_source``; this peer's own
        #: share when it is that member
        self._dir_source: tuple[int, MemberInfo] | None = None
        self._dir_share: _DirectoryShare | None = None
        #: the DHT key this peer announced under in the round in progress (None between rounds)
        self.announcement: str | None = None
        self.matchmaker = Matchmaker(
            peer, run_id, bandwidth=bandwidth, min_group_size=min_group_size
        )
        self.log = get_logger(peer=peer.id.short, run=run_id)
        self._rounds = RoundRegistry()
        self._flat = np.empty(self.layout.total, dtype=np.float32)
        self._entered = False
        self._slot_reached = False

    async def __aenter__(self) -> MoshpitAverager:
        t = self.peer.transport
        self.matchmaker.register()
        t.register(f"avg.{self.run_id}.dir", self._on_directory)
        t.register_stream(f"avg.{self.run_id}.part", self._rounds.on_part)
        t.register_stream(f"avg.{self.run_id}.result", self._rounds.on_result)
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._entered = False
        self.matchmaker.unregister()
        for suffix in ("dir", "part", "result"):
            self.peer.transport.registry.unregister(f"avg.{self.run_id}.{suffix}")

    async def wait_for_round(self) -> int:
        """With ``round_period``: wait for the next slot boundary and return its round number
        (the next ``step()`` then starts at once, in that round). Without it: return the next
        round's number at once. Use it to take a snapshot of changing values just before a
        round (``MoshpitOptimizer``'s background rounds do)."""
        period = self.round_period
        if period is not None and not self._slot_reached:
            # The next boundary strictly after now (a step that ends exactly on a boundary
            # must not reuse the round it just did), and never a round already done here.
            now = self.peer.dht.now()
            slot = max(math.floor(now / period) + 1, self.round)
            await trio.sleep(max(0.0, slot * period - now))
            self.round = slot
            self._slot_reached = True
        return self.round

    # -- grid="auto" ---------------------------------------------------------------------------

    async def _read_directory(self, round_: int, deadline: float) -> Layout:
        """The run's directory for ``round_``: from the member of this peer's last row group
        that reads it for the group (one DHT read per group, not per peer: the directory is
        one key, whose replicas every group would ask), else from the DHT."""
        share, self._dir_share = self._dir_share, None
        source, self._dir_source = self._dir_source, None
        if share is not None and share.round != round_:
            share = None
        if source is not None and source[0] == round_ and share is None:
            handed = await self._directory_from(source[1], round_, deadline)
            if handed is not None:
                self.directory_handed += 1
                return self._layout_of(handed)
        if share is not None:
            # Group mates ask us from now on; they wait for this read (bounded by their call).
            self._dir_share = share
        if self.row is None:
            # No row yet (a cold start, or a joiner): so may every other peer be, all reading
            # the same key's replicas at this instant. Spread the reads (cold_read_spread).
            spread = self._spread = cold_read_spread(self._own_estimate())
            wait = min(self._spread_rng.uniform(0.0, spread), (deadline - trio.current_time()) / 4)
            await trio.sleep(max(0.0, wait))
        records: list[Record] | None = None
        self.directory_reads += 1
        near: list[Contact] = []
        read_from = trio.current_time()
        try:
            key = directory_key(self.run_id)
            records = list((await self.peer.dht.get_records(key, near=near)).values())
            self._directory_near = (round_, [c.peer_id.to_bytes() for c in near])
            self._read_took = trio.current_time() - read_from
        except MoshpitError as exc:
            # Nobody answered this time: go by the last directory read (an empty one would
            # send this peer back to a cold start).
            self.log.info("could not read the run's directory", error=str(exc))
        finally:
            if share is not None:
                share.records = records
                share.ready.set()
        return self._layout if records is None else self._layout_of(records)

    async def _directory_from(
        self, source: MemberInfo, round_: int, deadline: float
    ) -> list[Record] | None:
        """The directory's records as ``source`` read them, checked as a DHT read checks them
        (signature, key, expiry), or None when it cannot give them in half the time left."""
        timeout = (deadline - trio.current_time()) / 2
        if timeout <= 0:
            return None
        target = source.address or PeerID(source.peer_id)
        try:
            raw = await self.peer.transport.call(
                target, f"avg.{self.run_id}.dir", _encode_round(round_), timeout=timeout
            )
            records = decode_records(raw)
        except (MoshpitError, RecordRejected) as exc:
            self.log.info(
                "no directory from the group", source=source.peer_id[:4].hex(), error=str(exc)
            )
            return None
        dht = self.peer.dht
        # (The directory's row records stay for several rounds: the node's cache of checked
        # signatures spares checking each again every time a mate hands them over.)
        return accept_answer(
            directory_key(self.run_id).encode(),
            records,
            dht.namespaces,
            dht.now(),
            verified=dht.verified,
        )

    async def _on_directory(self, request: Request) -> bytes:
        """A member of our last row group asks for the directory we read for this round."""
        try:
            round_ = _decode_round(request.payload)
        except msgspec.DecodeError:
            raise Rejected("malformed directory request") from None
        share = self._dir_share
        if share is None or share.round != round_:
            raise Rejected("no directory read for that round here")
        if request.peer.to_bytes() not in share.members:
            raise Rejected("the directory is handed to the group's members only")
        await share.ready.wait()
        if share.records is None:
            raise Rejected("could not read the directory")
        return encode_records(share.records)

    def _layout_of(self, records: Sequence[Record]) -> Layout:
        entries = []
        for record in records:
            if record.value:
                entry = decode_record(record.value)
                # No group of this run is larger than its maximum: a larger entry is a lie
                # that would skew everyone's count of the swarm.
                if entry is not None and entry.size <= self.max_group_size:
                    entries.append(entry)
        self._layout = Layout.from_records(entries)
        return self._layout

    async def _auto_group(self, round_: int, deadline: float) -> GroupInfo | None:
        """Read the directory, take this round's place in the plan (a row, or a column), and
        form a group there (``auto_grid``)."""
        began = trio.current_time()
        self._spread = self._read_took = 0.0
        if self._column_read is not None and self._column_read == round_ - 1:
            # A row round right after a column round: only row rounds write the directory,
            # so it holds what the column round read; not reading it again halves the load
            # on its replicas, which every peer of the run asks.
            layout = self._layout
        else:
            layout = await self._read_directory(round_, deadline)
        self._column_read = None
        # A run in which nobody listens averages through relays: its groups stay within what a
        # relay grants one peer (every member reaches every other through it).
        target, most = self.target_group_size, self.max_group_size
        if layout.rows and not any(layout.reachable(row) for row in layout.rows):
            target, most = min(target, RELAYED_GROUP_MAX), min(most, RELAYED_GROUP_MAX)
        self._most = most
        plan = Plan.of(layout, target)
        position = None
        if self.row is not None and self._row_group is not None:
            position = layout.position(self.row, *self._row_group)
        seat = plan.seat(self.row, position)
        # A client-mode peer never lands where nobody listens: nobody there could lead it.
        reachable = self.peer.address is not None
        if plan.kind(round_) == "column":
            self._column_read = round_
            column = plan.column_for(seat, position, self._rng, reachable=reachable)
            expect = plan.expected("column", column)
            return await self._form((1, column), round_, deadline, expected=expect)
        if seat is not None:
            row = plan.row(seat, position, reachable=reachable)
            expect = plan.expected("row", row)
            return await self._form((0, row), round_, deadline, expected=expect)
        if layout.rows:
            return await self._form(
                (0, plan.row_for_joiner(self._rng, reachable=reachable)), round_, deadline
            )
        # Nobody is in the directory yet: a swarm starting all at once. One of the rows that
        # the DHT's size calls for, at random, so that no key holds the whole swarm (every
        # reader of such a key reads all of it, several times); while a row's key is full
        # (nobody else kept our announcement), one of the overflow rows past those.
        near = self._directory_near
        if near is not None and near[0] == round_:
            # The swarm's size as the peers closest to the directory's key show it: every
            # peer starting cold has just read that key and found the same peers around it,
            # so every peer judges the same size and picks among the same cold rows (judged
            # from each peer's own routing table, the estimates spread over 0.6-2x, and a
            # peer that judged high could be alone in a row nobody else picked).
            estimate = estimate_size_around(key_id(directory_key(self.run_id).encode()), near[1])
        else:
            estimate = self._own_estimate()
        rows = cold_start_rows(estimate, self._rng, self.target_group_size)
        # Everyone else is starting cold too, reading over the spread: wait for them all to
        # announce before judging who is here (COLD_SETTLE).
        settle = began + self._spread + COLD_SETTLE
        # ... and, in a crowd, until the last reader's announcement could have landed: it
        # read by the end of the spread, taking about as long as our read, then stored,
        # taking about as long as our store (the matchmaker adds that): at 1024 peers a
        # store took a second, and views judged complete at the spread plus COLD_SETTLE
        # missed the last few announcers (their keys were cut in different places).
        landed = began + self._spread + self._read_took
        for attempt, row in enumerate(rows, 1):
            try:
                return await self._form(
                    (0, row),
                    round_,
                    deadline,
                    overflow=attempt < COLD_ATTEMPTS,
                    settle_until=settle,
                    announcing_until=landed,
                )
            except KeyFull:
                continue
        return None

    def _own_estimate(self) -> int:
        """The swarm's size as this peer's routing table shows it (``estimate_size``)."""
        dht = self.peer.dht
        k = dht.settings.k
        nearest = [c.peer_id.to_bytes() for c in dht.table.closest(self.peer.id, k)]
        return estimate_size(self.peer.id.to_bytes(), nearest, k)

    async def _form(
        self,
        key: GroupKey,
        round_: int,
        deadline: float,
        *,
        overflow: bool = False,
        expected: int | None = None,
        settle_until: float | None = None,
        announcing_until: float | None = None,
    ) -> GroupInfo | None:
        self.key = key
        self.announcement = group_key_name(self.run_id, key, round_)
        return await self.matchmaker.form_group(
            self.announcement,
            round_,
            key,
            self._most,
            deadline,
            balance=True,
            raise_if_unseen=overflow,
            # (a plan that expects nobody here, as for a peer it has not placed: no hint)
            expected=expected or None,
            settle_until=settle_until,
            announcing_until=announcing_until,
        )

    async def _record_row(
        self, row: int, round_: int, group_id: bytes, members: list[MemberInfo]
    ) -> None:
        self.row = row
        me = self.peer.id.to_bytes()
        ids = sorted(m.peer_id for m in members) or [me]
        self._row_group = (group_id, ids.index(me))
        # Who reads the directory for the group next round: its first member that listens
        # (everyone can call it). The others ask it; nobody when nobody listens.
        reader = min(
            (m for m in members if not m.client_mode), key=lambda m: m.peer_id, default=None
        )
        if reader is not None and len(members) > 1:
            if reader.peer_id == me:
                others = frozenset(m.peer_id for m in members if m.peer_id != me)
                self._dir_share = _DirectoryShare(round_ + 1, others)
            else:
                self._dir_source = (round_ + 1, reader)
        if ids[0] != me:
            return
        by_id = {m.peer_id: not m.client_mode for m in members}
        listens = [by_id.get(i, self.peer.address is not None) for i in ids]
        record = RowRecord(row, round_, group_id, len(ids), sum(listens), listening_bits(listens))
        ttl = min(300.0, max(30.0, 8 * (self.round_period or 0.0)))
        try:
            await self.peer.dht.store(directory_key(self.run_id), encode_record(record), ttl=ttl)
        except MoshpitError as exc:
            self.log.info("could not record the row group", error=str(exc))

    async def step(self, weight: float = 1.0, timeout: float = 30.0) -> RoundReport:
        """One round: form a group, average with it, rotate the key. Returns by ``timeout``."""
        if not self._entered:
            raise ConfigError("use the averager as `async with averager:` before step()")
        if not isinstance(weight, int | float) or not np.isfinite(weight) or not weight > 0:
            raise ConfigError(f"weight must be a positive number, got {weight!r}")
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigError(f"timeout must be positive seconds, got {timeout!r}")
        await self.wait_for_round()
        self._slot_reached = False
        try:
            return await self._step(weight, timeout)
        finally:
            self.announcement = None

    async def _step(self, weight: float, timeout: float) -> RoundReport:
        start = trio.current_time()
        deadline = start + timeout
        round_ = self.round
        matchmaking_deadline = start + self.matchmaking_fraction * timeout
        if self.grid is None and self.row is None:
            # No row (a cold start, or a joiner): the directory read waits a part of the read
            # spread first (cold_read_spread), and a cold key's gathering waits for the
            # spread to end. Those seconds are the crowd's, not matchmaking's: add them,
            # from what the reduction would have had, at most half of it.
            spread = cold_read_spread(self._own_estimate())
            matchmaking_deadline += min(spread, (deadline - matchmaking_deadline) / 2)
        group: GroupInfo | None = None
        with trio.move_on_at(deadline):
            if self.grid is None:
                group = await self._auto_group(round_, matchmaking_deadline)
            else:
                self.announcement = group_key_name(self.run_id, self.key, round_)
                group = await self.matchmaker.form_group(
                    self.announcement,
                    round_,
                    self.key,
                    self.grid.shape[round_ % self.grid.d],
                    matchmaking_deadline,
                )
        key = self.key
        formed = trio.current_time()
        if group is not None and len(group.members) > 1:
            # Daemons and their tests watch for this line: from here on the peer is in a group.
            self.log.info("group formed", round=round_, group=len(group.members))
        flat = flatten(self.tensors, self.layout, out=self._flat)
        spans: tuple[SpanReport, ...] = ()
        excluded: dict[PeerID, str] = {}
        lost: dict[PeerID, str] = {}
        sent = received = 0
        if group is not None and len(group.members) > 1:
            reduce = AllReduce(
                group,
                self.peer.id,
                flat,
                float(weight),
                codec_name=self.codec_name,
                max_norm=self.max_norm,
                borrow_flat=True,
                in_place=False,
                pace=self.pace,
            )
            self._rounds.add(reduce)
            try:
                reduce_deadline = formed + (deadline - formed) / 2
                bandwidth = min(m.bandwidth for m in group.members)
                if all(m.client_mode for m in group.members):
                    # Nobody listens: every byte goes through a relay, paced to its circuit
                    # rate and queued in its streams' windows; a ping waits behind that.
                    bandwidth = min(bandwidth, RELAYED_BANDWIDTH)
                silence = reduce.progress_timeout(
                    window=max(deadline - formed, 1e-3),
                    bandwidth=bandwidth,
                    stream_chunk=self.peer.transport.limits.connection.stream_chunk,
                )
                spans = tuple(
                    await reduce.run(
                        self.peer.transport,
                        self.run_id,
                        reduce_deadline,
                        deadline,
                        progress_timeout=silence,
                    )
                )
            finally:
                self._rounds.remove(reduce)
            ids = group.peer_ids
            excluded = {ids[i]: why for i, why in reduce.excluded.items()}
            lost = {ids[i]: why for i, why in reduce.lost.items()}
            sent, received = reduce.bytes_sent, reduce.bytes_received
            # The averages go straight from the pieces they arrived in into the tensors.
            write_pieces(self.tensors, self.layout, reduce.pieces)
            members = tuple(ids)
            index = group.index_of(self.peer.id)
            group_id: bytes | None = group.group_id
        else:
            members, index, group_id = (self.peer.id,), 0, None
        solo_id = hashlib.sha256(b"solo" + self.peer.id.to_bytes() + round_.to_bytes(8, "big"))
        if self.grid is not None:
            c = within_group_index(
                solo_id.digest() if group_id is None else group_id,
                list(members),
                self.peer.id,
                self.grid,
                round_,
                rule=self.index_rule,
            )
            self.key = next_key(self.grid, key, c, round_)
        elif key[:1] == (0,):
            # A row round: our place in the row is where this group put us; the group's first
            # member writes the group into the run's directory, which next rounds read.
            with trio.move_on_at(deadline):
                await self._record_row(
                    key[1],
                    round_,
                    solo_id.digest()[:16] if group is None or len(members) < 2 else group.group_id,
                    [] if group is None or len(members) < 2 else list(group.members),
                )
        self.round = round_ + 1
        end = trio.current_time()
        report = RoundReport(
            round=round_,
            group_id=group_id,
            members=members,
            index=index,
            key_before=key,
            key_after=self.key if self.grid is not None else (0, self.row or 0),
            spans=spans,
            excluded=excluded,
            bytes_sent=sent,
            bytes_received=received,
            seconds={
                "matchmaking": formed - start,
                "allreduce": end - formed,
                "total": end - start,
            },
            lost=lost,
        )
        self.log.info(
            "round done",
            round=round_,
            group=len(members),
            succeeded=report.succeeded,
            seconds=round(end - start, 3),
        )
        return report
