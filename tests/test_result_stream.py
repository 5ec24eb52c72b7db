"""The result stream's records (averaging/result_stream.py): cut back into the same ranges and
values however the stream was chunked, for every codec; bad framing refused."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.averaging.compression import codec
from moshpit_trio.averaging.reducer import BadContribution
from moshpit_trio.averaging.result_stream import (
    MAX_RANGE_HEADER,
    RangeHeader,
    RangeValues,
    ResultRecords,
    range_record,
)


def _body(name: str, ranges: list[tuple[int, int, list[int]]], seed: int) -> tuple[bytes, dict]:
    """A stream body of ``ranges`` and, per range, the values a receiver must decode."""
    c = codec(name)
    rng = np.random.default_rng(seed)
    out, expected = [], {}
    for start, end, included in ranges:
        encoded = c.encode(rng.normal(size=end - start).astype(np.float32))
        out.append(range_record(start, end, included) + bytes(encoded))
        expected[(start, end)] = (included, c.decode(encoded, end - start))
    return b"".join(out), expected


def _read(name: str, body: bytes, cuts: list[int]) -> dict:
    records = ResultRecords(codec(name))
    got: dict = {}
    current = None
    pieces: list[tuple[int, np.ndarray]] = []
    bounds = [0, *sorted(set(cuts)), len(body)]
    for a, b in itertools.pairwise(bounds):
        for item in records.feed(memoryview(body)[a:b]):
            if isinstance(item, RangeHeader):
                assert current is None, "a header before the last range was whole"
                current, pieces = item, []
                continue
            assert isinstance(item, RangeValues) and current is not None
            if item.values is not None:
                assert item.offset == sum(len(v) for _, v in pieces)
                pieces.append((item.offset, np.asarray(item.values).copy()))
            if item.last:
                got[(current.start, current.end)] = (
                    current.included,
                    np.concatenate([v for _, v in pieces]),
                )
                current = None
    assert records.between_records
    return got


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["none", "fp16", "8bit"]),
    sizes=st.lists(st.integers(1, 9000), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    seed=st.integers(0, 2**16),
)
def test_any_chunking_gives_the_same_ranges_and_values(
    name: str, sizes: list[int], cuts: list[int], seed: int
) -> None:
    ranges, at = [], 100
    for i, n in enumerate(sizes):
        ranges.append((at, at + n, list(range(i % 3 + 1))))
        at += n
    body, expected = _body(name, ranges, seed)
    got = _read(name, body, [c % (len(body) + 1) for c in cuts])
    assert got.keys() == expected.keys()
    for key, (included, values) in expected.items():
        assert got[key][0] == included
        np.testing.assert_array_equal(got[key][1], values)


def test_one_byte_at_a_time() -> None:
    body, expected = _body("none", [(0, 3, [0]), (3, 5, [0, 1])], 0)
    got = _read("none", body, list(range(len(body))))
    assert [(k, v[0]) for k, v in got.items()] == [((0, 3), [0]), ((3, 5), [0, 1])]
    np.testing.assert_array_equal(got[(3, 5)][1], expected[(3, 5)][1])


@pytest.mark.parametrize(
    ("what", "data", "error"),
    [
        ("a zero length", bytes(4), "header of 0 bytes"),
        ("a length past the largest", (MAX_RANGE_HEADER + 1).to_bytes(4, "big"), "4097"),
        ("a header that does not decode", b"\x00\x00\x00\x02\xc1\xc1", "does not decode"),
        ("a header of the wrong shape", b"\x00\x00\x00\x01\x90", "does not decode"),
        ("an empty range", range_record(5, 5, [0]), "empty range"),
        ("a reversed range", range_record(6, 5, [0]), "empty range"),
    ],
)
def test_bad_framing_is_refused(what: str, data: bytes, error: str) -> None:
    records = ResultRecords(codec("none"))
    with pytest.raises(BadContribution, match=error):
        list(records.feed(memoryview(data)))


def test_a_stream_cut_inside_a_record_is_not_between_records() -> None:
    body, _ = _body("none", [(0, 4, [0])], 0)
    for cut in (1, 4, 10, len(body) - 1):
        records = ResultRecords(codec("none"))
        list(records.feed(memoryview(body)[:cut]))
        assert not records.between_records, cut
    records = ResultRecords(codec("none"))
    assert records.between_records
    list(records.feed(memoryview(body)))
    assert records.between_records
    assert records.value_bytes == 4 * 4  # the values only, not the length and header


def test_value_runs_take_empty_pieces_and_refuse_more_than_is_left() -> None:
    """``ValueRuns`` (compression.py) decodes a part's or a range's values for both streams:
    an empty piece changes nothing, and a piece past the values' end is a caller's bug."""
    from moshpit_trio.averaging.compression import ValueRuns

    data = codec("8bit").encode(np.arange(10, dtype=np.float32))
    runs = ValueRuns(codec("8bit"), 10)
    assert runs.feed(memoryview(b"")) is None
    assert runs.feed(memoryview(data)[:5]) is None  # a blocked codec waits for every byte
    offset, values = runs.feed(memoryview(data)[5:]) or (None, None)
    assert offset == 0 and values is not None and len(values) == 10 and runs.left == 0
    assert runs.feed(memoryview(b"")) is None
    with pytest.raises(ValueError, match="1 bytes fed where 0 were left"):
        runs.feed(memoryview(b"x"))
