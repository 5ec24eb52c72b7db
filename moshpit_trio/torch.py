"""PyTorch integration: ``from moshpit_trio.torch import MoshpitOptimizer``.

Importing this module imports torch; the rest of the package does not need it to run a DHT or
bootstrap peer.
"""

from __future__ import annotations

from .training.optimizer import MoshpitOptimizer

__all__ = ["MoshpitOptimizer"]
