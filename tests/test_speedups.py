"""moshpit_trio.wire.speedups: every patch gives byte-identical results to what it replaces."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing
import trio_websocket
import wsproto.frame_protocol as fp
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from moshpit_trio.wire import speedups

ORIGINAL_MASKER = fp.XorMaskerSimple
ORIGINAL_BUFFER = fp.Buffer
ORIGINAL_SERIALIZE = fp.FrameProtocol._serialize_frame
if speedups.installed():  # something imported earlier already installed them
    ORIGINAL_MASKER = speedups._applied["masker"]
    ORIGINAL_BUFFER = speedups._applied["buffer"]
    ORIGINAL_SERIALIZE = speedups._applied["frames"]

keys = st.binary(min_size=4, max_size=4)


@pytest.fixture(autouse=True)
def _speedups_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the speedups themselves: run them even where the environment
    opts out (MOSHPIT_NO_SPEEDUPS=1 makes install() a no-op, tested on its own below)."""
    monkeypatch.delenv("MOSHPIT_NO_SPEEDUPS", raising=False)


@pytest.fixture
def patched() -> Iterator[None]:
    """Install for one test; leave the process as it was found."""
    was = speedups.installed()
    speedups.install()
    try:
        yield
    finally:
        if not was:
            speedups.uninstall()


@pytest.fixture
def unpatched() -> Iterator[None]:
    was = speedups.installed()
    speedups.uninstall()
    try:
        yield
    finally:
        if was:
            speedups.install()


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# ---- masker ---------------------------------------------------------------------------------


@given(data=st.binary(max_size=3000), key=keys, cuts=st.lists(st.integers(0, 3000), max_size=6))
def test_masker_matches_original_across_partial_frames(
    data: bytes, key: bytes, cuts: list[int]
) -> None:
    # One masker per frame, fed the frame in pieces: the key rotation must carry over.
    ours, theirs = speedups.FastXorMasker(key), ORIGINAL_MASKER(bytearray(key))
    got, want = bytearray(), bytearray()
    for piece in _pieces(data, cuts):
        got += ours.process(bytearray(piece))
        want += theirs.process(bytearray(piece))
    assert bytes(got) == bytes(want)
    # masking twice with a fresh masker gives the data back
    assert bytes(speedups.FastXorMasker(key).process(got)) == data


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 8, 9, 511, 512, 513, 4096 + 5, (1 << 20) + 3])
@pytest.mark.parametrize("offset", [0, 1, 3, 5])
def test_xor_mask_sizes_and_unaligned_buffers(n: int, offset: int) -> None:
    key = os.urandom(4)
    raw = os.urandom(n + offset)
    # a bytearray whose data starts at an odd address: delete from the front (CPython keeps the
    # allocation and moves the start)
    buf = bytearray(raw)
    del buf[:offset]
    speedups.xor_mask(buf, key)
    assert bytes(buf) == bytes(ORIGINAL_MASKER(key).process(bytearray(raw[offset:])))


@given(data=st.binary(min_size=0, max_size=2000), key=keys)
def test_masked_copy_matches_xor_mask(data: bytes, key: bytes) -> None:
    expected = bytearray(data)
    speedups.xor_mask(expected, key)
    assert b"".join(speedups.masked_copy(data, key)) == bytes(expected)


def test_masker_in_place_for_bytearray_copy_otherwise() -> None:
    key = b"\x01\x02\x03\x04"
    buf = bytearray(b"abcdefgh")
    assert speedups.FastXorMasker(key).process(buf) is buf
    src = b"abcdefgh"
    out = speedups.FastXorMasker(key).process(src)
    assert isinstance(out, bytearray)
    assert src == b"abcdefgh"
    big = os.urandom(10_001)
    masker = speedups.FastXorMasker(key)
    out = masker.process(big)
    assert type(out) is bytes  # so the decoder's bytes(payload) is free
    assert out == ORIGINAL_MASKER(key).process(bytearray(big))
    assert masker._masking_key == key[1:] + key[:1]
    with pytest.raises(ValueError):
        speedups.FastXorMasker(b"abc")


# ---- frame writer ---------------------------------------------------------------------------


