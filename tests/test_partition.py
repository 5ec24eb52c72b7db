"""Flattening tensors and writing them back (numpy and torch, every dtype, any strides, masks),
spans sized for the links and chunk ranges."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging.partition import (
    TensorLayout,
    chunk_ranges,
    flatten,
    link_shares,
    spans,
    unflatten_into,
    write_pieces,
)
from moshpit_trio.errors import ConfigError

rng = np.random.default_rng(7)


def values_of(tensor: Any) -> np.ndarray:
    """A tensor's values as float32 in C order (the order the flat vector uses)."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32).reshape(-1)
    return tensor.detach().float().numpy().reshape(-1).copy()


def cast_like(values: np.ndarray, tensor: Any) -> np.ndarray:
    """float32 values rounded through ``tensor``'s dtype, back as float32."""
    if isinstance(tensor, np.ndarray):
        return values.astype(tensor.dtype).astype(np.float32)
    return torch.from_numpy(values.copy()).to(tensor.dtype).float().numpy()


def mixed_tensors() -> list[Any]:
    """One of every supported kind, contiguous and not, plus a scalar and an empty tensor."""
    base = rng.standard_normal((6, 5, 4)).astype(np.float32)
    return [
        base.copy(),
        base.astype(np.float16).transpose(2, 0, 1),  # non-contiguous numpy float16
        base[::2, 1:, ::3],  # strided numpy float32 view
        np.array(3.5, dtype=np.float32),  # 0-d
        np.zeros((0, 3), dtype=np.float32),  # empty
        torch.from_numpy(base.copy()),
        torch.from_numpy(base.copy()).to(torch.float16).permute(1, 2, 0),
        torch.from_numpy(base.copy()).to(torch.bfloat16)[:, ::2, 1:],
        torch.nn.Parameter(torch.from_numpy(base[0].copy())).t(),  # requires grad
        torch.tensor(-1.25, dtype=torch.bfloat16),
    ]


# -- layout -------------------------------------------------------------------------------------


def test_layout_records_shapes_dtypes_offsets() -> None:
    tensors = mixed_tensors()
    layout = TensorLayout.of(tensors)
    assert layout.shapes[:5] == ((6, 5, 4), (4, 6, 5), (3, 4, 2), (), (0, 3))
    assert layout.dtypes == (
        "numpy.float32",
        "numpy.float16",
        "numpy.float32",
        "numpy.float32",
        "numpy.float32",
        "torch.float32",
        "torch.float16",
        "torch.bfloat16",
        "torch.float32",
        "torch.bfloat16",
    )
    sizes = [math.prod(s) for s in layout.shapes]
    assert list(layout.offsets) == [sum(sizes[:i]) for i in range(len(sizes))]
    assert layout.total == sum(sizes)


@pytest.mark.parametrize(
    "bad",
    [
        [],
        [np.zeros(3, dtype=np.float64)],
        [np.zeros(3, dtype=np.int32)],
        [[1.0, 2.0]],
        [torch.zeros(3, dtype=torch.float64)],
        [torch.zeros(3, dtype=torch.int64)],
        [torch.zeros(3).to_sparse()],
        [np.zeros((0,), dtype=np.float32)],  # no elements at all
    ],
)
def test_layout_refuses_what_it_cannot_average(bad: list[Any]) -> None:
    with pytest.raises(ConfigError):
        TensorLayout.of(bad)


def test_stale_layout_is_refused() -> None:
    layout = TensorLayout.of([np.zeros((2, 3), np.float32)])
    for other in ([np.zeros((3, 2), np.float32)], [np.zeros((2, 3), np.float16)], []):
        with pytest.raises(ConfigError):
            flatten(other, layout)
        with pytest.raises(ConfigError):
            unflatten_into(np.zeros(6, np.float32), other, layout)


# -- flatten / unflatten ------------------------------------------------------------------------


def test_flatten_is_the_concatenation_in_c_order() -> None:
    tensors = mixed_tensors()
    layout = TensorLayout.of(tensors)
    flat = flatten(tensors, layout)
    assert flat.dtype == np.float32
    assert np.array_equal(flat, np.concatenate([values_of(t) for t in tensors]))


def test_flatten_into_a_reused_buffer() -> None:
    tensors = mixed_tensors()
    layout = TensorLayout.of(tensors)
    out = np.full(layout.total, np.nan, dtype=np.float32)
    assert flatten(tensors, layout, out=out) is out
    assert np.array_equal(out, flatten(tensors, layout))
    for bad in (
        np.zeros(layout.total + 1, np.float32),
        np.zeros(layout.total, np.float64),
        np.zeros((layout.total, 2), np.float32)[:, 0],  # not contiguous
    ):
        with pytest.raises(ConfigError):
            flatten(tensors, layout, out=bad)


