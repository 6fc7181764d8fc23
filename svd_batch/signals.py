"""Preemption: stop signals (SIGINT, SIGTERM, SIGUSR1) and the grace period of the unit in hand.

How a signal reaches the ranks (README, "Preemption recipes"): torch elastic's agent (the process `accelerate
launch` and `torchrun` run) handles SIGTERM, SIGINT, SIGHUP and SIGQUIT (plus what PET_SIGNALS_TO_HANDLE adds:
SIGUSR1 kills it otherwise), passes the signal on to each worker's process group and SIGKILLs the workers
PET_SHUTDOWN_TIMEOUT (30) seconds later. SLURM's ``--signal=SIG@T`` (without ``B:``) signals every process of
each job step: each rank gets the signal twice, from SLURM and from the agent, which is one notice, not two.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Mapping

# A second signal this soon after the first is the same notice by another route (the scheduler signals every
# process of the step, and the launcher passes its copy on): only a later one abandons the unit in hand.
SAME_NOTICE_SECONDS = 1.0
# What a rank needs after its grace period to give its units back and leave before the launcher's SIGKILL.
LEAVING_SECONDS = 5.0


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
        self._first_at = 0.0

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
            if signum == self.signum and time.monotonic() - self._first_at < SAME_NOTICE_SECONDS:
                return
            raise KeyboardInterrupt
        self.signum, self._first_at = signum, time.monotonic()
        if not self._busy:
            return
        left = None if self._busy_until is None else self._busy_until - time.monotonic()
        if left is not None and left > self.grace:
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.grace))

    def _overrun(self, signum, frame) -> None:  # noqa: ARG002
        if self._busy:
            raise KeyboardInterrupt


def launcher_kill_seconds(env: Mapping[str, str], launcher_cmdline: list[str]) -> float | None:
    """Under torch elastic (accelerate launch, torchrun): how long after passing a stop signal on the launcher
    SIGKILLs its workers (its --shutdown_timeout, else PET_SHUTDOWN_TIMEOUT, else TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    else 30, as torch.distributed.run reads them); None for a launch of its own."""
    if "TORCHELASTIC_RUN_ID" not in env:
        return None
    value = None
    for i, a in enumerate(launcher_cmdline):
        for flag in ("--shutdown_timeout", "--shutdown-timeout"):
            if a.startswith(flag + "="):
                value = a.split("=", 1)[1]
            elif a == flag and i + 1 < len(launcher_cmdline):
                value = launcher_cmdline[i + 1]
    value = value or env.get("PET_SHUTDOWN_TIMEOUT") or env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "30"
    try:
        return float(value)
    except ValueError:
        return 30.0


def effective_grace(grace: float, kill_after: float | None) -> tuple[float, str | None]:
    """The grace period a rank can keep (the launcher's SIGKILL comes first otherwise), and a note when cut."""
    if kill_after is None or grace <= kill_after - LEAVING_SECONDS:
        return grace, None
    cut = max(1.0, kill_after - LEAVING_SECONDS)
    return cut, (f"svd-batch: note: runtime.grace_seconds={grace:g} is cut to {cut:g} s: the launcher SIGKILLs its "
                 f"ranks {kill_after:g} s after passing a stop signal on. To keep {grace:g} s, start the launcher "
                 f"with PET_SHUTDOWN_TIMEOUT={grace + LEAVING_SECONDS:g} in its environment (README, Preemption "
                 "recipes).")


def parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


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
