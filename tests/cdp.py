"""A real headless Chromium for tests, driven over the Chrome DevTools Protocol.

The browser is the system's (Debian's ``chromium`` package; ``.ci/run`` installs it). We talk
to it over its DevTools websocket with trio-websocket, which the project already depends on:
no driver binary, no test dependency, and it all runs inside the test's trio run.

    async with open_browser(tmp_path) as page:
        await page.goto(url)
        title = await page.eval("document.title")
        await page.screenshot(tmp_path / "page.png")

Leaving the block closes the browser (``Browser.close``), and ends its whole process group
(SIGTERM, then SIGKILL) if it has not exited within a few seconds.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

__all__ = ["Page", "find_chromium", "open_browser"]

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The browser to use: ``$MOSHPIT_CHROMIUM``, else the first of the usual names on PATH."""
    explicit = os.environ.get("MOSHPIT_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(Exception):
    pass


class Page:
    """One tab, attached over the browser's websocket (flat sessions)."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._next_id = 0
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self.session: str | None = None
        #: JavaScript exceptions and console errors the page produced, as text
        self.errors: list[str] = []

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                if "id" in message:
                    waiter = self._waiting.pop(message["id"], None)
                    if waiter is not None:
                        waiter.send_nowait(message)
                    continue
                method, params = message.get("method"), message.get("params", {})
                if method == "Runtime.exceptionThrown":
                    details = params.get("exceptionDetails", {})
                    exception = details.get("exception", {})
                    self.errors.append(exception.get("description") or details.get("text", "?"))
                elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                    self.errors.append(" ".join(str(a.get("value")) for a in params["args"]))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    self.errors.append(params["entry"].get("text", "?"))
        except ConnectionClosed:
            for waiter in self._waiting.values():
                waiter.close()

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, browser: bool = False
    ) -> dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params or {}}
        if not browser and self.session is not None:
            message["sessionId"] = self.session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[call_id] = send
        await self._ws.send_message(json.dumps(message))
        with trio.fail_after(30):
            try:
                answer = await receive.receive()
            except trio.EndOfChannel:
                raise CDPError(f"{method}: the browser went away") from None
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able; promises awaited)."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression[:60]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_for("document.readyState === 'complete'", timeout)

    async def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        """Evaluate ``expression`` until it is truthy (the page updates by itself); its value.
        Polling: the page changes on its own timer, not on anything this side could await."""
        last = None
        with trio.move_on_after(timeout):
            while True:
                last = await self.eval(expression)
                if last:
                    return last
                await trio.sleep(0.1)
        raise AssertionError(f"not true within {timeout} s: {expression} (last: {last!r})")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not just the window), written to ``path``."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        width, height = int(size["width"]), int(min(size["height"], 6000))
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        await trio.Path(path).write_bytes(base64.b64decode(shot["data"]))
        return path


async def _devtools_url(profile: Path, process: trio.Process, timeout: float) -> str:
    """Chromium writes its DevTools port and path to DevToolsActivePort once it listens."""
    port_file = profile / "DevToolsActivePort"
    with trio.fail_after(timeout):
        while True:
            if process.returncode is not None:
                raise CDPError(f"chromium exited at once with status {process.returncode}")
            try:
                port, path = port_file.read_text().split()[:2]
                return f"ws://127.0.0.1:{int(port)}{path}"
            except (OSError, ValueError):
                await trio.sleep(0.05)


async def _end_group(process: trio.Process) -> None:
    """trio.run_process's deliver_cancel: the browser and every helper it started."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)  # the group this test started (start_new_session)
        except ProcessLookupError:
            return
        with trio.move_on_after(grace):
            await process.wait()
            return


@asynccontextmanager
async def open_browser(
    tmp_path: Path, *, width: int = 1400, height: int = 1000
) -> AsyncIterator[Page]:
    executable = find_chromium()
    if executable is None:
        raise CDPError("no chromium found")
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    args = [
        executable,
        "--headless=new",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--window-size={width},{height}",
        "about:blank",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium's sandbox refuses to run as root
    log = (tmp_path / "chromium.log").open("wb")
    try:
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    check=False,
                    start_new_session=True,
                    deliver_cancel=_end_group,
                )
            )
            try:
                url = await _devtools_url(profile, process, timeout=60.0)
                async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
                    page = Page(ws)
                    nursery.start_soon(page._read)
                    target = await page.send("Target.createTarget", {"url": "about:blank"})
                    attached = await page.send(
                        "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
                    )
                    page.session = attached["sessionId"]
                    for domain in ("Page", "Runtime", "Log"):
                        await page.send(f"{domain}.enable")
                    try:
                        yield page
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(5):
                            with suppress(CDPError, ConnectionClosed):
                                await page.send("Browser.close", browser=True)
                            await process.wait()
            finally:
                nursery.cancel_scope.cancel()  # ends the reader, and the browser if still up
    finally:
        log.close()
