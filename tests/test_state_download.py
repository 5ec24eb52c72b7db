"""Training state for joiners: StateServer and download_state, on the in-memory network.

Timing tests run on links of known bandwidth under the virtual clock: a clean download from a
donor is measured first (on a connection that has carried a stream, as the download after a
fault is), and each fault must cost exactly what it should on top of that (the time until the
fault shows, then one clean download from the next donor).
"""

from __future__ import annotations

import random
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import msgspec
import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, ProtocolError
from moshpit_trio.identity import Identity, PeerID
from moshpit_trio.peer import Peer, open_peer
from moshpit_trio.testing import MemoryNetwork
from moshpit_trio.training import (
    ProgressTracker,
    StateServer,
    StateUnavailable,
    TrainingState,
    download_state,
)
from moshpit_trio.training.state import (
    MAX_HEADER,
    MAX_METADATA,
    StateDecoder,
    _pieces,
    decode_header,
    encode_state,
)
from moshpit_trio.wire.connection import Request

from .fuzzing import mutated
from .test_averager import swarm

RUN = "statetest"
LATENCY = 0.005
#: bytes/s on the links between donors and joiners in timing tests
RATE = 1024 * 1024
MiB = 1024 * 1024


def make_state(seed: int, mib: float = 2.0) -> TrainingState:
    """Parameters (float32, one transposed so it is not C-contiguous), fp16 statistics, an
    int64 counter, a 0-d and an empty tensor, and metadata."""
    rng = np.random.default_rng(seed)
    n = int(mib * MiB / 4)
    big = rng.normal(size=n - 1000).astype(np.float32)
    return TrainingState(
        step=100 + seed,
        epoch=3,
        round=17,
        tensors=[
            big,
            rng.normal(size=(20, 30)).astype(np.float32).T,
            rng.normal(size=400).astype(np.float16),
            np.array([seed, 7], dtype=np.int64),
            np.array(2.5, dtype=np.float64),
            np.zeros((0, 3), dtype=np.float32),
        ],
        metadata={"lr": 0.1, "scheduler": {"last_epoch": 3}, "names": ["w", "b"]},
    )


def assert_same_state(got: TrainingState, want: TrainingState) -> None:
    assert (got.step, got.epoch, got.round) == (want.step, want.epoch, want.round)
    assert got.metadata == want.metadata
    assert len(got.tensors) == len(want.tensors)
    for g, w in zip(got.tensors, want.tensors, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(g, w)


def slow_links(net: MemoryNetwork, donors: Sequence[int], joiners: Sequence[int]) -> None:
    for d in donors:
        for j in joiners:
            net.set_link(f"h{d}", f"h{j}", bandwidth=RATE)


@asynccontextmanager
async def serving(
    peers: Sequence[Peer],
    states: Sequence[TrainingState | None],
    *,
    max_concurrent: int = 2,
) -> AsyncIterator[list[StateServer]]:
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(
                StateServer(p, RUN, (lambda s=s: s), max_concurrent=max_concurrent)
            )
            for p, s in zip(peers, states, strict=True)
        ]
        yield servers


async def clean_download(peer: Peer, donor: Peer) -> float:
    """How long a clean download from ``donor`` takes once their connection has carried a
    stream: the second one. (The first stream a donor opens on a connection waits a round trip
    for its grant; later ones send at once, as a joiner's download from the next donor after a
    fault does.)"""
    await timed_download(peer, donors=[donor.address])
    _, _, took = await timed_download(peer, donors=[donor.address])
    return took


async def timed_download(peer: Peer, **kwargs: Any) -> tuple[TrainingState, PeerID, float]:
    start = trio.current_time()
    state, donor = await download_state(peer, RUN, **kwargs)
    return state, donor, trio.current_time() - start


# -- happy paths ----------------------------------------------------------------------------


