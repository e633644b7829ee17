"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol (CDP) on a
trio-websocket connection, for the browser tests.

Without a browser a test that asks for one skips with a message, except in CI (``CI``
set), where a missing browser is an error; ``python3 -m nox -s tests`` installs Debian's
``chromium`` when it may (root and apt-get).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

__all__ = ["Page", "artifacts_dir", "browser_page", "chromium"]


def chromium() -> str:
    """The browser to drive, or a skip (an error in CI) saying how to get one."""
    for candidate in (os.environ.get("TRIO_JOBS_CHROMIUM"), "chromium", "chromium-browser"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    message = (
        "no Chromium for the browser tests: apt-get install chromium "
        "(python3 -m nox -s tests installs it when run as root), or set TRIO_JOBS_CHROMIUM"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


_WAIT_SCRIPT = """new Promise((resolve) => {
  const deadline = Date.now() + MS;
  const check = () => {
    let value;
    try { value = (CONDITION); } catch (e) { value = undefined; }
    if (value) resolve({ok: true, value});
    else if (Date.now() > deadline) resolve({ok: false, text: document.body.innerText});
    else setTimeout(check, POLL);
  };
  check();
})"""


class Page:
    """One browser tab, attached over CDP (flat sessions on the browser's connection)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._events: list[dict[str, Any]] = []
        self.session: str | None = None
        self.init_scripts: list[str] = []
        """JavaScript run in every document :meth:`open` loads, before the page's own."""

    async def call(self, method: str, **params: Any) -> Any:
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if self.session is not None:
            message["sessionId"] = self.session
        await self._ws.send_message(json.dumps(message))
        while True:
            answer = json.loads(await self._ws.get_message())
            if answer.get("id") != ident:
                self._events.append(answer)
                continue
            if "error" in answer:
                raise AssertionError(f"{method}: {answer['error']}")
            return answer.get("result", {})

    async def wait_event(self, method: str) -> None:
        while not any(e.get("method") == method for e in self._events):
            self._events.append(json.loads(await self._ws.get_message()))

    async def open(self, url: str) -> None:
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session = attached["sessionId"]
        await self.call("Page.enable")
        for source in self.init_scripts:
            await self.call("Page.addScriptToEvaluateOnNewDocument", source=source)
        self._events.clear()
        await self.call("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")

    async def run(self, script: str) -> Any:
        """The value of an async JavaScript expression evaluated in the page."""
        result = await self.call(
            "Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_for(self, condition: str, timeout_s: float = 10.0, poll_ms: int = 25) -> Any:
        """Wait, polling in the page, until the JavaScript expression ``condition`` is
        truthy, and return its value; fails after ``timeout_s`` with the page's text."""
        script = (
            _WAIT_SCRIPT.replace("MS", str(int(timeout_s * 1000)))
            .replace("POLL", str(poll_ms))
            .replace("CONDITION", condition)
        )
        with trio.fail_after(timeout_s + 10):
            result = await self.run(script)
        if not result["ok"]:
            raise AssertionError(
                f"not within {timeout_s}s: {condition}\n--- page text ---\n{result['text']}"
            )
        return result.get("value")

    async def screenshot(self, path: Path, width: int = 1200) -> Path:
        """Save a PNG of the page at ``width`` CSS pixels and its full height at ``path``."""
        metrics = {"width": width, "deviceScaleFactor": 1, "mobile": False}
        await self.call("Emulation.setDeviceMetricsOverride", height=700, **metrics)
        height = await self.run("document.documentElement.scrollHeight")
        await self.call("Emulation.setDeviceMetricsOverride", height=max(700, height), **metrics)
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@asynccontextmanager
async def browser_page(browser: str, profile: Path) -> AsyncIterator[Page]:
    """Headless Chromium with a throw-away profile, one tab attached; killed on exit."""
    profile.mkdir()
    log = (profile.parent / "chromium.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        active = profile / "DevToolsActivePort"
        with trio.fail_after(30):
            while not (active.exists() and len(active.read_text().split("\n")) >= 2):
                assert proc.poll() is None, (profile.parent / "chromium.log").read_text()
                await trio.sleep(0.05)
        port, path = active.read_text().split("\n")[:2]
        url = f"ws://127.0.0.1:{port}{path}"
        async with trio_websocket.open_websocket_url(url, max_message_size=1 << 24) as ws:
            try:
                yield Page(ws)
            finally:
                await ws._stream.aclose()
    finally:
        with trio.CancelScope(shield=True):
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            log.close()


def artifacts_dir(fallback: Path) -> Path:
    """Where browser tests save screenshots: ``$TRIO_JOBS_ARTIFACTS`` or ``fallback``."""
    path = Path(os.environ.get("TRIO_JOBS_ARTIFACTS") or fallback)
    path.mkdir(parents=True, exist_ok=True)
    return path
