"""The dashboard's peer side: read the run's records from the DHT and ask daemons for status.

Two loops in one nursery, both feeding the ``SwarmView`` (trio is single-threaded, so the web
app reads the view between their updates without locks):

- every ``interval`` seconds, one read of ``mp.progress/RUN`` (bounded by the DHT's lookup
  timeout) and one history point;
- every ``status_every`` seconds, ``status`` calls to the peers that are due (addresses from
  the progress records, the DHT's routing table and the bootstrap list), at most
  ``status_limit`` a sweep and ``status_parallel`` at once, each under ``status_timeout``. A
  daemon answers only keys its ``[status] allow`` list names; a refusal is shown and asked
  again rarely (``view.STATUS_RETRY``), and so is a peer with no ``status`` call (a trainer's
  own peer).
"""

from __future__ import annotations

from typing import Any

import trio

from ..daemon import fetch_status
from ..errors import (
    DeadlineExceeded,
    MoshpitError,
    Rejected,
    RemoteError,
    UnknownHandler,
)
from ..identity import PeerID
from ..log import get_logger
from ..training.progress import progress_key
from ..wire.address import InvalidAddress, PeerAddress
from .view import SwarmView

__all__ = ["Collector"]


class Collector:
    """Feeds ``view`` from ``peer`` (an ``open_peer`` peer, usually in client mode)."""

    def __init__(
        self,
        peer: Any,
        view: SwarmView,
        *,
        interval: float = 2.0,
        status: bool = True,
        status_every: float = 2.0,
        status_limit: int = 32,
        status_parallel: int = 8,
        status_timeout: float = 5.0,
        bootstrap: tuple[str, ...] = (),
    ) -> None:
        self.peer = peer
        self.view = view
        self.key = progress_key(view.run_id)
        self.interval = interval
        self.status = status
        self.status_every = status_every
        self.status_limit = status_limit
        self.status_timeout = status_timeout
        self._limiter = trio.CapacityLimiter(status_parallel)
        self.log = get_logger(peer=peer.id.short, run=view.run_id)
        for address in bootstrap:
            self._note(address)
        #: set after every read of the records (tests and the demo wait on it)
        self.read_done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.refresh()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop)
            if self.status:
                nursery.start_soon(self._status_loop)
            task_status.started()

    async def refresh(self) -> None:
        """One read of the records and one history point, now."""
        now = self.peer.dht.now()
        try:
            records = await self.peer.dht.get_records(self.key)
        except MoshpitError as exc:
            self.log.info("could not read the progress records", error=str(exc))
            self.view.read_failed(str(exc), self.peer.dht.now())
        else:
            self.view.ingest_records(records, self.peer.dht.now())
        self.view.tick(now)
        event, self.read_done = self.read_done, trio.Event()
        event.set()

    async def _read_loop(self) -> None:
        while True:
            await trio.sleep(self.interval)
            await self.refresh()

    async def _status_loop(self) -> None:
        while True:
            await self.ask_due()
            await trio.sleep(self.status_every)

    async def ask_due(self) -> None:
        """One sweep of status calls to the peers that are due."""
        for contact in list(self.peer.dht.table):
            self.view.note_address(contact.peer_id, str(contact.address))
        targets = self.view.status_targets(self.peer.dht.now(), self.status_limit)
        async with trio.open_nursery() as nursery:
            for peer_id, address in targets:
                nursery.start_soon(self._ask, peer_id, address)

    async def _ask(self, peer_id: PeerID, address: str) -> None:
        async with self._limiter:
            view, now = self.view, self.peer.dht.now
            try:
                status = await fetch_status(
                    self.peer.transport, address, timeout=self.status_timeout
                )
            except UnknownHandler:
                view.ingest_status(peer_id, now(), outcome="no status call")
            except Rejected as exc:
                view.ingest_status(peer_id, now(), outcome="refused", error=str(exc))
            except DeadlineExceeded as exc:
                view.ingest_status(peer_id, now(), outcome="timeout", error=str(exc))
            except RemoteError as exc:
                view.ingest_status(peer_id, now(), outcome="bad reply", error=str(exc))
            except MoshpitError as exc:  # Unreachable, ProtocolError, a refused dial...
                view.ingest_status(peer_id, now(), outcome="unreachable", error=str(exc))
            else:
                view.ingest_status(peer_id, now(), status=status)

    def _note(self, address: str) -> None:
        try:
            parsed = PeerAddress.parse(address)
        except InvalidAddress:
            return
        self.view.note_address(parsed.peer_id, str(parsed))
