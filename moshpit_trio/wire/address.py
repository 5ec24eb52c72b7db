"""Peer addresses: ``ws://HOST:PORT/PEER_ID``.

The PeerID in the path is what makes an address safe to pass around: dialing it checks, in the
handshake, that whoever answers owns that PeerID.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress

from ..errors import InvalidPeerID, MoshpitError
from ..identity import PeerID

__all__ = ["InvalidAddress", "PeerAddress"]

_MAX_ADDRESS = 300


class InvalidAddress(MoshpitError, ValueError):
    """Text that is not a ``ws://HOST:PORT/PEER_ID`` address."""


@dataclasses.dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where a peer listens, and who it is.

    >>> a = PeerAddress.parse("ws://127.0.0.1:7070/mpcopdsqhgjnkjc4rardm2bv2bmkh4qjxasr25gqnhqcwn4pclqbya")
    >>> (a.host, a.port)
    ('127.0.0.1', 7070)
    >>> PeerAddress.parse(str(a)) == a
    True
    """

    host: str
    port: int
    peer_id: PeerID

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        if not isinstance(text, str):
            raise InvalidAddress(f"an address is a str, got {type(text).__name__}")
        # DHT answers carry the same addresses over and over; parsing (base32 included) is
        # pure, so remember recent results.
        return _parse_cached(text)

    @classmethod
    def _parse(cls, text: str) -> PeerAddress:
        if not isinstance(text, str):
            raise InvalidAddress(f"an address is a str, got {type(text).__name__}")
        if len(text) > _MAX_ADDRESS:
            raise InvalidAddress(f"address too long ({len(text)} characters)")
        if text.startswith("wss://"):
            raise InvalidAddress(f"{text!r}: wss:// (TLS) is not supported yet; use ws://")
        if not text.startswith("ws://"):
            raise InvalidAddress(f"{text!r}: expected ws://HOST:PORT/PEER_ID")
        rest = text[len("ws://") :]
        hostport, slash, path = rest.partition("/")
        if not slash or not path:
            raise InvalidAddress(f"{text!r}: the address has no /PEER_ID at the end")
        host, port = _split_hostport(text, hostport)
        try:
            peer_id = PeerID.from_text(path)
        except InvalidPeerID as exc:
            raise InvalidAddress(f"{text!r}: {exc}") from None
        return cls(host, port, peer_id)

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"ws://{self.hostport}/{self.peer_id}"


@functools.lru_cache(maxsize=4096)
def _parse_cached(text: str) -> PeerAddress:
    return PeerAddress._parse(text)


def _split_hostport(text: str, hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, bracket, port_text = hostport[1:].partition("]")
        if not bracket or not port_text.startswith(":"):
            raise InvalidAddress(f"{text!r}: expected [IPV6]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidAddress(f"{text!r}: {host!r} is not an IPv6 address") from None
        port_text = port_text[1:]
    else:
        host, colon, port_text = hostport.rpartition(":")
        if not colon or not host:
            raise InvalidAddress(f"{text!r}: expected HOST:PORT")
        if not all(c.isalnum() or c in "-._" for c in host):
            raise InvalidAddress(f"{text!r}: {host!r} is not a host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidAddress(f"{text!r}: port must be 1-65535, got {port_text!r}")
    return host, int(port_text)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse a listen address ``HOST:PORT`` (port 0 picks a free one)."""
    if not isinstance(text, str) or len(text) > _MAX_ADDRESS:
        raise InvalidAddress(f"a listen address is HOST:PORT, got {text!r}")
    if text.startswith("["):
        host, _, port_text = text[1:].partition("]")
        port_text = port_text[1:] if port_text.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise InvalidAddress(f"a listen address is HOST:PORT (port 0-65535), got {text!r}")
    return host, int(port_text)
