"""Planning + resume check at scale: a 1,000,000-row manifest with 900,000 rows already done.

    .venv/bin/python scripts/bench_bookkeeping.py [--rows 1000000] [--done 900000] [--repeats 3]

Builds the manifest (no seed column: the worst case, seeds are derived) and a run folder whose
records.parquet holds 900,000 finished rows plus a few part files, then times
`svd-batch dry_run=true` (plan + resume check, no model) as a whole process, and reports wall time and
peak memory (max RSS of the child). Target: < 3 s and < 1 GB on a 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from svd_batch.fields import RESULT_SCHEMA  # noqa: E402
from svd_batch.rundir import RunDir  # noqa: E402


def build(root: str, rows: int, done: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    ids = pa.array([f"img{i:07d}" for i in range(rows)])
    manifest = pa.table({
        "id": ids,
        "image": pa.array([f"images/{i % 1000:03d}/img{i:07d}.jpg" for i in range(rows)]),
        "motion_bucket_id": pa.array(rng.integers(0, 256, rows)),
        "num_frames": pa.array(np.where(np.arange(rows) < rows // 2, 14, 25)),
        "fps": pa.array(rng.integers(5, 12, rows)),
    })
    mpath = os.path.join(root, "manifest.parquet")
    pq.write_table(manifest, mpath)

    out = os.path.join(root, "out")
    rd = RunDir(out)
    rd.create()
    now = dt.datetime.now(dt.timezone.utc)
    n_parts = 3  # an interrupted run: most rows merged, the last ones still in per-rank part files
    in_parts = 3000
    cols = {f.name: pa.nulls(done, f.type) for f in RESULT_SCHEMA}
    cols["id"] = ids.slice(0, done)
    cols["status"] = pa.array(["ok"] * done)
    cols["frames_sha256"] = pa.array(["0" * 64] * done)
    cols["video_path"] = pa.array([f"videos/img{i:07d}.mp4" for i in range(done)])
    cols["finished_at"] = pa.array([now] * done, pa.timestamp("us", tz="UTC"))
    records = pa.table(cols, schema=RESULT_SCHEMA)
    pq.write_table(records.slice(0, done - in_parts), rd.records_path)
    per = in_parts // n_parts
    for p in range(n_parts):
        pq.write_table(records.slice(done - in_parts + p * per, per), os.path.join(rd.parts, f"rank{p:05d}-bench-00000.parquet"))
    return mpath, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--done", type=int, default=900_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--world-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        mpath, out = build(root, args.rows, args.done)
        print(f"built {args.rows} rows / {args.done} done in {time.perf_counter() - t:.1f} s")
        walls = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            # WORLD_SIZE as a launcher sets it: the plan is computed for 8 ranks.
            proc = subprocess.run([sys.executable, "-m", "svd_batch", f"manifest.path={mpath}", f"output.dir={out}",
                                   "dry_run=true"], capture_output=True, text=True,
                                  env={**os.environ, "WORLD_SIZE": str(args.world_size)})
            walls.append(time.perf_counter() - t)
            if proc.returncode != 0:
                sys.exit(proc.stderr)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(proc.stdout.strip())
        print(f"dry_run wall: median {statistics.median(walls):.2f} s (runs: {', '.join(f'{w:.2f}' for w in walls)}); "
              f"peak RSS {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
