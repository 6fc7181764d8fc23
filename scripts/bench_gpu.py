"""SVD-XT at full size on one GPU, through svd-batch's own code, in parts sized for a short device window.

    bash scripts/gpu_check.sh all                       # on the GPU machine: installs gpu-kit/, then this
    python scripts/bench_gpu.py --parts eager,attention --out-dir DIR
    python scripts/bench_gpu.py --tiny --parts all --out-dir DIR     # CPU rehearsal at 64x64 (tests)

Random weights built from SVD-XT's configs on the GPU in fp16 (the real model's cost, nothing to download);
576x1024, 25 frames, 25 steps, decode chunk 8. Every figure is written to DIR/gpu_check.json (one entry per
part) and DIR/summary.txt the moment it is measured, and printed: a part cut short keeps what it measured.
`all` runs the parts in this order, most important first; --budget-s skips a part whose estimate (seconds on
one H200, in brackets) no longer fits:

  versions   [~5]   python, torch, CUDA, cuDNN, driver, GPU, diffusers, transformers, SDPA's default order
  fast       [~330] the fast path: generation.sampler=animatelcm, 4 steps, guidance off (the UNet at batch 1),
                    with AnimateLCM's conditioning: seconds per video eager with the per-stage timeline; svd-batch's
                    own loop on --fast-e2e-rows rows (MP4s and scores on: GPU idle at steady state); the UNet
                    compiled (cold) with its timeline and frames against eager; then, if the budget holds, the loop
                    again with that compiled UNet
  eager      [~80]  model build, UNet FLOPs (torch's counter, one step), seconds per video through
                    Generator.run and the MP4 writer, the per-stage timeline (CUDA events: CLIP, VAE encode,
                    UNet steps, decode, uint8, copy; MP4 on the host), the UNet's TFLOP/s and share of 790
  attention  [~70]  per runtime.attention setting: the kernel each module's attention ran (UNet self and
                    cross, VAE, CLIP), what the row records, the UNet per step, frames against auto's
  e2e        [~70]  svd-batch's own run loop on 4 rows in this process: GPU idle at steady state (after the
                    first row, before the final MP4 drain; CPU work inside the pipeline call counts as idle)
  compiled   [~240] the UNet compiled (inductor, runtime.compile_mode reduce-overhead, cold): compile seconds,
                    seconds per video, frames against eager
  levers     [~420] runtime.compile_vae=true, then compile mode max-autotune-no-cudagraphs: each timed, its
                    frames compared
  frames     [~15]  finishing one video's frames: diffusers' PIL path against svd-batch's device uint8
  memory     [~60]  memory=offload and memory=low_vram (eager): seconds per video, timeline, peak VRAM
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # installed (the GPU kit, an editable install); else the tree this script sits in
    import svd_batch  # noqa: F401
except ImportError:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import torch  # noqa: E402

H200_DENSE_FP16_FLOPS = 790e12  # measured dense fp16/bf16 matrix rate on this workplace's H200
PARTS = {"versions": 5, "fast": 330, "eager": 80, "attention": 70, "e2e": 70, "compiled": 240, "levers": 420,
         "frames": 15, "memory": 60}
LEVERS = {"compile_vae": 150, "max-autotune-no-cudagraphs": 270}  # estimated seconds each, on one H200
# The fast path's row: AnimateLCM's sampler and its app's conditioning (conf/model/animatelcm_svd_xt.yaml).
FAST_ROW = {"num_inference_steps": 4, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0, "motion_bucket_id": 80,
            "decode_chunk_size": 4}
FAST_OVERRIDES = ["generation.sampler=animatelcm"] + [f"generation.{k}={v}" for k, v in FAST_ROW.items()]
FAST_LOOP_COMPILED_S = 60  # the loop again with the UNet compiled (and warmed up) before it
# memory mode -> (model CPU offload, forward chunking, decode chunk cap), as conf/memory/*.yaml
MEMORY_MODES = {"offload": (True, False, None), "low_vram": (True, True, 2)}
ATTENTION_SETTINGS = ("auto", "cudnn", "flash", "efficient", "math")
STAGES = ("clip", "vae_encode", "unet", "vae_decode", "uint8", "copy")


# -- the report: one JSON (a key per part) and one screen of summary, rewritten as figures arrive ---------------
class Report:
    def __init__(self, out_dir: str, budget_s: float | None):
        self.out_dir, self.parts, self.lines = out_dir, {}, {}
        self.started, self.budget_s = time.perf_counter(), budget_s
        os.makedirs(out_dir, exist_ok=True)

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.perf_counter() - self.started)

    def put(self, part: str, key: str, value: Any, line: str | None = None) -> None:
        """Record one figure: written to disk at once, printed, and summarised (``line``) on the summary screen."""
        self.parts.setdefault(part, {})[key] = value
        if line:
            self.lines.setdefault(part, []).append(line)
        _atomic_write(os.path.join(self.out_dir, "gpu_check.json"), json.dumps(self.parts, indent=2, default=str))
        _atomic_write(os.path.join(self.out_dir, "summary.txt"), self.summary())
        print(f"[{part}] {line}" if line else f"[{part}] {key}: {json.dumps(value, default=str)[:300]}", flush=True)

    def note(self, part: str, lines: list[str]) -> None:
        """Lines for the summary screen (a table), printed too."""
        self.lines.setdefault(part, []).extend(lines)
        _atomic_write(os.path.join(self.out_dir, "summary.txt"), self.summary())
        print("\n".join(lines), flush=True)

    def summary(self) -> str:
        out = [f"svd-batch GPU check ({time.perf_counter() - self.started:.0f} s in)"]
        for part, lines in self.lines.items():
            out.append(f"{part}:")
            out += [f"  {line}" for line in lines]
        return "\n".join(out) + "\n"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the model, the rows, timing ---------------------------------------------------------------------------------
def build_xt(device, dtype):
    """SVD-XT's architecture (stabilityai/stable-video-diffusion-img2vid-xt configs), random weights, built
    on the device (seconds) and cast to ``dtype``."""
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from svd_batch.tiny import build_tiny_pipeline

    sched = build_tiny_pipeline().scheduler  # SVD's scheduler config, shared with the tiny preset
    with torch.device(device):
        unet = UNetSpatioTemporalConditionModel(  # the defaults are SVD's; spelled out for the reader
            sample_size=96, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
            block_out_channels=(320, 640, 1280, 1280), addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=1024,
            transformer_layers_per_block=1, num_attention_heads=(5, 10, 20, 20), num_frames=25)
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=768,
            scaling_factor=0.18215, force_upcast=True)
        enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
            patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu"))
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=enc, unet=unet, scheduler=sched,
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))
    return pipe.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Marks on the device's own timeline (CUDA events, recorded without synchronising, so the pass runs as in
    production), or the host clock on CPU, where everything is synchronous anyway."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class Timeline:
    """Start and end marks of each stage of a pass: hooks on the CLIP encoder, the VAE encoder and decoder and
    the UNet (outside any compiled graph), wrappers around svd-batch's uint8 quantization and host copy."""

    def __init__(self, pipe, device):
        import svd_batch.batch as batching

        self.clock, self.device, self.marks = Clock(device), device, []
        self._handles, self._patched = [], []
        for stage, module in (("clip", pipe.image_encoder), ("vae_encode", pipe.vae.encoder),
                              ("unet", pipe.unet), ("vae_decode", pipe.vae.decoder)):
            self._handles.append(module.register_forward_pre_hook(lambda m, a, s=stage: self._mark(s, 0)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, s=stage: self._mark(s, 1),
                                                              always_call=True))
        for stage, name in (("uint8", "quantize_on_device"), ("copy", "to_host")):
            fn = getattr(batching, name)
            self._patched.append((batching, name, fn))
            setattr(batching, name, self._timed(stage, fn))
        self.begin()

    def _mark(self, stage, edge):
        # Only the pass's own thread: svd-batch's writer thread runs the CLIP encoder too, for quality scores.
        if threading.get_ident() == self.thread:
            self.marks.append((stage, edge, self.clock.mark()))

    def _timed(self, stage, fn):
        def timed(*a, **k):
            self._mark(stage, 0)
            try:
                return fn(*a, **k)
            finally:
                self._mark(stage, 1)
        return timed

    def begin(self):
        self.marks, self.t0, self.thread = [], self.clock.mark(), threading.get_ident()

    def read(self) -> dict[str, Any]:
        """Per stage: its intervals (start, end) in seconds from ``begin``; and the pass's end."""
        end = self.clock.mark()
        sync(self.device)
        open_at, spans = {}, {s: [] for s in STAGES}
        for stage, edge, mark in self.marks:
            if edge == 0:
                open_at[stage] = mark
            elif stage in open_at:
                spans[stage].append((self.clock.seconds(self.t0, open_at.pop(stage)), self.clock.seconds(self.t0, mark)))
        return {"spans": spans, "end": self.clock.seconds(self.t0, end)}

    def close(self):
        for h in self._handles:
            h.remove()
        for obj, name, fn in self._patched:
            setattr(obj, name, fn)


