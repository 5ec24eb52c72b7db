"""The peer daemon's configuration: a TOML file, then ``MOSHPIT_*`` variables, then flags (sans-IO).

``moshpit peer --config peer.toml`` reads a file like this one (every key is optional except a
run's ``kind`` and ``run_id``, and an averaging run's ``size`` or a training run's ``entry``)::

    [peer]
    identity = "peer.pem"          # relative to this file; made (0600) if missing, never replaced
    listen = "0.0.0.0:7070"
    announce_host = "203.0.113.7"  # what others dial, when it is not the listen host
    bootstrap = ["ws://198.51.100.2:7070/mp..."]
    client_mode = false            # true behind NAT: dial out only, never listen
    shutdown_timeout = 10.0        # SIGTERM: finish the current round by then, or abandon it

    [limits]
    max_connections = 256
    upload_rate = "100 Mbit/s"     # cap on this process's sending ("0" or absent: none)

    [log]
    format = "json"                # or "console"
    level = "info"

    [status]
    allow = ["mpABC..."]           # PeerIDs that may call `status` ("*": anyone; []: nobody)

    [access]
    allowlist = ["mpABC..."]       # a private swarm: only these PeerIDs (absent: anyone)
    allowlist_file = "members.txt" # more of them, one a line (# comments); read at start
    calls_per_s = 500.0            # per remote peer; more are answered "busy"
    ban_base = 60.0                # first ban; each repeat offence doubles it, up to ban_cap

    [relay]
    offer = "auto"                 # relay for client-mode peers: "auto" (a listening peer
                                   # with no [[runs]]: a bootstrap node), true, or false
    max_reservations = 128         # client-mode peers holding a slot here at once
    circuit_bytes_per_s = "64 Mbit/s"  # per relayed connection; total_bytes_per_s: all of them
    relays = ["ws://198.51.100.2:7070/mp..."]  # client mode: where to hold reservations
                                   # (absent: the [peer] bootstrap list)
    want = 2                       # client mode: how many of them at once

    [[runs]]
    kind = "averaging"             # average a vector this daemon owns, round after round
    run_id = "exp1"
    grid = "auto"                  # groups from the live peers (or a fixed grid: [4, 4])
    size = 1_000_000               # float32 elements
    round_period = 5.0

Every key of a section can be overridden by an environment variable ``MOSHPIT_<SECTION>_<KEY>``
(``MOSHPIT_PEER_LISTEN=0.0.0.0:7171``; lists are comma-separated, booleans ``true``/``false``),
and a few by command-line flags (``moshpit peer --listen ...``), which win over both. Runs come
from the file only.

``[relay]`` has two halves. A listening peer *offers* relaying (``offer``; the other keys but
``relays`` and ``want`` are its limits, ``wire.relay_table.RelayLimits``); a client-mode peer
*uses* relays (``relays``, ``want``). Keys of the half that does not apply are mistakes, as
``target_group_size`` or ``max_group_size`` with a fixed grid is: ``offer = true`` in client
mode, ``relays`` or ``want`` on a listening peer, relay limits on a peer that does not relay.

Every mistake is a ``ConfigError`` that names the file, the key (and the variable or flag the
value came from), what was expected and what was found; unknown sections and keys are mistakes
too, so a typo never silently falls back to a default. Nothing here does I/O except
``load_config`` reading the file, and nothing imports trio.

>>> config = parse_config('[peer]\\nlisten = "127.0.0.1:0"\\n', source="inline.toml")
>>> config.peer.listen, config.runs
('127.0.0.1:0', ())
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

from .averaging.auto_grid import (
    DEFAULT_MAX_GROUP_SIZE,
    DEFAULT_TARGET_GROUP_SIZE,
    MAX_GROUP_SIZE_LIMIT,
    group_size_limits,
)
from .errors import ConfigError, InvalidPeerID
from .identity import PeerID
from .wire.relay_table import RelayLimits

__all__ = [
    "AccessConfig",
    "AveragingRun",
    "DaemonConfig",
    "LimitsConfig",
    "LogConfig",
    "PeerConfig",
    "RelayConfig",
    "RunConfig",
    "StatusConfig",
    "TrainingRun",
    "load_config",
    "parse_config",
    "parse_rate",
]

ENV_PREFIX: Final = "MOSHPIT_"
#: the largest vector an averaging run may own (float32 elements; 2**31 is 8 GiB)
MAX_VECTOR_SIZE: Final = 2**31
_MAX_RUN_ID = 64  # as averaging.grid.MAX_RUN_ID_LENGTH; checked again when the run starts


# -- the result ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PeerConfig:
    #: the key file; created with mode 0600 on first start when missing, never overwritten
    identity: Path
    #: name of the environment variable holding the key file's passphrase (None: no passphrase)
    passphrase_env: str | None
    listen: str
    announce_host: str | None
    bootstrap: tuple[str, ...]
    client_mode: bool
    #: after SIGTERM/SIGINT: seconds to withdraw records and finish the current round
    shutdown_timeout: float


@dataclasses.dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int
    max_connections_per_peer: int
    handshake_timeout: float
    max_incoming_calls: int
    max_incoming_streams: int
    #: the largest call (request or response) payload accepted, bytes
    max_call_bytes: int
    #: the largest stream chunk accepted, and the size this peer cuts its streams into, bytes
    max_chunk_bytes: int
    #: bytes a stream's sender may have in flight to this peer
    stream_window: int
    #: bytes/s this process sends at most, over all connections (None: no cap)
    upload_rate: float | None
    #: bytes/s this process reads at most, over all connections (None: no cap)
    download_rate: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class LogConfig:
    format: Literal["console", "json"]
    level: str


@dataclasses.dataclass(frozen=True, slots=True)
class StatusConfig:
    #: PeerIDs (text) allowed to call ``status``, or ``"*"`` for anyone; empty: nobody
    allow: tuple[str, ...]

    def allows(self, peer: PeerID) -> bool:
        """Whether ``peer`` may ask for this daemon's status."""
        return "*" in self.allow or str(peer) in self.allow


