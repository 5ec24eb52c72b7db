"""Wire throughput: how fast do multi-megabyte payloads cross a connection between two processes?

Every arm moves ``--size-mib`` of payload (default 64 MiB) in ``--chunk-mib`` messages (default
4 MiB) between two OS processes on 127.0.0.1, in both directions, ``--repeat`` times, and reports
the median. Arms (``--arms``, comma separated):

``tcp``        raw trio TCP (``TcpNetwork`` sockets), 8-byte length prefix + payload per message,
               receiver reassembles each message as ``bytes``; malloc tuned as in ``ws-fast``.
``ws-stock``   bare trio-websocket exactly as it comes: 4 KiB receive buffer, wsproto's masker.
``ws-fast``    bare trio-websocket with ``moshpit_trio.wire.speedups.install()`` and
               ``receive_buffer_size=RECEIVE_BUFFER_SIZE``.
``auth``       our transport: handshake, encrypted envelopes, credit-based stream; also measures
               sequential signed RPC round trips (``signed_calls_per_s``).
Ablations, not run by default: ``tcp-stock`` (no malloc tuning), ``ws-bigbuf`` (large receive
buffer only), and ``ws-nomask`` / ``ws-noframes`` / ``ws-nobuffer`` / ``ws-nomalloc`` /
``ws-smallbuf``: ``ws-fast`` less one of its parts (the masker, the single-copy frame writer,
the whole-frame receive buffer, malloc tuning, the big receive size).

"up" is dialer -> listener (a websocket client sends masked frames, the server unmasks them);
"down" is listener -> dialer (unmasked frames). An arm's headline figure is its slower direction.
MB = 10**6 bytes. The orchestrating process only starts and times the others: each arm runs a
fresh listener process and a fresh dialer process, so no arm inherits another's allocator state
or monkeypatches; both are ended in a ``finally`` whatever happens.

    python benchmarks/wire_throughput.py                 # table
    python benchmarks/wire_throughput.py --json          # one JSON object on stdout
    python benchmarks/wire_throughput.py --profile benchmarks/results/prof   # cProfile dumps

JSON keys: ``ws_mb_s`` (the authenticated arm; null while it cannot run), ``tcp_mb_s``, ``ratio``
(ws/tcp), ``signed_calls_per_s``, ``bare_ws_mb_s`` (ws-fast), ``bare_ws_stock_mb_s`` and
``arms`` with every direction's median and individual runs. Targets: ratio >= 0.5 and
ws_mb_s >= 1000.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import json
import math
import os
import select
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from moshpit_trio.wire import speedups  # noqa: E402
from moshpit_trio.wire.streams import TcpNetwork  # noqa: E402

HOST = "127.0.0.1"
MIB = 1024 * 1024
MB = 1_000_000
STOCK_RECEIVE_BUFFER = 4 * 1024  # trio_websocket's RECEIVE_BYTES
_LEN = struct.Struct("!Q")
_CHILD_DEADLINE = 300.0  # a child gives up on its own after this long, whatever the parent does
_WARMUP_CHUNKS = 4


@dataclass(frozen=True)
class ArmSpec:
    name: str
    kind: str  # "tcp" | "ws" | "auth"
    masker: bool
    frames: bool
    buffer: bool
    malloc: bool
    receive_buffer: int


_BIG = speedups.RECEIVE_BUFFER_SIZE
ARMS: dict[str, ArmSpec] = {
    spec.name: spec
    for spec in [
        #       name           kind   masker frames buffer malloc receive_buffer
        ArmSpec("tcp", "tcp", False, False, False, True, _BIG),
        ArmSpec("tcp-stock", "tcp", False, False, False, False, _BIG),
        ArmSpec("ws-stock", "ws", False, False, False, False, STOCK_RECEIVE_BUFFER),
        ArmSpec("ws-bigbuf", "ws", False, False, False, False, _BIG),
        ArmSpec("ws-nomask", "ws", False, True, True, True, _BIG),
        ArmSpec("ws-noframes", "ws", True, False, True, True, _BIG),
        ArmSpec("ws-nobuffer", "ws", True, True, False, True, _BIG),
        ArmSpec("ws-nomalloc", "ws", True, True, True, False, _BIG),
        ArmSpec("ws-smallbuf", "ws", True, True, True, True, STOCK_RECEIVE_BUFFER),
        ArmSpec("ws-fast", "ws", True, True, True, True, _BIG),
        ArmSpec("auth", "auth", True, True, True, True, _BIG),
    ]
}
DEFAULT_ARMS = "tcp,ws-stock,ws-fast,auth"


@dataclass(frozen=True)
class Job:
    """What a dialer process does: for each direction, warm up, then ``repeat`` timed runs."""

    arm: ArmSpec
    address: str
    size: int
    chunk: int
    repeat: int
    directions: tuple[str, ...]
    calls_seconds: float


def _chunks(total: int, chunk: int) -> list[int]:
    sizes = [chunk] * (total // chunk)
    if total % chunk:
        sizes.append(total % chunk)
    return sizes


def _payloads(sizes: list[int]) -> list[bytes]:
    """Distinct random ``bytes`` per message (made before timing; reused across repeats)."""
    return [os.urandom(n) for n in sizes]


def _apply(arm: ArmSpec) -> None:
    os.environ.pop("MOSHPIT_NO_SPEEDUPS", None)
    if arm.kind == "auth":  # the transport reads it when it wraps each connection
        speedups.RECEIVE_BUFFER_SIZE = arm.receive_buffer  # type: ignore[misc]
    if arm.masker or arm.frames or arm.buffer or arm.malloc:
        speedups.install(masker=arm.masker, frames=arm.frames, buffer=arm.buffer, malloc=arm.malloc)


def _mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / MB / seconds if seconds > 0 else math.inf


# --------------------------------------------------------------------------------------------
# Control messages (all arms): tiny JSON objects, distinguishable from payload by size.

_CTRL_MAX = 1024


def _ctrl(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


def _parse_ctrl(msg: bytes) -> dict[str, Any]:
    if len(msg) > _CTRL_MAX:
        raise RuntimeError(f"expected a control message, got {len(msg)} bytes")
    parsed: dict[str, Any] = json.loads(msg)
    return parsed


# A connection, seen from either end, as three calls: the generic sink/source loops below work
# for the raw TCP arm and the bare websocket arms alike.
class Conn:
    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def recv(self) -> bytes:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class TcpConn(Conn):
    """Length-prefixed frames over a trio stream; each message comes back as one ``bytes``."""

    def __init__(self, stream: trio.abc.Stream, receive_buffer: int) -> None:
        self._stream = stream
        self._receive_buffer = receive_buffer
        self._buf = bytearray()

    async def send(self, data: bytes) -> None:
        await self._stream.send_all(_LEN.pack(len(data)))
        await self._stream.send_all(data)

    async def _fill(self) -> None:
        data = await self._stream.receive_some(self._receive_buffer)
        if not data:
            raise EOFError("peer closed the connection")
        self._buf += data

    async def recv(self) -> bytes:
        buf = self._buf
        while len(buf) < _LEN.size:
            await self._fill()
        (n,) = _LEN.unpack_from(buf)
        end = _LEN.size + n
        while len(buf) < end:
            await self._fill()
        with memoryview(buf) as view:
            msg = bytes(view[_LEN.size : end])
        del buf[:end]
        return msg

    async def aclose(self) -> None:
        await self._stream.aclose()


class WsConn(Conn):
    def __init__(self, ws: Any) -> None:
        self._ws = ws

    async def send(self, data: bytes) -> None:
        await self._ws.send_message(data)

    async def recv(self) -> bytes:
        msg = await self._ws.get_message()
        assert isinstance(msg, bytes)
        return msg

    async def aclose(self) -> None:
        await self._ws.aclose()


async def _serve_conn(conn: Conn) -> None:
    """Listener side of the tcp / ws arms: obey control messages until told to stop."""
    sent_payloads: dict[tuple[int, int], list[bytes]] = {}
    while True:
        try:
            ctrl = _parse_ctrl(await conn.recv())
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:  # trio_websocket.ConnectionClosed
            if type(exc).__name__ == "ConnectionClosed":
                return
            raise
        op = ctrl["op"]
        if op == "sink":
            got = 0
            for _ in range(ctrl["count"]):
                got += len(await conn.recv())
            await conn.send(_ctrl("sunk", bytes=got))
        elif op == "source":
            key = (ctrl["total"], ctrl["chunk"])
            if key not in sent_payloads:
                sent_payloads[key] = _payloads(_chunks(*key))
            for payload in sent_payloads[key]:
                await conn.send(payload)
        elif op == "cpu":
            await conn.send(_ctrl("cpu", seconds=_cpu()))
        elif op == "bye":
            await conn.aclose()
            return
        else:
            raise RuntimeError(f"unknown control op {op!r}")


async def _time_direction(conn: Conn, direction: str, payloads: list[bytes]) -> float:
    """One run; returns seconds from first byte sent to the last byte's acknowledgement."""
    total = sum(len(p) for p in payloads)
    if direction == "up":
        start = time.perf_counter()
        await conn.send(_ctrl("sink", count=len(payloads)))
        for payload in payloads:
            await conn.send(payload)
        reply = _parse_ctrl(await conn.recv())
        elapsed = time.perf_counter() - start
        if reply.get("bytes") != total:
            raise RuntimeError(f"listener got {reply.get('bytes')} bytes, expected {total}")
        return elapsed
    start = time.perf_counter()
    await conn.send(_ctrl("source", total=total, chunk=len(payloads[0])))
    got = 0
    for _ in payloads:
        got += len(await conn.recv())
    elapsed = time.perf_counter() - start
    if got != total:
        raise RuntimeError(f"dialer got {got} bytes, expected {total}")
    return elapsed


