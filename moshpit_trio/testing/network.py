"""An in-memory network of simulated hosts, with seeded fault injection, for tests and benchmarks.

Each simulated host sees the network through a :class:`MemoryHost`, which implements
:class:`moshpit_trio.wire.streams.StreamNetwork`; the real websocket, handshake and envelope code
runs on top of the byte streams it hands out, unchanged. Nothing here reads the wall clock or the
global random generator, and every wait is a trio wait, so under ``trio.testing.MockClock`` (the
``autojump_clock`` fixture) a swarm of hundreds of hosts runs in virtual time.

Timing model, per direction of a connection (exact under MockClock):

* ``send_all`` of ``n`` bytes holds the sender for ``n / rate`` seconds, where ``rate`` is the
  smallest of the link's bandwidth, the sender's upload and the receiver's download (all infinite
  by default). Transmissions that share a link direction or a host's upload/download are
  serialized first come, first served, so concurrent connections share the capacity rather than
  each getting all of it.
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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import trio

from moshpit_trio.wire.streams import StreamHandler

if TYPE_CHECKING:
    from moshpit_trio.wire.streams import StreamNetwork

__all__ = ["HostStats", "MemoryHost", "MemoryNetwork", "MemoryStream"]

# Ports handed out for ``serve(name, 0)``, counting up, so that runs are reproducible.
_FIRST_LISTEN_PORT = 10000
# Ports given to the client end of a connection; only used in reprs and ``local``/``remote``.
_FIRST_EPHEMERAL_PORT = 40000
_MAX_PORT = 65535


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
                    await d.writers.park()
                    self._check_send()
                n = min(len(payload) - pos, net.buffer_size - d.held)
                chunk = payload if n == len(payload) else bytes(view[pos : pos + n])
                d.held += n  # reserve the window before waiting, so it can never overfill
                booking = net._book(d.src, d.dst, n)
                end = trio.current_time() if booking is None else booking.end
                pushed = False
                try:
                    # Transmitting: parked rather than asleep, so that a reset or a close
                    # interrupts the sender at once instead of at the end of the transmission.
                    while trio.current_time() < end:
                        self._check_send()
                        with trio.move_on_at(end):
                            await d.writers.park()
                    self._check_send()
                    d.push(chunk, end + net._settings(d.src, d.dst).latency)
                    net._stats_of(d.src).bytes_sent += n
                    pushed = True
                finally:
                    if not pushed:
                        if booking is not None:
                            booking.release()
                        if not d.discarded:
                            d.held -= n
                            d.writers.unpark_all()
                pos += n
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


class _Booking:
    """A transmission's slot on the shared resources, so an aborted one can give it back."""

    def __init__(
        self,
        busy_until: dict[tuple[str, str, str], float],
        previous: dict[tuple[str, str, str], float | None],
        end: float,
    ) -> None:
        self._busy_until = busy_until
        self._previous = previous
        self.end = end

    def release(self) -> None:
        # Only if nobody booked after us; otherwise the slot stays an idle gap.
        for key, before in self._previous.items():
            if self._busy_until.get(key) == self.end:
                if before is None:
                    del self._busy_until[key]
                else:
                    self._busy_until[key] = before


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
        # Virtual time at which each shared resource (a link direction, a host's upload or
        # download) finishes the transmissions already booked on it.
        self._busy_until: dict[tuple[str, str, str], float] = {}
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

        ``None`` leaves a setting as it is; pass ``math.inf`` for unlimited bandwidth. Changes
        apply to live connections from their next transmission on.
        """
        s = self._links.setdefault(_pair(a, b), _LinkSettings())
        if latency is not None:
            s.latency = _check_latency(latency)
        if bandwidth is not None:
            s.bandwidth = _check_bandwidth(bandwidth)
        if drop is not None:
            s.drop = _check_drop(drop)

    def set_host(
        self, name: str, *, upload: float | None = None, download: float | None = None
    ) -> None:
        """Limit a host's total upload / download (bytes/s, shared by all its links).

        ``None`` leaves a limit as it is; ``math.inf`` removes it.
        """
        if upload is not None:
            self._upload[name] = _check_bandwidth(upload)
        if download is not None:
            self._download[name] = _check_bandwidth(download)

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

    def _book(self, src: str, dst: str, n: int) -> _Booking | None:
        """Book the transmission of ``n`` bytes from ``src`` to ``dst`` on every finite
        resource it crosses; ``None`` when all of them are unlimited."""
        limits = [
            (("link", src, dst), self._settings(src, dst).bandwidth),
            (("up", src, ""), self._upload.get(src, math.inf)),
            (("down", dst, ""), self._download.get(dst, math.inf)),
        ]
        booked = [(key, rate) for key, rate in limits if not math.isinf(rate)]
        if not booked:
            return None
        now = trio.current_time()
        start = max([now, *(self._busy_until.get(key, now) for key, _ in booked)])
        end = start + n / min(rate for _, rate in booked)
        previous = {key: self._busy_until.get(key) for key, _ in booked}
        for key, _ in booked:
            self._busy_until[key] = end
        return _Booking(self._busy_until, previous, end)

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
