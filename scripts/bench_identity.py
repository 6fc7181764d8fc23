"""What knowing a model by its weights' bytes costs at a start (svd_batch/identity.py).

    python scripts/bench_identity.py [--gib 1.5] [--repeats 3] [--dir /tmp]

A copy of the tiny checkpoint with one extra weight file of ``--gib`` GiB (random bytes: a large checkpoint's
weights as far as hashing goes; the pipeline never loads it). Whole `svd-batch` processes on a one-row
manifest, each into a fresh output folder, side by side in each repeat:

- first start: no hash cache (``file-hashes.json`` deleted), so the start reads every weight file once;
- second start: the cache as the first left it, so no weight bytes are read.

Time to the first row = the row's ``started_at`` (results.parquet) minus the moment the process was spawned.
Then, in this process: ``model_facts`` (every weight file's sha256) without and with the cache, and
``model_identity`` (names, configs and sizes: all a start did before). The file sits in the page cache in every
variant; on a cold disk or a network filesystem the first start costs more and the second the same.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start(ckpt: Path, manifest: Path, out: Path, env: dict) -> tuple[float, float]:
    import pyarrow.parquet as pq

    args = [sys.executable, "-m", "svd_batch", "model=tiny", f"model.path={ckpt}", f"manifest.path={manifest}",
            f"output.dir={out}", "generation.height=64", "generation.width=64", "generation.num_frames=8",
            "generation.num_inference_steps=4", "runtime.progress=false", "report.enabled=false"]
    spawned = time.time()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - spawned
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    first = pq.read_table(out / "results.parquet")["started_at"][0].as_py().timestamp()
    return first - spawned, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the checkpoint copy goes (default: the system temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-identity-", dir=args.dir))
    cache = work / "cache"
    env = {**os.environ, "SVD_BATCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    os.environ["SVD_BATCH_CACHE"] = str(cache)
    try:
        from svd_batch import identity
        from svd_batch.tiny import ensure_tiny_model

        ckpt = work / "ckpt"
        shutil.copytree(ensure_tiny_model(), ckpt)
        pad = ckpt / "extra" / "padding.bin"
        pad.parent.mkdir()
        chunk = os.urandom(64 << 20)
        with open(pad, "wb") as f:
            for _ in range(int(args.gib * 16)):
                f.write(chunk)
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        print(f"checkpoint: {size / 2**30:.2f} GiB in {sum(1 for p in ckpt.rglob('*') if p.is_file())} files")

        import pyarrow as pa
        import pyarrow.parquet as pq

        manifest = work / "m.parquet"
        pq.write_table(pa.table({"id": ["r"], "image": [str(REPO / "svd_batch/data/sample/cat.jpg")]}), manifest)
        hashes = Path(identity.hash_cache_path())
        runs: dict[str, list[tuple[float, float]]] = {"first start (no hash cache)": [], "second start (hash cache)": []}
        for i in range(args.repeats):
            hashes.unlink(missing_ok=True)
            runs["first start (no hash cache)"].append(start(ckpt, manifest, work / f"out-a{i}", env))
            runs["second start (hash cache)"].append(start(ckpt, manifest, work / f"out-b{i}", env))
        print("| variant | time to first row (median) | runs | process wall (median) |")
        print("| --- | --- | --- | --- |")
        for name, ts in runs.items():
            first = [t for t, _ in ts]
            print(f"| {name} | {statistics.median(first):.2f} s | {', '.join(f'{t:.2f}' for t in first)} | "
                  f"{statistics.median(w for _, w in ts):.2f} s |")

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        cold, warm, sizes = [], [], []
        for _ in range(args.repeats):
            hashes.unlink(missing_ok=True)
            cold.append(timed(lambda: identity.model_facts(str(ckpt))))
            warm.append(timed(lambda: identity.model_facts(str(ckpt))))
            sizes.append(timed(lambda: identity.model_identity(str(ckpt))))
        print(f"in-process: model_facts without cache {statistics.median(cold):.3f} s "
              f"({size / 2**20 / statistics.median(cold):.0f} MiB/s), with cache {1000 * statistics.median(warm):.1f} ms, "
              f"model_identity (sizes only) {1000 * statistics.median(sizes):.1f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
