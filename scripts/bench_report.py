"""The report at scale: time, peak memory and bytes written by `svd-batch-report` over N synthetic records.

    python scripts/bench_report.py --rows 1000000 [--repeats 1]

Synthetic results.parquet (no model, no videos): 2% failed rows, 8 ranks on 2 hosts, random seconds and
scores, conditioning values constant per run as in a typical one (plus one varied column, seed). The
report runs in a fresh process (`python -m svd_batch.commands.report`) so its peak RSS is its own; targets: <= 120 s,
<= 2 GiB peak RSS, <= 1 GiB written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def synthetic_results(n: int, seed: int = 0, image_dir: str = "/data/images") -> pa.Table:
    from svd_batch.fields import RESULT_SCHEMA

    rng = np.random.default_rng(seed)
    ids = [f"clip-{i:07d}" for i in range(n)]
    failed = rng.random(n) < 0.02
    ranks = rng.integers(0, 8, n)
    secs = rng.gamma(8.0, 0.5, n) + 20.0
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    # Each rank works through its rows one after another.
    finished = np.zeros(n)
    for r in range(8):
        m = ranks == r
        finished[m] = np.cumsum(secs[m])
    start_us = int(t0.timestamp() * 1e6)
    fin_us = start_us + (finished * 1e6).astype(np.int64)
    st_us = fin_us - (secs * 1e6).astype(np.int64)
    cols = {
        "id": pa.array(ids),
        "status": pa.array(np.where(failed, "failed", "ok")),
        "error": pa.array([f"row {i}: image 'x.jpg': file not found" if f else None for i, f in zip(ids, failed)]),
        "video_path": pa.array([None if f else f"videos/{i}.mp4" for i, f in zip(ids, failed)]),
        "image": pa.array([f"{image_dir}/{i}.jpg" for i in ids]),
        "row": pa.array(np.arange(n)),
        "seed": pa.array(rng.integers(0, 2**62, n)),
        "fps": pa.array(np.full(n, 7)), "motion_bucket_id": pa.array(np.full(n, 127)),
        "noise_aug_strength": pa.array(np.full(n, 0.02)), "num_frames": pa.array(np.full(n, 25)),
        "num_inference_steps": pa.array(np.full(n, 25)), "height": pa.array(np.full(n, 576)),
        "width": pa.array(np.full(n, 1024)), "min_guidance_scale": pa.array(np.full(n, 1.0)),
        "max_guidance_scale": pa.array(np.full(n, 3.0)), "decode_chunk_size": pa.array(np.full(n, 8)),
        "total_seconds": pa.array(np.where(failed, 0.01, secs)),
        "generate_seconds": pa.array(secs * 0.95), "load_seconds": pa.array(np.full(n, 0.05)),
        "write_seconds": pa.array(np.full(n, 0.5)),
        "peak_vram_bytes": pa.array(np.full(n, 30 * 2**30)),
        "model": pa.array(["svd_xt"] * n), "device": pa.array([f"cuda:{r % 4}" for r in ranks]),
        "rank": pa.array(ranks.astype(np.int32)), "world_size": pa.array(np.full(n, 8, dtype=np.int32)),
        "host": pa.array([f"node{r // 4}" for r in ranks]),
        "started_at": pa.array(st_us, pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array(fin_us, pa.timestamp("us", tz="UTC")),
        "motion_score": pa.array(np.where(failed, np.nan, rng.gamma(2.0, 0.02, n))).cast(pa.float64()),
        "image_similarity": pa.array(np.where(failed, np.nan, 1 - rng.gamma(2.0, 0.05, n))),
        "flicker_score": pa.array(np.where(failed, np.nan, rng.gamma(2.0, 0.005, n))),
    }
    table = pa.table({f.name: (cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type))
                      for f in RESULT_SCHEMA})
    for c in ("motion_score", "image_similarity", "flicker_score"):  # failed rows have no scores
        i = table.schema.get_field_index(c)
        table = table.set_column(i, c, pa.array(np.where(failed, None, table[c].to_numpy()), pa.float64()))
    return table


def make_run(root: str, n: int) -> None:
    os.makedirs(os.path.join(root, ".svd-batch"), exist_ok=True)
    pq.write_table(synthetic_results(n), os.path.join(root, "results.parquet"))


def written_bytes(root: str) -> int:
    total = 0
    for rel in ("index.html", "contact_sheet.png"):
        if os.path.exists(os.path.join(root, rel)):
            total += os.path.getsize(os.path.join(root, rel))
    for dirpath, _, files in os.walk(os.path.join(root, "report")):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dir", default=None, help="where the synthetic run goes (default: a temporary folder)")
    ap.add_argument("--sheet", default=None, help="a contact_sheet.png of a real run: time its PNG encoding at "
                    "zlib level 6 (PIL's default, before) and 1 (now)")
    args = ap.parse_args()
    if args.sheet:
        import io

        from PIL import Image

        img = Image.open(args.sheet).convert("RGB")
        img.load()
        for level in (6, 1):
            ts, size = [], 0
            for _ in range(5):
                buf = io.BytesIO()
                t = time.perf_counter()
                img.save(buf, format="PNG", compress_level=level)
                ts.append(time.perf_counter() - t)
                size = buf.tell()
            print(f"contact sheet {img.size[0]}x{img.size[1]} PNG level {level}: median {sorted(ts)[2]:.3f} s, {size / 2**20:.2f} MiB")
        return
    root = args.dir or tempfile.mkdtemp(prefix="bench-report-")
    t = time.perf_counter()
    make_run(root, args.rows)
    print(f"synthetic results.parquet: {args.rows} rows in {time.perf_counter() - t:.1f} s ({root})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    for rep in range(args.repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.report", root], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        assert proc.returncode == 0, proc.stderr
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over children so far
        note = "" if peak > before else " (peak not above an earlier repeat's)"
        print(f"repeat {rep + 1}: {wall:.1f} s, peak RSS {peak / 2**20:.2f} GiB{note}, "
              f"written {written_bytes(root) / 2**20:.1f} MiB, {len(os.listdir(os.path.join(root, 'report')))} data files")


if __name__ == "__main__":
    main()
