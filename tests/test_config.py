"""The daemon's configuration: TOML, MOSHPIT_* variables and flags, and every error's wording."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moshpit_trio.config import (
    MAX_RELAYS,
    AveragingRun,
    TrainingRun,
    load_config,
    parse_config,
    parse_rate,
)
from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import Identity
from moshpit_trio.relays import MAX_RELAYS as RECORD_MAX_RELAYS
from moshpit_trio.wire.relay_table import RelayLimits

PEER = str(Identity.from_seed(b"\x01" * 32).peer_id)
ADDRESS = f"ws://127.0.0.1:7070/{PEER}"
REPO = Path(__file__).resolve().parent.parent

FULL = f"""
[peer]
identity = "keys/peer.pem"
passphrase_env = "MY_PASS"
listen = "0.0.0.0:7171"
announce_host = "203.0.113.7"
bootstrap = ["{ADDRESS}"]
client_mode = false
shutdown_timeout = 4.5

[limits]
max_connections = 100
max_connections_per_peer = 3
handshake_timeout = 5
max_incoming_calls = 32
max_incoming_streams = 8
max_call_bytes = 1_048_576
max_chunk_bytes = 2_097_152
stream_window = 8_388_608
upload_rate = "20 Mbit/s"
download_rate = "10 MB/s"

[log]
format = "console"
level = "DEBUG"

[status]
allow = ["{PEER}", "*"]

[[runs]]
kind = "averaging"
run_id = "exp1"
grid = "3x2"
size = 1000
round_period = 2
round_timeout = 1.5
compression = "fp16"
bandwidth = "100 Mbit/s"
pace = true
weight = 2.5
min_group_size = 3
init = "random"

