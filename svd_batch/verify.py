"""`svd-batch-verify <output.dir> --sample 5`: regenerate a sample of finished rows and compare hashes.

Uses the run's own saved configuration (model, dtype, memory mode, thread count, compile, attention backend)
and each row's recorded values (seed, conditioning, effective decode chunk, batch size, and the image as the
run resolved it: ``image_uri``, so a run started elsewhere with a relative manifest.path verifies from any
directory). A row made in a batch of n is made again in a batch of n (of copies of itself: a row's result
depends on the batch's shapes, not on the other rows' values). Frames are bit-identical only on the same device
type (and, on CPU, the same thread count). Exit code 0 when every checked row matches, 1 when one does not (or
could not be made again), 2 when nothing could be checked as asked (a folder that is not a finished svd-batch
run, ids that are not in it or did not finish ok, a sample below 1): never a success for rows it did not check.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .settings import RunSettings

# What verify reads of each row (results.parquet of every svd-batch version that recorded frame hashes).
NEEDS = ("id", "status", "frames_sha256", "device", "seed")
LISTED = 10


class VerifyError(ValueError):
    """Nothing could be checked as asked: a usage error (exit 2), raised before the model is loaded."""


@dataclass
class Plan:
    settings: RunSettings
    rows: list[dict]


def _names(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:LISTED])
    return shown + (f" and {len(ids) - LISTED} more" if len(ids) > LISTED else "")


def plan(root: str, sample: int = 5, seed: int = 0, ids: list[str] | None = None, manifest: str | None = None) -> Plan:
    """The run's settings and the rows to regenerate, each with its ``image_uri``; VerifyError when there is
    nothing to check as asked (every problem found before any model is loaded)."""
    if sample < 1:
        raise VerifyError(f"--sample {sample}: give the number of rows to regenerate, 1 or more (or --ids).")
    results_path = os.path.join(root, "results.parquet")
    if not os.path.isfile(results_path):
        raise VerifyError(f"{root} has no results.parquet: point svd-batch-verify at the output.dir of a finished "
                          "svd-batch run (an interrupted one writes it when its command is run again).")
    try:
        s = RunSettings.load(root)
    except Exception as exc:  # noqa: BLE001 - a hand-edited or foreign config.yaml: one message for every way
        raise VerifyError(f"{root}/config.yaml cannot be read as svd-batch settings ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}).") from None
    if s is None:
        raise VerifyError(f"{root} has no config.yaml, so it is not a folder an svd-batch run wrote (the run saves "
                          "its settings there, and verify regenerates rows with them). Point svd-batch-verify at "
                          "the output.dir of an svd-batch run.")
    try:
        results = pq.read_table(results_path)
    except (pa.ArrowException, OSError) as exc:
        raise VerifyError(f"{results_path} cannot be read as Parquet ({type(exc).__name__}: {exc}).") from None
    missing = [c for c in NEEDS if c not in results.column_names]
    if missing:
        raise VerifyError(f"{results_path} lacks the column(s) {', '.join(missing)}, so it is not a results table "
                          "svd-batch wrote (or one from a version that did not record frame hashes): there is "
                          "nothing to compare against.")
    if ids is not None:
        wanted = list(dict.fromkeys(i.strip() for i in ids if i.strip()))
        if not wanted:
            raise VerifyError("--ids names no id: give comma-separated ids, e.g. --ids cat,rocket.")
        status = dict(zip(results["id"].to_pylist(), results["status"].to_pylist()))
        unknown = [i for i in wanted if i not in status]
        not_ok = [i for i in wanted if i in status and status[i] != "ok"]
        problems = []
        if unknown:
            problems.append(f"{_names(unknown)} {'is' if len(unknown) == 1 else 'are'} not in {results_path}")
        if not_ok:
            problems.append(f"{_names(not_ok)} did not finish ok (status {status[not_ok[0]]!r}"
                            + (", ..." if len(not_ok) > 1 else "") + "), so there are no frames to compare")
        if problems:
            raise VerifyError("--ids: " + "; ".join(problems) + ". Name ids of rows with status 'ok' (results.parquet), "
                              "or leave out --ids to check a sample of them.")
        ok = results.filter(pc.is_in(results["id"], value_set=pa.array(wanted, results["id"].type)))
    else:
        ok = results.filter(pc.equal(results["status"], "ok"))
        if ok.num_rows == 0:
            raise VerifyError(f"{results_path} has no row with status 'ok': there are no frames to compare.")
    rows = ok.to_pylist()
    if ids is None and len(rows) > sample:
        pick = np.random.default_rng(seed).choice(len(rows), size=sample, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    _fill_image_uris(s, rows, manifest)
    return Plan(s, rows)


def _fill_image_uris(s: RunSettings, rows: list[dict], manifest: str | None) -> None:
    """Rows recorded before image_uri was: their image as the manifest resolves it (``manifest`` for a run whose
    relative manifest.path was relative to another directory)."""
    need = [r for r in rows if not r.get("image_uri")]
    if not need:
        return
    import dataclasses

    from .manifest import ManifestError, load_for

    path = manifest or s.manifest.path
    if not manifest and not os.path.isabs(str(path)) and "://" not in str(path) and not os.path.exists(str(path)):
        raise VerifyError(
            f"results.parquet does not record where the image of row {need[0]['id']!r} was read from, and the run's "
            f"manifest.path {path!r} is relative to the directory the run was started in, which is not this one "
            f"({os.getcwd()}). Run svd-batch-verify from that directory, or pass --manifest <the manifest's path>.")
    try:
        m = load_for(dataclasses.replace(s, manifest=dataclasses.replace(s.manifest, path=str(path))))
    except ManifestError as exc:
        raise VerifyError(f"the run's manifest cannot be read to find its images: {exc}") from None
    uris = dict(zip(*(m.table[c].to_pylist() for c in ("id", "image_uri"))))
    for r in need:
        if r["id"] not in uris:
            raise VerifyError(f"row {r['id']!r} is not in the manifest {path} any more, so its image is unknown.")
        r["image_uri"] = uris[r["id"]]


def verify(root: str, sample: int = 5, seed: int = 0, ids: list[str] | None = None,
           manifest: str | None = None) -> tuple[int, int, list[str]]:
    p = plan(root, sample, seed, ids, manifest)  # every usage error before torch and the model load
    import torch

    from .fields import Row
    from .generate import Generator
    from .images import ImageError, load_image
    from .model import device_type, model_path, unet_weights_path
    from .video import frames_sha256

    s = p.settings
    if s.runtime.threads:
        torch.set_num_threads(s.runtime.threads)
    device = torch.device(device_type(s.runtime))
    gen = Generator.load(model_path(s.model), device=device, model=s.model, memory=s.memory, runtime=s.runtime,
                         unet_weights=unet_weights_path(s.model), sampler=s.generation.sampler)
    lines, matches = [], 0
    for r in p.rows:
        note = ""
        if str(r["device"]).split(":")[0] != device.type:
            note = f" (made on {r['device']}, checked on {device.type}: hashes differ across device types)"
        n = int(r.get("batch_size") or 1)
        try:
            image = load_image(r["image_uri"], timeout=s.images.timeout, max_bytes=s.images.max_bytes,
                               max_pixels=s.images.max_pixels)
        except ImageError as exc:
            lines.append(f"UNCHECKED {r['id']}  its image cannot be read now: {exc}")
            continue
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
    return matches, len(p.rows), lines
