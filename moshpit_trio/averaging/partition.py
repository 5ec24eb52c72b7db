"""Tensors to one flat float32 vector and back; spans sized for the links; chunks (sans-IO).

A round averages a list of user tensors as if they were one vector: :class:`TensorLayout`
records where each tensor sits in it, :func:`flatten` copies them in (as float32, whatever their
dtype), and :func:`unflatten_into` writes averaged values back into the same tensors, in place,
cast to each tensor's dtype. Writing back can be limited to some elements (a mask or a list of
``(start, end)`` spans), because a round where reducer ``j`` failed must leave span ``j`` exactly
as it was locally, not round-tripped through float32.

Supported tensors are numpy ``float32``/``float16`` arrays and CPU torch ``float32``/``float16``/
``bfloat16`` tensors, contiguous or not. torch is never imported here: a torch tensor can only
exist if the caller imported torch, so it is looked up in ``sys.modules`` (importing torch costs
seconds and most of the package never needs it).

:func:`spans` cuts the flat vector into one contiguous span per group member, sized from the
members' bandwidths so that the busiest link finishes first (:func:`link_shares`; equal
bandwidths, equal spans); every member computes it on its own from the group the leader fixed,
so it uses exact rational arithmetic and must give the same answer on every machine.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import operator
import sys
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

__all__ = [
    "DTYPES",
    "FloatArray",
    "Spans",
    "TensorLayout",
    "chunk_ranges",
    "flatten",
    "spans",
    "unflatten_into",
    "write_pieces",
]

FloatArray: TypeAlias = npt.NDArray[np.float32]
Spans: TypeAlias = Sequence[tuple[int, int]]

# The dtype names a layout records. The library is part of the name because numpy and torch
# tensors are read and written differently (and numpy has no bfloat16).
DTYPES = (
    "numpy.float32",
    "numpy.float16",
    "torch.float32",
    "torch.float16",
    "torch.bfloat16",
)

_NUMPY_DTYPES = {np.dtype(np.float32): "numpy.float32", np.dtype(np.float16): "numpy.float16"}


def _torch() -> Any:
    """The torch module if the caller has imported it, else None (see the module docstring)."""
    return sys.modules.get("torch")


def _describe(tensor: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a supported tensor; ConfigError for anything else."""
    if isinstance(tensor, np.ndarray):
        name = _NUMPY_DTYPES.get(tensor.dtype)
        if name is None:
            raise ConfigError(
                f"numpy arrays to average must be float32 or float16, not {tensor.dtype}"
            )
        return tuple(int(d) for d in tensor.shape), name
    torch = _torch()
    if torch is not None and isinstance(tensor, torch.Tensor):
        if tensor.layout != torch.strided:
            raise ConfigError(f"torch tensors to average must be dense, not {tensor.layout}")
        if tensor.device.type != "cpu":
            raise ConfigError(
                f"torch tensors to average must be on the CPU, not {tensor.device}; "
                "copy them to the CPU first"
            )
        name = str(tensor.dtype)  # "torch.float32", ...
        if name not in DTYPES:
            raise ConfigError(
                f"torch tensors to average must be float32, float16 or bfloat16, not {name}"
            )
        return tuple(int(d) for d in tensor.shape), name
    raise ConfigError(
        f"cannot average a {type(tensor).__name__}: expected numpy arrays or torch tensors"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class TensorLayout:
    """How a list of tensors maps onto one flat float32 vector.

    Tensor ``i`` occupies ``[offsets[i], offsets[i] + prod(shapes[i]))`` in C (row-major) order;
    ``dtypes[i]`` is one of :data:`DTYPES`; ``total`` is the length of the flat vector.
    """

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    offsets: tuple[int, ...]
    total: int

    @classmethod
    def of(cls, tensors: Sequence[Any]) -> TensorLayout:
        """The layout of ``tensors``; ConfigError if the list is empty, holds no element at all,
        or holds anything but a supported tensor. Values are not looked at."""
        if len(tensors) == 0:
            raise ConfigError("there are no tensors to average")
        shapes: list[tuple[int, ...]] = []
        dtypes: list[str] = []
        offsets: list[int] = []
        total = 0
        for tensor in tensors:
            shape, dtype = _describe(tensor)
            shapes.append(shape)
            dtypes.append(dtype)
            offsets.append(total)
            total += math.prod(shape)
        if total == 0:
            raise ConfigError("the tensors to average hold no elements")
        return cls(tuple(shapes), tuple(dtypes), tuple(offsets), total)

    def size(self, index: int) -> int:
        """Number of elements of tensor ``index``."""
        return math.prod(self.shapes[index])

    def check(self, tensors: Sequence[Any]) -> None:
        """ConfigError unless ``tensors`` still match this layout (same count, shapes, dtypes):
        a model that changed shape between rounds must not be read through a stale layout."""
        if len(tensors) != len(self.shapes):
            raise ConfigError(
                f"expected {len(self.shapes)} tensors (the layout's), got {len(tensors)}"
            )
        for i, tensor in enumerate(tensors):
            shape, dtype = _describe(tensor)
            if shape != self.shapes[i] or dtype != self.dtypes[i]:
                raise ConfigError(
                    f"tensor {i} is {dtype}{list(shape)}, but the layout says "
                    f"{self.dtypes[i]}{list(self.shapes[i])}; build a new layout"
                )


def _check_flat(flat: Any, layout: TensorLayout, what: str) -> FloatArray:
    if (
        not isinstance(flat, np.ndarray)
        or flat.dtype != np.float32
        or flat.ndim != 1
        or flat.shape[0] != layout.total
    ):
        raise ConfigError(f"{what} must be a 1-D float32 numpy array of {layout.total} elements")
    return flat


def flatten(
    tensors: Sequence[Any], layout: TensorLayout, out: FloatArray | None = None
) -> FloatArray:
    """Copy ``tensors`` into one flat float32 vector laid out as ``layout`` says.

    With ``out`` (a writable, contiguous 1-D float32 array of ``layout.total`` elements) the
    values go there and ``out`` is returned, so a peer can reuse one buffer every round. Each
    tensor is read once and cast while copying: no temporary copy, contiguous or not.
    """
    layout.check(tensors)
    if out is None:
        out = np.empty(layout.total, dtype=np.float32)
    else:
        out = _check_flat(out, layout, "out")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ConfigError("out must be writable and contiguous")
    torch = _torch()
    for i, tensor in enumerate(tensors):
        start, n = layout.offsets[i], layout.size(i)
        if n == 0:
            continue
        target = out[start : start + n].reshape(layout.shapes[i])
        if isinstance(tensor, np.ndarray):
            np.copyto(target, tensor, casting="same_kind")
        else:
            # torch reads any strides and dtype (bfloat16 included) straight into our buffer;
            # detach() so a parameter that requires grad can be read outside autograd.
            torch.from_numpy(target).copy_(tensor.detach())
    return out


def _normalize_spans(spans_: Spans, total: int) -> list[tuple[int, int]]:
    result = []
    for pair in spans_:
        try:
            start, end = (operator.index(x) for x in pair)
        except (TypeError, ValueError):
            raise ConfigError(f"a mask span must be a pair of ints, not {pair!r}") from None
        if not 0 <= start <= end <= total:
            raise ConfigError(f"mask span ({start}, {end}) is outside [0, {total}]")
        if start < end:
            result.append((start, end))
    return result


def _write_range(target: Any, start: int, end: int, src: FloatArray, torch: Any) -> None:
    """Write ``src`` into elements ``[start, end)`` of ``target`` in C order, in place.

    The flat range is cut into at most ``2 * ndim + 1`` rectangular sub-views (a partial row at
    each end, whole rows between), so this works for any strides without copying the tensor or
    touching elements outside the range.
    """
    shape = tuple(target.shape)
    if len(shape) == 0:
        _assign(target, src.reshape(()), torch)
        return
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner
    if first == last:
        _write_range(target[first, ...], start - first * inner, end - first * inner, src, torch)
        return
    pos = 0
    if start % inner:
        head = inner - start % inner
        _write_range(target[first, ...], start % inner, inner, src[:head], torch)
        pos, first = head, first + 1
    full_end = last if end % inner else last + 1
    if full_end > first:
        rows = (full_end - first) * inner
        _assign(target[first:full_end], src[pos : pos + rows].reshape((-1, *shape[1:])), torch)
        pos += rows
    if end % inner:
        _write_range(target[last, ...], 0, end % inner, src[pos:], torch)


def _assign(target: Any, src: FloatArray, torch: Any) -> None:
    if isinstance(target, np.ndarray):
        np.copyto(target, src, casting="same_kind")
    else:
        target.copy_(torch.from_numpy(src))


def unflatten_into(
    flat: FloatArray,
    tensors: Sequence[Any],
    layout: TensorLayout,
    *,
    mask: npt.NDArray[np.bool_] | Spans | None = None,
) -> None:
    """Write ``flat`` back into ``tensors`` in place, cast to each tensor's dtype.

    ``mask`` limits the write to some elements of the flat vector: either a bool array with one
    entry per element, or a list of ``(start, end)`` spans (the cheap form: the all-reduce writes
    back the spans that averaged). Elements outside the mask are not touched at all.
    """
    flat = _check_flat(flat, layout, "flat")
    layout.check(tensors)
    torch = _torch()
    if torch is not None and not flat.flags.writeable:
        # torch.from_numpy warns on read-only arrays (e.g. a decoded view of received bytes).
        flat = flat.copy()
    for tensor in tensors:
        if isinstance(tensor, np.ndarray) and not tensor.flags.writeable:
            raise ConfigError("cannot write averaged values into a read-only numpy array")
    if mask is None:
        ranges: list[tuple[int, int]] | None = [(0, layout.total)]
    elif isinstance(mask, np.ndarray):
        if mask.dtype != np.bool_ or mask.shape != (layout.total,):
            raise ConfigError(
                f"an array mask must be bool with one entry per element ({layout.total}); "
                "give spans as a list of (start, end) pairs"
            )
        ranges = None
    else:
        ranges = _normalize_spans(mask, layout.total)
    for i, tensor in enumerate(tensors):
        start, n = layout.offsets[i], layout.size(i)
        if n == 0:
            continue
        if ranges is None:
            assert isinstance(mask, np.ndarray)
            _write_masked(
                tensor, flat[start : start + n], mask[start : start + n], layout, i, torch
            )
            continue
        target = tensor if isinstance(tensor, np.ndarray) else tensor.detach()
        for a, b in ranges:
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                _write_range(target, lo - start, hi - start, flat[lo:hi], torch)


def write_pieces(
    tensors: Sequence[Any], layout: TensorLayout, pieces: Sequence[tuple[int, FloatArray]]
) -> None:
    """Write each ``(start, values)`` piece into elements ``[start, start + len(values))`` of
    the flat layout, in place, cast to each tensor's dtype: what :func:`unflatten_into` does
    for a flat vector holding those values in those spans, without the flat vector in between
    (one copy instead of two). ``values`` may be read-only (a view of received bytes).

    >>> a, b = np.zeros(3, np.float32), np.zeros((2, 2), np.float32)
    >>> layout = TensorLayout.of([a, b])
    >>> write_pieces([a, b], layout, [(2, np.array([1, 2, 3], np.float32))])
    >>> a.tolist(), b.tolist()
    ([0.0, 0.0, 1.0], [[2.0, 3.0], [0.0, 0.0]])
    """
    layout.check(tensors)
    for tensor in tensors:
        if isinstance(tensor, np.ndarray) and not tensor.flags.writeable:
            raise ConfigError("cannot write averaged values into a read-only numpy array")
    checked: list[tuple[int, FloatArray]] = []
    for start, values in pieces:
        if (
            not isinstance(start, int)
            or not isinstance(values, np.ndarray)
            or values.dtype != np.float32
            or values.ndim != 1
            or not 0 <= start <= layout.total - values.shape[0]
        ):
            raise ConfigError(
                f"a piece is a start in [0, {layout.total}] and a 1-D float32 array that fits"
            )
        checked.append((start, values))
    torch = _torch()
    for start, values in checked:
        end = start + values.shape[0]
        if (
            torch is not None
            and not values.flags.writeable
            and any(not isinstance(t, np.ndarray) for t in tensors)
        ):
            # torch.from_numpy warns on read-only arrays even when, as here, it only reads (and
            # silencing warnings is process-wide, racing the training thread): copy first.
            values = values.copy()
        # the tensors this piece overlaps: from the last one starting at or before it
        first = max(bisect.bisect_right(layout.offsets, start) - 1, 0)
        for i in range(first, len(tensors)):
            t_start, n = layout.offsets[i], layout.size(i)
            if t_start >= end:
                break
            lo, hi = max(start, t_start), min(end, t_start + n)
            if lo < hi:
                tensor = tensors[i]
                target = tensor if isinstance(tensor, np.ndarray) else tensor.detach()
                _write_range(
                    target, lo - t_start, hi - t_start, values[lo - start : hi - start], torch
                )


def _write_masked(
    tensor: Any,
    values: FloatArray,
    mask: npt.NDArray[np.bool_],
    layout: TensorLayout,
    index: int,
    torch: Any,
) -> None:
    shape = layout.shapes[index]
    if isinstance(tensor, np.ndarray):
        # copyto's `where` writes only the selected elements, for any strides, casting as it goes.
        np.copyto(tensor, values.reshape(shape), casting="same_kind", where=mask.reshape(shape))
        return
    selected = torch.from_numpy(mask.reshape(shape))
    source = torch.from_numpy(values.reshape(shape)).to(tensor.dtype)
    tensor.detach()[selected] = source[selected]


def spans(
    total: int,
    bandwidths: Sequence[float],
    *,
    client_mode: Sequence[bool] | None = None,
    min_span: int = 0,
) -> list[tuple[int, int]]:
    """Cut ``[0, total)`` into one contiguous ``(start, end)`` span per member, in member order.

    Span sizes follow bandwidth so that the busiest link finishes first (``link_shares``):
    member ``i`` gets ``total * w_i / sum(w)`` elements with ``w`` the reducers' weights there,
    rounded by the largest-remainder method (each size is the floor or the ceiling of its exact
    share; the leftover elements go to the largest fractional parts, ties to the lower index).
    Equal bandwidths give equal spans; a reducer whose link is too slow to carry a span of its
    own in the time the others need gets none.
    A member flagged in ``client_mode`` reduces nothing: it gets an empty span (``start ==
    end``) and its bandwidth is ignored (it may be 0). The all-reduce flags the members
    ``allreduce.no_span`` names: a client-mode one nobody can dial, and a relayed one whenever a
    listening member can reduce instead (so that nothing of the round crosses a relay).

    ``min_span``: a member whose share would be under ``min_span`` elements (but not zero) gets
    nothing instead and its share goes to the others, because a tiny span costs a full exchange
    of messages for almost no data. Members are dropped one at a time, lowest bandwidth first
    (ties: the higher index), until every remaining share is at least ``min_span`` or only one
    member is left.

    The arithmetic is exact (fractions), so every member computes the same spans.
    ConfigError if no member can reduce, or a reducing member's bandwidth is not positive and
    finite.
    """
    total = operator.index(total)
    min_span = operator.index(min_span)
    if total < 0 or min_span < 0:
        raise ConfigError("total and min_span must not be negative")
    n = len(bandwidths)
    if n == 0:
        raise ConfigError("a group needs at least one member")
    clients = [False] * n if client_mode is None else [bool(c) for c in client_mode]
    if len(clients) != n:
        raise ConfigError("client_mode must have one entry per member")
    reducers = [i for i in range(n) if not clients[i]]
    if not reducers:
        raise ConfigError("every member is in client mode: nobody can reduce")
    weight: dict[int, Fraction] = {}
    for i in reducers:
        b = float(bandwidths[i])
        if not (math.isfinite(b) and b > 0):
            raise ConfigError(f"member {i}'s bandwidth must be positive and finite, not {b!r}")
        weight[i] = Fraction(b)
    while True:
        filled = link_shares(weight, n)
        share_sum = sum(filled.values())
        shares = {i: total * filled[i] / share_sum for i in weight}
        small = [i for i, s in shares.items() if 0 < s < min_span]
        if not small or len(weight) == 1:
            break
        del weight[min(small, key=lambda i: (weight[i], -i))]
    sizes = [0] * n
    for i, s in shares.items():
        sizes[i] = math.floor(s)
    leftover = total - sum(sizes)
    # Largest remainder first; sorted() is stable, so equal remainders keep member order.
    by_remainder = sorted(shares, key=lambda i: shares[i] - sizes[i], reverse=True)
    for i in by_remainder[:leftover]:
        sizes[i] += 1
    result = []
    start = 0
    for size in sizes:
        result.append((start, start + size))
        start += size
    return result


def link_shares(bandwidths: dict[int, Fraction], members: int) -> dict[int, Fraction]:
    """Each reducer's weight (not normalized; 0: no span) in a group of ``members``, so that
    the slowest link to finish, finishes as soon as it can.

    A member with a fraction ``f`` of the vector (length 1) moves ``1 + (N - 2) f`` each way:
    its part of every other span out and their results in (``1 - f``), and the N - 1 parts
    of its own span in and its average out (``(N - 1) f``). So the reducers that get a span
    should all finish at one time ``T``: ``(1 + (N - 2) f_i) / b_i = T``, ``f_i = (T b_i - 1)
    / (N - 2)``, the fastest k of them for the largest k where even the slowest of those has
    ``T b > 1``. The others get nothing: they move 1 each way whatever the spans are, and
    need no less than ``1 / b > T`` for that. Equal bandwidths give equal weights; so does a
    group of two (it moves 1 each way, whatever its cut), which keeps weights proportional.
    Exact (fractions), so every member computes the same; ties in bandwidth keep the lower
    index first."""
    extra = members - 2
    if extra <= 0:
        return dict(bandwidths)
    fastest = sorted(bandwidths, key=lambda i: (-bandwidths[i], i))
    for k in range(len(fastest), 0, -1):
        top = fastest[:k]
        total = sum(bandwidths[i] for i in top)
        # T = (N - 2 + k) / total; the slowest of the k must have T b > 1
        if bandwidths[top[-1]] * (extra + k) > total:
            weights = dict.fromkeys(bandwidths, Fraction(0))
            for i in top:
                weights[i] = bandwidths[i] * (extra + k) - total
            return weights
    raise AssertionError("the fastest reducer alone always qualifies")  # k = 1: b (N-1) > b


def chunk_ranges(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into consecutive ``(a, b)`` pieces of ``chunk`` elements (the last
    may be shorter); empty when ``start == end``."""
    start, end, chunk = operator.index(start), operator.index(end), operator.index(chunk)
    if chunk <= 0:
        raise ConfigError(f"chunk size must be positive, not {chunk}")
    if end < start:
        raise ConfigError(f"range end {end} is before its start {start}")
    return [(a, min(a + chunk, end)) for a in range(start, end, chunk)]
