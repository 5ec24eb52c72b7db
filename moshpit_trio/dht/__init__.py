"""Kademlia DHT: routing table, iterative lookups, records, and the node that serves them."""
