"""svd-batch against the diffusers guide's snippet as a plain loop, on the same tiny-model rows (CPU).

    .venv/bin/pip install imageio && .venv/bin/python scripts/bench_cpu.py [--rows 12] [--repeats 3]
        [--variants "guide loop" svd-batch] [--tree OTHER_CHECKOUT]

Each variant is a whole process (imports, model load, every row, every MP4), run --repeats times,
interleaved so machine drift hits all alike; medians are reported, and ratios against the plain loop.
  guide loop      load_image -> resize -> pipe(...) -> export_to_video, one row after the other
  svd-batch       default: batch_size=1, overlap auto (off on CPU); plus hashing, results, resume
                  bookkeeping, gallery and contact sheet
  svd-batch b4    runtime.batch_size=4
  svd-batch ovl   runtime.overlap=true
  svd-batch @tree svd-batch's defaults from another checkout (--tree: e.g. a git worktree of an earlier commit),
                  with this checkout's interpreter, for a before/after in one interleaved run
"""

from __future__ import annotations

import argparse
import os
import resource
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


def timed(cmd: list[str], out: str, cwd: str = REPO) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process and every process it waited for: ffmpeg included)."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", help="only these variants (names as printed)")
    ap.add_argument("--tree", help="also run svd-batch's defaults from this checkout")
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
        if args.variants:
            variants = {k: v for k, v in variants.items() if k in args.variants or k == "guide loop"}
        cwd = {k: REPO for k in variants}
        if args.tree:  # python -m svd_batch from that folder imports its svd_batch package first
            variants["svd-batch @tree"], cwd["svd-batch @tree"] = common, os.path.abspath(args.tree)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        timed(common, out)  # warm the tiny-model cache and the page cache first
        for _ in range(args.repeats):
            for name, cmd in variants.items():
                times[name].append(timed(cmd, out, cwd[name]))
        base = statistics.median(w for w, _ in times["guide loop"])
        cpu_base = statistics.median(c for _, c in times["guide loop"])
        print(f"{args.rows} rows, {W}x{H}, {F} frames, {STEPS} steps, tiny model, torch threads "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')}, {args.repeats} runs each, whole-process seconds "
              "(CPU: user + system of the process and its children, ffmpeg included; steadier on a loaded machine)")
        for name, ts in times.items():
            med, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
            print(f"  {name:15s} wall median {med:6.2f} s ({', '.join(f'{w:.2f}' for w, _ in ts)}) "
                  f"{med / base:.3f} x guide loop | CPU median {cpu:6.2f} s ({', '.join(f'{c:.2f}' for _, c in ts)}) "
                  f"{cpu / cpu_base:.3f} x")


if __name__ == "__main__":
    main()
