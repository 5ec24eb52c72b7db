"""All-reduce: Moshpit rounds of N real processes against torch.distributed's gloo (and hivemind).

N OS processes on 127.0.0.1, each holding a float32 vector of ``--floats`` elements, average
their vectors ``--rounds`` times (after ``--warmup`` untimed rounds). Arms (``--arms``):

``moshpit``   each process is an ``open_peer`` with one ``MoshpitAverager`` over its vector, in
              one group of N: grid ``(N,)`` (d = 1, so the group key is empty and every peer
              announces under the same DHT key each round). Process 0's peer is the others'
              bootstrap. A round is ``averager.step()``: matchmaking over the DHT, then the
              butterfly all-reduce over encrypted websocket streams.
``gloo``      ``torch.distributed`` with the gloo backend, N fresh processes with the same data:
              ``all_reduce(SUM)`` of a float32 tensor of the same size, then ``/= N``.
``hivemind``  (``--with-hivemind``, and only if ``import hivemind`` works; see below) hivemind's
              ``DecentralizedAverager`` with ``target_group_size = min_group_size = N``, its
              other settings as they come; process 0's DHT is the others' initial peer.
``floor``     (opt-in: ``--arms moshpit,gloo,floor``; not with ``--links``) a yardstick, not a
              protocol: the same butterfly in plain Python with blocking sockets, one
              receiving thread per peer, AES-256-GCM over 4 MiB chunks opened straight into
              place, float64 sums, the averager's copy of the vector; scatter then gather, no
              matchmaking, framing or checks. What a data plane in Python could cost on this
              machine: ``ratio_vs_floor`` is the moshpit arm's overhead over it.

Timing. Every round starts at a wall-clock instant the orchestrating process sends to all N
(``--lead`` seconds ahead, so each has its line read and is asleep until then); each process
measures from that instant to the end of its own step. A round's time is the slowest process's;
the figure reported is the median of that over the timed rounds. ``moshpit_round_s`` includes
matchmaking; ``moshpit_allreduce_s`` is the all-reduce stage alone (``RoundReport.seconds
["allreduce"]``, again the slowest process's, median over rounds).

Correctness is checked in every round: process i starts each round from
``v_i = base * (i + 1) + i`` (``base[k] = (k mod 997) / 997``), so the mean is known exactly;
after the round (once all N have ended it, so that no check takes CPU from a process still in
its round) every process compares its vector with the mean (tolerance by codec), and
moshpit (whatever the codec) and gloo processes must all hold exactly the same vector (equal
float64 checksums; hivemind applies the average to each local tensor as a delta, so its peers
differ in the last bit and only the tolerance applies). Failures are counted per (round,
process) and reported; a moshpit round that did not form the full group of N, or left a span
unaveraged, is a failure too. ``CPU s`` is the CPU time (user + system, all threads) of all N
processes per round (not for hivemind, which averages in a child process of its own): with N
processes on fewer cores, a round cannot take less than ``CPU s / cores``.

    python benchmarks/allreduce.py                           # N=4, 10M floats: table
    python benchmarks/allreduce.py --json                    # one JSON object on stdout
    python benchmarks/allreduce.py --with-hivemind --hivemind-python /path/to/venv/bin/python
    python benchmarks/allreduce.py --arms moshpit --profile benchmarks/results/allreduce-prof

hivemind is never a dependency of this project. ``--with-hivemind`` runs it with
``--hivemind-python`` (default: this interpreter) if ``import hivemind`` works there, and
reports ``hivemind_s: null`` with the reason otherwise. A separate environment that sees this
one's torch works: ``python -m venv H; echo $(python -c 'import site;
print(site.getsitepackages()[0])') > H/lib/python3.11/site-packages/main.pth; H/bin/pip install
hivemind``.

``--profile DIR`` runs moshpit process 0 under cProfile during the timed rounds, counting CPU
time (not wall time: the processes share the cores), dumps ``DIR/moshpit-0.prof`` and prints
the CPU per round by category; every function's own time is in exactly one category. The
profiler's own cost (a CPU-clock read per call and return) lands mostly on the many small
calls (trio scheduling, websocket framing), so compare those with the unprofiled ``CPU s``.

``--chunk-kib`` / ``--window-mib`` set the moshpit transport's stream chunk and window (to
measure them; the library's defaults otherwise).

``--links SPEC`` runs every process of both arms (moshpit and gloo; not hivemind) in a network
namespace of its own, joined to a hub namespace's bridge by a veth pair shaped with ``tc tbf``
at that peer's rate in both directions (its upload and its download): ``--links 1gbit`` gives
every peer the same link, ``--links 100mbit,250mbit,500mbit,1gbit`` one rate per peer (tc's
units: bit, kbit, mbit, gbit). Each moshpit peer announces its link rate as its bandwidth, and
its span is sized from it (``partition.spans``: the slowest links may get none); it paces its
sends to it (``MoshpitAverager(pace=True)``: the link rate is known here) unless ``--no-pace``.
Beside each arm it prints the physical lower bound: the payload bytes each peer must move over
its own link, at that link's rate, for the slowest peer (moshpit's butterfly over its spans:
``floats - n_i + (N - 1) n_i`` values each way for a span of ``n_i``; gloo's ring: ``2 (N - 1) / N``
of the vector each way, in lockstep, so at the slowest link's rate; TCP/IP headers, some 3%
more, are not counted), and the bytes the busiest
peer's link actually carried per timed round (its interface counters, in the heavier
direction). Needs root, ``ip`` and ``tc`` with tbf; otherwise it says why and exits with 2.
Every namespace it creates it removes, whatever happens; addresses are 10.215.15.x inside them.

JSON keys: ``peers``, ``floats``, ``rounds``, ``cores``, ``chunk_bytes`` and ``window_bytes``
(null: the library's defaults), ``paced`` (moshpit paced its sends), ``moshpit_round_s``,
``moshpit_matchmaking_s``, ``moshpit_allreduce_s``, ``gloo_s``, ``ratio_vs_gloo`` (round /
gloo), ``allreduce_ratio_vs_gloo``, ``hivemind_s`` (null when not run), ``hivemind_note``,
``speedup_vs_hivemind`` (hivemind / round), ``floor_s``, ``floor_ratio_vs_gloo`` and
``ratio_vs_floor`` (round / floor; null without the floor arm), ``failures`` (per arm),
``targets``, ``profile``
(with ``--profile``) and ``arms`` with every round's figures. With ``--links``: ``links``
(the rates in bit/s, ``moshpit_bound_s``, ``moshpit_phased_bound_s`` (see ``lower_bounds``),
``gloo_bound_s``) and, per arm, ``moved_mb`` (each
peer's link, MB per timed round up and down). Targets at N=4 and 10M floats:
ratio_vs_gloo <= 2.5, speedup_vs_hivemind >= 3; with ``--links 1gbit`` <= 1.15, with
``--links 100mbit,250mbit,500mbit,1gbit`` <= 0.8.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import itertools
import json
import math
import os
import pstats
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

HOST = "127.0.0.1"
ARMS = ("moshpit", "gloo", "hivemind", "floor")
_BASE_PERIOD = 997
_START_TIMEOUT = 60.0  # a child must be up (peer open, process group formed) within this
_TARGET_RATIO = 2.5
_TARGET_HIVEMIND = 3.0
# --links: all links equal, moshpit within 15% of gloo; mixed links, faster than gloo (a ring
# waits on its slowest link; spans sized for the links need not)
_TARGET_LINKS_EQUAL = 1.15
_TARGET_LINKS_MIXED = 0.8


# --------------------------------------------------------------------------------------------
# The data every process starts each round from, and the check of what it ends with.


def initial_values(rank: int, floats: int) -> np.ndarray:
    """``v_rank = base * (rank + 1) + rank`` as float32 (exact: small integers over 997)."""
    base = (np.arange(floats, dtype=np.int64) % _BASE_PERIOD).astype(np.float64) / _BASE_PERIOD
    return (base * (rank + 1) + rank).astype(np.float32)


def expected_mean(peers: int, floats: int) -> np.ndarray:
    """The exact mean of every ``initial_values`` (computed in float64, rounded once)."""
    base = (np.arange(floats, dtype=np.int64) % _BASE_PERIOD).astype(np.float64) / _BASE_PERIOD
    return (base * (peers + 1) / 2 + (peers - 1) / 2).astype(np.float32)


def tolerance(codec: str, peers: int) -> float:
    """Largest absolute error a correct round can leave, by codec (see compression.py)."""
    biggest = 2.0 * peers  # |v| < peers + peers
    if codec == "fp16":
        return 3 * 2.0**-11 * biggest  # a part and a result each rounded to half precision
    if codec == "8bit":
        return (peers + 1) / 400  # half a step of each part's block and of the result's block
    return 4 * 2.0**-24 * biggest  # float64 sums rounded once to float32, plus slack


# The check runs block by block: whole-vector float64 temporaries (80 MB at 10M floats) are
# fresh mmaps, and the kernel zeroing their pages cost more CPU than a round; a process that
# finished its round early would take that CPU from the others still in theirs.
_CHECK_BLOCK = 1 << 18


def check(values: np.ndarray, expected: np.ndarray, tol: float) -> dict[str, Any]:
    error = 0.0
    for start in range(0, len(values), _CHECK_BLOCK):
        block = values[start : start + _CHECK_BLOCK].astype(np.float64)
        block -= expected[start : start + _CHECK_BLOCK]
        error = max(error, float(np.max(np.abs(block))))
    return {
        "max_error": error,
        "checksum": float(np.sum(values, dtype=np.float64)),
        "ok": bool(error <= tol and math.isfinite(error)),
    }


# --------------------------------------------------------------------------------------------
# Child processes: one line of JSON per message each way. The parent writes {"op": "go", "at":
# unix_time, "timed": bool} or {"op": "stop"}; the child answers "ready" once, then per round
# "timed" when its round ended, and, once the parent has sent "check" (every process ended the
# round), the result. stdout is kept for these lines only (anything else printing goes to stderr).


class Control:
    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # stray prints (libraries, logs) must not corrupt the protocol
        self._in = sys.stdin

    def send(self, **message: Any) -> None:
        self._out.write(json.dumps(message) + "\n")
        self._out.flush()

    def recv(self) -> dict[str, Any]:
        line = self._in.readline()
        if not line:
            return {"op": "stop"}  # the parent went away
        parsed: dict[str, Any] = json.loads(line)
        return parsed

    def recv_check(self) -> None:
        """Wait for the parent's word that every process has ended the round (then, and only
        then, this one checks its values)."""
        message = self.recv()
        if message["op"] != "check":
            raise RuntimeError(f"expected 'check' from the parent, got {message['op']!r}")


def _wait_until(at: float) -> float:
    """Sleep until unix time ``at``; returns how late we already were (seconds)."""
    delay = at - time.time()
    if delay > 0:
        time.sleep(delay)
        return 0.0
    return -delay


class _Profiler:
    """cProfile for the timed rounds only (enabled around each of them), or nothing.

    It counts CPU time (``time.process_time``), not wall time: four processes share two cores
    here, and wall time inside a function would include the time another process had the core.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.profile = cProfile.Profile(time.process_time) if path else None

    @contextlib.contextmanager
    def timed(self, on: bool) -> Iterator[None]:
        if self.profile is None or not on:
            yield
            return
        self.profile.enable()
        try:
            yield
        finally:
            self.profile.disable()

    def dump(self) -> None:
        if self.profile is not None and self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.profile.dump_stats(self.path)


