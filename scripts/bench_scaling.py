"""Scaling of two processes over one (tiny model, CPU): claimed units against a static deal, with equal ranks
and with one rank at half speed.

    .venv/bin/python scripts/bench_scaling.py [--rows 24] [--repeats 3] [--slow-only]

Part 1, equal ranks: the manifest's first half is 14-frame rows, its second half 25-frame rows. One process,
then two (`accelerate launch --multi_gpu --num_processes 2`, one torch thread each) with claims (the default)
and with the static cost-balanced deal; efficiency T1 / (2 x T2).
Part 2, one slow rank: 14-frame rows; rank 1 idles as long as it computed after each unit
(SVD_BATCH_INJECT_SLOW=1:1, i.e. half speed, like an older GPU). Utilization = rows / (span x sum of each
rank's own rate), a rank's own rate being its rows over its own active span; 1.0 means no rank ever idled.
T is the generation span (first row start to last row end, from results.parquet), so process start-up does
not blur the comparison; the whole-process wall time is reported too. Medians of --repeats runs, interleaved.
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


def run(world: int, manifest: str, out: str, schedule: str, slow: str = "") -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    args = ["-m", "svd_batch", *COMMON, f"manifest.path={manifest}", f"output.dir={out}",
            f"runtime.schedule={schedule}"]
    if world == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
               "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "SVD_BATCH_INJECT_SLOW": slow})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(proc.stdout + proc.stderr)
    res = pq.read_table(os.path.join(out, "results.parquet"))
    start, end = pc.min(res["started_at"]).as_py(), pc.max(res["finished_at"]).as_py()
    span = (end - start).total_seconds()
    rows, rate = [], 0.0
    for r in range(world):
        mine = res.filter(pc.equal(res["rank"], r))
        rows.append(mine.num_rows)
        if mine.num_rows:
            own = (pc.max(mine["finished_at"]).as_py() - pc.min(mine["started_at"]).as_py()).total_seconds()
            rate += mine.num_rows / own
    return {"span": span, "wall": wall, "utilization": res.num_rows / (span * rate), "rows_rank0": rows[0],
            "rows_rank1": rows[-1]}


def manifest_file(root: str, n: int, mixed: bool) -> str:
    path = os.path.join(root, f"m-{n}-{int(mixed)}.parquet")
    pq.write_table(pa.table({
        "id": [f"r{i:03d}" for i in range(n)],
        "image": [os.path.join(SAMPLE, ["rocket.jpg", "cat.jpg", "coffee.jpg", "astronaut.jpg"][i % 4])
                  for i in range(n)],
        "num_frames": [14 if (i < n // 2 or not mixed) else 25 for i in range(n)],
        "seed": list(range(n)),
    }), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow-only", action="store_true", help="only part 2 (one slow rank)")
    ap.add_argument("--no-scores", action="store_true",
                    help="report.scores=false: time generation and writing alone (the scores decode each MP4 back)")
    args = ap.parse_args()
    if args.no_scores:
        COMMON.append("report.scores=false")
    n = args.rows
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "out")
        variants = {} if args.slow_only else {
            "1 process": (1, manifest_file(root, n, True), "claim", ""),
            "2 processes, claims": (2, manifest_file(root, n, True), "claim", ""),
            "2 processes, static": (2, manifest_file(root, n, True), "static", ""),
        }
        variants.update({
            "rank 1 at half speed, static": (2, manifest_file(root, n, False), "static", "1:1"),
            "rank 1 at half speed, claims": (2, manifest_file(root, n, False), "claim", "1:1"),
        })
        results: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
            for name, (world, manifest, schedule, slow) in variants.items():
                results[name].append(run(world, manifest, out, schedule, slow))
        med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
        print(f"{n} rows, 64x64, 6 steps, tiny model, 1 torch thread per process, median of {args.repeats}")
        t1 = med.get("1 process", {}).get("span")
        for k, m in med.items():
            eff = f"  efficiency T1/(2 x T2) = {t1 / (2 * m['span']):.3f}" if t1 and k.startswith("2 ") else ""
            print(f"  {k:30s} span {m['span']:6.2f} s  wall {m['wall']:6.2f} s  utilization {m['utilization']:.3f}"
                  f"  rows rank 0/1 {m['rows_rank0']:.0f}/{m['rows_rank1']:.0f}{eff}")


if __name__ == "__main__":
    main()
