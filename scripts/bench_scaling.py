"""Scaling efficiency of sharding on a heterogeneous manifest (tiny model, CPU).

    .venv/bin/python scripts/bench_scaling.py [--rows 24] [--repeats 3]

The manifest's first half is 14-frame rows, its second half 25-frame rows. It runs one process, then two
processes (`accelerate launch --multi_gpu --num_processes 2`, one torch thread each, like the single
process) with the cost-balanced split and with a contiguous split of equal row counts, and reports
scaling efficiency T1 / (2 x T2). T is the generation span (first row start to last row end, from
results.parquet), so process start-up, identical for every variant, does not blur the comparison; the
whole-process wall time is reported too. Medians of --repeats runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "svd_batch", "data", "sample")
# overlap off: each process then uses one core (torch, then ffmpeg, in turn), so one process is not helped by
# the idle second core and the comparison measures the split, not how a 2-core machine shares its cores.
COMMON = ["model=tiny", "generation.height=64", "generation.width=64", "generation.num_inference_steps=6",
          "runtime.threads=1", "runtime.progress=false", "runtime.overlap=false", "report.enabled=false"]


def run(world: int, manifest: str, out: str, strategy: str) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    args = ["-m", "svd_batch", *COMMON, f"manifest.path={manifest}", f"output.dir={out}",
            f"runtime.shard_strategy={strategy}"]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
               "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stdout + proc.stderr)
    res = pq.read_table(os.path.join(out, "results.parquet"))
    span = (pc.max(res["finished_at"]).as_py() - pc.min(res["started_at"]).as_py()).total_seconds()
    # Balance: how evenly the ranks' own busy times (sum of their rows' seconds) came out, mean / max.
    busy = [sum(res.filter(pc.equal(res["rank"], r))["total_seconds"].to_pylist()) for r in range(world)]
    return span, wall, (sum(busy) / len(busy)) / max(busy)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        n = args.rows
        manifest = os.path.join(root, "m.parquet")
        pq.write_table(pa.table({
            "id": [f"r{i:03d}" for i in range(n)],
            "image": [os.path.join(SAMPLE, ["rocket.jpg", "cat.jpg", "coffee.jpg", "astronaut.jpg"][i % 4]) for i in range(n)],
            "num_frames": [14 if i < n // 2 else 25 for i in range(n)],
            "seed": list(range(n)),
        }), manifest)
        out = os.path.join(root, "out")
        results: dict[str, list[tuple[float, float, float]]] = {"1 process": [], "2 processes, cost-balanced": [],
                                                         "2 processes, contiguous": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
            results["1 process"].append(run(1, manifest, out, "cost"))
            results["2 processes, cost-balanced"].append(run(2, manifest, out, "cost"))
            results["2 processes, contiguous"].append(run(2, manifest, out, "contiguous"))
        med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}
        t1 = med["1 process"][0]
        print(f"{n} rows (half 14-frame, half 25-frame), 64x64, 6 steps, tiny model, 1 torch thread per process, "
              f"median of {args.repeats}")
        for k, (span, wall, balance) in med.items():
            eff = "" if k == "1 process" else (f"  efficiency T1/(2 x T2) = {t1 / (2 * span):.3f}  "
                                               f"rank balance (mean/max busy) = {balance:.3f}")
            print(f"  {k:28s} generation span {span:6.2f} s  process wall {wall:6.2f} s{eff}")


if __name__ == "__main__":
    main()