def _moshpit_child(spec: dict[str, Any], ctl: Control, profiler: _Profiler) -> None:
    import trio

    from moshpit_trio import Identity, open_peer
    from moshpit_trio.averaging.averager import MoshpitAverager

    rank, peers, floats = spec["rank"], spec["peers"], spec["floats"]
    init = initial_values(rank, floats)
    expected = expected_mean(peers, floats)
    tol = tolerance(spec["compression"], peers)
    vec = init.copy()

    async def main() -> None:
        with trio.fail_after(spec["child_deadline"]):
            await session()

    async def session() -> None:
        limits = None
        if spec.get("chunk") or spec.get("window"):
            from moshpit_trio.wire.connection import ConnectionLimits
            from moshpit_trio.wire.transport import TransportLimits

            default = ConnectionLimits()
            limits = TransportLimits(
                connection=ConnectionLimits(
                    stream_chunk=spec.get("chunk") or default.stream_chunk,
                    stream_window=spec.get("window") or default.stream_window,
                )
            )
        host = spec.get("host") or HOST
        async with open_peer(
            Identity.generate(), listen=f"{host}:0", bootstrap=spec["bootstrap"], limits=limits
        ) as peer:
            averager = MoshpitAverager(
                peer,
                "bench",
                [vec],
                grid=(peers,),
                initial_key=(),
                compression=spec["compression"],
                **({"bandwidth": spec["bandwidth"]} if spec.get("bandwidth") else {}),
                pace=bool(spec.get("pace")),
            )
            async with averager:
                ctl.send(op="ready", address=str(peer.address))
                while True:
                    msg = await trio.to_thread.run_sync(ctl.recv, abandon_on_cancel=True)
                    if msg["op"] != "go":
                        break
                    at = msg["at"]
                    late = max(0.0, time.time() - at)
                    if late == 0.0:
                        await trio.sleep(at - time.time())
                    cpu = time.process_time()
                    with profiler.timed(msg["timed"]):
                        report = await averager.step(timeout=spec["step_timeout"])
                    seconds = time.time() - at
                    cpu = time.process_time() - cpu
                    ctl.send(op="timed")
                    await trio.to_thread.run_sync(ctl.recv_check, abandon_on_cancel=True)
                    result = check(vec, expected, tol)
                    np.copyto(vec, init)  # the next round starts from v_rank again
                    ctl.send(
                        op="result",
                        seconds=seconds,
                        cpu=cpu,
                        late=late,
                        stages=report.seconds,
                        group=len(report.members),
                        succeeded=report.succeeded,
                        bytes_sent=report.bytes_sent,
                        **result,
                    )

    trio.run(main)