def _both_frames(
    monkeypatch: pytest.MonkeyPatch, client: bool, opcode: fp.Opcode, payload: bytes, fin: bool
) -> tuple[bytes, bytes]:
    key = os.urandom(4)
    monkeypatch.setattr(os, "urandom", lambda n: key[:n])
    proto = fp.FrameProtocol(client=client, extensions=[])
    ours = speedups._serialize_frame(proto, opcode, payload, fin)
    theirs = ORIGINAL_SERIALIZE(proto, opcode, payload, fin)
    monkeypatch.undo()
    return ours, bytes(theirs)


@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("n", [0, 1, 125, 126, 511, 512, 65535, 65536, 70001, (4 << 20) + 300])
def test_frame_writer_matches_original(
    monkeypatch: pytest.MonkeyPatch, client: bool, n: int
) -> None:
    payload = os.urandom(n)
    for opcode, fin in [(fp.Opcode.BINARY, True), (fp.Opcode.CONTINUATION, False)]:
        ours, theirs = _both_frames(monkeypatch, client, opcode, payload, fin)
        assert type(ours) is bytes
        assert ours == theirs


@given(payload=st.binary(max_size=700), client=st.booleans(), fin=st.booleans())
def test_frame_writer_matches_original_small(payload: bytes, client: bool, fin: bool) -> None:
    with pytest.MonkeyPatch.context() as mp:
        ours, theirs = _both_frames(mp, client, fp.Opcode.BINARY, payload, fin)
    assert ours == theirs


@pytest.mark.parametrize("client", [True, False])
def test_frame_writer_control_frames(monkeypatch: pytest.MonkeyPatch, client: bool) -> None:
    ours, theirs = _both_frames(monkeypatch, client, fp.Opcode.PING, b"ping!", True)
    assert ours == theirs
    proto = fp.FrameProtocol(client=client, extensions=[])
    with pytest.raises(ValueError):
        speedups._serialize_frame(proto, fp.Opcode.PING, b"x" * 126)


def test_frame_writer_accepts_memoryview(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(1000)
    ours, theirs = _both_frames(monkeypatch, True, fp.Opcode.BINARY, data, True)
    key = ours[4:8]
    monkeypatch.setattr(os, "urandom", lambda n: key[:n])
    proto = fp.FrameProtocol(client=True, extensions=[])
    assert speedups._serialize_frame(proto, fp.Opcode.BINARY, memoryview(data)) == theirs


# ---- whole-frame receive buffer, and wsproto end to end --------------------------------------


def _transfer(
    messages: list[bytes], cuts: list[int], *, client_sends: bool
) -> list[tuple[bytes, bool]]:
    """Send ``messages`` through a wsproto pair, feeding the wire in pieces; return events."""
    sender = Connection(ConnectionType.CLIENT if client_sends else ConnectionType.SERVER)
    receiver = Connection(ConnectionType.SERVER if client_sends else ConnectionType.CLIENT)
    wire = b"".join(sender.send(BytesMessage(data=m)) for m in messages)
    wire += sender.send(TextMessage(data="héllo"))
    wire += sender.send(Ping(payload=b"p"))
    events: list[tuple[bytes, bool]] = []
    for piece in _pieces(wire, cuts):
        receiver.receive_data(piece)
        for event in receiver.events():
            if isinstance(event, BytesMessage):
                assert type(event.data) is bytes
                events.append((event.data, event.message_finished))
            elif isinstance(event, TextMessage):
                events.append((event.data.encode(), event.message_finished))
            elif isinstance(event, Ping):
                events.append((b"PING" + bytes(event.payload), True))
    return events


def _messages(events: list[tuple[bytes, bool]]) -> list[bytes]:
    out, part = [], b""
    for data, finished in events:
        part += data
        if finished:
            out.append(part)
            part = b""
    return out


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=70_000), max_size=4),
    cuts=st.lists(st.integers(0, 300_000), max_size=12),
    client_sends=st.booleans(),
)
def test_wsproto_roundtrip_patched_matches_unpatched(
    messages: list[bytes], cuts: list[int], client_sends: bool
) -> None:
    was = speedups.installed()
    try:
        speedups.uninstall()
        want = _messages(_transfer(messages, cuts, client_sends=client_sends))
        speedups.install()
        events = _transfer(messages, cuts, client_sends=client_sends)
    finally:
        if not was:
            speedups.uninstall()
    assert _messages(events) == want == [*messages, "héllo".encode(), b"PINGp"]
    # every data frame comes out whole: one event per message
    assert all(finished for _, finished in events)