@dataclasses.dataclass(frozen=True, slots=True)
class AveragingRun:
    """Average a vector of ``size`` float32 elements that the daemon owns, every round."""

    run_id: str
    #: "auto" (groups from the live peers) or a fixed grid's axis sizes
    grid: tuple[int, ...] | Literal["auto"]
    size: int
    round_period: float
    round_timeout: float
    compression: str
    #: bytes/s this peer announces; spans are sized from it (``partition.spans``)
    bandwidth: float
    weight: float
    min_group_size: int
    #: the vector's first values: "zeros", or "random" (normal, seeded by the PeerID)
    init: Literal["zeros", "random"]
    #: grid "auto": the group size rows are laid out for, and the largest group a round forms
    #: (``auto_grid.group_size_limits``)
    target_group_size: int = DEFAULT_TARGET_GROUP_SIZE
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE
    #: pace a round's sends to each member at its share of ``bandwidth`` (``MoshpitAverager``)
    pace: bool = False
    kind: Literal["averaging"] = "averaging"


@dataclasses.dataclass(frozen=True, slots=True)
class TrainingRun:
    """Call ``entry`` (``"package.module:function"``) with a ``daemon.TrainingContext``."""

    run_id: str
    entry: str
    grid: tuple[int, ...] | Literal["auto"]
    round_period: float
    round_timeout: float
    compression: str
    bandwidth: float
    min_group_size: int
    #: the training peer's own key file (None: derived from [peer] identity and the run id)
    identity: Path | None
    #: where the training peer listens (None: the daemon's listen host, any port)
    listen: str | None
    #: free-form settings handed to the entry point as ``context.options``
    options: Mapping[str, Any]
    #: grid "auto": the group size rows are laid out for, and the largest group a round forms
    target_group_size: int = DEFAULT_TARGET_GROUP_SIZE
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE
    pace: bool = False
    kind: Literal["training"] = "training"


RunConfig: TypeAlias = AveragingRun | TrainingRun


@dataclasses.dataclass(frozen=True, slots=True)
class AccessConfig:
    """The ``[access]`` section (see ``wire/access.py``); the daemon reads ``allowlist_file``."""

    #: PeerIDs (text) of a private swarm; None (and no file): an open swarm
    allowlist: tuple[str, ...] | None
    #: a file of more PeerIDs, one a line; None: none
    allowlist_file: Path | None
    calls_per_s: float
    call_burst: float
    bytes_per_s: float
    byte_burst: float
    ban_after_refusals: int
    refusal_window: float
    ban_base: float
    ban_cap: float
    ban_on_protocol_error: bool
    ban_on_bad_data: bool

    @property
    def private(self) -> bool:
        return self.allowlist is not None or self.allowlist_file is not None


#: as ``relays.MAX_RELAYS`` (a relay record lists at most this many; that module needs trio)
MAX_RELAYS: Final = 4
#: the [relay] keys that are a relay's limits: ``RelayLimits``'s fields, with its defaults
RELAY_LIMIT_KEYS: Final = tuple(f.name for f in dataclasses.fields(RelayLimits))