def _cpu() -> float:
    """User + system CPU seconds this process has used (both count: copies, syscalls, faults)."""
    return time.process_time()


async def _peer_cpu(conn: Conn) -> float:
    await conn.send(_ctrl("cpu"))
    return float(_parse_ctrl(await conn.recv())["seconds"])


async def _drive(conn: Conn, job: Job) -> dict[str, Any]:
    """Per direction: MB/s of each timed run, and what each side's CPU time would allow
    (``*_cpu_mb_s``: bytes moved / CPU seconds used by that process during the run), which
    shows the cost per byte even when the shared machine's noise muddles wall-clock times."""
    sizes = _chunks(job.size, job.chunk)
    payloads = _payloads(sizes)
    warm = payloads[:_WARMUP_CHUNKS]
    result: dict[str, Any] = {}
    for direction in job.directions:
        await _time_direction(conn, direction, warm)
        runs, dial_cpu, listen_cpu = [], [], []
        for _ in range(job.repeat):
            peer_before, mine_before = await _peer_cpu(conn), _cpu()
            seconds = await _time_direction(conn, direction, payloads)
            mine = _cpu() - mine_before
            peer = await _peer_cpu(conn) - peer_before
            runs.append(_mb_s(job.size, seconds))
            dial_cpu.append(_mb_s(job.size, mine))
            listen_cpu.append(_mb_s(job.size, peer))
        result[direction] = {"runs": runs, "dial_cpu": dial_cpu, "listen_cpu": listen_cpu}
    await conn.send(_ctrl("bye"))
    return result