def test_round_trip_writes_values_cast_to_each_dtype() -> None:
    tensors = mixed_tensors()
    layout = TensorLayout.of(tensors)
    new = rng.standard_normal(layout.total).astype(np.float32)
    unflatten_into(new, tensors, layout)
    for i, tensor in enumerate(tensors):
        part = new[layout.offsets[i] : layout.offsets[i] + layout.size(i)]
        assert np.array_equal(values_of(tensor), cast_like(part, tensor))
    # float32 tensors hold the values exactly, so flattening again gives them back.
    again = flatten(tensors, layout)
    for i, dtype in enumerate(layout.dtypes):
        if dtype.endswith("float32"):
            sl = slice(layout.offsets[i], layout.offsets[i] + layout.size(i))
            assert np.array_equal(again[sl], new[sl])


def test_round_trip_of_unchanged_values_is_exact_for_every_dtype() -> None:
    tensors = mixed_tensors()
    layout = TensorLayout.of(tensors)
    before = [values_of(t) for t in tensors]
    unflatten_into(flatten(tensors, layout), tensors, layout)
    for b, t in zip(before, tensors, strict=True):
        assert np.array_equal(b, values_of(t))


def test_write_back_keeps_views_and_grad_flags() -> None:
    param = torch.nn.Parameter(torch.zeros(3, 4))
    storage = param.data_ptr()
    layout = TensorLayout.of([param])
    unflatten_into(np.arange(12, dtype=np.float32), [param], layout)
    assert param.requires_grad and param.data_ptr() == storage
    assert param.detach().numpy().reshape(-1).tolist() == list(range(12))


def test_read_only_target_is_refused() -> None:
    a = np.zeros(4, np.float32)
    a.flags.writeable = False
    layout = TensorLayout.of([a])
    assert flatten([a], layout).tolist() == [0.0] * 4
    with pytest.raises(ConfigError):
        unflatten_into(np.ones(4, np.float32), [a], layout)


def test_read_only_flat_can_be_written_back() -> None:
    flat = np.frombuffer(np.arange(6, dtype=np.float32).tobytes(), dtype=np.float32)
    t = torch.zeros(2, 3, dtype=torch.bfloat16)
    unflatten_into(flat, [t], TensorLayout.of([t]))
    assert t.float().reshape(-1).tolist() == list(range(6))


def _check_masked_write(tensors: list[Any], mask: Any, selected: np.ndarray) -> None:
    layout = TensorLayout.of(tensors)
    before = flatten(tensors, layout)
    new = rng.standard_normal(layout.total).astype(np.float32)
    unflatten_into(new, tensors, layout, mask=mask)
    after = flatten(tensors, layout)
    # Untouched elements are bit-identical; written ones hold the new value in their dtype.
    assert np.array_equal(after[~selected], before[~selected])
    for i, tensor in enumerate(tensors):
        sl = slice(layout.offsets[i], layout.offsets[i] + layout.size(i))
        expected = np.where(selected[sl], cast_like(new[sl], tensor), before[sl])
        assert np.array_equal(after[sl], expected)


@st.composite
def span_lists(draw: st.DrawFn, total: int) -> list[tuple[int, int]]:
    cuts = draw(st.lists(st.integers(0, total), max_size=8))
    pairs = [(min(a, b), max(a, b)) for a, b in zip(cuts[::2], cuts[1::2], strict=False)]
    return pairs


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_span_masks_write_exactly_those_elements(data: st.DataObject) -> None:
    tensors = mixed_tensors()
    total = TensorLayout.of(tensors).total
    mask = data.draw(span_lists(total))
    selected = np.zeros(total, dtype=bool)
    for a, b in mask:
        selected[a:b] = True
    _check_masked_write(tensors, mask, selected)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), density=st.floats(0, 1))