@dataclasses.dataclass(frozen=True, slots=True)
class RelayConfig:
    """The ``[relay]`` section, resolved against ``[peer]`` and the runs.

    ``offer`` is whether this peer relays for client-mode peers (``offer_setting`` says what
    the configuration said: ``"auto"`` relays on a listening peer with no runs, a bootstrap
    node); ``limits`` are its limits then. ``relays`` are the relays a client-mode peer holds
    reservations on (the ``[peer] bootstrap`` list unless given; empty on a listening peer)
    and ``want`` how many at once.
    """

    offer: bool
    offer_setting: bool | Literal["auto"]
    limits: RelayLimits
    relays: tuple[str, ...]
    want: int


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonConfig:
    #: where the configuration came from (the file's path), for messages
    source: str
    peer: PeerConfig
    limits: LimitsConfig
    log: LogConfig
    status: StatusConfig
    runs: tuple[RunConfig, ...]
    access: AccessConfig
    relay: RelayConfig = RelayConfig(False, "auto", RelayLimits(), (), 2)

    @property
    def dht_only(self) -> bool:
        """No runs: a bootstrap node, which never needs numpy's averaging or torch."""
        return not self.runs


# -- values ----------------------------------------------------------------------------------


class _Where:
    """Where a value came from, for error messages: the file, the key, the variable or flag."""

    def __init__(self, source: str, key: str, origin: str | None = None) -> None:
        self.source, self.key, self.origin = source, key, origin

    def fail(self, expected: str, got: object) -> ConfigError:
        origin = f" (from {self.origin})" if self.origin else ""
        return ConfigError(f"{self.source}: {self.key}{origin}: expected {expected}, got {got!r}")


