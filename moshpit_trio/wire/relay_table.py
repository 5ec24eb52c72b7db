"""What a relay remembers and what it allows: reservations, circuits, pacing (sans-IO).

A relay (SPEC.md "Relay") keeps one :class:`RelayTable`. Nothing here does I/O or reads a
clock: every method that depends on time takes ``now`` (trio's clock), so the rules are tested
exactly, and ``wire/relay.py`` applies them.

- A **reservation** says "peer C may be reached through this relay until ``expires``". C makes
  it (and renews it) over the connection it dialed; it ends at its expiry or when the relay no
  longer has a direct connection to C (the ``alive`` predicate the relay passes in).
- A **circuit** joins an initiator A to a reserved target C under a 16-byte id chosen by A. It
  lives at most ``circuit_lifetime``; every circuit counts against both of its ends' share.
- A :class:`Pacer` spaces out the bytes a circuit forwards (per circuit and for the relay in
  total): it says *when* the next ``n`` bytes may go, and the forwarder sleeps until then. A
  relay that sleeps stops reading, stops granting stream credit, and so slows the sender: pacing
  costs no buffer.

Every refusal is a :class:`~moshpit_trio.errors.RelayRefused` with the code that goes on the wire,
and is counted by code in ``refusals`` (with ``circuits_opened``, what ``moshpit status`` shows).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

from ..errors import ConfigError, RelayRefused
from ..identity import PeerID

__all__ = ["CIRCUIT_ID_SIZE", "Circuit", "Pacer", "RelayLimits", "RelayTable", "Reservation"]

CIRCUIT_ID_SIZE = 16


def _positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class RelayLimits:
    """What one relay allows. The defaults suit a public bootstrap node on a home-grade uplink:
    a few dozen volunteers, their averaging traffic paced so the relay's own is not starved."""

    #: peers holding a reservation at once
    max_reservations: int = 128
    #: the longest reservation granted; the peer renews it at half of what it got
    reservation_ttl: float = 120.0
    #: circuits open at once, in total
    max_circuits: int = 256
    #: circuits open at once with one peer at either end
    max_circuits_per_peer: int = 16
    #: a circuit ends this long after it opened (its streams' deadline); the ends then dial anew
    circuit_lifetime: float = 3600.0
    #: a circuit whose two ends have not both opened their streams this long after it opened
    #: no longer counts against anybody's limits (an end that asks and never comes)
    attach_timeout: float = 10.0
    #: bytes a second one circuit forwards (both directions together), and its burst
    circuit_bytes_per_s: float = 8 * 1024.0**2
    circuit_burst: float = 8 * 1024.0**2
    #: bytes a second all circuits together forward, and the burst
    total_bytes_per_s: float = 32 * 1024.0**2
    total_burst: float = 32 * 1024.0**2

    def __post_init__(self) -> None:
        for name in ("max_reservations", "max_circuits", "max_circuits_per_peer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in (
            "reservation_ttl",
            "circuit_lifetime",
            "attach_timeout",
            "circuit_bytes_per_s",
            "circuit_burst",
            "total_bytes_per_s",
            "total_burst",
        ):
            _positive(name, getattr(self, name))