def test_bool_masks_write_exactly_those_elements(seed: int, density: float) -> None:
    tensors = mixed_tensors()
    total = TensorLayout.of(tensors).total
    selected = np.random.default_rng(seed).random(total) < density
    _check_masked_write(tensors, selected, selected)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_write_pieces_is_unflatten_of_those_spans(data: st.DataObject) -> None:
    """Writing pieces (as the all-reduce delivers them: read-only views, cut anywhere) leaves
    every tensor exactly as unflatten_into does with the same values in the same spans."""
    layout = TensorLayout.of(mixed_tensors())
    spans_ = data.draw(span_lists(layout.total))
    new = rng.standard_normal(layout.total).astype(np.float32)
    pieces = []
    for a, b in spans_:
        cut = data.draw(st.integers(a, b))
        for lo, hi in ((a, cut), (cut, b)):
            piece = np.frombuffer(new[lo:hi].tobytes(), dtype=np.float32)  # read-only
            pieces.append((lo, piece))
    tensors = mixed_tensors()
    before = flatten(tensors, layout)
    unflatten_into(new, tensors, layout, mask=spans_)
    by_unflatten = flatten(tensors, layout)
    unflatten_into(before, tensors, layout)  # back as they were (exact in every dtype)
    write_pieces(tensors, layout, pieces)
    assert np.array_equal(flatten(tensors, layout), by_unflatten)


@pytest.mark.parametrize(
    "piece",
    [
        (-1, np.zeros(2, np.float32)),
        (5, np.zeros(2, np.float32)),
        (0, np.zeros(2, np.float64)),
        (0, np.zeros((1, 2), np.float32)),
        (0, [1.0, 2.0]),
        (0.0, np.zeros(2, np.float32)),
    ],
)
def test_write_pieces_refuses_bad_pieces(piece: Any) -> None:
    a = np.zeros(6, np.float32)
    with pytest.raises(ConfigError):
        write_pieces([a], TensorLayout.of([a]), [piece])
    assert not a.any()  # checked before anything is written
    frozen = np.zeros(6, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ConfigError):
        write_pieces([frozen], TensorLayout.of([frozen]), [(0, np.ones(2, np.float32))])


def test_every_single_element_range_of_a_strided_tensor() -> None:
    # _write_range cuts a flat range into sub-views; check every (start, end) on a 3-D view.
    base = torch.zeros(4, 3, 5)
    view = base.permute(2, 0, 1)[::2]  # shape (3, 4, 3), non-contiguous
    layout = TensorLayout.of([view])
    n = layout.total
    for start in range(n):
        for end in range(start, n + 1):
            base.zero_()
            new = np.arange(1, n + 1, dtype=np.float32)
            unflatten_into(new, [view], layout, mask=[(start, end)])
            got = view.reshape(-1).numpy()
            expected = np.zeros(n, np.float32)
            expected[start:end] = new[start:end]
            assert np.array_equal(got, expected), (start, end)
            assert base.count_nonzero().item() == end - start


@pytest.mark.parametrize(
    "mask",
    [
        [(0, 7)],
        [(-1, 2)],
        [(3, 2)],
        [(1,)],
        np.zeros(5, dtype=bool),
        np.zeros(6, dtype=np.int64),
    ],
)
def test_bad_masks_are_refused(mask: Any) -> None:
    a = np.zeros(6, np.float32)
    with pytest.raises(ConfigError):
        unflatten_into(np.ones(6, np.float32), [a], TensorLayout.of([a]), mask=mask)


# -- spans --------------------------------------------------------------------------------------

bandwidth = st.floats(min_value=1e-3, max_value=1e9, allow_nan=False)


