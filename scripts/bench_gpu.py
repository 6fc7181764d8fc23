"""SVD-XT at full size on one GPU, through svd-batch's own code: the generator's ``run`` (device-side uint8
frames, the fallback machinery around it) and the runner's MP4 writer. Random weights built from SVD-XT's
configs: the same cost as the real model, nothing to download.

    python scripts/bench_gpu.py --quick --out bench_gpu_quick.json   # first: full eager + compiled, 4-row run
    python scripts/bench_gpu.py --out bench_gpu.json                 # everything (sized for 8 min on an H200)
    python scripts/bench_gpu.py --tiny --out /tmp/b.json             # CPU dry check of every code path (tests)
    python scripts/bench_gpu.py --frames-only                        # frame finishing alone, any machine

Per memory mode (full, offload, low_vram; eager) and for full with the UNet compiled (each compile mode, the
compile time apart): seconds per video through ``Generator.run`` plus the MP4 write, then one more pass with
synchronised timers around each stage (CLIP image encode, VAE encode, UNet per step, VAE decode, the uint8
copy to the host, MP4), peak VRAM allocated and reserved, FLOPs from torch's counter and the TFLOP/s
achieved. Then the UNet per step under each SDPA attention backend, and the svd-batch CLI on >= 12 rows with
the same checkpoint saved to disk: the share of the loop's wall time the GPU spends outside the pipeline.
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

H200_DENSE_FP16_FLOPS = 790e12  # measured dense fp16/bf16 matrix rate on this workplace's H200
MEMORY_MODES = {"full": (False, False, None), "offload": (True, False, None), "low_vram": (True, True, 2)}


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Synchronised timers around each model's entry point and the host copy, for one pass."""

    def __init__(self, pipe, device):
        import svd_batch.batch as batching

        self.device, self.times, self._orig = device, {}, []
        for name, obj, attr in (("clip", pipe.image_encoder, "forward"), ("vae_encode", pipe.vae, "encode"),
                                ("unet", pipe.unet, "forward"), ("vae_decode", pipe.vae, "decode"),
                                ("to_host", batching, "to_host")):
            self._wrap(name, obj, attr)

    def _wrap(self, name, obj, attr):
        fn = getattr(obj, attr)
        self._orig.append((obj, attr, fn, attr in vars(obj)))

        def timed(*a, **k):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **k)
            sync(self.device)
            self.times.setdefault(name, []).append(time.perf_counter() - t)
            return out

        setattr(obj, attr, timed)

    def restore(self):
        for obj, attr, fn, own in self._orig:
            if own:  # a module's function, or a compiled wrapper's own forward
                setattr(obj, attr, fn)
            else:
                delattr(obj, attr)  # back to the class's method


def count_flops(pipe, args, device, dtype):
    """FLOPs of one UNet step with guidance (batch 2) and of the whole VAE decode, by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    f, h, w = args.frames, args.height // 8, args.width // 8
    x = torch.randn(2, f, 8, h, w, device=device, dtype=dtype)
    emb = torch.randn(2, 1, pipe.unet.config.cross_attention_dim, device=device, dtype=dtype)
    ids = torch.tensor([[6, 127, 0.02]] * 2, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        pipe.unet(x, torch.tensor(1.0, device=device), encoder_hidden_states=emb, added_time_ids=ids)
    unet = fc.get_total_flops()
    lat = torch.randn(f, 4, h, w, device=device, dtype=pipe.vae.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for i in range(0, f, 8):
            pipe.vae.decode(lat[i:i + 8], num_frames=lat[i:i + 8].shape[0])
    return unet, fc.get_total_flops(), (x, emb, ids)


def bench_row(args, i=0):
    return {"id": f"bench-{i}", "seed": i, "height": args.height, "width": args.width, "num_frames": args.frames,
            "num_inference_steps": args.steps, "fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02,
            "min_guidance_scale": 1.0, "max_guidance_scale": 3.0, "decode_chunk_size": 8}


def production_pass(gen, row, image, mp4_dir):
    """What a row costs in svd-batch: Generator.run (to uint8 on the host), then the runner's MP4 writer."""
    from svd_batch.write import write_mp4

    sync(gen.device)
    t = time.perf_counter()
    [out] = gen.run([row], [image])
    if out.error:
        raise RuntimeError(out.error)
    generate = time.perf_counter() - t
    t = time.perf_counter()
    write_mp4(out.frames, os.path.join(mp4_dir, f"{row['id']}.mp4"), fps=7)
    return generate, time.perf_counter() - t