Check: TypeAlias = Callable[[Any, _Where], Any]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _string(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not value.strip():
        raise where.fail("a non-empty string", value)
    return value


def _optional_string(value: Any, where: _Where) -> str | None:
    if value == "":
        return None
    return _string(value, where)


def _boolean(value: Any, where: _Where) -> bool:
    if not isinstance(value, bool):
        raise where.fail("true or false", value)
    return value


def _integer(low: int, high: int | None = None) -> Check:
    def check(value: Any, where: _Where) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise where.fail(_range_text("an integer", low, high), value)
        if value < low or (high is not None and value > high):
            raise where.fail(_range_text("an integer", low, high), value)
        return value

    return check


def _range_text(what: str, low: float, high: float | None) -> str:
    return f"{what} >= {low:g}" if high is None else f"{what} in {low:g}..{high:g}"


def _seconds(*, allow_zero: bool) -> Check:
    expected = "seconds >= 0" if allow_zero else "seconds > 0"

    def check(value: Any, where: _Where) -> float:
        if not _is_number(value) or not math.isfinite(value):
            raise where.fail(f"a number of {expected}", value)
        if value < 0 or (value == 0 and not allow_zero):
            raise where.fail(f"a number of {expected}", value)
        return float(value)

    return check


def _positive_number(value: Any, where: _Where) -> float:
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise where.fail("a positive number", value)
    return float(value)


def _choice(*options: str) -> Check:
    def check(value: Any, where: _Where) -> str:
        if value not in options:
            raise where.fail("one of " + ", ".join(repr(o) for o in options), value)
        return str(value)

    return check


def _listen(value: Any, where: _Where) -> str:
    from .wire.address import InvalidAddress, parse_listen

    if not isinstance(value, str):
        raise where.fail("HOST:PORT to listen on, like '0.0.0.0:7070'", value)
    try:
        parse_listen(value)
    except InvalidAddress as exc:
        raise where.fail(f"HOST:PORT to listen on, like '0.0.0.0:7070' ({exc})", value) from None
    return value


def _addresses(value: Any, where: _Where) -> tuple[str, ...]:
    from .wire.address import InvalidAddress, PeerAddress

    expected = "a list of peer addresses like 'ws://HOST:PORT/PEER_ID'"
    if not isinstance(value, list):
        raise where.fail(expected, value)
    for item in value:
        if not isinstance(item, str):
            raise where.fail(expected, item)
        try:
            PeerAddress.parse(item)
        except InvalidAddress as exc:
            raise where.fail(f"{expected} ({exc})", item) from None
    return tuple(value)


def _allow(value: Any, where: _Where) -> tuple[str, ...]:
    return _peer_ids(value, where, star=True)


def _peer_ids(value: Any, where: _Where, *, star: bool = False) -> tuple[str, ...]:
    """A list of PeerIDs in canonical text; with ``star``, "*" (anyone) may be among them."""
    expected = 'a list of PeerIDs, or ["*"] for anyone' if star else "a list of PeerIDs"
    if not isinstance(value, list):
        raise where.fail(expected, value)
    out: list[str] = []
    for item in value:
        if star and item == "*":
            out.append("*")
            continue
        if not isinstance(item, str):
            raise where.fail(expected, item)
        try:
            out.append(str(PeerID.from_text(item)))
        except InvalidPeerID as exc:
            raise where.fail(f"{expected} ({exc})", item) from None
    return tuple(out)


def _bytes(value: Any, where: _Where) -> float:
    """A size in bytes: a number, or text with a unit ("16 GiB", "500 MB")."""
    try:
        size = parse_rate(value)
    except ValueError:
        raise where.fail("bytes as a number, or text like '16 GiB'", value) from None
    if not size > 0:
        raise where.fail("a positive number of bytes", value)
    return size


def _offer(value: Any, where: _Where) -> bool | Literal["auto"]:
    if value == "auto" or isinstance(value, bool):
        return value  # type: ignore[no-any-return]
    raise where.fail('"auto", true or false', value)


def _seconds_in(low: float, high: float) -> Check:
    def check(value: Any, where: _Where) -> float:
        expected = f"a number of seconds in {low:g}..{high:g}"
        if not _is_number(value) or not math.isfinite(value) or not low <= value <= high:
            raise where.fail(expected, value)
        return float(value)

    return check


def _level(value: Any, where: _Where) -> str:
    levels = ("debug", "info", "warning", "error")
    if not isinstance(value, str) or value.lower() not in levels:
        raise where.fail("one of " + ", ".join(repr(o) for o in levels), value)
    return value.lower()


def _path(base: Path) -> Check:
    def check(value: Any, where: _Where) -> Path:
        text = _string(value, where)
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~user" for a user this machine does not have
            raise where.fail("a file path ('~' only for users that exist here)", value) from None
        return path if path.is_absolute() else base / path

    return check


def _optional_path(base: Path) -> Check:
    def check(value: Any, where: _Where) -> Path | None:
        return None if value == "" else _path(base)(value, where)

    return check


def _rate(*, allow_zero: bool) -> Check:
    """A rate in bytes/s: a number, or text with a unit ("100 Mbit/s", "5 MB/s", "1.5GiB")."""

    def check(value: Any, where: _Where) -> float | None:
        expected = "a rate: bytes/s as a number, or text like '100 Mbit/s' or '5 MB/s'" + (
            " (0: no cap)" if allow_zero else ""
        )
        try:
            rate = parse_rate(value)
        except ValueError:
            raise where.fail(expected, value) from None
        if rate == 0 and allow_zero:
            return None
        if not rate > 0:
            raise where.fail(expected, value)
        return rate

    return check


_RATE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*(?:/\s*s)?\s*$")
_PREFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_rate(value: object) -> float:
    """Bytes per second from a number or from text with a unit.

    Units: ``B`` (bytes) or ``bit``, with an optional decimal (``k``, ``M``, ``G``) or binary
    (``Ki``, ``Mi``, ``Gi``) prefix and an optional ``/s``; a bare number is bytes/s. A lone
    ``b`` is refused (bits or bytes?). ``ValueError`` for anything else.

    >>> parse_rate("100 Mbit/s"), parse_rate("5 MB/s"), parse_rate(2e6), parse_rate("1KiB")
    (12500000.0, 5000000.0, 2000000.0, 1024.0)
    """
    if _is_number(value):
        rate = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        match = _RATE.match(value)
        if match is None:
            raise ValueError(f"not a rate: {value!r}")
        number, unit = float(match.group(1)), match.group(2)
        if unit.lower().endswith(("bit", "bits")):
            scale, prefix = 1 / 8, unit.lower().removesuffix("s").removesuffix("bit")
        elif unit.endswith("bps"):
            scale, prefix = 1 / 8, unit.removesuffix("bps").lower()
        elif unit.endswith("B"):
            scale, prefix = 1.0, unit.removesuffix("B").lower()
        elif unit in ("", "bytes", "byte"):
            scale, prefix = 1.0, ""
        else:
            raise ValueError(f"unknown unit in {value!r} (use B/s or bit/s)")
        if prefix not in _PREFIXES:
            raise ValueError(f"unknown unit prefix in {value!r}")
        rate = number * _PREFIXES[prefix] * scale
    else:
        raise ValueError(f"not a rate: {value!r}")
    if not math.isfinite(rate) or rate < 0:
        raise ValueError(f"not a rate: {value!r}")
    return rate


def _grid(value: Any, where: _Where) -> tuple[int, ...] | Literal["auto"]:
    expected = "'auto', or grid axis sizes like [4, 4] or '4x4' (each 1..1024, at most 8 axes)"
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str):
        parts = re.split(r"\s*[xX×]\s*", value.strip())
        if not all(p.isdecimal() and p.isascii() for p in parts):
            raise where.fail(expected, value)
        value = [int(p) for p in parts]
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= 8
        or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1024 for x in value)
    ):
        raise where.fail(expected, value)
    return tuple(value)


