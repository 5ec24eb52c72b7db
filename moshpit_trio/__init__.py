"""moshpit-trio: Moshpit SGD across unreliable peers, over a signed websocket protocol, on trio."""

from __future__ import annotations

from .errors import (
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    HandshakeFailed,
    IdentityError,
    InvalidPeerID,
    MoshpitError,
    ProtocolError,
    Rejected,
    RemoteError,
    Unreachable,
    UnknownHandler,
)
from .identity import Identity, PeerID

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConnectionLost",
    "DeadlineExceeded",
    "HandshakeFailed",
    "Identity",
    "IdentityError",
    "InvalidPeerID",
    "MoshpitError",
    "PeerID",
    "ProtocolError",
    "Rejected",
    "RemoteError",
    "UnknownHandler",
    "Unreachable",
    "__version__",
]
