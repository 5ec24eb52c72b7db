"""Where bytes come from: the byte-stream networks the transport runs over.

The transport speaks websocket + our handshake + envelopes over any ``trio.abc.Stream``. A
``StreamNetwork`` says how to dial a (host, port) and how to listen on one. ``TcpNetwork`` is the
real thing; ``moshpit_trio.testing.MemoryNetwork`` gives each simulated host a network with the
same two calls, so tests run the very same protocol code over memory, under a virtual clock.
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

__all__ = ["Pacer", "StreamHandler", "StreamNetwork", "TcpNetwork", "pacer_for"]

StreamHandler = Callable[[trio.abc.Stream], Awaitable[None]]

# Large kernel buffers: tensors move in multi-megabyte messages, and the default socket buffers
# make the loopback benchmark stall on window updates. Asked for only where the kernel grants
# all of it (net.core.rmem_max / wmem_max): setting a buffer turns Linux's autotuning off for
# it, and a stock kernel caps the request at 208 KiB, so a socket would be pinned far below
# what autotuning reaches (6 MiB to receive, 4 MiB to send): on a 100 ms path that window
# allows about 17 Mbit/s. (With the stock caps, auth throughput on loopback here fell from
# about 1,900 to 900-1,100 MB/s when the pinned buffers were asked for.)
_SOCKET_BUFFER = 4 * 1024 * 1024
_BUFFER_CAPS = {
    socket.SO_RCVBUF: "/proc/sys/net/core/rmem_max",
    socket.SO_SNDBUF: "/proc/sys/net/core/wmem_max",
}
# trio's SocketStream sets TCP_NOTSENT_LOWAT to 16 KiB (latency for interactive traffic): the
# kernel then takes about one 64 KB segment per send() on a real link and wakes the writer for
# every one, some 1,000 trips through trio's scheduler per process in an all-reduce round of
# 10M floats over 1 Gbit/s. 1 MiB lets one send() queue about that much, while a small message
# (a ping's answer) queued behind it waits at most about 1 MiB's time on the link.
_NOTSENT_LOWAT = 1024 * 1024


class StreamNetwork(Protocol):
    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        """Open a byte stream to (host, port); raise ``OSError`` when nothing answers there."""
        ...

    async def serve(
        self,
        host: str,
        port: int,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on (host, port) (port 0 picks one), report ``(host, port)`` through
        ``task_status.started`` and run ``handler(stream)`` in a task of its own for every
        accepted stream until cancelled. The handler owns the stream and closes it."""
        ...


def _kernel_cap(path: str) -> int | None:
    """The kernel's cap on a socket buffer request (a sysctl's value), or None where it cannot
    be read (not Linux)."""
    try:
        with open(path, encoding="ascii") as file:
            return int(file.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _tune(sock: Any) -> None:
    for opt, cap_path in _BUFFER_CAPS.items():
        cap = _kernel_cap(cap_path)
        if cap is not None and cap < _SOCKET_BUFFER:
            continue  # it would be cut down and pinned there: autotuning does better
        # best effort: the kernel may refuse it, and the defaults still work
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
    notsent = getattr(socket, "TCP_NOTSENT_LOWAT", None)
    if notsent is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, notsent, _NOTSENT_LOWAT)


# SO_MAX_PACING_RATE (Linux 3.13+; Python's socket module does not name it): the most bytes
# per second the kernel sends on the socket, spacing its packets out (TCP paces internally
# once it is set, whatever the congestion control and the queueing discipline).
_SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
_UNPACED = (1 << 64) - 1  # the kernel's "no cap"

#: Caps the rate a connection's socket sends at (bytes/s), or lifts the cap (None).
Pacer = Callable[[float | None], None]


def pacer_for(stream: trio.abc.Stream) -> Pacer | None:
    """A :data:`Pacer` for ``stream``'s socket when it is a TCP socket on Linux, else None (a
    stream in memory, a relay's pipe, another platform: nothing to pace)."""
    sock = getattr(stream, "socket", None)
    if not sys.platform.startswith("linux") or sock is None:
        return None
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None

    def pace(rate: float | None) -> None:
        if rate is None or not math.isfinite(rate):
            value = _UNPACED
        else:
            value = max(1, min(int(rate), _UNPACED - 1))
        # best effort, like the buffer sizes: an older kernel refuses it, and nothing but the
        # pacing is lost
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, _SO_MAX_PACING_RATE, struct.pack("=Q", value))

    return pace


class TcpNetwork:
    """Real TCP sockets (TCP_NODELAY on, large buffers)."""

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(host, port)
        _tune(stream.socket)
        return stream

    async def serve(
        self,
        host: str,
        port: int,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        for listener in listeners:
            _tune(listener.socket)
        sockname = listeners[0].socket.getsockname()

        async def tuned(stream: trio.SocketStream) -> None:
            _tune(stream.socket)
            await handler(stream)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, tuned, listeners)
            task_status.started((host, int(sockname[1])))