[[runs]]
kind = "training"
run_id = "digits"
entry = "mypkg.train:main"
grid = [4, 4]
identity = "/abs/train.pem"
listen = "0.0.0.0:7172"
options = {{ lr = 0.1, layers = [64, 10] }}
"""


def test_every_key_is_read(tmp_path: Path) -> None:
    config = parse_config(FULL, source=str(tmp_path / "peer.toml"))
    p = config.peer
    assert p.identity == tmp_path / "keys" / "peer.pem"  # relative to the file
    assert p.passphrase_env == "MY_PASS"
    assert (p.listen, p.announce_host, p.bootstrap) == ("0.0.0.0:7171", "203.0.113.7", (ADDRESS,))
    assert (p.client_mode, p.shutdown_timeout) == (False, 4.5)
    lim = config.limits
    assert (lim.max_connections, lim.max_connections_per_peer, lim.handshake_timeout) == (
        100,
        3,
        5.0,
    )
    assert (lim.max_incoming_calls, lim.max_incoming_streams) == (32, 8)
    assert (lim.max_call_bytes, lim.max_chunk_bytes, lim.stream_window) == (2**20, 2**21, 2**23)
    assert (lim.upload_rate, lim.download_rate) == (2.5e6, 1e7)
    assert (config.log.format, config.log.level) == ("console", "debug")
    assert config.status.allow == (PEER, "*")
    averaging, training = config.runs
    assert averaging == AveragingRun(
        run_id="exp1",
        grid=(3, 2),
        size=1000,
        round_period=2.0,
        round_timeout=1.5,
        compression="fp16",
        bandwidth=12.5e6,
        weight=2.5,
        min_group_size=3,
        init="random",
        pace=True,
    )
    assert isinstance(training, TrainingRun)
    assert (training.entry, training.grid, training.identity) == (
        "mypkg.train:main",
        (4, 4),
        Path("/abs/train.pem"),
    )
    assert training.listen == "0.0.0.0:7172"
    assert dict(training.options) == {"lr": 0.1, "layers": [64, 10]}
    assert not config.dht_only


def test_defaults() -> None:
    config = parse_config("", source="/etc/moshpit/peer.toml")
    assert config.peer.identity == Path("/etc/moshpit/moshpit-key.pem")
    assert config.peer.listen == "0.0.0.0:7070"
    assert config.peer.bootstrap == () and not config.peer.client_mode
    assert config.peer.shutdown_timeout == 10.0
    assert (config.log.format, config.log.level) == ("json", "info")
    assert config.status.allow == ()  # nobody may ask for the status unless named
    assert config.limits.upload_rate is None and config.limits.download_rate is None
    assert config.dht_only
    run = parse_config('[[runs]]\nkind = "averaging"\nrun_id = "r"\nsize = 3\n').runs[0]
    assert isinstance(run, AveragingRun)
    assert (run.grid, run.round_period, run.round_timeout) == ("auto", 5.0, 4.0)
    assert (run.target_group_size, run.max_group_size) == (32, 40)
    run = parse_config(
        '[[runs]]\nkind = "averaging"\nrun_id = "r"\nsize = 3\ntarget_group_size = 8\n'
    ).runs[0]
    assert (run.target_group_size, run.max_group_size) == (8, 10)  # the maximum follows
    run = parse_config(
        '[[runs]]\nkind = "averaging"\nrun_id = "r"\nsize = 3\nmax_group_size = 16\n'
    ).runs[0]
    assert (run.target_group_size, run.max_group_size) == (16, 16)  # so does the target
    assert (run.compression, run.bandwidth, run.weight, run.init) == ("none", 1e8, 1.0, "zeros")
    assert run.pace is False


def test_status_allow() -> None:
    other = Identity.from_seed(b"\x02" * 32).peer_id
    named = parse_config(f'[status]\nallow = ["{PEER}"]').status
    assert named.allows(Identity.from_seed(b"\x01" * 32).peer_id)
    assert not named.allows(other)
    assert parse_config('[status]\nallow = ["*"]').status.allows(other)
    assert not parse_config("").status.allows(other)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peer]\nlisten = 7070", r"\[peer\] listen: expected HOST:PORT .*got 7070"),
        ('[peer]\nlisten = "nohost"', r"\[peer\] listen: expected HOST:PORT"),
        ('[peer]\nlisen = "x:1"', r"\[peer\] lisen: unknown key \(did you mean 'listen'\?\)"),
        ("[peers]\n", r"\[peers\]: unknown key \(did you mean '\[peer\]'|\[peers\]: unknown key"),
        ('[peer]\nbootstrap = "ws://x"', r"\[peer\] bootstrap: expected a list of peer addresses"),
        ('[peer]\nbootstrap = ["ws://1.2.3.4:1/nope"]', r"bootstrap: expected a list of peer"),
        ("[peer]\nclient_mode = 1", r"\[peer\] client_mode: expected true or false, got 1"),
        (
            '[[runs]]\nkind = "averaging"\nrun_id = "r"\nsize = 3\npace = "on"',
            r"pace: expected true or false, got 'on'",
        ),
        (
            '[peer]\nidentity = "~no_such_user_here/k.pem"',
            r"\[peer\] identity: expected a file path",
        ),
        (
            "[peer]\nclient_mode = true",
            r"\[peer\] bootstrap: expected at least one address when \[peer\] client_mode is true",
        ),
        ("[peer]\nshutdown_timeout = -1", r"shutdown_timeout: expected a number of seconds >= 0"),
        ("[limits]\nmax_connections = 0", r"\[limits\] max_connections: expected an integer in"),
        ("[limits]\nmax_connections = 1.5", r"max_connections: expected an integer"),
        ('[limits]\nupload_rate = "fast"', r"upload_rate: expected a rate"),
        ('[limits]\nupload_rate = "5 Mb/s"', r"upload_rate: expected a rate"),
        ("[limits]\nstream_window = 65536", r"stream_window: expected at least one stream chunk"),
        ('[log]\nformat = "xml"', r"\[log\] format: expected one of 'console', 'json', got 'xml'"),
        ('[log]\nlevel = "loud"', r"\[log\] level: expected one of 'debug'"),
        ('[status]\nallow = ["me"]', r"\[status\] allow: expected a list of PeerIDs"),
        ('[status]\nallow = "*"', r"\[status\] allow: expected a list of PeerIDs"),
        ("runs = 3", r"runs: expected an array of tables"),
        ("[[runs]]\nrun_id = 'a'", r"runs\[0\].kind: expected 'averaging' or 'training'"),
        ("[[runs]]\nkind = 'averaging'\nsize = 3", r"runs\[0\].run_id: missing \(it is required"),
        ("[[runs]]\nkind = 'averaging'\nrun_id = 'a'", r"runs\[0\].size: missing"),
        ("[[runs]]\nkind = 'training'\nrun_id = 'a'", r"runs\[0\].entry: missing"),
        (
            "[[runs]]\nkind = 'training'\nrun_id = 'a'\nentry = 'not an entry'",
            r"runs\[0\].entry: expected an entry point like 'package.module:function'",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a/b'\nsize = 1",
            r"runs\[0\].run_id: expected a run id .* without '/'",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\nentry = 'm:f'",
            r"runs\[0\].entry: unknown key",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ngrid = [0]",
            r"runs\[0\].grid: expected 'auto', or grid axis sizes",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ngrid = 'autox'",
            r"runs\[0\].grid: expected 'auto', or grid axis sizes",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\nmax_group_size = 1",
            r"runs\[0\].max_group_size: expected",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ngrid = [4, 4]\n"
            "max_group_size = 8",
            r"runs\[0\].max_group_size: expected no max_group_size with a fixed grid",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ngrid = [4, 4]\n"
            "target_group_size = 8",
            r"runs\[0\].target_group_size: expected no target_group_size with a fixed grid",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ntarget_group_size = 300",
            r"runs\[0\].target_group_size: expected",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\ntarget_group_size = 20\n"
            "max_group_size = 16",
            r"runs\[0\].max_group_size: expected at least target_group_size \(20\)",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\nmax_group_size = 4\n"
            "min_group_size = 5",
            r"runs\[0\].min_group_size: expected at most max_group_size \(4\)",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\nround_period = 2\n"
            "round_timeout = 2",
            r"runs\[0\].round_timeout: expected seconds shorter than round_period \(2 s\)",
        ),
        (
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1\n"
            "[[runs]]\nkind = 'averaging'\nrun_id = 'a'\nsize = 1",
            r"runs\[1\].run_id: expected a run id not used by another run",
        ),
        ("[peer\n", r"not valid TOML"),
    ],
)
def test_errors_name_the_file_the_key_and_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="conf/peer.toml")
    assert str(caught.value).startswith("conf/peer.toml: ")
    assert re.search(message, str(caught.value)), str(caught.value)


def test_environment_overrides_the_file_and_flags_override_both() -> None:
    text = f'[peer]\nlisten = "127.0.0.1:1"\nbootstrap = ["{ADDRESS}"]\n'
    env = {
        "MOSHPIT_PEER_LISTEN": "127.0.0.1:2",
        "MOSHPIT_PEER_CLIENT_MODE": "yes",
        "MOSHPIT_PEER_SHUTDOWN_TIMEOUT": "2.5",
        "MOSHPIT_LIMITS_MAX_CONNECTIONS": "1_000",
        "MOSHPIT_LIMITS_UPLOAD_RATE": "1 MB/s",
        "MOSHPIT_STATUS_ALLOW": f"{PEER}, *",
        "MOSHPIT_LOG_LEVEL": "warning",
        "MOSHPIT_UNRELATED": "ignored",  # not a section of ours
        "PATH": "/bin",
    }
    config = parse_config(text, env=env)
    assert config.peer.listen == "127.0.0.1:2"
    assert config.peer.client_mode and config.peer.shutdown_timeout == 2.5
    assert config.limits.max_connections == 1000 and config.limits.upload_rate == 1e6
    assert config.status.allow == (PEER, "*")
    assert config.log.level == "warning"
    third = Identity.from_seed(bytes([3]) * 32).peer_id
    other = f"ws://10.0.0.1:7070/{third}"
    flagged = parse_config(
        text,
        env=env,
        flags={"--listen": "127.0.0.1:3", "--bootstrap": [other], "--log-level": None},
    )
    assert flagged.peer.listen == "127.0.0.1:3"
    assert flagged.peer.bootstrap == (other,)
    assert flagged.log.level == "warning"  # None: the flag was not given
    assert parse_config("", env={"MOSHPIT_PEER_BOOTSTRAP": ""}).peer.bootstrap == ()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"MOSHPIT_PEER_LISTN": "x:1"},
            r"environment variable MOSHPIT_PEER_LISTN: unknown key \[peer\] listn",
        ),
        (
            {"MOSHPIT_PEER_CLIENT_MODE": "maybe"},
            r"\[peer\] client_mode \(from environment variable MOSHPIT_PEER_CLIENT_MODE\): "
            r"expected true or false, got 'maybe'",
        ),
        (
            {"MOSHPIT_LIMITS_MAX_CONNECTIONS": "many"},
            r"\[limits\] max_connections \(from environment variable .*\): expected an integer",
        ),
        (
            {"MOSHPIT_PEER_SHUTDOWN_TIMEOUT": "-3"},
            r"shutdown_timeout \(from environment variable .*\): expected a number of seconds",
        ),
    ],
)
def test_environment_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config("", source="peer.toml", env=env)


def test_flag_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"\[peer\] listen \(from flag --listen\): expected"):
        parse_config("", flags={"--listen": "nope"})
    with pytest.raises(ConfigError, match=r"shutdown_timeout \(from flag --shutdown-timeout\)"):
        parse_config("", flags={"--shutdown-timeout": "soon"})


def test_the_passphrase_variable_is_not_mistaken_for_an_override() -> None:
    text = '[peer]\npassphrase_env = "MOSHPIT_PEER_SECRET"\n'
    config = parse_config(text, env={"MOSHPIT_PEER_SECRET": "hunter2"})
    assert config.peer.passphrase_env == "MOSHPIT_PEER_SECRET"


def test_load_config_reads_a_file_and_says_when_it_cannot(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[peer]\nidentity = "k.pem"\n')
    assert load_config(path).peer.identity == tmp_path / "k.pem"
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read the configuration"):
        load_config(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"p.toml: not a text file"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100 Mbit/s", 12.5e6),
        ("100mbit", 12.5e6),
        ("3 Mbps", 375e3),
        ("5 MB/s", 5e6),
        ("5MB", 5e6),
        ("1 KiB/s", 1024.0),
        ("2 GiB", 2.0 * 2**30),
        ("400 bit/s", 50.0),
        ("1e6", 1e6),
        ("  7  ", 7.0),
        ("7 bytes/s", 7.0),
    ],
)
def test_rates(text: str, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("text", ["5 Mb/s", "5b", "fast", "-1", "1 TB/s", "", "nan", "inf"])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


# -- hypothesis: whatever a key is set to, the answer is a value or a ConfigError naming it ------

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.one_of(st.integers(), st.text(max_size=10)), max_size=4),
)

_KEYS = [
    ("peer", "listen"),
    ("peer", "bootstrap"),
    ("peer", "client_mode"),
    ("peer", "shutdown_timeout"),
    ("peer", "identity"),
    ("limits", "max_connections"),
    ("limits", "max_call_bytes"),
    ("limits", "upload_rate"),
    ("limits", "handshake_timeout"),
    ("limits", "max_chunk_bytes"),
    ("limits", "stream_window"),
    ("access", "ban_base"),
    ("access", "ban_cap"),
    ("log", "format"),
    ("log", "level"),
    ("status", "allow"),
    ("relay", "offer"),
    ("relay", "max_reservations"),
    ("relay", "reservation_ttl"),
    ("relay", "max_circuits"),
    ("relay", "max_circuits_per_peer"),
    ("relay", "circuit_lifetime"),
    ("relay", "circuit_bytes_per_s"),
    ("relay", "total_burst"),
    ("relay", "relays"),
    ("relay", "want"),
]


def _toml(value: object) -> str | None:
    """``value`` as a TOML value, or None when TOML cannot hold it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        items = [_toml(v) for v in value]
        return None if any(i is None for i in items) else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    return None


