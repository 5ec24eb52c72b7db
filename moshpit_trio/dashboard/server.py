"""``open_dashboard()``: a peer, the collector and the web server, as one block.

    async with open_dashboard(identity, run_id="digits", bootstrap=[addr]) as dash:
        print(dash.url)            # http://127.0.0.1:8080/
        await trio.sleep_forever()

The peer is in client mode by default (it dials out, never listens, and enters nobody's
routing table): the dashboard is a reader of the swarm, not a member. The web server is
Hypercorn (ASGI, on trio) serving ``DashboardApp``; see docs/ARCHITECTURE.md for why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..errors import ConfigError
from ..identity import Identity
from ..peer import Peer, open_peer
from ..training.progress import progress_key
from ..wire.streams import StreamNetwork
from .app import DashboardApp
from .collector import Collector
from .view import Limits, SwarmView

__all__ = ["Dashboard", "open_dashboard", "parse_listen"]


@dataclasses.dataclass(eq=False)
class Dashboard:
    """A running dashboard: where its page is, and what feeds it."""

    url: str
    peer: Peer
    view: SwarmView
    collector: Collector


def parse_listen(listen: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (port 0: any free one) as (host, port); a ``ConfigError`` otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit() and int(port) < 65536):
        raise ConfigError(f"--listen is HOST:PORT, e.g. 127.0.0.1:8080; got {listen!r}")
    return host, int(port)


def _hypercorn_config(host: str, port: int) -> Any:
    try:
        from hypercorn.config import Config
    except ImportError:
        raise ConfigError(
            "the dashboard needs Hypercorn: pip install 'moshpit-trio[dashboard]'"
        ) from None
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    # Hypercorn's own lines ("Running on ...") at INFO stay quiet; its errors still show.
    errors = logging.getLogger("moshpit_trio.dashboard.http")
    errors.setLevel(logging.WARNING)
    config.errorlog = errors
    config.read_timeout = 30  # a client that stops sending mid-request is dropped
    config.keep_alive_timeout = 10
    config.graceful_timeout = 1.0
    config.h11_max_incomplete_size = 16 * 1024
    config.websocket_max_message_size = 64 * 1024
    return config


async def _serve_http(
    app: DashboardApp,
    listen: str,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    from hypercorn.trio import serve

    host, port = parse_listen(listen)
    config = _hypercorn_config(host, port)

    try:
        async with trio.open_nursery() as nursery:
            binds: list[str] = await nursery.start(serve, app, config)
            task_status.started(binds[0].rstrip("/") + "/")
    except OSError as exc:
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


@asynccontextmanager
async def open_dashboard(
    identity: Identity,
    *,
    run_id: str,
    bootstrap: Sequence[str],
    listen: str = "127.0.0.1:8080",
    client_mode: bool = True,
    peer_listen: str | None = None,
    network: StreamNetwork | None = None,
    interval: float = 2.0,
    status: bool = True,
    limits: Limits | None = None,
    peer: Peer | None = None,
) -> AsyncIterator[Dashboard]:
    """Join the swarm (unless ``peer`` is given: then read through it), start reading, and
    serve the page on ``listen`` (HTTP, port 0 for any). ``network`` replaces real TCP for
    the peer (tests); the web server always uses real sockets."""
    parse_listen(listen)
    progress_key(run_id)  # a bad run id is said before joining, too
    _hypercorn_config("127.0.0.1", 0)  # the missing dependency is said before joining
    view = SwarmView(run_id, limits)
    async with _peer(identity, bootstrap, client_mode, peer_listen, network, peer) as p:
        collector = Collector(p, view, interval=interval, status=status, bootstrap=tuple(bootstrap))
        app = DashboardApp(view, p.dht.now)
        async with trio.open_nursery() as nursery:
            await nursery.start(collector.run)
            url = await nursery.start(_serve_http, app, listen)
            yield Dashboard(url, p, view, collector)
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def _peer(
    identity: Identity,
    bootstrap: Sequence[str],
    client_mode: bool,
    peer_listen: str | None,
    network: StreamNetwork | None,
    given: Peer | None,
) -> AsyncIterator[Peer]:
    if given is not None:
        yield given
        return
    if not bootstrap:
        raise ConfigError("the dashboard needs --bootstrap: the address of a peer in the swarm")
    async with open_peer(
        identity,
        listen=None if client_mode else (peer_listen or "127.0.0.1:0"),
        bootstrap=list(bootstrap),
        client_mode=client_mode,
        network=network,
    ) as p:
        yield p