# --------------------------------------------------------------------------------------------
# Listener processes.


def _announce(address: str) -> None:
    sys.stdout.write(json.dumps({"address": address}) + "\n")
    sys.stdout.flush()


def _wait_stdin_eof() -> None:
    while os.read(0, 4096):
        pass


async def _until_stdin_closes() -> None:
    # The parent holds our stdin; when it goes away (or closes it) we stop.
    await trio.to_thread.run_sync(_wait_stdin_eof, abandon_on_cancel=True)


async def _listen_tcp(arm: ArmSpec, max_message: int) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        async with stream:
            await _serve_conn(TcpConn(stream, arm.receive_buffer))

    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(TcpNetwork().serve, HOST, 0, handler)
        _announce(f"{host}:{port}")
        await _until_stdin_closes()
        nursery.cancel_scope.cancel()


async def _listen_ws(arm: ArmSpec, max_message: int) -> None:
    import trio_websocket

    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.abc.Stream) -> None:
            async with trio.open_nursery() as ws_nursery:
                request = await trio_websocket.wrap_server_stream(
                    ws_nursery,
                    stream,
                    max_message_size=max_message,
                    receive_buffer_size=arm.receive_buffer,
                )
                ws = await request.accept()
                await _serve_conn(WsConn(ws))

        host, port = await nursery.start(TcpNetwork().serve, HOST, 0, handler)
        _announce(f"{host}:{port}")
        await _until_stdin_closes()
        nursery.cancel_scope.cancel()


