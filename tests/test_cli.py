"""The `moshpit` command, run as a real process where it matters (bounded, always ended)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from moshpit_trio.cli import main
from moshpit_trio.identity import Identity, PeerID

MOSHPIT = [sys.executable, "-m", "moshpit_trio"]


def test_keygen_writes_a_0600_key_and_prints_its_peer_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(key)]) == 0
    printed = capsys.readouterr().out.strip()
    assert PeerID.from_text(printed) == Identity.load(key).peer_id
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert main(["id", str(key)]) == 0
    assert capsys.readouterr().out.strip() == printed


def test_keygen_never_overwrites_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pem"
    assert main(["keygen", "--out", str(key)]) == 0
    before = key.read_bytes()
    capsys.readouterr()
    assert main(["keygen", "--out", str(key)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert key.read_bytes() == before
    assert main(["keygen", "--out", str(key), "--force"]) == 0
    assert key.read_bytes() != before


def test_keygen_with_a_passphrase_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "k.pem"
    monkeypatch.setenv("MY_PASS", "correct horse")
    assert main(["keygen", "--out", str(key), "--passphrase-env", "MY_PASS"]) == 0
    assert b"ENCRYPTED" in key.read_bytes()
    capsys.readouterr()
    assert main(["id", str(key)]) == 2
    assert "encrypted; give its passphrase" in capsys.readouterr().err
    assert main(["id", str(key), "--passphrase-env", "UNSET_VAR_XYZ"]) == 2
    assert "UNSET_VAR_XYZ" in capsys.readouterr().err
    assert main(["id", str(key), "--passphrase-env", "MY_PASS"]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["id", "/nonexistent/key.pem"], "cannot read key file"),
        (["echo", "ws://127.0.0.1:1/nope", "hi"], "not a PeerID"),
        (["echo", "http://example", "hi"], "expected ws://HOST:PORT/PEER_ID"),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moshpit: error:") and message in err


def test_garbage_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k.pem"
    key.write_bytes(b"not a key")
    assert main(["id", str(key)]) == 2
    assert "not a PKCS8 PEM key" in capsys.readouterr().err


@pytest.mark.slow
def test_echo_demo_runs_two_peers_in_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [*MOSHPIT, "echo-demo", "--text", "hi there"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "got back 'hi there'" in done.stdout


@pytest.mark.slow
def test_echo_server_and_client_processes_and_sigterm(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [*MOSHPIT, "echo-server", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        address = server.stdout.readline().strip()
        assert address.startswith("ws://127.0.0.1:")
        client = subprocess.run(
            [*MOSHPIT, "echo", address, "signed hello"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == "signed hello"
        server.terminate()  # SIGTERM: leaves cleanly
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