def test_frames_above_the_limit_still_stream(
    patched: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(speedups, "WHOLE_FRAME_LIMIT", 1000)
    message = os.urandom(5000)
    events = _transfer([message], list(range(0, 6000, 700)), client_sends=True)
    assert _messages(events)[0] == message
    assert sum(1 for _, finished in events if not finished) >= 3


@given(
    chunks=st.lists(st.binary(min_size=1, max_size=50), max_size=8),
    ops=st.lists(st.tuples(st.sampled_from("xacr"), st.integers(0, 60)), max_size=30),
)
def test_frame_buffer_matches_original_buffer(
    chunks: list[bytes], ops: list[tuple[str, int]]
) -> None:
    ours, theirs = speedups.FrameBuffer(), ORIGINAL_BUFFER()
    for chunk in chunks:
        ours.feed(chunk)
        theirs.feed(chunk)
    for op, n in ops:
        if op == "x":
            assert ours.consume_exactly(n) == theirs.consume_exactly(n)
        elif op == "a":
            available = len(theirs) - theirs.bytes_used
            if n <= available:  # the one deliberate difference: no partial answers
                got = ours.consume_at_most(n)
                assert type(got) in (bytes, bytearray)
                assert got == theirs.consume_at_most(n)
            else:
                assert ours.consume_at_most(n) == b""
        elif op == "c":
            ours.commit()
            theirs.commit()
        else:
            ours.rollback()
            theirs.rollback()
        assert len(ours) == len(theirs)
        assert ours.bytes_used == theirs.bytes_used


def test_frame_buffer_hands_over_whole_chunks() -> None:
    chunk = os.urandom(1000)
    buf = speedups.FrameBuffer(b"hd")
    buf.feed(chunk)
    assert buf.consume_exactly(2) == b"hd"
    buf.commit()
    assert buf.consume_at_most(1000) is chunk


def test_frame_buffer_gives_masked_payloads_mutable() -> None:
    # what FrameDecoder does for a masked frame, then for an unmasked one
    buf = speedups.FrameBuffer(b"\x82\x85" + b"KEYS" + b"hello" + b"\x82\x03" + b"bye")
    assert buf.consume_exactly(2) == b"\x82\x85"
    assert buf.consume_exactly(4) == b"KEYS"
    buf.commit()
    payload = buf.consume_at_most(5)
    assert type(payload) is bytearray and payload == b"hello"
    buf.commit()
    assert buf.consume_exactly(2) == b"\x82\x03"
    buf.commit()
    payload = buf.consume_at_most(3)
    assert type(payload) is bytes and payload == b"bye"


def test_frame_buffer_hands_large_masked_payloads_over_as_pieces(patched: None) -> None:
    key, data = os.urandom(4), os.urandom(3001)
    masked = bytearray(data)
    speedups.xor_mask(masked, key)
    buf = speedups.FrameBuffer(b"\x82\xfe" + len(data).to_bytes(2, "big") + key)
    for a, b in [(0, 5), (5, 1234), (1234, 3001)]:  # three reads, cut off the 4-byte grid
        buf.feed(bytes(masked[a:b]))
    assert buf.consume_exactly(2) == b"\x82\xfe"
    assert buf.consume_exactly(2) == len(data).to_bytes(2, "big")
    assert buf.consume_exactly(4) == key
    buf.commit()
    payload = buf.consume_at_most(len(data))
    assert type(payload) is speedups.MaskedPayload and len(payload) == len(data)
    assert len(payload.pieces) == 3
    assert bytes(payload) == masked  # what the null masker would let through
    masker = speedups.FastXorMasker(key)
    out = masker.process(payload)
    assert type(out) is bytes and out == data
    assert masker._masking_key == key[1:] + key[:1]  # rotated by 3001 % 4, as always


def test_frame_buffer_masked_pieces_need_the_fast_masker(unpatched: None) -> None:
    buf = speedups.FrameBuffer(b"\x82\xfe\x03\xe8KEYS" + bytes(1000))
    buf.consume_exactly(2), buf.consume_exactly(2), buf.consume_exactly(4)
    assert type(buf.consume_at_most(1000)) is bytearray  # wsproto's own masker takes these


def test_frame_buffer_snapshots_mutable_input() -> None:
    buf = speedups.FrameBuffer(b"ab")
    data = bytearray(b"cd")
    buf.feed(data)
    data[:] = b"zz"
    assert buf.consume_exactly(4) == b"abcd"


# ---- install / uninstall ---------------------------------------------------------------------


def test_install_is_idempotent_and_reversible(unpatched: None) -> None:
    first = speedups.install()
    second = speedups.install()
    assert first == second
    assert first.masker and first.frames and first.buffer
    assert fp.XorMaskerSimple is speedups.FastXorMasker
    assert fp.Buffer is speedups.FrameBuffer
    assert fp.FrameProtocol._serialize_frame is speedups._serialize_frame
    assert speedups.installed()
    speedups.uninstall()
    speedups.uninstall()
    assert fp.XorMaskerSimple is ORIGINAL_MASKER
    assert fp.Buffer is ORIGINAL_BUFFER
    assert fp.FrameProtocol._serialize_frame is ORIGINAL_SERIALIZE
    assert not speedups.installed()


def test_install_respects_opt_out(unpatched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSHPIT_NO_SPEEDUPS", "1")
    report = speedups.install()
    assert not (report.masker or report.frames or report.buffer or report.malloc)
    assert fp.XorMaskerSimple is ORIGINAL_MASKER


def test_install_skips_unknown_wsproto(unpatched: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speedups, "_wsproto_version", lambda: ("9.0", (9, 0)))
    report = speedups.install(malloc=False)
    assert not (report.masker or report.frames or report.buffer)
    assert fp.Buffer is ORIGINAL_BUFFER


def test_partial_install(unpatched: None) -> None:
    report = speedups.install(masker=True, frames=False, buffer=False, malloc=False)
    assert report.masker and not report.frames and not report.buffer
    assert fp.Buffer is ORIGINAL_BUFFER
    assert not speedups.installed()


def test_tune_malloc() -> None:
    result = speedups.tune_malloc()
    assert isinstance(result, bool)
    if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or os.path.exists("/usr/lib/libc.so.6"):
        assert result
    assert speedups.tune_malloc() == result


# ---- trio-websocket over real loopback sockets -------------------------------------------------


@pytest.mark.slow
async def test_trio_websocket_both_directions(patched: None) -> None:
    sizes = [0, 1, 125, 126, 70_000, 3 * 1024 * 1024 + 7]
    payloads = [os.urandom(n) for n in sizes]
    got: list[bytes] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for _ in payloads:
            message = await ws.get_message()
            assert isinstance(message, bytes)
            got.append(message)
            await ws.send_message(message)  # echo: server -> client, unmasked

    kwargs = {
        "max_message_size": 4 * 1024 * 1024,
        "receive_buffer_size": speedups.RECEIVE_BUFFER_SIZE,
    }
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: trio_websocket.serve_websocket(
                    handler, "127.0.0.1", 0, None, task_status=task_status, **kwargs
                )
            )
            async with trio_websocket.open_websocket(
                "127.0.0.1", server.port, "/", use_ssl=False, **kwargs
            ) as ws:
                for payload in payloads:
                    await ws.send_message(payload)  # client -> server, masked
                    assert await ws.get_message() == payload
            nursery.cancel_scope.cancel()
    assert got == payloads


def test_close_frames_still_work(patched: None) -> None:
    client = Connection(ConnectionType.CLIENT)
    server = Connection(ConnectionType.SERVER)
    server.receive_data(client.send(CloseConnection(code=1000, reason="bye")))
    (event,) = list(server.events())
    assert isinstance(event, CloseConnection)
    assert (event.code, event.reason) == (1000, "bye")
