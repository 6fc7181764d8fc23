"""Step 3: load the pipeline once per process and turn one row into frames.

A row is exactly the diffusers SVD guide's snippet: ``image.resize((width, height))`` then the pipeline
with the row's conditioning and ``torch.Generator("cpu").manual_seed(seed)``; so a row run here gives the
frames that snippet gives with the same inputs, on the same device.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import batch as batching
from .attention import ATTENTION, CUDA_ONLY_ATTENTION, UNetAttention, supports_priority
from .device_errors import DeviceFailure, OutOfMemory, device_failure, is_device_poisoned, is_oom
from .fields import pipeline_kwargs
from .util import (Injection, first_line, peak_host_memory_bytes, peak_vram_bytes, quiet_hf_logging,
                   reset_peak_vram)

__all__ = ["ATTENTION", "DeviceFailure", "Generator", "ModelUnavailable", "OutOfMemory", "RowOutcome",
           "SettingRefused", "first_line", "is_device_poisoned", "is_oom",
           "peak_host_memory_bytes", "quiet_hf_logging"]

def set_forward_chunking(unet, on: bool) -> None:
    """The SVD UNet has enable_forward_chunking() but no disable: undo what enable does, module by module."""
    if on:
        unet.enable_forward_chunking()
        return
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=None, dim=0)


class ModelUnavailable(Exception):
    """The model's weights cannot be found or fetched: stop before any work (exit code 2)."""


class SettingRefused(ModelUnavailable):
    """The model cannot be loaded with these settings. A ModelUnavailable, so that every caller that stops
    before any work on an unloadable model (exit code 2) stops on this too."""


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


def check_attention(name: str, device_type: str) -> None:
    if name not in ATTENTION:
        raise SettingRefused(f"runtime.attention={name!r} is not a known attention backend. Use one of "
                             f"{', '.join(ATTENTION)} (auto keeps torch's own choice). Nothing was run.")
    if name in CUDA_ONLY_ATTENTION and device_type != "cuda":
        raise SettingRefused(f"runtime.attention={name} runs only on CUDA devices and this run is on "
                             f"{device_type}. Use runtime.attention=auto, flash or math there. Nothing was run.")
    if name not in ("auto", "math") and not supports_priority():
        import torch

        raise SettingRefused(f"runtime.attention={name} needs torch >= 2.6, which can put a backend first and "
                             f"fall back where it cannot take a shape; this is torch {torch.__version__}, where "
                             f"{name} alone would fail the VAE's or the UNet's cross-attention. Use "
                             "runtime.attention=auto or math, or upgrade torch. Nothing was run.")


def check_compile_with_memory(compile: Mapping[str, Any] | None, memory: Mapping[str, Any]) -> None:
    """Compile and model CPU offload do not work together: refuse before the model loads."""
    if compile and memory.get("cpu_offload"):
        mode = memory.get("mode", "offload")
        raise SettingRefused(
            f"runtime.compile=true cannot be combined with memory={mode} (model CPU offload). Offload wraps "
            "the UNet in accelerate hooks that move it between CPU and GPU on every call, which a fullgraph "
            "compile cannot trace, and the hooks are replaced after every video, which would put the eager "
            "forward back: rows would say compiled but run eager. Use memory=full (or memory.cpu_offload=false) "
            f"with runtime.compile=true, or keep memory={mode} with runtime.compile=false. Nothing was run."
        )


def check_compile_vae(compile: Mapping[str, Any] | None, runtime: Mapping[str, Any] | None) -> None:
    """runtime.compile_vae compiles the VAE decoder beside the UNet, with the UNet's compile settings and
    warm-up; alone it would compile in the first timed row."""
    if (runtime or {}).get("compile_vae") and not compile:
        raise SettingRefused(
            "runtime.compile_vae=true compiles the VAE decoder together with the UNet and needs "
            "runtime.compile=true (which also warms both up before any row is timed). Add runtime.compile=true, "
            "or drop runtime.compile_vae. Nothing was run."
        )


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class RowOutcome:
    """What generating one row gave: frames or a one-line error, and how they were made."""

    frames: np.ndarray | None  # uint8 (num_frames, height, width, 3)
    error: str | None
    memory_mode: str  # the fallback step that succeeded, e.g. "full+decode_chunk_2"
    decode_chunk_size: int  # effective: after the memory mode's cap and any fallback
    batch_size: int  # 1 for rows that ran alone, also after their batch failed
    generate_seconds: float  # the row's own time alone; the batch's time / n when batched
    peak_vram_bytes: int | None
    attention: str


