"""What the dashboard knows about one run's swarm, and the JSON it serves about it (sans-IO).

``SwarmView`` is fed by the collector (``collector.py``) and read by the web app (``app.py``):

- ``ingest_records(records, now)``: the run's progress records as the DHT returned them
  (``mp.progress/RUN``, one owned entry per peer). A read may miss a replica, so an entry is
  kept until it expires, unless its owner withdrew it or a fresher record replaced it.
- ``ingest_status(peer, now, status=..., error=...)``: a daemon's answer to ``status`` (or why
  there was none: refused, no such call, unreachable...).
- ``tick(now)``: one point of the swarm's history (live peers, samples, epoch, loss).

Every record is untrusted. One that does not decode is shown as *malformed*, with the decoder's
reason, and counts for nothing. One that decodes but cannot be true is shown as *suspect*, with
the reasons, and is left out of the swarm's totals, its loss, its epoch and the leaderboard:

- a throughput above ``Limits.max_samples_per_s``;
- more samples than that rate allows in the uptime it claims (``time - started``), or than it
  allows since the same life's previous record; samples that went down within one life;
- a publication time in the future (beyond ``Limits.clock_skew``);
- more samples in the current epoch than in total;
- an epoch more than one ahead of the other peers' median;
- more samples than ``Limits.outlier_factor`` times the other peers' median (with at least
  three others, and a median of at least ``Limits.outlier_floor``): a peer that claims a
  billion samples while the others did thousands.

A lie that stays within all of these is not caught (nobody can check a peer's samples); it is
also bounded by them. The swarm's loss is the median of the peers' losses, so one peer cannot
move it far. Text from records and status replies goes out only as JSON strings, cut to
``MAX_TEXT`` characters; the page never renders it as HTML.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..dht.records import Record
from ..errors import ConfigError, ProtocolError
from ..identity import PeerID
from ..training.progress import PeerProgress, decode_progress

if TYPE_CHECKING:
    from ..daemon import PeerStatus

__all__ = [
    "MAX_PAGE",
    "MAX_TEXT",
    "SORT_KEYS",
    "Limits",
    "StatusOutcome",
    "SwarmView",
]

#: the longest text (reason, version, run id...) passed on, in characters
MAX_TEXT = 200
#: the most rows one page of /api/peers or /api/leaderboard holds
MAX_PAGE = 200
#: what /api/peers can sort by
SORT_KEYS = (
    "samples",
    "samples_per_s",
    "loss",
    "rounds",
    "uptime",
    "bytes_sent",
    "bytes_received",
    "epoch",
    "peer_id",
    "state",
)
#: how often a status call is made again, by its last outcome (seconds)
STATUS_RETRY = {
    "ok": 10.0,
    "refused": 600.0,
    "no status call": 600.0,
    "unreachable": 60.0,
    "timeout": 60.0,
    "bad reply": 300.0,
}
StatusOutcome = str  # one of STATUS_RETRY's keys
#: the summary's peer counts ("relayed": client-mode peers holding a relay reservation)
_PEER_COUNTS = (
    "live",
    "trainers",
    "daemons",
    "ok",
    "suspect",
    "malformed",
    "client_mode",
    "relayed",
)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the view believes. ``max_samples_per_s``: the fastest a single peer can really be
    (records beyond are suspect); ``clock_skew``: how far a peer's clock may be ahead;
    ``outlier_factor`` / ``outlier_floor``: see the module docstring; ``history``: points
    kept; ``status_stale``: seconds after which a daemon that stopped answering leaves the
    table; ``leaderboard``: peers kept on it (those with the least credit go first)."""

    max_samples_per_s: float = 1e6
    clock_skew: float = 60.0
    outlier_factor: float = 100.0
    outlier_floor: int = 10_000
    history: int = 4000
    status_stale: float = 60.0
    leaderboard: int = 100_000

    def __post_init__(self) -> None:
        for name in ("max_samples_per_s", "clock_skew", "outlier_factor", "status_stale"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"Limits.{name} must be a positive number, got {value!r}")
        for name in ("outlier_floor", "history", "leaderboard"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"Limits.{name} must be a positive int, got {value!r}")


