"""SVD-XT at full size on one GPU: seconds per stage, peak VRAM, FLOPs and achieved matrix rate, per memory
mode, eager vs compiled. Random weights built from SVD-XT's configs: the same cost as the real model,
nothing to download.

    python scripts/bench_gpu.py --out BENCH_GPU.json            # on a CUDA machine, under 8 minutes
    python scripts/bench_gpu.py --tiny --out /tmp/b.json        # CPU dry check of every code path (tests)

Stages, timed with CUDA synchronisation around each model call inside one real pipeline call: CLIP image
encode, VAE encode, UNet (per step), VAE decode, then MP4 encode of the frames. Then the whole svd-batch
CLI on a few rows with the same random checkpoint (saved with save_pretrained, loaded like a real one),
to measure the time per video spent outside the pipeline call (target: under 2%).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

H200_BF16_FLOPS = 790e12  # measured dense bf16/fp16 matrix rate on this workplace's H200


def build_xt(device, dtype):
    """SVD-XT's architecture (stabilityai/stable-video-diffusion-img2vid-xt configs), random weights."""
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


class StageTimer:
    """Wraps each model's entry point with synchronised timers."""

    def __init__(self, pipe, device):
        self.pipe, self.device, self.times = pipe, device, {}
        self._orig = []
        for name, obj, attr in (("clip", pipe.image_encoder, "forward"), ("vae_encode", pipe.vae, "encode"),
                                ("unet", pipe.unet, "forward"), ("vae_decode", pipe.vae, "decode")):
            self._wrap(name, obj, attr)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wrap(self, name, obj, attr):
        fn = getattr(obj, attr)
        self._orig.append((obj, attr, fn))

        def timed(*a, **k):
            self._sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            self._sync()
            self.times.setdefault(name, []).append(time.perf_counter() - t)
            return out

        setattr(obj, attr, timed)

    def restore(self):
        for obj, attr, fn in self._orig:
            setattr(obj, attr, fn)


