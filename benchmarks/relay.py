"""Relay: the same averaging round direct and through a relay, in the same run (seconds, bytes).

Volunteers behind NAT cannot dial each other; they average through a public peer that relays
(SPEC.md "Relay"). This measures what that costs against the same round between peers that
dial each other directly, on real sockets on 127.0.0.1.

Processes. A relay/bootstrap peer (``open_peer(listen=..., relay=RelayLimits(...))``, no
averaging) runs in an OS process of its own: it is the machine whose CPU and links the relayed
arm loads. ``--peers`` N averaging peers (default 4) run in this process, one trio run, each an
``open_peer`` with one ``MoshpitAverager`` over a float32 vector of ``--floats`` elements
(default 4M). Each arm gets a fresh relay process and fresh peers, so both start from the same
state; this script ends every process it starts, on errors and Ctrl-C too.

Arms, in this order:

``direct``   the N peers listen on 127.0.0.1 and bootstrap from the relay process (which only
             serves the DHT here): they dial each other, nothing of a round passes the relay.
``relayed``  the N peers are client-mode (``client_mode=True``: nobody can dial them) and hold a
             reservation on the relay (``relays=[relay]``), which they publish in the DHT. Nobody
             in the group listens, so relayed members lead and reduce (SPEC.md "Relay"), and
             every connection between them is a circuit through the relay: every byte of the
             all-reduce crosses it twice (in, then out). The arm checks this: a direct
             connection between two averaging peers is reported (``direct_links``).

Rounds. Grid ``(N,)`` with ``initial_key=()`` (``--grid fixed``, default: one group of N, the
same DHT key every round) or ``--grid auto`` (``auto_grid`` puts N <= 16 peers in one group
too). No ``round_period``: every round, all N call ``step(weight, timeout=--timeout)`` at once
(the benchmark drives the rounds itself, so nothing waits for a wall-clock slot). ``--warmup``
untimed rounds (they open the connections: websocket handshakes, circuits) come before the
``--rounds`` measured ones.

Relay limits. By default the relay's limits are set so high that they never throttle
(``circuit_bytes_per_s``, ``total_bytes_per_s`` and their bursts at 1e15; every count limit as
it comes): the figures are what relaying itself costs. ``--default-limits`` runs the relay with
``RelayLimits()`` as it ships (8 MiB/s per circuit, 32 MiB/s in total, both directions
together), to show what a stock relay paces a round to. The table and the JSON say which.

Correctness. In round r, peer i starts from ``before(i, r)`` (uniform in [i, i + 1), seeded by
(seed, i, r)) and steps with weight i + 1. After the round every peer's vector is checked,
span by span, against what its ``RoundReport`` names: the weighted mean of exactly the members
it lists (rtol 1e-5, atol 1e-6), or its own values unchanged where it names none (and the whole
vector for a solo round). A round that succeeded names every member for every span, so this is
the exact global weighted mean. Elements that differ are counted (``mismatched_elements``).

Per arm, over the measured rounds (a round's figure is its slowest peer's):
``round_s`` (median of ``RoundReport.seconds["total"]``), ``round_worst_s``, ``matchmaking_s``
and ``allreduce_s`` (medians of those stages), ``wall_s_per_round`` (median, from the moment the
N steps start to the last one's end), ``bytes_per_peer`` (median over rounds of the mean over
peers of ``RoundReport.bytes_sent + bytes_received``: the round's own traffic as the averager
counts it), ``link_bytes_per_peer`` (the bytes on each peer's own sockets, from its transport's
counters: with framing, encryption, matchmaking and DHT traffic; when relayed, the outer
connection to the relay, which carries the circuits' bytes encrypted once more, and not the
circuits' own counts of the same bytes), ``relay_bytes_per_round`` (median over
rounds of the bytes the relay process's transport received plus sent: its counters, asked for
before and after every round), ``relay_cpu_s_per_round`` (the relay process's CPU time, user +
system, per round, median), ``peers_cpu_s_per_round`` (this process's, all N peers), and
``rounds_succeeded`` (rounds in which every peer's report succeeded with all N members).

    python benchmarks/relay.py                                  # N=4, 4M floats: table
    python benchmarks/relay.py --json                           # one JSON object on stdout
    python benchmarks/relay.py --default-limits                 # a stock relay's pacing
    python benchmarks/relay.py --peers 3 --floats 20000 --rounds 2 --warmup 1   # a few s

JSON keys: ``peers``, ``floats``, ``rounds``, ``warmup``, ``grid``, ``timeout``, ``cores``,
``relay_limits`` (``"unthrottled"`` or ``"default"``) and ``limits`` (the RelayLimits fields),
``direct`` and ``relayed`` (each: the per-arm figures above, ``mismatched_elements``,
``direct_links``, ``error`` (null, or why the arm failed) and ``per_round``, every round's
figures), and the headline: ``direct_round_s``, ``relayed_round_s``, ``ratio_round_s``
(relayed / direct), ``direct_allreduce_s``, ``relayed_allreduce_s``, ``ratio_allreduce_s``,
``direct_bytes_per_peer``, ``relayed_bytes_per_peer``, ``ratio_bytes_per_peer``,
``relay_bytes_per_round`` (the relayed arm's), ``direct_relay_bytes_per_round`` (the same
process in the direct arm: DHT traffic only), ``relay_cpu_s_per_round`` (the relayed arm's),
``rounds_succeeded_direct``, ``rounds_succeeded_relayed``, ``mismatched_elements`` (both arms
together), ``wall_s`` (the whole run). ``--out FILE`` also writes the JSON object to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):  # the library, and faults.py beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import trio  # noqa: E402

# The same starting values and weights as the faults benchmark.
from faults import before_values, weight_of  # noqa: E402

HOST = "127.0.0.1"
SCRIPT = str(Path(__file__).resolve())
ARMS = ("direct", "relayed")
RTOL, ATOL = 1e-5, 1e-6
#: pacing so high it never holds a byte back (bytes/s and bursts): the relay as fast as it is
UNTHROTTLED = 1e15
_START_TIMEOUT = 60.0  # the relay process must be up within this
_STOP_GRACE = 5.0  # a relay process told to stop may say its goodbyes for this long


class BenchFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# Pure parts: the values, the check, the summaries.


@dataclasses.dataclass(frozen=True)
class Span:
    """What a report says of one span: ``included`` None means "kept its own values"."""

    start: int
    end: int
    included: tuple[Any, ...] | None


def mismatched(
    spans: Sequence[Span],
    me: Any,
    before: dict[Any, np.ndarray],
    weights: dict[Any, float],
    now: np.ndarray,
) -> int:
    """Elements of ``now`` that differ from what the spans name: per span, the weighted mean of
    exactly the members included (tolerance RTOL/ATOL), or ``before[me]`` exactly where a span
    includes nobody; with no spans (a solo round) the whole vector must be ``before[me]``. An
    element no span covers counts as mismatched (a report must cover the vector)."""
    if not spans:
        return int(np.count_nonzero(now != before[me]))
    covered = np.zeros(len(now), dtype=bool)
    bad = 0
    for span in spans:
        part = slice(span.start, span.end)
        covered[part] = True
        if span.included is None:
            bad += int(np.count_nonzero(now[part] != before[me][part]))
            continue
        total = sum(weights[p] for p in span.included)
        expect = sum(weights[p] * before[p][part].astype(np.float64) for p in span.included)
        expect = np.asarray(expect) / total
        bad += int(np.count_nonzero(~np.isclose(now[part], expect, rtol=RTOL, atol=ATOL)))
    return bad + int(np.count_nonzero(~covered))


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def worst(values: Sequence[float]) -> float | None:
    return float(max(values)) if values else None


def ratio(relayed: float | None, direct: float | None) -> float | None:
    """relayed / direct, or None when either is missing or direct is zero."""
    if relayed is None or direct is None or direct <= 0:
        return None
    return relayed / direct


def summarize(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """An arm's figures from its measured rounds' (see the module docstring)."""

    def col(key: str) -> list[float]:
        return [r[key] for r in rounds if r.get(key) is not None]

    return {
        "round_s": median(col("round_s")),
        "round_worst_s": worst(col("round_s")),
        "matchmaking_s": median(col("matchmaking_s")),
        "allreduce_s": median(col("allreduce_s")),
        "wall_s_per_round": median(col("wall_s")),
        "bytes_per_peer": median(col("bytes_per_peer")),
        "link_bytes_per_peer": median(col("link_bytes_per_peer")),
        "relay_bytes_per_round": median(col("relay_bytes")),
        "relay_cpu_s_per_round": median(col("relay_cpu_s")),
        "peers_cpu_s_per_round": median(col("peers_cpu_s")),
        "rounds_succeeded": sum(1 for r in rounds if r["succeeded"]),
        "mismatched_elements": sum(r["mismatched_elements"] for r in rounds),
    }


# --------------------------------------------------------------------------------------------
# JSON lines over pipes, both ways.


class Lines:
    """Whole lines of JSON from a trio receive stream; None at its end."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> dict[str, Any] | None:
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some(65536)
            if not data:
                return None
            self._buffer += data
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        message: dict[str, Any] = json.loads(line)
        return message


