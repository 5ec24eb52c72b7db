"""Swarm progress: how far each peer and the whole swarm got, published in the DHT.

Every peer of a run publishes one owned record under ``mp.progress/RUN`` (subkey: its PeerID,
signed by it, so nobody can write or withdraw another peer's entry) every ``publish_interval``
seconds, with a TTL of a few intervals: a peer that dies drops out of everyone's view once its
last record expires. The value says which *global epoch* the peer is in, how many samples it
processed in that epoch and in total, its local step, its throughput, and where it serves its
state (for joiners, see ``state.py``); and, for people watching the run (``moshpit dashboard``),
its recent training loss, when it started, its rounds (averaged, partial, solo), the bytes it
moved, and its last round's group.

The global epoch works like hivemind's: a peer's epoch is the highest it has seen among the live
records (its own included), and when the samples of the live peers *in that epoch* add up to
``samples_per_epoch``, the peer moves on to the next epoch and tells everyone at once. Peers
that see a higher epoch jump to it. An epoch never goes down, and no peer has to wait for any
other: churn only delays an epoch by the samples the dead peer took with it.

    tracker = ProgressTracker(peer, "exp1", samples_per_epoch=50_000)
    peer.nursery.start_soon(tracker.run)
    for batch in data:
        ...
        tracker.report(samples=len(batch), step=step)
        if tracker.epoch > last_epoch: ...   # e.g. step the LR schedule

Every record read from the DHT is untrusted: it is decoded with a strict msgspec struct, its size
is capped, and one that does not check out is logged and ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any

import msgspec
import trio

from ..dht.records import Record
from ..errors import ConfigError, MoshpitError, ProtocolError
from ..identity import PeerID
from ..log import get_logger
from ..relays import MAX_RELAYS
from ..wire.address import InvalidAddress, PeerAddress

__all__ = [
    "GROUP_TAG_BYTES",
    "MAX_PROGRESS_VALUE",
    "PeerProgress",
    "ProgressTracker",
    "SwarmProgress",
    "decode_progress",
    "encode_progress",
    "fetch_progress",
    "progress_key",
]

#: the largest progress record value we read (a real one is 130 to 230 bytes)
MAX_PROGRESS_VALUE = 1024
#: the progress namespace's max TTL (see ``dht.node.default_namespaces``)
_MAX_TTL = 3600.0
_MAX_KEY = 256
_U63 = 2**63 - 1

_Count = Annotated[int, msgspec.Meta(ge=0, le=_U63)]
#: how many bytes of a group id a record carries (enough to tell a round's groups apart)
GROUP_TAG_BYTES = 8


class _ProgressValue(msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True):
    """The record value on the wire: a msgpack array of these fields, in this order.

    The first seven are the original record; the rest were added later, for the dashboard, with
    defaults, so a record of seven (or more, up to all) still decodes: a peer that does not know
    a field leaves it out. A peer that predates a field refuses a record that carries it (its
    decoder forbids unknown fields); ``encode_progress`` leaves out trailing fields at their
    defaults, so a listening peer's record (``relays`` 0) still reads on peers that predate
    ``relays``.
    """

    epoch: _Count
    samples_in_epoch: _Count
    samples: _Count
    step: _Count
    samples_per_s: float
    #: "" in client mode, else the peer's ws://HOST:PORT/PEER_ID (its own PeerID)
    address: Annotated[str, msgspec.Meta(max_length=300)]
    #: the publisher's unix time when it published
    time: float
    #: the mean training loss of the steps since the previous publication (None: not reported)
    loss: float | None = None
    #: unix time this peer started the run (None: not said)
    started: float | None = None
    #: rounds that averaged everything with everyone in the group / some of it / nothing
    rounds_done: _Count = 0
    rounds_partial: _Count = 0
    rounds_solo: _Count = 0
    #: every byte of the peer's connections, both directions
    bytes_sent: _Count = 0
    bytes_received: _Count = 0
    #: the last round this peer took part in, and its group: the first bytes of the group id
    #: (empty for a solo round) and the number of members
    last_round: _Count | None = None
    group: Annotated[bytes, msgspec.Meta(max_length=GROUP_TAG_BYTES)] = b""
    group_size: _Count = 0
    #: in client mode, how many relays hold a live reservation for it (how others reach it;
    #: 0: nobody can dial it)
    relays: Annotated[int, msgspec.Meta(ge=0, le=MAX_RELAYS)] = 0


_encode = msgspec.msgpack.Encoder().encode
#: each field's default (``msgspec.NODEFAULT`` for the seven required ones), in wire order
_DEFAULTS = tuple(f.default for f in msgspec.structs.fields(_ProgressValue))
_decode_value = msgspec.msgpack.Decoder(_ProgressValue).decode
# What msgspec's decoder may raise on hostile input (see dht/records.py).
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError, OverflowError)


@dataclasses.dataclass(frozen=True)
class PeerProgress:
    """One peer's progress, as it last published it (or, for this peer, as it is now)."""

    peer_id: PeerID
    #: the global epoch this peer is in
    epoch: int
    #: samples this peer processed since it entered ``epoch``
    samples_in_epoch: int
    #: samples this peer processed in this run, in total (since it (re)started)
    samples: int
    #: this peer's local optimizer step counter
    step: int
    #: its recent throughput
    samples_per_s: float
    #: where it serves state (None: client mode, not a donor)
    address: str | None
    #: ``dht.now()`` when published
    time: float
    #: the mean training loss since its previous publication (None: not reported)
    loss: float | None = None
    #: unix time it started the run (None: not said)
    started: float | None = None
    #: rounds in which everything averaged with the whole group / only some / nothing
    rounds_done: int = 0
    rounds_partial: int = 0
    rounds_solo: int = 0
    #: bytes on all its connections, out and in
    bytes_sent: int = 0
    bytes_received: int = 0
    #: its last round (None: none yet), that round's group tag (b"": solo) and size
    last_round: int | None = None
    group: bytes = b""
    group_size: int = 0
    #: in client mode, the relays holding a live reservation for it (at most ``MAX_RELAYS``
    #: counted: as many as a relay record lists)
    relays: int = 0


