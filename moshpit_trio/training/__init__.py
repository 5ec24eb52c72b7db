"""Training on top of the averager: swarm progress in the DHT, and state for joiners.

- ``progress``: ``ProgressTracker`` publishes this peer's progress and follows the swarm's
  (global epoch, samples, throughput); ``SwarmProgress`` / ``PeerProgress`` are its views.
- ``state``: ``StateServer`` serves this peer's ``TrainingState`` to joiners;
  ``download_state`` fetches one from a live donor (``StateUnavailable`` when none gives it).
"""

from __future__ import annotations

from .progress import PeerProgress, ProgressTracker, SwarmProgress
from .state import StateServer, StateUnavailable, TrainingState, download_state

__all__ = [
    "PeerProgress",
    "ProgressTracker",
    "StateServer",
    "StateUnavailable",
    "SwarmProgress",
    "TrainingState",
    "download_state",
]
