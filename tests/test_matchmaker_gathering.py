"""When a matchmaker's gathering ends, under the virtual clock, with a DHT that is only a
schedule: each announcement lands at a given moment, our own store takes a given time.

A cold key's gathering has no count that ends it (nobody knows how many will come), only two
reads alike, the second no earlier than the settle; ``announcing_until`` moves the settle to
when the last announcer could have landed, judged by how long our own store took. Reads
before the settle are skipped: at a cold start a thousand peers poll their keys."""

from __future__ import annotations

import types
from typing import Any

import msgspec
import pytest
import trio

from moshpit_trio.averaging.matchmaking import Matchmaker, MemberInfo
from moshpit_trio.dht.node import DHTSettings
from moshpit_trio.identity import Identity

STORE_TAKES = 1.0


def ident(i: int) -> Identity:
    return Identity.from_seed(i.to_bytes(32, "big"))


def _listening(i: int) -> MemberInfo:
    pid = ident(i).peer_id
    return MemberInfo(pid.to_bytes(), f"ws://h{i}:1/{pid}", 1e8, False)


class ScheduledDHT:
    """Announcements that land at given trio times; our own store takes ``STORE_TAKES``.
    ``replica``: we hold the key too, and the announcements land here when they land
    elsewhere (``held_here``; ``store_landed`` wakes then), except those in ``not_here``
    (stored on other replicas only)."""

    def __init__(
        self,
        landings: dict[int, float],
        store_takes: float = STORE_TAKES,
        replica: bool = False,
        not_here: frozenset[int] = frozenset(),
    ) -> None:
        self.landings = landings
        self.store_takes = store_takes
        self.replica = replica
        self.not_here = not_here
        self.reads: list[float] = []
        self.table: list[object] = []
        self.settings = DHTSettings()
        self.mine: dict[bytes, Any] = {}

    def held_here(self, key: str) -> dict[bytes, Any]:
        if not self.replica:
            return {}
        here = self._landed()
        for i in self.not_here:
            here.pop(_listening(i).peer_id, None)
        return here

    def store_landed(self) -> Any:
        now = trio.current_time()
        coming = [
            at
            for i, at in self.landings.items()
            if self.replica and at > now and i not in self.not_here
        ]

        async def wait() -> None:
            if coming:
                await trio.sleep_until(min(coming))
            else:
                await trio.sleep_forever()

        return types.SimpleNamespace(wait=wait)

    async def store(
        self, key: str, value: bytes, ttl: float, replicas: int | None = None, lookup: bool = True
    ) -> int:
        assert replicas is None and lookup  # an empty table: the DHT's own number, looked up
        await trio.sleep(self.store_takes)
        member = msgspec.msgpack.decode(value, type=MemberInfo)
        self.mine = {member.peer_id: types.SimpleNamespace(value=value, expiration=ttl)}
        return 5

    async def get_records(self, key: str) -> dict[bytes, Any]:
        self.reads.append(round(trio.current_time(), 9))
        return self._landed()

    def _landed(self) -> dict[bytes, Any]:
        now = trio.current_time()
        landed = {
            _listening(i).peer_id: types.SimpleNamespace(
                value=msgspec.msgpack.encode(_listening(i)), expiration=100.0 + i
            )
            for i, at in self.landings.items()
            if at <= now
        }
        return {**landed, **self.mine}


def _client_matchmaker(dht: ScheduledDHT) -> tuple[Matchmaker, list[tuple[float, int]]]:
    """A client-mode matchmaker (it never leads) whose joins only note when they were tried
    and how many announcers it saw: enough to see when and on what its gathering ended."""
    me = ident(99)
    transport = types.SimpleNamespace(
        relay=types.SimpleNamespace(live_reservations=list), unresponsive_since=lambda p: None
    )
    peer = types.SimpleNamespace(id=me.peer_id, address=None, transport=transport, dht=dht)
    matchmaker = Matchmaker(peer, "cold", bandwidth=1e8)
    tried: list[tuple[float, int]] = []

    async def join(leader: MemberInfo, attempt: Any, deadline: float) -> None:
        tried.append((round(trio.current_time(), 9), len(dht.reads)))

    matchmaker._join = join  # type: ignore[method-assign]
    return matchmaker, tried


# (announcing_until, the reads' times, how many others the last read saw)
SCENARIOS = [
    # the floor alone (settle 1.05): the first read waits for it (our store ended at 1.0), the
    # next a poll later agrees, and the announcer landing at 2.6 (a slow store in a crowd) is
    # missed
    pytest.param(None, [1.05, 1.25], 2, id="settle floor only"),
    # its reader finished reading at 1.6 and its store took as long as ours: wait to 2.6
    pytest.param(1.6, [2.6, 2.8], 3, id="until the last could land"),
    # announcing ended long ago: the floor rules
    pytest.param(0.0, [1.05, 1.25], 2, id="announcing long over"),
]


@pytest.mark.parametrize(("announcing_until", "reads", "seen"), SCENARIOS)
async def test_when_a_cold_gathering_ends(
    autojump_clock: Any, announcing_until: float | None, reads: list[float], seen: int
) -> None:
    dht = ScheduledDHT({1: 0.5, 2: 1.0, 3: 2.6})
    matchmaker, tried = _client_matchmaker(dht)
    start = trio.current_time()
    assert start == 0.0
    group = await matchmaker.form_group(
        "mp.avg/cold/0/0.65536",
        0,
        (0, 65536),
        32,
        deadline=8.0,
        balance=True,
        settle_until=1.05,
        announcing_until=announcing_until,
    )
    assert group is None  # nobody took it (the joins here only take notes)
    assert dht.reads == reads
    # every other announcer it saw was asked in turn, right after the last read
    assert [t for t, _ in tried] == [reads[-1]] * seen
    assert all(n == len(reads) for _, n in tried)