def _serve_rounds(
    ctl: Control,
    profiler: _Profiler,
    average: Callable[[], object],
    values: Callable[[], np.ndarray],
    reset: Callable[[], object],
    expected: np.ndarray,
    tol: float,
) -> None:
    """A synchronous child's rounds, until the orchestrator says anything but "go": wait for
    the shared start, ``average()`` (timed; its CPU counted, all threads), say so, and once
    told to, check ``values()`` against the mean and ``reset()`` for the next round."""
    while True:
        msg = ctl.recv()
        if msg["op"] != "go":
            break
        late = _wait_until(msg["at"])
        cpu = time.process_time()
        with profiler.timed(msg["timed"]):
            average()
        seconds = time.time() - msg["at"]
        cpu = time.process_time() - cpu
        ctl.send(op="timed")
        ctl.recv_check()
        result = check(values(), expected, tol)
        reset()
        ctl.send(op="result", seconds=seconds, cpu=cpu, late=late, succeeded=True, **result)


def _gloo_child(spec: dict[str, Any], ctl: Control, profiler: _Profiler) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, peers, floats = spec["rank"], spec["peers"], spec["floats"]
    init = torch.from_numpy(initial_values(rank, floats))
    expected = expected_mean(peers, floats)
    tol = tolerance("none", peers)
    if spec.get("ifname"):  # in a namespace of its own: gloo must use the shaped link
        os.environ["GLOO_SOCKET_IFNAME"] = spec["ifname"]
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{spec.get('store_host') or HOST}:{spec['port']}",
        rank=rank,
        world_size=peers,
        timeout=datetime.timedelta(seconds=spec["step_timeout"]),
    )
    try:
        tensor = init.clone()
        dist.barrier()
        ctl.send(op="ready")

        def average() -> None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(peers)  # in place, as `/=` does

        _serve_rounds(
            ctl, profiler, average, tensor.numpy, lambda: tensor.copy_(init), expected, tol
        )
    finally:
        dist.destroy_process_group()


def _hivemind_child(spec: dict[str, Any], ctl: Control, profiler: _Profiler) -> None:
    import hivemind
    import torch

    torch.set_num_threads(1)
    rank, peers, floats = spec["rank"], spec["peers"], spec["floats"]
    init = torch.from_numpy(initial_values(rank, floats))
    expected = expected_mean(peers, floats)
    tol = tolerance("none", peers)
    dht = hivemind.DHT(
        start=True,
        host_maddrs=[f"/ip4/{HOST}/tcp/0"],
        initial_peers=spec["bootstrap"],
    )
    averager = None
    try:
        averager = hivemind.DecentralizedAverager(
            [init.clone()],
            dht,
            prefix="bench",
            target_group_size=peers,
            min_group_size=peers,
            start=True,
        )
        ctl.send(op="ready", address=[str(a) for a in dht.get_visible_maddrs()])
        while True:
            msg = ctl.recv()
            if msg["op"] != "go":
                break
            late = _wait_until(msg["at"])
            with profiler.timed(msg["timed"]):
                gathered = averager.step(timeout=spec["step_timeout"])
            seconds = time.time() - msg["at"]
            cpu = None  # hivemind averages in a background process of its own
            ctl.send(op="timed")
            ctl.recv_check()
            with averager.get_tensors() as tensors:
                result = check(tensors[0].numpy(), expected, tol)
                tensors[0].copy_(init)
            ctl.send(
                op="result",
                seconds=seconds,
                cpu=cpu,
                late=late,
                succeeded=gathered is not None and len(gathered) == peers,
                group=0 if gathered is None else len(gathered),
                **result,
            )
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


# The floor arm: what this machine allows a Python process at all, without an event loop.
_FLOOR_CHUNK = 4 * 1024 * 1024  # bytes sealed at a time, as the transport's stream chunk
_FLOOR_BLOCK = 1 << 17  # values averaged at a time, as the reducer's block


def _floor_key(sender: int, receiver: int) -> bytes:
    """One AES-256 key per direction of each pair (derived, not secret: a yardstick)."""
    return hashlib.sha256(b"allreduce floor %d>%d" % (sender, receiver)).digest()