async def _listen(arm: ArmSpec, max_message: int) -> None:
    _apply(arm)
    with trio.move_on_after(_CHILD_DEADLINE):
        if arm.kind == "tcp":
            await _listen_tcp(arm, max_message)
        elif arm.kind == "ws":
            await _listen_ws(arm, max_message)
        else:
            await _listen_auth(arm, max_message)


# --------------------------------------------------------------------------------------------
# Dialer processes.


async def _dial_tcp(job: Job) -> dict[str, Any]:
    host, port = job.address.rsplit(":", 1)
    stream = await TcpNetwork().connect(host, int(port))
    async with stream:
        return await _drive(TcpConn(stream, job.arm.receive_buffer), job)


async def _dial_ws(job: Job) -> dict[str, Any]:
    import trio_websocket

    host, port = job.address.rsplit(":", 1)
    stream = await TcpNetwork().connect(host, int(port))
    async with trio.open_nursery() as nursery:
        ws = await trio_websocket.wrap_client_stream(
            nursery,
            stream,  # type: ignore[arg-type]
            host,
            "/",
            max_message_size=job.chunk + 64 * 1024,
            receive_buffer_size=job.arm.receive_buffer,
        )
        try:
            return await _drive(WsConn(ws), job)
        finally:
            with trio.move_on_after(5):
                await ws.aclose()


async def _dial(job: Job) -> dict[str, Any]:
    _apply(job.arm)
    with trio.fail_after(_CHILD_DEADLINE):
        if job.arm.kind == "tcp":
            return await _dial_tcp(job)
        if job.arm.kind == "ws":
            return await _dial_ws(job)
        return await _dial_auth(job)


# --------------------------------------------------------------------------------------------
# AUTHENTICATED ARM: our transport (handshake, encrypted envelopes, credit-based streams).
#
# up:   the dialer opens a stream to the listener's "bench.sink" and sends the payloads.
# down: the dialer calls "bench.source"; the listener's handler opens a stream back to the
#       dialer's "bench.sink" over the same connection and sends the payloads, then answers.
# calls: sequential "bench.echo" calls with a 64-byte payload for ``calls_seconds``.

_AUTH_TIMEOUT = 120.0


async def _sink(request: Any) -> bytes:
    got = 0
    async for chunk in request:
        got += len(chunk)
    return str(got).encode()


async def _cpu_handler(request: Any) -> bytes:
    return repr(_cpu()).encode()


async def _echo(request: Any) -> bytes:
    return bytes(request.payload)


# The listener's per-peer limits are a swarm's flood guard (500 calls/s sustained by default):
# this benchmark's one client calls as fast as it can on purpose, so it lifts them far above
# anything two processes can reach, and the number measured is the transport's, not the guard's.
def _unlimited_access() -> Any:
    from moshpit_trio.wire.access import AccessPolicy, RateLimits

    huge = 1e15
    return AccessPolicy(
        rates=RateLimits(calls_per_s=huge, call_burst=huge, bytes_per_s=huge, byte_burst=huge)
    )