@dataclasses.dataclass(frozen=True)
class SwarmProgress:
    """The swarm as one peer sees it: the live records (its own, current, included).

    >>> me = PeerProgress(PeerID(bytes(32)), 3, 40, 900, 90, 10.0, None, 0.0)
    >>> s = SwarmProgress(peers=(me,), epoch=3, samples_per_epoch=100)
    >>> (s.live_peers, s.total_samples, s.epoch_progress)
    (1, 900, 0.4)
    """

    peers: tuple[PeerProgress, ...]
    epoch: int
    samples_per_epoch: int | None

    @property
    def live_peers(self) -> int:
        return len(self.peers)

    @property
    def total_samples(self) -> int:
        """The sum of every live peer's ``samples``."""
        return sum(p.samples for p in self.peers)

    @property
    def samples_per_s(self) -> float:
        """The swarm's throughput: the sum of the live peers' own estimates."""
        return math.fsum(p.samples_per_s for p in self.peers)

    @property
    def epoch_samples(self) -> int:
        """Samples processed in the current epoch by the live peers that are in it."""
        return sum(p.samples_in_epoch for p in self.peers if p.epoch == self.epoch)

    @property
    def epoch_progress(self) -> float:
        """How far the current epoch is, in [0, 1); 0 without ``samples_per_epoch``."""
        if not self.samples_per_epoch:
            return 0.0
        return min(self.epoch_samples / self.samples_per_epoch, math.nextafter(1.0, 0.0))


def progress_key(run_id: str) -> str:
    """The DHT key of a run's progress records: ``mp.progress/RUN``."""
    if not isinstance(run_id, str) or not run_id:
        raise ConfigError(f"run_id must be a non-empty str, got {run_id!r}")
    key = f"mp.progress/{run_id}"
    if len(key.encode()) > _MAX_KEY:
        raise ConfigError(f"run_id is too long ({len(run_id.encode())} bytes)")
    return key


def encode_progress(progress: PeerProgress) -> bytes:
    """The record value for ``progress`` (the owner is the record's subkey, not in the value).

    Trailing fields at their defaults are left out (see ``_ProgressValue``)."""
    fields = msgspec.structs.astuple(
        _ProgressValue(
            epoch=progress.epoch,
            samples_in_epoch=progress.samples_in_epoch,
            samples=progress.samples,
            step=progress.step,
            samples_per_s=float(progress.samples_per_s),
            address=progress.address or "",
            time=float(progress.time),
            loss=None if progress.loss is None else float(progress.loss),
            started=None if progress.started is None else float(progress.started),
            rounds_done=progress.rounds_done,
            rounds_partial=progress.rounds_partial,
            rounds_solo=progress.rounds_solo,
            bytes_sent=progress.bytes_sent,
            bytes_received=progress.bytes_received,
            last_round=progress.last_round,
            group=bytes(progress.group[:GROUP_TAG_BYTES]),
            group_size=progress.group_size,
            relays=min(progress.relays, MAX_RELAYS),
        )
    )
    end = len(fields)
    while end and fields[end - 1] == _DEFAULTS[end - 1]:
        end -= 1
    return _encode(fields[:end])


