"""A real headless Chromium (Debian's), driven over the DevTools protocol: load a page, collect its console errors,
exceptions and network requests, measure what it drew, take a screenshot. For tests of the HTML hwcompat writes."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--no-first-run", "--mute-audio", "--hide-scrollbars",
         "--disable-component-update", "--window-size=1200,1600", "--remote-debugging-port=0", "--remote-allow-origins=*"]


@dataclass
class Visit:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    value: object = None
    screenshot: bytes = b""


def visit(url: str, expression: str, screenshot: bool = True, timeout: float = 60.0) -> Visit:
    """Load ``url``; evaluate ``expression`` (JSON.stringify'd by the caller) after the load event."""
    from websockets.sync.client import connect

    # its helper processes may still write the profile as they exit: cleanup errors are not the page's
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"})
        try:
            port = _port(proc, timeout)
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
            ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page")
            with connect(ws_url, max_size=64 << 20, open_timeout=timeout) as ws:
                return _drive(ws, url, expression, screenshot, timeout)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and every helper it started
            proc.wait()


def _port(proc, timeout: float) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if m:
            return int(m.group(1))
        if not line and proc.poll() is not None:
            break
    raise RuntimeError("chromium did not start its DevTools endpoint")


def _drive(ws, url: str, expression: str, screenshot: bool, timeout: float) -> Visit:
    seq, out = [0], Visit()

    def send(method, **params):
        seq[0] += 1
        ws.send(json.dumps({"id": seq[0], "method": method, "params": params}))
        return seq[0]

    def until(pred):
        t0 = time.time()
        while time.time() - t0 < timeout:
            msg = json.loads(ws.recv(timeout=timeout))
            _collect(msg, out)
            if pred(msg):
                return msg
        raise TimeoutError("no answer from chromium")

    for method in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
        i = send(method)
        until(lambda m, i=i: m.get("id") == i)
    send("Page.navigate", url=url)
    until(lambda m: m.get("method") == "Page.loadEventFired")
    i = send("Runtime.evaluate", expression=expression, returnByValue=True)
    out.value = until(lambda m: m.get("id") == i)["result"]["result"].get("value")
    if screenshot:
        i = send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        out.screenshot = base64.b64decode(until(lambda m: m.get("id") == i)["result"]["data"])
    return out


def _collect(msg: dict, out: Visit) -> None:
    method, p = msg.get("method"), msg.get("params", {})
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
        out.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
    elif method == "Runtime.exceptionThrown":
        out.console_errors.append(p["exceptionDetails"].get("text", "exception"))
    elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
        out.console_errors.append(p["entry"]["text"])
    elif method == "Network.requestWillBeSent":
        out.requests.append(p["request"]["url"])


# --- report.html in Chromium: what the report and demo tests check ------------------------------------------------

PLOTS = ("JSON.stringify([...document.querySelectorAll('figure.plot')].map(f => [f.dataset.title, "
         "[...f.querySelectorAll('path.series')].filter(p => p.getTotalLength() > 0).length]))")

REQUIRE = os.environ.get("HWCOMPAT_REQUIRE_CHROMIUM") == "1"  # read at import: the autouse fixture clears HWCOMPAT_*
def checked_report(page, tmp_path, shot_name):
    """Load the page in Chromium; assert it is self-contained and drew every plot; keep the screenshot."""
    assert CHROMIUM, "HWCOMPAT_REQUIRE_CHROMIUM=1 but no chromium is installed"
    v = visit(page.as_uri(), PLOTS)
    assert v.console_errors == []
    assert v.requests == [page.as_uri()]  # the file itself and nothing else: no network request
    shot = tmp_path / shot_name
    shot.write_bytes(v.screenshot)
    assert v.screenshot[:8] == b"\x89PNG\r\n\x1a\n" and len(v.screenshot) > 20_000
    return dict(v.value and json.loads(v.value))
