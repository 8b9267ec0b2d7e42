"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
messages ending in NUL on fds 3 and 4), so no websocket library is needed. A page is opened with
every host name unresolvable; every request it makes and every console/security message is kept.

    with Browser(tmp_path / "profile") as b:
        page = b.open(path)          # waits for the load event
        page.evaluate("document.title"), page.requests, page.problems, page.screenshot(file)

Also what the report tests read off a page, in the browser (SHOWN) and as HTML (HtmlPage, embedded_pngs).
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


class Browser:
    def __init__(self, profile: Path, width: int = 1200, height: int = 1600) -> None:
        exe = shutil.which("chromium")
        assert exe, "chromium is missing: apt-get install chromium (make test installs it: scripts/system-deps.sh)"
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def protocol_fds() -> None:  # in the child: commands in on fd 3, messages out on fd 4
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        # MAP * ~NOTFOUND: no host name resolves, so a page that needed the network would show broken images
        self.proc = subprocess.Popen(
            [exe, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", f"--window-size={width},{height}",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=protocol_fds, close_fds=False)
        os.close(cmd_r)
        os.close(out_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _read(self, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = end - time.monotonic()
            assert left > 0, "chromium did not answer in time"
            if select.select([self._out_r], [], [], left)[0]:
                chunk = os.read(self._out_r, 1 << 20)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 120) -> dict:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read(timeout)
            if m.get("id") == self._id:
                assert "error" not in m, (method, m["error"])
                return m.get("result", {})
            self.events.append(m)

    def open(self, path: Path, timeout: float = 120) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Network", "Log", "Runtime"):
            self.send(f"{domain}.enable", session=session)
        first = len(self.events)
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                      for e in self.events[first:]):
            self.events.append(self._read(timeout))
        return Page(self, session, first)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._out_r)


class Page:
    def __init__(self, browser: Browser, session: str, first_event: int) -> None:
        self.browser, self.session, self.first = browser, session, first_event

    def _events(self, *methods: str) -> list[dict]:
        return [e for e in self.browser.events[self.first:]
                if e.get("sessionId") == self.session and e.get("method") in methods]

    @property
    def requests(self) -> list[str]:
        """The URL of every request the page made (data: URLs included)."""
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    @property
    def problems(self) -> list[str]:
        """Console errors and warnings, security (CSP) and network messages, failed loads."""
        out = [e["params"]["entry"]["text"] for e in self._events("Log.entryAdded")
               if e["params"]["entry"]["level"] in ("error", "warning")]
        out += [f"console.{e['params']['type']}" for e in self._events("Runtime.consoleAPICalled")
                if e["params"]["type"] in ("error", "warning")]
        out += [f"failed: {e['params'].get('errorText') or e['params'].get('blockedReason')}"
                for e in self._events("Network.loadingFailed")]
        return out

    def evaluate(self, expression: str) -> Any:
        r = self.browser.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": True}, session=self.session)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def screenshot(self, path: Path, max_height: int | None = None) -> Path:
        size = self.browser.send("Page.getLayoutMetrics", session=self.session)["cssContentSize"]
        height = size["height"] if max_height is None else min(size["height"], max_height)
        shot = self.browser.send("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": height, "scale": 1}}, session=self.session)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


# -- what a report page shows -----------------------------------------------------------------------
# what the page shows once loaded, read in the browser
SHOWN = """({
  images: Array.from(document.images, i => ({alt: i.alt, width: i.naturalWidth, height: i.naturalHeight})),
  text: document.body.innerText,
  backends: Array.from(document.querySelectorAll("table.backends tr[data-backend]"), tr => ({
    name: tr.dataset.backend, top1: Number(tr.querySelector("td.top1").dataset.value),
    cells: Array.from(tr.cells, c => c.innerText.trim()), best: tr.classList.contains("best")})),
  parameters: document.querySelector(".parameters").innerText,
  titles: Array.from(document.querySelectorAll("img.grid"), i => i.previousElementSibling.innerText),
})"""


class HtmlPage(HTMLParser):
    """The images, the top-1 cells of the backends table and the visible text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.top1: dict[str, tuple[str, str]] = {}  # backend -> (data-value, text shown)
        self.text: list[str] = []
        self._backend: str | None = None
        self._cell: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a)
        elif tag == "tr":
            self._backend = a.get("data-backend")
        elif tag == "td" and "top1" in (a.get("class") or "").split():
            self._cell = {"value": a.get("data-value"), "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.top1[self._backend] = (self._cell["value"], self._cell["text"].strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell["text"] += data


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"), dtype=np.float64)


def assert_picture(data: bytes, min_side: int = 100, max_side: int = 4000) -> None:
    """A valid PNG of a sensible size that is not blank."""
    px = png_pixels(data)
    assert min(px.shape) >= min_side and max(px.shape) <= max_side, px.shape
    assert px.var() > 100.0, px.var()  # a white page with a few grey lines stays far below this


def embedded_pngs(page: HtmlPage) -> list[bytes]:
    prefix = "data:image/png;base64,"
    assert page.images and all(img["src"].startswith(prefix) for img in page.images)
    return [base64.b64decode(img["src"][len(prefix):]) for img in page.images]