@settings(max_examples=150)
@given(
    total=st.integers(0, 10**9),
    members=st.lists(st.tuples(bandwidth, st.booleans()), min_size=1, max_size=40).filter(
        lambda m: not all(c for _, c in m)
    ),
)
def test_spans_cover_exactly_and_follow_the_link_shares(
    total: int, members: list[tuple[float, bool]]
) -> None:
    bws = [b for b, _ in members]
    clients = [c for _, c in members]
    result = spans(total, bws, client_mode=clients)
    assert len(result) == len(members)
    assert result[0][0] == 0 and result[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(result):
        assert end == start
    weights = link_shares({i: Fraction(b) for i, (b, c) in enumerate(members) if not c}, len(bws))
    reducing = sum(weights.values())
    for i, ((start, end), (_, client)) in enumerate(zip(result, members, strict=True)):
        assert start <= end
        if client:
            assert start == end
        else:
            assert abs((end - start) - total * weights[i] / reducing) < 1
    # Deterministic: the same inputs give the same spans (every member computes them alone).
    assert spans(total, list(bws), client_mode=list(clients)) == result


@settings(max_examples=300)
@given(
    bandwidths=st.lists(st.integers(1, 10**6), min_size=1, max_size=40),
    clients=st.integers(0, 10),
)
def test_link_shares_let_the_busiest_link_finish_first(bandwidths: list[int], clients: int) -> None:
    """The spans minimise the time of the busiest link: with ``f`` the fractions, a member
    moves ``1 + (N - 2) f`` each way, so every reducer with a span finishes at one time T, and
    every one without has a link too slow to beat T even with nothing of its own (the
    conditions for the minimum of the maximum). Members in client mode count in N."""
    n = len(bandwidths) + clients
    weights = link_shares({i: Fraction(b) for i, b in enumerate(bandwidths)}, n)
    assert all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0
    f = {i: w / sum(weights.values()) for i, w in weights.items()}
    if n <= 2:  # two members move 1 each way whatever the cut: kept proportional
        assert weights == {i: Fraction(b) for i, b in enumerate(bandwidths)}
        return
    times = {(1 + (n - 2) * f[i]) / bandwidths[i] for i in f if f[i] > 0}
    assert len(times) == 1
    (t,) = times
    assert all(Fraction(1, bandwidths[i]) >= t for i in f if f[i] == 0)
    # the faster never gets less than the slower
    for i, j in itertools.permutations(f, 2):
        if bandwidths[i] > bandwidths[j]:
            assert f[i] >= f[j]


def test_spans_examples() -> None:
    assert spans(10, [1, 1, 1]) == [(0, 4), (4, 7), (7, 10)]  # ties go to the lower index
    assert spans(12, [5, 5, 5, 5]) == [(0, 3), (3, 6), (6, 9), (9, 12)]  # equal links, equal spans
    assert spans(10, [1, 3]) == [(0, 3), (3, 10)]  # two members: 2.5 / 7.5, lower index first
    # 100, 250, 500 and 1000 Mbit/s: the two slower ones would finish later with any span at all
    assert spans(6, [12.5e6, 31.25e6, 62.5e6, 125e6]) == [(0, 0), (0, 0), (0, 1), (1, 6)]
    # member 0 moves the whole vector each way at twice member 2's rate: 1 = 1, the best cut
    assert spans(10, [2, 1, 1], client_mode=[False, True, False]) == [(0, 10), (10, 10), (10, 10)]
    assert spans(10, [3, 1, 2], client_mode=[False, True, False]) == [(0, 8), (8, 8), (8, 10)]
    assert spans(0, [1, 2]) == [(0, 0), (0, 0)]
    assert spans(5, [1, 0.0], client_mode=[False, True]) == [(0, 5), (5, 5)]


def test_min_span_gives_tiny_shares_to_the_others() -> None:
    # (two members: proportional, so 1 + 1 + 98 is 3 members: link shares give 0, 0, all)
    assert spans(100, [3, 97], min_span=5) == [(0, 0), (0, 100)]
    assert spans(100, [3, 97], min_span=3) == [(0, 3), (3, 100)]
    # the third's link share is 0.1 / 26.7 of the vector: under min_span, it goes to the others
    assert spans(1000, [10, 10, 6.7]) == [(0, 498), (498, 996), (996, 1000)]
    assert spans(1000, [10, 10, 6.7], min_span=10) == [(0, 500), (500, 1000), (1000, 1000)]
    # The last member standing keeps everything, however small.
    assert spans(3, [1, 1], min_span=10) == [(0, 3), (3, 3)]
    assert spans(100, [1, 1], min_span=10) == [(0, 50), (50, 100)]


@pytest.mark.parametrize(
    "args",
    [
        (10, [], None),
        (10, [1.0, 2.0], [True, True]),
        (10, [1.0, 0.0], None),
        (10, [1.0, -2.0], None),
        (10, [1.0, float("inf")], None),
        (10, [1.0, float("nan")], None),
        (10, [1.0], [False, True]),
        (-1, [1.0], None),
    ],
)
def test_spans_refuse_bad_groups(args: tuple[int, list[float], list[bool] | None]) -> None:
    total, bws, clients = args
    with pytest.raises(ConfigError):
        spans(total, bws, client_mode=clients)


# -- chunks -------------------------------------------------------------------------------------


@given(start=st.integers(0, 10**6), length=st.integers(0, 10**5), chunk=st.integers(1, 10**5))
def test_chunk_ranges_cover_the_range(start: int, length: int, chunk: int) -> None:
    end = start + length
    ranges = chunk_ranges(start, end, chunk)
    assert [a for a, _ in ranges] == list(range(start, end, chunk))
    assert all(0 < b - a <= chunk for a, b in ranges)
    assert all(b - a == chunk for a, b in ranges[:-1])
    assert (ranges[-1][1] if ranges else end) == end


def test_chunk_ranges_refuse_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        chunk_ranges(0, 10, 0)
    with pytest.raises(ConfigError):
        chunk_ranges(5, 4, 1)