# --------------------------------------------------------------------------------------------
# The relay process.


def relay_limits(default: bool) -> Any:
    from moshpit_trio.wire.relay_table import RelayLimits

    if default:
        return RelayLimits()
    return RelayLimits(
        circuit_bytes_per_s=UNTHROTTLED,
        circuit_burst=UNTHROTTLED,
        total_bytes_per_s=UNTHROTTLED,
        total_burst=UNTHROTTLED,
    )


def _relay_child(spec: dict[str, Any]) -> None:
    """Serve as relay and bootstrap until stdin ends or says stop; answer ``counters``."""
    from moshpit_trio import Identity, open_peer

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints must not corrupt the protocol on stdout

    def send(**message: Any) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    async def main() -> None:
        lines = Lines(trio.lowlevel.FdStream(os.dup(0)))
        with trio.fail_after(spec["deadline"]):
            async with open_peer(
                Identity.generate(), listen=f"{HOST}:0", relay=relay_limits(spec["default_limits"])
            ) as peer:
                send(op="ready", address=str(peer.address))
                while True:
                    msg = await lines.next()
                    if msg is None or msg.get("op") != "counters":
                        break
                    send(
                        op="counters",
                        sent=peer.transport.bytes_sent,
                        received=peer.transport.bytes_received,
                        cpu=time.process_time(),
                    )

    try:
        trio.run(main)
    except Exception as exc:
        send(op="error", error=f"{type(exc).__name__}: {exc}")
        raise


