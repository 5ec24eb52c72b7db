"""Moshpit All-Reduce: group keys, partitions, reduction, compression, matchmaking, all-reduce."""
