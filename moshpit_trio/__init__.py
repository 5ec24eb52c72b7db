"""moshpit-trio: Moshpit SGD across unreliable peers, over an encrypted websocket protocol."""

from __future__ import annotations

from .averaging.averager import MoshpitAverager, RoundReport
from .errors import (
    ConfigError,
    ConnectionLost,
    DeadlineExceeded,
    HandshakeFailed,
    IdentityError,
    InvalidPeerID,
    MoshpitError,
    PeerBusy,
    ProtocolError,
    Rejected,
    RemoteError,
    UnknownHandler,
    Unreachable,
)
from .identity import Identity, PeerID
from .peer import Peer, open_peer

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConnectionLost",
    "DeadlineExceeded",
    "HandshakeFailed",
    "Identity",
    "IdentityError",
    "InvalidPeerID",
    "MoshpitAverager",
    "MoshpitError",
    "Peer",
    "PeerBusy",
    "PeerID",
    "ProtocolError",
    "Rejected",
    "RemoteError",
    "RoundReport",
    "UnknownHandler",
    "Unreachable",
    "__version__",
    "open_peer",
]
