"""Access control for private swarms: an allowlist, per-peer rate limits and growing bans (sans-IO).

Nothing here does I/O or reads a clock: every method that depends on time takes ``now`` (trio's
clock, in seconds), so the rules are tested exactly, and the transport applies them:

- :class:`AccessPolicy` is the configuration: an optional allowlist of PeerIDs (``None``: an open
  swarm), the :class:`RateLimits`, and how long bans last.
- :class:`TokenBucket` is one rate limit: ``rate`` tokens a second, at most ``burst`` saved up.
- :class:`BanList` remembers who is banned, why, and until when; each repeat offence bans for
  twice as long as the one before, up to a cap.
- :class:`AccessControl` is one transport's live state: it answers "may this peer connect?"
  (at the handshake, both ways) and "may this peer's call run?" (before any handler), and bans a
  peer that keeps being refused, that broke the protocol, or that sent bad data in a round.

>>> policy = AccessPolicy(rates=RateLimits(calls_per_s=1, call_burst=2, ban_after_refusals=2))
>>> access = AccessControl(policy)
>>> peer = PeerID(bytes(32))
>>> [access.admit_call(peer, 0, now=0.0) for _ in range(4)]  # doctest: +ELLIPSIS
[None, None, 'rate limited: ...', 'rate limited: ...']
>>> access.admit_call(peer, 0, now=0.0)  # the third refusal within the window bans
'banned for 60 s: rate limit exceeded again and again'
>>> access.refusal(peer, now=59.9) is not None, access.refusal(peer, now=60.0)
(True, None)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from ..errors import ConfigError
from ..identity import PeerID

__all__ = [
    "BAD_DATA_REASONS",
    "AccessControl",
    "AccessPolicy",
    "Ban",
    "BanList",
    "RateLimits",
    "TokenBucket",
]

#: Tags of ``RoundReport.excluded`` (see averaging/reducer.py) that only a peer sending malformed
#: data can earn. ``"norm"`` is not one: an honest peer whose model diverged earns it too.
BAD_DATA_REASONS = frozenset({"offset", "length", "duplicate", "nonfinite", "weight"})

# Per-peer rate state is forgotten once its buckets are full again (it would start full anyway);
# the table is swept when it grows past this many peers, so it stays bounded.
_SWEEP_AT = 4096
# Refills add up float steps (0.1 s at 10/s is 0.9999999999999999 tokens, not 1): a take within
# this relative slack of the tokens there counts as covered, and the bucket floors at zero.
_SLACK = 1e-9


def _positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


class TokenBucket:
    """A token bucket: ``rate`` tokens a second flow in, at most ``burst`` are kept.

    It starts full. :meth:`take` takes ``n`` tokens only if all of them are there (within a
    relative 1e-9, for float rounding). Time never
    runs backwards for a bucket: a ``now`` earlier than one already seen counts as that one.

    >>> bucket = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    >>> bucket.take(4, now=0.0), bucket.take(1, now=0.0), bucket.take(1, now=0.5)
    (True, False, True)
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        _positive("rate", rate)
        _positive("burst", burst)
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def tokens(self, now: float) -> float:
        """The tokens there are at ``now``."""
        self._refill(now)
        return self._tokens

    def take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if there are that many (True), else take none (False)."""
        self._refill(now)
        if n <= self._tokens + _SLACK * max(1.0, n):
            self._tokens = max(0.0, self._tokens - n)
            return True
        return False

    def drain(self, n: float, now: float) -> bool:
        """Take ``n`` tokens, or all there are when fewer (never below zero); True when all
        ``n`` were there. For costs already incurred (bytes that have arrived)."""
        self._refill(now)
        enough = n <= self._tokens + _SLACK * max(1.0, n)
        self._tokens = max(0.0, self._tokens - n)
        return enough

    def full(self, now: float) -> bool:
        return self.tokens(now) >= self.burst


@dataclasses.dataclass(frozen=True, slots=True)
class RateLimits:
    """Limits on what one remote peer may ask of us, over all its connections.

    The defaults are far above what a swarm's own traffic needs; they stop floods, not work.
    """

    #: calls and streams a second, sustained
    calls_per_s: float = 500.0
    #: calls and streams at once after a quiet spell
    call_burst: float = 2000.0
    #: bytes a second the peer may send us, sustained (charged when its next call arrives).
    #: All bytes count, the replies and streams we asked for included (a state download, a
    #: reducer's results): keep this well above what a round or a download moves.
    bytes_per_s: float = 1024.0**3
    byte_burst: float = 16 * 1024.0**3
    #: a peer refused more than this many times within ``refusal_window`` seconds is banned
    ban_after_refusals: int = 100
    refusal_window: float = 10.0

    def __post_init__(self) -> None:
        for name in ("calls_per_s", "call_burst", "bytes_per_s", "byte_burst", "refusal_window"):
            _positive(name, getattr(self, name))
        if not isinstance(self.ban_after_refusals, int) or self.ban_after_refusals < 1:
            raise ConfigError(
                f"ban_after_refusals must be a whole number >= 1, got {self.ban_after_refusals!r}"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may connect, how much they may ask, and how long a misbehaving peer is banned.

    ``allowlist=None`` (the default) is an open swarm; a set of PeerIDs admits only those
    (both ways: we neither accept nor dial anyone else).

    >>> AccessPolicy(allowlist=[PeerID(bytes(32))]).allows(PeerID(bytes(31) + b"x"))
    False
    """

    allowlist: frozenset[PeerID] | None = None
    rates: RateLimits = dataclasses.field(default_factory=RateLimits)
    #: the first ban lasts this long; each repeat offence doubles it ...
    ban_base: float = 60.0
    #: ... up to this
    ban_cap: float = 24 * 3600.0
    #: ban a peer whose connection broke the protocol (after the handshake, so it is proven)
    ban_on_protocol_error: bool = True
    #: ban a peer excluded from a round for malformed data (``BAD_DATA_REASONS``)
    ban_on_bad_data: bool = True

    def __post_init__(self) -> None:
        if self.allowlist is not None:
            peers = frozenset(self.allowlist)
            if not all(isinstance(p, PeerID) for p in peers):
                raise ConfigError("the allowlist holds PeerIDs")
            object.__setattr__(self, "allowlist", peers)
        _positive("ban_base", self.ban_base)
        _positive("ban_cap", self.ban_cap)
        if self.ban_cap < self.ban_base:
            raise ConfigError(
                f"ban_cap ({self.ban_cap:g} s) is below ban_base ({self.ban_base:g} s)"
            )

    def allows(self, peer: PeerID) -> bool:
        return self.allowlist is None or peer in self.allowlist


