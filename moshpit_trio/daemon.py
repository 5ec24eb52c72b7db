"""The peer daemon: ``moshpit peer --config FILE`` runs one of these until SIGTERM.

A ``Daemon`` is one peer (``open_peer``) and the runs its configuration names, each a service
in a nursery inside the peer's block:

- an *averaging run* owns a float32 vector and averages it with the run's swarm, round after
  round, on the shared clock (``round_period``), counting rounds done / partial / failed and
  the bytes they moved, and keeping the last round's report;
- a *training run* calls the configured entry point (``"package.module:function"``) in a worker
  thread with a ``TrainingContext``: the entry point builds its model, gets a
  ``MoshpitOptimizer`` from ``context.optimizer(...)`` (already set up for the run, with a key
  file of its own next to the daemon's), and trains until ``context.should_stop()``.

The daemon answers ``status`` calls (``fetch_status``, ``moshpit status``) from the PeerIDs its
``[status] allow`` list names.

Lifecycle (``serve``): the first SIGTERM or SIGINT starts a graceful stop, bounded by
``shutdown_timeout``: every run stops starting rounds, withdraws its matchmaking announcement
from the DHT (a tombstone, so nobody tries to group with a peer that is leaving), and lets the
round in progress finish; at the bound, whatever is still running is cancelled (its groupmates
see this peer as missing and keep their own values for its span). Then every connection says
GOODBYE (at most ``close_timeout`` + 1 s more) and the process exits 0. A second signal exits at
once with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).

>>> config = parse_config('[peer]\\nlisten = "127.0.0.1:0"\\n')              # doctest: +SKIP
>>> trio.run(serve, config)  # until SIGTERM; returns 0                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import trio

from . import __version__
from .averaging.allreduce import SpanReport
from .averaging.averager import MoshpitAverager, RoundReport
from .config import AccessConfig, AveragingRun, DaemonConfig, LimitsConfig, TrainingRun
from .errors import (
    ConfigError,
    IdentityError,
    InvalidPeerID,
    MoshpitError,
    Rejected,
    RemoteError,
)
from .identity import Identity, PeerID
from .log import get_logger
from .peer import Peer, open_peer
from .wire.access import AccessPolicy, RateLimits
from .wire.connection import ConnectionLimits, Request
from .wire.envelope import DEFAULT_LIMITS, EnvelopeLimits, Kind
from .wire.streams import StreamHandler, StreamNetwork, TcpNetwork
from .wire.transport import Target, Transport, TransportLimits

__all__ = [
    "STATUS",
    "Daemon",
    "PeerStatus",
    "RateLimitedNetwork",
    "RoundSummary",
    "RunStatus",
    "SpanSummary",
    "TrainingContext",
    "access_policy",
    "fetch_status",
    "format_status",
    "load_identity",
    "serve",
    "transport_limits",
]

#: the handler name of the status call
STATUS = "status"
#: the largest status reply a caller reads
MAX_STATUS_BYTES = 1024 * 1024
#: how often bootstrapping is retried while no bootstrap peer answers (seconds, doubling)
JOIN_RETRY = (1.0, 30.0)


# -- identity and limits -------------------------------------------------------------------------


def load_identity(
    path: Path, passphrase_env: str | None = None, env: Mapping[str, str] | None = None
) -> tuple[Identity, bool]:
    """The identity in ``path``, created (mode 0600) when the file does not exist; never
    overwritten. Returns it and whether it was created now."""
    passphrase: bytes | None = None
    if passphrase_env:
        value = (os.environ if env is None else env).get(passphrase_env)
        if value is None:
            raise ConfigError(f"[peer] passphrase_env names {passphrase_env}, but it is not set")
        passphrase = value.encode()
    if path.exists():
        return Identity.load(path, passphrase), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot create {path.parent}: {exc.strerror}") from None
    identity = Identity.generate()
    try:
        identity.save(path, passphrase)  # O_EXCL: a file that appeared meanwhile is kept
    except IdentityError:
        if path.exists():  # another process made it first: use that one
            return Identity.load(path, passphrase), False
        raise
    return identity, True


def transport_limits(limits: LimitsConfig) -> TransportLimits:
    """The ``[limits]`` section as the transport's limits."""
    caps = dict(DEFAULT_LIMITS.max_payload)
    caps[Kind.REQUEST] = caps[Kind.RESPONSE] = limits.max_call_bytes
    caps[Kind.STREAM_DATA] = limits.max_chunk_bytes
    connection = ConnectionLimits(
        envelope=EnvelopeLimits(max_payload=caps),
        max_incoming_calls=limits.max_incoming_calls,
        max_incoming_streams=limits.max_incoming_streams,
        stream_window=limits.stream_window,
        stream_chunk=min(ConnectionLimits().stream_chunk, limits.max_chunk_bytes),
    )
    return TransportLimits(
        connection=connection,
        max_connections=limits.max_connections,
        max_connections_per_peer=limits.max_connections_per_peer,
        handshake_timeout=limits.handshake_timeout,
    )


