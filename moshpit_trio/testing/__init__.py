"""Test support: an in-memory network with fault injection (the library never imports this)."""

from __future__ import annotations

from .network import HostStats, MemoryHost, MemoryNetwork, MemoryStream

__all__ = ["HostStats", "MemoryHost", "MemoryNetwork", "MemoryStream"]