class Pacer:
    """Spaces out bytes: ``rate`` bytes a second, ``burst`` of them at once after a quiet spell.

    :meth:`reserve` books ``n`` bytes and returns the time at which they may go (``now`` when the
    budget holds them). Bookings queue: the budget may go below zero, and each booking waits
    until what was booked before it has been paid back, so over any interval the bytes released
    never exceed ``burst + rate x interval`` however the calls come.

    >>> p = Pacer(rate=100.0, burst=100.0, now=0.0)
    >>> p.reserve(100, now=0.0), p.reserve(50, now=0.0), p.reserve(50, now=0.0)
    (0.0, 0.5, 1.0)
    """

    __slots__ = ("_paid_until", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        _positive("rate", rate)
        _positive("burst", burst)
        self.rate = float(rate)
        self.burst = float(burst)
        # When every booking so far is paid for (at ``rate``); the bucket is full from then on.
        # Kept as a time rather than as tokens: release times computed from it never go
        # backwards, even by a rounding error.
        self._paid_until = now

    def reserve(self, n: int, now: float) -> float:
        if n < 0:
            raise ValueError("cannot reserve a negative number of bytes")
        self._paid_until = max(self._paid_until, now) + n / self.rate
        return max(now, self._paid_until - self.burst / self.rate)


@dataclasses.dataclass(slots=True)
class Reservation:
    peer: PeerID
    expires: float


@dataclasses.dataclass(slots=True)
class Circuit:
    id: bytes
    initiator: PeerID
    target: PeerID
    opened: float
    expires: float
    pacer: Pacer
    #: which ends have opened their stream to the relay (``relay.up``)
    attached: set[PeerID] = dataclasses.field(default_factory=set)
    #: bytes forwarded so far, both directions
    forwarded: int = 0

    def other_end(self, peer: PeerID) -> PeerID:
        return self.target if peer == self.initiator else self.initiator


class RelayTable:
    """A relay's reservations and circuits; see the module docstring.

    ``alive(peer)`` tells whether the relay still has a direct connection to ``peer``: a
    reservation is only as good as the connection it was made over.
    """

    def __init__(self, limits: RelayLimits, now: float, alive: Callable[[PeerID], bool]) -> None:
        self.limits = limits
        self._alive = alive
        self._reservations: dict[PeerID, Reservation] = {}
        self._circuits: dict[bytes, Circuit] = {}
        self._per_peer: dict[PeerID, int] = {}
        self._total = Pacer(limits.total_bytes_per_s, limits.total_burst, now)
        #: refusals since the start, by code (the table's own and those ``refused`` counts)
        self.refusals: Counter[str] = Counter()
        #: circuits opened since the start
        self.circuits_opened = 0

    def refused(self, code: str, detail: str) -> RelayRefused:
        """Count a refusal of ``code``; the error to raise (or answer) for it."""
        self.refusals[code] += 1
        return RelayRefused(code, detail)

    # -- reservations ------------------------------------------------------------------------

    def reserve(self, peer: PeerID, ttl: float, now: float) -> Reservation:
        """Grant (or renew) ``peer``'s reservation for ``min(ttl, reservation_ttl)`` seconds."""
        if not (isinstance(ttl, int | float) and ttl > 0 and math.isfinite(ttl)):
            raise self.refused("malformed", f"a reservation lasts a positive time, not {ttl!r}")
        self._sweep_reservations(now)
        existing = self._reservations.get(peer)
        if existing is None and len(self._reservations) >= self.limits.max_reservations:
            raise self.refused(
                "reservations-full",
                f"this relay holds {self.limits.max_reservations} reservations; try another",
            )
        granted = min(float(ttl), self.limits.reservation_ttl)
        reservation = Reservation(peer, now + granted)
        self._reservations[peer] = reservation
        return reservation

    def release(self, peer: PeerID) -> None:
        self._reservations.pop(peer, None)

    def reservation(self, peer: PeerID, now: float) -> Reservation | None:
        """``peer``'s reservation if it is in force at ``now`` (unexpired, still connected)."""
        r = self._reservations.get(peer)
        if r is None:
            return None
        if r.expires <= now or not self._alive(peer):
            del self._reservations[peer]
            return None
        return r

    @property
    def reservations(self) -> int:
        return len(self._reservations)

    def held(self, now: float) -> list[Reservation]:
        """The reservations in force at ``now`` (a read-only view: copies)."""
        self._sweep_reservations(now)
        return [dataclasses.replace(r) for r in self._reservations.values()]

    def _sweep_reservations(self, now: float) -> None:
        for peer in list(self._reservations):
            self.reservation(peer, now)

    # -- circuits ----------------------------------------------------------------------------

    def open_circuit(
        self, circuit_id: bytes, initiator: PeerID, target: PeerID, now: float
    ) -> Circuit:
        """Open a circuit from ``initiator`` to ``target``, or raise ``RelayRefused``; a refused
        request changes nothing."""
        limits = self.limits
        self.expire(now)
        if len(circuit_id) != CIRCUIT_ID_SIZE:
            raise self.refused("malformed", f"a circuit id is {CIRCUIT_ID_SIZE} bytes")
        if initiator == target:
            raise self.refused("malformed", "a peer cannot open a circuit to itself")
        if circuit_id in self._circuits:
            raise self.refused("circuit-id", "a circuit with this id is open; draw another")
        if self.reservation(target, now) is None:
            raise self.refused("no-reservation", f"{target.short} has no reservation here")
        for peer in (initiator, target):
            if self._per_peer.get(peer, 0) >= limits.max_circuits_per_peer:
                raise self.refused(
                    "circuits-per-peer",
                    f"{peer.short} already has {limits.max_circuits_per_peer} circuits here",
                )
        if len(self._circuits) >= limits.max_circuits:
            raise self.refused("circuits-full", f"this relay carries {limits.max_circuits}")
        circuit = Circuit(
            circuit_id,
            initiator,
            target,
            opened=now,
            expires=now + limits.circuit_lifetime,
            pacer=Pacer(limits.circuit_bytes_per_s, limits.circuit_burst, now),
        )
        self._circuits[circuit_id] = circuit
        self.circuits_opened += 1
        for peer in (initiator, target):
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        return circuit

    def circuit(self, circuit_id: bytes) -> Circuit | None:
        return self._circuits.get(circuit_id)

    def attach(self, circuit_id: bytes, peer: PeerID, now: float) -> Circuit:
        """``peer`` opened its stream of circuit ``circuit_id`` to the relay: it must be one of
        the circuit's ends, once, before the circuit expires."""
        circuit = self._circuits.get(circuit_id)
        if circuit is None or peer not in (circuit.initiator, circuit.target):
            raise self.refused("circuit-id", "no such circuit of yours here")
        if circuit.expires <= now:
            self.close(circuit_id)
            raise self.refused("circuit-id", "the circuit has expired")
        if peer in circuit.attached:
            raise self.refused("circuit-id", "this end of the circuit is already attached")
        circuit.attached.add(peer)
        return circuit

    def close(self, circuit_id: bytes) -> None:
        circuit = self._circuits.pop(circuit_id, None)
        if circuit is None:
            return
        for peer in (circuit.initiator, circuit.target):
            left = self._per_peer[peer] - 1
            if left:
                self._per_peer[peer] = left
            else:
                del self._per_peer[peer]

    def expire(self, now: float) -> list[bytes]:
        """Close the circuits whose lifetime is over, or whose ends did not both attach in
        time; their ids."""
        late = self.limits.attach_timeout
        gone = [
            cid
            for cid, c in self._circuits.items()
            if c.expires <= now or (len(c.attached) < 2 and c.opened + late <= now)
        ]
        for cid in gone:
            self.close(cid)
        return gone

    @property
    def circuits(self) -> int:
        return len(self._circuits)

    def live(self) -> list[Circuit]:
        """The open circuits (the table's own objects: read them, change nothing)."""
        return list(self._circuits.values())

    def circuits_of(self, peer: PeerID) -> int:
        return self._per_peer.get(peer, 0)

    def pace(self, circuit: Circuit, n: int, now: float) -> float:
        """Book ``n`` bytes of ``circuit``; the time at which they may be forwarded (both its own
        and the relay's total budget hold them by then)."""
        circuit.forwarded += n
        return max(circuit.pacer.reserve(n, now), self._total.reserve(n, now))