def busy_seconds(spans: dict[str, list]) -> float:
    """Seconds the device spent in the stages (the denoising loop from the first UNet call's start to the last
    one's end, so that the scheduler steps between them count as busy); gaps between stages are idle."""
    total = sum(e - s for stage, iv in spans.items() if stage != "unet" for s, e in iv)
    unet = spans.get("unet") or []
    return total + (unet[-1][1] - unet[0][0] if unet else 0.0)


def timeline_table(tl: dict[str, Any], mp4_s: float) -> tuple[dict[str, Any], list[str]]:
    spans, end = tl["spans"], tl["end"]
    rows, lines = {}, [f"{'stage':<12}{'calls':>6}{'start s':>9}{'seconds':>9}{'share':>7}"]
    for stage in STAGES:
        iv = spans[stage]
        if not iv:
            continue
        secs = sum(e - s for s, e in iv)
        rows[stage] = {"calls": len(iv), "start_s": iv[0][0], "seconds": secs}
        lines.append(f"{stage:<12}{len(iv):>6}{iv[0][0]:>9.3f}{secs:>9.3f}{secs / end:>7.1%}")
    unet = spans["unet"]
    if unet:
        steps = [e - s for s, e in unet]
        rows["unet"].update(per_step_median_s=float(np.median(steps)), loop_span_s=unet[-1][1] - unet[0][0])
    idle = end - busy_seconds(spans)
    rows["idle_between_stages"] = {"seconds": idle, "what": "CPU preprocessing, VAE dtype casts, waits"}
    rows["pass_s"] = end
    rows["mp4_s"] = mp4_s
    lines.append(f"{'(between)':<12}{'':>6}{'':>9}{idle:>9.3f}{idle / end:>7.1%}  CPU work in the call: GPU idle")
    lines.append(f"{'pass':<12}{'':>6}{'':>9}{end:>9.3f}")
    lines.append(f"{'mp4 (host)':<12}{'1':>6}{'':>9}{mp4_s:>9.3f}  on the writer thread in svd-batch")
    return rows, lines


