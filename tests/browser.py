"""Headless Chromium, driven over its DevTools protocol, for the HTTP server's browser tests.

Debian's ``chromium`` package (installed by ``scripts/setup.sh test``) is started as the
machine documentation says a sandbox-less root may start it: headless, no GPU, no QUIC, no
background networking (every connection it makes is to 127.0.0.1), with a fresh profile in a
temporary directory that is removed afterwards, like the browser process itself. The
protocol goes over a WebSocket (the ``websocket-client`` package): one connection per tab,
requests by id, events ignored.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import websocket

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-features=MediaRouter,OptimizationHints",
    "--autoplay-policy=no-user-gesture-required",
    # A tab in the background keeps playing and running its timers (two tabs at once here).
    "--disable-background-media-suspend",
    "--disable-renderer-backgrounding",
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--mute-audio",
    "--window-size=1280,800",
    "--remote-debugging-port=0",
]


class Tab:
    """One page of the browser, over its own DevTools WebSocket."""

    def __init__(self, ws_url: str) -> None:
        self._ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._next = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command; its result (events that arrive meanwhile are dropped)."""
        self._next += 1
        ident = self._next
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            result: dict[str, Any] = message.get("result", {})
            return result

    def evaluate(self, expression: str, timeout: float = 60) -> Any:
        """The value of a JavaScript expression (a promise is awaited)."""
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
            timeout=int(timeout * 1000),
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        while self.evaluate("document.readyState") != "complete":
            assert time.monotonic() < deadline, f"{url} did not load"
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self._ws.close()


class Browser:
    """A running headless Chromium; `tab` opens pages."""

    def __init__(self, port: int) -> None:
        self.port = port

    def _json(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def tab(self, url: str = "about:blank") -> Tab:
        """A new tab, loaded with *url*."""
        target = self._json("/json/new?about:blank", method="PUT")
        tab = Tab(target["webSocketDebuggerUrl"])
        if url != "about:blank":
            tab.navigate(url)
        return tab


@contextlib.contextmanager
def chromium(executable: str) -> Iterator[Browser]:
    """Start Chromium with a fresh profile; kill it and remove the profile afterwards."""
    profile = Path(tempfile.mkdtemp(prefix="remotefs-chromium-"))
    process = subprocess.Popen(
        [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its renderers and helpers: one process group, ours
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not active.exists() or not active.read_text().strip():
            assert process.poll() is None, f"chromium exited with {process.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        yield Browser(int(active.read_text().split()[0]))
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # helpers left of the group we started
        shutil.rmtree(profile, ignore_errors=True)
