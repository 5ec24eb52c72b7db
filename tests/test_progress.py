"""Swarm progress in the DHT: ProgressTracker, on the in-memory network under the virtual clock."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from moshpit_trio.averaging.allreduce import SpanReport
from moshpit_trio.averaging.averager import RoundReport
from moshpit_trio.dht.records import encode_records, make_record
from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.relays import MAX_RELAYS
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.training import PeerProgress, ProgressTracker, SwarmProgress
from moshpit_trio.training.progress import (
    MAX_PROGRESS_VALUE,
    decode_progress,
    encode_progress,
    fetch_progress,
)

from .test_averager import ident, swarm
from .test_averager_relayed import volunteers

RUN = "progresstest"
KEY = f"mp.progress/{RUN}"
LATENCY = 0.005


@asynccontextmanager
async def running(
    trackers: Sequence[ProgressTracker],
) -> AsyncIterator[trio.Nursery]:
    """Every tracker's run() in one nursery, started (first publication done)."""
    async with trio.open_nursery() as nursery:
        for t in trackers:
            await nursery.start(t.run)
        yield nursery
        nursery.cancel_scope.cancel()


def trackers_for(peers: Sequence[Peer], **kwargs: Any) -> list[ProgressTracker]:
    return [ProgressTracker(p, RUN, **kwargs) for p in peers]