class RelayProcess:
    """The relay child, from the parent's side: start, ask for counters, end (always)."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        assert process.stdout is not None and process.stdin is not None
        self._lines = Lines(process.stdout)
        self._stdin = process.stdin
        self.address = ""

    @classmethod
    async def start(cls, *, default_limits: bool, deadline: float, quiet: bool) -> RelayProcess:
        spec = {"default_limits": default_limits, "deadline": deadline}
        process = await trio.lowlevel.open_process(
            [sys.executable, SCRIPT, "--role", "relay", "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL if quiet else None,
        )
        relay = cls(process)
        try:
            with trio.fail_after(_START_TIMEOUT):
                ready = await relay._read("start")
            relay.address = ready["address"]
        except BaseException:
            await relay.end()
            raise
        return relay

    async def _read(self, what: str) -> dict[str, Any]:
        msg = await self._lines.next()
        if msg is None:
            raise BenchFailed(f"relay {what}: the process exited (see its stderr)")
        if msg.get("op") == "error":
            raise BenchFailed(f"relay {what}: {msg['error']}")
        return msg

    async def counters(self) -> tuple[int, float]:
        """Bytes its transport received plus sent so far, and its CPU seconds."""
        await self._stdin.send_all(b'{"op": "counters"}\n')
        with trio.fail_after(30):
            msg = await self._read("counters")
        return int(msg["sent"]) + int(msg["received"]), float(msg["cpu"])

    async def end(self) -> None:
        """Ask it to stop (close its stdin), then terminate, then kill: never left running."""
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await self._stdin.aclose()
            with trio.move_on_after(_STOP_GRACE):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.terminate()
                with trio.move_on_after(3):
                    await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
            await self.process.stdout.aclose()  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# One arm: N peers in this process, a fresh relay process beside them.


@dataclasses.dataclass(frozen=True)
class Settings:
    peers: int
    floats: int
    rounds: int
    warmup: int
    grid: str
    timeout: float
    seed: int
    default_limits: bool
    quiet: bool
    deadline: float  # time.monotonic() by which everything must be over


def link_bytes(peer: Any) -> int:
    """Bytes on ``peer``'s own sockets so far: its transport's counters less what its relayed
    connections count (those bytes ride on its connection to the relay, which counts them
    again, encrypted once more)."""
    transport = peer.transport
    relayed = sum(c.bytes_sent + c.bytes_received for c in transport.connections() if c.via)
    return int(transport.bytes_sent + transport.bytes_received - relayed)


async def run_arm(arm: str, s: Settings) -> dict[str, Any]:
    """A fresh relay process and N fresh peers; the warm-up and measured rounds; every process
    and peer ended whatever happens."""
    from moshpit_trio import Identity, open_peer
    from moshpit_trio.averaging.averager import MoshpitAverager

    relayed = arm == "relayed"
    left = max(s.deadline - time.monotonic(), 1.0)
    relay = await RelayProcess.start(
        default_limits=s.default_limits, deadline=left + 10.0, quiet=s.quiet
    )
    measured: list[dict[str, Any]] = []
    try:
        with trio.fail_after(left):
            async with AsyncExitStack() as stack:
                peers = [
                    await stack.enter_async_context(
                        open_peer(
                            Identity.generate(),
                            listen=None if relayed else f"{HOST}:0",
                            client_mode=relayed,
                            bootstrap=[relay.address],
                            relays=[relay.address] if relayed else (),
                        )
                    )
                    for _ in range(s.peers)
                ]
                vectors = [np.zeros(s.floats, dtype=np.float32) for _ in range(s.peers)]
                fixed = s.grid == "fixed"
                averagers = [
                    await stack.enter_async_context(
                        MoshpitAverager(
                            p,
                            f"relaybench-{arm}",
                            [v],
                            grid=(s.peers,) if fixed else "auto",
                            # fixed: every peer at the one key of a 1-d grid (one group)
                            initial_key=() if fixed else None,
                        )
                    )
                    for p, v in zip(peers, vectors, strict=True)
                ]
                for r in range(s.warmup + s.rounds):
                    row = await one_round(r, s, relay, peers, averagers, vectors)
                    if not s.quiet:
                        print(f"[{arm}] {_round_line(row)}", file=sys.stderr)
                    if r >= s.warmup:
                        measured.append(row)
                # pairs of averaging peers joined by a direct connection (none when relayed)
                direct_links = sum(
                    1
                    for p in peers
                    for q in peers
                    if p is not q
                    and (conn := p.transport.connection_to(q.id)) is not None
                    and conn.via is None
                )
    finally:
        await relay.end()
    return {**summarize(measured), "direct_links": direct_links, "per_round": measured}


async def one_round(
    r: int,
    s: Settings,
    relay: RelayProcess,
    peers: list[Any],
    averagers: list[Any],
    vectors: list[np.ndarray],
) -> dict[str, Any]:
    """Round ``r``: every peer starts from ``before_values``, all step at once; the figures."""
    ids = [p.id for p in peers]
    weights = {ids[i]: weight_of(i) for i in range(s.peers)}
    before = {}
    for i, v in enumerate(vectors):
        before[ids[i]] = before_values(s.seed, i, r, s.floats)
        np.copyto(v, before[ids[i]])
    relay_bytes, relay_cpu = await relay.counters()
    link = sum(link_bytes(p) for p in peers)
    cpu = time.process_time()
    reports: list[Any] = [None] * s.peers

    async def step(i: int) -> None:
        reports[i] = await averagers[i].step(weights[ids[i]], timeout=s.timeout)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(s.peers):
            nursery.start_soon(step, i)
    wall = trio.current_time() - start
    cpu = time.process_time() - cpu
    link = sum(link_bytes(p) for p in peers) - link
    relay_bytes_after, relay_cpu_after = await relay.counters()
    bad = sum(
        mismatched(
            [Span(x.start, x.end, x.included) for x in rep.spans], ids[i], before, weights, vec
        )
        for i, (rep, vec) in enumerate(zip(reports, vectors, strict=True))
    )
    return {
        "round": r,
        "warmup": r < s.warmup,
        "succeeded": all(rep.succeeded and len(rep.members) == s.peers for rep in reports),
        "group_sizes": [len(rep.members) for rep in reports],
        # what went wrong, if anything: the reasons, and how many (report, member) name each
        "lost": _reasons(rep.lost for rep in reports),
        "excluded": _reasons(rep.excluded for rep in reports),
        "round_s": max(rep.seconds["total"] for rep in reports),
        "matchmaking_s": max(rep.seconds.get("matchmaking", 0.0) for rep in reports),
        "allreduce_s": max(rep.seconds.get("allreduce", 0.0) for rep in reports),
        "wall_s": wall,
        "bytes_per_peer": statistics.mean(rep.bytes_sent + rep.bytes_received for rep in reports),
        "link_bytes_per_peer": link / s.peers,
        "relay_bytes": relay_bytes_after - relay_bytes,
        "relay_cpu_s": relay_cpu_after - relay_cpu,
        "peers_cpu_s": cpu,
        "mismatched_elements": bad,
    }


def _reasons(found: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reasons in found:
        for why in reasons.values():
            counts[why] = counts.get(why, 0) + 1
    return counts


def _round_line(row: dict[str, Any]) -> str:
    return (
        f"round {row['round']}{' (warmup)' if row['warmup'] else ''}: "
        f"{row['round_s']:.3f} s (mm {row['matchmaking_s']:.3f}, ar {row['allreduce_s']:.3f}), "
        f"{row['bytes_per_peer'] / 1e6:.2f} MB/peer, relay {row['relay_bytes'] / 1e6:.2f} MB, "
        f"relay cpu {row['relay_cpu_s']:.2f} s, ok={row['succeeded']}, "
        f"bad={row['mismatched_elements']}"
        + (f", lost {row['lost']}" if row["lost"] else "")
        + (f", excluded {row['excluded']}" if row["excluded"] else "")
    )


# --------------------------------------------------------------------------------------------
# Orchestration and output.


async def run_all(s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for arm in ARMS:
        try:
            results[arm] = {**await run_arm(arm, s), "error": None}
        except Exception as exc:  # the other arm still runs; the JSON says what failed
            results[arm] = {**summarize([]), "direct_links": None, "per_round": []}
            results[arm]["error"] = f"{type(exc).__name__}: {exc}"
            if not s.quiet:
                print(f"[{arm}] failed: {results[arm]['error']}", file=sys.stderr)
    return results


def build_output(s: Settings, results: dict[str, Any], wall: float) -> dict[str, Any]:
    d, r = results["direct"], results["relayed"]
    limits = dataclasses.asdict(relay_limits(s.default_limits))
    bad = [x["mismatched_elements"] for x in (d, r) if x["error"] is None]
    return {
        "peers": s.peers,
        "floats": s.floats,
        "rounds": s.rounds,
        "warmup": s.warmup,
        "grid": s.grid,
        "timeout": s.timeout,
        "cores": os.cpu_count(),
        "relay_limits": "default" if s.default_limits else "unthrottled",
        "limits": limits,
        "direct_round_s": d["round_s"],
        "relayed_round_s": r["round_s"],
        "ratio_round_s": ratio(r["round_s"], d["round_s"]),
        "direct_allreduce_s": d["allreduce_s"],
        "relayed_allreduce_s": r["allreduce_s"],
        "ratio_allreduce_s": ratio(r["allreduce_s"], d["allreduce_s"]),
        "direct_bytes_per_peer": d["bytes_per_peer"],
        "relayed_bytes_per_peer": r["bytes_per_peer"],
        "ratio_bytes_per_peer": ratio(r["bytes_per_peer"], d["bytes_per_peer"]),
        "relay_bytes_per_round": r["relay_bytes_per_round"],
        "direct_relay_bytes_per_round": d["relay_bytes_per_round"],
        "relay_cpu_s_per_round": r["relay_cpu_s_per_round"],
        "rounds_succeeded_direct": d["rounds_succeeded"],
        "rounds_succeeded_relayed": r["rounds_succeeded"],
        "mismatched_elements": sum(bad) if len(bad) == 2 else None,
        "wall_s": wall,
        "direct": d,
        "relayed": r,
    }


def _fmt(value: Any, digits: int = 3, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value / scale:.{digits}f}"
    return str(value)


def print_table(out: dict[str, Any]) -> None:
    limits = (
        "RelayLimits() as shipped (8 MiB/s per circuit, 32 MiB/s total)"
        if out["relay_limits"] == "default"
        else "unthrottled (pacing at 1e15 B/s: never holds a byte back)"
    )
    print(
        f"relay benchmark: {out['peers']} peers, {out['floats']} float32 "
        f"({out['floats'] * 4 / 1e6:.1f} MB), grid {out['grid']}, {out['rounds']} rounds "
        f"after {out['warmup']} warmup, {out['cores']} cores"
    )
    print(f"relay limits: {limits}")
    rows = [
        ("round s (median)", "round_s", 3, 1.0),
        ("round s (worst)", "round_worst_s", 3, 1.0),
        ("  matchmaking s", "matchmaking_s", 3, 1.0),
        ("  all-reduce s", "allreduce_s", 3, 1.0),
        ("wall s per round", "wall_s_per_round", 3, 1.0),
        ("MB per peer (report)", "bytes_per_peer", 2, 1e6),
        ("MB per peer (its sockets)", "link_bytes_per_peer", 2, 1e6),
        ("relay MB per round", "relay_bytes_per_round", 2, 1e6),
        ("relay CPU s per round", "relay_cpu_s_per_round", 3, 1.0),
        ("peers' CPU s per round", "peers_cpu_s_per_round", 3, 1.0),
        ("rounds succeeded", "rounds_succeeded", 0, 1.0),
        ("mismatched elements", "mismatched_elements", 0, 1.0),
        ("direct links (peer pairs)", "direct_links", 0, 1.0),
    ]
    d, r = out["direct"], out["relayed"]
    print(f"{'':28}{'direct':>12}{'relayed':>12}{'ratio':>9}")
    for label, key, digits, scale in rows:
        rat = ratio(r.get(key), d.get(key)) if key in ("round_s", "allreduce_s") else None
        if key in ("bytes_per_peer", "link_bytes_per_peer", "round_worst_s", "wall_s_per_round"):
            rat = ratio(r.get(key), d.get(key))
        print(
            f"{label:28}{_fmt(d.get(key), digits, scale):>12}{_fmt(r.get(key), digits, scale):>12}"
            f"{_fmt(rat, 2):>9}"
        )
    for arm in ARMS:
        if out[arm]["error"]:
            print(f"{arm} FAILED: {out[arm]['error']}")
    print(f"wall {out['wall_s']:.1f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--peers", type=int, default=4)
    ap.add_argument("--floats", type=int, default=4_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--grid", choices=("fixed", "auto"), default="fixed")
    ap.add_argument("--timeout", type=float, default=60.0, help="each step's timeout (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--default-limits", action="store_true", help="RelayLimits() as shipped")
    ap.add_argument("--deadline", type=float, default=1800.0, help="the whole run's limit (s)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ap.add_argument("--out", type=Path, help="also write the JSON object here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines, no child stderr")
    ap.add_argument("--log", help="the peers' log level (debug, info, ...; warnings by default)")
    ap.add_argument("--role", choices=("relay",), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role is None:
        if args.peers < 2:
            ap.error("--peers must be at least 2 (a round needs a group)")
        if args.floats < 1:
            ap.error("--floats must be at least 1")
        if args.rounds < 1 or args.warmup < 0:
            ap.error("--rounds must be >= 1 and --warmup >= 0")
        if not (args.timeout > 0 and math.isfinite(args.timeout)):
            ap.error("--timeout must be positive seconds")
        if args.grid == "auto" and args.peers > 16:
            ap.error("--grid auto puts at most 16 peers in one group; use --grid fixed")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "relay":
        _relay_child(json.loads(args.spec))
        return 0
    settings = Settings(
        peers=args.peers,
        floats=args.floats,
        rounds=args.rounds,
        warmup=args.warmup,
        grid=args.grid,
        timeout=args.timeout,
        seed=args.seed,
        default_limits=args.default_limits,
        quiet=args.quiet,
        deadline=time.monotonic() + args.deadline,
    )
    if args.log:
        from moshpit_trio.log import configure_logging

        configure_logging("console", args.log)
    started = time.monotonic()
    results = trio.run(run_all, settings)
    out = build_output(settings, results, time.monotonic() - started)
    text = json.dumps(out, indent=None if args.json else 2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0 if all(out[a]["error"] is None for a in ARMS) else 1


if __name__ == "__main__":
    sys.exit(main())
