"""`svd-batch-verify <output.dir> --sample 5`: regenerate a sample of finished rows and compare hashes.

Uses the run's own saved configuration (model, dtype, memory mode, thread count, compile, attention backend)
and each row's recorded values (seed, conditioning, effective decode chunk, batch size). A row made in a batch
of n is made again in a batch of n (of copies of itself: a row's result depends on the batch's shapes, not on
the other rows' values). Frames are bit-identical only on the same device type (and, on CPU, the same thread
count). Exit code 0 when every sampled row matches, 1 otherwise.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .settings import RunSettings


def verify(root: str, sample: int = 5, seed: int = 0, ids: list[str] | None = None) -> tuple[int, int, list[str]]:
    import torch

    from .fields import Row
    from .generate import Generator
    from .images import load_image
    from .manifest import load_for
    from .model import device_type, model_path
    from .video import frames_sha256

    s = RunSettings.load(root)
    results = pq.read_table(os.path.join(root, "results.parquet"))
    ok = results.filter(pc.equal(results["status"], "ok"))
    if ids:
        ok = ok.filter(pc.is_in(ok["id"], value_set=pa.array(ids)))
    rows = ok.to_pylist()
    if not ids and len(rows) > sample:
        pick = np.random.default_rng(seed).choice(len(rows), size=sample, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    uris = dict(zip(*(load_for(s).table[c].to_pylist() for c in ("id", "image_uri"))))
    if s.runtime.threads:
        torch.set_num_threads(s.runtime.threads)
    device = torch.device(device_type(s.runtime))
    gen = Generator.load(model_path(s.model), device=device, model=s.model, memory=s.memory, runtime=s.runtime,
                         sampler=s.generation.sampler)
    lines, matches = [], 0
    for r in rows:
        note = ""
        if str(r["device"]).split(":")[0] != device.type:
            note = f" (made on {r['device']}, checked on {device.type}: hashes differ across device types)"
        n = int(r.get("batch_size") or 1)
        image = load_image(uris[r["id"]])
        outcome = gen.run([Row.from_mapping(r)] * n, [image] * n)[0]
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
