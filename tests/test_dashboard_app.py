"""DashboardApp called as ASGI, without a server: whatever the request, a plain answer."""

from __future__ import annotations

import json
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from moshpit_trio.dashboard.app import DashboardApp
from moshpit_trio.dashboard.view import SwarmView

from .test_dashboard_view import T0, feed, progress, record


async def call(
    app: DashboardApp, path: str, query: bytes = b"", method: str = "GET"
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query}
    await app(scope, receive, send)
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


def app_with_peers() -> DashboardApp:
    view = SwarmView("apptest")
    feed(view, *(record(progress(i, samples=100 * i)) for i in range(1, 4)))
    view.tick(T0)
    return DashboardApp(view, lambda: T0 + 1)


async def test_every_endpoint_answers_json_with_the_security_headers() -> None:
    app = app_with_peers()
    for path in ("/api", "/api/swarm", "/api/history", "/api/peers", "/api/groups",
                 "/api/leaderboard"):  # fmt: skip
        status, headers, body = await call(app, path)
        assert status == 200 and headers[b"content-type"] == b"application/json"
        assert b"script-src 'self'" in headers[b"content-security-policy"]
        assert headers[b"cache-control"] == b"no-store"
        json.loads(body)
    status, _, body = await call(app, "/api/swarm", method="HEAD")
    assert status == 200 and body == b""
    status, headers, _ = await call(app, "/api/swarm", method="DELETE")
    assert status == 405 and headers[b"allow"] == b"GET, HEAD"
    assert (await call(app, "/favicon.ico"))[0] == 204
    page = json.loads((await call(app, "/api/peers", b"limit=2&sort=samples&order=asc"))[2])
    assert [r["samples"] for r in page["peers"]] == [100, 200] and page["total"] == 3


async def test_the_page_is_static_and_builds_its_dom_as_text() -> None:
    app = app_with_peers()
    _, _, html = await call(app, "/")
    _, _, script = await call(app, "/static/app.js")
    assert b"<script>" not in html and b"onclick" not in html  # no inline script (CSP)
    assert b"innerHTML" not in script and b"insertAdjacentHTML" not in script
    assert b"document.write" not in script and b"eval(" not in script


APP = app_with_peers()  # read-only below: one app for every example


@settings(max_examples=150, deadline=None)
@given(
    path=st.text(max_size=80).map(lambda s: "/" + s)
    | st.sampled_from(["/api/peers/", "/api/peers/mp", "/api/history", "/api/peers"]),
    query=st.binary(max_size=300),
)
def test_any_request_gets_a_plain_answer(path: str, query: bytes) -> None:
    async def main() -> tuple[int, dict[bytes, bytes], bytes]:
        return await call(APP, path, query)

    status, headers, body = trio.run(main)
    assert status in (200, 204, 400, 404)
    if headers[b"content-type"] == b"application/json":
        json.loads(body)
    if status == 400:
        assert "error" in json.loads(body)
