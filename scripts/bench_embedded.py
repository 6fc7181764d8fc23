"""Peak memory with embedded images at scale: 100,000 rows of ~50 KB images inside the manifest.

    .venv/bin/python scripts/bench_embedded.py [--rows 100000] [--kb 50] [--real-rows 8] [--keep DIR]

Writes a shard laid out as Hugging Face `datasets` writes it (image: struct<bytes, path>, huggingface schema
metadata, row groups of 1,000 rows; about 5 GB at the defaults), then measures, each as a separate process
(max RSS from wait4):

1. `svd-batch dry_run=true` on it (manifest read + validation + plan), beside the same run on a manifest of
   100,000 path strings: the embedded bytes should add nothing;
2. a short real run (`manifest.limit=--real-rows`, tiny model, 64x64, 8 frames, 4 steps), beside the same
   rows given as image files (the recorded image_sha256 must agree);
3. the cell reader alone over every row in order (how rows of equal cost run), then over 500 rows in
   random order (the worst case): memory stays a few windows whatever the order; the in-order pass also
   gives the cost of hashing every image at each start (the check svd-batch does not do: README, "Resuming").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model=tiny", "generation.height=64", "generation.width=64", "generation.num_frames=8",
        "generation.num_inference_steps=4", "runtime.progress=false", "runtime.threads=2"]


def jpegs(kb: int, n: int = 16) -> list[bytes]:
    """Noise JPEGs of about ``kb`` KB (noise does not compress, so the size is what it says)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    side = int((kb * 1024 / 0.6) ** 0.5)  # ~0.6 bytes per noise pixel at quality 75
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=75)
        out.append(buf.getvalue())
    return out


def build(root: str, rows: int, kb: int) -> tuple[str, str]:
    base = jpegs(kb)
    meta = {"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"},
                                                              "label": {"dtype": "int64", "_type": "Value"}}}})}
    shard = os.path.join(root, "train-00000-of-00001.parquet")
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("label", pa.int64())], metadata=meta)
    with pq.ParquetWriter(shard, schema, compression="none") as w:
        for start in range(0, rows, 1000):
            n = min(1000, rows - start)
            # A per-row trailer after the JPEG's end marker: every cell differs (as real images do), and
            # decoders ignore it.
            blobs = [base[i % len(base)] + i.to_bytes(8, "big") for i in range(start, start + n)]
            paths = [f"img{i:07d}.jpg" for i in range(start, start + n)]
            image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(paths)], ["bytes", "path"])
            w.write_table(pa.table({"image": image, "label": pa.array(np.arange(start, start + n) % 10)},
                                   schema=schema), row_group_size=1000)
    strings = os.path.join(root, "strings.parquet")
    pq.write_table(pa.table({"image": [f"images/img{i:07d}.jpg" for i in range(rows)],
                             "label": np.arange(rows) % 10}), strings)
    return shard, strings


def measure(args: list[str], env: dict | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, max RSS bytes, exit code, output tail) of one child process."""
    t = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, proc.returncode, out[-1500:]


READER = """
import sys, time, resource, hashlib, numpy as np
from svd_batch.embedded import CellReader
shard, rows, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = CellReader()
order = range(rows) if mode == "order" else np.random.default_rng(1).permutation(rows)[:500]
t = time.perf_counter(); total = 0; peak_cache = 0
for i in order:
    b = r.read(shard, int(i), "image.bytes")
    total += len(b); hashlib.sha256(b).digest(); peak_cache = max(peak_cache, r._cached)
s = time.perf_counter() - t
print(f"RESULT {len(order)} {total} {s:.2f} {r.windows_read} {r.restarts} {peak_cache}")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--kb", type=int, default=50)
    ap.add_argument("--real-rows", type=int, default=8)
    ap.add_argument("--skip-reader", action="store_true", help="skip the cell reader passes (3.)")
    ap.add_argument("--keep", default=None, help="build (or reuse) the shard here instead of a temporary folder")
    args = ap.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="bench-embedded-")
    os.makedirs(root, exist_ok=True)
    try:
        shard = os.path.join(root, "train-00000-of-00001.parquet")
        strings = os.path.join(root, "strings.parquet")
        t = time.perf_counter()
        if not (os.path.exists(shard) and os.path.exists(strings)):
            shard, strings = build(root, args.rows, args.kb)
        size = os.path.getsize(shard)
        print(f"shard: {args.rows} rows, {size / 2**30:.2f} GiB, mean cell "
              f"{size / args.rows / 1024:.1f} KiB (built in {time.perf_counter() - t:.0f} s)")
        py = sys.executable
        for label, path in (("dry run, embedded", shard), ("dry run, path strings", strings)):
            wall, rss, rc, out = measure([py, "-m", "svd_batch", *TINY, f"manifest.path={path}", "dry_run=true",
                                          f"output.dir={os.path.join(root, 'out-dry')}"])
            assert rc == 0, f"exit {rc}: {out}"
            print(f"{label}: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB")
        # The same first rows as image files beside a manifest of paths: the baseline for the real run.
        files_dir = os.path.join(root, "files")
        os.makedirs(files_dir, exist_ok=True)
        first = pq.ParquetFile(shard).read_row_group(0).slice(0, args.real_rows).column("image").to_pylist()
        for i, cell in enumerate(first):
            with open(os.path.join(files_dir, cell["path"]), "wb") as f:
                f.write(cell["bytes"])
        pq.write_table(pa.table({"image": [c["path"] for c in first]}), os.path.join(files_dir, "files.parquet"))
        hashes = {}
        for label, path in (("embedded", shard), ("image files", os.path.join(files_dir, "files.parquet"))):
            out_dir = os.path.join(root, "out-real")
            shutil.rmtree(out_dir, ignore_errors=True)
            wall, rss, rc, out = measure([py, "-m", "svd_batch", *TINY, f"manifest.path={path}",
                                          f"manifest.limit={args.real_rows}", f"output.dir={out_dir}",
                                          "generation.seed=5"])
            assert rc == 0, f"exit {rc}: {out}"
            res = pq.read_table(os.path.join(out_dir, "results.parquet")).sort_by("row")
            assert set(res["status"].to_pylist()) == {"ok"}
            hashes[label] = res["image_sha256"].to_pylist()
            print(f"real run, {args.real_rows} rows, {label} (tiny model): {wall:.1f} s, peak RSS "
                  f"{rss / 2**20:.0f} MiB, mean load_seconds {1000 * pc.mean(res['load_seconds']).as_py():.1f} ms")
        assert hashes["embedded"] == hashes["image files"]
        if args.skip_reader:
            return
        for mode in ("order", "random"):
            wall, rss, rc, out = measure([py, "-c", READER, shard, str(args.rows), mode])
            assert rc == 0, f"exit {rc}: {out}"
            n, total, secs, windows, restarts, cache = out.split("RESULT ")[1].split()[:6]
            what = "every row in order" if mode == "order" else "500 rows in random order"
            print(f"cell reader, {what}: {n} cells, {int(total) / 2**30:.2f} GiB read and sha256-hashed in "
                  f"{float(secs):.1f} s, {windows} windows read ({restarts} re-reads of a row group), largest "
                  f"cache {int(cache) / 2**20:.0f} MiB, peak RSS {rss / 2**20:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
