"""Small helpers shared by every stage: one-line errors, occurrence counts, human units, quiet libraries and
memory figures. Nothing here imports another module of the package (the test hooks are in hooks.py)."""

from __future__ import annotations

import math
import resource
import threading
from typing import Any, Callable

import numpy as np


def first_line(exc: BaseException | str, limit: int = 500) -> str:
    """An exception's message (or a message) cut to one line, for one-line errors in results and messages."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text else ""


def human_bytes(n: float | None) -> str:
    """A byte count as people read it (1.5 GiB); n/a for a missing figure."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def occurrence(keys: np.ndarray) -> np.ndarray:
    """For each element, how many equal elements come before it (0 for the first of its kind), vectorized."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")
    starts = np.r_[0, np.flatnonzero(np.diff(keys[order])) + 1] if n else np.zeros(0, np.int64)
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return out


def quiet_hf_logging() -> None:
    """Library progress bars and warnings would drown the run's own progress with 8 ranks."""
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()  # first: importing diffusers already makes transformers warn
    tlogging.disable_progress_bar()
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_vram(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_vram_bytes(device) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def in_thread(fn: Callable[[], Any], name: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start ``fn()`` on a daemon thread; its result lands in the box as "value" or "error" (whatever it
    raised), for callers that wait on it with a deadline and walk away from a call that hangs."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name=name)
    t.start()
    return t, box