def bench_generator(gen, args, image, flops, compile_s=None):
    """Seconds per video (median of --repeats production passes after one warm-up), then one staged pass."""
    from svd_batch.util import peak_vram_bytes, reset_peak_vram

    with tempfile.TemporaryDirectory() as d:
        if compile_s is None:
            production_pass(gen, bench_row(args), image, d)  # warm-up: cuDNN/cuBLAS heuristics, allocator
        reset_peak_vram(gen.device)
        passes = [production_pass(gen, bench_row(args, i + 1), image, d) for i in range(args.repeats)]
        peak = peak_vram_bytes(gen.device)
        reserved = int(torch.cuda.max_memory_reserved(gen.device)) if gen.device.type == "cuda" else None
        timer = StageTimer(gen.pipe, gen.device)
        try:
            staged_generate, staged_mp4 = production_pass(gen, bench_row(args, 99), image, d)
        finally:
            timer.restore()
    generate = float(np.median([p[0] for p in passes]))
    mp4 = float(np.median([p[1] for p in passes]))
    tt = timer.times
    unet_step = float(np.median(tt["unet"]))
    result = {
        "generate_s": generate, "mp4_s": mp4,
        # The writer runs on its own thread in svd-batch (runtime.overlap): the GPU's time per video is
        # generate_s; serially, a video costs both.
        "seconds_per_video": generate, "seconds_per_video_serial": generate + mp4,
        "clip_s": sum(tt.get("clip", [])), "vae_encode_s": sum(tt.get("vae_encode", [])),
        "unet_per_step_s": unet_step, "unet_total_s": sum(tt["unet"]), "vae_decode_s": sum(tt.get("vae_decode", [])),
        "to_host_s": sum(tt.get("to_host", [])), "mp4_staged_s": staged_mp4, "staged_generate_s": staged_generate,
        "peak_vram_allocated_bytes": peak, "peak_vram_reserved_bytes": reserved,
        "unet_tflops": flops["unet_step_cfg_batch2"] / unet_step / 1e12,
        "video_tflops": flops["video_total"] / generate / 1e12,
    }
    result["unet_fraction_of_790_tflops"] = result["unet_tflops"] * 1e12 / H200_DENSE_FP16_FLOPS
    if compile_s is not None:
        result["compile_s"] = compile_s
    return result


def bench_memory_mode(pipe, mode, args, device, image, flops):
    from svd_batch.generate import Generator

    offload, chunking, cap = MEMORY_MODES[mode]
    gen = Generator(pipe=pipe, device=device, memory_mode=mode, max_decode_chunk_size=cap, cpu_offload=offload,
                    forward_chunking=chunking)
    gen._chunking_now = gen._offload_now = False  # the pipeline as built: put it in this mode, then back
    gen._apply(chunking, offload)
    try:
        return bench_generator(gen, args, image, flops)
    finally:
        gen._apply(False, False)


def bench_compiled(pipe, compile_mode, args, device, image, flops):
    """full with the UNet compiled: the warm-up (compile) timed apart, then as eager."""
    import torch._dynamo

    from svd_batch.generate import Generator

    eager_unet = pipe.unet
    torch._dynamo.reset()
    mode = None if compile_mode == "default" else compile_mode
    kwargs = {"backend": "eager"} if args.tiny else {"backend": "inductor", "mode": mode}
    pipe.unet = torch.compile(eager_unet, fullgraph=True, dynamic=False, **kwargs)
    try:
        gen = Generator(pipe=pipe, device=device, memory_mode="full", compiled=True)
        compile_s = gen.warmup([(bench_row(args), 1)])
        result = bench_generator(gen, args, image, flops, compile_s=compile_s)
        result["recompiles_after_warmup"] = gen.recompiles()
        return result
    finally:
        pipe.unet = eager_unet
        torch._dynamo.reset()


