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


def first_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's message cut to one line, for one-line errors in results and messages."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text else ""


def set_forward_chunking(unet, on: bool) -> None:
    """The SVD UNet has enable_forward_chunking() but no disable: undo what enable does, module by module."""
    if on:
        unet.enable_forward_chunking()
        return
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=None, dim=0)


class OutOfMemory(Exception):
    """A row ran out of memory in every mode of the fallback ladder."""


class DeviceFailure(Exception):
    """The device can no longer be trusted (a CUDA error that poisons the context, or the same failure row
    after row): the rank stops, and its unfinished rows are left for others instead of recorded as failed."""


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
            f"be fetched from the Hub ({type(exc).__name__}: {first_line(exc, 200)})."
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


def _oom_types() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,)


def injected_oom_from_env() -> dict[str, int]:
    """Test hook: SVD_BATCH_INJECT_OOM="id:n,..." makes a row's first n attempts raise CUDA OOM, so the
    fallback ladder is testable without a GPU."""
    spec = os.environ.get("SVD_BATCH_INJECT_OOM", "")
    out = {}
    for item in filter(None, spec.split(",")):
        row_id, _, n = item.rpartition(":")
        out[row_id] = int(n)
    return out


@dataclass
class Generator:
    """The loaded pipeline of one process, with the memory mode applied."""

    pipe: Any
    device: Any
    memory_mode: str
    max_decode_chunk_size: int | None = None
    cpu_offload: bool = False
    forward_chunking: bool = False
    inject_oom: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self._chunking_now = self.forward_chunking
        self._offload_now = self.cpu_offload

    @classmethod
    def load(cls, local_path: str, *, device, dtype_name: str = "auto", variant: str | None = None,
             memory: Mapping[str, Any] | None = None, compile: Mapping[str, Any] | None = None) -> "Generator":
        import torch

        quiet_hf_logging()  # before the pipeline import, which is where transformers warns
        from diffusers import StableVideoDiffusionPipeline

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
                f"{first_line(exc, 300)}). A weight file may be truncated or "
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
            # As the diffusers guide: the UNet, fullgraph, mode reduce-overhead (CUDA graphs) on inductor.
            backend = compile.get("backend", "inductor")
            mode = compile.get("mode") if backend == "inductor" else None
            pipe.unet = torch.compile(pipe.unet, mode=mode, backend=backend, fullgraph=bool(compile.get("fullgraph", True)))
        return cls(pipe=pipe, device=device, memory_mode=str(memory.get("mode", "full")),
                   max_decode_chunk_size=memory.get("max_decode_chunk_size"),
                   cpu_offload=bool(memory.get("cpu_offload")), forward_chunking=bool(memory.get("forward_chunking")),
                   inject_oom=injected_oom_from_env())

    def effective_decode_chunk(self, requested: int) -> int:
        cap = self.max_decode_chunk_size
        return min(int(requested), int(cap)) if cap else int(requested)

    # -- out of memory: retry the row in cheaper modes, then go back ------------------------------------------
    def _set_offload(self, on: bool) -> None:
        if self.device.type != "cuda":
            return  # offload moves models between CPU and GPU; on CPU there is nothing to move
        if on:
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            self.pipe.remove_all_hooks()
            self.pipe.to(self.device)

    def ladder(self, decode_chunk: int) -> list[tuple[str, int, bool, bool]]:
        """(mode label, decode chunk, forward chunking, offload) to try, in order: as configured, then a
        smaller decode_chunk_size, then forward chunking, then model CPU offload."""
        small = max(1, min(2, decode_chunk // 2))
        steps = [(self.memory_mode, decode_chunk, self.forward_chunking, self.cpu_offload)]
        label, chunk, chunking, offload = steps[0]
        if small < chunk:
            label, chunk = f"{label}+decode_chunk_{small}", small
            steps.append((label, chunk, chunking, offload))
        if not chunking:
            label, chunking = f"{label}+forward_chunking", True
            steps.append((label, chunk, chunking, offload))
        if not offload:
            label, offload = f"{label}+cpu_offload", True
            steps.append((label, chunk, chunking, offload))
        return steps

    def _apply(self, chunking: bool, offload: bool) -> None:
        """Put the pipeline in a mode (a no-op when it is already in it)."""
        if chunking != self._chunking_now:
            set_forward_chunking(self.pipe.unet, chunking)
            self._chunking_now = chunking
        if offload != self._offload_now:
            self._set_offload(offload)
            self._offload_now = offload

    def frames_with_fallback(self, image, row: Mapping[str, Any]) -> tuple[np.ndarray, str, int]:
        """Frames of a row, retrying in cheaper memory modes on CUDA OOM; returns (frames, mode, decode chunk).
        Later rows run in the configured mode again."""
        import gc

        import torch

        steps = self.ladder(self.effective_decode_chunk(row["decode_chunk_size"]))
        injected = (self.inject_oom or {}).get(str(row.get("id")), 0)
        last: BaseException | None = None
        try:
            for attempt, (label, chunk, chunking, offload) in enumerate(steps):
                self._apply(chunking, offload)
                try:
                    if attempt < injected:
                        raise torch.cuda.OutOfMemoryError(f"injected out of memory (attempt {attempt + 1})")
                    return self.frames(image, {**row, "decode_chunk_size": chunk}), label, chunk
                except _oom_types() as exc:
                    last = exc
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            raise OutOfMemory(f"out of memory in every mode ({', '.join(s[0] for s in steps)}): {last}")
        finally:
            self._apply(self.forward_chunking, self.cpu_offload)

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
    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()  # first: importing diffusers already makes transformers warn
    tlogging.disable_progress_bar()
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()


def peak_host_memory_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

