"""The Kademlia DHT: routing table, lookups and signed records (sans-IO), and the node."""

from __future__ import annotations

from .node import BootstrapFailed, DHTNode, DHTSettings, DHTValue, LookupFailed
from .records import NamespacePolicy, Namespaces, Record, RecordRejected

__all__ = [
    "BootstrapFailed",
    "DHTNode",
    "DHTSettings",
    "DHTValue",
    "LookupFailed",
    "NamespacePolicy",
    "Namespaces",
    "Record",
    "RecordRejected",
]
