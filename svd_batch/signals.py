"""Preemption: stop signals (SIGINT, SIGTERM, SIGUSR1) and the grace period of the unit in hand."""

from __future__ import annotations

import signal
import subprocess
import sys
import time


class StopFlag:
    """SIGINT, SIGTERM and SIGUSR1 (schedulers' preemption notices): stop taking units. The unit in hand
    finishes when it is expected to end within ``grace`` seconds of the signal; otherwise, or when it runs past
    the grace period, it is abandoned (KeyboardInterrupt in the main thread) and given back. A second signal
    abandons it at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, grace: float = 25.0) -> None:
        self.signum: int | None = None
        self.grace = grace
        self._busy_until: float | None = None
        self._busy = False

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        signal.signal(signal.SIGALRM, self._overrun)

    def __call__(self) -> bool:
        return self.signum is not None

    def busy(self, expected_seconds: float | None) -> None:
        """The main thread starts a unit expected to take this long (None: not known yet). Stopped already (a
        signal during the model load): the unit is not started but given back."""
        if self.signum is not None:
            raise KeyboardInterrupt
        self._busy = True
        self._busy_until = None if expected_seconds is None else time.monotonic() + expected_seconds

    def idle(self) -> None:
        self._busy = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if not self._busy:
            return
        left = None if self._busy_until is None else self._busy_until - time.monotonic()
        if left is not None and left > self.grace:
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.grace))

    def _overrun(self, signum, frame) -> None:  # noqa: ARG002
        if self._busy:
            raise KeyboardInterrupt


def say_after_exit(pid: int, text: str) -> None:
    """Print ``text`` on this process's stderr once process ``pid`` (the launcher) has exited, from a small
    detached process, so that it is the last line of the job's output (after the launcher's own traceback)."""
    code = ("import os, select, sys, time\n"
            "pid = int(sys.argv[1])\n"
            "try:\n"
            "    fd = os.pidfd_open(pid); select.select([fd], [], [], 3600)\n"
            "except (AttributeError, OSError):\n"
            "    while os.path.exists(f'/proc/{pid}'): time.sleep(0.05)\n"
            "sys.stderr.write(sys.argv[2] + '\\n')\n")
    try:
        subprocess.Popen([sys.executable, "-c", code, str(pid), text], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        print(text, file=sys.stderr, flush=True)
