"""Open a page in a real headless Chromium (Debian's ``chromium``) and read it back through the
DevTools protocol: which images loaded, at what size. ``.ci/run`` installs Chromium where it is
missing; without it the tests that need a browser fail and say how to get one."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--remote-debugging-port=0", "--remote-allow-origins=*")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed; install it with: apt-get install -y chromium")
    return found


class Page:
    """One page in a fresh headless Chromium, driven over its DevTools websocket."""

    def __init__(self, url: str, timeout: float = 60.0):
        from websockets.sync.client import connect

        self._profile = Path(tempfile.mkdtemp(prefix="edgetune-chromium-"))
        self._process = subprocess.Popen([chromium(), *_FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port = self._port(timeout)
        target = self._page_target(port, timeout)
        self._ws = connect(target, max_size=None, open_timeout=timeout)
        self._ids = itertools.count(1)
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired", timeout)

    def _port(self, timeout: float) -> int:
        active = self._profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with status {self._process.returncode}")
            if active.exists() and active.read_text().strip():
                return int(active.read_text().split()[0])
            time.sleep(0.1)
        raise TimeoutError("chromium did not open its DevTools port")

    def _page_target(self, port: int, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise TimeoutError("chromium opened no page")

    def call(self, method: str, **params) -> dict:
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def _wait_event(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("method") == name:
                return
        raise TimeoutError(f"no {name}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def images(self) -> list[dict]:
        """Every <img>: its source, whether it finished loading, its decoded size."""
        return self.evaluate("Array.from(document.images).map(i => ({src: i.getAttribute('src'), "
                             "complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}))")

    def close(self) -> None:
        try:
            self._ws.close()
        finally:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
