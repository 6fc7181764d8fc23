"""Small helpers shared by the model side and the run loop: one-line errors, quiet libraries, memory figures
and the failure-injection hooks that make the GPU-only fallbacks testable on CPU.

Nothing here imports the pipeline modules, so tiny.py and generate.py can both use it without a cycle.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field

import numpy as np

# Where a failure can be injected: at the start of a pass, or inside it as each model is entered.
STAGES = ("call", "clip", "vae_encode", "unet", "vae_decode")


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


@dataclass
class Injection:
    """Test hooks, read from the environment once per process.

    ``SVD_BATCH_INJECT_OOM="id:n[@stage],..."``: the row's first n pipeline passes (a batch pass that holds
    the row counts as one) raise CUDA out-of-memory at ``stage`` (call, clip, vae_encode, unet, vae_decode;
    default call, before the pipeline starts). ``SVD_BATCH_INJECT_DEVICE_ERROR="id,..."``: every pass of
    those rows raises CUDA's illegal-memory-access error inside the UNet, an error that poisons a device.
    """

    oom: dict[str, tuple[int, str]] = field(default_factory=dict)
    device_error: set[str] = field(default_factory=set)
    passes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Injection":
        oom = {}
        for item in filter(None, os.environ.get("SVD_BATCH_INJECT_OOM", "").split(",")):
            item, _, stage = item.partition("@")
            row_id, _, n = item.rpartition(":")
            stage = stage or "call"
            if stage not in STAGES:
                raise ValueError(f"SVD_BATCH_INJECT_OOM: stage {stage!r} is not one of {', '.join(STAGES)}")
            oom[row_id] = (int(n), stage)
        errors = set(filter(None, os.environ.get("SVD_BATCH_INJECT_DEVICE_ERROR", "").split(",")))
        return cls(oom=oom, device_error=errors)

    def __bool__(self) -> bool:
        return bool(self.oom or self.device_error)

    def arm(self, row_ids: list[str]) -> dict[str, BaseException]:
        """The failures one pass over these rows must raise, by stage; counts the pass for each row."""
        import torch

        armed: dict[str, BaseException] = {}
        for row_id in row_ids:
            if row_id in self.device_error:
                armed["unet"] = RuntimeError("CUDA error: an illegal memory access was encountered")
            if row_id in self.oom:
                n, stage = self.oom[row_id]
                done = self.passes.get(row_id, 0)
                self.passes[row_id] = done + 1
                if done < n:
                    armed.setdefault(stage, torch.cuda.OutOfMemoryError(
                        f"injected out of memory at {stage} (pass {done + 1} of row {row_id})"))
        return armed
