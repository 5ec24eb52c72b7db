"""The relay's rules without any I/O: reservations, circuits, limits and pacing."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import ConfigError, RelayRefused
from moshpit_trio.identity import PeerID
from moshpit_trio.wire import relay_table
from moshpit_trio.wire.relay_table import Pacer, RelayLimits, RelayTable

PEERS = [PeerID(bytes([i]) * 32) for i in range(6)]


def cid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def table(alive: set[PeerID] | None = None, **limits: float) -> RelayTable:
    live = set(PEERS) if alive is None else alive
    return RelayTable(RelayLimits(**limits), 0.0, lambda p: p in live)  # type: ignore[arg-type]


def test_the_docstring_examples_hold() -> None:
    assert doctest.testmod(relay_table).failed == 0


def test_a_reservation_is_capped_renewed_and_ends_at_its_expiry_or_with_its_connection() -> None:
    alive = set(PEERS)
    t = table(alive, reservation_ttl=30.0, max_reservations=2)
    assert t.reserve(PEERS[0], 100.0, now=0.0).expires == 30.0  # capped
    assert t.reserve(PEERS[1], 10.0, now=0.0).expires == 10.0
    with pytest.raises(RelayRefused) as refused:
        t.reserve(PEERS[2], 10.0, now=5.0)
    assert refused.value.code == "reservations-full"
    assert t.reserve(PEERS[0], 10.0, now=5.0).expires == 15.0  # a renewal is not a new one
    assert t.reservation(PEERS[1], now=9.999) is not None
    assert t.reservation(PEERS[1], now=10.0) is None  # expired exactly at its time
    assert t.reserve(PEERS[2], 10.0, now=10.0).expires == 20.0  # its place is free again
    alive.discard(PEERS[2])
    assert t.reservation(PEERS[2], now=11.0) is None  # its connection is gone
    assert t.reservations == 1


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")])
def test_a_reservation_for_no_time_is_refused(ttl: float) -> None:
    with pytest.raises(RelayRefused) as refused:
        table().reserve(PEERS[0], ttl, now=0.0)
    assert refused.value.code == "malformed"


def test_circuits_need_a_reservation_and_count_against_both_ends() -> None:
    t = table(max_circuits_per_peer=2, max_circuits=3, circuit_lifetime=60.0)
    a, b, c, d = PEERS[:4]
    with pytest.raises(RelayRefused) as refused:
        t.open_circuit(cid(1), a, c, now=0.0)
    assert refused.value.code == "no-reservation"
    t.reserve(c, 100, now=0.0)
    t.reserve(d, 100, now=0.0)
    circuit = t.open_circuit(cid(1), a, c, now=0.0)
    assert (circuit.expires, circuit.other_end(a), circuit.other_end(c)) == (60.0, c, a)
    for code, args in [
        ("circuit-id", (cid(1), b, c)),  # the id is taken
        ("malformed", (b"short", b, c)),
        ("malformed", (cid(2), c, c)),  # to itself
    ]:
        with pytest.raises(RelayRefused) as refused:
            t.open_circuit(*args, now=0.0)  # type: ignore[arg-type]
        assert refused.value.code == code
    t.open_circuit(cid(2), b, c, now=0.0)
    with pytest.raises(RelayRefused) as refused:
        t.open_circuit(cid(3), a, c, now=0.0)  # c is at 2
    assert refused.value.code == "circuits-per-peer"
    t.open_circuit(cid(3), a, d, now=0.0)
    with pytest.raises(RelayRefused) as refused:
        t.open_circuit(cid(4), b, d, now=0.0)
    assert refused.value.code == "circuits-full"
    assert (t.circuits, t.circuits_of(a), t.circuits_of(c), t.circuits_of(d)) == (3, 2, 2, 1)
    # what `moshpit status` shows: every refusal by its code, circuits opened, the live ones
    assert dict(t.refusals) == {
        "no-reservation": 1,
        "circuit-id": 1,
        "malformed": 2,
        "circuits-per-peer": 1,
        "circuits-full": 1,
    }
    assert t.circuits_opened == 3
    assert [(x.id, x.initiator, x.target) for x in t.live()] == [
        (cid(1), a, c),
        (cid(2), b, c),
        (cid(3), a, d),
    ]
    assert sorted((r.peer, r.expires) for r in t.held(now=0.0)) == sorted([(c, 100.0), (d, 100.0)])
    t.close(cid(1))
    assert (t.circuits, t.circuits_of(a), t.circuits_of(c)) == (2, 1, 1)
    for circuit_id, ends in [(cid(2), (b, c)), (cid(3), (a, d))]:
        for end in ends:
            t.attach(circuit_id, end, now=0.0)
    assert t.expire(59.9) == []
    assert t.expire(60.0) == [cid(2), cid(3)]
    assert t.circuits == 0 and t.circuits_of(a) == 0
    assert t.circuits_opened == 3 and t.live() == []  # the count is since the start
    assert [r.peer for r in t.held(now=100.0)] == []  # expired reservations are not shown


def test_an_end_attaches_once_and_only_its_own_circuit() -> None:
    t = table(circuit_lifetime=10.0)
    a, b, c = PEERS[:3]
    t.reserve(c, 100, now=0.0)
    t.open_circuit(cid(1), a, c, now=0.0)
    t.attach(cid(1), a, now=1.0)
    for peer, circuit_id in [(a, cid(1)), (b, cid(1)), (c, cid(2))]:
        with pytest.raises(RelayRefused) as refused:
            t.attach(circuit_id, peer, now=1.0)
        assert refused.value.code == "circuit-id"
    with pytest.raises(RelayRefused):
        t.attach(cid(1), c, now=10.0)  # expired
    assert t.circuits == 0


def test_limits_are_checked() -> None:
    for bad in [{"max_circuits": 0}, {"max_reservations": True}, {"total_bytes_per_s": 0.0}]:
        with pytest.raises(ConfigError):
            RelayLimits(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Pacer(rate=float("inf"), burst=1.0, now=0.0)


def test_pacing_holds_both_the_circuit_and_the_total_budget() -> None:
    t = table(
        circuit_bytes_per_s=100.0, circuit_burst=100.0, total_bytes_per_s=150.0, total_burst=150.0
    )
    t.reserve(PEERS[2], 100, now=0.0)
    t.reserve(PEERS[3], 100, now=0.0)
    one = t.open_circuit(cid(1), PEERS[0], PEERS[2], now=0.0)
    two = t.open_circuit(cid(2), PEERS[1], PEERS[3], now=0.0)
    assert t.pace(one, 100, now=0.0) == 0.0
    assert t.pace(two, 100, now=0.0) == pytest.approx(50 / 150)  # the total runs out first
    assert t.pace(one, 100, now=0.0) == pytest.approx(1.0)  # its own budget is the bound
    assert one.forwarded == 200 and two.forwarded == 100


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(1.0, 1e6),
    burst=st.floats(1.0, 1e6),
    sends=st.lists(
        st.tuples(st.floats(0.0, 10.0), st.integers(0, 100_000)), min_size=1, max_size=40
    ),
)
def test_a_pacer_never_lets_more_than_burst_plus_rate_times_time_go(
    rate: float, burst: float, sends: list[tuple[float, int]]
) -> None:
    pacer = Pacer(rate, burst, now=0.0)
    now = 0.0
    released: list[tuple[float, int]] = []
    last = 0.0
    for gap, n in sends:
        now += gap
        at = pacer.reserve(n, now)
        assert at >= now  # never in the past
        assert at >= last  # bookings queue in order
        last = at
        released.append((at, n))
    # By any time e at most burst + rate x e goes, and in any window (s, e] between two
    # releases at most burst + rate x (e - s): a chunk released at ``at`` was paid up to it.
    slack = 1e-6
    total = 0
    for end, n in released:
        total += n
        assert total <= burst + rate * end + slack * max(1.0, total)
    for start, _ in released:
        total = 0
        for end, n in released:
            if end > start:
                total += n
                assert total <= burst + rate * (end - start) + slack * max(1.0, total)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["reserve", "open", "close", "attach", "drop"]),
            st.integers(0, 5),
            st.integers(0, 5),
            st.integers(0, 7),
            st.floats(0.0, 5.0),
        ),
        max_size=60,
    )
)
def test_the_limits_hold_whatever_is_asked_and_a_refusal_changes_nothing(
    ops: list[tuple[str, int, int, int, float]],
) -> None:
    alive = set(PEERS)
    limits = dict(max_reservations=3, max_circuits=4, max_circuits_per_peer=2, circuit_lifetime=8.0)
    t = table(alive, reservation_ttl=6.0, **limits)
    now = 0.0
    for op, i, j, k, gap in ops:
        now += gap
        a, b = PEERS[i], PEERS[j]
        before = (t.reservations, t.circuits, [t.circuits_of(p) for p in PEERS])
        try:
            if op == "reserve":
                t.reserve(a, 1.0 + k, now)
            elif op == "open":
                t.expire(now)
                before = (t.reservations, t.circuits, [t.circuits_of(p) for p in PEERS])
                t.open_circuit(cid(k), a, b, now)
            elif op == "close":
                t.close(cid(k))
            elif op == "attach":
                t.attach(cid(k), a, now)
            else:
                alive.discard(a) if a in alive else alive.add(a)
        except RelayRefused as exc:
            after = (t.reservations, t.circuits, [t.circuits_of(p) for p in PEERS])
            # attach closes an expired circuit (and says so); any other refusal changes nothing
            if not (op == "attach" and "expired" in str(exc)):
                if op == "open" and exc.code == "no-reservation":
                    assert after[1:] == before[1:]  # (it may drop the stale reservation)
                else:
                    assert after == before
        assert t.reservations <= 3
        assert t.circuits <= 4
        assert all(t.circuits_of(p) <= 2 for p in PEERS)
        assert sum(t.circuits_of(p) for p in PEERS) == 2 * t.circuits
        for x in range(8):
            c = t.circuit(cid(x))
            if c is not None:
                assert c.expires == c.opened + 8.0
                assert c.initiator != c.target


def test_a_circuit_whose_ends_do_not_both_attach_in_time_frees_its_places() -> None:
    t = table(attach_timeout=10.0, max_circuits_per_peer=1)
    a, b, c = PEERS[:3]
    t.reserve(c, 100, now=0.0)
    t.open_circuit(cid(1), a, c, now=0.0)
    t.attach(cid(1), c, now=0.1)  # c came, a never does
    with pytest.raises(RelayRefused):
        t.open_circuit(cid(2), b, c, now=9.9)
    t.open_circuit(cid(2), b, c, now=10.0)  # the first one is gone
    assert t.circuit(cid(1)) is None
    t.attach(cid(2), c, now=10.0)
    t.attach(cid(2), b, now=10.0)
    assert t.expire(1000.0 - 1e-9) == []  # both came: only its lifetime ends it