async def test_download_from_a_live_donor_found_in_the_progress_records(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=1, latency=LATENCY)
    async with swarm(net, 4) as peers:
        want = make_state(1)
        await ProgressTracker(peers[0], RUN).refresh()  # the donor announces itself
        await ProgressTracker(peers[3], RUN).refresh()  # the joiner too: never its own donor
        async with serving(peers[:1], [want]) as (server,):
            state, donor = await download_state(peers[3], RUN)
        assert donor == peers[0].id
        assert_same_state(state, want)
        assert (server.served, server.peak_active, server.active) == (1, 1, 0)
        streams = peers[3].transport.registry.streams
        assert not [n for n in streams if n.startswith("state.recv.")]  # the handler is gone


async def test_a_client_mode_joiner_can_download(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=2, latency=LATENCY)
    async with swarm(net, 3) as peers:
        want = make_state(2, mib=0.5)
        await ProgressTracker(peers[1], RUN).refresh()
        async with (
            open_peer(
                Identity.from_seed(b"c" * 32),
                client_mode=True,
                network=net.host("c0"),
                bootstrap=[peers[0].address],  # type: ignore[list-item]
            ) as client,
            serving(peers[1:2], [want]),
        ):
            assert client.address is None
            state, donor = await download_state(client, RUN)
        assert donor == peers[1].id
        assert_same_state(state, want)


# -- failures of one donor: the next one serves ---------------------------------------------


async def test_a_donor_killed_mid_download_costs_the_time_until_it_died(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=3, latency=LATENCY)
    async with swarm(net, 4) as peers:
        slow_links(net, [0, 1], [3])
        want = make_state(3)
        async with serving(peers[:2], [want, want]) as servers:
            clean = await clean_download(peers[3], peers[1])
            # 2 MiB over 1 MiB/s, plus framing and latency
            assert 2.0 < clean < 2.05

            async def kill_donor() -> None:
                await trio.sleep(1.0)
                assert servers[0].active == 1  # mid-download
                net.kill("h0")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_donor)
                state, donor, took = await timed_download(
                    peers[3], donors=[peers[0].address, peers[1].address]
                )
        assert donor == peers[1].id
        assert_same_state(state, want)
        assert took == pytest.approx(1.0 + clean, abs=1e-3)


async def test_a_frozen_donor_costs_per_donor_timeout(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=4, latency=LATENCY)
    async with swarm(net, 4) as peers:
        slow_links(net, [0, 1], [3])
        want = make_state(4)
        async with serving(peers[:2], [want, want]):
            clean = await clean_download(peers[3], peers[1])
            net.freeze("h0")
            state, donor, took = await timed_download(
                peers[3], donors=[peers[0].address, peers[1].address], per_donor_timeout=5.0
            )
        assert donor == peers[1].id
        assert_same_state(state, want)
        assert took == pytest.approx(5.0 + clean, abs=1e-3)


async def test_a_busy_donor_sends_the_joiner_on_at_once(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=5, latency=LATENCY)
    async with swarm(net, 5) as peers:
        slow_links(net, [0, 1], [3, 4])
        want = make_state(5)
        async with serving(peers[:2], [want, want], max_concurrent=1) as servers:
            clean = await clean_download(peers[4], peers[1])
            results: dict[str, tuple[PeerID, float]] = {}

            async def first() -> None:
                _, donor, took = await timed_download(peers[3], donors=[peers[0].address])
                results["first"] = (donor, took)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.sleep(0.5)  # the first joiner holds donor 0's only slot
                state, donor, took = await timed_download(
                    peers[4], donors=[peers[0].address, peers[1].address]
                )
                results["second"] = (donor, took)
        assert results["first"][0] == peers[0].id
        assert donor == peers[1].id
        assert_same_state(state, want)
        assert servers[0].refused_busy == 1 and servers[0].peak_active == 1
        # one round trip to hear "busy", then a clean download
        assert took == pytest.approx(2 * LATENCY + clean, abs=2e-3)


async def test_a_donor_without_state_sends_the_joiner_on(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=6, latency=LATENCY)
    async with swarm(net, 4) as peers:
        slow_links(net, [0, 1], [3])
        want = make_state(6)
        async with serving(peers[:2], [None, want]):
            clean = await clean_download(peers[3], peers[1])
            state, donor, took = await timed_download(
                peers[3], donors=[peers[0].address, peers[1].address]
            )
        assert donor == peers[1].id
        assert_same_state(state, want)
        assert took == pytest.approx(2 * LATENCY + clean, abs=2e-3)