@given(key=st.sampled_from(_KEYS), value=_values)
def test_any_value_gives_a_config_or_an_error_naming_the_key(
    key: tuple[str, str], value: object
) -> None:
    section, name = key
    literal = _toml(value)
    if literal is None or any(ord(c) < 32 or ord(c) == 127 for c in literal):
        return
    text = f"[{section}]\n{name} = {literal}\n"
    try:
        parse_config(text, source="h.toml")
    except ConfigError as exc:
        assert str(exc).startswith("h.toml: "), str(exc)
        assert f"[{section}] {name}" in str(exc) or "not valid TOML" in str(exc), str(exc)


@given(
    key=st.sampled_from(_KEYS),
    text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30),
)
def test_any_environment_text_gives_a_config_or_an_error_naming_the_variable(
    key: tuple[str, str], text: str
) -> None:
    section, name = key
    var = f"MOSHPIT_{section.upper()}_{name.upper()}"
    try:
        parse_config("", source="h.toml", env={var: text})
    except ConfigError as exc:
        assert f"[{section}] {name} (from environment variable {var})" in str(exc), str(exc)


@pytest.mark.parametrize(
    ("text", "env", "names"),
    [
        # the variable made the config invalid: the message says so, beside the key it needs
        (
            "",
            {"MOSHPIT_PEER_CLIENT_MODE": "TRUE"},
            [
                "h.toml: [peer] bootstrap: expected at least one address",
                "[peer] client_mode (from environment variable MOSHPIT_PEER_CLIENT_MODE)",
            ],
        ),
        (
            '[peer]\nclient_mode = true\nbootstrap = ["ws://127.0.0.1:1/' + PEER + '"]',
            {"MOSHPIT_PEER_BOOTSTRAP": ""},
            [
                "[peer] bootstrap (from environment variable MOSHPIT_PEER_BOOTSTRAP): expected",
                "when [peer] client_mode is true",
            ],
        ),
        (
            "[limits]\nstream_window = 1_048_576",
            {"MOSHPIT_LIMITS_MAX_CHUNK_BYTES": "2097152"},
            [
                "h.toml: [limits] stream_window: expected at least one stream chunk",
                "[limits] max_chunk_bytes (from environment variable "
                "MOSHPIT_LIMITS_MAX_CHUNK_BYTES)",
            ],
        ),
        (
            "[access]\nban_cap = 100",
            {"MOSHPIT_ACCESS_BAN_BASE": "500"},
            [
                "h.toml: [access] ban_cap: expected at least [access] ban_base (from "
                "environment variable MOSHPIT_ACCESS_BAN_BASE) (500 s), got 100",
            ],
        ),
    ],
)
def test_a_check_across_two_keys_names_both_and_where_each_came_from(
    text: str, env: dict[str, str], names: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="h.toml", env=env)
    for name in names:
        assert name in str(caught.value), str(caught.value)


