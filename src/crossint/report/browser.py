"""Render an HTML file in headless Chromium: console errors, the page's section ids, and a
screenshot. Used to check the report and to make the README's screenshot.

Talks to Chromium over the DevTools protocol on a pipe (``--remote-debugging-pipe``: commands
on fd 3, replies on fd 4, each JSON message ended by a NUL byte), so nothing but the standard
library and a Chromium binary is needed, and no port is opened.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossint.errors import CrossintError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")
PAGE_STATE = """JSON.stringify({
  title: document.title,
  sections: Array.from(document.querySelectorAll('section[id]')).map(s => s.id),
  brokenImages: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => i.alt),
  height: document.documentElement.scrollHeight
})"""


def find_browser() -> str | None:
    """A Chromium-family executable on PATH (or $CROSSINT_CHROMIUM), or None."""
    explicit = os.environ.get("CROSSINT_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) else None
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Rendering:
    """What the page did: errors it logged or threw, its state after load, screenshot path."""

    errors: list[str] = field(default_factory=list)
    title: str = ""
    sections: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    height: int = 0
    screenshot: Path | None = None


class _DevTools:
    """Minimal DevTools-protocol client over Chromium's debugging pipe."""

    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int,
                 timeout_s: float) -> None:
        self.process, self.to_browser, self.from_browser = process, to_browser, from_browser
        self.timeout_s = timeout_s
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CrossintError("Chromium did not answer in time")
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if ready:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    raise CrossintError("Chromium closed its debugging pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise CrossintError(f"Chromium: {method} failed: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            errors.append(details.get("exception", {}).get("description")
                          or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                   for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
    return errors


def render(html_path: str | Path, screenshot: str | Path | None = None, width: int = 1280,
           height: int = 900, full_page: bool = False, fragment: str = "",
           browser: str | None = None, timeout_s: float = 60.0) -> Rendering:
    """Load ``html_path`` in headless Chromium and report what happened; optionally save a PNG
    screenshot (the first ``height`` pixels, or the whole page with ``full_page``), scrolled to
    the element ``fragment`` names if given."""
    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise CrossintError(f"no such HTML file: {html_path}")
    browser = browser or find_browser()
    if browser is None:
        raise CrossintError("no Chromium found: install it (Debian: apt-get install chromium) "
                            "or set CROSSINT_CHROMIUM to its executable")
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire_pipes() -> None:  # in the child: fd 3 = commands in, fd 4 = replies out
        # via fresh copies: a pipe end may already be fd 3 or 4, and dup2 onto itself would
        # leave it close-on-exec
        commands, replies = os.dup(to_browser_r), os.dup(from_browser_w)
        os.dup2(commands, 3)
        os.dup2(replies, 4)

    with tempfile.TemporaryDirectory(prefix="crossint-chromium-") as profile:
        process = subprocess.Popen(
            [browser, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # close_fds would run after wire_pipes and close fds 3 and 4 again; Python's own
            # descriptors are not inheritable, so nothing else leaks into the child.
            preexec_fn=wire_pipes, close_fds=False,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        tools = _DevTools(process, to_browser_w, from_browser_r, timeout_s)
        try:
            return _drive(tools, html_path.as_uri() + (f"#{fragment}" if fragment else ""),
                          screenshot, width, height, full_page)
        finally:
            try:
                os.write(to_browser_w, json.dumps({"id": 0, "method": "Browser.close"}).encode()
                         + b"\0")
            except OSError:
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            os.close(to_browser_w)
            os.close(from_browser_r)


def _drive(tools: _DevTools, url: str, screenshot: str | Path | None, width: int,
           height: int, full_page: bool) -> Rendering:
    targets = tools.send("Target.getTargets")["targetInfos"]
    page = next((t for t in targets if t.get("type") == "page"), None)
    if page is None:
        page = {"targetId": tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]}
    session = tools.send("Target.attachToTarget",
                         {"targetId": page["targetId"], "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        tools.send(f"{domain}.enable", session=session)
    tools.send("Emulation.setDeviceMetricsOverride",
               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
               session=session)
    tools.events.clear()
    tools.send("Page.navigate", {"url": url}, session=session)
    tools.wait_for("Page.loadEventFired")
    state = json.loads(tools.send("Runtime.evaluate", {"expression": PAGE_STATE,
                                                       "returnByValue": True},
                                  session=session)["result"]["value"])
    rendering = Rendering(title=state["title"], sections=state["sections"],
                          broken_images=state["brokenImages"], height=int(state["height"]))
    if screenshot is not None:
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params.update(captureBeyondViewport=True, clip={
                "x": 0, "y": 0, "width": width, "height": rendering.height, "scale": 1})
        data = tools.send("Page.captureScreenshot", params, session=session)["data"]
        from crossint.io import atomic_write_bytes

        rendering.screenshot = atomic_write_bytes(screenshot, base64.b64decode(data))
    rendering.errors = _errors(tools.events)
    return rendering
