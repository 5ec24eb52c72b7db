"""``moshpit dashboard``: a live web page of one run's swarm.

- ``view.py``      SwarmView: records and status replies → what the page shows (sans-IO)
- ``app.py``       DashboardApp: the ASGI app (the page, ``/api/...`` JSON)
- ``collector.py`` Collector: reads ``mp.progress/RUN`` and asks daemons for ``status``
- ``server.py``    open_dashboard(): peer + collector + Hypercorn, as one block
- ``static/``      the page: HTML, one script, one stylesheet
"""

from .server import Dashboard, open_dashboard
from .view import Limits, SwarmView

__all__ = ["Dashboard", "Limits", "SwarmView", "open_dashboard"]