@dataclasses.dataclass(frozen=True, slots=True)
class Ban:
    """One ban: ``peer`` may not connect while ``since <= now < until``."""

    peer: PeerID
    reason: str
    since: float
    until: float
    #: 1 for a first offence, 2 for the next, ...
    offence: int
    #: what this offence earned (``until - since``, unless an earlier, longer ban still ran)
    duration: float


class BanList:
    """Bans whose durations grow: ``base * 2**(offence - 1)``, at most ``cap``.

    A peer's offences are remembered until ``forget_after`` seconds after its last ban ended
    (default: the cap), so a peer that behaved for that long starts again from ``base``.

    >>> bans = BanList(base=60, cap=200)
    >>> p = PeerID(bytes(32))
    >>> [bans.ban(p, "flood", now=t).duration for t in (0, 60, 180, 380)]
    [60.0, 120.0, 200.0, 200.0]
    """

    def __init__(
        self, base: float = 60.0, cap: float = 24 * 3600.0, forget_after: float | None = None
    ):
        _positive("base", base)
        _positive("cap", cap)
        self.base = float(base)
        self.cap = float(max(cap, base))
        self.forget_after = self.cap if forget_after is None else float(forget_after)
        self._bans: dict[PeerID, Ban] = {}

    def duration(self, offence: int) -> float:
        """How long the ``offence``-th ban lasts."""
        if offence < 1:
            raise ConfigError("offences count from 1")
        # 2**64 already dwarfs any cap; a larger exponent would only overflow the float.
        return min(self.cap, self.base * 2.0 ** min(offence - 1, 64))

    def ban(self, peer: PeerID, reason: str, now: float) -> Ban:
        """Ban ``peer`` from ``now``; a peer banned already keeps the longer of the two."""
        previous = self._bans.get(peer)
        offence = 1
        if previous is not None and now < previous.until + self.forget_after:
            offence = previous.offence + 1
        duration = self.duration(offence)
        until = now + duration
        if previous is not None and previous.until > until:
            until = previous.until
        ban = Ban(peer, reason, now, until, offence, duration)
        self._bans[peer] = ban
        if len(self._bans) > _SWEEP_AT:
            self._sweep(now)
        return ban

    def banned(self, peer: PeerID, now: float) -> Ban | None:
        """The ban in force on ``peer`` at ``now``, if any."""
        ban = self._bans.get(peer)
        if ban is not None and ban.since <= now < ban.until:
            return ban
        return None

    def active(self, now: float) -> list[Ban]:
        """Every ban in force at ``now``, soonest to end first."""
        return sorted(
            (b for b in self._bans.values() if b.since <= now < b.until), key=lambda b: b.until
        )

    def lift(self, peer: PeerID) -> None:
        """End ``peer``'s ban and forget its offences."""
        self._bans.pop(peer, None)

    def _sweep(self, now: float) -> None:
        for peer in [p for p, b in self._bans.items() if now >= b.until + self.forget_after]:
            del self._bans[peer]