def bench_row(args, i=0, **over):
    from svd_batch.fields import Row

    row = {"id": f"bench-{i}", "image": "bench.jpg", "image_uri": "bench.jpg", "row": i, "seed": i,
           "height": args.height, "width": args.width, "num_frames": args.frames, "num_inference_steps": args.steps,
           "fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02, "min_guidance_scale": 1.0,
           "max_guidance_scale": 3.0, "decode_chunk_size": 8}
    return Row(**{**row, **over})


def production_pass(gen, row, image, mp4_dir, timeline=None):
    """What a row costs in svd-batch: Generator.run (to uint8 on the host), then the runner's MP4 writer."""
    from svd_batch.video import write_mp4

    sync(gen.device)
    if timeline:
        timeline.begin()
    t = time.perf_counter()
    [out] = gen.run([row], [image])
    generate = time.perf_counter() - t
    if out.error:
        raise RuntimeError(out.error)
    tl = timeline.read() if timeline else None
    t = time.perf_counter()
    write_mp4(out.frames, os.path.join(mp4_dir, f"{row.id}.mp4"), fps=7)
    return {"generate_s": generate, "mp4_s": time.perf_counter() - t, "frames": out.frames, "timeline": tl,
            "attention": out.attention}


def frames_diff(a, b) -> dict[str, Any]:
    return {"identical": bool(np.array_equal(a, b)),
            "max_abs_diff": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())}


