"""Max-min fair sharing of bandwidth among flows, in continuous time (sans-IO).

A *flow* is a transmission of some bytes that crosses a few *resources* (in the in-memory
network: its link direction, the sender's upload, the receiver's download), each with a capacity
in bytes/s. At every moment the flows that are transmitting share the resources max-min fairly,
roughly as long-lived TCP connections do: no flow can go faster without slowing one that is no
faster than it. :func:`max_min_rates` computes that allocation by progressive filling (raise every
flow's rate together; a resource that fills up freezes the flows crossing it at their current
rate; go on with the others).

:class:`FairShare` keeps the flows of a network over time. Rates are constant between events (a
flow starts, finishes or is aborted, a capacity changes), so each flow's finish time follows
exactly from its bytes and the rates it had; after an event only the flows connected to it
through shared resources are recomputed. Nothing here reads a clock: the caller passes ``now``
(``trio.current_time()`` under the virtual clock in ``network.py``) and waits for the finish
times itself. Several events at one instant need one recomputation: they mark the model dirty,
and :meth:`FairShare.settle` recomputes once.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

__all__ = ["FairShare", "Flow", "max_min_rates"]

R = TypeVar("R", bound=Hashable)
F = TypeVar("F", bound=Hashable)


def max_min_rates(flows: Mapping[F, Iterable[R]], capacity: Mapping[R, float]) -> dict[F, float]:
    """The max-min fair rate of every flow, given the resources each crosses.

    ``capacity`` gives every resource's bytes/s (``math.inf``: unlimited). A flow that crosses
    no limited resource gets ``math.inf``. Equal flows (the same resources) get exactly equal
    rates, no resource is given more than its capacity (up to float rounding), and every flow
    with a finite rate is bottlenecked: it crosses a resource that is full and on which no flow
    is faster than it. The result does not depend on the order of ``flows``, except for rounding.

    Raises ``ValueError`` for a capacity that is not > 0 or a resource without one.
    """
    limited: dict[F, tuple[R, ...]] = {}
    for f, resources in flows.items():
        mine: list[R] = []
        for r in dict.fromkeys(resources):  # a resource named twice is crossed once
            try:
                c = capacity[r]
            except KeyError:
                raise ValueError(f"no capacity given for resource {r!r}") from None
            if not c > 0:
                raise ValueError(f"capacity of {r!r} must be > 0, got {c}")
            if not math.isinf(c):
                mine.append(r)
        limited[f] = tuple(mine)
    return _allocate(limited, capacity)


def _allocate(flows: Mapping[F, tuple[R, ...]], capacity: Mapping[R, float]) -> dict[F, float]:
    """:func:`max_min_rates` for flows given only their limited resources, each once, with
    capacities known to be > 0 (FairShare keeps its flows that way)."""
    users: dict[R, list[F]] = {}
    rates: dict[F, float] = {}
    for f, resources in flows.items():
        if not resources:
            rates[f] = math.inf
        for r in resources:
            fs = users.get(r)
            if fs is None:
                users[r] = [f]
            else:
                fs.append(f)
    left = {r: float(capacity[r]) for r in users}  # capacity not yet given to frozen flows
    count = {r: len(fs) for r, fs in users.items()}  # flows on it not yet frozen
    # Each resource's fair share of what is left, smallest first. As flows freeze, a share can
    # only grow (a flow freezes at the smallest share, no more than this resource's), so an
    # entry is a lower bound: one popped that is still exact is the next bottleneck, one that
    # went stale goes back with its new value. The index breaks ties (and never compares R).
    heap = [(left[r] / n, i, r) for i, (r, n) in enumerate(count.items())]
    heapq.heapify(heap)
    while heap:
        share, i, bottleneck = heapq.heappop(heap)
        n = count.get(bottleneck)
        if not n:
            continue  # every flow on it froze elsewhere
        current = left[bottleneck] / n
        if current > share:
            heapq.heappush(heap, (current, i, bottleneck))
            continue
        for f in users[bottleneck]:
            if f in rates:
                continue
            rates[f] = current
            for r in flows[f]:
                m = count[r] - 1
                if m:
                    count[r] = m
                    # never below zero through rounding, so no later share turns negative
                    x = left[r] - current
                    left[r] = x if x > 0.0 else 0.0
                else:
                    del count[r]
    return rates


class Flow(Generic[R]):
    """One transmission in a :class:`FairShare`: its resources, bytes, rate and finish time.

    ``rate`` and ``finish`` are valid from the first :meth:`FairShare.settle` after its start
    (until then ``rate`` is 0 and ``finish`` infinite); ``finish`` is when its last byte leaves
    if no later event changes its rate. ``wake_at`` belongs to the caller: the time it waits
    until, so that :meth:`FairShare.settle` can say whose finish moved before it. ``tag`` is
    the caller's too.
    """

    __slots__ = (
        "_left",
        "_since",
        "active",
        "finish",
        "limited",
        "rate",
        "resources",
        "size",
        "tag",
        "wake_at",
    )

    def __init__(self, resources: tuple[R, ...], size: float, now: float, tag: object) -> None:
        self.resources = resources
        # Those of its resources with a finite capacity: the only ones that couple it to
        # other flows (kept by FairShare as capacities change).
        self.limited = resources
        self.size = size
        self.tag = tag
        self.rate = 0.0
        self.finish = math.inf
        self.wake_at = math.inf
        # Bytes left at time _since; the rate has been constant since then.
        self._left = float(size)
        self._since = now
        # In the allocation: started, not stopped, and not yet seen finished by a settle.
        self.active = True

    def left(self, now: float) -> float:
        """Bytes not yet transmitted at ``now`` (at the current rate)."""
        if now >= self.finish:
            return 0.0
        return max(self._left - self.rate * (now - self._since), 0.0)

    def __repr__(self) -> str:
        return f"<Flow {self.size:g} B over {self.resources} at {self.rate:g} B/s>"


class FairShare(Generic[R]):
    """Flows sharing resources max-min fairly over time (see the module's docstring).

    ``capacity(resource)`` is read once per resource and kept; when a capacity changes, call
    :meth:`touch` with the resources whose capacity changed, then :meth:`settle`. Times must
    never go backwards from one call to the next.
    """

    def __init__(self, capacity: Callable[[R], float]) -> None:
        self._capacity = capacity
        self._cap: dict[R, float] = {}
        # resource -> the active flows crossing it (dicts as ordered sets: reproducible order)
        self._users: dict[R, dict[Flow[R], None]] = {}
        self._dirty: dict[R, None] = {}

    @property
    def dirty(self) -> bool:
        """Whether an event since the last :meth:`settle` may have changed some rates."""
        return bool(self._dirty)

    def flows(self) -> list[Flow[R]]:
        """The active flows, each once."""
        return list(dict.fromkeys(f for fs in self._users.values() for f in fs))

    def start(self, resources: Iterable[R], size: float, now: float, tag: object = None) -> Flow[R]:
        """A new flow of ``size`` bytes (> 0) from ``now``; its rate comes with the next settle."""
        if not size > 0 or math.isinf(size):
            raise ValueError(f"a flow's size must be finite and > 0, got {size}")
        flow = Flow(tuple(dict.fromkeys(resources)), size, now, tag)
        flow.limited = self._limited(flow.resources)
        for r in flow.resources:
            self._users.setdefault(r, {})[flow] = None
            self._dirty[r] = None
        return flow

    def stop(self, flow: Flow[R], now: float) -> None:
        """The flow ends: finished (``now >= flow.finish``) or aborted, its share given back."""
        if not flow.active:
            return
        self._deactivate(flow)
        if now < flow.finish:
            # Aborted: what it had not sent by now stays unsent (``left`` says how much).
            self._rebase(flow, now)
            flow.rate = 0.0
            flow.finish = math.inf
        for r in flow.resources:
            self._dirty[r] = None

    def touch(self, resources: Iterable[R]) -> None:
        """The capacity of these resources changed: their flows are recomputed at the next
        :meth:`settle`."""
        for r in resources:
            self._cap.pop(r, None)
            users = self._users.get(r)
            if users is not None:
                for flow in users:
                    flow.limited = self._limited(flow.resources)
                self._dirty[r] = None

    def settle(self, now: float) -> list[Flow[R]]:
        """Recompute the rates that the events since the last settle may have changed.

        Returns the flows whose finish time is now earlier than their ``wake_at``: whoever
        waits for them must wake up sooner. A flow found finished (``finish <= now``) leaves
        the allocation here, and its :meth:`stop` later changes nothing.
        """
        if not self._dirty:
            return []
        component = self._component(self._dirty)
        self._dirty = {}
        running: dict[Flow[R], tuple[R, ...]] = {}
        for flow in component:
            if flow.finish <= now:
                self._deactivate(flow)  # done: its sender will stop it at this instant
            else:
                running[flow] = flow.limited
        rates = _allocate(running, self._cap)
        woken: list[Flow[R]] = []
        for flow, rate in rates.items():
            if rate == flow.rate:
                continue  # unchanged: keep its finish exactly as computed before
            self._rebase(flow, now)
            flow.rate = rate
            flow.finish = now + flow._left / rate if flow._left > 0 else now
            if flow.finish < flow.wake_at:
                woken.append(flow)
        return woken

    # -- internals ---------------------------------------------------------------------------

    def _limited(self, resources: tuple[R, ...]) -> tuple[R, ...]:
        cap = self._cap
        for r in resources:
            if r not in cap:
                c = self._capacity(r)
                if not c > 0:
                    raise ValueError(f"capacity of {r!r} must be > 0, got {c}")
                cap[r] = c
        return tuple(r for r in resources if cap[r] != math.inf)

    def _rebase(self, flow: Flow[R], now: float) -> None:
        flow._left = flow.left(now)
        flow._since = now

    def _deactivate(self, flow: Flow[R]) -> None:
        flow.active = False
        for r in flow.resources:
            users = self._users.get(r)
            if users is not None:
                users.pop(flow, None)
                if not users:
                    del self._users[r]

    def _component(self, resources: Iterable[R]) -> list[Flow[R]]:
        """Every active flow on these resources or connected to them through shared limited
        resources: the only ones whose max-min rate an event on them can change."""
        users = self._users
        seen_r = set(resources)
        seen_f: dict[Flow[R], None] = {}
        todo = list(seen_r)
        while todo:
            for flow in users.get(todo.pop(), ()):
                if flow not in seen_f:
                    seen_f[flow] = None
                    for r in flow.limited:
                        if r not in seen_r:
                            seen_r.add(r)
                            todo.append(r)
        return list(seen_f)