async def test_a_count_that_can_end_it_is_still_polled_for(autojump_clock: Any) -> None:
    """With an expected count (a planned key), reads go on every poll interval before the
    settle: the count may be reached any moment, and ends the gathering at once."""
    dht = ScheduledDHT({1: 0.5, 2: 1.0, 3: 1.3})
    matchmaker, tried = _client_matchmaker(dht)
    await matchmaker.form_group(
        "mp.avg/cold/1/0.3",
        1,
        (0, 3),
        32,
        deadline=8.0,
        balance=True,
        expected=4,
        settle_until=5.0,
    )
    assert dht.reads == [1.0, 1.2, 1.4]
    assert [t for t, _ in tried] == [1.4] * 3


# (how long our store takes, when the others' announcements land, balance, expected, the reads'
# times); a capacity of 4 and a poll interval of 0.2 s
COUNTED = [
    # everyone stored at once, some a little slower than us: one read a poll after our store
    # (it used to read at 1.0, find two of three, and read again at 1.2)
    pytest.param(1.0, {1: 0.5, 2: 1.0, 3: 1.1}, True, 4, [1.2], id="planned key, slow store"),
    # a store quicker than a poll: wait as long again, not a whole poll
    pytest.param(0.05, {1: 0.02, 2: 0.05, 3: 0.09}, True, 4, [0.1], id="planned key, quick"),
    # a fixed grid's key: a full group is the count
    pytest.param(1.0, {1: 0.5, 2: 1.0, 3: 1.1}, False, None, [1.2], id="grid key"),
    # the count never comes (a member is gone): two reads a poll apart that agree end it
    pytest.param(1.0, {1: 0.5, 2: 1.0}, True, 4, [1.2, 1.4], id="one short"),
    # the last announcer lands after the first read: read again a poll later
    pytest.param(1.0, {1: 0.5, 2: 1.0, 3: 1.3}, True, 4, [1.2, 1.4], id="one late"),
]


@pytest.mark.parametrize(("store", "landings", "balance", "expected", "reads"), COUNTED)
async def test_a_counted_key_is_first_read_after_the_others_stores(
    autojump_clock: Any,
    store: float,
    landings: dict[int, float],
    balance: bool,
    expected: int | None,
    reads: list[float],
) -> None:
    """Peers of a round announce on the same clock slot: a read made the moment our own store
    ends mostly finds the key short of those still storing, and a whole lookup is made again.
    With a count that ends the gathering, the first read waits as long as our store took (at
    most a poll); a cold key (``settle_until``) is not read before its settle anyway."""
    dht = ScheduledDHT(landings, store_takes=store)
    matchmaker, tried = _client_matchmaker(dht)
    await matchmaker.form_group(
        "mp.avg/run/2/0.1", 2, (0, 1), 4, deadline=8.0, balance=balance, expected=expected
    )
    assert dht.reads == reads
    assert [t for t, _ in tried] == [reads[-1]] * len(landings)


# (when the others' announcements land, those that land on other replicas only, balance,
# expected, the reads' times, when the gathering ended); we hold the key too, our store takes
# 1 s, a capacity of 4, a poll interval of 0.2 s
HELD_HERE = [
    # a fixed grid's key and every other member stored here by the end of our store: the
    # group is full in our own copy, no read at all
    pytest.param({1: 0.5, 2: 0.9, 3: 1.0}, set(), False, None, [], 1.0, id="full here"),
    # one not here yet: it lands here during the wait, which ends then, with no read (it
    # used to wait the whole 1 s our store took, then read)
    pytest.param({1: 0.5, 2: 0.9, 3: 1.1}, set(), False, None, [], 1.1, id="one lands here"),
    # one stored only on other replicas: our copy never fills, so wait, then read, as before
    pytest.param({1: 0.5, 2: 0.9, 3: 1.1}, {3}, False, None, [1.2], 1.2, id="one elsewhere"),
    # a key cut into groups (balance), even with a count: every reader must see it alike,
    # and a read merges several replicas' copies where ours is one; read as before
    pytest.param({1: 0.5, 2: 0.9, 3: 1.0}, set(), True, 4, [1.2], 1.2, id="balanced key"),
]


@pytest.mark.parametrize(
    ("landings", "not_here", "balance", "expected", "reads", "ended"), HELD_HERE
)
async def test_a_full_group_in_our_own_copy_ends_the_gathering_at_once(
    autojump_clock: Any,
    landings: dict[int, float],
    not_here: set[int],
    balance: bool,
    expected: int | None,
    reads: list[float],
    ended: float,
) -> None:
    """A peer that is one of its key's replicas (in a small swarm, all are) holds the others'
    announcements as soon as they land: a full group there needs no read, and ends the wait
    for the others' stores the moment it is full."""
    dht = ScheduledDHT(landings, store_takes=1.0, replica=True, not_here=frozenset(not_here))
    matchmaker, tried = _client_matchmaker(dht)
    await matchmaker.form_group(
        "mp.avg/run/2/0.1", 2, (0, 1), 4, deadline=8.0, balance=balance, expected=expected
    )
    assert dht.reads == reads
    # then it asks the three others to take it (it never leads), at once
    assert tried == [(ended, len(reads))] * 3