def unet_inputs(pipe, args, device, dtype):
    """The UNet's inputs for one guided step (batch 2), at the run's size."""
    f, h, w = args.frames, args.height // 8, args.width // 8
    x = torch.randn(2, f, 8, h, w, device=device, dtype=dtype)
    emb = torch.randn(2, 1, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    ids = torch.tensor([[6, 127, 0.02]] * 2, device=device, dtype=dtype)
    return x, emb, ids


def count_flops(pipe, args, device, dtype):
    """FLOPs of one UNet step with guidance (batch 2) and of the whole VAE decode, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x, emb, ids = unet_inputs(pipe, args, device, dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.unet(x, torch.tensor(1.0, device=device), encoder_hidden_states=emb, added_time_ids=ids)
    unet = fc.get_total_flops()
    lat = torch.randn(args.frames, 4, args.height // 8, args.width // 8, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for i in range(0, args.frames, 8):
            pipe.vae.decode(lat[i:i + 8], num_frames=lat[i:i + 8].shape[0])
    return {"unet_step_cfg_batch2": unet, "vae_decode": fc.get_total_flops(),
            "video_total": unet * args.steps + fc.get_total_flops()}


def time_unet_step(pipe, args, device, dtype, calls: int) -> float:
    x, emb, ids = unet_inputs(pipe, args, device, dtype)
    t_in = torch.tensor(1.0, device=device)
    times = []
    with torch.no_grad():
        for _ in range(1 + calls):
            sync(device)
            t = time.perf_counter()
            pipe.unet(x, t_in, encoder_hidden_states=emb, added_time_ids=ids)
            sync(device)
            times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


class Bench:
    """What the parts share: the model (built once), its FLOPs, eager reference frames."""

    def __init__(self, args, report: Report):
        self.args, self.report = args, report
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.float16
        self._pipe = self._flops = None
        self.reference: dict[str, Any] = {}  # eager frames by row id
        self.compiled_reference: dict[str, Any] = {}
        from PIL import Image

        self.image = Image.open(os.path.join(REPO, "svd_batch/data/sample/rocket.jpg")).convert("RGB")

    @property
    def pipe(self):
        if self._pipe is None:
            t = time.perf_counter()
            if self.args.tiny:
                from svd_batch.tiny import build_tiny_pipeline

                self._pipe = build_tiny_pipeline().to(self.device)
            else:
                self._pipe = build_xt(self.device, self.dtype)
            self._pipe.set_progress_bar_config(disable=True)
            params = sum(p.numel() for p in self._pipe.unet.parameters())
            self.report.put("eager", "model_build_s", time.perf_counter() - t,
                            f"model built in {time.perf_counter() - t:.1f} s (UNet {params / 1e9:.2f} B parameters)")
        return self._pipe

    @property
    def flops(self):
        if self._flops is None:
            t = time.perf_counter()
            self._flops = count_flops(self.pipe, self.args, self.device, self.dtype)
            self.report.put("eager", "flops", self._flops,
                            f"UNet step (guided, batch 2): {self._flops['unet_step_cfg_batch2'] / 1e12:.1f} TFLOP; "
                            f"video {self._flops['video_total'] / 1e15:.2f} PFLOP (counted in "
                            f"{time.perf_counter() - t:.1f} s)")
        return self._flops

    def generator(self, **kw):
        from svd_batch.generate import Generator

        return Generator(pipe=self.pipe, device=self.device, **{"memory_mode": "full", **kw})

    def passes(self, gen, part: str, key: str, label: str, repeats: int, reference: dict | None = None,
               row: dict | None = None):
        """``repeats`` production passes with the timeline on; the figures of their median pass. ``row``: values
        of the timed row other than the bench's (the fast path's)."""
        flops = self.flops
        timed = bench_row(self.args, 1, **(row or {}))
        # One UNet call's FLOPs: guidance runs it on a batch of two, without it on one (half, as FLOPs are linear).
        step_flops = flops["unet_step_cfg_batch2"] / (1 if timed.max_guidance_scale > 1 else 2)
        timeline = Timeline(gen.pipe, self.device)
        results = []
        try:
            with tempfile.TemporaryDirectory() as d:
                for i in range(repeats):
                    results.append(production_pass(gen, timed, self.image, d, timeline))
        finally:
            timeline.close()
        mid = sorted(results, key=lambda r: r["generate_s"])[(len(results) - 1) // 2]  # the lower median
        table, lines = timeline_table(mid["timeline"], mid["mp4_s"])
        step = table["unet"]["per_step_median_s"]
        unet_tflops = step_flops / step / 1e12
        value = {"seconds_per_video": mid["generate_s"], "seconds_per_video_with_mp4": mid["generate_s"] + mid["mp4_s"],
                 "all_passes_s": [r["generate_s"] for r in results], "timeline": table,
                 "unet_tflops": unet_tflops, "unet_share_of_790": unet_tflops * 1e12 / H200_DENSE_FP16_FLOPS,
                 "attention": mid["attention"], "unet_calls": table["unet"]["calls"]}
        if row is None:  # the bench's own row: 25 guided steps, what video_total counts
            value["video_tflops"] = flops["video_total"] / mid["generate_s"] / 1e12
        if self.device.type == "cuda":
            value["peak_vram_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            value["peak_vram_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        if reference is not None and "bench-1" in reference:
            value["frames_vs_eager"] = frames_diff(mid["frames"], reference["bench-1"])
        summary = (f"{label}: {mid['generate_s']:.2f} s/video ({mid['generate_s'] + mid['mp4_s']:.2f} with MP4), "
                   f"UNet {step:.3f} s/step = {unet_tflops:.0f} TFLOP/s = {value['unet_share_of_790']:.0%} of 790"
                   + (f"; frames vs eager: {value['frames_vs_eager']}" if "frames_vs_eager" in value else ""))
        value["timeline_table"] = lines
        self.report.put(part, key, value, summary)
        if part == "eager":  # the one table on the summary screen (one screen); the others in a line each
            self.report.note(part, ["    " + line for line in lines])
        else:
            self.report.note(part, ["    " + " | ".join(
                f"{stage} {table[stage]['seconds']:.2f}" for stage in STAGES if stage in table)
                + f" | between {table['idle_between_stages']['seconds']:.2f} | mp4 {mid['mp4_s']:.2f} s"])
        return value, mid["frames"]


# -- the parts ------------------------------------------------------------------------------------------------------
def part_versions(b: Bench) -> None:
    import diffusers
    import transformers

    import svd_batch
    from svd_batch.attention import KERNEL, default_order

    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
         "diffusers": diffusers.__version__, "transformers": transformers.__version__,
         "svd_batch_from": os.path.dirname(svd_batch.__file__),
         "sdpa_default_order": [KERNEL[o.name] for o in default_order()],
         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    if b.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        v.update(gpu=props.name, capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30,
                 sms=props.multi_processor_count)
        with contextlib.suppress(Exception):
            v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
    else:
        v["gpu"] = "none (CPU rehearsal)"
    b.report.put("versions", "versions", v, " ".join(f"{k}={v[k]}" for k in (
        "gpu", "torch", "cuda", "cudnn", "diffusers", "transformers", "python") if k in v))
    b.report.put("versions", "sdpa_default_order", v["sdpa_default_order"],
                 "SDPA default order: " + ", ".join(v["sdpa_default_order"]))


def part_eager(b: Bench) -> None:
    gen = b.generator()
    t = time.perf_counter()
    warm = gen.run([bench_row(b.args, 0, num_inference_steps=2)], [b.image])[0]  # cuDNN/cuBLAS plans, allocator
    if warm.error:
        raise RuntimeError(warm.error)
    b.report.put("eager", "warmup_s", time.perf_counter() - t)
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _, frames = b.passes(gen, "eager", "full_eager_fp16", "eager fp16", b.args.repeats)
    b.reference["bench-1"] = frames


def part_attention(b: Bench) -> None:
    """Each runtime.attention setting on every module: which kernel ran where, and what it costs the UNet."""
    from svd_batch.model import SettingRefused, check_attention

    gen = b.generator()
    short = bench_row(b.args, 2, num_inference_steps=2)
    base = None
    for name in b.args.attention.split(","):
        value: dict[str, Any] = {}
        try:
            check_attention(name, b.device.type)
            gen.set_attention(name)
            spy = ModuleKernels(b.pipe)
            with spy:
                [out] = gen.run([short], [b.image])
            if out.error:
                raise RuntimeError(out.error)
            value["kernels"] = spy.summary()
            value["row_records"] = out.attention
            if base is None:
                base = out.frames
            value["frames_vs_first_setting"] = frames_diff(out.frames, base)
            step = time_unet_step(b.pipe, b.args, b.device, b.dtype, b.args.attention_calls)
            value["unet_per_step_s"] = step
            value["unet_tflops"] = b.flops["unet_step_cfg_batch2"] / step / 1e12
            line = (f"{name:<9} UNet {step:.3f} s/step ({value['unet_tflops']:.0f} TFLOP/s), row records "
                    f"'{out.attention}', kernels {value['kernels']}, frames vs "
                    f"{b.args.attention.split(',')[0]}: {value['frames_vs_first_setting']}")
        except SettingRefused as exc:
            value["refused"] = str(exc)
            line = f"{name:<9} refused: {str(exc)[:120]}"
        except Exception as exc:  # noqa: BLE001 - e.g. math attention out of memory at full size
            from svd_batch.util import first_line

            value["error"] = f"{type(exc).__name__}: {first_line(exc, 300)}"
            line = f"{name:<9} error: {value['error'][:160]}"
            if b.device.type == "cuda":
                torch.cuda.empty_cache()
        b.report.put("attention", name, value, line)
    gen.set_attention("auto")


class ModuleKernels:
    """The SDPA kernel torch picks for each call, by model (CLIP, VAE, UNet self- or cross-attention)."""

    def __init__(self, pipe):
        from torch.overrides import TorchFunctionMode

        outer = self
        self.seen: dict[str, set] = {}
        self.where: list[str] = []
        self._handles = []
        for name, module in (("clip", pipe.image_encoder), ("vae", pipe.vae.encoder), ("vae", pipe.vae.decoder),
                             ("unet", pipe.unet)):
            self._handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.where.append(n)))
            self._handles.append(module.register_forward_hook(lambda m, a, o: self.where.pop() and None,
                                                              always_call=True))

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    outer.note(args, kwargs)
                return func(*args, **kwargs)

        self.mode = Mode()

    def note(self, args, kwargs):
        from svd_batch.attention import kernel_of_call

        model = self.where[-1] if self.where else "?"
        if model == "unet":
            model = "unet cross" if args[1].shape[-2] != args[0].shape[-2] else "unet self"
        key = f"{model} (head dim {args[0].shape[-1]})"
        self.seen.setdefault(key, set()).add(kernel_of_call(args, kwargs))

    def summary(self) -> dict[str, str]:
        return {k: "+".join(sorted(v)) for k, v in sorted(self.seen.items())}

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        for h in self._handles:
            h.remove()


def part_e2e(b: Bench) -> None:
    value = svd_batch_loop(b, b.args.e2e_rows)
    b.report.put("e2e", "svd_batch_loop", value, loop_line(value))


def loop_line(value: dict[str, Any]) -> str:
    return (f"{value['rows']} rows through svd-batch: steady {value['steady_seconds_per_video']:.2f} s/video, GPU idle "
            f"{value['gpu_idle_fraction']:.1%} at steady state ({value['gpu_idle_outside_pipeline_call']:.1%} "
            f"outside the pipeline call), final drain {value['final_drain_s']:.1f} s")


def svd_batch_loop(b: Bench, rows: int, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """svd-batch's own run loop (runner, worker, loader and writer threads) on ``rows`` rows, in this process
    with the model already built (no 4 GB save and reload); ``extra``: overrides after the bench's (they win).
    GPU busy time is the stages' device time (the timeline above) in each pipeline call; the steady state runs
    from the end of the first call to the end of the last, so model start-up, the first row and the writer's
    final MP4 drain are outside it. MP4s are written and scored (report.scores) as in a real run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from unittest import mock

    from diffusers import StableVideoDiffusionPipeline
    from svd_batch import runner
    from svd_batch.generate import Generator
    from svd_batch.settings import compose_config

    pipe = b.pipe
    calls: list[dict[str, float]] = []
    timeline = Timeline(pipe, b.device)
    real_run = Generator.run

    def timed_run(self, *a, **k):
        sync(b.device)
        timeline.begin()
        start = time.perf_counter()
        try:
            return real_run(self, *a, **k)
        finally:
            tl = timeline.read()
            calls.append({"start": start, "end": time.perf_counter(), "busy": busy_seconds(tl["spans"]),
                          "device_pass": tl["end"]})

    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "model")
        pipe.save_config(model)  # model_index.json: a folder svd-batch accepts; the weights stay in memory
        images = [os.path.join(REPO, "svd_batch/data/sample", f) for f in ("rocket.jpg", "cat.jpg", "coffee.jpg")]
        pq.write_table(pa.table({"image": [images[i % 3] for i in range(rows)], "id": [f"r{i}" for i in range(rows)],
                                 "seed": list(range(rows))}), os.path.join(d, "m.parquet"))
        out = os.path.join(d, "out")
        overrides = [f"model.path={model}", "model.name=xt-random", f"manifest.path={os.path.join(d, 'm.parquet')}",
                     f"output.dir={out}", f"generation.height={b.args.height}", f"generation.width={b.args.width}",
                     f"generation.num_frames={b.args.frames}", f"generation.num_inference_steps={b.args.steps}",
                     f"model.dtype={'float32' if b.args.tiny else 'float16'}", "runtime.progress=false",
                     "report.enabled=false", *extra]
        cfg = compose_config(*overrides)
        t = time.perf_counter()
        try:
            with mock.patch.object(StableVideoDiffusionPipeline, "from_pretrained", lambda *a, **k: pipe), \
                    mock.patch.object(Generator, "run", timed_run):
                code = runner.run(cfg)
        finally:
            timeline.close()
        returned = time.perf_counter()
        stats = json.load(open(os.path.join(out, "stats", "rank-00000.json")))
        res = pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
    if code != 0 or len(calls) < 2:
        errors = sorted({str(r["error"]) for r in res if r["error"]})
        raise RuntimeError(f"svd-batch exited {code} after {len(calls)} pipeline calls; row errors: {errors[:3]}")
    steady = calls[1:]
    window = steady[-1]["end"] - calls[0]["end"]
    busy = sum(c["busy"] for c in steady)
    value = {
        "rows": rows, "exit_code": code, "process_wall_s": returned - t,
        "steady_window_s": window, "steady_rows": len(steady),
        "steady_seconds_per_video": window / len(steady),
        "gpu_idle_fraction": 1.0 - busy / window,
        "gpu_idle_outside_pipeline_call": 1.0 - sum(c["end"] - c["start"] for c in steady) / window,
        "final_drain_s": returned - calls[-1]["end"],
        "start_to_first_call_s": calls[0]["start"] - t,
        "loop_outside_pipeline_fraction_with_startup_and_drain": stats.get("outside_pipeline_fraction"),
        "median_generate_s": float(np.median([r["generate_seconds"] for r in res])),
        "median_write_s": float(np.median([r["write_seconds"] for r in res])),
        "attention_recorded": sorted({str(r["attention"]) for r in res}),
        "sampler_recorded": sorted({str(r["sampler"]) for r in res}),
        "scored_rows": sum(r["motion_score"] is not None for r in res),
        "steps_recorded": sorted({int(r["num_inference_steps"]) for r in res}),
    }
    return value