def _run_id(value: Any, where: _Where) -> str:
    expected = f"a run id of 1..{_MAX_RUN_ID} printable characters without '/'"
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= _MAX_RUN_ID
        or "/" in value
        or not value.isprintable()
    ):
        raise where.fail(expected, value)
    return value


_ENTRY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def _entry(value: Any, where: _Where) -> str:
    if not isinstance(value, str) or not _ENTRY.match(value):
        raise where.fail("an entry point like 'package.module:function'", value)
    return value


def _options(value: Any, where: _Where) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise where.fail("a table of settings for the entry point", value)
    return MappingProxyType(dict(value))


# -- the schema ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Key:
    check: Check
    #: how text from an environment variable or flag becomes a TOML-like value
    text: Literal["str", "bool", "auto_bool", "int", "float", "list", "rate"]
    default: Any = None
    required: bool = False


_RELAY: Final = RelayLimits()


def _section_schemas(base: Path) -> dict[str, dict[str, _Key]]:
    return {
        "peer": {
            "identity": _Key(_path(base), "str", "moshpit-key.pem"),
            "passphrase_env": _Key(_optional_string, "str", ""),
            "listen": _Key(_listen, "str", "0.0.0.0:7070"),
            "announce_host": _Key(_optional_string, "str", ""),
            "bootstrap": _Key(_addresses, "list", []),
            "client_mode": _Key(_boolean, "bool", False),
            "shutdown_timeout": _Key(_seconds(allow_zero=True), "float", 10.0),
        },
        "limits": {
            "max_connections": _Key(_integer(1, 100_000), "int", 256),
            "max_connections_per_peer": _Key(_integer(1, 16), "int", 2),
            "handshake_timeout": _Key(_seconds(allow_zero=False), "float", 10.0),
            "max_incoming_calls": _Key(_integer(1, 100_000), "int", 64),
            "max_incoming_streams": _Key(_integer(1, 100_000), "int", 16),
            "max_call_bytes": _Key(_integer(64 * 1024, 256 * 2**20), "int", 4 * 2**20),
            "max_chunk_bytes": _Key(_integer(64 * 1024, 256 * 2**20), "int", 4 * 2**20),
            "stream_window": _Key(_integer(64 * 1024, 2**31), "int", 16 * 2**20),
            "upload_rate": _Key(_rate(allow_zero=True), "rate", 0),
            "download_rate": _Key(_rate(allow_zero=True), "rate", 0),
        },
        "log": {
            "format": _Key(_choice("console", "json"), "str", "json"),
            "level": _Key(_level, "str", "info"),
        },
        "status": {
            "allow": _Key(_allow, "list", []),
        },
        # Defaults as wire/access.py's: far above what a swarm's own traffic needs.
        "access": {
            "allowlist": _Key(_peer_ids, "list", None),
            "allowlist_file": _Key(_optional_path(base), "str", ""),
            "calls_per_s": _Key(_positive_number, "float", 500.0),
            "call_burst": _Key(_positive_number, "float", 2000.0),
            "bytes_per_s": _Key(_rate(allow_zero=False), "rate", float(2**30)),
            "byte_burst": _Key(_bytes, "rate", float(16 * 2**30)),
            "ban_after_refusals": _Key(_integer(1, 1_000_000), "int", 100),
            "refusal_window": _Key(_seconds(allow_zero=False), "float", 10.0),
            "ban_base": _Key(_seconds(allow_zero=False), "float", 60.0),
            "ban_cap": _Key(_seconds(allow_zero=False), "float", 86400.0),
            "ban_on_protocol_error": _Key(_boolean, "bool", True),
            "ban_on_bad_data": _Key(_boolean, "bool", True),
        },
        # Limits as RelayLimits's defaults; lifetimes at most a day (what the wire carries).
        "relay": {
            "offer": _Key(_offer, "auto_bool", "auto"),
            "max_reservations": _Key(_integer(1, 100_000), "int", _RELAY.max_reservations),
            "reservation_ttl": _Key(_seconds_in(5, 86400), "float", _RELAY.reservation_ttl),
            "max_circuits": _Key(_integer(1, 100_000), "int", _RELAY.max_circuits),
            "max_circuits_per_peer": _Key(
                _integer(1, 100_000), "int", _RELAY.max_circuits_per_peer
            ),
            "circuit_lifetime": _Key(_seconds_in(10, 86400), "float", _RELAY.circuit_lifetime),
            "attach_timeout": _Key(_seconds_in(0.1, 3600), "float", _RELAY.attach_timeout),
            "circuit_bytes_per_s": _Key(
                _rate(allow_zero=False), "rate", _RELAY.circuit_bytes_per_s
            ),
            "circuit_burst": _Key(_bytes, "rate", _RELAY.circuit_burst),
            "total_bytes_per_s": _Key(_rate(allow_zero=False), "rate", _RELAY.total_bytes_per_s),
            "total_burst": _Key(_bytes, "rate", _RELAY.total_burst),
            "relays": _Key(_addresses, "list", None),
            "want": _Key(_integer(1, MAX_RELAYS), "int", 2),
        },
    }