def access_policy(access: AccessConfig, source: str = "<config>") -> AccessPolicy:
    """The ``[access]`` section as the transport's access policy; reads ``allowlist_file``
    (one PeerID a line, ``#`` starts a comment). ``source`` names the config in errors."""
    members: set[PeerID] | None = None
    if access.allowlist is not None:
        members = {PeerID.from_text(p) for p in access.allowlist}
    if access.allowlist_file is not None:
        path = access.allowlist_file
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{source}: [access] allowlist_file: cannot read {path}: {exc}"
            ) from None
        members = members or set()
        for n, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                members.add(PeerID.from_text(entry))
            except InvalidPeerID as exc:
                raise ConfigError(
                    f"{source}: [access] allowlist_file: {path} line {n}: expected a PeerID, "
                    f"got {entry!r} ({exc})"
                ) from None
    return AccessPolicy(
        allowlist=None if members is None else frozenset(members),
        rates=RateLimits(
            calls_per_s=access.calls_per_s,
            call_burst=access.call_burst,
            bytes_per_s=access.bytes_per_s,
            byte_burst=access.byte_burst,
            ban_after_refusals=access.ban_after_refusals,
            refusal_window=access.refusal_window,
        ),
        ban_base=access.ban_base,
        ban_cap=access.ban_cap,
        ban_on_protocol_error=access.ban_on_protocol_error,
        ban_on_bad_data=access.ban_on_bad_data,
    )


# -- bandwidth caps ------------------------------------------------------------------------------


class _Pacer:
    """A token bucket (as GCRA) shared by every stream of one direction of one process."""

    #: bytes per send or receive; small enough that concurrent streams take turns
    PIECE = 64 * 1024

    def __init__(self, rate: float) -> None:
        self.rate = rate
        # Short bursts pass at once (a handshake, a DHT call); longer transfers are paced.
        self.tolerance = max(self.PIECE, rate * 0.02) / rate
        self._tat = -math.inf  # the theoretical time the last byte granted so far leaves

    def charge(self, n: int) -> float:
        """Count ``n`` bytes; returns the trio time they may pass at."""
        now = trio.current_time()
        self._tat = max(self._tat, now) + n / self.rate
        return self._tat - self.tolerance

    async def take(self, n: int) -> None:
        await trio.sleep_until(self.charge(n))


class _RateLimitedStream(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream, up: _Pacer | None, down: _Pacer | None) -> None:
        self._inner, self._up, self._down = inner, up, down
        # Bytes read (and counted) by a receive_some cancelled while the pacer held them back,
        # and when they may pass: the next call returns them then, so a cancelled read neither
        # loses data from the stream nor lets it through early.
        self._held: bytes | bytearray = b""
        self._held_until = -math.inf

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._up is None:
            await self._inner.send_all(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), _Pacer.PIECE):
            piece = view[start : start + _Pacer.PIECE]
            await self._up.take(len(piece))
            await self._inner.send_all(piece)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._held:
            await trio.sleep_until(self._held_until)
            data = self._held
            if max_bytes is not None and len(data) > max_bytes:
                data, self._held = data[:max_bytes], data[max_bytes:]
            else:
                self._held = b""
            return data
        if self._down is None:
            return await self._inner.receive_some(max_bytes)
        limit = _Pacer.PIECE if max_bytes is None else min(max_bytes, _Pacer.PIECE)
        data = await self._inner.receive_some(limit)
        if data:
            release = self._down.charge(len(data))
            try:
                await trio.sleep_until(release)
            except BaseException:
                self._held, self._held_until = data, release
                raise
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