async def test_no_donors_is_state_unavailable_at_once(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=7, latency=LATENCY)
    async with swarm(net, 3) as peers:
        # nobody published progress: no donors known
        start = trio.current_time()
        with pytest.raises(StateUnavailable, match="no live peer of the run"):
            await download_state(peers[2], RUN, timeout=30)
        assert trio.current_time() - start < 1.0
        # only peers in client mode, or ourselves: no donors either
        await ProgressTracker(peers[2], RUN).refresh()
        with pytest.raises(StateUnavailable, match="no live peer of the run"):
            await download_state(peers[2], RUN, timeout=30)
        with pytest.raises(StateUnavailable):
            await download_state(peers[2], RUN, donors=[], timeout=30)


async def test_every_donor_failing_names_each_and_why(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=8, latency=LATENCY)
    async with swarm(net, 4) as peers, serving(peers[:1], [None]):
        # peers[1] serves nothing for this run; peers[2] is dead
        net.kill("h2")
        with pytest.raises(StateUnavailable) as caught:
            await download_state(
                peers[3],
                RUN,
                donors=[peers[0].address, peers[1].address, peers[2].address],
                timeout=30,
            )
    whys = dict(caught.value.attempts)
    assert whys[peers[0].id.short].startswith("no-state")
    assert whys[peers[1].id.short].startswith("UnknownHandler")
    assert peers[2].id.short in whys
    for peer in peers[:3]:
        assert peer.id.short in str(caught.value)