def _run_schema(base: Path, kind: str) -> dict[str, _Key]:
    common = {
        "kind": _Key(_choice("averaging", "training"), "str", required=True),
        "run_id": _Key(_run_id, "str", required=True),
        "grid": _Key(_grid, "list", "auto"),
        # None: follows the other (auto_grid.group_size_limits)
        "target_group_size": _Key(_integer(2, MAX_GROUP_SIZE_LIMIT), "int", None),
        "max_group_size": _Key(_integer(2, MAX_GROUP_SIZE_LIMIT), "int", None),
        "round_period": _Key(_seconds(allow_zero=False), "float", 5.0),
        "round_timeout": _Key(_seconds(allow_zero=False), "float", None),
        "compression": _Key(_choice("none", "fp16", "8bit"), "str", "none"),
        "bandwidth": _Key(_rate(allow_zero=False), "rate", 1e8),
        "pace": _Key(_boolean, "bool", False),
        "min_group_size": _Key(_integer(1, 1024), "int", 2),
    }
    if kind == "averaging":
        return {
            **common,
            "size": _Key(_integer(1, MAX_VECTOR_SIZE), "int", required=True),
            "weight": _Key(_positive_number, "float", 1.0),
            "init": _Key(_choice("zeros", "random"), "str", "zeros"),
        }
    return {
        **common,
        "entry": _Key(_entry, "str", required=True),
        "identity": _Key(_optional_path(base), "str", ""),
        "listen": _Key(lambda v, w: None if v == "" else _listen(v, w), "str", ""),
        "options": _Key(_options, "str", {}),
    }


# Flags of `moshpit peer` that override a key: flag -> (section, key).
FLAG_KEYS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "--identity": ("peer", "identity"),
        "--listen": ("peer", "listen"),
        "--announce-host": ("peer", "announce_host"),
        "--bootstrap": ("peer", "bootstrap"),
        "--client-mode": ("peer", "client_mode"),
        "--shutdown-timeout": ("peer", "shutdown_timeout"),
        "--log-format": ("log", "format"),
        "--log-level": ("log", "level"),
        "--relay-offer": ("relay", "offer"),
    }
)


def _from_text(text: str, kind: str, where: _Where) -> Any:
    """An environment variable's (or flag's) text as the value a TOML file would hold."""
    if kind in ("str", "rate"):
        return text
    if kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "auto_bool" and text.strip().lower() == "auto":
        return "auto"
    if kind in ("bool", "auto_bool"):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise where.fail("true or false" if kind == "bool" else '"auto", true or false', text)
    try:
        return int(text.replace("_", "")) if kind == "int" else float(text)
    except ValueError:
        raise where.fail("an integer" if kind == "int" else "a number", text) from None