def _text(value: object, limit: int = MAX_TEXT) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: float | None) -> float | None:
    """A float fit for JSON (no NaN or infinity), or None."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclasses.dataclass
class _Status:
    outcome: StatusOutcome
    detail: str
    checked: float
    #: the last good answer (kept while later calls fail), sanitized for JSON
    report: dict[str, Any] | None = None
    answered: float | None = None


@dataclasses.dataclass
class _Life:
    """One life of a peer (its ``started``), for the leaderboard: the most it claimed."""

    started: float | None
    samples: int = 0
    rounds: int = 0


@dataclasses.dataclass
class _Credit:
    """A peer's place on the leaderboard: every life it was seen in, summed."""

    peer_id: PeerID
    first_seen: float
    last_seen: float
    banked_samples: int = 0
    banked_rounds: int = 0
    life: _Life | None = None

    @property
    def samples(self) -> int:
        return self.banked_samples + (self.life.samples if self.life else 0)

    @property
    def rounds(self) -> int:
        return self.banked_rounds + (self.life.rounds if self.life else 0)


@dataclasses.dataclass
class _Entry:
    """A peer's entry in the run's progress key, as last read."""

    expiration: float
    progress: PeerProgress | None  # None: malformed
    malformed: str | None = None
    problems: tuple[str, ...] = ()
    #: the previous valid record of the same life (for the growth check)
    previous: PeerProgress | None = None