async def test_a_donor_busy_until_the_timeout_is_asked_again_then_given_up(
    autojump_clock: Any,
) -> None:
    net = MemoryNetwork(seed=9, latency=LATENCY)
    async with swarm(net, 5) as peers:
        net.set_link("h0", "h3", bandwidth=1024)  # the first joiner holds the slot for ages
        want = make_state(9, mib=0.1)
        async with (
            serving(peers[:1], [want], max_concurrent=1) as (server,),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(
                lambda: download_state(peers[3], RUN, donors=[peers[0].address], timeout=600)
            )
            await trio.sleep(0.5)
            start = trio.current_time()
            with pytest.raises(StateUnavailable, match="busy") as caught:
                await download_state(
                    peers[4], RUN, donors=[peers[0].address], timeout=10, retry_interval=1.0
                )
            nursery.cancel_scope.cancel()
        took = trio.current_time() - start
        assert 9.0 < took <= 10.0
        # asked about every second (jittered), every time refused at once
        assert 6 <= len(caught.value.attempts) == server.refused_busy <= 20


# -- bad data from a fake donor ---------------------------------------------------------------


def header(
    tensors: list[list[Any]], nbytes: int, *, metadata: bytes = b"\x80", version: int = 1
) -> bytes:
    """A state header as protocol/SPEC.md defines it, with its u32 prefix."""
    body = msgspec.msgpack.encode([version, 1, 0, 0, nbytes, tensors, metadata])
    return struct.pack(">I", len(body)) + body


def fake_donor(peer: Peer, pieces: list[bytes], *, stream: bool = True) -> None:
    """A peer answering state.RUN with a stream of ``pieces`` and "ok", whatever they are."""

    async def handler(request: Request) -> bytes:
        nonce, _max_bytes = msgspec.msgpack.decode(request.payload)
        if stream:
            async with request.connection.open_stream(
                f"state.recv.{nonce.hex()}", timeout=request.deadline - trio.current_time()
            ) as s:
                for piece in pieces:
                    await s.send(piece)
                await s.finish()
        return msgspec.msgpack.encode(["ok", ""])

    peer.transport.register(f"state.{RUN}", handler)


F4 = [["<f4", [250]]]
BAD_DATA: dict[str, tuple[list[bytes], str]] = {
    "too few bytes": ([header(F4, 1000), bytes(500)], "ended early"),
    "too many bytes": ([header(F4, 1000), bytes(1001)], "more bytes than the header declared"),
    "nbytes disagrees": ([header(F4, 999), bytes(999)], "nbytes says 999"),
    "a tensor over max_bytes": ([header([["<f4", [2**38]]], 2**40), bytes(4096)], "is over"),
    "tensors together over max_bytes": (
        [header([["<f4", [2**28]]] * 3, 3 * 2**30), bytes(4096)],
        "more than the 2147483648 bytes",
    ),
    "object dtype": ([header([["|O", [8]]], 64), bytes(64)], "not allowed"),
    "structured dtype": ([header([["V8", [8]]], 64), bytes(64)], "not allowed"),
    "huge header length": ([struct.pack(">I", MAX_HEADER + 1)], "a header of"),
    "header is not msgpack": ([struct.pack(">I", 3) + b"\xc1\xc1\xc1"], "bad header"),
    "unknown version": ([header(F4, 1000, version=2), bytes(1000)], "unknown state version"),
    "metadata too big": (
        [header(F4, 1000, metadata=bytes(MAX_METADATA + 1)), bytes(1000)],
        "bad header",
    ),
    "metadata not a map": ([header(F4, 1000, metadata=b"\x01"), bytes(1000)], "bad metadata"),
    "ends inside the header": ([header(F4, 1000)[:10]], "inside the header"),
    "ok without a stream": ([], "without sending its state"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
async def test_bad_data_from_a_donor_is_rejected_and_the_next_donor_serves(
    autojump_clock: Any, case: str, logs: list[dict[str, Any]]
) -> None:
    pieces, reason = BAD_DATA[case]
    net = MemoryNetwork(seed=10, latency=LATENCY)
    async with swarm(net, 3) as peers:
        fake_donor(peers[0], pieces, stream=bool(pieces))
        want = make_state(10, mib=0.1)
        async with serving(peers[1:2], [want]):
            state, donor = await download_state(
                peers[2], RUN, donors=[peers[0].address, peers[1].address], max_bytes=2**31
            )
        # the joiner's connection to the liar survived its lies (no protocol violation)
        assert peers[2].transport.connection_to(peers[0].id) is not None
    assert donor == peers[1].id
    assert_same_state(state, want)
    whys = [e["why"] for e in logs if e["event"] == "a donor did not give its state"]
    assert len(whys) == 1 and reason in whys[0], whys


# -- many joiners, few donors -----------------------------------------------------------------


async def test_eight_joiners_four_donors_two_at_a_time(autojump_clock: Any) -> None:
    net = MemoryNetwork(seed=11, latency=LATENCY)
    async with swarm(net, 12) as peers:
        donors, joiners = peers[:4], peers[4:]
        slow_links(net, range(4), range(4, 12))
        want = make_state(11, mib=1.0)
        for d in donors:
            await ProgressTracker(d, RUN).refresh()
        got: dict[int, tuple[TrainingState, PeerID]] = {}

        async def join(i: int, p: Peer) -> None:
            got[i] = await download_state(p, RUN, timeout=60, rng=random.Random(i))

        async with (
            serving(donors, [want] * 4, max_concurrent=2) as servers,
            trio.open_nursery() as nursery,
        ):
            for i, p in enumerate(joiners):
                nursery.start_soon(join, i, p)
    assert len(got) == 8
    for state, _ in got.values():
        assert_same_state(state, want)
    assert all(s.peak_active <= 2 for s in servers)
    assert sum(s.served for s in servers) == 8
    # the crowd spread out: at least three donors served, at least one was full at some point
    assert sum(1 for s in servers if s.served) >= 3
    assert any(s.peak_active == 2 for s in servers)


# -- the codec, without a network ---------------------------------------------------------------


@pytest.mark.parametrize(
    "tensors",
    [
        [],
        [np.arange(10, dtype=np.int32)],
        [np.array(True), np.zeros((2, 0, 3), np.float16), np.arange(6, dtype=">f8").reshape(2, 3)],
        [np.arange(12, dtype=np.complex64).reshape(3, 4)[:, ::2], np.ones(5, np.uint8)],
    ],
)
def test_encode_then_decode_in_pieces_of_any_size(tensors: list[np.ndarray]) -> None:
    want = TrainingState(1, 2, 3, tensors, {"k": [1, 2, {"x": None}]})
    head, views = encode_state(want)
    stream = head + b"".join(bytes(v) for v in views)
    for size in (1, 3, 7, len(stream) or 1):
        decoder = StateDecoder(max_bytes=10_000)
        for at in range(0, len(stream), size):
            decoder.feed(stream[at : at + size])
        assert_same_state(decoder.finish(), want)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=8),
    chunk=st.integers(min_value=1, max_value=64),
    head=st.integers(min_value=0, max_value=100),
)
def test_pieces_are_the_stream_in_order(sizes: list[int], chunk: int, head: int) -> None:
    rng = np.random.default_rng(len(sizes))
    arrays = [rng.integers(0, 255, size=n, dtype=np.uint8) for n in sizes]
    views = [a.data for a in arrays]
    pieces = list(_pieces(bytes(range(head)), views, chunk))
    assert b"".join(bytes(p) for p in pieces) == bytes(range(head)) + b"".join(
        a.tobytes() for a in arrays
    )
    # everything but the last piece is at least a chunk (small tensors are packed)
    assert all(len(p) >= chunk for p in pieces[:-1])


def test_unsendable_states_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="plain number"):
        encode_state(TrainingState(0, 0, 0, [np.array([object()])]))
    with pytest.raises(ConfigError, match="metadata"):
        encode_state(TrainingState(0, 0, 0, [], {"big": bytes(MAX_METADATA)}))
    with pytest.raises(ConfigError, match="msgpack"):
        encode_state(TrainingState(0, 0, 0, [], {"x": object()}))
    with pytest.raises(ConfigError, match="step"):
        encode_state(TrainingState(-1, 0, 0, []))


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_VALID_HEAD, _VALID_VIEWS = encode_state(
    TrainingState(5, 1, 2, [np.arange(6, dtype=np.float32), np.array(3)], {"lr": 0.5})
)
VALID_STREAM = _VALID_HEAD + b"".join(bytes(v) for v in _VALID_VIEWS)