def bench_attention(pipe, args, device, unet_inputs, flops):
    """The UNet per step (guidance batch) under each SDPA backend; a backend torch cannot run is noted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from svd_batch.generate import ATTENTION, CUDA_ONLY_ATTENTION

    x, emb, ids = unet_inputs
    t_in = torch.tensor(1.0, device=device)
    out = {}
    for name, backend in ATTENTION.items():
        if name in CUDA_ONLY_ATTENTION and device.type != "cuda":
            out[name] = {"error": "CUDA only"}
            continue
        ctx = contextlib.nullcontext() if backend is None else sdpa_kernel([getattr(SDPBackend, backend)])
        try:
            with ctx, torch.no_grad():
                times = []
                for _ in range(1 + args.attention_calls):
                    sync(device)
                    t = time.perf_counter()
                    pipe.unet(x, t_in, encoder_hidden_states=emb, added_time_ids=ids)
                    sync(device)
                    times.append(time.perf_counter() - t)
            step = float(np.median(times[1:]))
            out[name] = {"unet_per_step_s": step, "unet_tflops": flops["unet_step_cfg_batch2"] / step / 1e12}
        except Exception as exc:  # noqa: BLE001 - e.g. math attention out of memory at full size
            from svd_batch.util import first_line

            out[name] = {"error": f"{type(exc).__name__}: {first_line(exc, 200)}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def e2e(pipe, args):
    """The svd-batch CLI on --e2e-rows rows: the share of the loop's wall time spent outside the pipeline,
    which is when the GPU has nothing to do (model load and warm-up are outside the loop's figures)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "model")
        pipe.save_pretrained(model)
        rows = args.e2e_rows
        images = [os.path.join(REPO, "svd_batch/data/sample", f) for f in ("rocket.jpg", "cat.jpg", "coffee.jpg")]
        pq.write_table(pa.table({"image": [images[i % 3] for i in range(rows)], "id": [f"r{i}" for i in range(rows)],
                                 "seed": list(range(rows))}), os.path.join(d, "m.parquet"))
        out = os.path.join(d, "out")
        cmd = [sys.executable, "-m", "svd_batch", f"model.path={model}", "model.name=xt-random",
               f"model.dtype={'float32' if args.tiny else 'float16'}", f"manifest.path={os.path.join(d, 'm.parquet')}",
               f"output.dir={out}", f"generation.height={args.height}", f"generation.width={args.width}",
               f"generation.num_frames={args.frames}", f"generation.num_inference_steps={args.steps}",
               "runtime.progress=false", "report.enabled=false"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        stats = json.load(open(os.path.join(out, "stats", "rank-00000.json")))
        res = pq.read_table(os.path.join(out, "results.parquet")).to_pylist()
        return {"rows": rows, "process_wall_s": wall, "loop_wall_s": stats["wall_seconds"],
                "pipeline_s": stats["pipeline_seconds"], "gpu_idle_fraction": stats["outside_pipeline_fraction"],
                "median_generate_s": float(np.median([r["generate_seconds"] for r in res])),
                "median_write_s": float(np.median([r["write_seconds"] for r in res])),
                "model_load_s": stats["model_load_seconds"]}


def frames_finish(device, repeats=5):
    """Host time to finish one 576x1024x25 video from the decoded float32 tensor: diffusers' PIL path (copy
    float32 to the host, numpy, PIL per frame, stack) against svd-batch's (uint8 on the device, then copy).
    On a GPU the quantization runs on the device; on CPU both run on the CPU."""
    from diffusers.video_processor import VideoProcessor

    from svd_batch.batch import decoded_to_frames

    processor = VideoProcessor(vae_scale_factor=8)
    pipe = type("Pipe", (), {"video_processor": processor})()
    decoded = torch.rand(1, 3, 25, 576, 1024, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    old, new = [], []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        pil = processor.postprocess_video(video=decoded, output_type="pil")[0]
        a = np.stack([np.asarray(f) for f in pil])
        old.append(time.perf_counter() - t)
        sync(device)
        t = time.perf_counter()
        [b] = decoded_to_frames(pipe, decoded)
        new.append(time.perf_counter() - t)
        assert np.array_equal(a, b)
    return {"pil_path_s": float(np.median(old)), "device_uint8_s": float(np.median(new)), "same_bytes": True,
            "repeats": repeats, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model on CPU at 64x64: a dry check of the script")
    ap.add_argument("--quick", action="store_true", help="full eager and compiled (default mode), a 4-row CLI run")
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    ap.add_argument("--repeats", type=int, default=1, help="production passes per mode (median)")
    ap.add_argument("--modes", default="full,offload,low_vram")
    ap.add_argument("--compile-modes", default="default,reduce-overhead", help="'' skips compile")
    ap.add_argument("--attention-calls", type=int, default=2)
    ap.add_argument("--e2e-rows", type=int, default=12)
    ap.add_argument("--frames-only", action="store_true",
                    help="only the cost of finishing frames (PIL path vs device uint8), at full size, on this machine")
    args = ap.parse_args()
    if args.frames_only:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        print(json.dumps(frames_finish(device), indent=2))
        return
    if args.quick:
        args.modes, args.compile_modes, args.e2e_rows = "full", "default", min(args.e2e_rows, 4)
    if args.tiny:
        from svd_batch.tiny import build_tiny_pipeline

        device, dtype = torch.device("cpu"), torch.float32
        args.height, args.width, args.frames, args.steps = 64, 64, 8, 2
        pipe = build_tiny_pipeline().to(device)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu.py needs a CUDA GPU (or --tiny for the CPU dry check)")
        device, dtype = torch.device("cuda"), torch.float16
        args.height, args.width, args.frames, args.steps = 576, 1024, 25, 25
        pipe = build_xt(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    image = Image.open(os.path.join(REPO, "svd_batch/data/sample/rocket.jpg")).convert("RGB")
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": [args.height, args.width], "frames": args.frames,
              "steps": args.steps, "dtype": str(dtype), "tf32": torch.backends.cuda.matmul.allow_tf32,
              "modes": {}}
    unet_flops, decode_flops, unet_inputs = count_flops(pipe, args, device, dtype)
    flops = {"unet_step_cfg_batch2": unet_flops, "vae_decode": decode_flops,
             "video_total": unet_flops * args.steps + decode_flops}
    report["flops"] = flops

    def show(name, value):
        report["modes"][name] = value
        print(json.dumps({name: value}), flush=True)

    for mode in filter(None, args.modes.split(",")):
        show(f"{mode} eager", bench_memory_mode(pipe, mode, args, device, image, flops))
    for cmode in filter(None, args.compile_modes.split(",")):
        show(f"full compiled {cmode}", bench_compiled(pipe, cmode, args, device, image, flops))
    report["attention"] = bench_attention(pipe, args, device, unet_inputs, flops)
    if not args.tiny:
        report["frames_finish"] = frames_finish(device)
    print(json.dumps({"attention": report["attention"]}), flush=True)
    if args.e2e_rows:
        report["e2e_svd_batch"] = e2e(pipe, args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