class RateLimitedNetwork:
    """A ``StreamNetwork`` that caps what this process sends (``upload``) and reads
    (``download``), in bytes/s, over all its connections together.

    >>> net = RateLimitedNetwork(TcpNetwork(), upload=2.5e6, download=None)   # 20 Mbit/s up
    """

    def __init__(
        self, inner: StreamNetwork, *, upload: float | None, download: float | None
    ) -> None:
        for name, rate in (("upload", upload), ("download", download)):
            if rate is not None and not (math.isfinite(rate) and rate > 0):
                raise ConfigError(f"{name} rate must be positive bytes/s, got {rate!r}")
        self.inner = inner
        self._up = _Pacer(upload) if upload else None
        self._down = _Pacer(download) if download else None

    def wrap(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        return _RateLimitedStream(stream, self._up, self._down)

    async def connect(self, host: str, port: int) -> trio.abc.Stream:
        return self.wrap(await self.inner.connect(host, port))

    async def serve(
        self,
        host: str,
        port: int,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def wrapped(stream: trio.abc.Stream) -> None:
            await handler(self.wrap(stream))

        await self.inner.serve(host, port, wrapped, task_status=task_status)


# -- the status call -----------------------------------------------------------------------------


class SpanSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    start: int
    end: int
    reducer: str
    #: the members whose data this span averages; None: it kept this peer's own values
    included: list[str] | None


class RoundSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    round: int
    #: "done" (every span over every member), "partial", or "failed" (nothing averaged)
    outcome: str
    members: list[str]
    spans: list[SpanSummary]
    excluded: dict[str, str]
    bytes_sent: int
    bytes_received: int
    seconds: dict[str, float]
    #: Unix time the round ended
    finished_at: float
    #: members lost mid-round ("lost": connection ended; "unresponsive": silent)
    lost: dict[str, str] = {}


class RunStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    run_id: str
    kind: str
    #: "starting", "running", "stopping", "stopped", "finished" or "failed"
    state: str
    rounds_done: int
    rounds_partial: int
    rounds_failed: int
    bytes_sent: int
    bytes_received: int
    last_round: RoundSummary | None
    #: averaging runs: the vector's length and mean; training runs: the local step
    vector_size: int | None = None
    vector_mean: float | None = None
    local_step: int | None = None


class RelayLimitsSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``wire.relay_table.RelayLimits``, field for field."""

    max_reservations: int
    reservation_ttl: float
    max_circuits: int
    max_circuits_per_peer: int
    circuit_lifetime: float
    attach_timeout: float
    circuit_bytes_per_s: float
    circuit_burst: float
    total_bytes_per_s: float
    total_burst: float


class ReservationSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    peer: str
    #: seconds until it ends unless renewed
    expires_in: float


class CircuitSummary(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    initiator: str
    target: str
    age_s: float
    #: bytes it forwarded so far, both directions
    bytes: int
    #: its ends that have attached (2 once it carries bytes)
    attached: int


class RelayStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a relay does for others: its limits, what it holds now, and since it started."""

    limits: RelayLimitsSummary
    #: client-mode peers holding a reservation now, and open circuits
    reservations: int
    circuits: int
    circuits_opened: int
    bytes_forwarded: int
    #: refusals since the start by code (SPEC.md "Relay"), and the bans they led to
    refusals: dict[str, int]
    bans: int
    #: the first MAX_LISTED reservations (soonest to end first) and circuits (oldest first)
    reserved: list[ReservationSummary]
    live: list[CircuitSummary]


class HeldRelay(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    address: str
    #: seconds until it is renewed, and until it ends if that fails
    renews_in: float
    expires_in: float


class HeldRelaysStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A client-mode peer's relays: listed, held, and what its ``mp.relay`` record says."""

    listed: list[str]
    want: int
    held: list[HeldRelay]
    #: the relays its record in the DHT names (empty: none published)
    published: list[str]
    #: seconds until the record is stored again, or tried again after a failure (None: no
    #: record to keep up)
    republish_in: float | None
    #: why the last store of the record failed (None: it did not)
    publish_error: str | None


#: reservations and circuits a status lists one by one (the counts are always whole)
MAX_LISTED = 32


def _relay_status(peer: Peer) -> RelayStatus:
    service = peer.transport.relay_service
    assert service is not None
    table, now = service.table, trio.current_time()
    held = sorted(table.held(now), key=lambda r: r.expires)
    live = sorted(table.live(), key=lambda c: c.opened)
    return RelayStatus(
        limits=RelayLimitsSummary(**dataclasses.asdict(service.limits)),
        reservations=len(held),
        circuits=len(live),
        circuits_opened=table.circuits_opened,
        bytes_forwarded=service.bytes_forwarded,
        refusals=dict(table.refusals),
        bans=service.bans,
        reserved=[
            ReservationSummary(str(r.peer), round(r.expires - now, 3)) for r in held[:MAX_LISTED]
        ],
        live=[
            CircuitSummary(
                str(c.initiator),
                str(c.target),
                round(now - c.opened, 3),
                c.forwarded,
                len(c.attached),
            )
            for c in live[:MAX_LISTED]
        ],
    )


def _relays_held(peer: Peer) -> HeldRelaysStatus:
    keeper = peer.relay_keeper
    assert keeper is not None
    now = trio.current_time()
    expiry = peer.transport.relay.reservations
    republish = keeper.republish_at
    return HeldRelaysStatus(
        listed=[str(r) for r in keeper.relays],
        want=keeper.want,
        held=[
            HeldRelay(
                str(address),
                round(max(0.0, renew - now), 3),
                round(max(0.0, expiry.get(address.peer_id, now) - now), 3),
            )
            for address, renew in keeper.held.items()
        ],
        published=[str(r) for r in keeper.published],
        republish_in=None if math.isinf(republish) else round(max(0.0, republish - now), 3),
        publish_error=keeper.publish_error,
    )


class PeerStatus(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    peer_id: str
    version: str
    uptime_s: float
    #: Unix time the daemon started
    started_at: float
    #: where others reach it (empty in client mode)
    addresses: list[str]
    client_mode: bool
    routing_table_size: int
    connections: int
    #: every byte on the wire, all connections (calls, DHT, averaging, state)
    bytes_sent: int
    bytes_received: int
    runs: list[RunStatus]
    format: int = 1
    #: this peer relays for client-mode peers (None: it does not)
    relay: RelayStatus | None = None
    #: this client-mode peer's reservations on relays (None: it keeps none)
    relays: HeldRelaysStatus | None = None


_status_encoder = msgspec.msgpack.Encoder()
_status_decoder = msgspec.msgpack.Decoder(PeerStatus)


async def fetch_status(
    transport: Transport, target: Target, *, timeout: float = 10.0
) -> PeerStatus:
    """Ask the daemon at ``target`` for its status.

    Raises ``Rejected`` when its ``[status] allow`` list does not name this transport's PeerID,
    ``RemoteError`` for a reply that is not a status, and the transport's errors
    (``Unreachable``, ``DeadlineExceeded``, ``UnknownHandler`` for a peer that is no daemon).

    >>> async with open_transport(Identity.load("admin.pem"), listen=None) as t:  # doctest: +SKIP
    ...     print((await fetch_status(t, "ws://10.0.0.5:7070/mp...")).uptime_s)
    """
    raw = await transport.call(target, STATUS, b"", timeout=timeout)
    if len(raw) > MAX_STATUS_BYTES:
        raise RemoteError(
            f"{target}: status reply of {len(raw)} bytes (at most {MAX_STATUS_BYTES})"
        )
    try:
        return _status_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise RemoteError(f"{target}: not a status reply: {exc}") from None


def _outcome(report: RoundReport) -> str:
    if report.succeeded:
        return "done"
    if any(s.included is not None and len(s.included) > 1 for s in report.spans):
        return "partial"
    return "failed"


def _span(span: SpanReport) -> SpanSummary:
    included = None if span.included is None else [str(p) for p in span.included]
    return SpanSummary(span.start, span.end, str(span.reducer), included)


def summarize(report: RoundReport, finished_at: float) -> RoundSummary:
    """A round report as it travels in a status reply (and in the daemon's log)."""
    return RoundSummary(
        round=report.round,
        outcome=_outcome(report),
        members=[str(p) for p in report.members],
        spans=[_span(s) for s in report.spans],
        excluded={str(p): why for p, why in report.excluded.items()},
        bytes_sent=report.bytes_sent,
        bytes_received=report.bytes_received,
        seconds={k: round(v, 4) for k, v in report.seconds.items()},
        finished_at=finished_at,
        lost={str(p): why for p, why in report.lost.items()},
    )


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f} s"
    h, rest = divmod(s, 3600)
    return f"{h}h {rest // 60:02d}m {rest % 60:02d}s" if h else f"{rest // 60}m {rest % 60:02d}s"


def _short(peer_id: str) -> str:
    return peer_id[:10]  # "mp" and eight more characters tell peers apart in a table


def format_status(status: PeerStatus) -> str:
    """The status as a short table for people (``moshpit status`` without ``--json``)."""
    lines = [
        f"peer       {status.peer_id}",
        f"version    moshpit-trio {status.version}",
        f"uptime     {_duration(status.uptime_s)}",
        "address    " + (", ".join(status.addresses) or "none (client mode)"),
        f"routing    {status.routing_table_size} peers known, {status.connections} connections",
        f"traffic    {_size(status.bytes_sent)} out, {_size(status.bytes_received)} in",
    ]
    lines += _format_relay(status)
    if not status.runs:
        lines.append("runs       none (a DHT node)")
    for run in status.runs:
        total = run.rounds_done + run.rounds_partial + run.rounds_failed
        lines.append(
            f"run        {run.run_id} ({run.kind}, {run.state}): {total} rounds: "
            f"{run.rounds_done} done, {run.rounds_partial} partial, {run.rounds_failed} failed; "
            f"{_size(run.bytes_sent)} out, {_size(run.bytes_received)} in"
        )
        if run.local_step is not None:
            lines.append(f"             local step {run.local_step}")
        last = run.last_round
        if last is None:
            continue
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in last.seconds.items() if k != "total")
        lines.append(
            f"  last round {last.round}: {last.outcome}, {len(last.members)} members, "
            f"{last.seconds.get('total', 0.0):.2f} s ({secs})"
        )
        for span in last.spans:
            over = "own values kept" if span.included is None else f"{len(span.included)} members"
            lines.append(
                f"    span {span.start}..{span.end} ({span.end - span.start} values) "
                f"reduced by {_short(span.reducer)}: {over}"
            )
        for peer, why in last.excluded.items():
            lines.append(f"    left out {_short(peer)}: {why}")
        for peer, why in last.lost.items():
            lines.append(f"    lost mid-round {_short(peer)}: {why}")
    return "\n".join(lines)


def _format_relay(status: PeerStatus) -> list[str]:
    lines: list[str] = []
    relay = status.relay
    if relay is not None:
        lim = relay.limits
        refused = ", ".join(f"{code} {n}" for code, n in sorted(relay.refusals.items()))
        lines += [
            f"relay      offered: {relay.reservations} of {lim.max_reservations} reservations, "
            f"{relay.circuits} of {lim.max_circuits} circuits ({lim.max_circuits_per_peer} a "
            f"peer), {relay.circuits_opened} opened in all",
            f"             forwarded {_size(relay.bytes_forwarded)}; paced to "
            f"{_size(lim.circuit_bytes_per_s)}/s a circuit, {_size(lim.total_bytes_per_s)}/s "
            "in all",
            f"             circuits last {_duration(lim.circuit_lifetime)}, reservations "
            f"{_duration(lim.reservation_ttl)}; refused: {refused or 'nothing'}; "
            f"bans {relay.bans}",
        ]
        for r in relay.reserved:
            lines.append(f"  reserved {_short(r.peer)}, ends in {_duration(r.expires_in)}")
        for c in relay.live:
            ends = "" if c.attached == 2 else f" (setting up: {c.attached} of 2 ends attached)"
            lines.append(
                f"  circuit  {_short(c.initiator)} -> {_short(c.target)}, open "
                f"{_duration(c.age_s)}, {_size(c.bytes)}{ends}"
            )
        shown = len(relay.reserved) + len(relay.live)
        if shown < relay.reservations + relay.circuits:
            lines.append(f"  ({relay.reservations + relay.circuits - shown} more not listed)")
    elif not status.client_mode:
        lines.append("relay      not offered ([relay] offer)")
    held = status.relays
    if held is not None:
        lines.append(
            f"relays     {len(held.held)} held of {held.want} wanted, from "
            f"{len(held.listed)} listed"
        )
        for h in held.held:
            lines.append(
                f"  held     {h.address}: renewed in {_duration(h.renews_in)}, "
                f"ends in {_duration(h.expires_in)}"
            )
        if held.published:
            again = (
                ""
                if held.republish_in is None
                else f", stored again in {_duration(held.republish_in)}"
            )
            n = len(held.published)
            lines.append(f"  record   published: {n} relay{'s' if n > 1 else ''}{again}")
        else:
            again = (
                ""
                if held.republish_in is None
                else f"; tried again in {_duration(held.republish_in)}"
            )
            lines.append(f"  record   not published: nobody can reach this peer{again}")
        if held.publish_error is not None:
            lines.append(f"  record   last store failed: {held.publish_error}")
    elif status.client_mode:
        lines.append("relays     none: nobody can reach this peer ([relay] relays)")
    return lines


# -- runs ----------------------------------------------------------------------------------------


class _RunService:
    """What every run has: counters, the last round, a state, and a stop."""

    kind = ""

    def __init__(self, daemon: Daemon, run_id: str) -> None:
        self.daemon = daemon
        self.run_id = run_id
        self.state = "starting"
        self.rounds = {"done": 0, "partial": 0, "failed": 0}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.last_round: RoundSummary | None = None
        self.log = get_logger(peer=daemon.identity.peer_id.short, run=run_id)
        #: run() was entered (a daemon stopped before it joined the swarm starts no run)
        self.started = False

    def record(self, report: RoundReport) -> None:
        summary = summarize(report, self.daemon.now())
        self.rounds[summary.outcome] += 1
        self.bytes_sent += report.bytes_sent
        self.bytes_received += report.bytes_received
        self.last_round = summary
        if self.kind == "averaging":
            # A member that sent malformed data is banned (as the [access] section says). A
            # training run's rounds are its own peer's: that peer reports them to its own
            # transport (doing it here too would ban twice, and could ban our own trainer).
            self.daemon.peer.transport.report_bad_data(dict(report.excluded))
        # One line per round with the whole report: what operators grep, and what the tests read.
        self.log.info(
            "round",
            round=summary.round,
            outcome=summary.outcome,
            members=summary.members,
            spans=[[s.start, s.end, s.reducer, s.included] for s in summary.spans],
            excluded=summary.excluded,
            lost=summary.lost,
            seconds=summary.seconds,
            bytes_sent=summary.bytes_sent,
            bytes_received=summary.bytes_received,
        )

    def status(self) -> RunStatus:
        return RunStatus(
            run_id=self.run_id,
            kind=self.kind,
            state=self.state,
            rounds_done=self.rounds["done"],
            rounds_partial=self.rounds["partial"],
            rounds_failed=self.rounds["failed"],
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            last_round=self.last_round,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class _AveragingService(_RunService):
    kind = "averaging"

    def __init__(self, daemon: Daemon, spec: AveragingRun) -> None:
        super().__init__(daemon, spec.run_id)
        self.spec = spec
        if spec.init == "random":
            seed = int.from_bytes(daemon.identity.peer_id.to_bytes()[:8], "big")
            self.vector = np.random.default_rng(seed).standard_normal(spec.size, np.float32)
        else:
            self.vector = np.zeros(spec.size, np.float32)
        self._stopping = False
        self._waiting: trio.CancelScope | None = None
        self._averager: MoshpitAverager | None = None  # while a round is in progress
        self._idle = trio.Event()
        self._idle.set()

    def stopping(self) -> bool:
        return self._stopping

    def status(self) -> RunStatus:
        return msgspec.structs.replace(
            super().status(),
            vector_size=int(self.vector.size),
            vector_mean=float(self.vector.mean(dtype=np.float64)),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started = True
        spec = self.spec
        peer = self.daemon.peer
        averager = MoshpitAverager(
            peer,
            spec.run_id,
            [self.vector],
            grid=spec.grid,
            compression=spec.compression,
            bandwidth=spec.bandwidth,
            pace=spec.pace,
            min_group_size=spec.min_group_size,
            round_period=spec.round_period,
            target_group_size=spec.target_group_size if spec.grid == "auto" else None,
            max_group_size=spec.max_group_size if spec.grid == "auto" else None,
        )
        async with averager:
            self.state = "running"
            task_status.started()
            while not self.stopping():
                with trio.CancelScope() as waiting:
                    self._waiting = waiting
                    await averager.wait_for_round()
                self._waiting = None
                if self.stopping():
                    break
                self._averager = averager
                self._idle = trio.Event()
                try:
                    report = await averager.step(weight=spec.weight, timeout=spec.round_timeout)
                finally:
                    self._averager = None
                    self._idle.set()
                self.record(report)
        self.state = "stopped"

    async def stop(self) -> None:
        """No new rounds; withdraw the current round's announcement; wait for the round."""
        self._stopping = True
        if not self.started:
            self.state = "stopped"
            return
        self.state = "stopping"
        if self._waiting is not None:
            self._waiting.cancel()
        key = None if self._averager is None else self._averager.announcement
        if key is not None:
            with suppress(MoshpitError):  # best effort: the announcement expires anyway
                await self.daemon.peer.dht.withdraw(key)
        await self._idle.wait()


@dataclasses.dataclass
class TrainingContext:
    """What a training run's entry point is called with (in a worker thread).

    ``optimizer(torch_optimizer, **overrides)`` makes the ``MoshpitOptimizer`` for this run:
    its run id, grid, round period and timeout, compression, bandwidth, pace and minimum group
    size come from the configuration, and so do the peer's key file (``identity``), ``listen``,
    ``bootstrap`` (the daemon itself first) and client mode; it averages in the background.
    ``should_stop()`` turns true when the daemon is asked to stop: return soon after (and close
    the optimizer, or use it as a context manager), within the daemon's ``shutdown_timeout``.
    ``options`` is the run's ``options`` table.

    An entry point, e.g. ``mytrain:main`` in ``mytrain.py``::

        def main(context):
            model = torch.nn.Linear(10, 1)
            with context.optimizer(torch.optim.SGD(model.parameters(), lr=0.1)) as opt:
                while not context.should_stop():
                    ...  # forward, backward, opt.step(), opt.zero_grad()
    """

    run_id: str
    options: Mapping[str, Any]
    identity: Path
    listen: str | None
    bootstrap: list[str]
    client_mode: bool
    announce_host: str | None
    optimizer_options: dict[str, Any]
    stop_event: threading.Event = dataclasses.field(default_factory=threading.Event)
    optimizers: list[Any] = dataclasses.field(default_factory=list)

    def should_stop(self) -> bool:
        return self.stop_event.is_set()

    def optimizer(self, optimizer: Any, **overrides: Any) -> Any:
        from .training.optimizer import MoshpitOptimizer

        options: dict[str, Any] = {
            "run_id": self.run_id,
            "identity": self.identity,
            "listen": self.listen,
            "bootstrap": self.bootstrap,
            "client_mode": self.client_mode,
            "announce_host": self.announce_host,
            "average_every": "background",
            **self.optimizer_options,
            **overrides,
        }
        made = MoshpitOptimizer(optimizer, **options)
        self.optimizers.append(made)
        return made


def _load_entry(entry: str, config_source: str | None = None) -> Callable[[TrainingContext], Any]:
    """Import ``"module:function"``; the module is looked for on ``sys.path``, then in the
    configuration file's directory (so a config can ship its own entry point)."""
    module_name, _, attribute = entry.partition(":")
    beside = str(Path(config_source).resolve().parent) if config_source else None
    if beside is not None and beside not in sys.path:
        sys.path.append(beside)
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the entry point {entry!r}: {exc}") from None
    if not callable(target):
        raise ConfigError(f"the entry point {entry!r} is not callable")
    return target  # type: ignore[no-any-return]


def training_identity_path(daemon_identity: Path, run_id: str) -> Path:
    """The key file of a training run's own peer: next to the daemon's, named after the run
    (a peer cannot share its PeerID with another)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:40]
    tag = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return daemon_identity.with_name(f"{daemon_identity.stem}.{slug}-{tag}.pem")


class _TrainingService(_RunService):
    kind = "training"

    def __init__(self, daemon: Daemon, spec: TrainingRun) -> None:
        super().__init__(daemon, spec.run_id)
        self.spec = spec
        self.context: TrainingContext | None = None
        self._done = trio.Event()
        self._seen: dict[int, RoundReport] = {}  # optimizer index -> last report counted

    def status(self) -> RunStatus:
        opts = self.context.optimizers if self.context is not None else []
        step = int(opts[-1].local_step) if opts else None
        return msgspec.structs.replace(super().status(), local_step=step)

    def _make_context(self) -> TrainingContext:
        daemon, spec, peer_config = self.daemon, self.spec, self.daemon.config.peer
        own = daemon.peer.address
        bootstrap = ([str(own)] if own is not None else []) + list(peer_config.bootstrap)
        listen = spec.listen
        if listen is None and not peer_config.client_mode:
            host = peer_config.listen.rpartition(":")[0]
            listen = f"{host}:0"
        return TrainingContext(
            run_id=spec.run_id,
            options=spec.options,
            identity=spec.identity or training_identity_path(peer_config.identity, spec.run_id),
            listen=listen,
            bootstrap=bootstrap,
            client_mode=peer_config.client_mode,
            announce_host=peer_config.announce_host,
            optimizer_options={
                "grid": spec.grid,
                **(
                    {
                        "target_group_size": spec.target_group_size,
                        "max_group_size": spec.max_group_size,
                    }
                    if spec.grid == "auto"
                    else {}
                ),
                "round_period": spec.round_period,
                "round_timeout": spec.round_timeout,
                "compression": spec.compression,
                "bandwidth": spec.bandwidth,
                "pace": spec.pace,
                "min_group_size": spec.min_group_size,
                # the training peer keeps the daemon's limits and, in a private swarm, its rules
                "limits": transport_limits(daemon.config.limits),
                "access": daemon.access,
                # in client mode, its own reservations on the daemon's relays: nobody could
                # reach it otherwise (a listening one is dialed directly, and relays nothing)
                "relays": list(daemon.config.relay.relays),
                "relay_want": daemon.config.relay.want,
            },
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started = True
        context = self.context = self._make_context()
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_reports, context)
                # Importing the entry's module (torch, usually) takes seconds: not on trio's thread.
                entry = await trio.to_thread.run_sync(
                    _load_entry, self.spec.entry, self.daemon.config.source, abandon_on_cancel=True
                )
                self.state = "stopping" if context.should_stop() else "running"
                self.log.info("training started", entry=self.spec.entry)
                if not context.should_stop():
                    # The thread is abandoned (not waited for) if the daemon's bound passes:
                    # trio's worker threads are daemon threads, so the process still exits.
                    await trio.to_thread.run_sync(entry, context, abandon_on_cancel=True)
                self._collect(context)
                nursery.cancel_scope.cancel()
            self.state = "stopped" if context.should_stop() else "finished"
            self.log.info("training ended", state=self.state)
        except Exception as exc:
            cause: BaseException = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]  # the entry's own error, not the nursery's wrapping
            self.state = "failed"
            self.log.error("training failed", error=f"{type(cause).__name__}: {cause}")
            raise MoshpitError(
                f"training run {self.run_id!r} failed: {type(cause).__name__}: {cause}"
            ) from exc
        finally:
            self._done.set()

    async def _watch_reports(self, context: TrainingContext) -> None:
        # The optimizer keeps only its last report; sample it often enough to see every round.
        interval = min(0.5, self.spec.round_period / 4)
        while True:
            self._collect(context)
            await trio.sleep(interval)

    def _collect(self, context: TrainingContext) -> None:
        for i, opt in enumerate(context.optimizers):
            report = opt.last_report
            # Held (not its id, which a later report could reuse): only the newest repeats.
            if report is not None and report is not self._seen.get(i):
                self._seen[i] = report
                self.record(report)

    async def stop(self) -> None:
        if not self.started:
            self.state = "stopped"
            return
        self.state = "stopping"
        if self.context is not None:
            self.context.stop_event.set()
        await self._done.wait()


# -- the daemon ----------------------------------------------------------------------------------


class Daemon:
    """One peer and its runs, configured by a ``DaemonConfig``; see the module docstring.

    ``await daemon.run()`` serves until ``request_stop()``, then stops gracefully (bounded by
    ``shutdown_timeout``). ``serve()`` adds the signal handling. ``network`` replaces real TCP
    (tests use ``MemoryNetwork`` hosts); ``env`` is where ``passphrase_env`` is looked up.
    """

    def __init__(
        self,
        config: DaemonConfig,
        *,
        network: StreamNetwork | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.identity, self.identity_created = load_identity(
            config.peer.identity, config.peer.passphrase_env, env
        )
        self.access = self._admit_own_trainers(access_policy(config.access, config.source))
        limits = config.limits
        net: StreamNetwork = network if network is not None else TcpNetwork()
        if limits.upload_rate is not None or limits.download_rate is not None:
            net = RateLimitedNetwork(net, upload=limits.upload_rate, download=limits.download_rate)
        self._network = net
        self.log = get_logger(peer=self.identity.peer_id.short)
        self.services: list[_RunService] = [
            _AveragingService(self, run)
            if isinstance(run, AveragingRun)
            else _TrainingService(self, run)
            for run in config.runs
        ]
        self._stop = trio.Event()
        self._peer: Peer | None = None
        self._started = 0.0
        self.started_at = 0.0
        #: the graceful stop's outcome: "finished" (every round ended) or "abandoned"
        self.shutdown: str | None = None

    @property
    def peer(self) -> Peer:
        if self._peer is None:
            raise MoshpitError("the daemon is not running")
        return self._peer

    def now(self) -> float:
        """Unix time (following trio's clock, as the DHT's does)."""
        return self.peer.dht.now()

    def request_stop(self) -> None:
        """Start the graceful stop (what the first SIGTERM or SIGINT does)."""
        self._stop.set()

    def _admit_own_trainers(self, policy: AccessPolicy) -> AccessPolicy:
        """In a private swarm, this daemon's training runs' own peers (their key files are made
        here if missing) are members too: they bootstrap through this daemon. Their PeerIDs are
        logged, so operators can add them to the other members' allowlists."""
        if policy.allowlist is None:
            return policy
        ours = set()
        for run in self.config.runs:
            if isinstance(run, TrainingRun):
                path = run.identity or training_identity_path(self.config.peer.identity, run.run_id)
                trainer, _ = load_identity(path)
                ours.add(trainer.peer_id)
                get_logger(peer=self.identity.peer_id.short, run=run.run_id).info(
                    "training peer admitted", trainer=str(trainer.peer_id), key=str(path)
                )
        return dataclasses.replace(policy, allowlist=policy.allowlist | ours)

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        peer_config, relay = self.config.peer, self.config.relay
        async with AsyncExitStack() as stack:
            try:
                peer = await stack.enter_async_context(
                    open_peer(
                        self.identity,
                        listen=None if peer_config.client_mode else peer_config.listen,
                        client_mode=peer_config.client_mode,
                        announce_host=peer_config.announce_host,
                        network=self._network,
                        limits=transport_limits(self.config.limits),
                        access=self.access,
                        relay=relay.limits if relay.offer else None,
                        relays=relay.relays,
                        relay_want=relay.want,
                    )
                )
            except ConfigError as exc:  # the one way setting up fails: the port is taken
                raise ConfigError(f"{self.config.source}: [peer] listen: {exc}") from None
            self._peer = peer
            self._started = trio.current_time()
            self.started_at = peer.dht.now()
            peer.transport.register(STATUS, self._on_status)
            try:
                async with trio.open_nursery() as runs:
                    self.log.info(
                        "peer started",
                        peer_id=str(peer.id),
                        address=None if peer.address is None else str(peer.address),
                        version=__version__,
                        identity=str(peer_config.identity),
                        identity_created=self.identity_created,
                        runs=[s.run_id for s in self.services],
                        relay_offered=relay.offer,
                        relays=list(relay.relays),
                        pid=os.getpid(),
                    )
                    runs.start_soon(self._join_and_start, runs)
                    task_status.started(self)
                    await self._stop.wait()
                    await self._graceful_stop(runs)
            finally:
                peer.transport.registry.unregister(STATUS)

    async def _join_and_start(self, runs: trio.Nursery) -> None:
        """Bootstrap (retrying while nobody answers: a daemon outlives its bootstrap peers'
        restarts), then start the runs."""
        bootstrap = self.config.peer.bootstrap
        delay, cap = JOIN_RETRY
        while bootstrap:
            try:
                answered = await self.peer.dht.bootstrap(bootstrap)
            except MoshpitError as exc:
                self.log.warning("bootstrap failed; retrying", error=str(exc), retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            self.log.info("joined the swarm", answered=answered, known=len(self.peer.dht.table))
            if self.peer.relay_keeper is not None:
                # its first record went out before the join and reached nobody: publish now,
                # so that others can reach this peer from its first round on
                self.peer.relay_keeper.wake()
            break
        for service in self.services:
            if self._stop.is_set():
                return
            await runs.start(service.run)

    async def _graceful_stop(self, runs: trio.Nursery) -> None:
        bound = self.config.peer.shutdown_timeout
        start = trio.current_time()
        self.log.info("stopping", shutdown_timeout=bound)
        with trio.move_on_after(bound) as scope:
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    nursery.start_soon(service.stop)
        self.shutdown = "abandoned" if scope.cancelled_caught else "finished"
        runs.cancel_scope.cancel()
        self.log.info(
            "stopped",
            rounds=self.shutdown,
            seconds=round(trio.current_time() - start, 3),
        )

    # -- status --------------------------------------------------------------------------------

    def status(self) -> PeerStatus:
        """This daemon's status (what a ``status`` call answers)."""
        peer = self.peer
        t = peer.transport
        return PeerStatus(
            peer_id=str(peer.id),
            version=__version__,
            uptime_s=round(trio.current_time() - self._started, 3),
            started_at=self.started_at,
            addresses=[] if peer.address is None else [str(peer.address)],
            client_mode=peer.client_mode,
            routing_table_size=len(peer.dht.table),
            connections=len(t.connections()),
            bytes_sent=t.bytes_sent,
            bytes_received=t.bytes_received,
            runs=[s.status() for s in self.services],
            relay=_relay_status(peer) if t.relay_service is not None else None,
            relays=_relays_held(peer) if peer.relay_keeper is not None else None,
        )

    async def _on_status(self, request: Request) -> bytes:
        if not self.config.status.allows(request.peer):
            self.log.info("status refused", caller=str(request.peer))
            raise Rejected(
                "status: not answered to this PeerID (the peer's [status] allow list does not "
                "name it)"
            )
        return _status_encoder.encode(self.status())


def _hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)


async def serve(
    config: DaemonConfig,
    *,
    network: StreamNetwork | None = None,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    on_second_signal: Callable[[int], None] = _hard_exit,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Run a daemon until the first of ``signals``; returns the exit status (0).

    The second signal calls ``on_second_signal(128 + signum)``, which by default exits the
    process at once with that status. Must run in the main thread (it handles signals).
    """
    daemon = Daemon(config, network=network)
    try:
        await _serve(daemon, signals, on_second_signal, task_status)
    except BaseExceptionGroup as group:
        # The daemon's own error (a port taken, a training run that failed), not trio's
        # wrapping of it: the command maps it to an exit status and one log line.
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise
    return 0


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


async def _serve(
    daemon: Daemon,
    signals: Sequence[int],
    on_second_signal: Callable[[int], None],
    task_status: trio.TaskStatus[Daemon],
) -> None:
    with trio.open_signal_receiver(*signals) as received:

        async def watch() -> None:
            count = 0
            async for signum in received:
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    daemon.log.info("signal: stopping gracefully", signal=name)
                    daemon.request_stop()
                else:
                    daemon.log.warning("second signal: exiting at once", signal=name)
                    on_second_signal(128 + signum)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await daemon.run(task_status=task_status)
            nursery.cancel_scope.cancel()
