"""MP4 writer throughput per core at SVD-XT's size (576x1024, 25 frames), as the write stage runs it (CPU).

    .venv/bin/python scripts/bench_encode.py [--videos 2] [--encoders 1 2] [--content smooth noise] [--no-score]

Each video goes through svd_batch.video.write_mp4 with the run's defaults (libx264, crf 18, preset medium,
yuv420p, faststart, one x264 thread, the recipe in the comment tag); "+ decode, pixel scores" is what the
writer does with scores on: the same ffmpeg also decodes what it wrote (write_mp4(decode=True)), then the pixel
scores (the CLIP embedding of image_similarity runs on the GPU in a GPU run, and is not timed here). ``--encoders k`` runs k
writers at once on threads, as ``runtime.writers=k`` does, each with its own stream of videos.
  smooth  a slow pan and zoom over a sample photo (svd_batch/data/sample/astronaut.jpg): what a real
          SVD-XT video looks like to x264
  noise   uniform random pixels in every frame: what random-weight models give, x264's worst case
Reported: seconds per video for one writer, videos per second for k writers, and the CPU seconds one video
costs (user + system of the ffmpeg processes and of the scores): its inverse is videos per second per core,
the figure that does not depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from svd_batch.scores import score_video  # noqa: E402
from svd_batch.video import recipe_comment, write_mp4  # noqa: E402

H, W, F, FPS = 576, 1024, 25, 7


def smooth(seed: int) -> np.ndarray:
    """A camera pan and slow zoom over a photo: 25 frames of 576x1024."""
    from PIL import Image

    img = Image.open(os.path.join(REPO, "svd_batch", "data", "sample", "astronaut.jpg")).convert("RGB")
    scale = 1.35 * max(W / img.width, H / img.height)
    big = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    dx, dy = rng.uniform(-3, 3, 2)
    frames = []
    for i in range(F):
        zoom = 1.0 - 0.006 * i  # the window shrinks: a zoom in
        w, h = W * 1.2 * zoom, H * 1.2 * zoom
        cx, cy = big.width / 2 + dx * i, big.height / 2 + dy * i
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        frames.append(np.asarray(big.resize((W, H), Image.BICUBIC, box=box)))
    return np.stack(frames)


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (F, H, W, 3), dtype=np.uint8)


def write_one(frames: np.ndarray, path: str, score: bool) -> float:
    t = time.perf_counter()
    back = write_mp4(frames, path, FPS, comment=recipe_comment({"id": os.path.basename(path), "seed": 0}),
                     decode=score)
    if score:
        score_video(back)
    return time.perf_counter() - t


def cpu_seconds() -> float:
    """User + system seconds of this process and of the ffmpeg processes it has waited for."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run(videos: list[np.ndarray], encoders: int, score: bool, folder: str) -> tuple[float, float, float]:
    """(wall seconds for all videos with ``encoders`` writers at once, median seconds per video, CPU seconds
    per video: what one core spends on one, whatever else the machine is doing)."""
    paths = [os.path.join(folder, f"v{i}.mp4") for i in range(len(videos))]
    cpu, t = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(encoders) as pool:
        each = list(pool.map(lambda a: write_one(*a, score), zip(videos, paths)))
    wall, cpu = time.perf_counter() - t, cpu_seconds() - cpu
    for p in paths:
        os.unlink(p)
    return wall, statistics.median(each), cpu / len(videos)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=2, help="videos per writer at each setting")
    ap.add_argument("--encoders", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--content", nargs="+", default=["smooth", "noise"], choices=["smooth", "noise"])
    ap.add_argument("--no-score", action="store_true", help="the encode alone, without decode and pixel scores")
    args = ap.parse_args()
    makers = {"smooth": smooth, "noise": noise}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{W}x{H}, {F} frames, libx264 crf 18 preset medium, one x264 thread per writer; {cores} cores; "
          f"{args.videos} videos per writer; medians")
    modes = [False] if args.no_score else [False, True]
    print("| content | what | writers | s per video (one writer's) | videos/s | videos/s per writer | CPU s per video "
          "| videos/s per core | MiB per video |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        for content in args.content:
            pool = [makers[content](i) for i in range(args.videos * max(args.encoders))]
            probe = os.path.join(folder, "probe.mp4")
            write_mp4(pool[0], probe, FPS)  # warm the page cache with ffmpeg; the file's size for the table
            mib = os.path.getsize(probe) / 2**20
            os.unlink(probe)
            for score in modes:
                for k in args.encoders:
                    wall, each, cpu = run(pool[: args.videos * k], k, score, folder)
                    rate = args.videos * k / wall
                    what = "encode + decode, pixel scores" if score else "encode"
                    print(f"| {content} | {what} | {k} | {each:.2f} | {rate:.3f} | {rate / k:.3f} | {cpu:.2f} "
                          f"| {1 / cpu:.3f} | {mib:.2f} |", flush=True)


if __name__ == "__main__":
    main()
