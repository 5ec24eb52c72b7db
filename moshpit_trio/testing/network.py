"""An in-memory network of simulated hosts, with seeded fault injection, for tests and benchmarks.

Each simulated host sees the network through a :class:`MemoryHost`, which implements
:class:`moshpit_trio.wire.streams.StreamNetwork`; the real websocket, handshake and envelope code
runs on top of the byte streams it hands out, unchanged. Nothing here reads the wall clock or the
global random generator, and every wait is a trio wait, so under ``trio.testing.MockClock`` (the
``autojump_clock`` fixture) a swarm of hundreds of hosts runs in virtual time.

Timing model, per direction of a connection (exact under MockClock):

* ``send_all`` of ``n`` bytes is a *flow* that holds the sender until its last byte has left.
  Three resources may limit it: the link's bandwidth in that direction, the sender's upload and
  the receiver's download (all infinite by default; a flow that crosses no limited one takes no
  time). At every moment the flows in progress share these max-min fairly, as long-lived TCP
  connections roughly do (``fairshare.py``): on a full resource every flow that it holds back
  gets an equal share, and a flow held back elsewhere leaves the rest to the others. Rates are
  recomputed whenever a flow starts, finishes or is aborted (its share goes back at once) and
  when a bandwidth changes, so a flow's time is exactly its bytes integrated over the rates it
  had: two equal flows out of one upload both take twice as long as one alone, and all-to-all
  traffic among hosts takes what their bytes need, never more.
* The bytes become readable ``latency`` seconds after their transmission ends, never before bytes
  sent earlier on the same connection (delivery is in order, like TCP).
* A direction holds at most ``buffer_size`` bytes that were sent but not yet read (like a TCP
  window): ``send_all`` waits for the reader to make room, so a receiver that stops reading stalls
  its sender and memory stays bounded. Bigger writes go out in window-sized pieces.
* ``connect`` costs one round trip: the handler on the server side starts ``latency`` after the
  call, and the client gets its stream ``latency`` later.

Faults:

* ``kill(host)``: every connection of the host is reset at once. Both ends see
  ``trio.BrokenResourceError`` on their next or current ``send_all`` / ``receive_some``; bytes
  not yet read are discarded (a reset, not a graceful close: this is a crash, so the peer must
  not get a clean EOF). The host's listeners are withdrawn (its ``serve`` calls stay parked and
  accept nothing until cancelled), connects to it are refused, and its own connects and serves
  fail with ``OSError`` until ``revive``.
* ``freeze(host)`` / ``partition(...)``: the affected links stop delivering; bytes already
  readable stay readable, later ones are held (the sender keeps sending until the window fills)
  and delivered in order once ``thaw`` / ``heal`` reopens the link. Connects across a blocked link
  hang until it reopens or the caller cancels. Resets (kill, drop, a reader closing) are not held.
* ``drop`` on a link: every ``send_all`` of a non-empty buffer breaks the connection with that
  probability, before sending anything; both ends see ``trio.BrokenResourceError``. Draws come
  from a generator per connection direction, seeded from (network seed, hosts, port, the count of
  earlier connections between them on that port, direction), so the pattern of breakages does not
  depend on how trio interleaves unrelated connections.
"""

from __future__ import annotations

import errno
import math
import operator
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from moshpit_trio.testing.fairshare import FairShare, Flow
from moshpit_trio.wire.streams import StreamHandler

if TYPE_CHECKING:
    from moshpit_trio.wire.streams import StreamNetwork

__all__ = ["HostStats", "MemoryHost", "MemoryNetwork", "MemoryStream"]

# Ports handed out for ``serve(name, 0)``, counting up, so that runs are reproducible.
_FIRST_LISTEN_PORT = 10000
# Ports given to the client end of a connection; only used in reprs and ``local``/``remote``.
_FIRST_EPHEMERAL_PORT = 40000
_MAX_PORT = 65535


# A shared resource of the bandwidth model: ("link", src, dst) for one direction of a link,
# ("up", host, "") and ("down", host, "") for a host's upload and download.
_Resource = tuple[str, str, str]


