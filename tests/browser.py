"""Headless Chromium driven over the DevTools protocol (a pipe: no port, no extra package), for tests that act on
a page (click, turn pages, wait for videos) and read what the browser logged."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed for this test: `make test` installs it (Debian package chromium)"
    return path


class Browser:
    """One headless Chromium with one page. ``--remote-debugging-pipe`` reads commands on fd 3 and answers on
    fd 4, each message JSON ending in a NUL byte."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 900, extra: tuple[str, ...] = ()):
        to_child, self._send = os.pipe()
        self._recv, from_child = os.pipe()

        def fds() -> None:  # in the child: the pipe ends where Chromium looks for them
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--mute-audio",
             "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "--remote-debugging-pipe", *extra, "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        target = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.page(f"{domain}.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _message(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self._recv], [], [], left)[0], "Chromium did not answer"
            chunk = os.read(self._recv, 1 << 20)
            assert chunk, "Chromium closed its pipe"
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, timeout: float = 120, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._send, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._message(timeout)
            if m.get("id") == self._id:
                assert "error" not in m, (method, m["error"])
                return m.get("result", {})
            self.events.append(m)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, self.session, **params)

    def js(self, expression: str) -> Any:
        r = self.page("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; the last value in the failure message."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what or expression}: last value {value!r}")

    def open(self, url: str) -> None:
        self.page("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && document.body && document.body.dataset.loaded === '1'",
                  what="the page and its row data")

    def logged(self) -> list[str]:
        """Every console and browser log line so far (Log.entryAdded, Runtime.consoleAPICalled)."""
        out = []
        for e in self.events:
            if e.get("method") == "Log.entryAdded":
                out.append(e["params"]["entry"].get("text", ""))
            elif e.get("method") == "Runtime.consoleAPICalled":
                out.append(" ".join(str(a.get("value", "")) for a in e["params"].get("args", [])))
        return out

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except AssertionError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._send)
        os.close(self._recv)

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"]))
        return path