@given(
    rate=st.floats(min_value=1e-3, max_value=1e12),
    unit=st.sampled_from(["B", "kB", "MB", "GB", "KiB", "MiB", "bit", "kbit", "Mbit", "Gbit"]),
)
def test_rate_units_scale_exactly(rate: float, unit: str) -> None:
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "KiB": 1024, "MiB": 2**20}.get(unit)
    if scale is None:
        scale = {"bit": 1, "kbit": 1e3, "Mbit": 1e6, "Gbit": 1e9}[unit] / 8
    assert parse_rate(f"{rate!r} {unit}/s") == pytest.approx(rate * scale)


# -- the ready configurations ----------------------------------------------------------------


def test_every_ready_config_in_peers_loads() -> None:
    """peers/*.toml must always load (so they never rot); their identity paths are the
    systemd layout's."""
    configs = sorted((REPO / "peers").glob("*.toml"))
    assert {p.name for p in configs} >= {"bootstrap.toml", "trainer.toml", "volunteer.toml"}
    for path in configs:
        config = load_config(path, env={})
        assert config.log.format == "json", path
    boot = load_config(REPO / "peers" / "bootstrap.toml", env={})
    assert boot.dht_only and not boot.peer.client_mode
    volunteer = load_config(REPO / "peers" / "volunteer.toml", env={})
    assert volunteer.peer.client_mode and volunteer.peer.bootstrap
    trainer = load_config(REPO / "peers" / "trainer.toml", env={})
    assert any(isinstance(r, TrainingRun) for r in trainer.runs)
    # a bootstrap node relays; a volunteer reserves on its bootstrap nodes; a trainer neither
    assert boot.relay.offer and boot.relay.limits == RelayLimits()
    assert not volunteer.relay.offer and volunteer.relay.relays == volunteer.peer.bootstrap
    assert not trainer.relay.offer and trainer.relay.relays == ()