def _unknown(source: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1].split("] ")[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(
        f"{source}: {key}: unknown key{hint}; expected one of: {', '.join(sorted(known))}"
    )


def _section(
    source: str,
    name: str,
    raw: Any,
    schema: dict[str, _Key],
    label: Callable[[str], str],
    overrides: Mapping[str, tuple[Any, str]],
) -> dict[str, Any]:
    """Check one table against its schema; ``overrides`` maps key -> (value, origin)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name}: expected a table, got {raw!r}")
    for key in raw:
        if key not in schema:
            raise _unknown(source, label(key), list(schema))
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        origin: str | None = None
        if key in overrides:
            value, origin = overrides[key]
        elif key in raw:
            value = raw[key]
        elif spec.required:
            raise ConfigError(f"{source}: {label(key)}: missing (it is required)")
        else:
            value = spec.default
        where = _Where(source, label(key), origin)
        if value is None:
            out[key] = None
            continue
        if origin is not None and isinstance(value, str) and spec.text != "str":
            value = _from_text(value, spec.text, where)
        out[key] = spec.check(value, where)
    return out


def _environment(
    source: str,
    env: Mapping[str, str],
    schemas: dict[str, dict[str, _Key]],
    passphrase_var: str | None,
) -> dict[str, dict[str, tuple[Any, str]]]:
    found: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in schemas}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or var == passphrase_var:
            continue
        rest = var[len(ENV_PREFIX) :]
        section = next((s for s in schemas if rest.startswith(s.upper() + "_")), None)
        if section is None:
            continue  # not ours (MOSHPIT_SOMETHING_ELSE)
        key = rest[len(section) + 1 :].lower()
        if key not in schemas[section]:
            names = [f"{ENV_PREFIX}{section.upper()}_{k.upper()}" for k in schemas[section]]
            raise ConfigError(
                f"{source}: environment variable {var}: unknown key [{section}] {key}; "
                f"expected one of: {', '.join(names)}"
            )
        found[section][key] = (text, f"environment variable {var}")
    return found


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    base: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Parse and check a configuration given as TOML text.

    ``source`` names it in messages; relative paths in it are relative to ``base`` (default:
    the directory of ``source``). ``env`` is the environment to take ``MOSHPIT_*`` overrides
    from (default: none); ``flags`` maps flag names of ``FLAG_KEYS`` (``"--listen"``) to
    values (text, or a list of text for ``--bootstrap``, or ``True`` for ``--client-mode``).
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    base_dir = Path(base) if base is not None else Path(source).parent
    schemas = _section_schemas(base_dir)
    known = [*schemas, "runs"]
    for name in raw:
        if name not in known:
            raise _unknown(source, f"[{name}]", known)
    # The passphrase variable is named in [peer]; it is not an override of anything.
    peer_raw = raw.get("peer", {})
    passphrase_var = peer_raw.get("passphrase_env") if isinstance(peer_raw, dict) else None
    overrides = _environment(source, env or {}, schemas, passphrase_var)
    for flag, value in (flags or {}).items():
        if flag not in FLAG_KEYS:
            raise ConfigError(f"{flag}: not a flag that overrides the configuration")
        if value is None:
            continue
        section, key = FLAG_KEYS[flag]
        if isinstance(value, list | tuple) and schemas[section][key].text == "list":
            value = list(value)
        overrides[section][key] = (value, f"flag {flag}")
    sections = {
        name: _section(
            source,
            f"[{name}]",
            raw.get(name, {}),
            schema,
            lambda key, name=name: f"[{name}] {key}",  # type: ignore[misc]
            overrides[name],
        )
        for name, schema in schemas.items()
    }
    runs = _runs(source, raw.get("runs", []), base_dir)

    # Checks across two keys name both, each with where its value came from: an operator who
    # set MOSHPIT_PEER_CLIENT_MODE must learn that this variable is what made the config invalid.
    def where(section: str, key: str) -> _Where:
        origin = overrides[section].get(key, (None, None))[1]
        return _Where(source, f"[{section}] {key}", origin)

    def named(section: str, key: str) -> str:
        w = where(section, key)
        return w.key + (f" (from {w.origin})" if w.origin else "")

    peer = PeerConfig(**sections["peer"])
    if peer.client_mode and not peer.bootstrap:
        raise where("peer", "bootstrap").fail(
            f"at least one address when {named('peer', 'client_mode')} is true (a peer that "
            "never listens joins only through peers it dials)",
            [],
        )
    limits = LimitsConfig(**sections["limits"])
    chunk = min(4 * 2**20, limits.max_chunk_bytes)  # the chunk this peer's streams are cut into
    if limits.stream_window < chunk:
        from_key = named("limits", "max_chunk_bytes")
        raise where("limits", "stream_window").fail(
            f"at least one stream chunk ({chunk} bytes, from {from_key})", limits.stream_window
        )
    access = AccessConfig(**sections["access"])
    if access.ban_cap < access.ban_base:
        raise where("access", "ban_cap").fail(
            f"at least {named('access', 'ban_base')} ({access.ban_base:g} s)", access.ban_cap
        )
    relay_raw = raw.get("relay", {})

    def given(key: str) -> bool:
        return key in relay_raw or key in overrides["relay"]

    relay = _relay(sections["relay"], peer, runs, given, where, named)
    return DaemonConfig(
        source=source,
        peer=peer,
        limits=limits,
        log=LogConfig(**sections["log"]),
        status=StatusConfig(**sections["status"]),
        runs=runs,
        access=access,
        relay=relay,
    )


def _offer_text(setting: bool | str) -> str:
    return ("true" if setting else "false") if isinstance(setting, bool) else f'"{setting}"'


def _relay(
    values: dict[str, Any],
    peer: PeerConfig,
    runs: tuple[RunConfig, ...],
    given: Callable[[str], bool],
    where: Callable[[str, str], _Where],
    named: Callable[[str, str], str],
) -> RelayConfig:
    """Resolve ``[relay]`` against client mode and the runs; keys that cannot apply are
    mistakes (see the module docstring), each named with where its value came from."""
    setting = values["offer"]
    mode = named("peer", "client_mode")
    if peer.client_mode:
        if setting is True:
            raise where("relay", "offer").fail(
                f'false or "auto" when {mode} is true (nobody can dial a client-mode peer, '
                "so it cannot relay; run a relay on a machine with a public address)",
                True,
            )
        offer = False
    else:
        offer = setting is True or (setting == "auto" and not runs)
        for key in ("relays", "want"):
            if given(key) and values[key] != ():  # an empty list says what absence does
                raise where("relay", key).fail(
                    f"no [relay] {key} when {mode} is false (a listening peer is dialed "
                    "directly; relays serve client-mode peers): remove it, or set client_mode "
                    "= true",
                    list(values[key]) if key == "relays" else values[key],
                )
    if not offer:
        for key in RELAY_LIMIT_KEYS:
            if given(key):
                why = (
                    f"{mode} is true"
                    if peer.client_mode
                    else f"{named('relay', 'offer')} is {_offer_text(setting)}"
                    + (" and this peer has [[runs]]" if setting == "auto" else "")
                )
                raise where("relay", key).fail(
                    f"no relay limits on a peer that does not relay ({why}): remove it, or set "
                    "[relay] offer = true on a listening peer",
                    values[key],
                )
    if not given("max_circuits_per_peer"):  # the default yields to a smaller max_circuits
        values["max_circuits_per_peer"] = min(
            values["max_circuits_per_peer"], values["max_circuits"]
        )
    limits = RelayLimits(**{key: values[key] for key in RELAY_LIMIT_KEYS})
    if limits.max_circuits_per_peer > limits.max_circuits:
        raise where("relay", "max_circuits_per_peer").fail(
            f"at most {named('relay', 'max_circuits')} ({limits.max_circuits})",
            limits.max_circuits_per_peer,
        )
    relays: tuple[str, ...] = ()
    if peer.client_mode:
        relays = peer.bootstrap if values["relays"] is None else values["relays"]
    return RelayConfig(
        offer=offer, offer_setting=setting, limits=limits, relays=relays, want=values["want"]
    )


def _runs(source: str, raw: Any, base: Path) -> tuple[RunConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(
            f"{source}: runs: expected an array of tables ([[runs]] blocks), got {raw!r}"
        )
    runs: list[RunConfig] = []
    seen: set[str] = set()
    for i, table in enumerate(raw):
        label = f"runs[{i}]"
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {label}: expected a table, got {table!r}")
        kind = table.get("kind")
        if kind not in ("averaging", "training"):
            raise _Where(source, f"{label}.kind").fail("'averaging' or 'training'", kind)
        values = _section(
            source,
            label,
            table,
            _run_schema(base, kind),
            lambda key, label=label: f"{label}.{key}",  # type: ignore[misc]
            {},
        )
        period = values["round_period"]
        if values["round_timeout"] is None:
            values["round_timeout"] = 0.8 * period
        if not values["round_timeout"] < period:
            raise _Where(source, f"{label}.round_timeout").fail(
                f"seconds shorter than round_period ({period:g} s), or rounds skip slots",
                values["round_timeout"],
            )
        for key in ("target_group_size", "max_group_size"):
            if values["grid"] != "auto" and key in table:
                raise _Where(source, f"{label}.{key}").fail(
                    f"no {key} with a fixed grid (its axes size the groups); "
                    f'set grid = "auto" or remove {key}',
                    values[key],
                )
        target, most = values["target_group_size"], values["max_group_size"]
        if target is not None and most is not None and most < target:
            raise _Where(source, f"{label}.max_group_size").fail(
                f"at least target_group_size ({target})", most
            )
        values["target_group_size"], values["max_group_size"] = group_size_limits(target, most)
        if values["min_group_size"] > values["max_group_size"]:
            raise _Where(source, f"{label}.min_group_size").fail(
                f"at most max_group_size ({values['max_group_size']})", values["min_group_size"]
            )
        if values["run_id"] in seen:
            raise _Where(source, f"{label}.run_id").fail(
                "a run id not used by another run", values["run_id"]
            )
        seen.add(values["run_id"])
        values.pop("kind")
        runs.append(AveragingRun(**values) if kind == "averaging" else TrainingRun(**values))
    return tuple(runs)


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Read and check the configuration file at ``path`` (see ``parse_config``).

    Pass ``env=os.environ`` to apply ``MOSHPIT_*`` variables (the CLI does)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the configuration: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a text file (expected UTF-8 TOML)") from None
    return parse_config(text, source=str(p), base=p.resolve().parent, env=env, flags=flags)
