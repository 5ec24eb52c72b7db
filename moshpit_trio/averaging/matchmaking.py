"""Group formation for one averaging round, over the DHT, under a deadline.

Every peer of a round announces itself under the round's group key ``mp.avg/RUN/ROUND/KEY`` as
an owned record (only it can write or withdraw its entry) whose expiration is the time by which
it wants its group to start. Then:

1. it reads the key until it sees a full group (M entries), or two reads a poll apart show the
   same announcers, or its gather time is up (the first read waits as long as its own store
   took, at most a poll, for the others' stores to land; on a cold key, which no count can
   end, until its settle). A peer that is one of the key's replicas and finds a full group in
   its own copy (at once, or as the others' stores land there during that wait) reads
   nothing. Peers the transport found unresponsive (silent when asked, ``wire.liveness``)
   are left out;
2. the announcers are ordered by (expiration, PeerID) — the same order for everyone who sees
   them. Leaders come from the listening peers, in that order, then from the relayed ones
   (client mode, holding a relay reservation: reached through the relay, so they lead only
   where nobody listens); a client-mode peer without a relay, which nobody can reach, never
   leads;
3. it asks the leaders before itself in that order to take it, the earliest first (a
   client-mode peer without a relay asks every one: it never leads, so it waits on nobody's
   decision); a candidate that is full, follows someone else, or is gone says so (or fails), and
   it asks the next. While it waits for an answer it watches the candidate: one that goes
   silent for the progress timeout, or whose connection ends, is given up at once;
4. when no earlier candidate takes it, it leads: it accepts joins until the group is full, or
   until every announcer that would come to it (the later ones, and the client-mode ones) has
   joined or is found gone (it probes them), or its deadline comes. Then it fixes the group (a
   fresh id, a shuffled member order), answers every waiting join with it, and returns it
   once those answers are sealed for the wire (its all-reduce would otherwise go first).

With ``balance`` (``grid="auto"``) a key may hold more announcers than one group takes: the
order is then cut into blocks of sizes differing by at most one (``auto_grid.group_sizes``), and
a peer asks only the earlier members of its own block; a block's first member leads it. The
gathering then ends only when reads agree, or when as many as the plan expects are in, so that
every reader cuts the same announcers alike.

Nobody ever waits on a later peer, so two peers can never wait on each other. A peer asked to
lead while it has not decided yet answers once it has. A leader that dies or freezes is given
up by its followers within the progress timeout, and they go on down the order, or lead, or
round alone. Finding nobody by the deadline gives ``None``: a solo round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import trio

from ..dht.records import Record
from ..errors import ConfigError, MoshpitError, Rejected
from ..identity import PeerID
from ..log import get_logger
from ..wire.address import InvalidAddress, PeerAddress
from ..wire.connection import Request
from ..wire.liveness import MIN_PROGRESS_TIMEOUT
from ..wire.relay_table import RelayLimits
from .auto_grid import block_of, capacity_at

__all__ = [
    "ANSWERS_WAIT",
    "RELAYED_BANDWIDTH",
    "RELAYED_GROUP_MAX",
    "GroupInfo",
    "KeyFull",
    "Matchmaker",
    "MemberInfo",
    "group_id_of",
]


#: the largest group a relayed peer leads: every member of a group nobody listens in reaches
#: every other through a relay, one circuit each, and a relay grants 16 circuits a peer by
#: default (``RelayLimits.max_circuits_per_peer``; also one connection's incoming streams)
RELAYED_GROUP_MAX = RelayLimits().max_circuits_per_peer
#: bytes/s a group nobody listens in counts on per member when it judges silence: a relay's
#: default circuit rate (``RelayLimits.circuit_bytes_per_s``)
RELAYED_BANDWIDTH = RelayLimits().circuit_bytes_per_s
#: seconds a leader waits, at most, for its answers to the joins to be sealed before it hands
#: its group to the all-reduce (they are sealed within a millisecond or so unless queued behind
#: bulk data)
ANSWERS_WAIT = 0.05


class KeyFull(MoshpitError):
    """Nobody else kept our announcement (the key holds as many entries as the DHT allows, or
    no replica answered): nobody reading the key would see us. Raised only when asked to."""


class MemberInfo(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a peer tells its group about itself (and announces in the DHT)."""

    peer_id: bytes
    #: "" for a client-mode peer (reached over the connection it opened, or through a relay)
    address: str
    bandwidth: float
    client_mode: bool
    #: a client-mode peer that holds a relay reservation: others can reach it through the
    #: relays it published (``relays.py``), so it may lead and reduce when nobody listens
    relayed: bool = False

    @property
    def can_lead(self) -> bool:
        return not self.client_mode or self.relayed

    @property
    def target(self) -> str | PeerID:
        """How to call it: its address, or (client-mode) its PeerID, which the transport
        reaches over the connection the peer opened or through its relays."""
        return PeerID(self.peer_id) if self.client_mode else self.address