def test_the_systemd_unit_outlasts_the_shutdown_bound() -> None:
    unit = (REPO / "peers" / "moshpit-peer.service").read_text()
    assert re.search(r"^Restart=on-failure$", unit, re.M)
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.M)
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    for path in (REPO / "peers").glob("*.toml"):
        # the daemon's bound, plus the goodbyes (close_timeout + 1 s), must fit
        assert load_config(path, env={}).peer.shutdown_timeout + 3 < stop, path


def test_environment_is_not_read_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOSHPIT_PEER_LISTEN", "garbage")
    assert parse_config("").peer.listen == "0.0.0.0:7070"
    with pytest.raises(ConfigError):
        parse_config("", env=os.environ)


# -- [relay] ---------------------------------------------------------------------------------

CLIENT = f'[peer]\nclient_mode = true\nbootstrap = ["{ADDRESS}"]\n'
RUN = '[[runs]]\nkind = "averaging"\nrun_id = "r"\nsize = 3\n'
OTHER = f"ws://10.0.0.9:7070/{Identity.from_seed(bytes([4]) * 32).peer_id}"


def test_relay_defaults_follow_what_the_peer_is() -> None:
    boot = parse_config("").relay  # listening, no runs: a bootstrap node relays
    assert (boot.offer, boot.offer_setting, boot.limits) == (True, "auto", RelayLimits())
    assert boot.relays == () and boot.want == 2
    worker = parse_config(RUN).relay  # a listening peer with runs keeps its uplink to itself
    assert not worker.offer and worker.offer_setting == "auto"
    assert parse_config(RUN + "[relay]\noffer = true\nmax_circuits = 8").relay.offer
    assert not parse_config("[relay]\noffer = false").relay.offer
    client = parse_config(CLIENT).relay  # a client-mode peer reserves on its bootstrap nodes
    assert (client.offer, client.relays, client.want) == (False, (ADDRESS,), 2)
    mine = parse_config(CLIENT + f'[relay]\nrelays = ["{OTHER}", "{ADDRESS}"]\nwant = 1').relay
    assert (mine.relays, mine.want) == ((OTHER, ADDRESS), 1)
    assert parse_config(CLIENT + "[relay]\nrelays = []").relay.relays == ()  # opted out
    assert parse_config("[relay]\nrelays = []").relay.relays == ()  # says what absence does
    assert MAX_RELAYS == RECORD_MAX_RELAYS  # config.py may not import relays.py (trio)


