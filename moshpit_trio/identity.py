"""Peer identities: Ed25519 key pairs and the PeerIDs derived from them.

A PeerID is the sha256 of the raw 32-byte Ed25519 public key. Its text form is ``mp`` followed
by the 52-character lowercase base32 of those 32 bytes (no padding): plain ASCII that survives
URLs, shells, and a double-click to select it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import IdentityError, InvalidPeerID

__all__ = ["PUBLIC_KEY_SIZE", "SIGNATURE_SIZE", "Identity", "PeerID", "verify_signature"]

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_ID_SIZE = 32
_TEXT_PREFIX = "mp"
_TEXT_SIZE = len(_TEXT_PREFIX) + 52


class PeerID:
    """The 32-byte identifier of a peer: sha256 of its raw Ed25519 public key.

    >>> pid = PeerID(bytes(32))
    >>> PeerID.from_text(str(pid)) == pid
    True
    """

    __slots__ = ("_bytes", "_hash", "_text")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise InvalidPeerID(f"a PeerID is 32 bytes, got {type(raw).__name__}")
        raw = bytes(raw)
        if len(raw) != _ID_SIZE:
            raise InvalidPeerID(f"a PeerID is 32 bytes, got {len(raw)}")
        self._bytes = raw
        self._hash = hash(raw)
        self._text: str | None = None  # computed on first use: logs and addresses ask often

    @classmethod
    def from_public_key(cls, public_key: bytes) -> PeerID:
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise InvalidPeerID(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
        return cls(hashlib.sha256(public_key).digest())

    @classmethod
    def from_text(cls, text: str) -> PeerID:
        """Parse the text form (``mp`` + 52 base32 characters); case-insensitive."""
        if not isinstance(text, str):
            raise InvalidPeerID(f"a PeerID's text form is a str, got {type(text).__name__}")
        t = text.strip()
        if len(t) != _TEXT_SIZE or not t.lower().startswith(_TEXT_PREFIX):
            raise InvalidPeerID(
                f"not a PeerID: {text[:80]!r} (expected 'mp' followed by 52 base32 characters)"
            )
        try:
            raw = base64.b32decode(t[len(_TEXT_PREFIX) :].upper() + "====")
        except ValueError as exc:  # binascii.Error is a ValueError
            raise InvalidPeerID(f"not a PeerID: {text[:80]!r} ({exc})") from None
        pid = cls(raw)
        # 52 base32 characters hold 260 bits for 256: the last character's 4 low bits must be
        # zero, or 16 different texts would name the same peer.
        if str(pid) != t.lower():
            raise InvalidPeerID(
                f"not a PeerID: {text[:80]!r} (its last character is not the canonical one)"
            )
        return pid

    def to_bytes(self) -> bytes:
        return self._bytes

    def __bytes__(self) -> bytes:
        return self._bytes

    def __str__(self) -> str:
        if self._text is None:
            encoded = base64.b32encode(self._bytes).decode("ascii").rstrip("=").lower()
            self._text = _TEXT_PREFIX + encoded
        return self._text

    @property
    def short(self) -> str:
        """The first characters of the text form, for logs."""
        return str(self)[:10]

    def __repr__(self) -> str:
        return f"PeerID({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PeerID) and other._bytes == self._bytes

    def __lt__(self, other: PeerID) -> bool:
        return self._bytes < other._bytes

    def __hash__(self) -> int:
        return self._hash

    def __int__(self) -> int:
        """The id as a 256-bit integer (for XOR distance in the DHT)."""
        return int.from_bytes(self._bytes, "big")


def verify_signature(public_key: bytes, signature: bytes, message: bytes | memoryview) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes(public_key)).verify(
            bytes(signature), bytes(message)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


class Identity:
    """An Ed25519 key pair: signs for this peer, and names it by its PeerID.

    >>> ident = Identity.from_seed(bytes(32))
    >>> verify_signature(ident.public_key, ident.sign(b"hi"), b"hi")
    True
    """

    __slots__ = ("_key", "peer_id", "public_key")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id = PeerID.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (test vectors and tests only)."""
        if len(seed) != 32:
            raise IdentityError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    def sign(self, message: bytes | memoryview) -> bytes:
        return self._key.sign(bytes(message))

    # -- key files ---------------------------------------------------------------------------

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> Identity:
        try:
            key = serialization.load_pem_private_key(data, password=passphrase or None)
        except TypeError as exc:
            # cryptography says "Password was not given but private key is encrypted" (or the
            # reverse); say it in our words.
            if passphrase:
                raise IdentityError("the key file is not encrypted; give no passphrase") from exc
            raise IdentityError("the key file is encrypted; give its passphrase") from exc
        except ValueError as exc:
            raise IdentityError(
                f"cannot read the key (wrong passphrase, or not a PKCS8 PEM key): {exc}"
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"the key file holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(
        self,
        path: str | os.PathLike[str],
        passphrase: bytes | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Write the key as PKCS8 PEM with mode 0600; refuses to replace a file unless told to."""
        p = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(p, flags, 0o600)
        except FileExistsError:
            raise IdentityError(
                f"{p} already exists; refusing to overwrite a key (remove it first)"
            ) from None
        except OSError as exc:
            raise IdentityError(f"cannot write key file {p}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.to_pem(passphrase))

    @classmethod
    def load(cls, path: str | os.PathLike[str], passphrase: bytes | None = None) -> Identity:
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {p}: {exc.strerror}") from None
        try:
            return cls.from_pem(data, passphrase)
        except IdentityError as exc:
            raise IdentityError(f"{p}: {exc}") from None

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
