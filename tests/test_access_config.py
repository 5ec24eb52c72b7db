"""The [access] section of the daemon's configuration, and the policy the daemon builds from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from moshpit_trio.config import parse_config
from moshpit_trio.daemon import access_policy
from moshpit_trio.errors import ConfigError
from moshpit_trio.identity import Identity

A = Identity.from_seed(bytes([1]) * 32).peer_id
B = Identity.from_seed(bytes([2]) * 32).peer_id


def test_default_is_an_open_swarm_with_the_library_defaults() -> None:
    config = parse_config("", source="p.toml")
    assert not config.access.private
    policy = access_policy(config.access)
    assert policy.allowlist is None
    assert policy == type(policy)()  # the same defaults as wire/access.py


def test_allowlist_rates_and_bans(tmp_path: Path) -> None:
    (tmp_path / "members.txt").write_text(f"# the lab\n{B}  # second box\n\n")
    text = f"""
[access]
allowlist = ["{A}"]
allowlist_file = "members.txt"
calls_per_s = 50
call_burst = 100
bytes_per_s = "100 MB/s"
byte_burst = "1 GiB"
ban_after_refusals = 20
refusal_window = 5
ban_base = 30
ban_cap = 3600
ban_on_bad_data = false
"""
    config = parse_config(text, source=str(tmp_path / "p.toml"))
    assert config.access.allowlist_file == tmp_path / "members.txt"
    policy = access_policy(config.access)
    assert policy.allowlist == frozenset({A, B})
    assert (policy.rates.calls_per_s, policy.rates.call_burst) == (50, 100)
    assert (policy.rates.bytes_per_s, policy.rates.byte_burst) == (100e6, 2**30)
    assert (policy.rates.ban_after_refusals, policy.rates.refusal_window) == (20, 5)
    assert (policy.ban_base, policy.ban_cap, policy.ban_on_bad_data) == (30, 3600, False)
    assert policy.ban_on_protocol_error


def test_an_empty_allowlist_is_a_swarm_of_nobody_else() -> None:
    config = parse_config("[access]\nallowlist = []\n")
    assert access_policy(config.access).allowlist == frozenset()


def test_environment_overrides_the_allowlist() -> None:
    config = parse_config("", env={"MOSHPIT_ACCESS_ALLOWLIST": f"{A},{B}"})
    assert access_policy(config.access).allowlist == frozenset({A, B})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('allowlist = ["nope"]', r"p\.toml: \[access\] allowlist: expected a list of PeerIDs"),
        ("allowlist = 3", r"\[access\] allowlist: expected a list of PeerIDs, got 3"),
        ("calls_per_s = 0", r"\[access\] calls_per_s: expected a positive number, got 0"),
        ("byte_burst = 'lots'", r"\[access\] byte_burst: expected bytes as a number"),
        ("ban_after_refusals = 0", r"\[access\] ban_after_refusals: expected an integer in 1"),
        (
            "ban_base = 100\nban_cap = 10",
            r"ban_cap: expected at least \[access\] ban_base",
        ),
        ("ban_on_bad_data = 'yes'", r"\[access\] ban_on_bad_data: expected true or false"),
        ("alowlist = []", r"unknown key \(did you mean 'allowlist'\?\)"),
    ],
)
def test_mistakes_name_the_file_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(f"[access]\n{text}\n", source="p.toml")


def test_allowlist_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "m.txt").write_text(f"{A}\nnot-a-peer\n")
    config = parse_config('[access]\nallowlist_file = "m.txt"\n', source=str(tmp_path / "p.toml"))
    with pytest.raises(ConfigError, match=r"p\.toml: \[access\] allowlist_file: .*m\.txt line 2"):
        access_policy(config.access, str(tmp_path / "p.toml"))
    missing = parse_config(
        '[access]\nallowlist_file = "gone.txt"\n', source=str(tmp_path / "p.toml")
    )
    with pytest.raises(ConfigError, match=r"allowlist_file: cannot read .*gone\.txt"):
        access_policy(missing.access, "p.toml")
