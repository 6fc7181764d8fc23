"""`svd-batch-verify <output.dir> --sample 5`: regenerate a sample of finished rows and compare hashes.

Uses the run's own saved configuration (model, dtype, memory mode, thread count, compile, attention backend)
and each row's recorded values (seed, conditioning, effective decode chunk, batch size). A row made in a batch
of n is made again in a batch of n (of copies of itself: a row's result depends on the batch's shapes, not on
the other rows' values). Frames are bit-identical only on the same device type (and, on CPU, the same thread
count). Exit code 0 when every sampled row matches, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf


def verify(root: str, sample: int = 5, seed: int = 0, ids: list[str] | None = None) -> tuple[int, int, list[str]]:
    import torch

    from . import cli  # noqa: F401  (resolvers for the saved config)
    from .generate import Generator
    from .images import load_image
    from .runner import compile_options, device_type, model_path, plain, read_manifest
    from .write import frames_sha256

    cfg = OmegaConf.load(os.path.join(root, "config.yaml"))
    results = pq.read_table(os.path.join(root, "results.parquet"))
    ok = results.filter(pc.equal(results["status"], "ok"))
    if ids:
        ok = ok.filter(pc.is_in(ok["id"], value_set=pa.array(ids)))
    rows = ok.to_pylist()
    if not ids and len(rows) > sample:
        pick = np.random.default_rng(seed).choice(len(rows), size=sample, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    uris = dict(zip(*(read_manifest(cfg).table[c].to_pylist() for c in ("id", "image_uri"))))
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    device = torch.device(device_type(cfg))
    gen = Generator.load(model_path(cfg), device=device, dtype_name=str(cfg.model.dtype), variant=cfg.model.variant,
                         memory=plain(cfg.memory), compile=compile_options(cfg), runtime=plain(cfg.runtime))
    lines, matches = [], 0
    for r in rows:
        note = ""
        if str(r["device"]).split(":")[0] != device.type:
            note = f" (made on {r['device']}, checked on {device.type}: hashes differ across device types)"
        n = int(r.get("batch_size") or 1)
        image = load_image(uris[r["id"]])
        outcome = gen.run([r] * n, [image] * n)[0]
        if outcome.error:
            note = f" ({outcome.error})"
        elif outcome.batch_size != n:
            note = f" (made in a batch of {n}, checked alone: the batch failed now)"
        got = frames_sha256(outcome.frames) if outcome.frames is not None else "-" * 64
        same = got == r["frames_sha256"]
        matches += same
        lines.append(f"{'match   ' if same else 'MISMATCH'} {r['id']}  recorded {r['frames_sha256'][:16]}  "
                     f"now {got[:16]}{note}")
    return matches, len(rows), lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--sample", type=int, default=5, help="how many finished rows to regenerate")
    ap.add_argument("--seed", type=int, default=0, help="which sample (the same seed picks the same rows)")
    ap.add_argument("--ids", default=None, help="comma-separated ids to check instead of a sample")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.output_dir, "results.parquet")):
        sys.exit(f"svd-batch-verify: {args.output_dir} has no results.parquet: run svd-batch there first")
    matches, n, lines = verify(args.output_dir, args.sample, args.seed, args.ids.split(",") if args.ids else None)
    print("\n".join(lines))
    print(f"svd-batch-verify: {matches} of {n} sampled rows match their recorded frames_sha256")
    sys.exit(0 if matches == n else 1)


if __name__ == "__main__":
    main()