class _PeerRates:
    __slots__ = ("bytes", "calls", "refusals")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.calls = TokenBucket(limits.calls_per_s, limits.call_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_s, limits.byte_burst, now)
        # One token per refusal; it refills over the window, so emptying it takes more than
        # ``ban_after_refusals`` refusals within about ``refusal_window`` seconds.
        n = limits.ban_after_refusals
        self.refusals = TokenBucket(n / limits.refusal_window, n, now)

    def idle(self, now: float) -> bool:
        return self.calls.full(now) and self.bytes.full(now) and self.refusals.full(now)


class AccessControl:
    """One transport's access state (sans-IO): see the module docstring.

    ``refusal`` and ``admit_call`` return ``None`` to let a peer in, or the reason (plain words,
    sent to the peer) to refuse it. ``new_bans`` collects the bans made since the caller last
    took them, so the transport can close the banned peers' connections and log them.
    """

    def __init__(self, policy: AccessPolicy | None = None) -> None:
        self.policy = policy if policy is not None else AccessPolicy()
        self.bans = BanList(self.policy.ban_base, self.policy.ban_cap)
        self._rates: dict[PeerID, _PeerRates] = {}
        self.new_bans: list[Ban] = []

    def refusal(self, peer: PeerID, now: float) -> str | None:
        """Why ``peer`` may not connect (either way) at ``now``, or None when it may."""
        if not self.policy.allows(peer):
            return "not on the allowlist of this private swarm"
        ban = self.bans.banned(peer, now)
        if ban is not None:
            return f"banned for another {ban.until - now:.3g} s: {ban.reason}"
        return None

    def admit_call(self, peer: PeerID, nbytes: int, now: float) -> str | None:
        """Charge one call (and the ``nbytes`` ``peer`` sent since its last call); None lets
        it run, a reason refuses it. Enough refusals ban the peer (the reason then says so)."""
        refused = self.refusal(peer, now)
        if refused is not None:
            return refused
        rates = self._rates.get(peer)
        if rates is None:
            if len(self._rates) >= _SWEEP_AT:
                self._sweep(now)
            rates = self._rates[peer] = _PeerRates(self.policy.rates, now)
        # Bytes already arrived: drain them whatever happens, then decide.
        bytes_ok = rates.bytes.drain(nbytes, now)
        if bytes_ok and rates.calls.take(1, now):
            return None
        what = "calls" if bytes_ok else "bytes"
        if not rates.refusals.take(1, now):
            ban = self.offence(peer, "rate limit exceeded again and again", now)
            return f"banned for {ban.duration:g} s: {ban.reason}"
        return f"rate limited: too many {what} from your peer; slow down"

    def refused(self, peer: PeerID, what: str, now: float) -> Ban | None:
        """Count one refusal of something ``peer`` asked for beyond a call (a relay's
        reservation or circuit); as for rate limits, more than ``ban_after_refusals`` within
        about ``refusal_window`` seconds ban it. The ban, if this one made it."""
        rates = self._rates.get(peer)
        if rates is None:
            if len(self._rates) >= _SWEEP_AT:
                self._sweep(now)
            rates = self._rates[peer] = _PeerRates(self.policy.rates, now)
        if rates.refusals.take(1, now):
            return None
        return self.offence(peer, f"{what} refused again and again", now)

    def offence(self, peer: PeerID, reason: str, now: float) -> Ban:
        """Ban ``peer`` for ``reason`` (a protocol violation, bad data, a flood)."""
        ban = self.bans.ban(peer, reason, now)
        self._rates.pop(peer, None)  # it starts afresh when the ban ends
        self.new_bans.append(ban)
        return ban

    def bad_data(self, excluded: Iterable[tuple[PeerID, str]], now: float) -> list[Ban]:
        """Ban the peers a round excluded for malformed data (``RoundReport.excluded.items()``),
        when the policy says so; returns the bans made."""
        if not self.policy.ban_on_bad_data:
            return []
        return [
            self.offence(peer, f"bad data in a round ({why})", now)
            for peer, why in excluded
            if why in BAD_DATA_REASONS
        ]

    def take_new_bans(self) -> list[Ban]:
        bans, self.new_bans = self.new_bans, []
        return bans

    def _sweep(self, now: float) -> None:
        for peer in [p for p, r in self._rates.items() if r.idle(now)]:
            del self._rates[peer]
