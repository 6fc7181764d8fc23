"""Test and benchmark hooks, read from the environment: they make the GPU-only failure paths, slow ranks and
paused processes reproducible on CPU. Nothing here runs unless its variable is set.

- ``SVD_BATCH_INJECT_OOM="id:n[@stage],..."``: the row's first n pipeline passes (a batch pass that holds the row
  counts as one) raise CUDA out-of-memory at ``stage`` (call, clip, vae_encode, unet, vae_decode; default call,
  before the pipeline starts).
- ``SVD_BATCH_INJECT_DEVICE_ERROR="id,..."``: every pass of those rows raises CUDA's illegal-memory-access error
  inside the UNet, an error that poisons a device.
- ``SVD_BATCH_INJECT_SLOW="rank:factor,..."``: that rank idles factor x its generation time after each unit (an
  older or throttled GPU).
- ``SVD_BATCH_INJECT_PAUSE=<point>``: the process SIGSTOPs itself once at that point (``merge``: half-way
  through a merge, its temporary records file written).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

# Where a failure can be injected: at the start of a pass, or inside it as each model is entered.
STAGES = ("call", "clip", "vae_encode", "unet", "vae_decode")


def slow_factor(rank: int) -> float:
    slow = dict(x.split(":") for x in filter(None, os.environ.get("SVD_BATCH_INJECT_SLOW", "").split(",")))
    return float(slow.get(str(rank), 0.0))


def pause_here(point: str) -> None:
    if os.environ.get("SVD_BATCH_INJECT_PAUSE") == point:
        del os.environ["SVD_BATCH_INJECT_PAUSE"]
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass
class Injection:
    """The failure hooks, read from the environment once per process (see the module docstring)."""

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
