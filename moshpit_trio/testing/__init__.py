"""Test support: an in-memory network with fault injection (the library never imports this)."""

from __future__ import annotations

from .clock import PINNED_UNIX_TIME, pin_unix_time
from .network import HostStats, MemoryHost, MemoryNetwork, MemoryStream

__all__ = [
    "PINNED_UNIX_TIME",
    "HostStats",
    "MemoryHost",
    "MemoryNetwork",
    "MemoryStream",
    "pin_unix_time",
]