def count_flops(pipe, args, device, dtype):
    """FLOPs of one UNet step with guidance (batch 2) and of the whole VAE decode, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    f, h, w = args.frames, args.height // 8, args.width // 8
    x = torch.randn(2, f, 8, h, w, device=device, dtype=dtype)
    emb = torch.randn(2, 1, 1024 if not args.tiny else pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    ids = torch.tensor([[6, 127, 0.02]] * 2, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.unet(x, torch.tensor(1.0, device=device), encoder_hidden_states=emb, added_time_ids=ids)
    unet = fc.get_total_flops()
    lat = torch.randn(f, 4, h, w, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for i in range(0, f, 8):
            pipe.vae.decode(lat[i:i + 8], num_frames=lat[i:i + 8].shape[0])
    return unet, fc.get_total_flops()


def run_mode(pipe, mode, args, device, image):
    from svd_batch.generate import set_forward_chunking
    from svd_batch.write import write_mp4

    memo = {"full": (False, False, 8), "offload": (True, False, 8), "low_vram": (True, True, 2)}[mode]
    offload, chunking, chunk = memo
    if offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    if chunking:
        set_forward_chunking(pipe.unet, True)
    timer = StageTimer(pipe, device)
    results = []
    try:
        for rep in range(args.repeats + 1):  # the first is warm-up (and compilation when compiled)
            timer.times.clear()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            frames = pipe(image, height=args.height, width=args.width, num_frames=args.frames,
                          num_inference_steps=args.steps, decode_chunk_size=chunk,
                          generator=torch.Generator("cpu").manual_seed(rep), output_type="np").frames[0]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            call = time.perf_counter() - t
            arr = (frames * 255).round().astype(np.uint8)
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                write_mp4(arr, os.path.join(d, "v.mp4"), fps=7)
                mp4 = time.perf_counter() - t
            results.append({
                "pipeline_call_s": call, "mp4_s": mp4,
                "clip_s": sum(timer.times.get("clip", [])), "vae_encode_s": sum(timer.times.get("vae_encode", [])),
                "unet_total_s": sum(timer.times.get("unet", [])),
                "unet_per_step_s": float(np.median(timer.times["unet"])) if timer.times.get("unet") else None,
                "vae_decode_s": sum(timer.times.get("vae_decode", [])),
                "peak_vram_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            })
    finally:
        timer.restore()
        if chunking:
            set_forward_chunking(pipe.unet, False)
        if offload and device.type == "cuda":
            pipe.remove_all_hooks()
            pipe.to(device)
    timed = results[1:]
    summary = {k: float(np.median([r[k] for r in timed])) if timed[0][k] is not None else None for k in timed[0]}
    summary["warmup_call_s"] = results[0]["pipeline_call_s"]
    return summary


def e2e(pipe, args, device):
    """The whole CLI on a few rows: fraction of each video's time spent outside the pipeline call."""
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "model")
        pipe.save_pretrained(model)
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = args.e2e_rows
        pq.write_table(pa.table({"image": [os.path.join(REPO, "svd_batch/data/sample/rocket.jpg")] * rows,
                                 "id": [f"r{i}" for i in range(rows)], "seed": list(range(rows))}),
                       os.path.join(d, "m.parquet"))
        out = os.path.join(d, "out")
        cmd = [sys.executable, "-m", "svd_batch", f"model.path={model}", "model.name=xt-random",
               f"model.dtype={'float32' if args.tiny else 'float16'}", f"manifest.path={os.path.join(d, 'm.parquet')}",
               f"output.dir={out}", f"generation.height={args.height}", f"generation.width={args.width}",
               f"generation.num_frames={args.frames}", f"generation.num_inference_steps={args.steps}",
               "runtime.progress=false"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        stats = json.load(open(os.path.join(out, "stats", "rank-00000.json")))
        res = pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
        gen = [r["generate_seconds"] for r in res]
        return {"rows": rows, "process_wall_s": wall, "loop_wall_s": stats["wall_seconds"],
                "pipeline_s": stats["pipeline_seconds"], "outside_pipeline_fraction": stats["outside_pipeline_fraction"],
                "median_generate_s": float(np.median(gen)), "model_load_s": stats["model_load_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU at 64x64: a dry check of the script")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="full,offload,low_vram")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--e2e-rows", type=int, default=3)
    args = ap.parse_args()
    if args.tiny:
        from svd_batch.tiny import build_tiny_pipeline

        device, dtype = torch.device("cpu"), torch.float32
        args.height, args.width, args.frames, args.steps = 64, 64, 8, 2
        pipe = build_tiny_pipeline().to(device)
        compile_kw = {"backend": "eager", "fullgraph": True}
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA GPU (or --tiny for the CPU dry check)")
        device, dtype = torch.device("cuda"), torch.float16
        args.height, args.width, args.frames, args.steps = 576, 1024, 25, 25
        torch.backends.cuda.matmul.allow_tf32 = True
        pipe = build_xt(device, dtype)
        compile_kw = {"mode": "reduce-overhead", "fullgraph": True}
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    image = Image.open(os.path.join(REPO, "svd_batch/data/sample/rocket.jpg")).convert("RGB").resize((args.width, args.height))
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": [args.height, args.width], "frames": args.frames,
              "steps": args.steps, "dtype": str(dtype), "modes": {}}
    unet_flops, decode_flops = count_flops(pipe, args, device, dtype)
    report["flops"] = {"unet_step_cfg_batch2": unet_flops, "vae_decode": decode_flops,
                       "video_total": unet_flops * args.steps + decode_flops}
    for mode in args.modes.split(","):
        report["modes"][f"{mode} eager"] = run_mode(pipe, mode, args, device, image)
        print(json.dumps({f"{mode} eager": report["modes"][f"{mode} eager"]}), flush=True)
    if not args.no_compile:
        eager_unet = pipe.unet
        pipe.unet = torch.compile(pipe.unet, **compile_kw)
        report["modes"]["full compiled"] = run_mode(pipe, "full", args, device, image)
        print(json.dumps({"full compiled": report["modes"]["full compiled"]}), flush=True)
        pipe.unet = eager_unet
    for name, m in report["modes"].items():
        if m.get("unet_per_step_s"):
            m["unet_achieved_tflops"] = unet_flops / m["unet_per_step_s"] / 1e12
            m["unet_fraction_of_790_tflops"] = unet_flops / m["unet_per_step_s"] / H200_BF16_FLOPS
        m["seconds_per_video"] = m["pipeline_call_s"] + m["mp4_s"]
    report["e2e_svd_batch"] = e2e(pipe, args, device)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
