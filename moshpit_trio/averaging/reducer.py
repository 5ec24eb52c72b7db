"""What reducer ``j`` does with span ``j`` of one round: collect, check, average (sans-IO).

Every member of the group sends its part of span ``j`` to reducer ``j`` in chunks (decoded to
float32 by the caller). :class:`SpanAccumulator` keeps each sender's chunks (as they came, or a
copy of each), and a chunk only counts once it has arrived whole and passed every check: a
sender that sends anything wrong is left out from there on, never half a chunk in (MOSHPIT.md
§1, "Failures inside a group").

Two ways to average. :meth:`SpanAccumulator.finalize` averages the whole span once, over the
senders whose whole part arrived. :meth:`SpanAccumulator.take` averages it range by range as
the parts come in (the all-reduce streams each range back while the rest is still arriving):
a range ``[done, ready)`` is taken once every sender still counted has delivered it, over those
senders, so a sender excluded half-way (lost, late, over the norm bound) is in the ranges taken
before and in none after. Either way the result says which senders each average holds, so the
round report can tell every member exactly what its span ``j`` contains.

Checks, each with the tag a :class:`BadContribution` carries:

``"sender"``     the sender index is not a member of the group (nobody is excluded)
``"offset"``     the chunk starts outside the span
``"length"``     the chunk runs past the span's end, or is not a flat vector
``"duplicate"``  the chunk repeats elements the sender already delivered
``"nonfinite"``  NaN or ±Inf in the chunk
``"weight"``     the weight is not finite and positive, or differs from the sender's first chunk
``"norm"``       the L2 norm of what the sender delivered so far is over ``max_norm``
``"late"``       a chunk arrived after :meth:`SpanAccumulator.finalize` (nobody is excluded)

A sender that fails a check (all but ``"sender"`` and ``"late"``) is excluded, as if it had
failed, and later chunks from it are dropped without another error.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, ProtocolError

__all__ = ["BadContribution", "SpanAccumulator", "SpanRange"]

FloatArray = npt.NDArray[np.float32]

# finalize() works through the span in blocks this long, so the float64 partial sums stay in
# cache instead of streaming a float64 array of the whole span through memory once per sender.
_BLOCK = 1 << 17


@dataclasses.dataclass(frozen=True, slots=True)
class SpanRange:
    """A range ``[start, end)`` of the span (offsets within it), averaged by
    :meth:`SpanAccumulator.take` over the senders ``included`` (ascending); ``values`` None
    when nobody was included."""

    start: int
    end: int
    values: FloatArray | None
    included: tuple[int, ...]


def _average_into(
    out: FloatArray, parts: list[_Part], weights: list[float], start: int, end: int
) -> None:
    """``out[start:end]`` = the weighted average of ``parts`` over ``[start, end)`` (each has
    delivered it): summed in float64 in sender order and rounded once to float32, so it does
    not depend on the order in which chunks arrived, and the average of identical parts is
    exactly that part."""
    if end <= start:
        return
    if len(parts) == 1:
        for lo, hi, values in parts[0].views(start, end):
            out[lo:hi] = values
        return
    # Scale by the largest weight first so that the sum of weights cannot overflow.
    top = max(weights)
    scaled = [w / top for w in weights]
    total = math.fsum(scaled)
    coefficients = [w / total for w in scaled]
    acc = np.empty(min(_BLOCK, end - start), dtype=np.float64)
    tmp = np.empty_like(acc)
    # Equal weights (the usual case): add up in float64, then scale once; fewer passes over a
    # block, and the same float32 result up to a double rounding. Each float32 block is widened
    # by a plain copy into a float64 one first: numpy's mixed-type add or multiply widens
    # through small internal buffers instead, a third slower here (5.0 against 3.7 ms for four
    # senders' 2.5M values), for the very same sums.
    equal = all(w == weights[0] for w in weights)
    # The senders' chunks may end at different places: average between every place where
    # one of them does, so that each sender's values there are one view.
    cuts = sorted({start, end, *(c for part in parts for c in part.cuts(start, end))})
    for lo, hi in itertools.pairwise(cuts):
        views = [part.view(lo, hi) for part in parts]
        for at in range(lo, hi, _BLOCK):
            upto = min(at + _BLOCK, hi)
            i, j = at - lo, upto - lo
            a, t = acc[: j - i], tmp[: j - i]
            a[...] = views[0][i:j]
            if equal:
                for view in views[1:]:
                    t[...] = view[i:j]
                    a += t
                a *= coefficients[0]
            else:
                a *= coefficients[0]
                for view, c in zip(views[1:], coefficients[1:], strict=True):
                    t[...] = view[i:j]
                    t *= c
                    a += t
            out[at:upto] = a


class BadContribution(ProtocolError):
    """A sender's contribution to a span failed a check; ``reason`` is the tag (see the module
    docstring) and ``sender`` the sender's index in the group, when known.

    Unlike other :class:`ProtocolError` s it does not mean a connection must be closed: the
    sender is left out of this round's average and reported.
    """

    def __init__(self, reason: str, detail: str = "", *, sender: int | None = None) -> None:
        super().__init__(reason, detail)
        self.sender = sender


class _Part:
    """One sender's part of the span while it arrives: the chunks that passed every check,
    each as it came (``add(keep=True)``) or a copy, sorted by offset."""

    __slots__ = ("delivered", "ends", "offsets", "starts", "sumsq", "values", "weight")

    def __init__(self) -> None:
        self.weight: float | None = None
        # Disjoint, sorted, non-adjacent [start, end) runs delivered so far (adjacent runs are
        # merged, so chunks sent in order keep this at one run).
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.delivered = 0
        self.sumsq = 0.0
        # the chunks: values[k] holds [offsets[k], offsets[k] + len(values[k])), disjoint
        self.offsets: list[int] = []
        self.values: list[FloatArray] = []

    def keep(self, offset: int, values: FloatArray) -> None:
        k = bisect.bisect_right(self.offsets, offset)
        self.offsets.insert(k, offset)
        self.values.insert(k, values)

    def cuts(self, start: int, end: int) -> list[int]:
        """Where chunks begin or end strictly inside ``(start, end)``."""
        inside = []
        k = max(0, bisect.bisect_right(self.offsets, start) - 1)
        for offset, values in zip(self.offsets[k:], self.values[k:], strict=True):
            if offset >= end:
                break
            for cut in (offset, offset + len(values)):
                if start < cut < end:
                    inside.append(cut)
        return inside

    def view(self, start: int, end: int) -> FloatArray:
        """The values ``[start, end)``, which lie within one chunk (``cuts`` says where)."""
        k = bisect.bisect_right(self.offsets, start) - 1
        offset, values = self.offsets[k], self.values[k]
        if k < 0 or end > offset + len(values):
            raise AssertionError(f"[{start}, {end}) is not within one delivered chunk")
        return values[start - offset : end - offset]

    def views(self, start: int, end: int) -> list[tuple[int, int, FloatArray]]:
        """``(a, b, values)`` for each chunk's share of ``[start, end)``, in order."""
        cuts = [start, *self.cuts(start, end), end]
        return [(a, b, self.view(a, b)) for a, b in itertools.pairwise(cuts)]

    def cover(self, start: int, end: int) -> bool:
        """Record ``[start, end)`` as delivered; False (and nothing recorded) on any overlap."""
        i = bisect.bisect_right(self.starts, start)
        if i > 0 and self.ends[i - 1] > start:
            return False
        if i < len(self.starts) and self.starts[i] < end:
            return False
        merge_left = i > 0 and self.ends[i - 1] == start
        merge_right = i < len(self.starts) and self.starts[i] == end
        if merge_left and merge_right:
            self.ends[i - 1] = self.ends[i]
            del self.starts[i], self.ends[i]
        elif merge_left:
            self.ends[i - 1] = end
        elif merge_right:
            self.starts[i] = start
        else:
            self.starts.insert(i, start)
            self.ends.insert(i, end)
        self.delivered += end - start
        return True