class SwarmView:
    """The swarm of run ``run_id`` as the dashboard sees it; see the module docstring."""

    def __init__(self, run_id: str, limits: Limits | None = None) -> None:
        self.run_id = run_id
        self.limits = limits or Limits()
        self._entries: dict[PeerID, _Entry] = {}
        self._status: dict[PeerID, _Status] = {}
        self._addresses: dict[PeerID, str] = {}
        self._credit: dict[PeerID, _Credit] = {}
        self._history: deque[dict[str, Any]] = deque(maxlen=self.limits.history)
        #: unix time of the last successful read of the records, and the last failure's text
        self.updated: float | None = None
        self.read_error: str | None = None
        self.reads = 0

    # -- feeding -----------------------------------------------------------------------------

    def ingest_records(self, records: Mapping[bytes, Record], now: float) -> None:
        """Merge one read of the run's progress key (what ``DHTNode.get_records`` returns)."""
        for subkey, record in records.items():
            if len(subkey) != 32:
                continue  # not an owned entry; the DHT refuses these anyway
            owner = PeerID(bytes(subkey))
            current = self._entries.get(owner)
            if current is not None and record.expiration < current.expiration:
                continue  # an older copy from a replica that missed the newer one
            if not record.value:
                self._entries.pop(owner, None)  # withdrawn
                continue
            if current is not None and record.expiration == current.expiration:
                continue  # the same record again
            try:
                progress = decode_progress(subkey, record.value)
            except ProtocolError as exc:
                self._entries[owner] = _Entry(
                    record.expiration, None, malformed=_text(exc.detail or str(exc))
                )
                continue
            previous = None
            last = None if current is None else current.progress
            if last is not None and last.started == progress.started:
                previous = last
            self._entries[owner] = _Entry(record.expiration, progress, previous=previous)
            if progress.address is not None:
                self._addresses[owner] = progress.address
        self._drop_expired(now)
        self._judge(now)
        self.updated = now
        self.read_error = None
        self.reads += 1

    def read_failed(self, error: str, now: float) -> None:
        """The records could not be read this time (the last known ones stay until expiry)."""
        self.read_error = _text(error)
        self._drop_expired(now)
        self._judge(now)

    def note_address(self, peer: PeerID, address: str) -> None:
        """A peer worth asking for its status (a DHT contact, a bootstrap peer)."""
        self._addresses.setdefault(peer, address)
        if len(self._addresses) > 4 * self.limits.leaderboard:  # bounded, whatever comes
            for p in list(self._addresses)[: len(self._addresses) // 2]:
                if p not in self._entries and p not in self._status:
                    del self._addresses[p]

    def status_targets(self, now: float, limit: int) -> list[tuple[PeerID, str]]:
        """Up to ``limit`` peers whose status is due, longest overdue first."""
        due: list[tuple[float, PeerID, str]] = []
        for peer, address in self._addresses.items():
            last = self._status.get(peer)
            at = -math.inf if last is None else last.checked + STATUS_RETRY[last.outcome]
            if at <= now:
                due.append((at, peer, address))
        due.sort(key=lambda d: (d[0], d[1].to_bytes()))
        return [(peer, address) for _, peer, address in due[:limit]]

    def ingest_status(
        self,
        peer: PeerID,
        now: float,
        *,
        status: PeerStatus | None = None,
        outcome: StatusOutcome = "ok",
        error: str = "",
    ) -> None:
        """Record a status call's answer (``status``) or its failure (``outcome``, ``error``)."""
        if outcome not in STATUS_RETRY:
            raise ConfigError(f"unknown status outcome {outcome!r}")
        last = self._status.get(peer)
        if status is not None:
            report, problems = _status_report(status, self.run_id)
            if status.peer_id != str(peer):
                report, problems = None, ["the reply names another peer"]
            if report is None or problems:
                self._status[peer] = _Status("bad reply", "; ".join(problems), now)
                return
            self._status[peer] = _Status("ok", "", now, report, now)
            return
        kept = last.report if last is not None else None
        answered = last.answered if last is not None else None
        self._status[peer] = _Status(outcome, _text(error), now, kept, answered)

    def tick(self, now: float) -> dict[str, Any]:
        """Add (and return) one point of the swarm's history."""
        self._drop_expired(now)
        s = self._totals(now)
        point = {
            "t": round(now, 3),
            "live": s["live"],
            "trainers": s["trainers"],
            "suspect": s["suspect"],
            "samples": s["samples"],
            "samples_per_s": s["samples_per_s"],
            "epoch": s["epoch"],
            "loss": s["loss"],
        }
        self._history.append(point)
        return point

    # -- judging -----------------------------------------------------------------------------

    def _drop_expired(self, now: float) -> None:
        for peer in [p for p, e in self._entries.items() if e.expiration <= now]:
            del self._entries[peer]
        stale = now - 10 * self.limits.status_stale
        for peer in [p for p, s in self._status.items() if s.checked < stale]:
            if peer not in self._entries:
                del self._status[peer]

    def _judge(self, now: float) -> None:
        """Mark each valid record ok or suspect, then credit the ok ones."""
        valid = {p: e.progress for p, e in self._entries.items() if e.progress is not None}
        # Each check against the others uses the medians of everyone else: with one liar
        # among honest peers, the medians are honest ones.
        samples = sorted(p.samples for p in valid.values())
        epochs = sorted(p.epoch for p in valid.values())
        lim = self.limits
        for peer, entry in self._entries.items():
            p = entry.progress
            if p is None:
                continue
            problems = list(_own_problems(p, entry.previous, now, lim))
            others = len(valid) - 1
            if others >= 1:
                median_epoch = _median_without(epochs, p.epoch)
                if p.epoch > median_epoch + 1:
                    problems.append(
                        f"epoch {p.epoch} is ahead of the other peers' ({median_epoch:g})"
                    )
            if others >= 3:
                median = _median_without(samples, p.samples)
                bound = lim.outlier_factor * max(median, lim.outlier_floor)
                if p.samples > bound:
                    problems.append(
                        f"claims {p.samples:,} samples, over {lim.outlier_factor:g}x the other "
                        f"peers' median ({median:,.0f})"
                    )
            entry.problems = tuple(_text(x) for x in problems)
            if not entry.problems:
                self._credit_peer(peer, p, now)

    def _credit_peer(self, peer: PeerID, p: PeerProgress, now: float) -> None:
        credit = self._credit.get(peer)
        if credit is None:
            if len(self._credit) >= self.limits.leaderboard:
                self._evict_credit()
            credit = self._credit[peer] = _Credit(peer, now, now)
        credit.last_seen = now
        life = credit.life
        if life is None or life.started != p.started:
            if life is not None:  # a restart: the last life's work stays credited
                credit.banked_samples += life.samples
                credit.banked_rounds += life.rounds
            life = credit.life = _Life(p.started)
        life.samples = max(life.samples, p.samples)
        life.rounds = max(life.rounds, p.rounds_done + p.rounds_partial)

    def _evict_credit(self) -> None:
        live = set(self._entries)
        gone = [c for c in self._credit.values() if c.peer_id not in live]
        victims = sorted(gone or self._credit.values(), key=lambda c: (c.samples, c.last_seen))
        for c in victims[: max(1, len(self._credit) // 10)]:
            del self._credit[c.peer_id]

    # -- reading -----------------------------------------------------------------------------

    def _rows(self, now: float) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for peer, entry in self._entries.items():
            rows.append(self._row(peer, entry, self._status.get(peer), now))
        for peer, status in self._status.items():
            if peer in self._entries or not _shown(status, now, self.limits.status_stale):
                continue
            rows.append(self._row(peer, None, status, now))
        return rows

    def _row(
        self, peer: PeerID, entry: _Entry | None, status: _Status | None, now: float
    ) -> dict[str, Any]:
        row: dict[str, Any] = {
            "peer_id": str(peer),
            "kind": "trainer" if entry is not None else "daemon",
            "state": "ok",
            "problems": [],
            "epoch": None,
            "samples": None,
            "samples_in_epoch": None,
            "step": None,
            "samples_per_s": None,
            "loss": None,
            "rounds": None,
            "bytes_sent": None,
            "bytes_received": None,
            "uptime_s": None,
            "client_mode": None,
            "relays": None,
            "relaying": None,
            "address": None,
            "last_round": None,
            "published": None,
            "expires": None,
            "status": None,
        }
        if entry is not None:
            row["expires"] = round(entry.expiration, 3)
            if entry.progress is None:
                row["state"] = "malformed"
                row["problems"] = [entry.malformed or "undecodable"]
            else:
                p = entry.progress
                row["state"] = "suspect" if entry.problems else "ok"
                row["problems"] = list(entry.problems)
                row.update(
                    epoch=p.epoch,
                    samples=p.samples,
                    samples_in_epoch=p.samples_in_epoch,
                    step=p.step,
                    samples_per_s=_num(p.samples_per_s),
                    loss=_num(p.loss),
                    rounds={
                        "done": p.rounds_done,
                        "partial": p.rounds_partial,
                        "solo": p.rounds_solo,
                    },
                    bytes_sent=p.bytes_sent,
                    bytes_received=p.bytes_received,
                    uptime_s=None if p.started is None else _num(max(0.0, now - p.started)),
                    client_mode=p.address is None,
                    relays=p.relays if p.address is None else None,
                    address=p.address,
                    last_round=None
                    if p.last_round is None
                    else {"round": p.last_round, "group": p.group.hex(), "size": p.group_size},
                    published=_num(p.time),
                )
        if status is not None:
            row["status"] = {
                "outcome": status.outcome,
                "detail": status.detail,
                "checked": round(status.checked, 3),
                "answered": status.answered,
                "report": status.report,
            }
            report = status.report
            if report is not None and _shown(status, now, self.limits.status_stale):
                # A daemon's own counters, for what its progress record (if any) lacks.
                run = report["run"]
                for key in ("bytes_sent", "bytes_received", "client_mode"):
                    if row[key] is None:
                        row[key] = report[key]
                if row["uptime_s"] is None:
                    row["uptime_s"] = report["uptime_s"] + (now - (status.answered or now))
                if row["relays"] is None and row["client_mode"]:
                    row["relays"] = report["relays_held"]
                row["relaying"] = report["relay"]
                if row["address"] is None and report["addresses"]:
                    row["address"] = report["addresses"][0]
                if row["rounds"] is None and run is not None:
                    row["rounds"] = {
                        "done": run["rounds_done"],
                        "partial": run["rounds_partial"],
                        "solo": run["rounds_failed"],
                    }
                if row["last_round"] is None and run is not None and run["last_round"]:
                    last = run["last_round"]
                    row["last_round"] = {"round": last["round"], "group": "", "size": last["size"]}
        return row

    def _totals(self, now: float) -> dict[str, Any]:
        ok = [
            e.progress for e in self._entries.values() if e.progress is not None and not e.problems
        ]
        losses = [p.loss for p in ok if p.loss is not None]
        daemons = sum(
            1
            for peer, s in self._status.items()
            if peer not in self._entries and _shown(s, now, self.limits.status_stale)
        )
        entries = self._entries.values()
        return {
            "live": len(self._entries) + daemons,
            "trainers": sum(1 for e in entries if e.progress is not None),
            "daemons": daemons,
            "ok": len(ok),
            "suspect": sum(1 for e in entries if e.progress is not None and e.problems),
            "malformed": sum(1 for e in entries if e.progress is None),
            "client_mode": sum(1 for p in ok if p.address is None),
            "relayed": sum(1 for p in ok if p.address is None and p.relays),
            "samples": sum(p.samples for p in ok),
            "samples_per_s": _num(math.fsum(p.samples_per_s for p in ok)),
            "epoch": max((p.epoch for p in ok), default=None),
            "loss": _num(statistics.median(losses)) if losses else None,
            "rounds_done": sum(p.rounds_done for p in ok),
            "rounds_partial": sum(p.rounds_partial for p in ok),
            "rounds_solo": sum(p.rounds_solo for p in ok),
        }

    def summary(self, now: float) -> dict[str, Any]:
        """``/api/swarm``: the swarm now, in one object."""
        self._drop_expired(now)
        totals = self._totals(now)
        groups = self._last_round()
        return {
            "run": self.run_id,
            "now": round(now, 3),
            "updated": self.updated,
            "read_error": self.read_error,
            "reads": self.reads,
            "peers": {k: totals[k] for k in _PEER_COUNTS},
            "samples": totals["samples"],
            "samples_per_s": totals["samples_per_s"],
            "epoch": totals["epoch"],
            "loss": totals["loss"],
            "rounds": {
                "done": totals["rounds_done"],
                "partial": totals["rounds_partial"],
                "solo": totals["rounds_solo"],
            },
            "last_round": None
            if groups is None
            else {
                "round": groups["round"],
                "groups": groups["total_groups"],
                "peers": groups["in_round"],
                "solo": groups["solo"],
            },
            "limits": {"max_samples_per_s": self.limits.max_samples_per_s},
        }

    def peers(
        self,
        now: float,
        *,
        offset: int = 0,
        limit: int = 50,
        sort: str = "samples",
        order: str = "desc",
        query: str = "",
        state: str = "",
    ) -> dict[str, Any]:
        """``/api/peers``: one page of the live peers, sorted and filtered."""
        if sort not in SORT_KEYS:
            raise ConfigError(f"sort is one of {', '.join(SORT_KEYS)}; got {_text(sort, 40)!r}")
        if order not in ("asc", "desc"):
            raise ConfigError(f"order is asc or desc; got {_text(order, 40)!r}")
        if state not in ("", "ok", "suspect", "malformed"):
            raise ConfigError(f"state is ok, suspect or malformed; got {_text(state, 40)!r}")
        offset, limit = _page(offset, limit)
        self._drop_expired(now)
        rows = self._rows(now)
        if query:
            needle = query.lower()
            rows = [r for r in rows if needle in r["peer_id"].lower()]
        if state:
            rows = [r for r in rows if r["state"] == state]
        present = [r for r in rows if _sort_value(r, sort) is not None]
        absent = [r for r in rows if _sort_value(r, sort) is None]
        present.sort(key=lambda r: (_sort_value(r, sort), r["peer_id"]), reverse=order == "desc")
        absent.sort(key=lambda r: r["peer_id"])
        rows = present + absent  # rows without the value last, whichever the order
        return {
            "total": len(rows),
            "offset": offset,
            "limit": limit,
            "sort": sort,
            "order": order,
            "peers": rows[offset : offset + limit],
        }

    def peer(self, peer: PeerID, now: float) -> dict[str, Any] | None:
        """``/api/peers/PEER_ID``: one peer's row and its leaderboard credit (None: unknown)."""
        self._drop_expired(now)
        entry = self._entries.get(peer)
        status = self._status.get(peer)
        credit = self._credit.get(peer)
        if entry is None and status is None and credit is None:
            return None
        row = self._row(peer, entry, status, now) if entry or status else None
        return {"peer": row, "credit": None if credit is None else _credit_json(credit, True)}

    def history(self, points: int = 500) -> dict[str, Any]:
        """``/api/history``: up to ``points`` points, evenly thinned, the newest always in."""
        if not (isinstance(points, int) and 2 <= points <= self.limits.history):
            raise ConfigError(f"points is 2..{self.limits.history}, got {points!r}")
        kept = list(self._history)
        if len(kept) > points:
            step = len(kept) / (points - 1)
            kept = [kept[min(len(kept) - 1, int(i * step))] for i in range(points - 1)] + [kept[-1]]
        return {"points": kept, "total": len(self._history)}

    def _last_round(self) -> dict[str, Any] | None:
        claims: dict[int, list[PeerProgress]] = {}
        for e in self._entries.values():
            p = e.progress
            if p is not None and p.last_round is not None and not e.problems:
                claims.setdefault(p.last_round, []).append(p)
        if not claims:
            return None
        # The newest round at least two peers agree on (or the only one there is): a single
        # peer far ahead, honest or not, does not hide everyone else's round.
        agreed = [r for r, ps in claims.items() if len(ps) >= 2]
        rnd = max(agreed) if agreed else max(claims)
        groups: dict[bytes, list[PeerProgress]] = {}
        solo = 0
        for p in claims[rnd]:
            if p.group:
                groups.setdefault(p.group, []).append(p)
            else:
                solo += 1
        behind = sum(len(ps) for r, ps in claims.items() if r < rnd)
        return {
            "round": rnd,
            "groups": groups,
            "total_groups": len(groups),
            "in_round": len(claims[rnd]),
            "solo": solo,
            "behind": behind,
        }

    def groups(self, limit: int = 50) -> dict[str, Any]:
        """``/api/groups``: the last round's groups (the biggest first), and their sizes."""
        _, limit = _page(0, limit)
        last = self._last_round()
        if last is None:
            return {"round": None, "groups": [], "total_groups": 0, "sizes": {}, "solo": 0}
        listed = []
        sizes: dict[str, int] = {}
        for tag, members in last["groups"].items():
            claimed = max(p.group_size for p in members)
            sizes[str(claimed)] = sizes.get(str(claimed), 0) + 1
            listed.append(
                {
                    "group": tag.hex(),
                    "size": claimed,
                    # members that published this round; the rest have not yet
                    "members": sorted(str(p.peer_id) for p in members),
                }
            )
        listed.sort(key=lambda g: (-g["size"], g["group"]))
        return {
            "round": last["round"],
            "total_groups": last["total_groups"],
            "in_round": last["in_round"],
            "solo": last["solo"],
            "behind": last["behind"],
            "sizes": dict(sorted(sizes.items(), key=lambda kv: int(kv[0]))),
            "groups": listed[:limit],
        }

    def leaderboard(self, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        """``/api/leaderboard``: every peer seen, by samples credited (all its lives)."""
        offset, limit = _page(offset, limit)
        live = set(self._entries)
        ordered = sorted(
            self._credit.values(), key=lambda c: (-c.samples, -c.rounds, c.peer_id.to_bytes())
        )
        return {
            "total": len(ordered),
            "offset": offset,
            "limit": limit,
            "entries": [
                {**_credit_json(c, c.peer_id in live), "rank": offset + i + 1}
                for i, c in enumerate(ordered[offset : offset + limit])
            ],
        }


def _credit_json(c: _Credit, live: bool) -> dict[str, Any]:
    return {
        "peer_id": str(c.peer_id),
        "samples": c.samples,
        "rounds_averaged": c.rounds,
        "first_seen": round(c.first_seen, 3),
        "last_seen": round(c.last_seen, 3),
        "live": live,
    }


def _own_problems(
    p: PeerProgress, previous: PeerProgress | None, now: float, lim: Limits
) -> Iterable[str]:
    rate = lim.max_samples_per_s
    if p.time > now + lim.clock_skew:
        yield f"published {p.time - now:.0f} s in the future"
    if p.samples_per_s > rate:
        yield f"claims {p.samples_per_s:.3g} samples/s; at most {rate:.3g} are believed"
    if p.started is not None and p.samples > (p.time - p.started + lim.clock_skew) * rate:
        yield f"claims {p.samples:,} samples in {p.time - p.started:,.0f} s of uptime"
    if p.samples_in_epoch > p.samples:
        yield "more samples in this epoch than in total"
    if previous is not None and p.time >= previous.time:
        grown = p.samples - previous.samples
        seconds = p.time - previous.time
        if grown < 0:
            yield f"samples went down from {previous.samples:,} to {p.samples:,}"
        elif grown > (seconds + lim.clock_skew) * rate:
            yield f"samples grew by {grown:,} in {seconds:.0f} s"


def _median_without(ordered: list[int], value: int) -> float:
    """The median of a sorted list with one occurrence of ``value`` taken out, in O(log n)
    (every peer is compared with the others at every read: no copies of the list).

    >>> _median_without([1, 2, 3, 10], 10), _median_without([1, 2, 3, 10], 1)
    (2.0, 3.0)
    """
    i = bisect.bisect_left(ordered, value)
    m = len(ordered) - 1
    if m <= 0:
        return float(value)

    def rest(k: int) -> int:
        return ordered[k] if k < i else ordered[k + 1]

    if m % 2:
        return float(rest(m // 2))
    return (rest(m // 2 - 1) + rest(m // 2)) / 2


def _shown(status: _Status, now: float, stale: float) -> bool:
    """A status-only peer is in the table while its daemon answered recently, or refused
    (refusing says a daemon is there: it is shown so the operator can allow this key)."""
    if status.outcome == "refused":
        return now - status.checked <= 10 * stale
    return status.answered is not None and now - status.answered <= stale


def _page(offset: object, limit: object) -> tuple[int, int]:
    if not (isinstance(offset, int) and 0 <= offset <= 10**9):
        raise ConfigError(f"offset is a non-negative int, got {offset!r}")
    if not (isinstance(limit, int) and 1 <= limit <= MAX_PAGE):
        raise ConfigError(f"limit is 1..{MAX_PAGE}, got {limit!r}")
    return offset, limit


def _sort_value(row: dict[str, Any], sort: str) -> Any:
    if sort == "rounds":
        r = row["rounds"]
        return None if r is None else r["done"] + r["partial"]
    if sort == "uptime":
        return row["uptime_s"]
    return row[sort]


def _count(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{value!r} is not a count")
    return value


def _seconds(value: object) -> float:
    if not isinstance(value, int | float) or not (math.isfinite(value) and 0 <= value < 1e11):
        raise ValueError(f"{value!r} is not a time")
    return float(value)


def _status_report(status: PeerStatus, run_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """A status reply as plain JSON-safe data (this run's entry picked out), and what is wrong
    with it: negative counts, non-finite times... A reply with problems is not shown."""
    try:
        runs = []
        this_run = None
        for run in status.runs[:50]:
            last = run.last_round
            entry = {
                "run_id": _text(run.run_id),
                "kind": _text(run.kind, 20),
                "state": _text(run.state, 20),
                "rounds_done": _count(run.rounds_done),
                "rounds_partial": _count(run.rounds_partial),
                "rounds_failed": _count(run.rounds_failed),
                "bytes_sent": _count(run.bytes_sent),
                "bytes_received": _count(run.bytes_received),
                "last_round": None
                if last is None
                else {
                    "round": _count(last.round),
                    "outcome": _text(last.outcome, 20),
                    "size": len(last.members),
                    "seconds": _seconds(last.seconds.get("total", 0.0)),
                },
            }
            runs.append(entry)
            if run.run_id == run_id:
                this_run = entry
        report = {
            "version": _text(status.version, 40),
            "uptime_s": _seconds(status.uptime_s),
            "addresses": [_text(a, 300) for a in status.addresses[:4]],
            "client_mode": bool(status.client_mode),
            "routing_table_size": _count(status.routing_table_size),
            "connections": _count(status.connections),
            "bytes_sent": _count(status.bytes_sent),
            "bytes_received": _count(status.bytes_received),
            "runs": runs,
            "run": this_run,
            # a client-mode daemon's relays holding its reservations (None: it keeps none)
            "relays_held": None if status.relays is None else len(status.relays.held),
            # a relay's load: who holds a slot on it now, and the circuits it carries
            "relay": None
            if status.relay is None
            else {
                "reservations": _count(status.relay.reservations),
                "circuits": _count(status.relay.circuits),
            },
        }
    except (ValueError, AttributeError, TypeError) as exc:
        return None, [_text(f"status reply: {exc}")]
    return report, []
