"""Identities, PeerIDs and key files."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.errors import IdentityError, InvalidPeerID
from moshpit_trio.identity import Identity, PeerID, verify_signature

SEED = bytes([1]) * 32


# -- PeerID --------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(raw=st.binary(min_size=32, max_size=32))
def test_text_round_trip(raw: bytes) -> None:
    pid = PeerID(raw)
    text = str(pid)
    assert len(text) == 54 and text.startswith("mp")
    assert text == text.lower() and text.isascii() and text.isalnum()
    assert PeerID.from_text(text) == pid
    assert PeerID.from_text(text.upper()) == pid
    assert PeerID.from_text(f"  {text}\n") == pid
    assert PeerID.from_text(text).to_bytes() == raw
    assert bytes(pid) == raw
    assert int(pid) == int.from_bytes(raw, "big")


def test_text_form_is_lowercase_unpadded_base32() -> None:
    raw = hashlib.sha256(b"x").digest()
    assert str(PeerID(raw)) == "mp" + base64.b32encode(raw).decode().rstrip("=").lower()


@settings(max_examples=300)
@given(
    raw=st.binary(min_size=32, max_size=32),
    last=st.sampled_from("abcdefghijklmnopqrstuvwxyz234567"),
)
def test_each_peer_id_has_one_text(raw: bytes, last: str) -> None:
    text = str(PeerID(raw))
    other = text[:-1] + last
    if other == text:
        return
    try:
        parsed = PeerID.from_text(other)
    except InvalidPeerID:
        return
    assert parsed != PeerID(raw)  # another peer, never another name for this one
    assert str(parsed) == other


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mp",
        "xx" + "a" * 52,
        "mp" + "a" * 51,
        "mp" + "a" * 53,
        "mp" + "1" * 52,  # 0, 1, 8 and 9 are not in the base32 alphabet
        "mp" + "a" * 51 + "=",
        "mp" + "a" * 25 + " " + "a" * 26,
        "mp" + "é" * 52,
        "mpaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",  # padding bits set
    ],
)
def test_bad_text(text: str) -> None:
    with pytest.raises(InvalidPeerID) as info:
        PeerID.from_text(text)
    assert isinstance(info.value, ValueError)
    assert "PeerID" in str(info.value)


@pytest.mark.parametrize("value", [b"abc", 42, None])
def test_bad_text_type(value: object) -> None:
    with pytest.raises(InvalidPeerID):
        PeerID.from_text(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"", bytes(31), bytes(33), "a" * 32, 5])
def test_bad_raw(raw: object) -> None:
    with pytest.raises(InvalidPeerID):
        PeerID(raw)  # type: ignore[arg-type]


def test_peer_id_equality_hash_order() -> None:
    a, b = PeerID(bytes(32)), PeerID(b"\x01" * 32)
    assert a == PeerID(bytearray(32)) == PeerID(memoryview(bytes(32)))
    assert a != b and a != bytes(32)
    assert len({a, PeerID(bytes(32)), b}) == 2
    assert a < b and sorted([b, a]) == [a, b]
    assert repr(a) == f"PeerID({a})"
    assert a.short == str(a)[:10]


def test_peer_id_from_public_key() -> None:
    identity = Identity.from_seed(SEED)
    assert identity.peer_id == PeerID(hashlib.sha256(identity.public_key).digest())
    assert PeerID.from_public_key(identity.public_key) == identity.peer_id
    with pytest.raises(InvalidPeerID):
        PeerID.from_public_key(bytes(31))


# -- identities and signatures -----------------------------------------------------------------


def test_seeded_identities_are_deterministic() -> None:
    a, b = Identity.from_seed(SEED), Identity.from_seed(SEED)
    assert a.public_key == b.public_key and a.peer_id == b.peer_id
    assert a.sign(b"m") == b.sign(b"m")
    assert Identity.from_seed(bytes([2]) * 32).peer_id != a.peer_id
    with pytest.raises(IdentityError):
        Identity.from_seed(bytes(31))


def test_generated_identities_differ() -> None:
    assert Identity.generate().peer_id != Identity.generate().peer_id


def test_sign_and_verify() -> None:
    identity = Identity.from_seed(SEED)
    signature = identity.sign(memoryview(b"message"))
    assert len(signature) == 64
    assert verify_signature(identity.public_key, signature, b"message")
    assert verify_signature(identity.public_key, signature, memoryview(b"message"))
    assert not verify_signature(identity.public_key, signature, b"messagE")
    assert not verify_signature(Identity.generate().public_key, signature, b"message")
    assert not verify_signature(identity.public_key[:31], signature, b"message")
    assert not verify_signature(identity.public_key, signature[:63], b"message")
    assert not verify_signature(identity.public_key, bytes(64), b"message")


# -- key files -----------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("passphrase", [None, b"correct horse"])
def test_save_and_load(tmp_path: Path, passphrase: bytes | None) -> None:
    identity = Identity.generate()
    path = tmp_path / "key.pem"
    identity.save(path, passphrase)
    assert _mode(path) == 0o600
    text = path.read_bytes()
    assert text.startswith(
        b"-----BEGIN ENCRYPTED PRIVATE KEY-----" if passphrase else b"-----BEGIN PRIVATE KEY-----"
    )
    loaded = Identity.load(path, passphrase)
    assert loaded.peer_id == identity.peer_id
    assert loaded.sign(b"x") == identity.sign(b"x")
    assert repr(loaded) == f"Identity({identity.peer_id})"


def test_mode_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        Identity.generate().save(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "k.pem") == 0o600


def test_wrong_passphrase(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    Identity.generate().save(path, b"right")
    with pytest.raises(IdentityError) as info:
        Identity.load(path, b"wrong")
    assert str(path) in str(info.value)
    with pytest.raises(IdentityError, match="encrypted; give its passphrase"):
        Identity.load(path)


def test_passphrase_for_an_unencrypted_key(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    Identity.generate().save(path)
    with pytest.raises(IdentityError, match="not encrypted"):
        Identity.load(path, b"something")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    first, second = Identity.generate(), Identity.generate()
    first.save(path)
    with pytest.raises(IdentityError, match="already exists"):
        second.save(path)
    assert Identity.load(path).peer_id == first.peer_id
    path.chmod(0o644)
    second.save(path, overwrite=True)
    assert Identity.load(path).peer_id == second.peer_id
    assert _mode(path) == 0o600


def test_unreadable_and_unwritable_paths(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot read key file"):
        Identity.load(tmp_path / "missing.pem")
    with pytest.raises(IdentityError, match="cannot write key file"):
        Identity.generate().save(tmp_path / "no" / "such" / "dir" / "key.pem")


def test_not_a_key(tmp_path: Path) -> None:
    path = tmp_path / "junk.pem"
    path.write_bytes(b"this is not a key\n")
    with pytest.raises(IdentityError, match="not a PKCS8 PEM key"):
        Identity.load(path)


def test_a_key_of_another_type(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        Identity.load(path)