class SpanAccumulator:
    """Reducer ``j``'s state for span ``j`` of one round: what each sender delivered, and the
    average.

    ``length`` is the span's length, ``senders`` the group's size (senders are indexed
    ``0 .. senders - 1``, the group's member order); ``max_norm`` optionally bounds the L2 norm of
    each sender's part.

    Memory: each sender's chunks, held until it is excluded or the span is finalized; a chunk
    handed over with ``keep=True`` is held as it is, any other is copied once.
    """

    def __init__(self, length: int, senders: int, *, max_norm: float | None = None) -> None:
        length, senders = operator.index(length), operator.index(senders)
        if length < 0:
            raise ConfigError(f"a span's length cannot be negative ({length})")
        if senders < 1:
            raise ConfigError("a span needs at least one sender")
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"max_norm must be positive and finite, not {max_norm!r}")
        self.length = length
        self.senders = senders
        self.max_norm = max_norm
        self._parts: list[_Part | None] = [_Part() for _ in range(senders)]
        self._excluded: dict[int, str] = {}
        self._finalized = False
        self._done = 0  # take(): the span is averaged up to here
        self._result: FloatArray | None = None

    @property
    def excluded(self) -> dict[int, str]:
        """Excluded senders and why (the tag of the first failed check, or exclude()'s reason)."""
        return dict(self._excluded)

    @property
    def finalized(self) -> bool:
        return self._finalized

    def delivered(self, sender: int) -> int:
        """How many elements of its part ``sender`` has delivered (0 once excluded)."""
        part = self._parts[self._index(sender)]
        return 0 if part is None else part.delivered

    def complete(self, sender: int) -> bool:
        """True once ``sender`` delivered its whole part and passed every check."""
        part = self._parts[self._index(sender)]
        return part is not None and part.weight is not None and part.delivered == self.length

    def add(
        self, sender: int, offset: int, values: Any, weight: float, *, keep: bool = False
    ) -> None:
        """One decoded chunk of ``sender``'s part, placed at ``offset`` within the span.

        ``values`` is a flat float array (a read-only or unaligned view of received bytes is
        fine: it is copied once and checked there). With ``keep``, the caller hands the array
        over, never to change it again: an aligned float32 one is then held as it is, with no
        copy (the all-reduce's received chunks, and its own part). Raises
        :class:`BadContribution` if a check fails, after excluding the sender; chunks from an
        already excluded sender are dropped silently.
        """
        if self._finalized:
            raise BadContribution("late", "the span was already averaged", sender=sender)
        try:
            sender = operator.index(sender)
        except TypeError:
            raise BadContribution("sender", f"not a sender index: {sender!r}") from None
        if not 0 <= sender < self.senders:
            raise BadContribution(
                "sender", f"{sender} is not in a group of {self.senders}", sender=sender
            )
        part = self._parts[sender]
        if part is None:
            return
        try:
            self._add(part, sender, offset, values, weight, keep)
        except BadContribution as error:
            self._drop(sender, error.reason)
            raise

    def _add(
        self, part: _Part, sender: int, offset: int, values: Any, weight: float, keep: bool
    ) -> None:
        def bad(reason: str, detail: str) -> BadContribution:
            return BadContribution(reason, f"sender {sender}: {detail}", sender=sender)

        try:
            offset = operator.index(offset)
        except TypeError:
            raise bad("offset", f"offset {offset!r} is not an integer") from None
        if not 0 <= offset <= self.length:
            raise bad("offset", f"chunk at {offset} is outside a span of {self.length}")
        values = np.asarray(values)
        if values.ndim != 1 or values.dtype.kind != "f":
            raise bad("length", f"a chunk must be a flat float vector, not {values.shape}")
        end = offset + values.shape[0]
        if end > self.length:
            raise bad("length", f"chunk [{offset}, {end}) runs past a span of {self.length}")
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise bad("weight", f"weight {weight!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise bad("weight", f"weight {weight!r} is not positive and finite")
        if part.weight is not None and weight != part.weight:
            raise bad("weight", f"weight {weight!r} changed from {part.weight!r}")
        if end > offset and not part.cover(offset, end):
            raise bad("duplicate", f"chunk [{offset}, {end}) repeats delivered elements")
        part.weight = weight
        if end == offset:
            return
        # The values checked below are exactly those that will be averaged: the caller's own
        # array when it hands it over (keep) and it is aligned float32, else a copy (aligned:
        # a view of received bytes often is not, and numpy's reductions run up to several
        # times slower on those; a float64 value past float32's range shows up as Inf there).
        # A failure below excludes the sender: nothing half-checked is ever used. One pass
        # then gives both checks: the float32 sum of squares of finite values is finite unless
        # it overflows (|values| ~ 1e19), and is NaN/Inf whenever a value is; the slow path
        # tells the two apart and gets an exact sum in float64. einsum, not np.dot: BLAS
        # would wake its worker threads, which then spin on cores the other peers need.
        if (
            keep
            and values.dtype == np.float32
            and values.flags.c_contiguous
            and values.flags.aligned
        ):
            kept = values
        else:
            kept = np.empty(end - offset, dtype=np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                kept[...] = values
        with np.errstate(over="ignore", invalid="ignore"):
            sumsq = float(np.einsum("i,i->", kept, kept))
        if not math.isfinite(sumsq):
            if not np.isfinite(kept).all():
                raise bad("nonfinite", f"NaN or Inf in chunk [{offset}, {end})")
            wide = kept.astype(np.float64)
            sumsq = float(np.dot(wide, wide))
        part.keep(offset, kept)
        part.sumsq += sumsq
        # The norm of what arrived so far: it only grows, so a part over the bound is found at
        # the chunk that takes it over, before a range it is in can be averaged (take()).
        if self.max_norm is not None:
            norm = math.sqrt(part.sumsq)
            if norm > self.max_norm:
                raise bad("norm", f"L2 norm {norm:.6g} is over the bound {self.max_norm:.6g}")

    def exclude(self, sender: int, reason: str) -> None:
        """Leave ``sender`` out of the average (it failed, timed out, or misbehaved elsewhere):
        whatever it delivered is dropped. The first reason given is the one kept."""
        self._drop(self._index(sender), reason)

    def _drop(self, sender: int, reason: str) -> None:
        self._parts[sender] = None
        self._excluded.setdefault(sender, reason)

    def _index(self, sender: int) -> int:
        sender = operator.index(sender)
        if not 0 <= sender < self.senders:
            raise ConfigError(f"sender {sender} is not in a group of {self.senders}")
        return sender

    def finalize(self) -> tuple[FloatArray, list[int]]:
        """The weighted average of the span over the senders that delivered their whole part and
        passed every check (weights rescaled over them), and those senders, sorted.

        Senders still incomplete are left out (their chunks are dropped; :attr:`excluded` does
        not list them, the caller knows who timed out). ValueError if nobody qualifies: the
        caller keeps its local values for the span. The accumulator is closed afterwards.

        The sum runs in float64 in sender order, so the result does not depend on the order in
        which chunks arrived, and the average of identical parts is exactly that part.
        """
        if self._finalized:
            raise ConfigError("finalize() was already called for this span")
        if self._done:
            raise ConfigError("finalize() after take(): take the rest instead")
        self._finalized = True
        included = [s for s in range(self.senders) if self.complete(s)]
        parts, weights = self._counted(included)
        self._parts = [None] * self.senders
        if not included:
            raise ValueError("no sender delivered its whole part of the span")
        result = np.empty(self.length, dtype=np.float32)
        _average_into(result, parts, weights, 0, self.length)
        return result, included

    def _counted(self, senders: Sequence[int]) -> tuple[list[_Part], list[float]]:
        """The parts and weights of ``senders``, each of which has delivered something."""
        parts: list[_Part] = []
        weights: list[float] = []
        for s in senders:
            part = self._parts[s]
            assert part is not None and part.weight is not None
            parts.append(part)
            weights.append(part.weight)
        return parts, weights

    @property
    def done(self) -> int:
        """How far :meth:`take` has averaged the span (``[0, done)``)."""
        return self._done

    def ready(self) -> int:
        """How far the span can be averaged now: the end of the prefix that every sender still
        counted (not excluded) has delivered, at least :attr:`done`. The span's length when
        nobody is counted any more (what is left then has no average)."""
        end = self.length
        for part in self._parts:
            if part is None:
                continue
            if part.weight is None or not part.starts or part.starts[0] != 0:
                return self._done
            end = min(end, part.ends[0])
        return max(end, self._done)

    def take(self, min_length: int = 1, *, no_short_rest: bool = False) -> SpanRange | None:
        """Average the next range of the span that every sender still counted has delivered,
        ``[done, ready())``, once it holds ``min_length`` values or reaches the span's end;
        None before that. With ``no_short_rest``, also not while what would remain after it
        is shorter than the range itself: that rest is taken together with it at the end
        instead (fewer, larger ranges: a span's last chunk, often a short one, does not cost
        a range of its own).

        This is the streaming form of :meth:`finalize`: ranges are averaged as the parts come
        in, each over the senders counted when it is taken (a sender excluded later, say over
        the norm bound or lost, is in the ranges taken before and in none after; a chunk is in
        a range whole or not at all). A range nobody is counted for any more has no average
        (``values`` None, ``included`` empty): the members keep their own values there. Once
        a range reaches the span's end the span is finalized (:attr:`finalized`); the
        senders' chunks are dropped.
        """
        if self._finalized:
            return None  # finalize() took it all, or take() reached the end
        end = self.ready()
        start = self._done
        if end <= start or (end < self.length and end - start < min_length):
            return None
        if no_short_rest and end < self.length and self.length - end < end - start:
            return None
        included = tuple(s for s, part in enumerate(self._parts) if part is not None)
        self._done = end
        values: FloatArray | None = None
        if included:
            if self._result is None:
                self._result = np.empty(self.length, dtype=np.float32)
            parts, weights = self._counted(included)
            _average_into(self._result, parts, weights, start, end)
            values = self._result[start:end]
        if end == self.length:
            self._finalized = True
            self._parts = [None] * self.senders
        return SpanRange(start, end, values, included)
