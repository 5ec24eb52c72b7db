"""The ``moshpit`` command.

    moshpit keygen [--out FILE] [--force]        new identity; prints its PeerID
    moshpit id FILE                              the PeerID of an existing key file
    moshpit echo-server [--key FILE] [--listen HOST:PORT]
    moshpit echo ADDRESS TEXT [--key FILE]
    moshpit echo-demo                            two peers, two processes, one signed echo
    moshpit demo [--peers N] [--seconds S] [--plot FILE] [--json] [--dashboard [HOST:PORT]]
                                                 a local swarm trains a CNN on digits; one
                                                 peer is killed and restarted midway
    moshpit peer --config FILE [--listen HOST:PORT] [--bootstrap ADDRESS]... [...]
                                                 run a peer daemon until SIGTERM (peers/*.toml)
    moshpit status ADDRESS [--json] [--key FILE] ask a running daemon for its status
    moshpit status PEER_ID --via RELAY_ADDRESS   ... a client-mode one, through its relay
    moshpit dashboard --bootstrap ADDRESS --run RUN [--listen HOST:PORT] [--key FILE]
                                                 a live web page of a run's swarm

A key file's passphrase, if any, comes from the environment variable named by
``--passphrase-env`` (never from the command line, where ``ps`` would show it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__
from .errors import ConfigError, MoshpitError
from .identity import Identity, PeerID
from .log import configure_logging

__all__ = ["main"]

ECHO = "echo"


def _passphrase(args: argparse.Namespace) -> bytes | None:
    var = getattr(args, "passphrase_env", None)
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise MoshpitError(f"--passphrase-env names {var}, but it is not set")
    return value.encode()


def _identity(args: argparse.Namespace) -> Identity:
    if args.key:
        return Identity.load(args.key, _passphrase(args))
    return Identity.generate()


def cmd_keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    identity.save(args.out, _passphrase(args), overwrite=args.force)
    print(identity.peer_id)
    print(f"key written to {args.out} (mode 0600)", file=sys.stderr)
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    print(Identity.load(args.key, _passphrase(args)).peer_id)
    return 0


async def _echo_server(identity: Identity, listen: str) -> None:
    from .wire.connection import Request
    from .wire.transport import open_transport

    async def echo(request: Request) -> bytes:
        return bytes(request.payload)

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_transport(identity, listen=listen) as transport:
            transport.register(ECHO, echo)
            # One line on stdout, flushed: scripts (and echo-demo) read the address from it.
            print(transport.address, flush=True)
            async for _ in signals:
                break


def cmd_echo_server(args: argparse.Namespace) -> int:
    trio.run(_echo_server, _identity(args), args.listen)
    return 0


async def _echo(identity: Identity, address: str, text: str, timeout: float) -> tuple[str, float]:
    from .wire.transport import open_transport

    async with open_transport(identity, listen=None) as transport:
        await transport.connect(address, timeout=timeout)
        start = trio.current_time()
        reply = await transport.call(address, ECHO, text.encode(), timeout=timeout)
        return reply.decode("utf-8", "replace"), trio.current_time() - start


def cmd_echo(args: argparse.Namespace) -> int:
    reply, seconds = trio.run(_echo, _identity(args), args.address, args.text, args.timeout)
    print(reply)
    print(f"round trip {seconds * 1000:.2f} ms (signed, authenticated)", file=sys.stderr)
    return 0


def cmd_echo_demo(args: argparse.Namespace) -> int:
    """Start an echo server in a second process, call it, stop it."""
    server = subprocess.Popen(
        [sys.executable, "-m", "moshpit_trio", "echo-server", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        if not address:
            raise MoshpitError("the echo server did not start (no address printed)")
        client = _identity(args)
        print(f"server peer: {address}")
        print(f"client peer: {client.peer_id}")
        started = time.monotonic()
        reply, seconds = trio.run(_echo, client, address, args.text, args.timeout)
        print(f"sent {args.text!r}, got back {reply!r}")
        print(
            f"round trip {seconds * 1000:.2f} ms; whole exchange incl. handshake "
            f"{(time.monotonic() - started) * 1000:.1f} ms"
        )
        return 0 if reply == args.text else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moshpit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"moshpit-trio {__version__}")
    parser.add_argument("--log-format", choices=["console", "json"], default="console")
    parser.add_argument("--log-level", default="warning")
    sub = parser.add_subparsers(dest="command", required=True)

    def keyed(p: argparse.ArgumentParser, required: bool = False) -> None:
        p.add_argument("--key", required=required, help="PKCS8 PEM key file (default: a new one)")
        p.add_argument(
            "--passphrase-env", metavar="VAR", help="env variable holding the passphrase"
        )

    p = sub.add_parser("keygen", help="create an identity and print its PeerID")
    p.add_argument("--out", default="moshpit-key.pem", help="key file (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.add_argument("--passphrase-env", metavar="VAR", help="encrypt with the passphrase in VAR")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("id", help="print the PeerID of a key file")
    p.add_argument("key")
    p.add_argument("--passphrase-env", metavar="VAR")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("echo-server", help="serve the echo call; prints the address")
    keyed(p)
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: %(default)s)")
    p.set_defaults(func=cmd_echo_server)

    p = sub.add_parser("echo", help="call the echo of a peer")
    keyed(p)
    p.add_argument("address", help="ws://HOST:PORT/PEER_ID")
    p.add_argument("text")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("echo-demo", help="two peers in two processes exchange a signed echo")
    keyed(p)
    p.add_argument("--text", default="hello from moshpit-trio")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_echo_demo)

    p = sub.add_parser(
        "demo",
        help="a local swarm trains a small CNN on digits; one peer is killed and restarted",
    )
    p.add_argument("--peers", type=int, default=4, help="training peers (default: %(default)s)")
    p.add_argument(
        "--seconds", type=float, default=60.0, help="training time (default: %(default)s)"
    )
    p.add_argument(
        "--round-period",
        type=float,
        default=2.0,
        help="seconds between averaging rounds (default: %(default)s)",
    )
    p.add_argument(
        "--plot",
        default="moshpit-demo.png",
        help="PNG of accuracy and loss against time ('' for none; default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-live", action="store_true", help="no live table, just progress lines")
    p.add_argument("--logs", metavar="DIR", help="keep every process's log in DIR")
    p.add_argument(
        "--dashboard",
        nargs="?",
        const="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="also serve a live page of the swarm (default 127.0.0.1:8080); prints its URL",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "peer",
        help="run a peer daemon from a TOML configuration until SIGTERM",
        description="Run a peer daemon. Flags override the file and MOSHPIT_* variables.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="TOML file (see peers/)")
    p.add_argument("--identity", metavar="FILE", help="key file (created if missing)")
    p.add_argument("--listen", metavar="HOST:PORT")
    p.add_argument("--announce-host", metavar="HOST", help="the host others dial")
    p.add_argument(
        "--bootstrap",
        action="append",
        metavar="ADDRESS",
        help="ws://HOST:PORT/PEER_ID of a peer in the swarm (repeat; replaces the file's list)",
    )
    p.add_argument(
        "--client-mode", action="store_true", default=None, help="never listen (behind NAT)"
    )
    p.add_argument("--shutdown-timeout", metavar="SECONDS")
    p.add_argument(
        "--relay-offer",
        choices=["auto", "true", "false"],
        help="relay for client-mode peers (auto: when listening with no runs)",
    )
    p.add_argument("--log-format", dest="peer_log_format", choices=["console", "json"])
    p.add_argument("--log-level", dest="peer_log_level", metavar="LEVEL")
    p.add_argument(
        "--check", action="store_true", help="check the configuration, print it, and exit"
    )
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("status", help="ask a running daemon for its status")
    keyed(p)
    p.add_argument("address", help="ws://HOST:PORT/PEER_ID, or a PEER_ID with --via")
    p.add_argument(
        "--via",
        action="append",
        metavar="RELAY_ADDRESS",
        help="reach a client-mode daemon through this relay of its (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="JSON for machines")
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "dashboard",
        help="serve a live web page of a run's swarm (docs/DASHBOARD.md)",
        description="A peer (client mode) that reads a run's progress records from the DHT, "
        "asks daemons for their status where --key is allowed, and serves a live page and "
        "a JSON API (/api).",
    )
    keyed(p)
    p.add_argument(
        "--bootstrap",
        action="append",
        required=True,
        metavar="ADDRESS",
        help="ws://HOST:PORT/PEER_ID of a peer in the swarm (repeat for more)",
    )
    p.add_argument("--run", required=True, metavar="RUN_ID", help="the run to show")
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="where the page is served (default: %(default)s; port 0: any free port)",
    )
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between reads (default: %(default)s)"
    )
    p.add_argument(
        "--max-samples-per-s",
        type=float,
        default=1e6,
        metavar="N",
        help="the fastest one peer can really be; faster claims are suspect (default: %(default)g)",
    )
    p.add_argument("--no-status", action="store_true", help="never call status on peers")
    p.set_defaults(func=cmd_dashboard)
    return parser


def cmd_peer(args: argparse.Namespace) -> int:
    from .config import load_config

    flags = {
        "--identity": args.identity,
        "--listen": args.listen,
        "--announce-host": args.announce_host,
        "--bootstrap": args.bootstrap,
        "--client-mode": args.client_mode,
        "--shutdown-timeout": args.shutdown_timeout,
        "--log-format": args.peer_log_format,
        "--log-level": args.peer_log_level,
        "--relay-offer": args.relay_offer,
    }
    config = load_config(args.config, env=os.environ, flags=flags)
    if args.check:
        print(json.dumps(dataclasses.asdict(config), indent=2, default=str))
        return 0
    configure_logging(config.log.format, config.log.level)
    from .daemon import serve
    from .log import get_logger

    # From here on every line on stderr is a log line (JSON lines with format = "json"),
    # failures included: a supervisor's log collector gets one format.
    try:
        return trio.run(serve, config)
    except ConfigError as exc:
        get_logger().error("daemon failed", error=str(exc))
        return 2
    except Exception as exc:
        get_logger().exception("daemon failed", error=f"{type(exc).__name__}: {exc}")
        return 1


async def _status(
    identity: Identity,
    address: str,
    timeout: float,
    via: list[str] | None = None,
    network: Any = None,  # a StreamNetwork (tests: the in-memory one); None: TCP
) -> Any:
    from .daemon import fetch_status
    from .wire.address import InvalidAddress, PeerAddress
    from .wire.transport import Target, open_transport

    target: Target = address
    relays = [PeerAddress.parse(r) for r in via or ()]
    peer: PeerID | None = None
    if relays:
        # A client-mode daemon has no address: name it by PeerID, and reach it through the
        # relays it holds reservations on (its log's "peer started" line names them).
        peer = PeerAddress.parse(address).peer_id if "://" in address else PeerID.from_text(address)
        target = peer
    elif "://" not in address:
        raise InvalidAddress(
            f"{address!r}: expected ws://HOST:PORT/PEER_ID, or a PeerID with --via RELAY_ADDRESS "
            "(a client-mode daemon is reached through one of its relays)"
        )
    async with open_transport(identity, listen=None, network=network) as transport:
        for relay in relays:
            assert peer is not None
            transport.relay.add_route(peer, relay)
        return await fetch_status(transport, target, timeout=timeout)


def cmd_status(args: argparse.Namespace) -> int:
    import msgspec

    from .daemon import format_status

    status = trio.run(_status, _identity(args), args.address, args.timeout, args.via)
    if args.json:
        print(json.dumps(msgspec.to_builtins(status), indent=2))
    else:
        print(format_status(status))
    return 0


async def _dashboard(identity: Identity, args: argparse.Namespace) -> None:
    from .dashboard import Limits, open_dashboard

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_dashboard(
            identity,
            run_id=args.run,
            bootstrap=args.bootstrap,
            listen=args.listen,
            interval=args.interval,
            status=not args.no_status,
            limits=Limits(max_samples_per_s=args.max_samples_per_s),
        ) as dash:
            # One line on stdout, flushed: scripts (and `moshpit demo --dashboard`) read it.
            print(f"dashboard: {dash.url}", flush=True)
            print(
                f"reading run {args.run!r} as {identity.peer_id} (allow this PeerID in a "
                "daemon's [status] to see its status); Ctrl-C stops",
                file=sys.stderr,
                flush=True,
            )
            async for _ in signals:
                break


def cmd_dashboard(args: argparse.Namespace) -> int:
    if not (args.interval > 0 and args.interval < 3600):
        raise ConfigError(f"--interval must be in (0, 3600) seconds, got {args.interval!r}")
    trio.run(_dashboard, _identity(args), args)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import print_summary, run_demo

    result = run_demo(
        peers=args.peers,
        seconds=args.seconds,
        round_period=args.round_period,
        plot=args.plot or None,
        live=not args.no_live,
        logs=args.logs,
        dashboard=args.dashboard,
    )
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print_summary(result, sys.stdout)
    return 0 if result.restarted_peer_caught_up else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        return int(args.func(args))
    except MoshpitError as exc:
        print(f"moshpit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