@dataclass
class Generator:
    """The loaded pipeline of one process, with the memory mode applied. ``run`` is all of inference: the
    worker hands it rows and images and gets frames or errors back."""

    pipe: Any
    device: Any
    memory_mode: str
    max_decode_chunk_size: int | None = None
    cpu_offload: bool = False
    forward_chunking: bool = False
    compiled: bool = False
    attention: str = "auto"
    injection: Injection = field(default_factory=Injection)
    log: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        self._chunking_now = self.forward_chunking
        self._offload_now = self.cpu_offload
        self._dtypes: dict[str, Any] = {}  # each model's configured dtype, restored after a failed pass
        self._armed: dict[str, BaseException] = {}
        self._graphs_after_warmup = 0
        self._unet_attention = UNetAttention.attach(self.pipe, self.attention)

    @classmethod
    def load(cls, local_path: str, *, device, dtype_name: str = "auto", variant: str | None = None,
             memory: Mapping[str, Any] | None = None, compile: Mapping[str, Any] | None = None,
             runtime: Mapping[str, Any] | None = None) -> "Generator":
        memory = dict(memory or {})
        check_compile_with_memory(compile, memory)
        check_compile_vae(compile, runtime)
        if runtime:
            check_attention(str(runtime.get("attention") or "auto"), device.type)
        quiet_hf_logging()  # before the pipeline import, which is where transformers warns
        from diffusers import StableVideoDiffusionPipeline

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
        dtypes = {name: getattr(pipe, name).dtype for name in ("image_encoder", "unet", "vae")}
        if compile:
            compile_models(pipe, compile, runtime)
        gen = cls(pipe=pipe, device=device, memory_mode=str(memory.get("mode", "full")),
                  max_decode_chunk_size=memory.get("max_decode_chunk_size"),
                  cpu_offload=bool(memory.get("cpu_offload")), forward_chunking=bool(memory.get("forward_chunking")),
                  compiled=bool(compile), injection=Injection.from_env())
        gen._dtypes = dtypes
        gen.configure(runtime)
        if gen.injection:
            gen._install_injection_hooks()
        return gen

    def configure(self, runtime: Mapping[str, Any] | None) -> None:
        """Apply ``runtime.*`` settings that need no reload: attention backend, compile workers and cache.
        Idempotent; must run before the first compiled call (the warm-up) for the compile settings to count."""
        if not runtime:
            return
        attention = str(runtime.get("attention") or "auto")
        check_attention(attention, self.device.type)
        self.attention = attention
        if self._unet_attention is not None:
            self._unet_attention.set(attention)
        if self.compiled:
            _configure_compile(runtime)

    def effective_decode_chunk(self, requested: int) -> int:
        cap = self.max_decode_chunk_size
        return min(int(requested), int(cap)) if cap else int(requested)

    # -- the one call the worker makes --------------------------------------------------------------------
    def run(self, rows: Sequence[Mapping[str, Any]], images: Sequence[Any],
            log: Callable[[str], None] | None = None) -> list[RowOutcome]:
        """Frames for each row (images loaded, not yet resized): one batch pass when there are several rows,
        one by one through the fallback ladder when that fails or for a single row. A row's own failure is
        its ``error``; an error that poisons the device raises DeviceFailure."""
        log = log or self.log or (lambda msg: None)
        rows = [{**r, "decode_chunk_size": self.effective_decode_chunk(r["decode_chunk_size"])} for r in rows]
        if len(rows) > 1:
            done = self._run_batch(rows, images, log)
            if done is not None:
                return done
        return [self._run_single(r, im) for r, im in zip(rows, images)]

    def _run_batch(self, rows, images, log) -> list[RowOutcome] | None:
        reset_peak_vram(self.device)
        t = time.perf_counter()
        try:
            with self._pass(rows):
                frames = batching.batched_frames(self.pipe, images, rows)
        except Exception as exc:  # noqa: BLE001 - OOM or one bad row: the caller runs the rows one by one
            if is_device_poisoned(exc):
                raise device_failure(exc, self.device, [str(r.get("id")) for r in rows]) from exc
            self._undo_failed_pass()
            log(f"svd-batch: a batch of {len(rows)} failed ({type(exc).__name__}: {first_line(exc, 200)}); "
                "running its rows one by one")
            return None
        each = (time.perf_counter() - t) / len(rows)
        peak = peak_vram_bytes(self.device)
        return [RowOutcome(frames=f, error=None, memory_mode=self.memory_mode,
                           decode_chunk_size=int(r["decode_chunk_size"]), batch_size=len(rows),
                           generate_seconds=each, peak_vram_bytes=peak, attention=self.attention_ran())
                for f, r in zip(frames, rows)]

    def _run_single(self, row, image) -> RowOutcome:
        reset_peak_vram(self.device)
        t = time.perf_counter()
        frames, error, mode, chunk = None, None, self.memory_mode, int(row["decode_chunk_size"])
        try:
            frames, mode, chunk = self.frames_with_fallback(image, row)
        except OutOfMemory as exc:
            error = f"row {row.get('id')}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the run; the reason is recorded
            if is_device_poisoned(exc):
                raise device_failure(exc, self.device, [str(row.get("id"))]) from exc
            error = f"row {row.get('id')}: generate failed: {type(exc).__name__}: {first_line(exc)}"
        return RowOutcome(frames=frames, error=error, memory_mode=mode, decode_chunk_size=chunk, batch_size=1,
                          generate_seconds=time.perf_counter() - t, peak_vram_bytes=peak_vram_bytes(self.device),
                          attention=self.attention_ran())

    # -- compile: every shape before timing ----------------------------------------------------------------
    def warmup(self, shapes: Sequence[tuple[Mapping[str, Any], int]],
               log: Callable[[str], None] | None = None) -> float:
        """Run each (representative row, batch size) shape once with 2-step fake rows, so that compiling
        happens here and not in timed rows; returns the seconds it took."""
        from PIL import Image

        t = time.perf_counter()
        if self.compiled:
            import torch._dynamo

            # One compiled graph per shape (static shapes), plus forward-chunking variants in the fallback:
            # past the limit dynamo would silently run eager.
            limit = 2 * len(shapes) + 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        for row, n in shapes:
            fake = [{**row, "id": f"warm-up {i}", "num_inference_steps": 2, "seed": 0} for i in range(n)]
            image = Image.new("RGB", (int(row["width"]), int(row["height"])))
            for o in self.run(fake, [image] * n, log=log):
                if o.error and log:
                    log(f"svd-batch: compile warm-up: {o.error}")
        self._graphs_after_warmup = _compiled_graphs() if self.compiled else 0
        return time.perf_counter() - t

    def recompiles(self) -> int:
        """Graphs compiled since the last warm-up (since load without one): 0 when warm-up covered every
        shape. Fallbacks with forward chunking and batches that fell back to single rows may add some."""
        return _compiled_graphs() - self._graphs_after_warmup if self.compiled else 0

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
        smaller decode_chunk_size, then forward chunking, then model CPU offload (not with a compiled UNet,
        which offload's hooks would put back to eager)."""
        small = max(1, min(2, decode_chunk // 2))
        steps = [(self.memory_mode, decode_chunk, self.forward_chunking, self.cpu_offload)]
        label, chunk, chunking, offload = steps[0]
        if small < chunk:
            label, chunk = f"{label}+decode_chunk_{small}", small
            steps.append((label, chunk, chunking, offload))
        if not chunking:
            label, chunking = f"{label}+forward_chunking", True
            steps.append((label, chunk, chunking, offload))
        if not offload and not self.compiled:
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

    def _undo_failed_pass(self) -> None:
        """A pass that failed part-way leaves what it had changed: the VAE upcast to float32 (diffusers casts
        it back only on success), models left on the GPU by offload's hooks, cached blocks. Undo all three."""
        import torch

        for name, dtype in self._dtypes.items():
            module = getattr(self.pipe, name, None)
            if module is not None and module.dtype != dtype:
                module.to(dtype=dtype)
        if self._offload_now and self.device.type == "cuda":
            self.pipe.maybe_free_model_hooks()  # re-arms the hooks, every model back on the CPU
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def frames_with_fallback(self, image, row: Mapping[str, Any]) -> tuple[np.ndarray, str, int]:
        """Frames of a row, retrying in cheaper memory modes on out-of-memory; returns (frames, mode, decode
        chunk). Later rows run in the configured mode again."""
        steps = self.ladder(self.effective_decode_chunk(row["decode_chunk_size"]))
        last: BaseException | None = None
        poisoned = False
        try:
            for label, chunk, chunking, offload in steps:
                self._apply(chunking, offload)
                try:
                    return self.frames(image, {**row, "decode_chunk_size": chunk}), label, chunk
                except Exception as exc:
                    # On a poisoned device any cleanup would fail too, and hide the error that matters.
                    poisoned = is_device_poisoned(exc)
                    if poisoned:
                        raise
                    self._undo_failed_pass()
                    if not is_oom(exc):
                        raise
                    last = exc
            raise OutOfMemory(f"out of memory in every mode ({', '.join(s[0] for s in steps)}): {first_line(last)}")
        finally:
            if not poisoned:
                self._apply(self.forward_chunking, self.cpu_offload)

    def frames(self, image, row: Mapping[str, Any]) -> np.ndarray:
        """One row, as the guide's snippet: resize, then the pipeline with the row's values and seed; the frames
        are quantized to uint8 on the device exactly as the snippet's PIL frames are."""
        import torch

        width, height = int(row["width"]), int(row["height"])
        with self._pass([row]):
            out = self.pipe(
                image.resize((width, height)),
                **pipeline_kwargs(row),
                generator=torch.Generator("cpu").manual_seed(int(row["seed"])),
                output_type="pt",
            )
            return batching.to_host(batching.quantize_on_device(out.frames))[0]

    # -- per pass: attention kernels and injected failures ----------------------------------------------------
    @contextlib.contextmanager
    def _pass(self, rows: Sequence[Mapping[str, Any]]):
        self._armed = self.injection.arm([str(r.get("id")) for r in rows]) if self.injection else {}
        try:
            early = self._armed.pop("call", None)
            if early is not None:
                raise early
            with self._unet_attention.watch() if self._unet_attention else contextlib.nullcontext():
                yield
        finally:
            self._armed = {}

    def attention_ran(self) -> str:
        """The kernels the UNet's attention ran in the last pass (see attention.py); the setting where torch
        cannot say (a stand-in pipeline, a torch without ``_fused_sdp_choice``)."""
        ran = self._unet_attention.ran() if self._unet_attention else None
        return ran if ran and ran != "unknown" else self.attention

    def _install_injection_hooks(self) -> None:
        """Pre-hooks that raise an armed failure as a model is entered, so a failure can hit any stage of a
        real pass. On a compiled UNet the hook sits on the compiled wrapper, outside the graph."""
        pipe = self.pipe
        for stage, module in (("clip", pipe.image_encoder), ("vae_encode", pipe.vae.encoder),
                              ("unet", pipe.unet), ("vae_decode", pipe.vae.decoder)):
            module.register_forward_pre_hook(self._hook(stage))

    def _hook(self, stage: str):
        def hook(module, args):  # noqa: ARG001
            exc = self._armed.pop(stage, None)
            if exc is not None:
                raise exc
        return hook


def compile_models(pipe, compile: Mapping[str, Any], runtime: Mapping[str, Any] | None = None) -> None:
    """As the diffusers guide: the UNet, fullgraph, on inductor; with runtime.compile_vae the VAE decoder too.
    Static shapes: every shape a rank runs is compiled in the warm-up, and CUDA graphs are per shape anyway."""
    import torch

    backend = compile.get("backend", "inductor")
    mode = compile.get("mode") if backend == "inductor" else None
    fullgraph = bool(compile.get("fullgraph", True))
    pipe.unet = torch.compile(pipe.unet, mode=mode, backend=backend, dynamic=False, fullgraph=fullgraph)
    if (runtime or {}).get("compile_vae"):
        # One graph per decode chunk length (e.g. 8 and the remainder), each compiled in the warm-up. Never with
        # CUDA graphs: the pipeline calls the decoder once per chunk and concatenates the chunks afterwards, and a
        # graph's replay overwrites the output of the call before it (seen on the H200 with reduce-overhead:
        # "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run").
        vae_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=vae_mode, backend=backend, dynamic=False,
                                         fullgraph=fullgraph)


def _configure_compile(runtime: Mapping[str, Any]) -> None:
    """Compile workers per rank (inductor's default is one per core, per rank: 8 ranks would start 8x the
    cores) and, optionally, a compile cache shared by every rank (inductor's default, /tmp/torchinductor_$USER,
    is already shared by the ranks of one node)."""
    threads = runtime.get("compile_threads", "auto")
    if threads in (None, "auto"):
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        threads = max(1, min(32, (os.cpu_count() or 1) // local))
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = int(threads)
    cache = runtime.get("compile_cache_dir")
    if cache:
        cache = os.path.abspath(os.path.expanduser(str(cache)))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