def _floor_child(spec: dict[str, Any], ctl: Control, profiler: _Profiler) -> None:
    """The same butterfly with as little as Python can do: blocking sockets, one receiving
    thread per peer (the GIL is let go in recv_into, AES and numpy), AES-256-GCM over 4 MiB
    chunks sealed with ``encrypt_into`` and opened with ``decrypt_into`` straight into their
    final place, float64 sums in the reducer's order, and the averager's copy of the vector
    first. Scatter, then gather, with no overlap, no matchmaking, no framing, no checks of
    what arrives beyond the AEAD tag. Not a protocol: what a data plane in Python could cost
    here, to weigh the moshpit arm's overhead against."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    rank, peers, floats = spec["rank"], spec["peers"], spec["floats"]
    init = initial_values(rank, floats)
    expected = expected_mean(peers, floats)
    tol = tolerance("none", peers)
    ports: list[int] = spec["ports"]
    bounds = [floats * i // peers for i in range(peers + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])
    others = [j for j in range(peers) if j != rank]
    listener = socket.create_server((HOST, ports[rank]))
    conns: dict[int, socket.socket] = {}
    try:
        give_up = time.monotonic() + _START_TIMEOUT
        for j in range(rank):  # dial the lower ranks, accept the higher ones
            while True:
                try:
                    sock = socket.create_connection((HOST, ports[j]), timeout=1.0)
                    break
                except OSError:
                    if time.monotonic() > give_up:
                        raise
                    time.sleep(0.05)
            sock.sendall(rank.to_bytes(4, "big"))
            conns[j] = sock
        listener.settimeout(_START_TIMEOUT)
        while len(conns) < peers - 1:
            sock, _ = listener.accept()
            conns[int.from_bytes(_recv_exactly(sock, 4), "big")] = sock
        for sock in conns.values():
            sock.settimeout(spec["step_timeout"])
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seal = {j: AESGCM(_floor_key(rank, j)) for j in others}
        opener = {j: AESGCM(_floor_key(j, rank)) for j in others}
        vec = init.copy()
        parts = {j: np.empty(bounds[rank + 1] - bounds[rank], np.float32) for j in others}
        sealed = bytearray(_FLOOR_CHUNK + 16)
        inbox = {j: bytearray(_FLOOR_CHUNK + 16) for j in others}
        acc = np.empty(_FLOOR_BLOCK, np.float64)
        tmp = np.empty_like(acc)

        def send(j: int, values: np.ndarray, stage: int, round_: int) -> None:
            data = memoryview(values).cast("B")
            for k, at in enumerate(range(0, len(data), _FLOOR_CHUNK)):
                piece = data[at : at + _FLOOR_CHUNK]
                out = memoryview(sealed)[: len(piece) + 16]
                seal[j].encrypt_into(_floor_nonce(round_, stage, k), piece, None, out)
                conns[j].sendall(out)

        def receive(j: int, into: np.ndarray, stage: int, round_: int) -> None:
            data = memoryview(into).cast("B")
            for k, at in enumerate(range(0, len(data), _FLOOR_CHUNK)):
                piece = data[at : at + _FLOOR_CHUNK]
                got = memoryview(inbox[j])[: len(piece) + 16]
                _recv_into_exactly(conns[j], got)
                opener[j].decrypt_into(_floor_nonce(round_, stage, k), got, None, piece)

        def exchange(
            stage: int,
            round_: int,
            outgoing: dict[int, np.ndarray],
            incoming: dict[int, np.ndarray],
        ) -> None:
            errors: list[BaseException] = []

            def take(j: int) -> None:
                try:
                    receive(j, incoming[j], stage, round_)
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            readers = [threading.Thread(target=take, args=(j,)) for j in others]
            for reader in readers:
                reader.start()
            try:
                for j in others:
                    send(j, outgoing[j], stage, round_)
            finally:
                for reader in readers:
                    reader.join()
            if errors:
                raise errors[0]

        ctl.send(op="ready")
        rounds = itertools.count()

        def average() -> None:
            round_ = next(rounds)
            flat = vec.copy()  # the averager's copy of the vector it averages
            exchange(0, round_, {j: flat[bounds[j] : bounds[j + 1]] for j in others}, parts)
            senders = [flat[mine] if k == rank else parts[k] for k in range(peers)]
            ours = vec[mine]
            for lo in range(0, len(ours), _FLOOR_BLOCK):
                hi = min(lo + _FLOOR_BLOCK, len(ours))
                a, t = acc[: hi - lo], tmp[: hi - lo]
                a[...] = senders[0][lo:hi]
                for values in senders[1:]:
                    t[...] = values[lo:hi]
                    a += t
                a *= 1.0 / peers
                ours[lo:hi] = a
            theirs = {j: vec[bounds[j] : bounds[j + 1]] for j in others}
            exchange(1, round_, dict.fromkeys(others, ours), theirs)

        def reset() -> None:
            vec[...] = init

        _serve_rounds(ctl, profiler, average, lambda: vec, reset, expected, tol)
    finally:
        for sock in conns.values():
            sock.close()
        listener.close()


def _floor_nonce(round_: int, stage: int, chunk: int) -> bytes:
    return round_.to_bytes(6, "big") + bytes([stage]) + chunk.to_bytes(5, "big")


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into_exactly(sock, memoryview(buf))
    return bytes(buf)


def _recv_into_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("peer closed the connection mid-message")
        got += n


_CHILDREN: dict[str, Callable[[dict[str, Any], Control, _Profiler], None]] = {
    "moshpit": _moshpit_child,
    "gloo": _gloo_child,
    "hivemind": _hivemind_child,
    "floor": _floor_child,
}


def _child_main(role: str, spec_text: str) -> int:
    spec = json.loads(spec_text)
    ctl = Control()
    profiler = _Profiler(spec.get("profile"))
    try:
        _CHILDREN[role](spec, ctl, profiler)
    except Exception as exc:
        ctl.send(op="error", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        profiler.dump()
    return 0


# --------------------------------------------------------------------------------------------
# --links: every process in a network namespace of its own, behind a tbf-shaped link.

_LINK_SUBNET = "10.215.15"
_GLOO_PORT = 29500  # free in rank 0's fresh namespace
# tc's rate units, in bits per second
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_links(text: str, peers: int) -> list[float]:
    """``--links``: one rate for every peer, or one per peer; bits per second each."""
    rates = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*", part.lower())
        if found is None or found.group(2) not in _RATE_UNITS or float(found.group(1)) <= 0:
            raise ValueError(
                f"{part.strip()!r} is not a rate like 100mbit (units: {', '.join(_RATE_UNITS)})"
            )
        rates.append(float(found.group(1)) * _RATE_UNITS[found.group(2)])
    if len(rates) == 1:
        return rates * peers
    if len(rates) != peers:
        raise ValueError(f"{len(rates)} rates for {peers} peers: give one, or one per peer")
    return rates


def links_unusable() -> str | None:
    """None when this process can make namespaces and shape links; otherwise why not."""
    if os.geteuid() != 0:
        return (
            f"--links needs root (this is uid {os.geteuid()}): it creates network namespaces "
            "and shapes their links with tc"
        )
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"--links needs {' and '.join(missing)} (iproute2), not found on PATH"
    return None


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LinksFailed(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


class LinksFailed(RuntimeError):
    pass


class Links:
    """A hub namespace with a bridge, and one namespace per peer joined to it by a veth pair.
    Both ends of peer i's pair are shaped with tbf at its rate: its upload leaves through its
    own end, its download through the hub's. :meth:`close` removes every namespace it made
    (deleting a namespace deletes the links in it)."""

    def __init__(self, rates: list[float]) -> None:
        tag = os.getpid() % 100000
        self.rates = rates
        self.hub = f"mpbh{tag}"
        self.names = [f"mpbp{tag}x{i}" for i in range(len(rates))]
        self.ifnames = [f"mpbi{tag}x{i}" for i in range(len(rates))]
        self.addresses = [f"{_LINK_SUBNET}.{i + 1}" for i in range(len(rates))]
        self._made: list[str] = []

    def open(self) -> None:
        try:
            self._add(self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                inside, rate = self.ifnames[i], self.rates[i]
                outside = inside.replace("mpbi", "mpbo")
                self._add(ns)
                _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
                _run("ip", "link", "set", inside, "netns", ns)
                _run("ip", "link", "set", outside, "netns", self.hub)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", inside)
                _run("ip", "-n", ns, "link", "set", inside, "up")
                _run("ip", "-n", self.hub, "link", "set", outside, "master", "br0")
                _run("ip", "-n", self.hub, "link", "set", outside, "up")
                self._shape(ns, inside, rate)
                self._shape(self.hub, outside, rate)
        except BaseException:
            self.close()
            raise

    def _add(self, ns: str) -> None:
        _run("ip", "netns", "add", ns)
        self._made.append(ns)

    @staticmethod
    def _shape(ns: str, dev: str, rate: float) -> None:
        # burst: 10 ms at the rate (at least 64 KiB), so the kernel's timer granularity does not
        # cap the rate; latency bounds the queue, as a real link's buffer would.
        burst = max(64 * 1024, int(rate / 8 / 100))
        _run(
            *("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf"),
            *("rate", f"{int(rate)}bit", "burst", str(burst), "latency", "50ms"),
        )

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a process in peer ``i``'s namespace."""
        return ["ip", "netns", "exec", self.names[i]]

    def counters(self) -> list[tuple[int, int]]:
        """Bytes sent and received so far on each peer's link (its own end of the pair)."""
        out = []
        for ns, dev in zip(self.names, self.ifnames, strict=True):
            stats = json.loads(_run("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))
            out.append(
                (int(stats[0]["stats64"]["tx"]["bytes"]), int(stats[0]["stats64"]["rx"]["bytes"]))
            )
        return out

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()


def lower_bounds(peers: int, floats: int, rates: list[float]) -> dict[str, float]:
    """Seconds the slowest peer needs to move the payload its arm must move over its link.

    moshpit: member i reduces a span of ``n_i`` values (``partition.spans`` of the rates):
    it sends its part of every other span and its average to the N - 1 others, and receives as
    much, ``floats - n_i + (N - 1) n_i`` values each way. gloo's ring moves ``2 (N - 1) / N``
    of the vector each way per peer in N - 1 lockstep steps, so at the slowest link's rate.

    ``moshpit_phased``: the same bytes, but as the butterfly moved them before its reducers
    streamed their averages range by range, in two phases one after the other (a reducer
    averaged once every part was in): scatter (up: its parts,
    ``floats - n_i``; down: the parts of its span, ``(N - 1) n_i``), then gather (the reverse).
    Each phase lasted as long as its slowest peer, so a peer with a slow link could not overlap its
    upload (scatter) with its download (gather).
    """
    from moshpit_trio.averaging.partition import spans as make_spans

    spans = make_spans(floats, [r / 8 for r in rates])
    sizes = [e - s for s, e in spans]
    moshpit = max(
        8 * 4 * (floats - n + (peers - 1) * n) / rate for n, rate in zip(sizes, rates, strict=True)
    )
    phase = max(
        8 * 4 * max(floats - n, (peers - 1) * n) / rate
        for n, rate in zip(sizes, rates, strict=True)
    )
    gloo = 8 * 4 * floats * 2 * (peers - 1) / peers / min(rates)
    return {"moshpit": moshpit, "moshpit_phased": 2 * phase, "gloo": gloo}


# --------------------------------------------------------------------------------------------
# Orchestrator.


class ArmFailed(RuntimeError):
    pass


def _end_all(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """End children we started, all at once: close their stdin (they stop at the next round),
    give them ``grace`` seconds, then terminate, then kill whatever is left."""
    for proc in procs:
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
    for signal_them, wait in ((None, grace), ("terminate", 3.0), ("kill", 5.0)):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for proc in alive:
            if signal_them == "terminate":
                proc.terminate()
            elif signal_them == "kill":
                proc.kill()
        until = time.monotonic() + wait
        for proc in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(until - time.monotonic(), 0.01))
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(message).encode() + b"\n")
    proc.stdin.flush()


def _read(proc: subprocess.Popen[bytes], deadline: float, what: str) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0))
    line = proc.stdout.readline() if ready else b""
    if not line:
        why = f"exited with {proc.poll()}" if ready else "timed out"
        raise ArmFailed(f"{what}: a process {why} (see its stderr)")
    message: dict[str, Any] = json.loads(line)
    if message.get("op") == "error":
        raise ArmFailed(f"{what}: {message['error']}")
    return message