def compiled_generator(b: Bench, mode: str | None, compile_vae: bool = False, row: dict | None = None):
    """The pipeline with svd-batch's own compile (model.compile_models) and warm-up (of the bench's row shape, or
    of ``row``'s), cold for this mode."""
    import torch._dynamo

    from svd_batch.model import compile_models, configure_compile

    torch._dynamo.reset()
    backend = "eager" if b.args.tiny else "inductor"
    configure_compile("auto")
    eager = (b.pipe.unet, b.pipe.vae.decoder)
    compile_models(b.pipe, backend, mode, compile_vae)
    gen = b.generator(compiled=True)
    t = time.perf_counter()
    gen.warmup([(bench_row(b.args, 0, **(row or {})), 1)])
    return gen, time.perf_counter() - t, eager


def restore(b: Bench, eager) -> None:
    import torch._dynamo

    b.pipe.unet, b.pipe.vae.decoder = eager
    torch._dynamo.reset()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def part_compiled(b: Bench) -> None:
    mode = b.args.compile_mode
    gen, compile_s, eager = compiled_generator(b, mode)
    try:
        b.report.put("compiled", "compile_s", compile_s, f"compile (warm-up) {mode}: {compile_s:.0f} s")
        value, frames = b.passes(gen, "compiled", f"unet_{mode}", f"compiled UNet {mode}", b.args.repeats,
                                 reference=b.reference)
        b.compiled_reference["bench-1"] = frames
        b.report.put("compiled", "recompiles_after_warmup", gen.recompiles())
    finally:
        restore(b, eager)


