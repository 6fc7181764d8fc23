"""svd-batch against the diffusers guide's snippet as a plain loop, on the same tiny-model rows (CPU).

    .venv/bin/pip install imageio && .venv/bin/python scripts/bench_cpu.py [--rows 12] [--repeats 3]

Each variant is a whole process (imports, model load, every row, every MP4), run --repeats times,
interleaved so machine drift hits all alike; medians are reported, and ratios against the plain loop.
  guide loop      load_image -> resize -> pipe(...) -> export_to_video, one row after the other
  svd-batch       default: batch_size=1, overlap auto (off on CPU); plus hashing, results, resume
                  bookkeeping, gallery and contact sheet
  svd-batch b4    runtime.batch_size=4
  svd-batch ovl   runtime.overlap=true
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "svd_batch", "data", "sample")
H, W, F, STEPS = 96, 128, 14, 6

GUIDE_LOOP = textwrap.dedent("""
    import os, sys, pyarrow.parquet as pq, torch
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import load_image, export_to_video
    from svd_batch.tiny import ensure_tiny_model
    manifest, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ensure_tiny_model()))
    pipe.set_progress_bar_config(disable=True)
    for row in pq.read_table(manifest).to_pylist():
        image = load_image(row["image"])
        image = image.resize(({W}, {H}))
        frames = pipe(image, height={H}, width={W}, num_frames={F}, num_inference_steps={STEPS},
                      decode_chunk_size=8, generator=torch.manual_seed(row["seed"]), fps=row["fps"],
                      motion_bucket_id=row["motion_bucket_id"], noise_aug_strength=0.02).frames[0]
        export_to_video(frames, os.path.join(out, row["id"] + ".mp4"), fps=row["fps"])
""").format(W=W, H=H, F=F, STEPS=STEPS)


def timed(cmd: list[str], out: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import imageio  # noqa: F401  (diffusers' export_to_video needs it)
    except ImportError:
        sys.exit("the guide loop uses diffusers.utils.export_to_video, which needs imageio: pip install imageio")
    with tempfile.TemporaryDirectory() as root:
        names = ["rocket.jpg", "cat.jpg", "coffee.jpg", "astronaut.jpg"]
        manifest = os.path.join(root, "m.parquet")
        pq.write_table(pa.table({
            "id": [f"r{i:03d}" for i in range(args.rows)],
            "image": [os.path.join(SAMPLE, names[i % 4]) for i in range(args.rows)],
            "seed": list(range(args.rows)), "fps": [6 + i % 4 for i in range(args.rows)],
            "motion_bucket_id": [(40 * i) % 256 for i in range(args.rows)],
        }), manifest)
        script = os.path.join(root, "guide.py")
        with open(script, "w") as f:
            f.write(GUIDE_LOOP)
        out = os.path.join(root, "out")
        common = [sys.executable, "-m", "svd_batch", "model=tiny", f"manifest.path={manifest}", f"output.dir={out}",
                  f"generation.height={H}", f"generation.width={W}", f"generation.num_frames={F}",
                  f"generation.num_inference_steps={STEPS}", "runtime.progress=false"]
        variants = {
            "guide loop": [sys.executable, script, manifest, out],
            "svd-batch": common,
            "svd-batch b4": common + ["runtime.batch_size=4"],
            "svd-batch ovl": common + ["runtime.overlap=true"],
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        timed(variants["svd-batch"], out)  # warm the tiny-model cache and the page cache first
        for _ in range(args.repeats):
            for name, cmd in variants.items():
                times[name].append(timed(cmd, out))
        base = statistics.median(times["guide loop"])
        print(f"{args.rows} rows, {W}x{H}, {F} frames, {STEPS} steps, tiny model, torch threads "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')}, {args.repeats} runs each, whole-process seconds")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:14s} median {med:6.2f} s  ({', '.join(f'{t:.2f}' for t in ts)})  "
                  f"{med / base:.3f} x guide loop")


if __name__ == "__main__":
    main()