def _expect(proc: subprocess.Popen[bytes], deadline: float, what: str, op: str) -> dict[str, Any]:
    message = _read(proc, deadline, what)
    if message.get("op") != op:
        raise ArmFailed(f"{what}: expected {op!r} from a process, got {message.get('op')!r}")
    return message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def run_arm(
    arm: str,
    *,
    peers: int,
    floats: int,
    rounds: int,
    warmup: int,
    compression: str,
    lead: float,
    step_timeout: float,
    deadline: float,
    profile_dir: Path | None,
    quiet: bool,
    python: str = sys.executable,
    chunk: int | None = None,
    window: int | None = None,
    links: Links | None = None,
    pace: bool = False,
) -> dict[str, Any]:
    """Start ``peers`` processes of ``arm``, run the rounds, end every process whatever happens.
    With ``links``, each in its own namespace (see ``Links``)."""
    base = {
        "peers": peers,
        "floats": floats,
        "compression": compression,
        "step_timeout": step_timeout,
        "child_deadline": max(deadline - time.monotonic(), 1.0) + 10.0,
        "chunk": chunk,
        "window": window,
        "pace": pace,
    }
    if arm == "gloo":
        base["port"] = _GLOO_PORT if links else _free_port()
        base["store_host"] = links.addresses[0] if links else HOST
    if arm == "floor":
        base["ports"] = [_free_port() for _ in range(peers)]
    procs: list[subprocess.Popen[bytes]] = []
    stderr = subprocess.DEVNULL if quiet else None

    def start(rank: int, bootstrap: list[str]) -> None:
        spec = {**base, "rank": rank, "bootstrap": bootstrap}
        if profile_dir is not None and arm == "moshpit" and rank == 0:
            spec["profile"] = str(profile_dir / f"{arm}-{rank}.prof")
        cmd = [python, str(Path(__file__).resolve()), "--role", arm]
        if links is not None:
            spec["host"] = links.addresses[rank]
            spec["ifname"] = links.ifnames[rank]
            spec["bandwidth"] = links.rates[rank] / 8  # bytes/s, for moshpit's spans
            cmd = [*links.prefix(rank), *cmd]
        procs.append(
            subprocess.Popen(
                [*cmd, "--spec", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
            )
        )

    finished = False
    try:
        start_by = min(deadline, time.monotonic() + _START_TIMEOUT)
        start(0, [])
        bootstrap: list[str] = []
        if arm not in ("gloo", "floor"):  # these ranks meet at known ports instead
            first = _read(procs[0], start_by, f"{arm} start")
            address = first["address"]
            bootstrap = address if isinstance(address, list) else [address]
        for rank in range(1, peers):
            start(rank, bootstrap)
        for proc in procs[0 if arm in ("gloo", "floor") else 1 :]:
            _read(proc, start_by, f"{arm} start")

        per_round: list[list[dict[str, Any]]] = []
        counted: list[tuple[int, int]] = []
        for r in range(warmup + rounds):
            if r == warmup and links is not None:
                counted = links.counters()
            at = time.time() + lead
            for proc in procs:
                _send(proc, {"op": "go", "at": at, "timed": r >= warmup})
            # Every process has ended its round before any checks its values (the check is
            # the benchmark's, not the arm's: run early, it would take CPU from a process
            # still in the round).
            for proc in procs:
                _expect(proc, deadline, f"{arm} round {r}", "timed")
            for proc in procs:
                _send(proc, {"op": "check"})
            results = [_expect(proc, deadline, f"{arm} round {r}", "result") for proc in procs]
            if r >= warmup:
                per_round.append(results)
        moved = None
        if links is not None:
            moved = [
                {"up": (tx - tx0) / rounds / 1e6, "down": (rx - rx0) / rounds / 1e6}
                for (tx, rx), (tx0, rx0) in zip(links.counters(), counted, strict=True)
            ]
        for proc in procs:
            _send(proc, {"op": "stop"})
        finished = True
        expected = float(np.sum(expected_mean(peers, floats), dtype=np.float64))
        summary = summarize(arm, per_round, expected)
        if moved is not None:
            summary["moved_mb"] = moved
        return summary
    finally:
        _end_all(procs, grace=10.0 if finished else 0.0)


def summarize(
    arm: str, per_round: list[list[dict[str, Any]]], expected_checksum: float
) -> dict[str, Any]:
    """Per round: the slowest process; then medians over rounds. Counts failures."""
    failures = 0
    rounds_out = []
    for results in per_round:
        sums = {r["checksum"] for r in results}
        # Every process must hold exactly the same values (a moshpit reducer keeps the codec's
        # copy of its average); hivemind applies the average to each local tensor as a delta,
        # so its peers differ in the last bit: there only the tolerance counts.
        disagree = arm != "hivemind" and len(sums) > 1
        bad = [disagree or not (r["ok"] and r["succeeded"]) for r in results]
        failures += sum(bad)
        row: dict[str, Any] = {
            "seconds": max(r["seconds"] for r in results),
            "cpu_sum": (
                None if any(r["cpu"] is None for r in results) else sum(r["cpu"] for r in results)
            ),
            "late": max(r["late"] for r in results),
            "max_error": max(r["max_error"] for r in results),
            "processes_failed": sum(bad),
            "checksums_agree": len(sums) == 1,
            "checksum": results[0]["checksum"],
        }
        if arm == "moshpit":
            for stage in ("matchmaking", "allreduce"):
                row[stage] = max(r["stages"][stage] for r in results)
        if "group" in results[0]:
            row["groups"] = sorted(r["group"] for r in results)
        rounds_out.append(row)
    out: dict[str, Any] = {
        "seconds": statistics.median(r["seconds"] for r in rounds_out),
        "expected_checksum": expected_checksum,
        "cpu_sum": (
            statistics.median(r["cpu_sum"] for r in rounds_out)
            if all(r["cpu_sum"] is not None for r in rounds_out)
            else None
        ),
        "failures": failures,
        "max_error": max(r["max_error"] for r in rounds_out),
        "rounds": rounds_out,
    }
    if arm == "moshpit":
        for stage in ("matchmaking", "allreduce"):
            out[stage] = statistics.median(r[stage] for r in rounds_out)
    return out


# --------------------------------------------------------------------------------------------
# Profile: where moshpit process 0's time went during the timed rounds.

# Every function's own time goes to exactly one category, so the categories add up to the
# whole. A Python function's category comes from its file (and name); a builtin (C) function's
# from its name when listed, else from each caller in turn (pstats keeps its own time per
# caller), so the copy inside ``envelope.seal``'s ``b"".join`` counts under the envelope, and
# ``ndarray.tobytes`` under the codec that called it.
_BUILTINS: dict[str, str] = {
    "<method 'send' of '_socket.socket' objects>": "socket send/recv (syscalls)",
    "<method 'recv' of '_socket.socket' objects>": "socket send/recv (syscalls)",
    "<method 'recv_into' of '_socket.socket' objects>": "socket send/recv (syscalls)",
    "<method 'poll' of 'select.epoll' objects>": "epoll wait",
    "<method 'sign' of 'cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PrivateKey'"
    " objects>": "Ed25519 sign + verify",
    "<method 'verify' of 'cryptography.hazmat.bindings._rust.openssl.ed25519.Ed25519PublicKey'"
    " objects>": "Ed25519 sign + verify",
    **{
        f"<method '{op}' of 'cryptography.hazmat.bindings._rust.openssl.aead.AESGCM' objects>": (
            "AES-256-GCM encrypt + decrypt"
        )
        for op in ("encrypt", "encrypt_into", "decrypt", "decrypt_into")
    },
}
# (category, path fragment, function name or "" for any), first match wins
_FILES: list[tuple[str, str, str]] = [
    ("stream read_all (join chunks)", "moshpit_trio/wire/connection.py", "read_all"),
    ("envelope seal/open (headers, checks)", "moshpit_trio/wire/envelope.py", ""),
    ("codec encode/decode", "moshpit_trio/averaging/compression.py", ""),
    ("reducer (accumulate, average)", "moshpit_trio/averaging/reducer.py", ""),
    ("flatten / write back", "moshpit_trio/averaging/partition.py", ""),
    ("all-reduce logic (apply results)", "moshpit_trio/averaging/allreduce.py", ""),
    ("websocket framing", "moshpit_trio/wire/websocket.py", ""),
    ("websocket framing", "moshpit_trio/wire/speedups.py", ""),
    ("websocket framing", "/wsproto/", ""),
    ("websocket framing", "/trio_websocket/", ""),
    ("connection / transport", "moshpit_trio/wire/", ""),
    ("DHT + matchmaking", "moshpit_trio/dht/", ""),
    ("DHT + matchmaking", "moshpit_trio/averaging/matchmaking.py", ""),
    ("DHT + matchmaking", "moshpit_trio/averaging/grid.py", ""),
    ("trio scheduling", "/trio/", ""),
    ("trio scheduling", "/outcome/", ""),
]
_OTHER = "other (python, logging, averager)"


def _category(file: str, name: str) -> str | None:
    """The category of a Python function; None for builtins (decided by caller)."""
    if file == "~":
        return _BUILTINS.get(name)
    path = file.replace("\\", "/")
    for category, fragment, func in _FILES:
        if fragment in path and (not func or func == name):
            return category
    return _OTHER


def profile_breakdown(path: Path) -> dict[str, Any]:
    """CPU seconds per category, from a cProfile dump (see ``_Profiler``)."""
    stats = pstats.Stats(str(path))
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = stats.total_tt  # type: ignore[attr-defined]

    groups: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, callers) in raw.items():
        found = _category(func[0], func[2])
        if found is not None or not callers:
            groups[found or _OTHER] = groups.get(found or _OTHER, 0.0) + tt
            continue
        # A builtin: split its own time by caller, walking up through builtin callers.
        for caller, entry in callers.items():
            owner, hops = caller, 0
            cat = _category(owner[0], owner[2])
            while cat is None and hops < 8 and raw.get(owner, (0, 0, 0, 0, {}))[4]:
                owner = max(raw[owner][4].items(), key=lambda kv: kv[1][2])[0]
                cat = _category(owner[0], owner[2])
                hops += 1
            groups[cat or _OTHER] = groups.get(cat or _OTHER, 0.0) + entry[2]
    top = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    return {
        "profiled_cpu_s": total,
        "categories": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
        "top_tottime": [
            {"function": f"{Path(f).name}:{ln}({n})", "tottime": tt, "calls": nc}
            for (f, ln, n), (_cc, nc, tt, _ct, _c) in top
        ],
    }


