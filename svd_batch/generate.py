"""Step 3: load the pipeline once per process and turn rows into frames (all of inference).

A row is exactly the diffusers SVD guide's snippet: ``image.resize((width, height))`` then the pipeline
with the row's conditioning and ``torch.Generator("cpu").manual_seed(seed)``; so a row run here gives the
frames that snippet gives with the same inputs, on the same device.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import batch as batching
from .attention import UNetAttention
from .device_errors import OutOfMemory, device_failure, is_device_poisoned, is_oom
from .model import (ModelUnavailable, compile_models, configure_compile, load_unet_weights, resolve_dtype,
                    set_forward_chunking)
from .fields import Row
from .hooks import Injection
from .samplers import row_generator, use_sampler
from .settings import MemorySettings, ModelSettings, RuntimeSettings
from .util import (first_line, peak_vram_bytes, quiet_hf_logging,
                   reset_peak_vram)


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
    def load(cls, local_path: str, *, device, model: ModelSettings, memory: MemorySettings,
             runtime: RuntimeSettings, unet_weights: str | None = None, sampler: str = "euler") -> "Generator":
        """The pipeline at ``local_path`` on ``device``, in the settings' dtype and memory mode, compiled and with
        its attention kernel and sampler (generation.sampler) as set; with ``unet_weights`` (model.unet_weights as
        a local file) its UNet's state dict replaced by that file's. The settings were checked before
        (model.check_settings)."""
        quiet_hf_logging()  # before the pipeline import, which is where transformers warns
        from diffusers import StableVideoDiffusionPipeline

        kwargs = {"torch_dtype": resolve_dtype(model.dtype, device.type)}
        variant = model.variant
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
        if unet_weights is not None:
            load_unet_weights(pipe.unet, unet_weights, model.unet_weights)
        use_sampler(pipe, sampler)
        if memory.cpu_offload and device.type == "cuda":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)
        if memory.forward_chunking:
            pipe.unet.enable_forward_chunking()
        dtypes = {name: getattr(pipe, name).dtype for name in ("image_encoder", "unet", "vae")}
        if runtime.compile:
            # Compile workers and cache first: they count only if set before the first compiled call (warm-up).
            configure_compile(runtime.compile_threads, runtime.compile_cache_dir)
            compile_models(pipe, runtime.compile_backend, runtime.compile_mode, runtime.compile_vae)
        gen = cls(pipe=pipe, device=device, memory_mode=memory.mode, max_decode_chunk_size=memory.max_decode_chunk_size,
                  cpu_offload=memory.cpu_offload, forward_chunking=memory.forward_chunking,
                  compiled=runtime.compile, injection=Injection.from_env())
        gen._dtypes = dtypes
        gen.set_attention(runtime.attention)
        if gen.injection:
            gen._install_injection_hooks()
        return gen

    def set_attention(self, name: str) -> None:
        """The SDPA kernel the UNet tries first (runtime.attention; checked by model.check_attention)."""
        self.attention = name
        if self._unet_attention is not None:
            self._unet_attention.set(name)

    def effective_decode_chunk(self, requested: int) -> int:
        cap = self.max_decode_chunk_size
        return min(int(requested), int(cap)) if cap else int(requested)

    # -- the one call the worker makes --------------------------------------------------------------------
    def run(self, rows: Sequence[Row], images: Sequence[Any],
            log: Callable[[str], None] | None = None) -> list[RowOutcome]:
        """Frames for each row (images loaded, not yet resized): one batch pass when there are several rows,
        one by one through the fallback ladder when that fails or for a single row. A row's own failure is
        its ``error``; an error that poisons the device raises DeviceFailure."""
        log = log or self.log or (lambda msg: None)
        rows = [r.with_(decode_chunk_size=self.effective_decode_chunk(r.decode_chunk_size)) for r in rows]
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
                raise device_failure(exc, self.device, [str(r.id) for r in rows]) from exc
            self._undo_failed_pass()
            log(f"svd-batch: a batch of {len(rows)} failed ({type(exc).__name__}: {first_line(exc, 200)}); "
                "running its rows one by one")
            return None
        each = (time.perf_counter() - t) / len(rows)
        peak = peak_vram_bytes(self.device)
        return [RowOutcome(frames=f, error=None, memory_mode=self.memory_mode,
                           decode_chunk_size=int(r.decode_chunk_size), batch_size=len(rows),
                           generate_seconds=each, peak_vram_bytes=peak, attention=self.attention_ran())
                for f, r in zip(frames, rows)]

    def _run_single(self, row, image) -> RowOutcome:
        reset_peak_vram(self.device)
        t = time.perf_counter()
        frames, error, mode, chunk = None, None, self.memory_mode, int(row.decode_chunk_size)
        try:
            frames, mode, chunk = self.frames_with_fallback(image, row)
        except OutOfMemory as exc:
            error = f"row {row.id}: {exc}"
        except Exception as exc:  # noqa: BLE001 - one bad row must not stop the run; the reason is recorded
            if is_device_poisoned(exc):
                raise device_failure(exc, self.device, [str(row.id)]) from exc
            error = f"row {row.id}: generate failed: {type(exc).__name__}: {first_line(exc)}"
        return RowOutcome(frames=frames, error=error, memory_mode=mode, decode_chunk_size=chunk, batch_size=1,
                          generate_seconds=time.perf_counter() - t, peak_vram_bytes=peak_vram_bytes(self.device),
                          attention=self.attention_ran())

    # -- compile: every shape before timing ----------------------------------------------------------------
    def warmup(self, shapes: Sequence[tuple[Row, int]],
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
            fake = [row.with_(id=f"warm-up {i}", num_inference_steps=2, seed=0) for i in range(n)]
            image = Image.new("RGB", (int(row.width), int(row.height)))
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

    def frames_with_fallback(self, image, row: Row) -> tuple[np.ndarray, str, int]:
        """Frames of a row, retrying in cheaper memory modes on out-of-memory; returns (frames, mode, decode
        chunk). Later rows run in the configured mode again."""
        steps = self.ladder(self.effective_decode_chunk(row.decode_chunk_size))
        last: BaseException | None = None
        poisoned = False
        try:
            for label, chunk, chunking, offload in steps:
                self._apply(chunking, offload)
                try:
                    return self.frames(image, row.with_(decode_chunk_size=chunk)), label, chunk
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

    def frames(self, image, row: Row) -> np.ndarray:
        """One row, as the guide's snippet: resize, then the pipeline with the row's values and seed; the frames
        are quantized to uint8 on the device exactly as the snippet's PIL frames are."""
        import torch

        width, height = int(row.width), int(row.height)
        generator = torch.Generator("cpu").manual_seed(int(row.seed))
        with self._pass([row]), row_generator(self.pipe, generator):
            out = self.pipe(
                image.resize((width, height)),
                **row.pipeline_kwargs(),
                generator=generator,
                output_type="pt",
            )
            return batching.to_host(batching.quantize_on_device(out.frames))[0]

    # -- per pass: attention kernels and injected failures ----------------------------------------------------
    @contextlib.contextmanager
    def _pass(self, rows: Sequence[Row]):
        self._armed = self.injection.arm([str(r.id) for r in rows]) if self.injection else {}
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