@FUZZ
@given(data=st.binary(max_size=300), max_bytes=st.integers(min_value=0, max_value=2**40))
def test_header_decoder_raises_only_protocol_errors(data: bytes, max_bytes: int) -> None:
    try:
        head, metadata = decode_header(data, max_bytes)
    except ProtocolError as exc:
        assert exc.reason == "state"
        return
    assert isinstance(metadata, dict) and head.nbytes <= max_bytes


@FUZZ
@given(data=mutated(VALID_STREAM), split=st.integers(min_value=1, max_value=64))
def test_state_decoder_raises_only_protocol_errors(data: bytes, split: int) -> None:
    decoder = StateDecoder(max_bytes=1000)
    try:
        for at in range(0, len(data), split):
            decoder.feed(data[at : at + split])
        state = decoder.finish()
    except ProtocolError as exc:
        assert exc.reason == "state"
        return
    # what decodes is exactly what was declared
    assert sum(t.nbytes for t in state.tensors) == len(data) - 4 - struct.unpack(">I", data[:4])[0]


@FUZZ
@given(
    tensors=st.lists(
        st.tuples(
            st.sampled_from(["<f4", "|O", "V4", "<f16", "|b1", ">i8", "<M8", "S3", "<f4,<f4"]),
            st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=40),
        ),
        max_size=4,
    ),
    nbytes=st.integers(min_value=0, max_value=2**64 - 1),
    metadata=st.one_of(st.binary(max_size=20), st.just(b"\x81\xa1a\x01")),
)
def test_header_decoder_on_structured_nonsense(
    tensors: list[tuple[str, list[int]]], nbytes: int, metadata: bytes
) -> None:
    raw = msgspec.msgpack.encode([1, 0, 0, 0, nbytes, [[d, s] for d, s in tensors], metadata])
    try:
        head, _ = decode_header(raw, 2**31)
    except ProtocolError:
        return
    assert all(t.dtype in ("<f4", "|b1", ">i8") for t in head.tensors)