class GroupInfo(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """A fixed group, as its leader sent it to every member."""

    group_id: bytes
    round: int
    key: tuple[int, ...]
    members: tuple[MemberInfo, ...]
    leader: bytes

    def index_of(self, peer: PeerID) -> int:
        for i, m in enumerate(self.members):
            if m.peer_id == peer.to_bytes():
                return i
        raise ValueError(f"{peer.short} is not in group {self.group_id.hex()[:8]}")

    @property
    def peer_ids(self) -> list[PeerID]:
        return [PeerID(m.peer_id) for m in self.members]


class _Join(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    round: int
    key: tuple[int, ...]
    member: MemberInfo


_encode = msgspec.msgpack.Encoder().encode
_join_decoder = msgspec.msgpack.Decoder(_Join)
_group_decoder = msgspec.msgpack.Decoder(GroupInfo)
_member_decoder = msgspec.msgpack.Decoder(MemberInfo)


@dataclasses.dataclass(eq=False)
class _Attempt:
    """This peer's matchmaking for one (round, key): decided yet? leading? whom?"""

    round: int
    key: tuple[int, ...]
    capacity: int
    #: the largest group this peer accepts (capacity may shrink to balance a key's groups)
    max_capacity: int = 0
    #: cut a key's announcers into balanced blocks (``form_group``'s ``balance``)
    balance: bool = False
    #: raise KeyFull when nobody else kept our announcement
    raise_if_unseen: bool = False
    #: stop gathering once this many announced
    enough: int = 0
    decided: trio.Event = dataclasses.field(default_factory=trio.Event)
    leading: bool = False
    closed: bool = False
    followers: list[MemberInfo] = dataclasses.field(default_factory=list)
    #: as a leader: the join calls we took, whose answers go out once the group is fixed
    joins: list[Request] = dataclasses.field(default_factory=list)
    #: set when the group need not wait any longer: full, or everyone expected is in or gone
    full: trio.Event = dataclasses.field(default_factory=trio.Event)
    #: as a leader: the announcers that would come to us and have not joined yet
    expected: set[bytes] = dataclasses.field(default_factory=set)
    fixed: trio.Event = dataclasses.field(default_factory=trio.Event)
    group: GroupInfo | None = None


class Matchmaker:
    """Forms groups for one averager (one run) of one peer; see the module docstring."""

    def __init__(
        self,
        peer: Any,
        run_id: str,
        *,
        bandwidth: float,
        min_group_size: int = 2,
        poll_interval: float = 0.2,
        progress_timeout: float = MIN_PROGRESS_TIMEOUT,
    ) -> None:
        if not bandwidth > 0:
            raise ConfigError(f"bandwidth must be positive, got {bandwidth!r}")
        if min_group_size < 1:
            raise ConfigError("min_group_size must be at least 1")
        self.peer = peer
        self.run_id = run_id
        self.min_group_size = min_group_size
        self.poll_interval = poll_interval
        #: silence from a candidate or an expected joiner for this long: it is gone
        self.progress_timeout = progress_timeout
        self.join_name = f"avg.{run_id}.join"
        self.bandwidth = float(bandwidth)
        self.me = self._describe_me()
        self.log = get_logger(peer=peer.id.short, run=run_id)
        self._attempt: _Attempt | None = None

    def _describe_me(self) -> MemberInfo:
        return MemberInfo(
            peer_id=self.peer.id.to_bytes(),
            address="" if self.peer.address is None else str(self.peer.address),
            bandwidth=self.bandwidth,
            client_mode=self.peer.address is None,
            relayed=self.peer.address is None
            and bool(self.peer.transport.relay.live_reservations()),
        )

    def register(self) -> None:
        self.peer.transport.register(self.join_name, self._on_join)

    def unregister(self) -> None:
        self.peer.transport.registry.unregister(self.join_name)

    # -- one round ---------------------------------------------------------------------------

    async def form_group(
        self,
        dht_key: str,
        round: int,
        key: tuple[int, ...],
        capacity: int,
        deadline: float,
        *,
        balance: bool = False,
        raise_if_unseen: bool = False,
        expected: int | None = None,
        settle_until: float | None = None,
        announcing_until: float | None = None,
    ) -> GroupInfo | None:
        """Find or lead a group of at most ``capacity`` under ``dht_key`` by ``deadline``
        (trio time); ``None`` when none formed (a solo round).

        ``balance``: cut the announcers into groups of sizes differing by at most one
        (``auto_grid.group_sizes``: 33 announcers and a capacity of 32 make 17 + 16, not 32
        and a solo peer): a leader fills the group that starts at its place in the order.
        ``raise_if_unseen``: raise :class:`KeyFull` when no other peer kept our announcement,
        instead of waiting for a group nobody can see us in. ``expected``: how many peers are
        expected under the key (``auto_grid``'s plan knows): once that many have announced, the
        gathering is over without waiting for a second read to agree. ``settle_until``
        (trio time): before then, two reads alike do not end the gathering (announcers are
        still coming: a cold start's peers read and announce spread over time).
        ``announcing_until`` (trio time): others may start to announce until then; nor do two
        reads alike end the gathering before their announcements could have landed, judged
        by how long our own store took."""
        # When to stop gathering: a full group (a fixed grid's key holds one), the number the
        # plan expects; with balance and no expectation, only reads that agree (a key may hold
        # several groups, and every reader must see all of them to cut them alike).
        if expected is not None:
            enough = max(1, min(expected, capacity))
        else:
            enough = 1 << 30 if balance else capacity
        # Whether we hold a relay reservation changes over time: say so as it is this round.
        self.me = self._describe_me()
        attempt = _Attempt(
            round,
            key,
            capacity,
            max_capacity=capacity,
            balance=balance,
            raise_if_unseen=raise_if_unseen,
            enough=enough,
        )
        self._attempt = attempt
        try:
            with trio.move_on_at(deadline):
                return await self._form(attempt, dht_key, deadline, settle_until, announcing_until)
            return self._close(attempt)
        finally:
            attempt.closed = True
            attempt.decided.set()
            attempt.fixed.set()
            if self._attempt is attempt:
                self._attempt = None

    async def _form(
        self,
        attempt: _Attempt,
        dht_key: str,
        deadline: float,
        settle_until: float | None = None,
        announcing_until: float | None = None,
    ) -> GroupInfo | None:
        started = trio.current_time()
        dht = self.peer.dht
        ttl = max(deadline - trio.current_time(), 0.5)
        replicas = self._replicas(attempt)
        held = await dht.store(
            dht_key, _encode(self.me), ttl=ttl, replicas=replicas, lookup=replicas is None
        )
        if announcing_until is not None:
            landed = announcing_until + (trio.current_time() - started)
            settle_until = landed if settle_until is None else max(settle_until, landed)
        if attempt.raise_if_unseen and held <= (0 if self.me.client_mode else 1) and len(dht.table):
            raise KeyFull(f"nobody else kept our announcement under {dht_key!r}")
        # Gather: read until a full group has announced, or the announcers stopped changing
        # (peers of a run start on the same clock slot, so the ones coming are there within a
        # store's time), or half the time is gone.
        gather_until = trio.current_time() + (deadline - trio.current_time()) / 2
        counted = attempt.enough <= attempt.max_capacity and settle_until is None
        # We may be one of the key's replicas ourselves (in a swarm of a few peers, everyone
        # is). The others began on the same clock slot and stored on us while we stored on
        # them, so by now our own copy may show a full group: then the wait and the read
        # below would only fetch what we hold (3 of the 6 round trips a 4-peer round's
        # matchmaking took). Only on a fixed grid's key, which holds one group: a key cut
        # into several (balance) must be seen alike by every reader, and a read merges what
        # several replicas hold where our copy is one replica's.
        here = (
            self._members_of(dht.held_here(dht_key), started)
            if counted and not attempt.balance
            else []
        )
        if len(here) >= attempt.enough:
            announced = here
        else:
            announced = await self._gather(
                attempt, dht_key, started, gather_until, counted, settle_until
            )
        # Our own place in the order is where our record stands, as everyone else sees it.
        mine = [i for i, (_, m) in enumerate(announced) if m.peer_id == self.me.peer_id]
        place = mine[0] if mine else len(announced)
        # Our block: with one group under the key, all of it; with more (balance), the group
        # that our place falls in when the announcers are cut as group_sizes says.
        block = (0, len(announced) + 1)
        if attempt.balance and announced and all(m.client_mode for _, m in announced):
            # Nobody here listens: groups go through relays, within what a relay grants each
            # peer (everyone sees the same announcers, so everyone cuts the same blocks).
            attempt.max_capacity = min(attempt.max_capacity, RELAYED_GROUP_MAX)
            attempt.capacity = min(attempt.capacity, attempt.max_capacity)
        if attempt.balance and len(announced) > attempt.max_capacity:
            # Should we lead, the peers before us filled the groups before ours. (One group:
            # room up to the maximum, for a late announcer too.)
            attempt.capacity = capacity_at(place, len(announced), attempt.max_capacity)
            block = block_of(place, len(announced), attempt.max_capacity)
        first, end = block
        # Who may lead, in the order they would: the block's listening members, then its
        # relayed ones (reached through a relay: they lead only a block nobody listens in).
        # A client-mode peer without a relay never leads.
        in_block = [m for _, m in announced[first:end]]
        leaders = [m for m in in_block if not m.client_mode] + [m for m in in_block if m.relayed]
        if self.me.can_lead:
            # Only our block's earlier leaders: the blocks before ours are other groups (full,
            # when we all see the same announcers), and asking each of their members in turn
            # would cost a round trip each, hundreds at a cold start.
            ids = [m.peer_id for m in leaders]
            rank = ids.index(self.me.peer_id) if self.me.peer_id in ids else len(ids)
            candidates = leaders[:rank]
        else:
            # We never lead, so we wait on nobody's decision but a leader's: any announcer
            # that can lead may take us, our block's first, then the earliest.
            others = [m for _, m in [*announced[:first], *announced[end:]]]
            candidates = [
                *leaders,
                *[m for m in others if not m.client_mode],
                *[m for m in others if m.relayed],
            ]
            rank = len(leaders)
        # Decided, as far as peers asking us to lead are concerned: we follow (or try to). If
        # every earlier candidate turns us away we lead after all, and take joins from then on.
        attempt.decided.set()
        for leader in candidates:
            group = await self._join(leader, attempt, deadline)
            if group is not None:
                return group
        if not self.me.can_lead:
            return None  # nobody can reach us unasked: we cannot lead
        # Nobody earlier took us: lead; from now on joins are accepted. We wait for those that
        # would come to us (our block's later leaders and its members that cannot lead go
        # down the same order and reach us; client-mode ones without a relay ask every
        # leader of the key), not for a capacity nobody may fill.
        attempt.leading = True
        if self.me.client_mode:
            attempt.capacity = min(attempt.capacity, RELAYED_GROUP_MAX)
        if attempt.capacity <= 1:
            return self._close(attempt)
        later = {m.peer_id for m in leaders[rank + 1 :]}
        attempt.expected = {
            m.peer_id
            for k, (_, m) in enumerate(announced)
            if m.peer_id != self.me.peer_id
            and ((first <= k < end and m.peer_id in later) or not m.can_lead)
        } - {f.peer_id for f in attempt.followers}
        self._check_ready(attempt)
        # Fix the group a little before the deadline, so that the answer reaches followers
        # whose own deadlines are only slightly later than ours.
        with trio.move_on_at(deadline - self.fix_margin(deadline)):
            async with trio.open_nursery() as nursery:
                for _, m in announced:
                    if m.peer_id in attempt.expected:
                        nursery.start_soon(self._expect, attempt, m)
                await attempt.full.wait()
                nursery.cancel_scope.cancel()
        group = self._close(attempt)
        if group is not None:
            # Our caller goes on to copy the whole vector (flatten: milliseconds of CPU that no
            # task here can interrupt) and to start the all-reduce, whose parts share the
            # connections the answers go out on. Every follower waits on its answer to start,
            # so let the answers go first: on loopback they reached the followers 5 to 14 ms
            # after the group was fixed, behind the copy and the first parts. Sealing is local
            # (no round trip), so this takes a moment; an answer queued behind another run's
            # bulk data on its connection is not waited for past ANSWERS_WAIT, which would
            # hold up the whole group for it. (A call that ends unanswered counts as answered.)
            with trio.move_on_at(min(deadline, trio.current_time() + ANSWERS_WAIT)):
                for join in attempt.joins:
                    await join.answered.wait()
        return group

    def _replicas(self, attempt: _Attempt) -> int | None:
        """On how many peers to store our announcement, with no lookup first: every peer we
        know, when all of them and us fit in one group under a fixed grid's key; else None
        (the DHT's own number, found by a lookup).

        Why every peer: a peer that is one of the key's replicas decides from its own copy the
        moment it holds a full group (``_full_here``); any other waits as long as its store
        took and then reads the key. With eight peers and five replicas, three of the eight
        read, and the group waited for them: 58-67 ms of matchmaking on loopback. A swarm
        that fits in one group is small, so storing on all of it costs a few calls more.
        Why no lookup: it could only find peers we do not know, and took 13 ms of the 40 of
        matchmaking among eight processes on two cores. A peer we do not know (a newcomer)
        has no copy of our announcement: it reads the key, as a peer outside the replicas
        always did."""
        if attempt.balance:
            return None  # a key cut into groups is read anyway (every reader must see it alike)
        dht = self.peer.dht
        known = len(dht.table)
        if not known or known + 1 > attempt.max_capacity:
            return None
        return int(min(known, dht.settings.k))

    async def _gather(
        self,
        attempt: _Attempt,
        dht_key: str,
        started: float,
        gather_until: float,
        counted: bool,
        settle_until: float | None,
    ) -> list[tuple[float, MemberInfo]]:
        """Read the key until a count ends the gathering (``counted``: a full group, or the
        plan's), or two reads a poll apart agree (not before ``settle_until``), or
        ``gather_until``; the announcers of the last read."""
        if counted:
            # A count ends this gathering (a full group, or the plan's), and the others began
            # on the same clock slot and take about as long to store as we did: a read the
            # moment our store ends finds the key short of the ones still storing, and the
            # whole lookup is made again a poll later (at 256 peers two reads in three were).
            # Waiting as long again, at most a poll, first: 1.2 reads a round instead of 1.8,
            # a sixth fewer DHT calls, and the gathering ends no later than it did.
            stored = trio.current_time()
            wake = min(stored + min(stored - started, self.poll_interval), gather_until)
            if not attempt.balance:
                # One of the key's replicas (in a small swarm, every peer is) holds the
                # others' announcements as they land: a full group there ends the wait at
                # once, with no read. On loopback a leader whose copy lacked one announcement
                # at the end of its store waited 6 ms and read for 2 more, while the
                # announcement landed 1.4 ms after, and its whole group waited with it.
                full = await self._full_here(attempt, dht_key, started, wake)
                if full is not None:
                    return full
            await trio.sleep_until(wake)
        elif settle_until is not None and attempt.enough > attempt.max_capacity:
            # A cold key: only two reads alike, the second at the settle or after, end this
            # gathering, and the crowd is still announcing until then, so a read now would
            # only be the first of a pair that differs. The pair starts at the settle. (At
            # 256 peers a cold round made 3.5 reads a peer; this was one of them.)
            await trio.sleep_until(min(settle_until, gather_until))
        seen: set[bytes] | None = None
        while True:
            announced = await self._announced(dht_key, started)
            now_seen = {m.peer_id for _, m in announced}
            if (
                len(announced) >= attempt.enough
                or trio.current_time() >= gather_until
                or (
                    now_seen == seen
                    and len(announced) >= 2
                    and (settle_until is None or trio.current_time() >= settle_until)
                )
            ):
                break
            seen = now_seen
            wake = trio.current_time() + self.poll_interval
            if settle_until is not None and attempt.enough > attempt.max_capacity:
                # No count ends this gathering (a cold key: nobody knows how many will
                # come), only two reads alike, the second at the settle or after: a read
                # before then would be wasted, and a cold start has a thousand readers.
                wake = max(wake, settle_until)
            await trio.sleep_until(min(wake, gather_until))
        return announced

    async def _full_here(
        self, attempt: _Attempt, dht_key: str, started: float, until: float
    ) -> list[tuple[float, MemberInfo]] | None:
        """Our own copy of the key's announcers as soon as it holds a full group (looked at
        again each time a store lands here), or None at ``until``."""
        dht = self.peer.dht
        with trio.move_on_at(until):
            while True:
                landed = dht.store_landed()
                here = self._members_of(dht.held_here(dht_key), started)
                if len(here) >= attempt.enough:
                    return here
                await landed.wait()
        return None

    async def _expect(self, attempt: _Attempt, member: MemberInfo) -> None:
        """Stop waiting for an expected joiner once it is found gone: unreachable or silent
        (a listening one, probed), or not there within the progress timeout (a client-mode
        one, which nobody can probe)."""
        if member.client_mode:
            # (a relayed one could be probed through its relay, at the cost of a circuit
            # opened only to ask; it reaches us by itself if it is there)
            await trio.sleep(self.progress_timeout)
        else:
            await self.peer.transport.wait_silent(member.address, self.progress_timeout)
        attempt.expected.discard(member.peer_id)
        self._check_ready(attempt)

    def _check_ready(self, attempt: _Attempt) -> None:
        if len(attempt.followers) + 1 >= attempt.capacity or not attempt.expected:
            attempt.full.set()

    def fix_margin(self, deadline: float) -> float:
        return min(1.0, 0.1 * max(deadline - trio.current_time(), 0.0))

    async def _announced(self, dht_key: str, started: float) -> list[tuple[float, MemberInfo]]:
        """The live announcements under the key (ours included), in (expiration, PeerID)
        order: the same order for everyone who sees the same records. ``started``: when this
        round's matchmaking began here."""
        return self._members_of(await self.peer.dht.get_records(dht_key), started)

    def _members_of(
        self, records: dict[bytes, Record], started: float
    ) -> list[tuple[float, MemberInfo]]:
        """The live announcements among a key's ``records`` (ours included), in (expiration,
        PeerID) order; see :meth:`_announced`."""
        found: list[tuple[float, MemberInfo]] = []
        for subkey, record in records.items():
            if not record.value:
                continue
            try:
                member = _member_decoder.decode(record.value)
            except msgspec.DecodeError:
                continue
            if member.peer_id != subkey or not _usable(member):
                continue  # an announcement must describe its owner
            if member.peer_id != self.me.peer_id:
                since = self.peer.transport.unresponsive_since(PeerID(member.peer_id))
                if since is not None and since >= started:
                    # Silent when asked during this round: neither leader nor member until it
                    # answers. (A verdict from an earlier round is outdated by the peer's
                    # announcement in this one: it was alive to make it. Its silence then
                    # may have been a relay's that died, or a connection that broke.)
                    continue
            found.append((record.expiration, member))
        found.sort(key=lambda em: (em[0], em[1].peer_id))
        return found

    async def _join(
        self, leader: MemberInfo, attempt: _Attempt, deadline: float
    ) -> GroupInfo | None:
        timeout = deadline - trio.current_time()
        if timeout <= 0:
            return None
        request = _encode(_Join(attempt.round, attempt.key, self.me))
        transport = self.peer.transport
        raw: bytes | None = None
        failure: MoshpitError | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                # A leader holds our join until it fixes the group, answering pings
                # meanwhile; one that freezes or dies is given up at once.
                await transport.wait_silent(leader.target, self.progress_timeout)
                self.log.info("leader went silent", leader=leader.peer_id[:4].hex())
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                raw = await transport.call(leader.target, self.join_name, request, timeout=timeout)
            except MoshpitError as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if raw is None:
            self.log.debug(
                "leader did not take us", leader=leader.peer_id[:4].hex(), error=str(failure)
            )
            return None
        try:
            group = _group_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            self.log.debug(
                "leader did not take us", leader=leader.peer_id[:4].hex(), error=str(exc)
            )
            return None
        if not self._valid_group(group, attempt, leader):
            self.log.warning("leader sent an invalid group", leader=leader.peer_id[:4].hex())
            return None
        return group

    def _valid_group(self, group: GroupInfo, attempt: _Attempt, leader: MemberInfo) -> bool:
        ids = [m.peer_id for m in group.members]
        return (
            group.round == attempt.round
            and tuple(group.key) == attempt.key
            and group.leader == leader.peer_id
            and len(group.group_id) == 16
            and 1 <= len(ids) <= attempt.max_capacity
            and len(set(ids)) == len(ids)
            and self.me.peer_id in ids
            and leader.peer_id in ids
            and all(_usable(m) for m in group.members)
            and any(m.can_lead for m in group.members)
        )

    def _close(self, attempt: _Attempt) -> GroupInfo | None:
        """Stop taking joins; as a leader, fix the group (or disband if it is too small)."""
        attempt.closed = True
        if not attempt.leading or attempt.group is not None:
            attempt.fixed.set()
            return attempt.group
        members = [self.me, *attempt.followers]
        if len(members) >= max(self.min_group_size, 2):
            group_id = group_id_of(
                self.run_id, attempt.round, attempt.key, [m.peer_id for m in members]
            )
            random.Random(group_id).shuffle(members)
            attempt.group = GroupInfo(
                group_id=group_id,
                round=attempt.round,
                key=attempt.key,
                members=tuple(members),
                leader=self.me.peer_id,
            )
        attempt.fixed.set()
        return attempt.group

    # -- being asked to lead ---------------------------------------------------------------

    async def _on_join(self, request: Request) -> bytes:
        try:
            join = _join_decoder.decode(request.payload)
        except msgspec.DecodeError:
            raise Rejected("malformed join request") from None
        if join.member.peer_id != request.peer.to_bytes() or not _usable(join.member):
            raise Rejected("a join must describe the peer that sends it")
        attempt = self._attempt
        if attempt is None or attempt.round != join.round or attempt.key != tuple(join.key):
            raise Rejected("not matchmaking for that round and key")
        # Still gathering: answer once we know whether we lead or follow. A peer that follows
        # (or tries to) answers at once, so no join ever waits on a join: no cycles.
        await attempt.decided.wait()
        if not attempt.leading or attempt.closed:
            raise Rejected("not leading a group")
        if len(attempt.followers) + 1 >= attempt.capacity:
            raise Rejected("the group is full")
        if all(m.peer_id != join.member.peer_id for m in attempt.followers):
            attempt.followers.append(join.member)
        attempt.joins.append(request)
        attempt.expected.discard(join.member.peer_id)
        self._check_ready(attempt)
        await attempt.fixed.wait()
        if attempt.group is None:
            raise Rejected("the group was disbanded (too small)")
        return _encode(attempt.group)


def group_id_of(run_id: str, round: int, key: Sequence[int], member_ids: Iterable[bytes]) -> bytes:
    """The id a leader gives the group it fixes (SPEC.md, "Averaging: matchmaking and
    all-reduce"): the first 16 bytes of ``sha256("moshpit/1 group\\0" + run_id (UTF-8) +
    msgpack([round, key]) + the members' PeerIDs in ascending order)``.

    Derived, not drawn: the same group always gets the same id (reproducible runs), and no two
    groups share one (their members differ, or their run, round or key do)."""
    digest = hashlib.sha256(b"moshpit/1 group\x00" + run_id.encode())
    digest.update(_encode([round, list(key)]))
    for member_id in sorted(member_ids):
        digest.update(member_id)
    return digest.digest()[:16]


def _usable(member: MemberInfo) -> bool:
    # A bandwidth must be finite too: spans() refuses an infinite one, so a member announcing
    # inf would make every member's all-reduce fail to start (ConfigError out of step()).
    if len(member.peer_id) != 32 or not (math.isfinite(member.bandwidth) and member.bandwidth > 0):
        return False
    if member.client_mode:
        return member.address == ""
    if member.relayed:
        return False  # a listening peer is reached directly, never through a relay
    try:
        return PeerAddress.parse(member.address).peer_id.to_bytes() == member.peer_id
    except InvalidAddress:
        return False