@dataclass
class HostStats:
    """Traffic of one host, counted in payload bytes (no simulated framing)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    connects: int = 0
    accepts: int = 0


@dataclass
class _LinkSettings:
    latency: float | None = None
    bandwidth: float | None = None
    drop: float | None = None


class _Segment:
    """Bytes of one transmission (``data is None`` marks EOF), readable from ``arrive_at``."""

    __slots__ = ("arrive_at", "data", "delivered")

    def __init__(self, arrive_at: float, data: bytes | None) -> None:
        self.arrive_at = arrive_at
        self.data = data
        # Set once the segment reached the reader while the link was open, so that a later
        # freeze or partition does not take back bytes that had already arrived.
        self.delivered = False


class _Direction:
    """One direction of a connection: the bytes in flight plus those arrived but unread."""

    def __init__(self, conn: _Connection, src: str, dst: str, rng_seed: str) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.segments: deque[_Segment] = deque()
        self.offset = 0  # bytes of segments[0] already read
        self.held = 0  # bytes sent (or being transmitted) and not yet read: the window in use
        self.last_arrival = -math.inf
        self.eof_sent = False
        # The reading end was closed: what was in flight is gone and further sends are refused.
        self.reader_closed = False
        self.readers = trio.lowlevel.ParkingLot()
        self.writers = trio.lowlevel.ParkingLot()
        self._rng_seed = rng_seed
        self._rng: random.Random | None = None

    @property
    def discarded(self) -> bool:
        return self.conn.broken is not None or self.reader_closed

    def draw(self) -> float:
        # Created on first use: most connections never meet a lossy link.
        if self._rng is None:
            self._rng = random.Random(self._rng_seed)
        return self._rng.random()

    def push(self, data: bytes | None, arrive_at: float) -> None:
        # In-order delivery even if the link's latency was lowered mid-stream.
        arrive_at = max(arrive_at, self.last_arrival)
        self.last_arrival = arrive_at
        self.segments.append(_Segment(arrive_at, data))
        self.readers.unpark_all()

    def discard(self) -> None:
        self.segments.clear()
        self.offset = 0
        self.held = 0
        self.readers.unpark_all()
        self.writers.unpark_all()

    def settle(self, now: float) -> None:
        """Mark what has arrived by ``now`` as delivered (called just before a link closes)."""
        for seg in self.segments:
            if seg.arrive_at > now:
                break
            seg.delivered = True

    def take(
        self, max_bytes: int | None, now: float, link_open: bool
    ) -> tuple[bytes | None, float]:
        """Read what has arrived: ``(data, _)``, ``(b"", _)`` at EOF, or ``(None, wake_at)``."""
        limit = math.inf if max_bytes is None else max_bytes
        parts: list[bytes] = []
        total = 0
        segments = self.segments
        while segments and total < limit:
            seg = segments[0]
            if not seg.delivered:
                if not (link_open and seg.arrive_at <= now):
                    break
                seg.delivered = True
            data = seg.data
            if data is None:
                if parts:
                    break
                return b"", math.inf  # the EOF segment stays, so every later read sees EOF too
            start = self.offset
            n = int(min(len(data) - start, limit - total))
            parts.append(data if start == 0 and n == len(data) else data[start : start + n])
            total += n
            if start + n == len(data):
                segments.popleft()
                self.offset = 0
            else:
                self.offset = start + n
        if parts:
            self.held -= total
            self.writers.unpark_all()
            return (parts[0] if len(parts) == 1 else b"".join(parts)), math.inf
        wake_at = segments[0].arrive_at if segments and link_open else math.inf
        return None, wake_at


class _Connection:
    def __init__(self, net: MemoryNetwork, client: str, server: str, port: int, index: int) -> None:
        self.net = net
        self.client = client
        self.server = server
        # None while healthy; the reason once reset, reported in BrokenResourceError.
        self.broken: str | None = None
        base = f"{net.seed}/{client}>{server}:{port}#{index}"
        self.up = _Direction(self, client, server, base + "/up")
        self.down = _Direction(self, server, client, base + "/down")
        self.open_ends = 2

    def reset(self, reason: str) -> None:
        if self.broken is not None:
            return
        self.broken = reason
        self.up.discard()
        self.down.discard()
        self.net._forget(self)

    def end_closed(self) -> None:
        self.open_ends -= 1
        if self.open_ends == 0:
            self.net._forget(self)


class MemoryStream(trio.abc.HalfCloseableStream):
    """One end of an in-memory connection, with trio's stream semantics."""

    def __init__(
        self,
        conn: _Connection,
        send: _Direction,
        recv: _Direction,
        local: tuple[str, int],
        remote: tuple[str, int],
    ) -> None:
        self._conn = conn
        self._send = send
        self._recv = recv
        self.local = local
        self.remote = remote
        self._closed = False
        # Flags rather than locks: trio streams must raise BusyResourceError on concurrent use,
        # not queue the callers.
        self._sending = False
        self._receiving = False

    def __repr__(self) -> str:
        return (
            f"<MemoryStream {self.local[0]}:{self.local[1]} -> {self.remote[0]}:{self.remote[1]}>"
        )

    def _check_send(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this stream was closed")
        if self._send.eof_sent:
            raise trio.ClosedResourceError("cannot send after send_eof")
        if self._conn.broken is not None:
            raise trio.BrokenResourceError(self._conn.broken)
        if self._send.reader_closed:
            raise trio.BrokenResourceError("the peer closed the connection")

    def _enter_send(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._enter_send()
        try:
            await trio.lowlevel.checkpoint()
            self._check_send()
            if not data:
                return
            net = self._conn.net
            d = self._send
            drop = net._settings(d.src, d.dst).drop
            if drop and d.draw() < drop:
                self._conn.reset(f"link {d.src}<->{d.dst} dropped the connection")
                self._check_send()
            # Copy: the caller may reuse its buffer as soon as we return.
            payload = bytes(data)
            view = memoryview(payload)
            pos = 0
            while pos < len(payload):
                while d.held >= net.buffer_size:
                    if net._fair.dirty:
                        # Before waiting (see _settle_soon); it yields, so look again after.
                        await net._settle_soon()
                        continue
                    await d.writers.park()
                    self._check_send()
                n = min(len(payload) - pos, net.buffer_size - d.held)
                chunk = payload if n == len(payload) else bytes(view[pos : pos + n])
                d.held += n  # reserve the window before waiting, so it can never overfill
                flow = net._start_flow(d, n)
                pushed = False
                try:
                    if flow is not None:
                        # Transmitting: parked rather than asleep, so that a reset or a close
                        # interrupts the sender at once instead of at the end of the
                        # transmission.
                        await net._transmit(flow, self._check_send, d.writers)
                    self._check_send()
                    end = trio.current_time() if flow is None else flow.finish
                    d.push(chunk, end + net._settings(d.src, d.dst).latency)
                    net._stats_of(d.src).bytes_sent += n
                    pushed = True
                finally:
                    if flow is not None:
                        net._end_flow(flow, finished=pushed)
                    if not pushed and not d.discarded:
                        d.held -= n
                        d.writers.unpark_all()
                pos += n
            await net._settle_soon()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        self._enter_send()
        try:
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                d = self._send
                # A broken or half-closed stream does not block: send_all fails at once.
                if d.held < self._conn.net.buffer_size or d.discarded or d.eof_sent:
                    return
                await d.writers.park()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        self._enter_send()
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("this stream was closed")
            if self._send.eof_sent:
                return
            if self._conn.broken is not None:
                raise trio.BrokenResourceError(self._conn.broken)
            self._push_eof()
        finally:
            self._sending = False

    def _push_eof(self) -> None:
        d = self._send
        d.eof_sent = True
        if not d.discarded:
            net = self._conn.net
            d.push(None, trio.current_time() + net._settings(d.src, d.dst).latency)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio's streams do
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            net = self._conn.net
            d = self._recv
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this stream was closed")
                if self._conn.broken is not None:
                    raise trio.BrokenResourceError(self._conn.broken)
                data, wake_at = d.take(max_bytes, trio.current_time(), net._open(d.src, d.dst))
                if data is not None:
                    if data:
                        net._stats_of(d.dst).bytes_received += len(data)
                    return data
                # Parked until something changes (new bytes, a read, a fault) or the head
                # segment's arrival time, whichever comes first.
                with trio.move_on_at(wake_at):
                    await d.readers.park()
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._send.eof_sent:
                self._push_eof()
            recv = self._recv
            if not recv.reader_closed:
                recv.reader_closed = True
                recv.discard()  # frees the window and wakes the peer's blocked sends
            # Wake our own tasks blocked in send/receive: they now raise ClosedResourceError.
            self._send.writers.unpark_all()
            self._conn.end_closed()
        await trio.lowlevel.checkpoint()


class _Listener:
    def __init__(self, handler: StreamHandler, nursery: trio.Nursery) -> None:
        self.handler = handler
        self.nursery = nursery


class _LinkView:
    """Effective settings of one host pair (defaults filled in)."""

    __slots__ = ("bandwidth", "drop", "latency")

    def __init__(self, latency: float, bandwidth: float, drop: float) -> None:
        self.latency = latency
        self.bandwidth = bandwidth
        self.drop = drop


class MemoryNetwork:
    """A simulated network; ``host(name)`` gives the :class:`StreamNetwork` of one host.

    ``latency`` (one-way, seconds), ``bandwidth`` (bytes/s, ``None`` = unlimited) and ``drop``
    are the defaults of every link, ``buffer_size`` the window of every connection direction.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: float = 0.0,
        bandwidth: float | None = None,
        buffer_size: int = 1 << 20,
        drop: float = 0.0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.seed = seed
        self.buffer_size = buffer_size
        self._default = _LinkView(
            _check_latency(latency), _check_bandwidth(bandwidth), _check_drop(drop)
        )
        self._links: dict[tuple[str, str], _LinkSettings] = {}
        self._upload: dict[str, float] = {}
        self._download: dict[str, float] = {}
        # The transmissions in progress, sharing the link directions and the hosts' uploads
        # and downloads max-min fairly.
        self._fair: FairShare[_Resource] = FairShare(self._capacity)
        # Whether any bandwidth was ever limited: if not, no transmission takes time and the
        # model is skipped (most tests and the DHT benchmark).
        self._limited = not math.isinf(self._default.bandwidth)
        self._hosts: dict[str, MemoryHost] = {}
        self._stats: dict[str, HostStats] = {}
        self._dead: set[str] = set()
        self._frozen: set[str] = set()
        self._group: dict[str, int] = {}  # partition: host -> group; unlisted hosts share -1
        self._listeners: dict[tuple[str, int], _Listener] = {}
        self._next_port: dict[str, int] = {}
        self._next_ephemeral: dict[str, int] = {}
        self._conn_count: dict[tuple[str, str, int], int] = {}
        # Dicts used as ordered sets: wake-ups then happen in a reproducible order.
        self._conns: dict[_Connection, None] = {}
        self._host_conns: dict[str, dict[_Connection, None]] = {}
        # Connects waiting for a blocked link to reopen.
        self._topology = trio.lowlevel.ParkingLot()

    # -- hosts and settings ------------------------------------------------------------------

    def host(self, name: str) -> MemoryHost:
        h = self._hosts.get(name)
        if h is None:
            h = self._hosts[name] = MemoryHost(self, name)
        return h

    def set_link(
        self,
        a: str,
        b: str,
        *,
        latency: float | None = None,
        bandwidth: float | None = None,
        drop: float | None = None,
    ) -> None:
        """Override the settings of the link between ``a`` and ``b`` (both directions).

        ``None`` leaves a setting as it is; pass ``math.inf`` for unlimited bandwidth. A new
        bandwidth applies at once, to transmissions in progress too; latency and drop apply to
        live connections from their next transmission on.
        """
        s = self._links.setdefault(_pair(a, b), _LinkSettings())
        if latency is not None:
            s.latency = _check_latency(latency)
        if bandwidth is not None:
            s.bandwidth = _check_bandwidth(bandwidth)
            self._limited |= not math.isinf(s.bandwidth)
            self._capacity_changed((("link", a, b), ("link", b, a)))
        if drop is not None:
            s.drop = _check_drop(drop)

    def set_host(
        self, name: str, *, upload: float | None = None, download: float | None = None
    ) -> None:
        """Limit a host's total upload / download (bytes/s, shared fairly by all its flows).

        ``None`` leaves a limit as it is; ``math.inf`` removes it. It applies at once, to
        transmissions in progress too.
        """
        if upload is not None:
            self._upload[name] = _check_bandwidth(upload)
            self._limited |= not math.isinf(self._upload[name])
            self._capacity_changed([("up", name, "")])
        if download is not None:
            self._download[name] = _check_bandwidth(download)
            self._limited |= not math.isinf(self._download[name])
            self._capacity_changed([("down", name, "")])

    def stream_pair(self, a: str, b: str, port: int = 0) -> tuple[MemoryStream, MemoryStream]:
        """A connection from ``a`` to ``b`` that is already open: no listener, no handshake
        time. For unit tests of code that takes a stream; faults and timing apply as usual."""
        for name in (a, b):
            if name in self._dead:
                raise OSError(errno.ENETDOWN, f"host {name} is down")
        return self._connect_pair(a, b, port)

    def stats(self) -> dict[str, HostStats]:
        """A snapshot of the traffic of every host that sent, received or connected."""
        return {name: replace(s) for name, s in sorted(self._stats.items())}

    # -- faults ------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        self._dead.add(name)
        for conn in list(self._host_conns.get(name, ())):
            conn.reset(f"connection reset: host {name} was killed")
        for key in [k for k in self._listeners if k[0] == name]:
            del self._listeners[key]
        self._topology.unpark_all()  # its pending connects fail

    def revive(self, name: str) -> None:
        self._dead.discard(name)

    def freeze(self, name: str) -> None:
        self._settle(self._host_conns.get(name, ()))
        self._frozen.add(name)

    def thaw(self, name: str) -> None:
        self._frozen.discard(name)
        self._wake(self._host_conns.get(name, ()))

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the hosts into groups that cannot reach each other; replaces any partition.

        Hosts named in no group together form one more group, so ``partition(["a"])`` cuts
        ``a`` off from everyone else.
        """
        group: dict[str, int] = {}
        for i, members in enumerate(groups):
            for name in members:
                if name in group:
                    raise ValueError(f"host {name!r} is in two groups")
                group[name] = i
        self._settle(self._conns)
        self._group = group
        self._wake(self._conns)

    def heal(self) -> None:
        self._group = {}
        self._wake(self._conns)

    # -- internals ---------------------------------------------------------------------------

    def _open(self, a: str, b: str) -> bool:
        """Whether bytes can currently travel between ``a`` and ``b``."""
        if a in self._frozen or b in self._frozen:
            return False
        return self._group.get(a, -1) == self._group.get(b, -1)

    def _settle(self, conns: Iterable[_Connection]) -> None:
        conns = list(conns)
        if not conns:
            return  # also lets faults be set up before trio.run, when there is no clock yet
        now = trio.current_time()
        for conn in conns:
            for d in (conn.up, conn.down):
                if self._open(d.src, d.dst):
                    d.settle(now)

    def _wake(self, conns: Iterable[_Connection]) -> None:
        for conn in list(conns):
            conn.up.readers.unpark_all()
            conn.down.readers.unpark_all()
        self._topology.unpark_all()

    def _settings(self, a: str, b: str) -> _LinkView:
        s = self._links.get(_pair(a, b))
        d = self._default
        if s is None:
            return d
        return _LinkView(
            d.latency if s.latency is None else s.latency,
            d.bandwidth if s.bandwidth is None else s.bandwidth,
            d.drop if s.drop is None else s.drop,
        )

    def _stats_of(self, name: str) -> HostStats:
        s = self._stats.get(name)
        if s is None:
            s = self._stats[name] = HostStats()
        return s

    # -- bandwidth ---------------------------------------------------------------------------

    def _capacity(self, resource: _Resource) -> float:
        kind, a, b = resource
        if kind == "link":
            return self._settings(a, b).bandwidth
        limits = self._upload if kind == "up" else self._download
        return limits.get(a, math.inf)

    def _start_flow(self, d: _Direction, n: int) -> Flow[_Resource] | None:
        """A transmission of ``n`` bytes on ``d`` in the fair-share model; ``None`` when
        nothing it crosses is limited (it takes no time)."""
        if not self._limited:
            return None
        resources = (("link", d.src, d.dst), ("up", d.src, ""), ("down", d.dst, ""))
        if all(math.isinf(self._capacity(r)) for r in resources):
            return None
        return self._fair.start(resources, n, trio.current_time(), d)

    async def _transmit(
        self, flow: Flow[_Resource], check: Callable[[], None], lot: trio.lowlevel.ParkingLot
    ) -> None:
        """Wait until the flow's last byte has left, at whatever rates it gets meanwhile.

        ``check`` raises if the stream broke; ``lot`` is where the sender parks, unparked by a
        fault and by a recomputation that brings the flow's finish forward.
        """
        fair = self._fair
        yielded = False
        while True:
            check()
            now = trio.current_time()
            if flow.finish <= now:
                return
            if fair.dirty and not yielded:
                # Let every task due at this instant start or end its flows first, so that
                # they all cost one recomputation. (Time cannot pass meanwhile: this task is
                # ready to run again.)
                yielded = True
                await trio.lowlevel.checkpoint()
                continue
            self._reallocate(now)
            if flow.finish <= now:
                return
            yielded = False
            flow.wake_at = flow.finish
            with trio.move_on_at(flow.finish):
                await lot.park()

    def _end_flow(self, flow: Flow[_Resource], *, finished: bool) -> None:
        now = trio.current_time()
        self._fair.stop(flow, now)
        if not finished:
            self._reallocate(now)  # aborted: its share goes back to the others at once

    async def _settle_soon(self) -> None:
        """After a flow ended, before the sender waits or returns: the flows that get its share
        must learn their new finish times at this instant. One checkpoint first, so that every
        flow ending at this instant is counted in one recomputation."""
        if self._fair.dirty:
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._reallocate(trio.current_time())

    def _reallocate(self, now: float) -> None:
        for flow in self._fair.settle(now):
            direction = flow.tag
            assert isinstance(direction, _Direction)
            direction.writers.unpark_all()

    def _capacity_changed(self, resources: Iterable[_Resource]) -> None:
        self._fair.touch(resources)
        if self._fair.dirty:  # only with flows in progress, so inside trio.run
            self._reallocate(trio.current_time())

    async def _wait_open(self, src: str, dst: str) -> None:
        while True:
            if src in self._dead:
                raise OSError(errno.ENETDOWN, f"host {src} is down")
            if self._open(src, dst):
                return
            await self._topology.park()

    def _connect_pair(
        self, client: str, server: str, port: int
    ) -> tuple[MemoryStream, MemoryStream]:
        key = (client, server, port)
        index = self._conn_count.get(key, 0)
        self._conn_count[key] = index + 1
        conn = _Connection(self, client, server, port, index)
        self._conns[conn] = None
        self._host_conns.setdefault(client, {})[conn] = None
        self._host_conns.setdefault(server, {})[conn] = None
        eport = self._next_ephemeral.get(client, _FIRST_EPHEMERAL_PORT)
        self._next_ephemeral[client] = _FIRST_EPHEMERAL_PORT if eport >= _MAX_PORT else eport + 1
        client_stream = MemoryStream(conn, conn.up, conn.down, (client, eport), (server, port))
        server_stream = MemoryStream(conn, conn.down, conn.up, (server, port), (client, eport))
        self._stats_of(client).connects += 1
        self._stats_of(server).accepts += 1
        return client_stream, server_stream

    def _forget(self, conn: _Connection) -> None:
        self._conns.pop(conn, None)
        for name in (conn.client, conn.server):
            conns = self._host_conns.get(name)
            if conns is not None:
                conns.pop(conn, None)

    def _free_port(self, name: str) -> int:
        port = self._next_port.get(name, _FIRST_LISTEN_PORT)
        for _ in range(_MAX_PORT):
            if port > _MAX_PORT:
                port = _FIRST_LISTEN_PORT
            if (name, port) not in self._listeners:
                self._next_port[name] = port + 1
                return port
            port += 1
        raise OSError(errno.EADDRINUSE, f"no free port on {name}")


class MemoryHost:
    """The network as seen from one host: a :class:`StreamNetwork` over memory."""

    def __init__(self, net: MemoryNetwork, name: str) -> None:
        self.net = net
        self.name = name

    def __repr__(self) -> str:
        return f"<MemoryHost {self.name}>"

    async def connect(self, host: str, port: int) -> MemoryStream:
        """Dial (host, port), taking one round trip.

        Raises ``ConnectionRefusedError`` when nothing listens there (or the host is dead),
        ``OSError`` when this host is dead, and hangs while the link is frozen or partitioned.
        """
        net = self.net
        src = self.name
        await trio.lowlevel.checkpoint()
        await net._wait_open(src, host)
        latency = net._settings(src, host).latency
        await trio.sleep(latency)  # the SYN travels
        await net._wait_open(src, host)  # ... and is held while the link is blocked
        listener = net._listeners.get((host, port))
        if listener is None or host in net._dead:
            await trio.sleep(latency)  # the refusal travels back
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"connection refused: nothing listens on {host}:{port}"
            )
        client_stream, server_stream = net._connect_pair(src, host, port)
        listener.nursery.start_soon(listener.handler, server_stream)
        try:
            await trio.sleep(latency)  # the SYN-ACK travels back
            await net._wait_open(src, host)
        except BaseException:
            # The server already has its end: reset it rather than leave it waiting forever.
            client_stream._conn.reset("the client gave up connecting")
            raise
        broken = client_stream._conn.broken
        if broken is not None:
            raise ConnectionResetError(errno.ECONNRESET, broken)
        return client_stream

    async def serve(
        self,
        host: str,
        port: int,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on (self.name, port) until cancelled, running ``handler`` per connection.

        Handlers run in a nursery of their own inside this call, so cancelling ``serve`` also
        cancels them (as with ``TcpNetwork``). If the host is killed the listener is withdrawn
        and this call stays parked, accepting nothing, until cancelled.
        """
        net = self.net
        await trio.lowlevel.checkpoint()
        if host != self.name:
            raise ValueError(f"host {self.name} can only listen on itself, not on {host!r}")
        if self.name in net._dead:
            raise OSError(errno.EADDRNOTAVAIL, f"host {self.name} is down")
        if not 0 <= port <= _MAX_PORT:
            raise OverflowError(f"port must be 0-{_MAX_PORT}, got {port}")
        if port == 0:
            port = net._free_port(self.name)
        elif (self.name, port) in net._listeners:
            raise OSError(errno.EADDRINUSE, f"address already in use: {self.name}:{port}")
        key = (self.name, port)
        async with trio.open_nursery() as nursery:
            listener = _Listener(handler, nursery)
            net._listeners[key] = listener
            try:
                task_status.started(key)
                await trio.sleep_forever()
            finally:
                # Withdrawn before the nursery closes, so no connect can reach a closed nursery.
                if net._listeners.get(key) is listener:
                    del net._listeners[key]


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a <= b else (b, a)


def _check_latency(latency: float) -> float:
    if not latency >= 0 or math.isinf(latency):
        raise ValueError(f"latency must be finite and >= 0, got {latency}")
    return float(latency)


def _check_bandwidth(bandwidth: float | None) -> float:
    if bandwidth is None:
        return math.inf
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    return float(bandwidth)


def _check_drop(drop: float) -> float:
    if not 0 <= drop <= 1:
        raise ValueError(f"drop must be a probability, got {drop}")
    return float(drop)


if TYPE_CHECKING:
    # MemoryHost must stay a drop-in StreamNetwork.
    def _is_stream_network(host: MemoryHost) -> StreamNetwork:
        return host