def decode_progress(subkey: bytes, value: bytes | memoryview) -> PeerProgress:
    """Decode and check the progress record of owner ``subkey``.

    Raises ``ProtocolError`` (reason ``"progress"``) for anything but a well-formed value of at
    most ``MAX_PROGRESS_VALUE`` bytes with non-negative counts, finite non-negative throughput,
    a finite time, a finite loss (if any), a finite start no later than the time (if any), a
    group tag only with a last round, and an address that is empty or names the owner itself;
    never another error. Whether the numbers are *plausible* (a peer may claim a billion
    samples) is the reader's call: see ``dashboard.view``.

    >>> decode_progress(bytes(32), b"junk")
    Traceback (most recent call last):
    ...
    moshpit_trio.errors.ProtocolError: progress: undecodable record: ...
    """
    if len(subkey) != 32:
        raise ProtocolError("progress", f"the owner is a 32-byte PeerID, got {len(subkey)} bytes")
    if len(value) > MAX_PROGRESS_VALUE:
        raise ProtocolError(
            "progress", f"record of {len(value)} bytes; the cap is {MAX_PROGRESS_VALUE}"
        )
    try:
        v = _decode_value(value)
    except _DECODE_ERRORS as exc:
        raise ProtocolError("progress", f"undecodable record: {exc}") from None
    if not (math.isfinite(v.samples_per_s) and v.samples_per_s >= 0):
        raise ProtocolError("progress", f"samples_per_s {v.samples_per_s!r}")
    if not math.isfinite(v.time):
        raise ProtocolError("progress", f"time {v.time!r}")
    if v.loss is not None and not math.isfinite(v.loss):
        raise ProtocolError("progress", f"loss {v.loss!r}")
    if v.started is not None and not (math.isfinite(v.started) and v.started <= v.time):
        raise ProtocolError("progress", f"started {v.started!r}, after the time {v.time!r}")
    if v.last_round is None and (v.group or v.group_size):
        raise ProtocolError("progress", "a group without a round")
    if v.relays and v.address:
        raise ProtocolError("progress", "relays claimed by a peer that listens")
    owner = PeerID(bytes(subkey))
    address: str | None = None
    if v.address:
        try:
            parsed = PeerAddress.parse(v.address)
        except InvalidAddress as exc:
            raise ProtocolError("progress", f"bad address: {exc}") from None
        if parsed.peer_id != owner:
            raise ProtocolError("progress", "the address names another peer")
        address = v.address
    return PeerProgress(
        peer_id=owner,
        epoch=v.epoch,
        samples_in_epoch=v.samples_in_epoch,
        samples=v.samples,
        step=v.step,
        samples_per_s=v.samples_per_s,
        address=address,
        time=v.time,
        loss=v.loss,
        started=v.started,
        rounds_done=v.rounds_done,
        rounds_partial=v.rounds_partial,
        rounds_solo=v.rounds_solo,
        bytes_sent=v.bytes_sent,
        bytes_received=v.bytes_received,
        last_round=v.last_round,
        group=v.group,
        group_size=v.group_size,
        relays=v.relays,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class _Live:
    """One live record of another peer: what it said, and until when it counts."""

    progress: PeerProgress
    expiration: float


def _live_relays(transport: Any) -> int:
    """How many relays hold a live reservation for this (client-mode) peer; 0 without a
    transport that relays (a test's stand-in peer)."""
    relay = getattr(transport, "relay", None)
    return 0 if relay is None else len(relay.live_reservations())


def _parse_records(
    records: dict[bytes, Record], log: Any, seen_bad: set[tuple[bytes, float]] | None = None
) -> tuple[dict[PeerID, _Live], set[PeerID]]:
    """The valid live entries by owner, and the owners whose entry is withdrawn.

    A bad record is logged (once per record, when ``seen_bad`` remembers them) and skipped.
    """
    live: dict[PeerID, _Live] = {}
    withdrawn: set[PeerID] = set()
    for subkey, record in records.items():
        if len(subkey) != 32:
            continue  # not an owned entry (the DHT validates owned namespaces; be sure anyway)
        if not record.value:
            withdrawn.add(PeerID(subkey))
            continue
        try:
            progress = decode_progress(subkey, record.value)
        except ProtocolError as exc:
            tag = (subkey, record.expiration)
            if seen_bad is None or tag not in seen_bad:
                log.warning(
                    "ignored a bad progress record", owner=PeerID(subkey).short, detail=exc.detail
                )
                if seen_bad is not None:
                    if len(seen_bad) > 4096:
                        seen_bad.clear()
                    seen_bad.add(tag)
            continue
        live[progress.peer_id] = _Live(progress, record.expiration)
    return live, withdrawn


async def fetch_progress(peer: Any, run_id: str) -> tuple[PeerProgress, ...]:
    """Read the live, valid progress records of run ``run_id`` from the DHT (one lookup; it
    ends within the DHT's lookup timeout). Sorted by PeerID; this peer's own record included
    if it published one. Raises what ``DHTNode.get_records`` raises (``MoshpitError``)."""
    key = progress_key(run_id)
    records = await peer.dht.get_records(key)
    log = get_logger(peer=peer.id.short, run=run_id)
    live, _ = _parse_records(records, log)
    return tuple(sorted((e.progress for e in live.values()), key=lambda p: p.peer_id.to_bytes()))


class ProgressTracker:
    """Publishes this peer's progress in the DHT and follows the swarm's.

    ``samples_per_epoch``: samples the whole swarm processes per global epoch (None: epochs
    only move when set from outside, by ``advance_to`` or a higher epoch seen in the swarm).
    ``publish_interval``: seconds between publications (and reads) by ``run()``; ``ttl``: how
    long a record lives (default three intervals: a peer that misses two publications in a row
    is taken for dead). ``epoch``: where this peer starts (e.g. the epoch of a downloaded
    state). ``throughput_window``: seconds of reports that ``samples_per_s`` averages over.

    ``report`` and the properties must be used in the trio thread (from another thread, go
    through ``trio.from_thread.run_sync``).

    >>> async def train(peer):                                            # doctest: +SKIP
    ...     tracker = ProgressTracker(peer, "exp1", samples_per_epoch=10_000)
    ...     await peer.nursery.start(tracker.run)
    ...     tracker.report(samples=32, step=1)
    ...     print(tracker.swarm.epoch, tracker.swarm.live_peers)
    """

    def __init__(
        self,
        peer: Any,
        run_id: str,
        *,
        samples_per_epoch: int | None = None,
        publish_interval: float = 5.0,
        ttl: float | None = None,
        epoch: int = 0,
        throughput_window: float = 30.0,
    ) -> None:
        self.key = progress_key(run_id)
        if samples_per_epoch is not None and not (
            isinstance(samples_per_epoch, int) and samples_per_epoch > 0
        ):
            raise ConfigError(f"samples_per_epoch must be a positive int, got {samples_per_epoch}")
        if not (_positive(publish_interval) and publish_interval <= _MAX_TTL):
            raise ConfigError(f"publish_interval must be in (0, 3600] s, got {publish_interval!r}")
        ttl = 3 * publish_interval if ttl is None else ttl
        if not (_positive(ttl) and ttl <= _MAX_TTL):
            raise ConfigError(f"ttl must be in (0, {_MAX_TTL:g}] s, got {ttl!r}")
        if not (isinstance(epoch, int) and epoch >= 0):
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        if not _positive(throughput_window):
            raise ConfigError("throughput_window must be positive seconds")
        self.peer = peer
        self.run_id = run_id
        self.samples_per_epoch = samples_per_epoch
        self.publish_interval = float(publish_interval)
        self.ttl = float(ttl)
        self.throughput_window = float(throughput_window)
        self.log = get_logger(peer=peer.id.short, run=run_id)
        self._epoch = epoch
        self._samples_in_epoch = 0
        self._samples = 0
        self._step = 0
        self._others: dict[PeerID, _Live] = {}
        self._seen_bad: set[tuple[bytes, float]] = set()
        # Throughput: samples reported per whole second of trio time, for the last window;
        # the clock starts now, or (when made outside trio) at the first report or look.
        self._started: float | None = _trio_time()
        self._buckets: dict[int, int] = {}
        # What the dashboard reads: the loss since the last publication, rounds, bytes.
        self._loss_sum = 0.0
        self._loss_count = 0
        self._loss: float | None = None  # the last published mean
        self._rounds = {"done": 0, "partial": 0, "solo": 0}
        self._last_round: tuple[int, bytes, int] | None = None
        self._started_unix: float | None = None  # dht.now() when first asked
        self._changed = trio.Event()  # wakes run() to publish a new epoch at once
        self._epoch_changed = trio.Event()  # wakes wait_for_epoch()
        self._withdrawn = False

    # -- what the trainer calls ------------------------------------------------------------

    def report(self, *, samples: int, step: int, loss: float | None = None) -> None:
        """Add ``samples`` newly processed samples and set the local step counter; ``loss``
        is the step's training loss, if the trainer tells it (the record carries the mean of
        the losses reported since the previous publication; a non-finite loss, from a model
        that diverged, is left out of that mean). Cheap: no I/O; when the swarm's samples
        complete the epoch, ``run()`` publishes at once."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ConfigError(f"samples must be a non-negative int, got {samples!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"step must be a non-negative int, got {step!r}")
        if loss is not None:
            if isinstance(loss, bool) or not isinstance(loss, int | float):
                raise ConfigError(f"loss must be a number, got {type(loss).__name__}")
            if math.isfinite(loss):
                self._loss_sum += float(loss)
                self._loss_count += 1
        self._samples += samples
        self._samples_in_epoch += samples
        self._step = step
        now = trio.current_time()
        if self._started is None:
            self._started = now
        second = math.floor(now)
        self._buckets[second] = self._buckets.get(second, 0) + samples
        if len(self._buckets) > 2 * self.throughput_window + 2:
            self._prune_buckets()
        self._update_epoch()

    def record_round(self, report: Any) -> None:
        """Count one finished averaging round (an ``averaging.averager.RoundReport``): done
        (everything averaged over the whole group), partial, or solo (nothing averaged with
        anyone); the next record names its round and group."""
        members = len(report.members)
        spans = report.spans
        if report.succeeded:
            outcome = "done"
        elif any(s.included is not None and len(s.included) > 1 for s in spans):
            outcome = "partial"
        else:
            outcome = "solo"
        self._rounds[outcome] += 1
        group = b"" if report.group_id is None else bytes(report.group_id[:GROUP_TAG_BYTES])
        self._last_round = (int(report.round), group, members if group else 1)

    def advance_to(self, epoch: int) -> None:
        """Move to ``epoch`` if it is later than the current one (never back), e.g. after
        downloading a donor's state; resets this epoch's sample count when it moves."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative int, got {epoch!r}")
        if epoch > self._epoch:
            self._set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The global epoch as this peer knows it."""
        return self._epoch

    @property
    def own(self) -> PeerProgress:
        """This peer's progress right now."""
        address = self.peer.address
        now = self.peer.dht.now()
        if self._started_unix is None:
            self._started_unix = now
        transport = getattr(self.peer, "transport", None)
        last = self._last_round
        return PeerProgress(
            peer_id=self.peer.id,
            epoch=self._epoch,
            samples_in_epoch=self._samples_in_epoch,
            samples=self._samples,
            step=self._step,
            samples_per_s=self._throughput(),
            address=None if address is None else str(address),
            time=now,
            loss=self._loss_now(),
            started=min(self._started_unix, now),
            rounds_done=self._rounds["done"],
            rounds_partial=self._rounds["partial"],
            rounds_solo=self._rounds["solo"],
            bytes_sent=int(getattr(transport, "bytes_sent", 0)),
            bytes_received=int(getattr(transport, "bytes_received", 0)),
            last_round=None if last is None else last[0],
            group=b"" if last is None else last[1],
            group_size=0 if last is None else last[2],
            relays=0 if address is not None else _live_relays(transport),
        )

    def _loss_now(self) -> float | None:
        if self._loss_count:
            return self._loss_sum / self._loss_count
        return self._loss

    @property
    def swarm(self) -> SwarmProgress:
        """The last known view of the swarm: others' live records, and this peer as it is now."""
        self._drop_expired()
        peers = [e.progress for e in self._others.values()]
        peers.append(self.own)
        peers.sort(key=lambda p: p.peer_id.to_bytes())
        return SwarmProgress(tuple(peers), self._epoch, self.samples_per_epoch)

    async def wait_for_epoch(self, epoch: int) -> None:
        """Return once this peer's epoch is at least ``epoch`` (no deadline of its own: wrap it
        in ``trio.move_on_after`` as needed)."""
        while self._epoch < epoch:
            await self._epoch_changed.wait()

    # -- talking to the DHT ----------------------------------------------------------------

    async def refresh(self) -> SwarmProgress:
        """Read the swarm's records and publish ours, now. Network failures are logged, not
        raised: the view then stays the last known one. Bounded by the DHT's lookup timeout."""
        await self._fetch()
        await self._publish()
        return self.swarm

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish and read every ``publish_interval`` (at once when the epoch moves here),
        until cancelled. Reports started after the first round. Never raises a network error.
        """
        await self.refresh()
        task_status.started()
        while True:
            next_at = trio.current_time() + self.publish_interval
            with trio.move_on_at(next_at):
                await self._changed.wait()
            self._changed = trio.Event()
            await self.refresh()

    async def withdraw(self, timeout: float = 5.0) -> None:
        """Withdraw this peer's record (at a clean shutdown), trying for at most ``timeout``
        seconds. Later publications are skipped."""
        self._withdrawn = True
        with trio.move_on_after(timeout):
            try:
                await self.peer.dht.withdraw(self.key)
            except MoshpitError as exc:
                self.log.info("could not withdraw the progress record", error=str(exc))

    async def _fetch(self) -> None:
        try:
            records = await self.peer.dht.get_records(self.key)
        except MoshpitError as exc:
            self.log.info("could not read the swarm's progress", error=str(exc))
            return
        live, withdrawn = _parse_records(records, self.log, self._seen_bad)
        own = live.pop(self.peer.id, None)
        withdrawn.discard(self.peer.id)
        # A lookup may miss a replica now and then: keep what we knew until it expires,
        # unless the owner withdrew it or a fresher record replaced it.
        merged = {p: e for p, e in self._others.items() if p not in withdrawn}
        for p, entry in live.items():
            current = merged.get(p)
            if current is None or entry.expiration >= current.expiration:
                merged[p] = entry
        self._others = merged
        if own is not None and own.progress.epoch > self._epoch:
            # Our record from before a restart: where we were is a lower bound for the epoch.
            self._set_epoch(own.progress.epoch)
        self._update_epoch()

    async def _publish(self) -> None:
        if self._withdrawn:
            return
        own = self.own
        # The next record's loss is over the steps after this one (kept if none come).
        self._loss, self._loss_sum, self._loss_count = own.loss, 0.0, 0
        try:
            await self.peer.dht.store(self.key, encode_progress(own), ttl=self.ttl)
        except MoshpitError as exc:
            self.log.info("could not publish progress", error=str(exc))

    # -- the epoch -------------------------------------------------------------------------

    def _update_epoch(self) -> None:
        self._drop_expired()
        highest = max((e.progress.epoch for e in self._others.values()), default=0)
        if highest > self._epoch:
            self._set_epoch(highest)
        if self.samples_per_epoch is not None:
            done = self._samples_in_epoch + sum(
                e.progress.samples_in_epoch
                for e in self._others.values()
                if e.progress.epoch == self._epoch
            )
            if done >= self.samples_per_epoch:
                # Nobody else can be in a later epoch (we would have jumped to it above), so
                # after this step no sample counts toward the new epoch yet.
                self._set_epoch(self._epoch + 1)

    def _set_epoch(self, epoch: int) -> None:
        assert epoch > self._epoch, "epochs never go down"
        self.log.info("new epoch", epoch=epoch, previous=self._epoch)
        self._epoch = epoch
        self._samples_in_epoch = 0
        self._changed.set()
        self._epoch_changed.set()
        self._epoch_changed = trio.Event()

    def _drop_expired(self) -> None:
        now = self.peer.dht.now()
        gone = [p for p, e in self._others.items() if e.expiration <= now]
        for p in gone:
            del self._others[p]

    # -- throughput ------------------------------------------------------------------------

    def _prune_buckets(self) -> None:
        oldest = math.floor(trio.current_time() - self.throughput_window)
        self._buckets = {s: n for s, n in self._buckets.items() if s >= oldest}

    def _throughput(self) -> float:
        """Samples per second over the last ``throughput_window`` seconds (or since start)."""
        now = trio.current_time()
        if self._started is None:
            self._started = now
        start = max(now - self.throughput_window, self._started)
        if now <= start:
            return 0.0
        first = math.floor(start)
        # Whole seconds: a bucket that began before the window is counted whole, so the
        # estimate is at most one second's samples high, never too low.
        samples = sum(n for s, n in self._buckets.items() if s >= first)
        return samples / (now - start)


def _trio_time() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:
        return None


def _positive(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0
