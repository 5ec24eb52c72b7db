"""Codecs: sizes, round-trip error bounds (none exact, fp16 relative, 8-bit the documented bound),
non-finite values, and decoding of arbitrary bytes, which may only raise BadContribution."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moshpit_trio.averaging.compression import BLOCK, FP16, NONE, UINT8, Codec, codec
from moshpit_trio.averaging.reducer import BadContribution
from moshpit_trio.errors import ConfigError

CODECS = [NONE, FP16, UINT8]
COUNTS = [0, 1, 7, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5]


def round_trip(c: Codec, x: np.ndarray) -> np.ndarray:
    data = c.encode(x)
    assert len(data) == c.encoded_size(x.shape[0])
    out = c.decode(data, x.shape[0])
    assert out.dtype == np.float32 and out.shape == x.shape
    return out


def test_codec_by_name() -> None:
    assert codec("none") is NONE and codec("fp16") is FP16 and codec("8bit") is UINT8
    assert [c.name for c in CODECS] == ["none", "fp16", "8bit"]
    for bad in ("zstd", "", "FP16", None):
        with pytest.raises(ConfigError):
            codec(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("c", CODECS, ids=lambda c: c.name)
@pytest.mark.parametrize("count", COUNTS)
def test_sizes(c: Codec, count: int) -> None:
    x = np.random.default_rng(count).standard_normal(count).astype(np.float32)
    assert len(c.encode(x)) == c.encoded_size(count)
    per_value = {"none": 4, "fp16": 2, "8bit": 1}[c.name]
    blocks = -(-count // BLOCK)
    assert c.encoded_size(count) == per_value * count + (8 * blocks if c is UINT8 else 0)


@pytest.mark.parametrize("c", CODECS, ids=lambda c: c.name)
def test_non_contiguous_input_and_any_buffer_type(c: Codec) -> None:
    x = np.random.default_rng(1).standard_normal(2 * BLOCK + 6).astype(np.float32)[::2]
    data = c.encode(x)
    assert data == c.encode(x.copy())
    expected = c.decode(data, x.shape[0])
    for buffer in (bytearray(data), memoryview(data), memoryview(bytearray(data))):
        assert np.array_equal(c.decode(buffer, x.shape[0]), expected)


def test_none_is_exact() -> None:
    x = np.array([0.0, -0.0, 1e-45, -3.4e38, np.inf, -np.inf, 1.5], np.float32)
    assert round_trip(NONE, x).tobytes() == x.tobytes()
    assert np.isnan(round_trip(NONE, np.array([np.nan], np.float32))).all()


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@given(hnp.arrays(np.float32, st.integers(0, 200), elements=finite32))
def test_fp16_error_bound(x: np.ndarray) -> None:
    y = round_trip(FP16, x).astype(np.float64)
    x64 = x.astype(np.float64)
    small = np.abs(x64) < 2.0**-14  # below the half-precision normal range
    big = np.abs(x64) > 65504
    normal = ~small & ~big
    assert (np.abs(y - x64)[normal] <= 2.0**-11 * np.abs(x64)[normal]).all()
    assert (np.abs(y - x64)[small] <= 2.0**-25).all()
    assert (y[big] == np.sign(x64[big]) * 65504).all()  # saturated, not Inf


def test_fp16_relative_error_on_typical_values() -> None:
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32)
    y = round_trip(FP16, x)
    rel = np.abs(y - x) / np.maximum(np.abs(x), 2.0**-14)
    assert rel.max() <= 2.0**-11 and rel.mean() < 2.5e-4


def test_fp16_keeps_non_finite_values() -> None:
    y = round_trip(FP16, np.array([np.inf, -np.inf, np.nan, 7e4], np.float32))
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and y[3] == 65504


def assert_8bit_bound(x: np.ndarray, y: np.ndarray) -> None:
    """The bound documented in compression.py, block by block."""
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    for start in range(0, x.shape[0], BLOCK):
        block, got = x64[start : start + BLOCK], y64[start : start + BLOCK]
        lo, hi = block.min(), block.max()
        bound = (hi - lo) / 510 * (1 + 2.0**-10) + 2.0**-22 * max(abs(lo), abs(hi)) + 2.0**-140
        err = np.abs(got - block).max()
        assert err <= bound, (start, lo, hi, err, bound)


@settings(max_examples=200)
@given(hnp.arrays(np.float32, st.integers(0, 40), elements=finite32))
def test_8bit_error_bound_on_extreme_values(x: np.ndarray) -> None:
    # Values anywhere in float32's range, blocks wider than float32's range included.
    assert_8bit_bound(x, round_trip(UINT8, x))


@settings(max_examples=40, deadline=None)
@given(
    count=st.sampled_from(COUNTS),
    scale=st.floats(1e-30, 1e30),
    shift=st.floats(-1e30, 1e30),
    seed=st.integers(0, 2**32 - 1),
)
def test_8bit_error_bound_across_blocks(count: int, scale: float, shift: float, seed: int) -> None:
    gen = np.random.default_rng(seed)
    x = (gen.standard_normal(count) * scale + shift).astype(np.float32)
    x[gen.random(count) < 0.01] *= 1000  # outliers widen their block
    assert_8bit_bound(x, round_trip(UINT8, x))


def test_8bit_typical_error_and_ratio() -> None:
    x = np.random.default_rng(3).standard_normal(100 * BLOCK).astype(np.float32)
    y = round_trip(UINT8, x)
    assert_8bit_bound(x, y)
    # randn blocks span about ±4.3, so half a step is about 0.017.
    assert np.abs(y - x).max() < 0.02
    assert x.nbytes / UINT8.encoded_size(x.shape[0]) > 3.99


def test_8bit_constant_blocks_and_block_extremes_are_exact() -> None:
    x = np.concatenate([np.full(BLOCK, 0.1, np.float32), np.full(10, -7.5e12, np.float32)])
    assert np.array_equal(round_trip(UINT8, x), x)
    x = np.random.default_rng(4).standard_normal(BLOCK + 17).astype(np.float32)
    y = round_trip(UINT8, x)
    for block, got in ((x[:BLOCK], y[:BLOCK]), (x[BLOCK:], y[BLOCK:])):
        assert got[block.argmin()] == block.min()


@pytest.mark.parametrize(
    "values",
    [
        [1e38, -3e38, 3.4e38, 0.0, 5.0],  # wider than float32's range
        [1.079864e34, 3.4028235e38],  # the top code rounds a hair past the largest float32
        [-3.4028235e38, -1.079864e34],
        [1.1754944e-38, 0.0, 3e-39],  # a subnormal step, 1 / step overflows
        [1e-45, 0.0],  # the step rounds to zero
    ],
)
def test_8bit_blocks_at_the_ends_of_float32(values: list[float]) -> None:
    x = np.array(values, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = round_trip(UINT8, x)
    assert np.isfinite(y).all()
    assert_8bit_bound(x, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_8bit_non_finite_values_poison_their_block_only(bad: float) -> None:
    x = np.random.default_rng(5).standard_normal(2 * BLOCK).astype(np.float32)
    x[BLOCK + 3] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = round_trip(UINT8, x)
    assert not np.isfinite(y[BLOCK:]).any()
    assert_8bit_bound(x[:BLOCK], y[:BLOCK])


# -- decoding what the network sends ------------------------------------------------------------


@pytest.mark.parametrize("c", CODECS, ids=lambda c: c.name)
def test_wrong_lengths_are_bad_contributions(c: Codec) -> None:
    data = c.encode(np.ones(BLOCK + 1, np.float32))
    for blob, count in (
        (data[:-1], BLOCK + 1),
        (data + b"\0", BLOCK + 1),
        (data, BLOCK),
        (data, BLOCK + 2),
        (b"", 1),
        (data, -1),
        (data, "5"),
    ):
        with pytest.raises(BadContribution) as info:
            c.decode(blob, count)  # type: ignore[arg-type]
        assert info.value.reason == "length"


@settings(max_examples=300)
@given(
    c=st.sampled_from(CODECS),
    count=st.integers(-2, 3 * BLOCK),
    delta=st.sampled_from([0, 0, 0, -1, 1, 4, -8]),
    data=st.data(),
)
def test_decoding_arbitrary_bytes_only_raises_bad_contribution(
    c: Codec, count: int, delta: int, data: st.DataObject
) -> None:
    size = max(0, c.encoded_size(max(count, 0)) + delta)
    # Random bytes for small messages; for large ones random header bytes and a random fill, so
    # examples stay cheap (the 8-bit header, with every block's min and step, comes first).
    head = data.draw(st.binary(min_size=min(size, 64), max_size=min(size, 64)))
    fill = data.draw(st.integers(0, 255))
    blob = head + bytes([fill]) * (size - len(head))
    valid = count >= 0 and size == c.encoded_size(count)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN/Inf arithmetic either
        try:
            out = c.decode(blob, count)
        except BadContribution as error:
            assert error.reason == "length" and not valid
            return
    assert valid
    assert out.dtype == np.float32 and out.shape == (count,)
