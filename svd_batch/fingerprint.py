"""What finished videos depend on: the run's fingerprint, read off the settings declared ``frames``
(settings.py) plus what they resolve to on this machine. A resume or a joining launch whose fingerprint differs
would mix two kinds of video in one folder, and is refused naming the differing keys."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from .model import resolve_dtype
from .settings import SECTIONS, RunSettings


def fingerprint(s: RunSettings, identity: str | Mapping[str, str], device_type: str = "cpu") -> dict[str, Any]:
    """Every key marked ``frames``, plus the values they resolve to here (dtype, compile, the model files and the
    device type): a resume that changes any of it would mix two kinds of video. ``identity``: the model's entries
    (identity.model_facts: its files' names, configs and each weight file's sha256), or model.identity alone.
    Keys not marked (threads, which changes only CPU float rounding, overlap, schedule, progress, report.*) are
    left out on purpose; decode chunks are recorded per row."""
    fp: dict[str, Any] = {}
    for name in SECTIONS:
        section = getattr(s, name)
        for f in dataclasses.fields(section):
            if not f.metadata["frames"]:
                continue
            value = getattr(section, f.name)
            if isinstance(value, Mapping):
                fp.update({f"{name}.{f.name}.{k}": v for k, v in value.items()})
            else:
                fp[f"{name}.{f.name}"] = value
    rt = s.runtime
    fp.update({
        "model.path": str(s.model.path),
        "model.dtype": str(resolve_dtype(s.model.dtype, device_type)).replace("torch.", ""),
        **({"model.identity": identity} if isinstance(identity, str) else dict(identity)),
        "runtime.device_type": device_type,
        "runtime.compile": f"{rt.compile_backend}:{rt.compile_mode}" if rt.compile else False,
        "runtime.compile_vae": bool(rt.compile_vae and rt.compile),
        "runtime.attention": str(rt.attention),
    })
    return fp


# Keys added by a later svd-batch whose value an earlier one always had: a fingerprint without the key is read as
# holding this value (a folder made before model.unet_weights existed ran the checkpoint's own UNet, and one made
# before generation.sampler existed the checkpoint's own scheduler).
IMPLIED = {"model.unet_weights": None, "generation.sampler": "euler"}


def fingerprint_changes(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differing keys as (key, before, now). A key the earlier fingerprint lacks was added by a later svd-batch
    and is not compared unless IMPLIED says what it was, nor is a dtype recorded as "auto" before dtypes were
    recorded resolved: upgrading must not make a folder impossible to resume (a folder recorded without the
    weights' hashes is compared by model.identity alone, as when it was made)."""
    before = {**{k: v for k, v in IMPLIED.items() if k in now}, **before}
    now = {k: v for k, v in now.items() if k in before}
    if before.get("model.dtype") == "auto":
        now["model.dtype"] = "auto"
    keys = sorted(set(before) | set(now))
    return [(k, before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)]


def fingerprint_diff(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Differing keys, "key: before -> now" (see fingerprint_changes)."""
    return [f"{k}: {b!r} -> {n!r}" for k, b, n in fingerprint_changes(before, now)]


def joining_diff(job: dict[str, Any], launch: dict[str, Any]) -> list[str]:
    """Differing keys for a launch joining a job in progress: "video.crf: the job has 18, this launch 30"."""
    def show(v: Any) -> str:
        return repr(v) if isinstance(v, str) else str(v)

    return [f"{k}: the job has {show(b)}, this launch {show(n)}" for k, b, n in fingerprint_changes(job, launch)]