def test_relay_limits_are_read_with_units() -> None:
    relay = parse_config(
        """
[relay]
offer = true
max_reservations = 10
reservation_ttl = 60
max_circuits = 20
max_circuits_per_peer = 4
circuit_lifetime = 600
attach_timeout = 5
circuit_bytes_per_s = "20 Mbit/s"
circuit_burst = "4 MiB"
total_bytes_per_s = 5e6
total_burst = "16 MB"
"""
    ).relay
    assert relay.limits == RelayLimits(
        max_reservations=10,
        reservation_ttl=60.0,
        max_circuits=20,
        max_circuits_per_peer=4,
        circuit_lifetime=600.0,
        attach_timeout=5.0,
        circuit_bytes_per_s=2.5e6,
        circuit_burst=4.0 * 2**20,
        total_bytes_per_s=5e6,
        total_burst=16e6,
    )
    # a smaller max_circuits takes the per-peer default down with it, unless that was given
    assert parse_config("[relay]\nmax_circuits = 4").relay.limits.max_circuits_per_peer == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[relay]\noffer = "yes"', r'\[relay\] offer: expected "auto", true or false, got \'yes\''),
        ("[relay]\noffer = 1", r'\[relay\] offer: expected "auto", true or false, got 1'),
        (
            CLIENT + "[relay]\noffer = true",
            r'\[relay\] offer: expected false or "auto" when \[peer\] client_mode is true '
            r"\(nobody can dial a client-mode peer",
        ),
        (
            f'[relay]\nrelays = ["{OTHER}"]',
            r"\[relay\] relays: expected no \[relay\] relays when \[peer\] client_mode is false "
            r"\(a listening peer is dialed directly",
        ),
        ("[relay]\nwant = 1", r"\[relay\] want: expected no \[relay\] want when \[peer\] client"),
        (CLIENT + "[relay]\nwant = 5", r"\[relay\] want: expected an integer in 1\.\.4, got 5"),
        (CLIENT + "[relay]\nwant = 0", r"\[relay\] want: expected an integer in 1\.\.4, got 0"),
        (CLIENT + '[relay]\nrelays = ["ws://x"]', r"\[relay\] relays: expected a list of peer"),
        (CLIENT + f'[relay]\nrelays = "{OTHER}"', r"\[relay\] relays: expected a list of peer"),
        (
            "[relay]\noffer = false\nmax_circuits = 3",
            r"\[relay\] max_circuits: expected no relay limits on a peer that does not relay "
            r"\(\[relay\] offer is false\): remove it, or set \[relay\] offer = true",
        ),
        (
            RUN + "[relay]\ntotal_bytes_per_s = 1000",
            r"\[relay\] total_bytes_per_s: expected no relay limits .*\(\[relay\] offer is "
            r'"auto" and this peer has \[\[runs\]\]\)',
        ),
        (
            CLIENT + "[relay]\nmax_reservations = 3",
            r"\[relay\] max_reservations: expected no relay limits .*\(\[peer\] client_mode is "
            r"true\)",
        ),
        ("[relay]\nmax_reservations = 0", r"\[relay\] max_reservations: expected an integer in"),
        ("[relay]\nmax_circuits = 2.5", r"\[relay\] max_circuits: expected an integer"),
        (
            "[relay]\nmax_circuits = 4\nmax_circuits_per_peer = 5",
            r"\[relay\] max_circuits_per_peer: expected at most \[relay\] max_circuits \(4\), "
            r"got 5",
        ),
        ("[relay]\nreservation_ttl = 1", r"reservation_ttl: expected a number of seconds in 5"),
        ("[relay]\ncircuit_lifetime = 1e6", r"circuit_lifetime: expected a number of seconds in"),
        ("[relay]\nattach_timeout = 0", r"attach_timeout: expected a number of seconds in"),
        ('[relay]\ncircuit_bytes_per_s = "fast"', r"circuit_bytes_per_s: expected a rate"),
        ("[relay]\ncircuit_bytes_per_s = 0", r"circuit_bytes_per_s: expected a rate"),
        ('[relay]\ntotal_burst = "-1 MB"', r"\[relay\] total_burst: expected bytes"),
        ("[relay]\nofer = true", r"\[relay\] ofer: unknown key \(did you mean 'offer'\?\)"),
    ],
)
def test_relay_errors_name_the_key_and_what_to_do(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="conf/peer.toml")
    assert str(caught.value).startswith("conf/peer.toml: ")
    assert re.search(message, str(caught.value)), str(caught.value)