async def _listen_auth(arm: ArmSpec, max_message: int) -> None:
    from moshpit_trio.identity import Identity
    from moshpit_trio.wire.transport import open_transport

    async with open_transport(
        Identity.generate(), listen=f"{HOST}:0", access=_unlimited_access()
    ) as t:
        cache: dict[tuple[int, int], list[bytes]] = {}

        async def source(request: Any) -> bytes:
            asked = json.loads(bytes(request.payload))
            key = (asked["total"], asked["chunk"])
            if key not in cache:
                cache[key] = _payloads(_chunks(*key))
            async with t.open_stream(request.peer, "bench.sink", timeout=_AUTH_TIMEOUT) as s:
                for payload in cache[key]:
                    await s.send(payload)
                return await s.finish()

        t.register_stream("bench.sink", _sink)
        t.register("bench.source", source)
        t.register("bench.cpu", _cpu_handler)
        t.register("bench.echo", _echo)
        _announce(str(t.address))
        await _until_stdin_closes()


async def _dial_auth(job: Job) -> dict[str, Any]:
    from moshpit_trio.identity import Identity
    from moshpit_trio.wire.transport import open_transport

    async with open_transport(Identity.generate(), listen=None, access=_unlimited_access()) as t:
        t.register_stream("bench.sink", _sink)
        address = job.address
        assert await t.call(address, "bench.echo", b"hello", timeout=10) == b"hello"

        async def run(direction: str, payloads: list[bytes]) -> float:
            total = sum(len(p) for p in payloads)
            start = time.perf_counter()
            if direction == "up":
                async with t.open_stream(address, "bench.sink", timeout=_AUTH_TIMEOUT) as s:
                    for payload in payloads:
                        await s.send(payload)
                    answer = await s.finish()
            else:
                asked = {"total": total, "chunk": len(payloads[0])}
                answer = await t.call(
                    address, "bench.source", json.dumps(asked).encode(), timeout=_AUTH_TIMEOUT
                )
            elapsed = time.perf_counter() - start
            if int(answer) != total:
                raise RuntimeError(f"{direction}: {int(answer)} bytes arrived, sent {total}")
            return elapsed

        async def peer_cpu() -> float:
            return float(await t.call(address, "bench.cpu", timeout=10))

        payloads = _payloads(_chunks(job.size, job.chunk))
        result: dict[str, Any] = {}
        for direction in job.directions:
            await run(direction, payloads[:_WARMUP_CHUNKS])
            runs, dial_cpu, listen_cpu = [], [], []
            for _ in range(job.repeat):
                peer_before, mine_before = await peer_cpu(), _cpu()
                seconds = await run(direction, payloads)
                mine = _cpu() - mine_before
                peer = await peer_cpu() - peer_before
                runs.append(_mb_s(job.size, seconds))
                dial_cpu.append(_mb_s(job.size, mine))
                listen_cpu.append(_mb_s(job.size, peer))
            result[direction] = {"runs": runs, "dial_cpu": dial_cpu, "listen_cpu": listen_cpu}

        if job.calls_seconds > 0:
            small = os.urandom(64)
            calls = 0
            start = time.perf_counter()
            while (elapsed := time.perf_counter() - start) < job.calls_seconds:
                await t.call(address, "bench.echo", small, timeout=10)
                calls += 1
            result["signed_calls_per_s"] = calls / elapsed
        return result


# --------------------------------------------------------------------------------------------
# Orchestrator.