def _profile_table(breakdown: dict[str, Any], rounds: int) -> str:
    total = breakdown["profiled_cpu_s"]
    lines = [
        f"moshpit process 0 under cProfile, {rounds} timed rounds, {total:.2f} CPU s profiled "
        "(CPU s per round; share):"
    ]
    for name, seconds in breakdown["categories"].items():
        lines.append(f"  {name:<42}{seconds / rounds:>8.3f}s{100 * seconds / total:>7.1f}%")
    lines.append("  top functions by own time:")
    for row in breakdown["top_tottime"][:10]:
        lines.append(f"    {row['tottime'] / rounds:>8.3f}s  {row['calls']:>7}  {row['function']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def _hivemind_available(python: str) -> str | None:
    """None if hivemind imports in ``python``, else why not (never imported in this process)."""
    probe = subprocess.run(
        [python, "-c", "import hivemind"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode == 0:
        return None
    if "No module named 'hivemind'" in probe.stderr:
        return "not installed"
    return "import failed: " + (probe.stderr.strip().splitlines() or ["?"])[-1]


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(results: dict[str, dict[str, Any]], summary: dict[str, Any]) -> str:
    links = summary.get("links")
    head = f"{'arm':<10}{'round s':>10}{'matchmk s':>11}{'allred s':>10}{'vs gloo':>9}"
    head += f"{'CPU s':>8}{'failed':>8}{'max err':>10}"
    if links:
        head += f"{'bound s':>9}{'x bound':>9}{'max MB/link':>13}"
    lines = [head, "-" * len(head)]
    gloo = summary["gloo_s"]
    for arm, res in results.items():
        if "error" in res:
            lines.append(f"{arm:<10}  {res['error']}")
            continue
        ratio = res["seconds"] / gloo if gloo else None
        line = (
            f"{arm:<10}{res['seconds']:>10.3f}{_fmt(res.get('matchmaking')):>11}"
            f"{_fmt(res.get('allreduce')):>10}{_fmt(ratio, 2):>9}"
            f"{_fmt(res.get('cpu_sum'), 2):>8}{res['failures']:>8}"
            f"{res['max_error']:>10.1e}"
        )
        if links:
            bound = links.get(f"{arm}_bound_s")
            moved = res.get("moved_mb") or []
            busiest = max((max(m["up"], m["down"]) for m in moved), default=None)
            line += (
                f"{_fmt(bound):>9}{_fmt(res['seconds'] / bound if bound else None, 2):>9}"
                f"{_fmt(busiest, 1):>13}"
            )
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4, help="processes (one group of N)")
    parser.add_argument("--floats", type=int, default=10_000_000, help="float32 elements")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--compression", default="none", choices=["none", "fp16", "8bit"])
    parser.add_argument(
        "--arms", default="moshpit,gloo", help="moshpit, gloo, floor (comma separated)"
    )
    parser.add_argument("--with-hivemind", action="store_true", help="add hivemind if installed")
    parser.add_argument(
        "--hivemind-python",
        default=sys.executable,
        help="interpreter for the hivemind processes (one whose environment has hivemind)",
    )
    parser.add_argument(
        "--chunk-kib", type=int, help="moshpit stream chunk (KiB; default: the library's)"
    )
    parser.add_argument(
        "--window-mib", type=int, help="moshpit stream window (MiB; default: the library's)"
    )
    parser.add_argument(
        "--links",
        help="each process in its own netns behind tbf links: one rate, or one per peer "
        "(e.g. 1gbit or 100mbit,250mbit,500mbit,1gbit); needs root",
    )
    parser.add_argument(
        "--no-pace",
        action="store_true",
        help="with --links: moshpit peers do not pace their sends (MoshpitAverager(pace=...))",
    )
    parser.add_argument("--lead", type=float, default=0.2, help="round start notice (s)")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="per round (s)")
    parser.add_argument("--timeout", type=float, default=600.0, help="whole benchmark (s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", type=Path, help="cProfile moshpit process 0 into DIR")
    parser.add_argument("--quiet", action="store_true", help="hide the children's stderr")
    parser.add_argument("--role", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role:
        return _child_main(args.role, args.spec)
    if args.peers < 2 or args.floats < args.peers or args.rounds < 1 or args.warmup < 0:
        parser.error("need --peers >= 2, --floats >= peers, --rounds >= 1, --warmup >= 0")
    arms = [a for a in args.arms.split(",") if a]
    if any(a not in ARMS for a in arms):
        parser.error(f"unknown arm in {args.arms!r}; choose from {', '.join(ARMS)}")
    rates: list[float] | None = None
    if args.links:
        try:
            rates = parse_links(args.links, args.peers)
        except ValueError as exc:
            parser.error(f"--links: {exc}")
        if args.with_hivemind or "hivemind" in arms or "floor" in arms:
            parser.error(
                "--links runs moshpit and gloo only (hivemind and floor listen on 127.0.0.1)"
            )
        why = links_unusable()
        if why is not None:
            print(f"allreduce.py: {why}", file=sys.stderr)
            return 2
    hivemind_note: str | None = None
    if args.with_hivemind and "hivemind" not in arms:
        hivemind_note = _hivemind_available(args.hivemind_python)
        if hivemind_note is None:
            arms.append("hivemind")
    elif "hivemind" not in arms:
        hivemind_note = "not run (pass --with-hivemind)"

    started = time.monotonic()
    deadline = started + args.timeout
    results: dict[str, dict[str, Any]] = {}
    links = Links(rates) if rates is not None else None
    try:
        if links is not None:
            links.open()
        _run_arms(args, arms, results, started, deadline, links)
    except LinksFailed as exc:
        print(f"allreduce.py: could not set up --links: {exc}", file=sys.stderr)
        return 2
    finally:
        if links is not None:
            links.close()
    return _report(args, results, started, hivemind_note, rates)


def _run_arms(
    args: argparse.Namespace,
    arms: list[str],
    results: dict[str, dict[str, Any]],
    started: float,
    deadline: float,
    links: Links | None,
) -> None:
    for arm in arms:
        if time.monotonic() >= deadline:
            results[arm] = {"error": "not run: --timeout reached"}
            continue
        try:
            results[arm] = run_arm(
                arm,
                peers=args.peers,
                floats=args.floats,
                rounds=args.rounds,
                warmup=args.warmup,
                compression=args.compression if arm == "moshpit" else "none",
                lead=args.lead,
                step_timeout=args.step_timeout,
                deadline=deadline,
                profile_dir=args.profile,
                quiet=args.quiet,
                python=args.hivemind_python if arm == "hivemind" else sys.executable,
                chunk=args.chunk_kib * 1024 if args.chunk_kib else None,
                window=args.window_mib * 1024 * 1024 if args.window_mib else None,
                links=links,
                pace=links is not None and not args.no_pace,
            )
        except ArmFailed as exc:
            results[arm] = {"error": str(exc)}
        if not args.json:
            print(f"  {arm}: done ({time.monotonic() - started:.0f}s)", file=sys.stderr)


def _report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    started: float,
    hivemind_note: str | None,
    rates: list[float] | None,
) -> int:
    def seconds(arm: str, key: str = "seconds") -> float | None:
        value = results.get(arm, {}).get(key)
        return None if value is None else round(float(value), 4)

    round_s, gloo_s, hivemind_s = seconds("moshpit"), seconds("gloo"), seconds("hivemind")
    floor_s = seconds("floor")
    allreduce_s = seconds("moshpit", "allreduce")
    if "hivemind" in results and "error" in results["hivemind"]:
        hivemind_note = results["hivemind"]["error"]
    ratio = round(round_s / gloo_s, 3) if round_s and gloo_s else None
    speedup = round(hivemind_s / round_s, 3) if round_s and hivemind_s else None
    summary: dict[str, Any] = {
        "peers": args.peers,
        "floats": args.floats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "compression": args.compression,
        "chunk_bytes": args.chunk_kib * 1024 if args.chunk_kib else None,
        "window_bytes": args.window_mib * 1024 * 1024 if args.window_mib else None,
        "paced": args.links is not None and not args.no_pace,
        "cores": os.cpu_count(),
        "moshpit_round_s": round_s,
        "moshpit_matchmaking_s": seconds("moshpit", "matchmaking"),
        "moshpit_allreduce_s": allreduce_s,
        "gloo_s": gloo_s,
        "ratio_vs_gloo": ratio,
        "allreduce_ratio_vs_gloo": (
            round(allreduce_s / gloo_s, 3) if allreduce_s and gloo_s else None
        ),
        "hivemind_s": hivemind_s,
        "hivemind_note": hivemind_note,
        "speedup_vs_hivemind": speedup,
        "floor_s": floor_s,
        "floor_ratio_vs_gloo": round(floor_s / gloo_s, 3) if floor_s and gloo_s else None,
        "ratio_vs_floor": round(round_s / floor_s, 3) if round_s and floor_s else None,
        "failures": {arm: res.get("failures") for arm, res in results.items()},
        "targets": {
            "ratio_vs_gloo_max": _TARGET_RATIO,
            "ratio_met": None if ratio is None else ratio <= _TARGET_RATIO,
            "speedup_vs_hivemind_min": _TARGET_HIVEMIND,
            "speedup_met": None if speedup is None else speedup >= _TARGET_HIVEMIND,
        },
        "how": (
            "median over timed rounds of the slowest process's seconds from the shared round "
            "start; moshpit_round_s includes matchmaking, moshpit_allreduce_s is the all-reduce "
            "stage alone"
        ),
        "seconds": round(time.monotonic() - started, 1),
        "arms": results,
    }
    if rates is not None:
        bounds = lower_bounds(args.peers, args.floats, rates)
        summary["links"] = {
            "spec": args.links,
            "rates_bit_s": rates,
            "moshpit_bound_s": round(bounds["moshpit"], 4),
            "moshpit_phased_bound_s": round(bounds["moshpit_phased"], 4),
            "gloo_bound_s": round(bounds["gloo"], 4),
        }
        target = _TARGET_LINKS_EQUAL if len(set(rates)) == 1 else _TARGET_LINKS_MIXED
        summary["targets"]["links_ratio_max"] = target
        summary["targets"]["links_ratio_met"] = None if ratio is None else ratio <= target
    breakdown = None
    prof = args.profile / "moshpit-0.prof" if args.profile else None
    if prof is not None and prof.exists() and "error" not in results.get("moshpit", {"error": 1}):
        breakdown = profile_breakdown(prof)
        summary["profile"] = breakdown
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(results, summary))
        print(
            f"\npeers={args.peers} floats={args.floats:,} rounds={args.rounds} "
            f"compression={args.compression}: moshpit_round_s={round_s} "
            f"(allreduce {allreduce_s}) gloo_s={gloo_s} ratio_vs_gloo={ratio} "
            f"hivemind_s={hivemind_s}{f' ({hivemind_note})' if hivemind_note else ''} "
            f"speedup_vs_hivemind={speedup}; {summary['seconds']}s\n"
            "(each time: median over rounds of the slowest process, timed from a shared start; "
            f"CPU s: all {args.peers} processes' CPU seconds per round, on {os.cpu_count()} cores)"
        )
        if rates is not None:
            link = summary["links"]
            print(
                f"links {args.links}: bound s = the payload the slowest peer must move over its "
                "own link (full duplex; TCP/IP headers not counted). In two phases, one after "
                "the other, as moshpit's butterfly moved it before its reducers streamed their "
                "averages range by range, the bound would be "
                f"{link['moshpit_phased_bound_s']:.3f} s"
            )
        if breakdown is not None:
            print("\n" + _profile_table(breakdown, args.rounds))
    failed = any("error" in res for res in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