def part_fast(b: Bench) -> None:
    """The fast path (issue 24): AnimateLCM's sampler at 4 steps without guidance, on the same random SVD-XT
    weights (the cost is the architecture's; the frames are noise either way). Each figure is written as it is
    measured, the eager ones first, so a window cut short keeps them."""
    from svd_batch.samplers import use_sampler

    b.report.put("fast", "row", FAST_ROW, "generation.sampler=animatelcm, " + ", ".join(
        f"{k} {v}" for k, v in FAST_ROW.items()) + f", {b.args.height}x{b.args.width}, {b.args.frames} frames")
    euler, eager_models = b.pipe.scheduler, (b.pipe.unet, b.pipe.vae.decoder)
    use_sampler(b.pipe, "animatelcm")
    fast_reference: dict[str, Any] = {}
    try:
        gen = b.generator()
        t = time.perf_counter()
        warm = gen.run([bench_row(b.args, 0, **FAST_ROW)], [b.image])[0]
        if warm.error:
            raise RuntimeError(warm.error)
        b.report.put("fast", "warmup_s", time.perf_counter() - t)
        _, fast_reference["bench-1"] = b.passes(gen, "fast", "animatelcm_eager", "fast eager (animatelcm, 4 steps, "
                                                "no guidance)", b.args.repeats, row=FAST_ROW)
        loop = svd_batch_loop(b, b.args.fast_e2e_rows, tuple(FAST_OVERRIDES))
        b.report.put("fast", "svd_batch_loop_eager", loop, "eager: " + loop_line(loop))
        gen, compile_s, _ = compiled_generator(b, b.args.compile_mode, row=FAST_ROW)
        b.report.put("fast", "compile_s", compile_s, f"compile (warm-up) {b.args.compile_mode}: {compile_s:.0f} s")
        b.passes(gen, "fast", f"animatelcm_compiled_{b.args.compile_mode}", f"fast compiled {b.args.compile_mode}",
                 b.args.repeats, reference=fast_reference, row=FAST_ROW)
        b.report.put("fast", "recompiles_after_warmup", gen.recompiles())
        if not b.args.tiny and b.report.left() < FAST_LOOP_COMPILED_S:
            b.report.put("fast", "svd_batch_loop_compiled", {"skipped": f"{b.report.left():.0f} s left"},
                         f"compiled loop: skipped ({b.report.left():.0f} s left, needs ~{FAST_LOOP_COMPILED_S} s)")
            return
        # The loop with the UNet compiled and warmed up above (runtime.compile=true would compile it again, under
        # the timeline's hooks, which a fullgraph compile cannot take): rows record compiled=false.
        loop = svd_batch_loop(b, b.args.fast_e2e_rows, tuple(FAST_OVERRIDES))
        loop["unet_compiled_by_the_bench"] = b.args.compile_mode
        b.report.put("fast", "svd_batch_loop_compiled", loop, "compiled UNet: " + loop_line(loop))
    finally:
        restore(b, eager_models)  # compiled_generator put a compiled UNet in the shared pipeline
        b.pipe.scheduler = euler


