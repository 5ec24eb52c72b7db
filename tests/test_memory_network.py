"""The in-memory network: trio stream semantics, the timing model, and every fault, in virtual time.

Times are asserted to the nanosecond with ``at()``: the model is exact, and the tolerance only
absorbs float rounding in sums like ``0.1 + 1.0 + 0.05``.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import wrap_client_stream, wrap_server_stream

from moshpit_trio.testing import MemoryNetwork, MemoryStream


def at(t: float) -> object:
    return pytest.approx(t, abs=1e-9)


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    buf = bytearray()
    while chunk := await stream.receive_some():
        buf += chunk
    return bytes(buf)


async def echo(stream: trio.abc.Stream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some():
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def sink(stream: trio.abc.Stream) -> None:
    """Reads and drops everything, until EOF or a reset."""
    async with stream:
        try:
            while await stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass


async def listen(
    nursery: trio.Nursery,
    net: MemoryNetwork,
    name: str,
    handler: Callable[[trio.abc.Stream], Awaitable[None]],
    port: int = 0,
) -> int:
    _, bound = await nursery.start(net.host(name).serve, name, port, handler)
    return int(bound)


# -- trio stream semantics -----------------------------------------------------------------------


@pytest.mark.parametrize("latency", [0.0, 0.01])
async def test_trio_stream_conformance(
    autojump_clock: trio.testing.MockClock, latency: float
) -> None:
    # trio's own generic checks for HalfCloseableStream: checkpoints, Busy/Closed/Broken errors,
    # EOF, half-close, wait_send_all_might_not_block.
    net = MemoryNetwork(latency=latency)

    async def pair() -> tuple[MemoryStream, MemoryStream]:
        return net.stream_pair("a", "b")

    async def clogged() -> tuple[MemoryStream, MemoryStream]:
        # One-byte windows, already full both ways: a send blocks until the other end reads.
        tight = MemoryNetwork(latency=latency, buffer_size=1)
        s, r = tight.stream_pair("a", "b")
        await s.send_all(b"x")
        await r.send_all(b"x")
        return s, r

    await trio.testing.check_half_closeable_stream(pair, clogged)


async def test_stream_errors_and_eof() -> None:
    net = MemoryNetwork()
    a, b = net.stream_pair("a", "b")
    with pytest.raises(ValueError):
        await a.receive_some(0)
    await a.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"after eof")
    assert await b.receive_some() == b""
    assert await b.receive_some() == b""  # EOF is sticky
    await b.send_all(b"still open this way")  # half-closed: the other direction works
    assert await a.receive_some() == b"still open this way"
    await a.aclose()
    with pytest.raises(trio.BrokenResourceError):  # the reader is gone
        await b.send_all(b"to nobody")
    for op in (a.send_all(b"x"), a.receive_some(), a.send_eof(), a.wait_send_all_might_not_block()):
        with pytest.raises(trio.ClosedResourceError):
            await op
    await a.aclose()  # idempotent


async def test_receive_some_returns_what_has_arrived_up_to_max_bytes() -> None:
    net = MemoryNetwork()
    a, b = net.stream_pair("a", "b")
    await a.send_all(b"hello ")
    await a.send_all(b"world")
    assert await b.receive_some(3) == b"hel"
    assert await b.receive_some(100) == b"lo world"  # across sends, never waits for more


# -- timing model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("latency", "bandwidth", "size", "sent_after", "arrived_after"),
    [
        pytest.param(0.05, 1e6, 1_000_000, 1.0, 1.05, id="1MB@1MB/s+50ms"),
        pytest.param(0.0, 1e6, 500_000, 0.5, 0.5, id="bandwidth-only"),
        pytest.param(0.2, None, 10, 0.0, 0.2, id="latency-only"),
        pytest.param(0.0, None, 1 << 20, 0.0, 0.0, id="instant"),
        pytest.param(0.01, 10e6, 250_000, 0.025, 0.035, id="10MB/s+10ms"),
    ],
)
async def test_latency_and_bandwidth(
    autojump_clock: trio.testing.MockClock,
    latency: float,
    bandwidth: float | None,
    size: int,
    sent_after: float,
    arrived_after: float,
) -> None:
    net = MemoryNetwork(latency=latency, bandwidth=bandwidth)
    received = trio.Event()
    times: dict[str, float] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        assert await receive_exactly(stream, size) == b"z" * size
        times["arrived"] = trio.current_time()
        received.set()

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", handler)
        stream = await net.host("a").connect("b", port)
        assert trio.current_time() == at(2 * latency)  # connect is one round trip
        t0 = trio.current_time()
        await stream.send_all(b"z" * size)
        assert trio.current_time() - t0 == at(sent_after)
        await received.wait()
        assert times["arrived"] - t0 == at(arrived_after)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("latency", "bandwidth", "size", "round_trip"),
    [
        (0.0, None, 1000, 0.0),
        (0.05, None, 1000, 0.1),
        (0.05, 1e6, 1_000_000, 2.1),
        (0.01, 1e5, 1000, 0.04),
    ],
)
async def test_echo(
    autojump_clock: trio.testing.MockClock,
    latency: float,
    bandwidth: float | None,
    size: int,
    round_trip: float,
) -> None:
    net = MemoryNetwork(latency=latency, bandwidth=bandwidth)
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", echo)
        stream = await net.host("a").connect("b", port)
        t0 = trio.current_time()
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        async with trio.open_nursery() as inner:
            inner.start_soon(stream.send_all, payload)
            assert await receive_exactly(stream, size) == payload
        assert trio.current_time() - t0 == at(round_trip)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    stats = net.stats()
    assert stats["a"].bytes_sent == stats["a"].bytes_received == size
    assert stats["b"].bytes_sent == stats["b"].bytes_received == size
    assert (stats["a"].connects, stats["b"].accepts) == (1, 1)


async def test_sends_on_one_direction_are_serialized(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.05, bandwidth=1e6)
    a, b = net.stream_pair("a", "b")
    await a.send_all(b"1" * 100_000)
    await a.send_all(b"2" * 100_000)
    assert trio.current_time() == at(0.2)
    assert await b.receive_some() == b"1" * 100_000  # arrived at 0.15, already there
    assert await b.receive_some() == b"2" * 100_000
    assert trio.current_time() == at(0.25)


def _limit_link(net: MemoryNetwork) -> None:
    net.set_link("a", "b", bandwidth=1e6)


def _limit_upload(net: MemoryNetwork) -> None:
    net.set_host("a", upload=1e6)


def _limit_download(net: MemoryNetwork) -> None:
    net.set_host("c", download=1e6)


def _limit_two_links(net: MemoryNetwork) -> None:
    net.set_link("a", "b", bandwidth=1e6)
    net.set_link("a", "c", bandwidth=1e6)


@pytest.mark.parametrize(
    ("setup", "first", "second", "finish_times"),
    [
        # Two connections on one link share its bandwidth: half each, so both finish when the
        # bytes of both have crossed it (not one after the other).
        pytest.param(_limit_link, ("a", "b"), ("a", "b"), [0.2, 0.2], id="one-link"),
        # Two links out of one host share its upload...
        pytest.param(_limit_upload, ("a", "b"), ("a", "c"), [0.2, 0.2], id="upload"),
        # ... and two links into one host its download.
        pytest.param(_limit_download, ("a", "c"), ("b", "c"), [0.2, 0.2], id="download"),
        # Nothing in common: both go at full speed.
        pytest.param(_limit_two_links, ("a", "b"), ("a", "c"), [0.1, 0.1], id="two-links"),
    ],
)
async def test_shared_capacity(
    autojump_clock: trio.testing.MockClock,
    setup: Callable[[MemoryNetwork], None],
    first: tuple[str, str],
    second: tuple[str, str],
    finish_times: list[float],
) -> None:
    net = MemoryNetwork()
    setup(net)
    done: list[float] = []

    async def send(src: str, dst: str) -> None:
        stream, _ = net.stream_pair(src, dst)
        await stream.send_all(b"x" * 100_000)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, *first)
        nursery.start_soon(send, *second)
    assert sorted(done) == [at(t) for t in finish_times]


# -- fair sharing: max-min, recomputed as flows start, end and abort ------------------------------


async def _send_at(
    net: MemoryNetwork, stream: trio.abc.SendStream, size: int, start: float, done: list[float]
) -> None:
    await trio.sleep_until(start)
    await stream.send_all(b"x" * size)
    done.append(trio.current_time())


async def test_two_flows_sharing_an_uplink(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.01)
    net.set_host("a", upload=1e6)
    ab, ba = net.stream_pair("a", "b")
    ac, ca = net.stream_pair("a", "c")
    done: dict[str, float] = {}

    async def send(stream: trio.abc.SendStream, size: int, name: str) -> None:
        await stream.send_all(b"x" * size)
        done[name] = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, ab, 100_000, "ab")
        nursery.start_soon(send, ac, 300_000, "ac")
    # 0.5 MB/s each until the 100 KB are out (t=0.2); then the other has 200 KB left, alone
    # at 1 MB/s
    assert done == {"ab": at(0.2), "ac": at(0.4)}
    assert len(await ba.receive_some()) == 100_000
    assert len(await ca.receive_some()) == 300_000
    assert trio.current_time() == at(0.41)  # the later one arrived a latency after it left


async def test_all_to_all_takes_what_its_bytes_need(autojump_clock: trio.testing.MockClock) -> None:
    # 16 hosts each send 20 KB to each of the 15 others at once, every upload and download at
    # 10 MB/s: each host has 300 KB to send and to receive, 0.030 s of its link. (First come,
    # first served, holding sender and receiver, this took 0.058 s.)
    n, size, rate = 16, 20_000, 10e6
    net = MemoryNetwork()
    for i in range(n):
        net.set_host(f"h{i}", upload=rate, download=rate)
    pairs = [net.stream_pair(f"h{i}", f"h{j}") for i in range(n) for j in range(n) if i != j]
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        for send, _ in pairs:
            nursery.start_soon(_send_at, net, send, size, 0.0, done)
    assert done == [at((n - 1) * size / rate)] * len(pairs)
    for _, receive in pairs:
        assert len(await receive.receive_some()) == size
    stats = net.stats()
    assert {s.bytes_sent for s in stats.values()} == {(n - 1) * size}


async def test_a_flow_that_starts_while_another_is_half_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    net.set_host("a", upload=1e6)
    ab, _ = net.stream_pair("a", "b")
    ac, _ = net.stream_pair("a", "c")
    first: list[float] = []
    second: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_at, net, ab, 100_000, 0.0, first)
        nursery.start_soon(_send_at, net, ac, 100_000, 0.05, second)
    # a->b alone for 0.05 s (50 KB), then both at 0.5 MB/s: a->b's last 50 KB by 0.15; a->c
    # has 50 KB left then, alone at 1 MB/s: done at 0.2
    assert (first, second) == ([at(0.15)], [at(0.2)])


async def _abort_by_kill(net: MemoryNetwork, stream: trio.abc.SendStream) -> None:
    async def kill() -> None:
        await trio.sleep_until(0.1)
        net.kill("c")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x" * 200_000)


async def _abort_by_cancel(net: MemoryNetwork, stream: trio.abc.SendStream) -> None:
    with trio.move_on_at(0.1) as scope:
        await stream.send_all(b"x" * 200_000)
    assert scope.cancelled_caught


@pytest.mark.parametrize("abort", [_abort_by_kill, _abort_by_cancel])
async def test_an_aborted_flow_gives_its_share_back(
    autojump_clock: trio.testing.MockClock,
    abort: Callable[[MemoryNetwork, trio.abc.SendStream], Awaitable[None]],
) -> None:
    net = MemoryNetwork()
    net.set_host("a", upload=1e6)
    ab, _ = net.stream_pair("a", "b")
    ac, _ = net.stream_pair("a", "c")
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_at, net, ab, 200_000, 0.0, done)
        await abort(net, ac)
        assert trio.current_time() == at(0.1)
    # 50 KB of a->b out by 0.1 at half the upload, the other 150 KB at all of it: 0.25 (0.4
    # had a->c gone on)
    assert done == [at(0.25)]


async def test_a_flow_held_back_elsewhere_leaves_the_rest_to_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(buffer_size=4 << 20)  # nobody reads: room for all of it
    net.set_host("a", upload=3e6)
    net.set_host("c", download=1e6)
    done: dict[str, list[float]] = {"ab": [], "ac": [], "dc": []}
    async with trio.open_nursery() as nursery:
        for name, size in (("ab", 2_500_000), ("ac", 1_000_000), ("dc", 1_000_000)):
            stream, _ = net.stream_pair(name[0], name[1])
            nursery.start_soon(_send_at, net, stream, size, 0.0, done[name])
    # c's download holds a->c and d->c to 0.5 MB/s each; a->b gets the 2.5 MB/s a has left
    # (first come, first served, a->c would have waited for a->b's 2.5 MB)
    assert done == {"ab": [at(1.0)], "ac": [at(2.0)], "dc": [at(2.0)]}


async def test_a_link_caps_its_flows(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    net.set_host("a", upload=1e6)
    net.set_link("a", "b", bandwidth=2e5)
    done: dict[str, list[float]] = {"ab": [], "ac": []}
    async with trio.open_nursery() as nursery:
        for name, size in (("ab", 100_000), ("ac", 400_000)):
            stream, _ = net.stream_pair(name[0], name[1])
            nursery.start_soon(_send_at, net, stream, size, 0.0, done[name])
    # a->b at its link's 0.2 MB/s, a->c at the 0.8 MB/s left of a's upload
    assert done == {"ab": [at(0.5)], "ac": [at(0.5)]}


async def test_a_bandwidth_change_applies_mid_transfer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(bandwidth=1e6)
    a, _ = net.stream_pair("a", "b")

    async def slow_down() -> None:
        await trio.sleep_until(0.5)
        net.set_link("a", "b", bandwidth=0.5e6)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_down)
        await a.send_all(b"x" * 1_000_000)
    assert trio.current_time() == at(1.5)  # half at 1 MB/s, half at 0.5 MB/s


@settings(max_examples=40, deadline=None)
@given(
    flows=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 50_000)).filter(
            lambda f: f[0] != f[1]
        ),
        min_size=1,
        max_size=10,
    ),
    uploads=st.lists(st.sampled_from([1e5, 1e6, 3e6]), min_size=4, max_size=4),
)
def test_flows_out_of_one_upload_share_it_like_processor_sharing(
    flows: list[tuple[int, int, int]], uploads: list[float]
) -> None:
    # Flows that start together and are limited by their sender's upload only: each upload
    # is shared equally by the flows still going, so a flow of s bytes ends when every flow
    # of its host has sent min(its size, s): at sum(min(s_j, s)) / upload.
    async def main() -> dict[int, float]:
        net = MemoryNetwork()
        for h, up in enumerate(uploads):
            net.set_host(f"h{h}", upload=up)
        done: dict[int, float] = {}

        async def send(i: int, stream: trio.abc.SendStream, size: int) -> None:
            await stream.send_all(b"x" * size)
            done[i] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for i, (a, b, size) in enumerate(flows):
                stream, _ = net.stream_pair(f"h{a}", f"h{b}")
                nursery.start_soon(send, i, stream, size)
        return done

    done = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for i, (a, _, size) in enumerate(flows):
        ahead = sum(min(s, size) for h, _, s in flows if h == a)
        assert done[i] == pytest.approx(ahead / uploads[a], rel=1e-9, abs=1e-12), i


async def test_buffer_size_back_pressure(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(buffer_size=1000)
    a, b = net.stream_pair("a", "b")
    payload = bytes(range(250)) * 20  # 5000 bytes: five windows
    done: list[float] = []

    async def sender() -> None:
        await a.send_all(payload)
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(1)
        assert not done  # the receiver has not read: the sender is stuck on a full window
        got = bytearray()
        while len(got) < len(payload):
            got += await b.receive_some(1000)  # each read makes room for one more window
            await trio.sleep(1)
    assert bytes(got) == payload
    # Window k+1 goes out when window k is read, at t=k: the fifth leaves at t=4.
    assert done == [at(4.0)]


async def test_back_pressure_bounds_bytes_held(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(buffer_size=4096)
    a, b = net.stream_pair("a", "b")
    with trio.move_on_after(10) as scope:
        while True:
            await a.send_all(b"x" * 1000)
    assert scope.cancelled_caught
    assert trio.current_time() == at(10)
    assert len(await b.receive_some()) <= 4096  # never more than one window in the pipe


# -- faults --------------------------------------------------------------------------------------


async def test_kill_mid_transfer(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.01, bandwidth=1e6)
    outcome: dict[str, tuple[str, float]] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await stream.receive_some()
        except trio.BrokenResourceError:
            outcome["server"] = ("broken", trio.current_time())

    async def killer() -> None:
        await trio.sleep_until(0.5)
        net.kill("b")

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", handler)
        stream = await net.host("a").connect("b", port)
        nursery.start_soon(killer)
        with pytest.raises(trio.BrokenResourceError, match="killed"):
            await stream.send_all(b"x" * 1_000_000)  # would take until t=1.02
        assert trio.current_time() == at(0.5)  # both sides see the reset at once
        await trio.testing.wait_all_tasks_blocked()
        assert outcome["server"] == ("broken", at(0.5))
        with pytest.raises(trio.BrokenResourceError):
            await stream.receive_some()

        with pytest.raises(ConnectionRefusedError):
            await net.host("a").connect("b", port)
        assert trio.current_time() == at(0.52)  # the refusal takes a round trip
        with pytest.raises(OSError) as info:
            await net.host("b").connect("a", 1)
        assert info.value.errno == errno.ENETDOWN
        with pytest.raises(OSError):
            await net.host("b").serve("b", 0, echo)

        net.revive("b")
        port2 = await listen(nursery, net, "b", echo, port)  # the old listener is gone
        assert port2 == port
        again = await net.host("a").connect("b", port)
        await again.send_all(b"back")
        assert await again.receive_some() == b"back"
        nursery.cancel_scope.cancel()


async def test_freeze_holds_bytes_and_thaw_delivers_them_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=0.01)
    async with trio.open_nursery() as nursery:
        accepted: list[trio.abc.Stream] = []
        ready = trio.Event()

        async def handler(stream: trio.abc.Stream) -> None:
            accepted.append(stream)
            ready.set()
            await trio.sleep_forever()

        port = await listen(nursery, net, "b", handler)
        a = await net.host("a").connect("b", port)
        await ready.wait()
        b = accepted[0]
        await a.send_all(b"early")  # arrives at t=0.03
        await trio.sleep_until(0.1)
        net.freeze("b")
        for i, t in enumerate([0.1, 0.2, 0.3]):
            await trio.sleep_until(t)
            await a.send_all(str(i + 1).encode())
        await b.send_all(b"reply")  # nothing a frozen host sends gets out either
        assert await b.receive_some() == b"early"  # it had arrived before the freeze

        with trio.move_on_after(1) as scope:
            await net.host("c").connect("b", port)  # hangs: no refusal from a frozen host
        assert scope.cancelled_caught

        async def thaw_at_5() -> None:
            await trio.sleep_until(5)
            net.thaw("b")

        nursery.start_soon(thaw_at_5)
        assert await receive_exactly(b, 3) == b"123"
        assert trio.current_time() == at(5.0)
        assert await a.receive_some() == b"reply"
        assert trio.current_time() == at(5.0)
        await a.send_all(b"after")  # normal service again
        assert await b.receive_some() == b"after"
        assert trio.current_time() == at(5.01)
        nursery.cancel_scope.cancel()


async def test_frozen_receiver_stalls_sender_and_loses_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(buffer_size=1000, latency=0.001)
    a, b = net.stream_pair("a", "b")
    payload = bytes(range(256)) * 40
    net.freeze("b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, payload)
        with trio.move_on_after(3):
            await b.receive_some()
            pytest.fail("a frozen host received bytes")
        net.thaw("b")
        assert await receive_exactly(b, len(payload)) == payload


async def test_partition_and_heal(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.01)
    ab, ba = net.stream_pair("a", "b")
    ac, ca = net.stream_pair("a", "c")
    connected: list[float] = []
    async with trio.open_nursery() as nursery:
        await listen(nursery, net, "b", echo, 80)
        await listen(nursery, net, "a", echo, 80)
        await trio.sleep_until(0.1)
        net.partition(["a", "b"], ["c"])
        await ac.send_all(b"across")  # held
        await ab.send_all(b"inside")  # delivered as usual
        assert await ba.receive_some() == b"inside"
        assert trio.current_time() == at(0.11)
        with trio.move_on_after(0.5) as scope:
            await net.host("c").connect("a", 80)  # hangs, no refusal
        assert scope.cancelled_caught

        async def late_connect() -> None:
            await net.host("c").connect("b", 80)  # hangs until the heal, then goes through
            connected.append(trio.current_time())

        nursery.start_soon(late_connect)
        await trio.sleep_until(1.0)
        net.heal()
        assert await ca.receive_some() == b"across"
        assert trio.current_time() == at(1.0)
        await trio.sleep(1)
        assert connected == [at(1.02)]

        # Hosts named in no group share one: this isolates a alone.
        net.partition(["a"])
        await ab.send_all(b"cut")
        with trio.move_on_after(1):
            await ba.receive_some()
            pytest.fail("partitioned bytes were delivered")
        bc, cb = net.stream_pair("b", "c")
        await bc.send_all(b"fine")
        assert await cb.receive_some() == b"fine"
        net.heal()
        assert await ba.receive_some() == b"cut"
        nursery.cancel_scope.cancel()
    with pytest.raises(ValueError):
        net.partition(["a", "b"], ["b"])


async def drop_pattern(seed: int, drop: float) -> list[tuple[int | None, str]]:
    """For each of ten clients: the send that broke (None if all 30 passed), and what the
    server side saw."""
    net = MemoryNetwork(seed=seed, latency=0.001)
    server_saw: dict[str, str] = {}

    async def handler(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, MemoryStream)
        client = stream.remote[0]
        try:
            await receive_all(stream)
            server_saw[client] = "eof"
        except trio.BrokenResourceError:
            server_saw[client] = "broken"

    broke_at: dict[str, int | None] = {}

    async def client(name: str, port: int) -> None:
        stream = await net.host(name).connect("server", port)
        for i in range(30):
            try:
                await stream.send_all(b"x" * 100)
            except trio.BrokenResourceError:
                broke_at[name] = i
                return
            await trio.sleep(0.01)
        broke_at[name] = None
        await stream.aclose()

    names = [f"c{i}" for i in range(10)]
    for name in names:
        net.set_link(name, "server", drop=drop)
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "server", handler)
        async with trio.open_nursery() as clients:
            for name in names:
                clients.start_soon(client, name, port)
        await trio.sleep(1)  # let the last EOFs arrive
        nursery.cancel_scope.cancel()
    return [(broke_at[name], server_saw[name]) for name in names]


async def test_drop_is_reproducible_per_seed(autojump_clock: trio.testing.MockClock) -> None:
    first = await drop_pattern(seed=1, drop=0.05)
    assert await drop_pattern(seed=1, drop=0.05) == first
    assert await drop_pattern(seed=2, drop=0.05) != first
    breaks = [i for i, _ in first if i is not None]
    assert breaks and len(breaks) < 10  # some connections broke, not all
    # Both ends of a dropped connection see the reset; the others end with a clean EOF.
    assert all(saw == ("eof" if i is None else "broken") for i, saw in first)
    assert await drop_pattern(seed=1, drop=1.0) == [(0, "broken")] * 10
    assert await drop_pattern(seed=1, drop=0.0) == [(None, "eof")] * 10


# -- connect and serve ---------------------------------------------------------------------------


async def test_connect_refused_cases(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.01)
    a = net.host("a")
    with pytest.raises(ConnectionRefusedError):
        await a.connect("nobody", 80)  # a host that never existed
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", echo)
        with pytest.raises(ConnectionRefusedError):
            await a.connect("b", port + 1)  # the host exists, the port is closed
        net.kill("b")
        with pytest.raises(ConnectionRefusedError):
            await a.connect("b", port)  # dead host
        nursery.cancel_scope.cancel()


async def test_ports() -> None:
    net = MemoryNetwork()
    b = net.host("b")
    async with trio.open_nursery() as nursery:
        assert await listen(nursery, net, "b", echo) == 10000
        assert await listen(nursery, net, "b", echo) == 10001
        assert await listen(nursery, net, "b", echo, 10002) == 10002
        assert await listen(nursery, net, "b", echo) == 10003  # skips the taken one
        assert await listen(nursery, net, "c", echo) == 10000  # ports are per host
        with pytest.raises(OSError) as info:
            await b.serve("b", 10001, echo)
        assert info.value.errno == errno.EADDRINUSE
        with pytest.raises(ValueError):
            await b.serve("c", 0, echo)  # a host only listens on itself
        nursery.cancel_scope.cancel()


async def test_serve_stops_on_cancel(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.01)
    handler_cancelled = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    serve_scope = trio.CancelScope()

    async def run_serve(task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        with serve_scope:
            await net.host("b").serve("b", 7, handler, task_status=task_status)

    async with trio.open_nursery() as nursery:
        await nursery.start(run_serve)
        stream = await net.host("a").connect("b", 7)
        serve_scope.cancel()
        # Handlers run inside serve, so they are cancelled with it (as with TcpNetwork).
        await handler_cancelled.wait()
        with pytest.raises(ConnectionRefusedError):
            await net.host("a").connect("b", 7)
        await stream.aclose()
        # The port is free again.
        assert await listen(nursery, net, "b", echo, 7) == 7
        nursery.cancel_scope.cancel()


async def _blocked_send(net: MemoryNetwork) -> None:
    a, _ = net.stream_pair("a", "b")
    await a.send_all(b"x" * 100)  # fills the 100-byte window
    await a.send_all(b"y")


async def _blocked_wait_send(net: MemoryNetwork) -> None:
    a, _ = net.stream_pair("a", "b")
    await a.send_all(b"x" * 100)
    await a.wait_send_all_might_not_block()


async def _blocked_receive(net: MemoryNetwork) -> None:
    _, b = net.stream_pair("a", "b")
    await b.receive_some()


async def _blocked_connect(net: MemoryNetwork) -> None:
    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", echo)
        net.freeze("b")
        await net.host("a").connect("b", port)


async def _blocked_transmission(net: MemoryNetwork) -> None:
    net.set_link("a", "b", bandwidth=10)
    a, _ = net.stream_pair("a", "b")
    await a.send_all(b"x" * 50)  # takes 5 s


@pytest.mark.parametrize(
    "blocked",
    [_blocked_send, _blocked_wait_send, _blocked_receive, _blocked_connect, _blocked_transmission],
)
async def test_cancelling_a_blocked_call(
    autojump_clock: trio.testing.MockClock, blocked: Callable[[MemoryNetwork], Awaitable[None]]
) -> None:
    net = MemoryNetwork(buffer_size=100, latency=0.01)
    with trio.move_on_after(1.5) as scope:
        await blocked(net)
    assert scope.cancelled_caught
    assert trio.current_time() == at(1.5)


async def test_stream_survives_a_cancelled_receive(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork(latency=0.5)
    a, b = net.stream_pair("a", "b")
    await a.send_all(b"data")
    with trio.move_on_after(0.2):
        await b.receive_some()
    assert await b.receive_some() == b"data"
    assert trio.current_time() == at(0.5)


async def test_cancelled_connect_resets_the_server_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork(latency=1.0)
    seen: list[str] = []

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await stream.receive_some()
        except trio.BrokenResourceError:
            seen.append("broken")

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", handler)
        with trio.move_on_after(1.5):  # after the SYN, before the SYN-ACK
            await net.host("a").connect("b", port)
        await trio.testing.wait_all_tasks_blocked()
        assert seen == ["broken"]
        nursery.cancel_scope.cancel()


# -- scale ---------------------------------------------------------------------------------------


async def test_ring_of_200_hosts(autojump_clock: trio.testing.MockClock) -> None:
    n = 200
    net = MemoryNetwork(latency=0.01, bandwidth=1e6)
    finished: list[float] = []

    async def peer(i: int, port: int) -> None:
        stream = await net.host(f"h{i}").connect(f"h{(i + 1) % n}", port)
        for round_ in range(5):
            message = f"{i}:{round_}:".encode().ljust(1000, b".")
            await stream.send_all(message)
            assert await receive_exactly(stream, 1000) == message
        await stream.aclose()
        finished.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        ports = [await listen(nursery, net, f"h{i}", echo, 7070) for i in range(n)]
        async with trio.open_nursery() as peers:
            for i in range(n):
                peers.start_soon(peer, i, ports[i])
        nursery.cancel_scope.cancel()
    # connect (2 x 10 ms), then five echoes of 1 ms + 10 ms each way
    assert finished == [at(0.02 + 5 * 0.022)] * n
    assert net.stats()["h0"].bytes_sent == 2 * 5 * 1000


# -- the real websocket stack on top -------------------------------------------------------------


async def test_websocket_message_arrival_time(autojump_clock: trio.testing.MockClock) -> None:
    latency, bandwidth = 0.025, 10e6
    # A window larger than the message, so TCP-like flow control does not enter the sum.
    net = MemoryNetwork(latency=latency, bandwidth=bandwidth, buffer_size=4 << 20)
    payload = bytes(range(256)) * 4096  # 1 MiB
    max_message = 2 << 20
    arrived: dict[str, object] = {}
    done = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream, max_message_size=max_message)
            ws = await request.accept()
            arrived["message"] = await ws.get_message()
            arrived["time"] = trio.current_time()
            done.set()
            await ws.aclose()

    async with trio.open_nursery() as nursery:
        port = await listen(nursery, net, "b", handler)
        stream = await net.host("a").connect("b", port)
        async with trio.open_nursery() as ws_nursery:
            ws = await wrap_client_stream(
                ws_nursery, stream, "b", "/", max_message_size=max_message
            )
            t0 = trio.current_time()
            await ws.send_message(payload)
            await done.wait()
            await ws.aclose()
        nursery.cancel_scope.cancel()
    assert arrived["message"] == payload
    # One send_all of header + payload: it leaves after (header + payload) / bandwidth and
    # arrives `latency` later. A client frame of 1 MiB has a 14-byte header (2 bytes, a 64-bit
    # length, a 4-byte mask key), and nothing else may be in the way.
    elapsed = float(arrived["time"]) - t0  # type: ignore[arg-type]
    overhead = (elapsed - latency) * bandwidth - len(payload)
    assert overhead == pytest.approx(14, abs=1e-6)
    assert elapsed == at((len(payload) + 14) / bandwidth + latency)


# -- properties ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    writes=st.lists(st.binary(min_size=0, max_size=3000), max_size=12),
    reads=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8),
    latency=st.sampled_from([0.0, 0.001, 0.05]),
    bandwidth=st.sampled_from([None, 1e4, 1e6]),
    buffer_size=st.integers(min_value=1, max_value=5000),
)
def test_bytes_arrive_intact_and_in_order(
    writes: list[bytes],
    reads: list[int],
    latency: float,
    bandwidth: float | None,
    buffer_size: int,
) -> None:
    async def main() -> None:
        net = MemoryNetwork(latency=latency, bandwidth=bandwidth, buffer_size=buffer_size)
        a, b = net.stream_pair("a", "b")
        expected = b"".join(writes)
        got = bytearray()

        async def writer() -> None:
            for w in writes:
                await a.send_all(w)
            await a.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            i = 0
            while True:
                max_bytes = reads[i % len(reads)]
                i += 1
                chunk = await b.receive_some(max_bytes)
                assert len(chunk) <= max_bytes
                if not chunk:
                    break
                got += chunk
        assert bytes(got) == expected
        if bandwidth is not None and expected:
            # The wire can never be faster than the bandwidth plus one latency.
            assert trio.current_time() >= len(expected) / bandwidth + latency - 1e-9

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