def _child_cmd(role: str, payload: dict[str, Any], profile: Path | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role]
    cmd += ["--spec", json.dumps(payload)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    return cmd


def _end(proc: subprocess.Popen[bytes]) -> None:
    """End a child we started: close its stdin (it exits), then terminate, then kill."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=3)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    if not line:
        role = proc.args[3] if isinstance(proc.args, list) else proc.args
        why = f"exited with {proc.poll()}" if ready else f"said nothing within {timeout}s"
        raise RuntimeError(f"{role} process {why} (its stderr is above)")
    parsed: dict[str, Any] = json.loads(line)
    return parsed


def run_arm(
    arm: ArmSpec,
    *,
    size: int,
    chunk: int,
    repeat: int,
    directions: tuple[str, ...],
    calls_seconds: float,
    timeout: float,
    profile_dir: Path | None,
) -> dict[str, Any]:
    spec = asdict(arm)
    max_message = chunk + 64 * 1024
    profile = (lambda role: profile_dir / f"{arm.name}-{role}.prof") if profile_dir else None
    listener = subprocess.Popen(
        _child_cmd(
            "listen",
            {"arm": spec, "max_message": max_message},
            profile("listen") if profile else None,
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    dialer: subprocess.Popen[bytes] | None = None
    try:
        announced = _read_line(listener, 30)
        if "error" in announced:
            return announced
        address = announced["address"]
        job = {
            "arm": spec,
            "address": address,
            "size": size,
            "chunk": chunk,
            "repeat": repeat,
            "directions": list(directions),
            "calls_seconds": calls_seconds,
        }
        dialer = subprocess.Popen(
            _child_cmd("dial", job, profile("dial") if profile else None),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        result = _read_line(dialer, timeout)
        if "error" in result:
            return result
        out: dict[str, Any] = {}
        for direction in directions:
            got = result[direction]
            out[f"{direction}_mb_s"] = statistics.median(got["runs"])
            out[f"{direction}_runs"] = got["runs"]
            for side in ("dial_cpu", "listen_cpu"):
                if got.get(side):
                    out[f"{direction}_{side}_mb_s"] = statistics.median(got[side])
        out["mb_s"] = min(out[f"{d}_mb_s"] for d in directions)
        if "signed_calls_per_s" in result:
            out["signed_calls_per_s"] = result["signed_calls_per_s"]
        return out
    finally:
        if dialer is not None:
            _end(dialer)
        _end(listener)


def _child_main(role: str, spec_text: str, profile: str | None) -> int:
    spec = json.loads(spec_text)
    arm = ArmSpec(**spec["arm"])

    def go() -> Any:
        if role == "listen":
            try:
                return trio.run(_listen, arm, spec["max_message"])
            except NotImplementedError as exc:
                sys.stdout.write(json.dumps({"error": f"not available: {exc}"}) + "\n")
                sys.stdout.flush()
                return None
        job = Job(
            arm=arm,
            address=spec["address"],
            size=spec["size"],
            chunk=spec["chunk"],
            repeat=spec["repeat"],
            directions=tuple(spec["directions"]),
            calls_seconds=spec["calls_seconds"],
        )
        try:
            result = trio.run(_dial, job)
        except NotImplementedError as exc:
            result = {"error": f"not available: {exc}"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        return result

    if profile:
        profiler = cProfile.Profile()
        try:
            profiler.runcall(go)
        finally:
            Path(profile).parent.mkdir(parents=True, exist_ok=True)
            profiler.dump_stats(profile)
    else:
        go()
    return 0


def _table(results: dict[str, dict[str, Any]], directions: tuple[str, ...]) -> str:
    """Wall-clock MB/s per direction, then (in brackets) what the sending and the receiving
    process's CPU time allowed: bytes / CPU seconds each used."""
    head = f"{'arm':<12}"
    for d in directions:
        head += f"{d + ' MB/s':>11}{'[send/recv CPU]':>17}"
    head += f"{'min/tcp':>9}"
    lines = [head, "-" * len(head)]
    tcp = results.get("tcp", {}).get("mb_s")
    for name, res in results.items():
        if "error" in res:
            lines.append(f"{name:<12}  {res['error']}")
            continue
        row = f"{name:<12}"
        for d in directions:
            send, recv = ("dial", "listen") if d == "up" else ("listen", "dial")
            cpu = (
                f"[{res.get(f'{d}_{send}_cpu_mb_s', 0):.0f}/"
                f"{res.get(f'{d}_{recv}_cpu_mb_s', 0):.0f}]"
            )
            row += f"{res[f'{d}_mb_s']:>11.0f}{cpu:>17}"
        row += f"{res['mb_s'] / tcp:>9.2f}" if tcp else f"{'-':>9}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=float, default=64.0, help="payload per run (MiB)")
    parser.add_argument("--chunk-mib", type=float, default=4.0, help="payload per message (MiB)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per direction")
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"choose from {', '.join(ARMS)}")
    parser.add_argument("--directions", default="up,down", help="up (dialer->listener), down")
    parser.add_argument(
        "--receive-kib",
        type=int,
        help=f"receive size for the arms that use RECEIVE_BUFFER_SIZE ({_BIG // 1024} KiB)",
    )
    parser.add_argument("--calls-seconds", type=float, default=2.0, help="RPC timing (auth arm)")
    parser.add_argument("--timeout", type=float, default=100.0, help="per-arm limit (s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", type=Path, help="write cProfile dumps to this folder")
    parser.add_argument("--role", choices=["listen", "dial"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.role:
        return _child_main(args.role, args.spec, str(args.profile) if args.profile else None)

    size = int(args.size_mib * MIB)
    chunk = int(args.chunk_mib * MIB)
    if size <= 0 or chunk <= 0 or args.repeat < 1:
        parser.error("--size-mib, --chunk-mib and --repeat must be positive")
    directions = tuple(d for d in args.directions.split(",") if d)
    names = [n for n in args.arms.split(",") if n]
    unknown = [n for n in names if n not in ARMS]
    if unknown or any(d not in ("up", "down") for d in directions):
        parser.error(f"unknown arm(s) {unknown} or direction(s) {directions}")

    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        arm = ARMS[name]
        if args.receive_kib and arm.receive_buffer == _BIG:
            arm = dataclasses.replace(arm, receive_buffer=args.receive_kib * 1024)
        try:
            results[name] = run_arm(
                arm,
                size=size,
                chunk=chunk,
                repeat=args.repeat,
                directions=directions,
                calls_seconds=args.calls_seconds,
                timeout=args.timeout,
                profile_dir=args.profile,
            )
        except RuntimeError as exc:
            results[name] = {"error": str(exc)}
        if not args.json:
            print(f"  {name}: done ({time.perf_counter() - started:.0f}s)", file=sys.stderr)

    def figure(arm: str, key: str = "mb_s") -> float | None:
        value = results.get(arm, {}).get(key)
        return None if value is None else round(float(value), 1)

    tcp_mb_s = figure("tcp")
    ws_mb_s = figure("auth")
    summary: dict[str, Any] = {
        "ws_mb_s": ws_mb_s,
        "tcp_mb_s": tcp_mb_s,
        "ratio": round(ws_mb_s / tcp_mb_s, 3) if ws_mb_s and tcp_mb_s else None,
        "signed_calls_per_s": figure("auth", "signed_calls_per_s"),
        "bare_ws_mb_s": figure("ws-fast"),
        "bare_ws_stock_mb_s": figure("ws-stock"),
        "bare_ratio": (
            round(results["ws-fast"]["mb_s"] / tcp_mb_s, 3)
            if tcp_mb_s and "mb_s" in results.get("ws-fast", {})
            else None
        ),
        "size_mib": args.size_mib,
        "chunk_mib": args.chunk_mib,
        "repeat": args.repeat,
        "unit": "MB/s, MB = 10**6 bytes; an arm's mb_s is its slower direction's median",
        "seconds": round(time.perf_counter() - started, 1),
        "arms": results,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(results, directions))
        print(
            f"\nws_mb_s={summary['ws_mb_s']} tcp_mb_s={summary['tcp_mb_s']} "
            f"ratio={summary['ratio']} signed_calls_per_s={summary['signed_calls_per_s']} "
            f"(bare ws-fast ratio {summary['bare_ratio']}; "
            f"{args.size_mib:g} MiB in {args.chunk_mib:g} MiB messages, "
            f"median of {args.repeat}, {summary['seconds']}s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
