"""The dashboard's web app: a small ASGI application (no framework) over a ``SwarmView``.

    GET /                       the page (static HTML; it fetches everything else as JSON)
    GET /static/app.js, /static/style.css
    GET /api                    the list of endpoints below
    GET /api/swarm              the swarm now: peers, samples, samples/s, epoch, loss, rounds
    GET /api/history?points=N   the swarm over time (N <= 4000 points, evenly thinned)
    GET /api/peers?offset=&limit=&sort=&order=&q=&state=
                                one page (limit <= 200) of the live peers
    GET /api/peers/PEER_ID      one peer, and its leaderboard credit
    GET /api/groups?limit=      the last round's groups
    GET /api/leaderboard?offset=&limit=
                                every peer seen, by samples contributed

Only GET and HEAD; every answer says ``Cache-Control: no-store``. Bad parameters get 400 with
``{"error": "..."}``. The page is static: no record's text is ever put into HTML on the server,
and the page's Content-Security-Policy allows only its own script (no inline script), which
builds the DOM with ``textContent``.
"""

from __future__ import annotations

import importlib.resources
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from ..errors import ConfigError, InvalidPeerID
from ..identity import PeerID
from .view import SwarmView

__all__ = ["API", "DashboardApp"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: the endpoints, as ``/api`` lists them
API = {
    "/api/swarm": "the swarm now: peer counts, samples, samples/s, epoch, loss, rounds",
    "/api/history?points=500": "the swarm over time: live peers, samples, epoch, loss",
    "/api/peers?offset=0&limit=50&sort=samples&order=desc&q=&state=": "one page of peers",
    "/api/peers/PEER_ID": "one peer and its leaderboard credit",
    "/api/groups?limit=50": "the last round's groups",
    "/api/leaderboard?offset=0&limit=20": "every peer seen, by samples contributed",
}

_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
}
_SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        b"img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_MAX_QUERY = 2048
_json = msgspec.json.Encoder()


class _BadRequest(Exception):
    pass


def _load_static() -> dict[str, tuple[bytes, bytes]]:
    files = importlib.resources.files(__package__).joinpath("static")
    return {
        path: (files.joinpath(name).read_bytes(), kind.encode())
        for path, (name, kind) in _STATIC.items()
    }


class DashboardApp:
    """The ASGI app. ``clock()`` is the current Unix time (the collector's peer's)."""

    def __init__(self, view: SwarmView, clock: Callable[[], float]) -> None:
        self.view = view
        self.clock = clock
        self._static = _load_static()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not served (the page polls)
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            await _respond(
                send, 405, *_error("only GET and HEAD"), method, [(b"allow", b"GET, HEAD")]
            )
            return
        path = scope.get("path", "/")
        try:
            status, body, kind = self._route(path, scope.get("query_string", b""))
        except _BadRequest as exc:
            status, (body, kind) = 400, _error(str(exc))
        except ConfigError as exc:
            status, (body, kind) = 400, _error(str(exc))
        await _respond(send, status, body, kind, method)

    def _route(self, path: str, raw_query: bytes) -> tuple[int, bytes, bytes]:
        static = self._static.get(path)
        if static is not None:
            return 200, *static
        if path == "/favicon.ico":
            return 204, b"", b"image/x-icon"  # none: say so without an error in the console
        if path in ("/api", "/api/"):
            return 200, *_ok({"run": self.view.run_id, "endpoints": API})
        query = _query(raw_query)
        now = self.clock()
        view = self.view
        if path == "/api/swarm":
            return 200, *_ok(view.summary(now))
        if path == "/api/history":
            return 200, *_ok(view.history(_int(query, "points", 500)))
        if path == "/api/peers":
            return 200, *_ok(
                view.peers(
                    now,
                    offset=_int(query, "offset", 0),
                    limit=_int(query, "limit", 50),
                    sort=query.get("sort", "samples"),
                    order=query.get("order", "desc"),
                    query=query.get("q", "")[:100],
                    state=query.get("state", ""),
                )
            )
        if path.startswith("/api/peers/"):
            text = path.removeprefix("/api/peers/")
            try:
                peer = PeerID.from_text(text)
            except InvalidPeerID:
                raise _BadRequest("not a PeerID") from None
            found = view.peer(peer, now)
            if found is None:
                return 404, *_error("no such peer seen")
            return 200, *_ok(found)
        if path == "/api/groups":
            return 200, *_ok(view.groups(_int(query, "limit", 50)))
        if path == "/api/leaderboard":
            return 200, *_ok(view.leaderboard(_int(query, "offset", 0), _int(query, "limit", 20)))
        return 404, *_error("not found")


def _ok(data: Any) -> tuple[bytes, bytes]:
    return _json.encode(data), b"application/json"


def _error(message: str) -> tuple[bytes, bytes]:
    return _json.encode({"error": message}), b"application/json"


def _query(raw: bytes) -> dict[str, str]:
    if len(raw) > _MAX_QUERY:
        raise _BadRequest(f"query string over {_MAX_QUERY} bytes")
    try:
        pairs = urllib.parse.parse_qsl(raw.decode("ascii"), strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise _BadRequest("query string is not ASCII") from None
    return dict(pairs)


def _int(query: dict[str, str], name: str, default: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 10):
        raise _BadRequest(f"{name} must be a non-negative integer")
    return int(text)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    kind: bytes,
    method: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", kind),
        (b"content-length", str(len(body)).encode()),
        *_SECURITY_HEADERS,
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