def part_levers(b: Bench) -> None:
    for lever, estimate in LEVERS.items():
        if lever in b.args.skip_levers.split(","):
            continue
        if not b.args.tiny and b.report.left() < estimate:
            b.report.put("levers", lever, {"skipped": f"{b.report.left():.0f} s left, needs ~{estimate} s"},
                         f"{lever}: skipped ({b.report.left():.0f} s left, needs ~{estimate} s)")
            continue
        vae = lever == "compile_vae"
        mode = b.args.compile_mode if vae else lever
        gen, compile_s, eager = compiled_generator(b, mode, compile_vae=vae)
        try:
            b.report.put("levers", f"{lever}_compile_s", compile_s, f"{lever}: compile {compile_s:.0f} s")
            value, frames = b.passes(gen, "levers", lever, lever, b.args.repeats, reference=b.reference)
            if vae and "bench-1" in b.compiled_reference:
                b.report.put("levers", "compile_vae_frames_vs_compiled_unet_only",
                             frames_diff(frames, b.compiled_reference["bench-1"]))
        finally:
            restore(b, eager)


def part_frames(b: Bench, repeats: int = 5) -> None:
    """Host time to finish one video from the decoded float32 tensor: diffusers' PIL path (copy float32 to the
    host, numpy, PIL per frame, stack) against svd-batch's (uint8 on the device, then copy)."""
    from diffusers.video_processor import VideoProcessor

    from svd_batch.batch import decoded_to_frames

    processor = VideoProcessor(vae_scale_factor=8)
    pipe = type("Pipe", (), {"video_processor": processor})()
    decoded = torch.rand(1, 3, b.args.frames, b.args.height, b.args.width,
                         generator=torch.Generator().manual_seed(0)).to(b.device) * 2 - 1
    old, new = [], []
    for _ in range(repeats):
        sync(b.device)
        t = time.perf_counter()
        pil = processor.postprocess_video(video=decoded, output_type="pil")[0]
        a = np.stack([np.asarray(f) for f in pil])
        old.append(time.perf_counter() - t)
        sync(b.device)
        t = time.perf_counter()
        [c] = decoded_to_frames(pipe, decoded)
        new.append(time.perf_counter() - t)
        if not np.array_equal(a, c):
            raise AssertionError("the device uint8 path gave other bytes than diffusers' PIL path")
    value = {"pil_path_s": float(np.median(old)), "device_uint8_s": float(np.median(new)), "same_bytes": True,
             "repeats": repeats}
    b.report.put("frames", "frames_finish", value,
                 f"finish one video: PIL path {value['pil_path_s']:.3f} s, device uint8 {value['device_uint8_s']:.3f} s")