async def test_records_are_published_and_seen_by_everyone(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    async with swarm(net, 5) as peers:
        trackers = trackers_for(peers[:4])
        for i, t in enumerate(trackers):
            t.report(samples=10 * (i + 1), step=i)
        for t in trackers:
            await t.refresh()
        for t in trackers:
            await t.refresh()  # everyone has now read everyone's publication
        for t in trackers:
            view = t.swarm
            assert view.live_peers == 4
            assert view.total_samples == 10 + 20 + 30 + 40
            assert {p.peer_id for p in view.peers} == {p.id for p in peers[:4]}
            by_id = {p.peer_id: p for p in view.peers}
            for i, p in enumerate(peers[:4]):
                assert (by_id[p.id].samples, by_id[p.id].step) == (10 * (i + 1), i)
                assert by_id[p.id].address == str(p.address)
        # a peer that only reads sees the same four records
        seen = await fetch_progress(peers[4], RUN)
        assert [p.peer_id for p in seen] == sorted(
            (p.id for p in peers[:4]), key=lambda x: x.to_bytes()
        )


async def test_the_epoch_advances_when_the_swarm_has_done_its_samples(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=2, latency=LATENCY)
    async with swarm(net, 3) as peers:
        trackers = trackers_for(peers, samples_per_epoch=100, publish_interval=5.0)
        async with running(trackers):
            for t in trackers:
                t.report(samples=30, step=1)
            # Two periods: in one, a peer may read just before another publishes.
            await trio.sleep(10.5)
            assert [t.epoch for t in trackers] == [0, 0, 0]
            assert trackers[1].swarm.epoch_progress == pytest.approx(0.9)
            assert trackers[1].swarm.epoch_samples == 90
            # 30 + 30 + 40 = 100: the peer that completes the epoch moves on at once
            start = trio.current_time()
            trackers[0].report(samples=10, step=2)
            assert trackers[0].epoch == 1
            own = trackers[0].swarm.peers
            assert next(p for p in own if p.peer_id == peers[0].id).samples_in_epoch == 0
            assert trackers[0].own.samples == 40  # the total is kept
            # ...and publishes at once, so the others follow at their next read
            await trackers[1].wait_for_epoch(1)
            await trackers[2].wait_for_epoch(1)
            assert trio.current_time() - start <= 5.0 + 0.5
            assert all(t.own.samples_in_epoch == 0 for t in trackers)


async def test_a_late_joiner_jumps_to_the_swarms_epoch(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=3, latency=LATENCY)
    async with swarm(net, 4) as peers:
        old = trackers_for(peers[:3], samples_per_epoch=1000)
        old[0].advance_to(7)
        for t in old:
            await t.refresh()
        late = ProgressTracker(peers[3], RUN, samples_per_epoch=1000)
        late.report(samples=999, step=1)  # not enough to finish epoch 0 on its own
        view = await late.refresh()
        assert late.epoch == 7 and view.epoch == 7
        assert late.own.samples_in_epoch == 0 and late.own.samples == 999


async def test_a_killed_peer_leaves_live_peers_when_its_record_expires(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=4, latency=LATENCY)
    async with swarm(net, 4) as peers:
        trackers = trackers_for(peers, publish_interval=5.0)  # ttl 15 s
        assert trackers[0].ttl == 15.0
        async with running(trackers):
            await trio.sleep(6.0)
            assert trackers[0].swarm.live_peers == 4
            net.kill("h3")
            killed_at = peers[0].dht.now()
            await trio.sleep(6.0)  # everyone read again; h3's last record is still live
            view = trackers[0].swarm
            assert view.live_peers == 4
            last = next(p for p in view.peers if p.peer_id == peers[3].id)
            assert last.time <= killed_at
            # it counts until exactly its expiration, then it is gone
            expires = last.time + 15.0
            await trio.sleep(expires - peers[0].dht.now() - 0.01)
            assert all(t.swarm.live_peers == 4 for t in trackers[:3])
            await trio.sleep(0.02)
            assert all(t.swarm.live_peers == 3 for t in trackers[:3])
            # the dead peer's own loop kept going without raising
            await trio.sleep(20.0)
            assert all(t.swarm.live_peers == 3 for t in trackers[:3])


async def test_withdraw_takes_a_peer_out_at_the_next_read(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=5, latency=LATENCY)
    async with swarm(net, 3) as peers:
        trackers = trackers_for(peers)
        for t in trackers:
            await t.refresh()
        await trackers[0].refresh()
        assert trackers[0].swarm.live_peers == 3
        await trackers[2].withdraw()
        await trackers[2].refresh()  # publishes nothing after a withdrawal
        assert (await trackers[0].refresh()).live_peers == 2


# -- records that are bad ---------------------------------------------------------------------


#: a record's fields in wire order, with harmless values; the first seven are the original ones
FIELDS: dict[str, Any] = {
    "epoch": 1,
    "samples_in_epoch": 5,
    "samples": 5,
    "step": 1,
    "samples_per_s": 1.0,
    "address": "",
    "time": 0.0,
    "loss": None,
    "started": None,
    "rounds_done": 0,
    "rounds_partial": 0,
    "rounds_solo": 0,
    "bytes_sent": 0,
    "bytes_received": 0,
    "last_round": None,
    "group": b"",
    "group_size": 0,
}


def value(**changes: Any) -> bytes:
    """A record value as an array: the original seven fields, and the later ones up to the
    last one changed (as a peer that knows only those would write it)."""
    assert set(changes) <= set(FIELDS)
    names = list(FIELDS)
    last = max([6, *(names.index(k) for k in changes)])
    fields = {**FIELDS, **changes}
    return msgspec.msgpack.encode([fields[k] for k in names[: last + 1]])


OTHER = Identity.from_seed(b"o" * 32).peer_id
BAD_VALUES: dict[str, bytes] = {
    "not msgpack": b"\xc1garbage",
    "a map, not an array": msgspec.msgpack.encode({"epoch": 99}),
    "too few fields": msgspec.msgpack.encode([99, 0, 0]),
    "a field past the last": msgspec.msgpack.encode(
        [99, 0, 0, 0, 0.0, "", 0.0, 1.0, 0.0, 0, 0, 0, 0, 0, 1, b"", 0, "extra"]
    ),
    "NaN loss": value(loss=math.nan),
    "infinite loss": value(loss=-math.inf),
    "started after it published": value(started=10.0),
    "NaN start": value(started=math.nan),
    "negative rounds": value(rounds_done=-1),
    "bytes beyond int64": value(bytes_sent=2**64 - 1),
    "group without a round": value(group=b"12345678"),
    "group tag too long": value(last_round=3, group=b"123456789"),
    "text for a group tag": value(last_round=3, group="<b>x</b>"),
    "negative epoch": value(epoch=-1),
    "epoch beyond int64": value(epoch=2**64 - 1),
    "float epoch": value(epoch=99.0),
    "NaN throughput": value(samples_per_s=math.nan),
    "negative throughput": value(samples_per_s=-1.0),
    "infinite time": value(time=math.inf),
    "address of another peer": value(address=f"ws://h9:1/{OTHER}"),
    "address that does not parse": value(address="http://nowhere"),
    "oversized": value(address="x" * 100) + bytes(MAX_PROGRESS_VALUE),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
async def test_bad_records_are_ignored_and_logged(
    autojump_clock: Any, case: str, logs: list[dict[str, Any]]
) -> None:
    net = MemoryNetwork(seed=6, latency=LATENCY)
    async with swarm(net, 3) as peers:
        honest = trackers_for(peers[:2])
        for t in honest:
            await t.refresh()
        # a peer of the swarm publishes nonsense under its own (validly signed) entry
        await peers[2].dht.store(KEY, BAD_VALUES[case], ttl=60)
        view = await honest[0].refresh()
        assert view.live_peers == 2 and view.epoch == 0
        assert peers[2].id not in {p.peer_id for p in view.peers}
        warnings = [e for e in logs if e["event"] == "ignored a bad progress record"]
        assert warnings and warnings[0]["owner"] == peers[2].id.short
        await honest[0].refresh()  # the same bad record is logged once, not at every read
        assert len([e for e in logs if e["event"] == "ignored a bad progress record"]) == len(
            warnings
        )


async def test_forged_records_never_reach_the_tracker(autojump_clock: Any) -> None:
    """A record for another peer's entry, signed by the forger, or carrying a victim's
    signature over other bytes: the DHT refuses both, so the victim's progress stands."""
    net = MemoryNetwork(seed=7, latency=LATENCY)
    async with swarm(net, 3) as peers:
        victim, forger, reader = peers
        t_victim = ProgressTracker(victim, RUN)
        t_victim.report(samples=5, step=5)
        await t_victim.refresh()
        now = forger.dht.now()
        honest = make_record(KEY.encode(), value(epoch=999), now + 60, owner=forger.identity)
        forged = [
            # the forger's signature on the victim's subkey
            msgspec.structs.replace(honest, subkey=victim.id.to_bytes()),
            # the victim's key and subkey, the forger's signature over other bytes
            msgspec.structs.replace(
                honest, subkey=victim.id.to_bytes(), owner_key=victim.identity.public_key
            ),
        ]
        for target in (victim, reader):
            answer = await forger.transport.call(
                target.address,
                "dht.store",
                msgspec.msgpack.encode([str(forger.address), encode_records(forged)]),
                timeout=2,
            )
            assert msgspec.msgpack.decode(answer) == [[False, False]]
        t_reader = ProgressTracker(reader, RUN)
        view = await t_reader.refresh()
        assert t_reader.epoch == 0
        by_id = {p.peer_id: p for p in view.peers}
        assert by_id[victim.id].step == 5 and forger.id not in by_id


async def test_the_epoch_never_goes_down(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=8, latency=LATENCY)
    async with swarm(net, 3) as peers:
        a, b, c = trackers_for(peers, samples_per_epoch=50)
        a.advance_to(5)
        await a.refresh()
        await b.refresh()
        assert b.epoch == 5
        # a restarted peer publishes epoch 0; nobody follows it down
        c.report(samples=10, step=1)
        await c.refresh()
        assert c.epoch == 5
        b.advance_to(3)
        assert b.epoch == 5
        epochs = [b.epoch]
        for _ in range(10):
            for t in (a, b, c):
                t.report(samples=20, step=1)
                await t.refresh()
            epochs.append(b.epoch)
        assert epochs == sorted(epochs) and epochs[-1] > 5


# -- pieces without a network -----------------------------------------------------------------


@given(
    epoch=st.integers(min_value=0, max_value=2**63 - 1),
    samples=st.integers(min_value=0, max_value=2**63 - 1),
    rate=st.floats(min_value=0, allow_infinity=False, allow_nan=False),
    client=st.booleans(),
)
def test_progress_values_round_trip(epoch: int, samples: int, rate: float, client: bool) -> None:
    me = Identity.from_seed(b"m" * 32).peer_id
    p = PeerProgress(
        me, epoch, samples, samples, epoch, rate, None if client else f"ws://h:1/{me}", 1.5
    )
    assert decode_progress(me.to_bytes(), encode_progress(p)) == p


@given(
    loss=st.none() | st.floats(allow_infinity=False, allow_nan=False),
    uptime=st.none() | st.floats(min_value=0, max_value=1e9),
    counts=st.lists(st.integers(min_value=0, max_value=2**63 - 1), min_size=5, max_size=5),
    last_round=st.none() | st.integers(min_value=0, max_value=2**63 - 1),
    group=st.binary(max_size=8),
    relays=st.integers(min_value=0, max_value=MAX_RELAYS),
)
def test_dashboard_fields_round_trip(
    loss: float | None,
    uptime: float | None,
    counts: list[int],
    last_round: int | None,
    group: bytes,
    relays: int,
) -> None:
    me = Identity.from_seed(b"m" * 32).peer_id
    p = PeerProgress(
        me,
        1,
        2,
        3,
        4,
        5.0,
        None,
        1e9,
        loss=loss,
        started=None if uptime is None else 1e9 - uptime,
        rounds_done=counts[0],
        rounds_partial=counts[1],
        rounds_solo=counts[2],
        bytes_sent=counts[3],
        bytes_received=counts[4],
        last_round=last_round,
        group=b"" if last_round is None else group,
        group_size=0 if last_round is None else len(group),
        relays=relays,
    )
    encoded = encode_progress(p)
    assert len(encoded) <= MAX_PROGRESS_VALUE
    assert decode_progress(me.to_bytes(), encoded) == p


@pytest.mark.parametrize(
    ("relays", "address", "why"),
    [
        (MAX_RELAYS + 1, "", "undecodable"),  # more than a relay record can list
        (-1, "", "undecodable"),
        (1, "listening", "relays claimed by a peer that listens"),
    ],
)
def test_a_record_claiming_impossible_relays_is_refused(
    relays: int, address: str, why: str
) -> None:
    me = Identity.from_seed(b"m" * 32).peer_id
    addr = f"ws://h:1/{me}" if address else ""
    fields = [0, 0, 5, 1, 1.0, addr, 1.0, None, None, 0, 0, 0, 0, 0, None, b"", 0, relays]
    with pytest.raises(ProtocolError, match=why):
        decode_progress(me.to_bytes(), msgspec.msgpack.encode(fields))


def test_more_reservations_than_a_relay_record_lists_are_counted_as_its_maximum() -> None:
    me = Identity.from_seed(b"m" * 32).peer_id
    p = PeerProgress(me, 0, 0, 0, 0, 0.0, None, 1.0, relays=MAX_RELAYS + 3)
    assert decode_progress(me.to_bytes(), encode_progress(p)).relays == MAX_RELAYS


async def test_a_relayed_volunteer_says_how_many_relays_hold_it(autojump_clock: Any) -> None:
    """What the dashboard shows as "relayed": the client-mode peer's own count of the relays
    holding a live reservation for it, read back from the DHT by another peer."""
    net = MemoryNetwork(seed=12, latency=LATENCY)
    async with (
        volunteers(net, 2, 1) as (relays, (relayed,)),
        open_peer(
            ident(150),
            listen=None,
            client_mode=True,
            network=net.host("c150"),
            bootstrap=[str(relays[0].address)],
        ) as unrelayed,
    ):
        reader = ProgressTracker(relays[0], RUN)
        for peer in (relayed, unrelayed, relays[1]):
            await ProgressTracker(peer, RUN).refresh()
        seen = {p.peer_id: p for p in (await reader.refresh()).peers}
        assert seen[relayed.id].relays == 2 and seen[relayed.id].address is None
        assert seen[unrelayed.id].relays == 0 and seen[unrelayed.id].address is None
        assert seen[relays[1].id].relays == 0 and seen[relays[1].id].address is not None
        # A reservation whose relay connection is gone holds nobody's way in: not counted.
        conn = relayed.transport.connection_to(relays[1].id)
        assert conn is not None
        await conn.aclose()
        assert relayed.transport.relay.live_reservations() == [relays[0].id]


def test_a_record_of_the_first_seven_fields_still_decodes() -> None:
    """Peers that publish only the original fields (or some of the later ones) are read, with
    the missing ones at their defaults."""
    me = Identity.from_seed(b"m" * 32).peer_id
    old = decode_progress(me.to_bytes(), value())
    assert (old.samples, old.loss, old.started, old.rounds_done, old.last_round) == (
        5,
        None,
        None,
        0,
        None,
    )
    partial = decode_progress(me.to_bytes(), value(loss=0.25, started=-5.0))
    assert (partial.loss, partial.started, partial.group) == (0.25, -5.0, b"")


async def test_the_record_carries_loss_rounds_and_bytes(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=10, latency=LATENCY)
    async with swarm(net, 3) as peers:
        trainer, reader = ProgressTracker(peers[0], RUN), ProgressTracker(peers[1], RUN)

        async def seen() -> PeerProgress:
            return {p.peer_id: p for p in (await reader.refresh()).peers}[peers[0].id]

        start = peers[0].dht.now()
        await trainer.refresh()
        first = await seen()
        assert (first.loss, first.last_round, first.rounds_done) == (None, None, 0)
        started = first.started
        assert started is not None and start <= started < start + 0.1  # at its first publication
        for step, loss in enumerate([2.0, 1.0, math.nan, 3.0], 1):
            trainer.report(samples=8, step=step, loss=loss)  # NaN: left out of the mean
        trainer.record_round(report(7, members=3, included=3))
        trainer.record_round(report(8, members=3, included=2))
        trainer.record_round(report(9, members=1, included=None))
        trainer.record_round(report(10, members=2, included=2, group=b"G" * 32))
        await trio.sleep(5.0)
        await trainer.refresh()
        record = await seen()
        assert record.loss == 2.0  # the mean of 2, 1 and 3
        assert (record.rounds_done, record.rounds_partial, record.rounds_solo) == (2, 1, 1)
        assert (record.last_round, record.group, record.group_size) == (10, b"G" * 8, 2)
        assert record.started == started and record.time > started + 5.0
        # bytes: what the transport counted when it published (its own store call not yet)
        assert 0 < record.bytes_sent <= peers[0].transport.bytes_sent
        assert 0 < record.bytes_received <= peers[0].transport.bytes_received
        # no new losses: the next record keeps the last mean instead of forgetting it
        await trainer.refresh()
        assert (await seen()).loss == 2.0
        trainer.report(samples=1, step=5, loss=0.5)
        await trainer.refresh()
        assert (await seen()).loss == 0.5


def report(
    round: int, *, members: int, included: int | None, group: bytes | None = None
) -> RoundReport:
    """A RoundReport of ``members`` members whose one span averages over ``included``."""
    ids = tuple(Identity.from_seed(bytes([i + 1]) * 32).peer_id for i in range(members))
    span = SpanReport(0, 10, ids[0], None if included is None else ids[:included])
    return RoundReport(
        round=round,
        group_id=None if members == 1 else (group or bytes([round]) * 32),
        members=ids,
        index=0,
        key_before=(0,),
        key_after=(0,),
        spans=(span,) if members > 1 else (),
        excluded={},
        bytes_sent=0,
        bytes_received=0,
        seconds={},
    )


@given(subkey=st.binary(min_size=32, max_size=32), data=st.binary(max_size=2000))
def test_progress_decoder_raises_only_protocol_errors(subkey: bytes, data: bytes) -> None:
    try:
        p = decode_progress(subkey, data)
    except ProtocolError as exc:
        assert exc.reason == "progress"
        return
    assert p.peer_id == PeerID(subkey) and p.epoch >= 0 and math.isfinite(p.samples_per_s)


def test_swarm_progress_sums() -> None:
    ids = [Identity.from_seed(bytes([i]) * 32).peer_id for i in range(3)]
    peers = (
        PeerProgress(ids[0], 4, 30, 500, 10, 2.0, None, 0.0),
        PeerProgress(ids[1], 4, 50, 700, 12, 3.5, None, 0.0),
        PeerProgress(ids[2], 3, 90, 900, 9, 1.0, None, 0.0),  # behind: not in epoch 4's count
    )
    s = SwarmProgress(peers, epoch=4, samples_per_epoch=100)
    assert (s.live_peers, s.total_samples, s.samples_per_s) == (3, 2100, 6.5)
    assert s.epoch_samples == 80 and s.epoch_progress == pytest.approx(0.8)
    assert SwarmProgress(peers, 4, None).epoch_progress == 0.0
    assert SwarmProgress(peers, 4, 10).epoch_progress < 1.0


async def test_throughput_is_samples_over_the_recent_window(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=9)
    async with swarm(net, 1) as (peer,):
        t = ProgressTracker(peer, RUN, throughput_window=30.0)
        for step in range(40):
            await trio.sleep(0.5)
            t.report(samples=10, step=step)
        assert t.own.samples_per_s == pytest.approx(20.0)  # 400 samples in 20 s
        await trio.sleep(60.0)
        assert t.own.samples_per_s == 0.0  # nothing in the last 30 s


def test_bad_arguments_are_config_errors() -> None:
    class FakePeer:
        id = Identity.from_seed(b"f" * 32).peer_id

    with pytest.raises(ConfigError):
        ProgressTracker(FakePeer(), "")
    with pytest.raises(ConfigError):
        ProgressTracker(FakePeer(), RUN, ttl=4000)
    with pytest.raises(ConfigError):
        ProgressTracker(FakePeer(), RUN, samples_per_epoch=0)
    t = ProgressTracker(FakePeer(), RUN)
    with pytest.raises(ConfigError):
        t.report(samples=-1, step=0)
    with pytest.raises(ConfigError):
        t.report(samples=1, step=0, loss="0.5")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        t.advance_to(-2)


def test_trailing_fields_at_their_defaults_are_left_out() -> None:
    """A record without ``relays`` (a listening peer's, or a client's without a relay) is the
    17-element array that peers predating the field decode."""
    me = Identity.from_seed(b"m" * 32).peer_id
    p = PeerProgress(
        me, 0, 0, 0, 0, 0.0, f"ws://h:1/{me}", 1.0, last_round=3, group=b"g", group_size=2
    )
    assert len(msgspec.msgpack.decode(encode_progress(p))) == 17
    relayed = dataclasses.replace(p, address=None, relays=1)
    assert len(msgspec.msgpack.decode(encode_progress(relayed))) == 18
    fresh = PeerProgress(me, 0, 0, 0, 0, 0.0, None, 1.0)
    assert len(msgspec.msgpack.decode(encode_progress(fresh))) == 7
