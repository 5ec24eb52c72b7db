"""The typed errors every layer raises.

Every failure a user or a remote peer can cause ends in one of these, with a message in plain
words that says what happened and, where there is one, what to do about it.
"""

from __future__ import annotations


class MoshpitError(Exception):
    """Base class of every error moshpit-trio raises on purpose."""


class ConfigError(MoshpitError, ValueError):
    """A bad argument or setting given by the local user (not by the network)."""


class IdentityError(MoshpitError):
    """A key file or PeerID that cannot be read, parsed or written."""


class InvalidPeerID(IdentityError, ValueError):
    """Text or bytes that are not a valid PeerID."""


class ProtocolError(MoshpitError):
    """The remote side broke the wire protocol; the connection is closed.

    ``reason`` is a short machine-friendly tag (``"bad-signature"``, ``"seq"``, ...) used in logs
    and tests; the message says the same in words.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class Unreachable(MoshpitError):
    """A peer could not be reached (refused, reset, closed, or the handshake failed)."""


class HandshakeFailed(Unreachable):
    """A dial reached something, but not the expected peer over our protocol (wrong PeerID,
    refused, not speaking ``moshpit/1``, or the handshake broke)."""


class PeerBusy(HandshakeFailed):
    """The peer turned the connection away at its connection limit (HTTP 503): it is there,
    but full. The transport dials again after short randomized waits while the call's time
    lasts, and raises this when that time runs out first. Not a sign that the peer is gone."""


class ConnectionLost(Unreachable):
    """An established connection ended while a call or stream was using it."""


class CrossedIdleClose(ConnectionLost):
    """The other end closed the connection as idle just as a stream went out on it: the
    stream was never served there, so sending it again on a new connection is safe."""


class DeadlineExceeded(MoshpitError, TimeoutError):
    """A call, stream or handshake did not finish before its deadline."""


class Rejected(MoshpitError):
    """The remote peer understood the request and refused it; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnknownHandler(Rejected):
    """The remote peer has no handler registered under the called name."""


class RemoteError(MoshpitError):
    """The remote handler failed with an unexpected error (its message is passed on)."""


class RelayRefused(Rejected):
    """A relay refused a reservation or a circuit, or the peer behind it refused the circuit.

    ``code`` is the tag sent on the wire (``"reservations-full"``, ``"no-reservation"``,
    ``"circuits-per-peer"``, ``"circuits-full"``, ``"circuit-id"``, ``"not-a-relay"``,
    ``"refused"``, ``"unreachable"``; SPEC.md "Relay"); the message says it in words.
    """

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)
