"""MoshpitOptimizer: Moshpit SGD (MOSHPIT.md §2) for ordinary synchronous PyTorch loops.

    opt = MoshpitOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                           run_id="digits", bootstrap=["ws://..."], average_every=4)
    for x, y in data:
        loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()
    opt.close()        # or `with MoshpitOptimizer(...) as opt:`

The peer (transport, DHT, averager, state server, progress tracker) runs in trio, in one
background thread that this object owns: the *bridge*. The training thread talks to it in two
ways only: ``trio.from_thread.run`` where it chose to wait (start-up, the state download, a
round in ``average_every=τ`` mode), and ``TrioToken.run_sync_soon`` for news it does not wait
on (samples done). Parameters are only ever written by the training thread; the trio thread
reads them (snapshots for rounds and for joiners) under ``_lock``, which the training thread
holds only while it changes them.

Background rounds (``average_every="background"``) overlap local steps, as in the paper: at
each slot of ``round_period`` the trio side snapshots the parameters, averages the snapshot,
and hands back ``average - snapshot``; the training thread adds that delta at its next step, so
local progress made during the round is kept.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import trio

from ..averaging.auto_grid import group_size_limits
from ..averaging.averager import MoshpitAverager, RoundReport
from ..errors import ConfigError, MoshpitError
from ..identity import Identity, PeerID
from ..log import get_logger
from ..peer import Peer, open_peer
from ..wire.access import AccessPolicy
from ..wire.transport import TransportLimits
from .progress import ProgressTracker, SwarmProgress
from .state import StateServer, StateUnavailable, TrainingState, download_state

__all__ = ["MoshpitOptimizer"]

_STATE_FORMAT = 1


class MoshpitOptimizer:
    """Wraps ``optimizer`` so that its model trains with the swarm of run ``run_id``.

    ``step()`` does the local optimizer step and, every ``average_every`` local steps (or in the
    background, continuously, with ``average_every="background"``), one round of Moshpit
    All-Reduce over the parameters (and the optimizer's statistics too with
    ``average_state=True``). A round that fails or is partial never stops training: its
    ``RoundReport`` (``last_report``) says what happened and the parameters keep what did not
    average. Weights are the samples each peer processed since its last round
    (``batch_size`` per step, default 1: then every step counts the same).

    Joining: unless ``load_state=False``, a peer given a ``bootstrap`` list first downloads the
    parameters, optimizer state and step counter from a live peer of the run (any one, chosen
    so that joiners spread out), so a restarted or new machine starts where the swarm is.

    ``identity`` is an ``Identity``, or a key file path (created, mode 0600, if missing; keep it
    to come back as the same peer), or ``None`` for a fresh identity. ``listen`` /
    ``client_mode`` / ``announce_host`` are ``open_peer``'s; ``grid``, ``target_group_size``,
    ``max_group_size``, ``min_group_size``, ``compression``, ``bandwidth`` and ``pace`` are
    ``MoshpitAverager``'s. ``round_period`` (seconds) aligns
    rounds to the swarm's clock (needed for background rounds; recommended whenever peers
    step at different speeds); ``round_timeout`` bounds one round (default: 80% of the period,
    or 30 s). ``samples_per_epoch`` lets ``swarm.epoch`` count global epochs. ``limits``,
    ``access`` (a private swarm's allowlist, rate limits and bans), and ``relays`` /
    ``relay_want`` (a client-mode peer's relays, so that others reach it) are ``open_peer``'s.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        run_id: str,
        bootstrap: Sequence[str] = (),
        identity: Identity | str | os.PathLike[str] | None = None,
        listen: str | None = "127.0.0.1:0",
        announce_host: str | None = None,
        client_mode: bool = False,
        grid: Sequence[int] | str = "auto",
        target_group_size: int | None = None,
        max_group_size: int | None = None,
        average_every: int | Literal["background"] = 4,
        average_state: bool = False,
        round_period: float | None = None,
        round_timeout: float | None = None,
        batch_size: int = 1,
        samples_per_epoch: int | None = None,
        compression: str = "none",
        bandwidth: float = 1e8,
        pace: bool = False,
        min_group_size: int = 2,
        load_state: bool = True,
        start_timeout: float = 60.0,
        download_timeout: float = 120.0,
        limits: TransportLimits | None = None,
        access: AccessPolicy | None = None,
        relays: Sequence[str] = (),
        relay_want: int = 2,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"MoshpitOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        background = average_every == "background"
        if not background and not (
            isinstance(average_every, int) and not isinstance(average_every, bool)
        ):
            raise ConfigError(
                f'average_every is a number of local steps or "background", got {average_every!r}'
            )
        if not background and average_every < 1:  # type: ignore[operator]
            raise ConfigError(f"average_every must be at least 1, got {average_every!r}")
        if background and round_period is None:
            round_period = 5.0
        if round_timeout is None:
            round_timeout = 0.8 * round_period if round_period is not None else 30.0
        if not isinstance(round_timeout, int | float) or not round_timeout > 0:
            raise ConfigError(f"round_timeout must be positive seconds, got {round_timeout!r}")
        if round_period is not None and round_timeout >= round_period:
            raise ConfigError(
                f"round_timeout ({round_timeout:g} s) must be shorter than round_period "
                f"({round_period:g} s), or rounds would skip slots"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(bootstrap, str):
            raise ConfigError("bootstrap is a list of addresses, not one address")
        if isinstance(relays, str):
            raise ConfigError("relays is a list of addresses, not one address")
        # Checked now, not when the averager starts on the bridge's thread.
        group_size_limits(target_group_size, max_group_size, fixed_grid=not isinstance(grid, str))
        self.optimizer = optimizer
        self.run_id = run_id
        self.average_every: int | Literal["background"] = average_every
        self.average_state = average_state
        self.batch_size = batch_size
        self.round_timeout = float(round_timeout)
        self.local_step = 0
        #: the report of the last round that finished (None before the first)
        self.last_report: RoundReport | None = None
        self._params: list[torch.Tensor] = [
            p for group in optimizer.param_groups for p in group["params"]
        ]
        if not self._params:
            raise ConfigError("the optimizer has no parameters")
        self._identity = _identity_from(identity)
        self._lock = threading.Lock()
        self._pending: list[list[np.ndarray]] = []  # deltas from background rounds
        self._samples_since_round = 0
        self._closed = False
        self._bridge = _Bridge(
            self,
            bootstrap=list(bootstrap),
            listen=listen,
            announce_host=announce_host,
            client_mode=client_mode,
            peer_options={
                "limits": limits,
                "access": access,
                "relays": tuple(relays),
                "relay_want": relay_want,
            },
            averager_options={
                "grid": grid if isinstance(grid, str) else tuple(grid),
                # (the averager refuses either with a fixed grid)
                "target_group_size": target_group_size,
                "max_group_size": max_group_size,
                "compression": compression,
                "bandwidth": bandwidth,
                "pace": pace,
                "min_group_size": min_group_size,
                "round_period": round_period,
            },
            samples_per_epoch=samples_per_epoch,
            load_state=load_state and bool(bootstrap),
            download_timeout=download_timeout,
        )
        self.log = get_logger(peer=self._identity.peer_id.short, run=run_id)
        #: the PeerID (text) of the peer whose state this one started from (None: its own)
        self.downloaded_from: str | None = None
        downloaded = self._bridge.start(start_timeout)
        if downloaded is not None:
            state, donor = downloaded
            self._load(state)
            self.downloaded_from = str(donor)
        # A program that forgets close() (or dies of an exception) must still exit promptly:
        # the finalizer runs when this object is collected or, at the latest, at exit (the
        # thread is a daemon, so it never holds the interpreter up either way).
        self._finalizer = weakref.finalize(self, _Bridge.stop, self._bridge, 10.0)

    # -- the training thread's API -----------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @property
    def peer_id(self) -> str:
        return str(self._identity.peer_id)

    @property
    def address(self) -> str | None:
        """Where other peers reach this one (``None`` in client mode)."""
        return self._bridge.address

    @property
    def swarm(self) -> SwarmProgress:
        """The swarm as this peer last saw it: live peers, total samples, global epoch."""
        return self._bridge.tracker_view()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        batch_size: int | None = None,
        loss: float | torch.Tensor | None = None,
    ) -> Any:
        """One local step; then, every ``average_every`` steps, one round (waits for it).

        ``batch_size`` overrides the constructor's for this step's weight (samples). ``loss``
        (a number or a one-element tensor; by default what ``closure`` returns) goes into this
        peer's progress record, for people watching the run (``moshpit dashboard``)."""
        if self._closed:
            raise ConfigError("step() after close()")
        self._bridge.raise_if_dead()
        samples = self.batch_size if batch_size is None else batch_size
        if not isinstance(samples, int) or samples < 0:
            raise ConfigError(f"batch_size must be a non-negative integer, got {samples!r}")
        reported = _loss_value(loss)
        with self._lock:
            result = self.optimizer.step(closure)
            self.local_step += 1
            self._samples_since_round += samples
            self._apply_pending()
        if loss is None and result is not None:
            with suppress(ConfigError):  # a closure may return anything; only a loss counts
                reported = _loss_value(result)
        self._bridge.report_progress(samples, self.local_step, reported)
        every = self.average_every
        if every != "background" and self.local_step % every == 0:
            self.last_report = self._bridge.run_round()
            with self._lock:
                self._apply_pending()
        return result

    def close(self, timeout: float = 10.0) -> None:
        """Leave the swarm: withdraw this peer's records and stop its thread (bounded)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        self._bridge.stop(timeout)

    def __enter__(self) -> MoshpitOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called from the trio thread (under _lock where it reads parameters) -----------------

    def _averaged_tensors(self) -> list[torch.Tensor]:
        tensors = list(self._params)
        if self.average_state:
            # floating statistics with a shape (momentum, moments), not counters like Adam's step
            tensors += [
                t for _, _, t in _state_tensors(self.optimizer) if t.is_floating_point() and t.dim()
            ]
        return tensors

    def _snapshot(
        self, buffers: list[np.ndarray] | None, *, take_samples: bool = True
    ) -> tuple[list[np.ndarray], float]:
        """Copy what is averaged into float32 buffers (new ones if the shapes changed);
        returns them and the samples processed since the last snapshot (the round's weight)."""
        with self._lock:
            tensors = self._averaged_tensors()
            if buffers is None or [b.shape for b in buffers] != [tuple(t.shape) for t in tensors]:
                buffers = [np.empty(tuple(t.shape), dtype=np.float32) for t in tensors]
            for b, t in zip(buffers, tensors, strict=True):
                np.copyto(b, t.detach().to("cpu", torch.float32).numpy())
            samples = self._samples_since_round
            if take_samples:
                self._samples_since_round = 0
        return buffers, float(samples)

    def _post_delta(self, delta: list[np.ndarray]) -> None:
        with self._lock:
            self._pending.append(delta)

    def _apply_pending(self) -> None:
        # Holding _lock. A delta whose shapes no longer match (optimizer state grew) is dropped.
        pending, self._pending = self._pending, []
        for delta in pending:
            tensors = self._averaged_tensors()
            if [d.shape for d in delta] != [tuple(t.shape) for t in tensors]:
                continue
            with torch.no_grad():
                for t, d in zip(tensors, delta, strict=True):
                    t.add_(torch.from_numpy(d).to(t.device, t.dtype))

    def _current_state(self) -> TrainingState:
        with self._lock:
            layout, tensors = [], []
            for t in self._params:
                tensors.append(_to_numpy(t))
            for index, name, value in _state_tensors(self.optimizer):
                layout.append([index, name, str(value.dtype).removeprefix("torch.")])
                tensors.append(_to_numpy(value))
            scalars = _state_scalars(self.optimizer)
            groups = [
                {k: v for k, v in g.items() if k != "params" and _plain(v)}
                for g in self.optimizer.param_groups
            ]
            return TrainingState(
                step=self.local_step,
                epoch=self._bridge.tracker_view().epoch,
                round=self._bridge.averager_round(),
                tensors=tensors,
                metadata={
                    "format": _STATE_FORMAT,
                    "params": len(self._params),
                    "state_tensors": layout,
                    "state_scalars": scalars,
                    "param_groups": groups,
                },
            )

    def _load(self, state: TrainingState) -> None:
        """Take a donor's state (training thread, before the first step)."""
        meta = state.metadata
        n = len(self._params)
        if meta.get("format") != _STATE_FORMAT or meta.get("params") != n:
            raise ConfigError(
                f"the donor's state does not fit this model: it has {meta.get('params')!r} "
                f"parameter tensors, this optimizer {n} (same model and optimizer on every peer?)"
            )
        params, extra = state.tensors[:n], state.tensors[n:]
        for i, (p, a) in enumerate(zip(self._params, params, strict=True)):
            if tuple(p.shape) != a.shape:
                raise ConfigError(
                    f"the donor's parameter {i} has shape {a.shape}, this model's {tuple(p.shape)}"
                )
        layout = meta.get("state_tensors", [])
        if len(layout) != len(extra):
            raise ConfigError("the donor's optimizer state is malformed")
        sd = self.optimizer.state_dict()
        new_state: dict[int, dict[str, Any]] = {}
        for (index, name, dtype), array in zip(layout, extra, strict=True):
            tensor = torch.from_numpy(np.array(array, copy=True)).to(getattr(torch, dtype))
            new_state.setdefault(int(index), {})[str(name)] = tensor
        for index, name, value in meta.get("state_scalars", []):
            new_state.setdefault(int(index), {})[str(name)] = value
        groups = sd["param_groups"]
        for mine, theirs in zip(groups, meta.get("param_groups", []), strict=False):
            mine.update({k: v for k, v in theirs.items() if k in mine and k != "params"})
        with self._lock, torch.no_grad():
            for p, a in zip(self._params, params, strict=True):
                p.copy_(torch.from_numpy(np.array(a, copy=True)).to(p.device, p.dtype))
            self.optimizer.load_state_dict({"state": new_state, "param_groups": groups})
            self.local_step = state.step
        self.log.info("state downloaded", step=state.step, epoch=state.epoch)


class _Bridge:
    """The trio side: one thread running one ``trio.run`` that holds the peer."""

    def __init__(
        self,
        owner: MoshpitOptimizer,
        *,
        bootstrap: list[str],
        listen: str | None,
        announce_host: str | None,
        client_mode: bool,
        peer_options: dict[str, Any],
        averager_options: dict[str, Any],
        samples_per_epoch: int | None,
        load_state: bool,
        download_timeout: float,
    ) -> None:
        # A weak reference: the optimizer going away (unclosed) must not be kept alive by its
        # own thread; its finalizer then stops the bridge.
        self._owner = weakref.ref(owner)
        self._identity = owner._identity
        self._run_id = owner.run_id
        self._background = owner.average_every == "background"
        self._round_timeout = owner.round_timeout
        self._bootstrap = bootstrap
        self._listen = listen
        self._announce_host = announce_host
        self._client_mode = client_mode
        self._peer_options = peer_options
        self._averager_options = averager_options
        self._samples_per_epoch = samples_per_epoch
        self._load_state = load_state
        self._download_timeout = download_timeout
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop_requested: trio.Event | None = None
        self._failure: BaseException | None = None
        self._downloaded: tuple[TrainingState, PeerID] | None = None
        self._peer: Peer | None = None
        self._tracker: ProgressTracker | None = None
        self._swarm: SwarmProgress | None = None
        self._averager: MoshpitAverager | None = None
        self._stack: AsyncExitStack | None = None
        self._buffers: list[np.ndarray] | None = None
        self._start_round = 0  # the donor's round, for a joiner without round_period
        self.address: str | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name=f"moshpit-peer-{self._run_id}", daemon=True
        )

    # -- training thread side ------------------------------------------------------------------

    def start(self, timeout: float) -> tuple[TrainingState, PeerID] | None:
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop(5.0)
            raise MoshpitError(f"the peer did not start within {timeout:g} s")
        if self._failure is not None:
            self._thread.join(5.0)
            failure = self._failure
            if isinstance(failure, Exception):
                raise failure
            raise MoshpitError(f"the peer failed to start: {failure!r}")
        downloaded, self._downloaded = self._downloaded, None
        return downloaded

    def raise_if_dead(self) -> None:
        if not self._thread.is_alive():
            raise MoshpitError(f"the peer's thread has stopped: {self._failure!r}")

    def report_progress(self, samples: int, step: int, loss: float | None = None) -> None:
        token, tracker = self._token, self._tracker
        if token is None or tracker is None:
            return

        def report() -> None:
            tracker.report(samples=samples, step=step, loss=loss)
            self._swarm = tracker.swarm

        with suppress(trio.RunFinishedError):
            token.run_sync_soon(report)

    def run_round(self) -> RoundReport:
        assert self._token is not None
        try:
            return trio.from_thread.run(self._round, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            # the peer stopped (close() from another thread, or a crash) during the round
            raise MoshpitError(f"the peer's thread has stopped: {self._failure!r}") from None

    def tracker_view(self) -> SwarmProgress:
        # The tracker lives in the trio thread (its view depends on trio's clock); the training
        # thread reads the copy the trio side refreshes at every reported step.
        swarm = self._swarm
        if swarm is None:
            raise MoshpitError("the peer is not running")
        return swarm

    def averager_round(self) -> int:
        return self._averager.round if self._averager is not None else 0

    def stop(self, timeout: float) -> None:
        token, stop = self._token, self._stop_requested
        if token is not None and stop is not None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- trio side -----------------------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported to the training thread; nothing else sees it
            self._failure = exc
            get_logger(run=self._run_id).error("the peer stopped", error=repr(exc))
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop_requested = trio.Event()
        async with (
            open_peer(
                self._identity,
                listen=self._listen,
                bootstrap=self._bootstrap,
                client_mode=self._client_mode,
                announce_host=self._announce_host,
                **self._peer_options,
            ) as peer,
            AsyncExitStack() as stack,
            trio.open_nursery() as nursery,
        ):
            self._peer, self._stack = peer, stack
            self.address = None if peer.address is None else str(peer.address)
            tracker = ProgressTracker(peer, self._run_id, samples_per_epoch=self._samples_per_epoch)
            await nursery.start(tracker.run)
            self._tracker, self._swarm = tracker, tracker.swarm
            await stack.enter_async_context(StateServer(peer, self._run_id, self._serve_state))
            if self._load_state:
                self._downloaded = await self._download(peer)
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            if self._background:
                nursery.start_soon(self._background_rounds)
            await self._stop_requested.wait()
            # Leaving: say so in the DHT (bounded), then end every task of this peer.
            with trio.move_on_after(5.0):
                await tracker.withdraw()
            nursery.cancel_scope.cancel()

    async def _download(self, peer: Peer) -> tuple[TrainingState, PeerID] | None:
        try:
            state, donor = await download_state(peer, self._run_id, timeout=self._download_timeout)
        except StateUnavailable as exc:
            # The first peers of a run have nobody to download from: they start fresh.
            get_logger(peer=peer.id.short, run=self._run_id).warning(
                "no state to download; starting from this peer's own parameters", reason=str(exc)
            )
            return None
        get_logger(peer=peer.id.short, run=self._run_id).info(
            "downloaded state", donor=donor.short, step=state.step
        )
        self._start_round = state.round
        return state, donor

    def _serve_state(self) -> TrainingState | None:
        owner = self._owner()
        return None if owner is None else owner._current_state()

    def _owner_or_fail(self) -> MoshpitOptimizer:
        # Taken for a moment, never across a wait: an optimizer dropped without close() must
        # be collectable, so that its finalizer stops this thread.
        owner = self._owner()
        if owner is None:
            raise MoshpitError("the optimizer is gone")
        return owner

    async def _ensure_averager(self) -> MoshpitAverager:
        if self._averager is None:
            assert self._peer is not None and self._stack is not None
            self._buffers, _ = self._owner_or_fail()._snapshot(None, take_samples=False)
            averager = MoshpitAverager(
                self._peer, self._run_id, self._buffers, **self._averager_options
            )
            averager.round = self._start_round
            self._averager = await self._stack.enter_async_context(averager)
        return self._averager

    async def _round(self) -> RoundReport:
        averager = await self._ensure_averager()
        weight = 0.0
        while True:
            await averager.wait_for_round()
            buffers, samples = self._owner_or_fail()._snapshot(self._buffers)
            weight += samples
            if buffers is self._buffers:
                break
            # What is averaged changed shape (optimizer statistics appeared): a new averager,
            # and a fresh snapshot at its slot.
            averager = await self._replace_averager(buffers)
        before = [b.copy() for b in buffers]
        report = await averager.step(weight=max(weight, 1.0), timeout=self._round_timeout)
        if self._tracker is not None:
            self._tracker.record_round(report)
        if report.excluded:  # malformed data earns a ban, as the access policy says
            assert self._peer is not None
            self._peer.transport.report_bad_data(dict(report.excluded))
        if report.spans:
            self._owner_or_fail()._post_delta([b - a for b, a in zip(buffers, before, strict=True)])
        return report

    async def _replace_averager(self, buffers: list[np.ndarray]) -> MoshpitAverager:
        # Optimizer statistics appear after the first local step (momentum buffers, Adam's
        # moments): the tensor list grows once, and the averager is made anew for it.
        assert self._peer is not None and self._stack is not None and self._averager is not None
        old = self._averager
        await old.__aexit__(None, None, None)
        averager = MoshpitAverager(self._peer, self._run_id, buffers, **self._averager_options)
        averager.round, averager.key = old.round, old.key
        await averager.__aenter__()
        self._stack.push_async_exit(averager.__aexit__)
        self._averager, self._buffers = averager, buffers
        return averager

    async def _background_rounds(self) -> None:
        log = get_logger(run=self._run_id)
        while True:
            try:
                report = await self._round()
            except MoshpitError as exc:
                if self._owner() is None:
                    return
                log.warning("background round failed", error=str(exc))
                await trio.sleep(self._round_timeout)
                continue
            owner = self._owner()
            if owner is None:
                return
            owner.last_report = report
            del owner


def _loss_value(loss: object) -> float | None:
    """A step's loss as a float for the progress record: a number or a one-element tensor.
    Anything else is a ``ConfigError`` when given as ``loss=``, and ignored when it is what a
    closure returned (a closure may return anything)."""
    if loss is None:
        return None
    if isinstance(loss, torch.Tensor):
        if loss.numel() != 1:
            raise ConfigError(f"loss must be a single number, got a tensor of {loss.numel()}")
        return float(loss.detach().item())
    if isinstance(loss, int | float) and not isinstance(loss, bool):
        return float(loss)
    raise ConfigError(f"loss must be a number or a one-element tensor, got {type(loss).__name__}")


def _identity_from(identity: Identity | str | os.PathLike[str] | None) -> Identity:
    if identity is None:
        return Identity.generate()
    if isinstance(identity, Identity):
        return identity
    if isinstance(identity, str | os.PathLike):
        path = Path(identity)
        if path.exists():
            return Identity.load(path)
        fresh = Identity.generate()
        fresh.save(path)
        return fresh
    raise ConfigError(f"identity is an Identity, a key file path or None, got {identity!r}")


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[tuple[int, str, torch.Tensor]]:
    """The optimizer's tensor statistics in a fixed order: (param index, name, tensor)."""
    state = optimizer.state_dict()["state"]
    for index in sorted(state):
        for name in sorted(state[index]):
            value = state[index][name]
            if isinstance(value, torch.Tensor):
                yield index, name, value


def _state_scalars(optimizer: torch.optim.Optimizer) -> list[list[Any]]:
    state = optimizer.state_dict()["state"]
    return [
        [index, name, state[index][name]]
        for index in sorted(state)
        for name in sorted(state[index])
        if _plain(state[index][name]) and not isinstance(state[index][name], torch.Tensor)
    ]


def _plain(value: Any) -> bool:
    """Whether ``value`` travels as plain msgpack (hyperparameters, counters)."""
    if isinstance(value, bool | int | float | str) or value is None:
        return True
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return False


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    t = tensor.detach().to("cpu")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; _load converts back
        t = t.to(torch.float32)
    return np.array(t.numpy(), copy=True)