def part_memory(b: Bench) -> None:
    """The cheaper memory modes, eager: the pipeline as built is put in each mode, then back."""
    for mode, (offload, chunking, cap) in MEMORY_MODES.items():
        gen = b.generator(memory_mode=mode, max_decode_chunk_size=cap, cpu_offload=offload, forward_chunking=chunking)
        gen._chunking_now = gen._offload_now = False  # as built: everything on the device, no chunking
        gen._apply(chunking, offload)
        try:
            if b.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            b.passes(gen, "memory", mode, f"memory={mode}", 1, reference=b.reference)
        finally:
            gen._apply(False, False)


RUNNERS: dict[str, Callable[[Bench], None]] = {
    "versions": part_versions, "fast": part_fast, "eager": part_eager, "attention": part_attention, "e2e": part_e2e,
    "compiled": part_compiled, "levers": part_levers, "frames": part_frames, "memory": part_memory}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="all", help="comma-separated parts, or all (the order above)")
    ap.add_argument("--out-dir", default="bench-gpu-out", help="where gpu_check.json and summary.txt go")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU rehearsal: the tiny model at 64x64, 8 frames, 2 steps; compile on the eager backend")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds this process may take: a part (or lever) whose estimate does not fit is skipped")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per configuration (median)")
    ap.add_argument("--attention", default=",".join(ATTENTION_SETTINGS), help="runtime.attention settings to try")
    ap.add_argument("--attention-calls", type=int, default=2, help="timed UNet steps per attention setting")
    ap.add_argument("--e2e-rows", type=int, default=4)
    ap.add_argument("--fast-e2e-rows", type=int, default=8, help="rows of the fast part's svd-batch loop")
    ap.add_argument("--compile-mode", default="reduce-overhead", help="runtime.compile_mode of the compiled part")
    ap.add_argument("--skip-levers", default="", help="comma-separated levers to leave out")
    args = ap.parse_args()
    parts = list(PARTS) if args.parts == "all" else [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PARTS)}, or all")
    if args.tiny:
        args.height, args.width, args.frames, args.steps = 64, 64, 8, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA GPU (or --tiny for the CPU rehearsal)")
        args.height, args.width, args.frames, args.steps = 576, 1024, 25, 25
    report = Report(args.out_dir, args.budget_s)
    b = Bench(args, report)
    failed = 0
    for part in parts:
        estimate = 0 if args.tiny else PARTS[part]
        if part != "levers" and report.left() < estimate:  # levers checks each lever itself
            report.put(part, "skipped", f"{report.left():.0f} s left, needs ~{estimate} s",
                       f"skipped: {report.left():.0f} s left, needs ~{estimate} s")
            continue
        t = time.perf_counter()
        try:
            RUNNERS[part](b)
            report.put(part, "part_seconds", time.perf_counter() - t, f"({time.perf_counter() - t:.0f} s)")
        except Exception as exc:  # noqa: BLE001 - the next part still runs: the window is too short to lose
            import traceback

            traceback.print_exc()
            failed += 1
            report.put(part, "error", f"{type(exc).__name__}: {str(exc)[:2000]}",
                       f"FAILED after {time.perf_counter() - t:.0f} s: {type(exc).__name__}: {str(exc)[:200]}")
    print(report.summary(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