def test_relay_from_the_environment_and_the_flag() -> None:
    env = {
        "MOSHPIT_RELAY_OFFER": "AUTO",
        "MOSHPIT_RELAY_CIRCUIT_BYTES_PER_S": "10 Mbit/s",
        "MOSHPIT_RELAY_MAX_CIRCUITS": "1_000",
    }
    relay = parse_config(RUN, env=env | {"MOSHPIT_RELAY_OFFER": "on"}).relay
    assert relay.offer and relay.limits.circuit_bytes_per_s == 1.25e6
    assert relay.limits.max_circuits == 1000
    assert not parse_config("", flags={"--relay-offer": "false"}).relay.offer
    assert parse_config(RUN, flags={"--relay-offer": "true"}).relay.offer
    assert parse_config("", env={"MOSHPIT_RELAY_OFFER": "no"}, flags={"--relay-offer": "auto"})
    client = parse_config(
        CLIENT, env={"MOSHPIT_RELAY_RELAYS": f"{OTHER}, {ADDRESS}", "MOSHPIT_RELAY_WANT": "1"}
    ).relay
    assert (client.relays, client.want) == ((OTHER, ADDRESS), 1)
    # the relays follow the bootstrap list wherever that came from
    flagged = parse_config(CLIENT, flags={"--bootstrap": [OTHER]}).relay
    assert flagged.relays == (OTHER,)


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        (
            "",
            {"MOSHPIT_RELAY_OFFER": "sometimes"},
            r"\[relay\] offer \(from environment variable MOSHPIT_RELAY_OFFER\): expected "
            r'"auto", true or false, got \'sometimes\'',
        ),
        (
            CLIENT,
            {"MOSHPIT_RELAY_OFFER": "1"},
            r"\[relay\] offer \(from environment variable MOSHPIT_RELAY_OFFER\): expected false "
            r'or "auto" when \[peer\] client_mode is true',
        ),
        (
            f'[peer]\nbootstrap = ["{ADDRESS}"]\n[relay]\noffer = true',
            {"MOSHPIT_PEER_CLIENT_MODE": "true"},
            r"\[relay\] offer: expected false or \"auto\" when \[peer\] client_mode \(from "
            r"environment variable MOSHPIT_PEER_CLIENT_MODE\) is true",
        ),
        (
            "",
            {"MOSHPIT_RELAY_RELAYS": OTHER},
            r"\[relay\] relays \(from environment variable MOSHPIT_RELAY_RELAYS\): expected no "
            r"\[relay\] relays when \[peer\] client_mode is false",
        ),
        (
            RUN,
            {"MOSHPIT_RELAY_MAX_CIRCUITS": "10"},
            r"\[relay\] max_circuits \(from environment variable MOSHPIT_RELAY_MAX_CIRCUITS\): "
            r"expected no relay limits",
        ),
        (
            "[relay]\nmax_circuits_per_peer = 100",
            {"MOSHPIT_RELAY_MAX_CIRCUITS": "10"},
            r"\[relay\] max_circuits_per_peer: expected at most \[relay\] max_circuits \(from "
            r"environment variable MOSHPIT_RELAY_MAX_CIRCUITS\) \(10\), got 100",
        ),
        (
            CLIENT,
            {"MOSHPIT_RELAY_WANT": "two"},
            r"\[relay\] want \(from environment variable MOSHPIT_RELAY_WANT\): expected an integer",
        ),
        (
            "",
            {"MOSHPIT_RELAY_TOTAL_BYTES_PER_S": "lots"},
            r"\[relay\] total_bytes_per_s \(from environment variable "
            r"MOSHPIT_RELAY_TOTAL_BYTES_PER_S\): expected a rate",
        ),
        (
            "",
            {"MOSHPIT_RELAY_OFFERS": "true"},
            r"environment variable MOSHPIT_RELAY_OFFERS: unknown key \[relay\] offers",
        ),
    ],
)
def test_relay_environment_errors_name_the_variable(
    text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="h.toml", env=env)
    assert re.search(message, str(caught.value)), str(caught.value)


def test_a_relay_flag_error_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"\[relay\] offer \(from flag --relay-offer\)"):
        parse_config(CLIENT, flags={"--relay-offer": "true"})
