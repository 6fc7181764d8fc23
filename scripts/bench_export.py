"""svd-batch-export at scale: a run folder of 50,000 finished rows packed into WebDataset or Parquet shards.

    .venv/bin/python scripts/bench_export.py [--rows 50000] [--video-kb 16] [--format webdataset] [--shard-size 1000]

Builds a run folder as svd-batch leaves it (spread layout; results.parquet with every column; one MP4-sized blob
of random bytes per row in videos/<ab>/ and a small JPEG-sized one in inputs/<ab>/: the export copies bytes, it
never decodes), then times `svd-batch-export` as a whole process, three ways: the full export, the same command
again (nothing new: the plan pass alone), and after 1% more rows finished (incremental). Reports samples per
second and peak memory (max RSS of the child). Memory should not grow with the rows: compare --rows 5000.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from svd_batch.fields import RESULT_SCHEMA  # noqa: E402
from svd_batch.rundir import RunDir, write_parquet_atomic  # noqa: E402


def build(root: str, start: int, rows: int, video_kb: int) -> None:
    """Rows start..start+rows-1 finished (appended to results.parquet when it exists)."""
    rd = RunDir(root)
    rd.create()
    rng = np.random.default_rng(start)
    ids = [f"img{i:07d}.seed=1" for i in range(start, start + rows)]  # dots: keys are encoded
    blob = rng.bytes(video_kb * 1024)
    for k, rid in enumerate(ids):
        path = rd.video_path(rid)
        with open(path, "wb") as f:
            f.write(k.to_bytes(8, "little") + blob)  # every video its own bytes
        ipath = rd.input_path(rid)
        os.makedirs(os.path.dirname(ipath), exist_ok=True)
        with open(ipath, "wb") as f:
            f.write(blob[:4096])
    now = dt.datetime.now(dt.timezone.utc)
    cols = {}
    for field in RESULT_SCHEMA:
        cols[field.name] = pa.nulls(rows, field.type)
    cols.update({
        "id": pa.array(ids), "status": pa.array(["ok"] * rows),
        "video_path": pa.array([os.path.relpath(rd.video_path(i), root) for i in ids]),
        "image": pa.array([f"images/{i}.jpg" for i in ids]), "row": pa.array(np.arange(start, start + rows)),
        "seed": pa.array(rng.integers(0, 2**62, rows)), "fps": pa.array(np.full(rows, 7)),
        "motion_bucket_id": pa.array(rng.integers(0, 256, rows)), "num_frames": pa.array(np.full(rows, 25)),
        "height": pa.array(np.full(rows, 576)), "width": pa.array(np.full(rows, 1024)),
        "frames_sha256": pa.array([f"{i:064x}" for i in range(start, start + rows)]),
        "model": pa.array(["svd_xt"] * rows), "started_at": pa.array([now] * rows, pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array([now] * rows, pa.timestamp("us", tz="UTC")),
        "motion_score": pa.array(rng.random(rows)),
    })
    table = pa.table({f.name: cols[f.name].cast(f.type) for f in RESULT_SCHEMA})
    if os.path.exists(rd.results_path):
        table = pa.concat_tables([pq.read_table(rd.results_path), table])
    write_parquet_atomic(table, rd.results_path)


# The export as a child process that reports its own peak RSS when it exits (RUSAGE_CHILDREN would give the
# largest of every child so far).
CHILD = ("import atexit, resource, runpy, sys\n"
         "atexit.register(lambda: print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', "
         "file=sys.stderr))\n"
         "sys.argv = ['svd-batch-export', *sys.argv[1:]]\n"
         "runpy.run_module('svd_batch.commands.export', run_name='__main__')\n")


def timed(args: list[str]) -> tuple[float, int, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"export failed ({proc.returncode}): {proc.stderr[-2000:]}")
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB=", 1)[1].split()[0]) * 1024
    return wall, peak, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--video-kb", type=int, default=16)
    ap.add_argument("--format", default="webdataset", choices=("webdataset", "parquet"))
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--keep", action="store_true", help="keep the folders (printed)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-export-")
    run, dest = os.path.join(work, "run"), os.path.join(work, "dest")
    try:
        t = time.perf_counter()
        build(run, 0, args.rows, args.video_kb)
        print(f"built {args.rows} rows ({args.video_kb} KiB videos) in {time.perf_counter() - t:.1f} s")
        cmd = [run, "--to", dest, "--format", args.format, "--shard-size", str(args.shard_size), "--no-progress"]
        for what in ("full export", "again, nothing new", "after 1% more rows"):
            if what.startswith("after"):
                build(run, args.rows, max(1, args.rows // 100), args.video_kb)
            wall, peak, line = timed(cmd)
            n = int(line.split(" samples,")[0].rsplit(" ", 1)[-1])
            print(f"{what}: {n} samples in {wall:.1f} s ({n / wall:.0f} samples/s), peak RSS {peak / 2**20:.0f} MiB")
            print(f"  {line}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
