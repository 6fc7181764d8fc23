"""Step 3: load the pipeline once per process and turn one row into frames.

A row is exactly the diffusers SVD guide's snippet: ``image.resize((width, height))`` then the pipeline
with the row's conditioning and ``torch.Generator("cpu").manual_seed(seed)``; so a row run here gives the
frames that snippet gives with the same inputs, on the same device.
"""

from __future__ import annotations

import hashlib
import os
import resource
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


class ModelUnavailable(Exception):
    """The model's weights cannot be found or fetched: stop before any work (exit code 2)."""


def resolve_model_path(path: str, variant: str | None = None, name: str | None = None) -> str:
    """A local diffusers-format folder for ``model.path``: built-in, local, Hugging Face cache, or the Hub."""
    if path == "builtin:tiny":
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "model_index.json")):
            raise ModelUnavailable(
                f"model.path={path} is a folder but not a diffusers pipeline (no model_index.json). Point "
                "model.path at the folder that `save_pretrained` or `huggingface-cli download` produced."
            )
        return expanded
    if expanded.startswith(("/", ".", "~")) or os.sep in expanded.strip("/").replace("/", "", 1):
        raise ModelUnavailable(f"model.path={path} does not exist. Point model.path at a local diffusers folder.")

    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"] if variant is None else ["*.json", "*.txt", f"*.{variant}.safetensors"]
    try:
        return snapshot_download(path, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the cache: try the Hub below
        pass
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        include = f" --include '*.{variant}.safetensors' --include '*.json' --include '*.txt'" if variant else ""
        hint = (
            " It is gated: accept its licence on https://huggingface.co/" + path + " and log in with "
            "`hf auth login` first."
            if "1-1" in path else ""
        )
        raise ModelUnavailable(
            f"The weights of model {name or path} ({path}) are not in the local Hugging Face cache and could not "
            f"be fetched from the Hub ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})."
            f"{hint} Fetch them on a machine with internet access with `hf download {path}"
            f"{include}` (older huggingface_hub: `huggingface-cli download`; the cache is $HF_HOME, default "
            "~/.cache/huggingface, and can be copied to the nodes), or point model.path "
            "at a local diffusers-format folder. Nothing was run."
        ) from None


def model_identity(local_path: str) -> str:
    """A cheap fingerprint of a checkpoint (configs and weight file sizes; never reads the weights): resume
    refuses to mix videos from two different models in one folder."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(local_path):
        dirs.sort()
        for f in sorted(files):
            if f.startswith("."):
                continue
            full = os.path.join(root, f)
            rel = os.path.relpath(full, local_path)
            h.update(rel.encode())
            if f.endswith((".json", ".txt")):
                with open(full, "rb") as fh:
                    h.update(fh.read())
            else:
                h.update(str(os.path.getsize(full)).encode())
    return h.hexdigest()[:16]


def resolve_dtype(name: str, device_type: str):
    import torch

    if name in (None, "auto"):
        return torch.float16 if device_type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"model.dtype={name!r}: use auto, float32, float16 or bfloat16") from None


@dataclass
class Generator:
    """The loaded pipeline of one process, with the memory mode applied."""

    pipe: Any
    device: Any
    memory_mode: str
    max_decode_chunk_size: int | None = None

    @classmethod
    def load(cls, local_path: str, *, device, dtype_name: str = "auto", variant: str | None = None,
             memory: Mapping[str, Any] | None = None, compile: bool = False) -> "Generator":
        import torch
        from diffusers import StableVideoDiffusionPipeline
        quiet_hf_logging()
        memory = dict(memory or {})
        dtype = resolve_dtype(dtype_name, device.type)
        kwargs = {"torch_dtype": dtype}
        if variant and any(f".{variant}." in f for _, _, fs in os.walk(local_path) for f in fs):
            kwargs["variant"] = variant
        try:
            with warnings.catch_warnings():
                # diffusers >= 0.36 renames torch_dtype to dtype; older ones only know torch_dtype.
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = StableVideoDiffusionPipeline.from_pretrained(local_path, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint: say which and what to do
            raise ModelUnavailable(
                f"The model at {local_path} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}). A weight file may be truncated or "
                "incomplete: download it again (or delete the folder to rebuild the tiny model) and rerun."
            ) from None
        pipe.set_progress_bar_config(disable=True)
        if memory.get("cpu_offload") and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if memory.get("forward_chunking"):
            pipe.unet.enable_forward_chunking()
        if compile:
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=True)
        return cls(pipe=pipe, device=device, memory_mode=str(memory.get("mode", "full")),
                   max_decode_chunk_size=memory.get("max_decode_chunk_size"))

    def effective_decode_chunk(self, requested: int) -> int:
        cap = self.max_decode_chunk_size
        return min(int(requested), int(cap)) if cap else int(requested)

    def frames(self, image, row: Mapping[str, Any]) -> np.ndarray:
        """One row, as the guide's snippet: resize, then the pipeline with the row's values and seed."""
        import torch

        width, height = int(row["width"]), int(row["height"])
        out = self.pipe(
            image.resize((width, height)),
            height=height,
            width=width,
            num_frames=int(row["num_frames"]),
            num_inference_steps=int(row["num_inference_steps"]),
            min_guidance_scale=float(row["min_guidance_scale"]),
            max_guidance_scale=float(row["max_guidance_scale"]),
            fps=int(row["fps"]),
            motion_bucket_id=int(row["motion_bucket_id"]),
            noise_aug_strength=float(row["noise_aug_strength"]),
            decode_chunk_size=int(row["decode_chunk_size"]),
            generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
            output_type="pil",
        )
        return np.stack([np.asarray(f) for f in out.frames[0]])


def quiet_hf_logging() -> None:
    """Library progress bars and warnings would drown the run's own progress with 8 ranks."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

