"""The report's row data: results.parquet (or an interrupted run's records) as compact column arrays in
``report/data-NNNNN.js`` chunks, and the summary figures of the page."""

from __future__ import annotations

import glob
import json
import math
import os
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import ownership
from ..atomic import write_text_atomic
from ..fields import CONDITIONING_FIELDS
from ..results import float_values
from ..rundir import RunDir
from ..scores import SCORE_COLUMNS

REPORT_DIR = ownership.REPORT
INPUTS = ownership.INPUTS
CHUNK_ROWS = 50_000

# column -> decimals kept in the page (the page shows them; results.parquet keeps every digit)
ROUND = {"total_seconds": 2, "motion_score": 4, "image_similarity": 4, "flicker_score": 4,
         "noise_aug_strength": 4, "min_guidance_scale": 3, "max_guidance_scale": 3}
NUMERIC = ("total_seconds", *SCORE_COLUMNS, *CONDITIONING_FIELDS, "rank")


def natural_key(text: str) -> list:
    """cuda:2 before cuda:10, node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def summarize(results: pa.Table) -> dict[str, Any]:
    ok = results.filter(pc.equal(results["status"], "ok")) if results.num_rows else results
    secs = float_values(ok["total_seconds"]) if ok.num_rows else np.array([])
    secs = secs[~np.isnan(secs)]
    s: dict[str, Any] = {
        "rows": results.num_rows, "ok": ok.num_rows, "failed": results.num_rows - ok.num_rows,
        "median_seconds": float(np.median(secs)) if len(secs) else None,
        "p95_seconds": float(np.percentile(secs, 95)) if len(secs) else None,
        "videos_per_minute": None, "peak_vram": {},
    }
    if ok.num_rows:
        first, last = pc.min(ok["started_at"]).as_py(), pc.max(ok["finished_at"]).as_py()
        span = (last - first).total_seconds() if first is not None and last is not None else 0.0  # None: made elsewhere
        # per minute, as the terminal's summary, the throughput chart and svd-batch-status count
        s["videos_per_minute"] = 60.0 * ok.num_rows / span if span > 0 else None
        peaks = ok.group_by(["host", "device"], use_threads=False).aggregate([("peak_vram_bytes", "max")])
        for host, device, peak in zip(*(peaks[c].to_pylist() for c in ("host", "device", "peak_vram_bytes_max"))):
            s["peak_vram"][f"{host} {device}"] = peak
    return s


def _js_values(values: np.ndarray | list, decimals: int | None = None) -> Any:
    """A column of one chunk as JSON-ready data: one value when every row has it (the common case for
    conditioning values), else a list."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f":
            if decimals is not None:
                values = np.round(values, decimals)
            if len(values) and (np.all(values == values[0]) or np.all(np.isnan(values))):
                v = float(values[0])
                return None if math.isnan(v) else (int(v) if v.is_integer() and decimals is None else v)
            finite = values[~np.isnan(values)]
            if decimals is None and len(finite) == len(values) and np.all(finite == np.round(finite)):
                return values.astype(np.int64).tolist()  # integer columns read as floats: "3", not "3.0"
            return [None if math.isnan(v) else v for v in values.tolist()]
        if len(values) and np.all(values == values[0]):
            return values[0].item()
        return values.tolist()
    if len(values) and all(v == values[0] for v in values):
        return values[0]
    return values


def _file_names(folder: str) -> set[str]:
    """The regular files of a folder (links to files included), in one listing instead of a stat per row: a
    FIFO, device or folder named like a video is never handed to the browser (opening it could never end)."""
    try:
        return {e.name for e in os.scandir(folder) if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _where(ids: list[str], present: set[str], ext: str, spread: bool, ok: list[bool] | None = None) -> list[Any]:
    """Per row: where its file is, for the page to build the name from: 1 for <dir>/<id>.<ext>, the subfolder
    (two hex digits) for <dir>/<sub>/<id>.<ext> in a spread folder, 0 when svd-batch wrote no such file."""
    out: list[Any] = []
    for k, rid in enumerate(ids):
        sub = ownership.subfolder(rid) if spread else None
        there = (ok is None or ok[k]) and (f"{sub}/{rid}.{ext}" if spread else f"{rid}.{ext}") in present
        out.append((sub if spread else 1) if there else 0)
    return out


def write_data_chunks(root: str, results: pa.Table, hosts: list[str], chunk_rows: int = CHUNK_ROWS) -> int:
    """report/data-NNNNN.js, one per ``chunk_rows`` rows, each a single ``SVD.chunk(k, {...})`` call."""
    folder = os.path.join(root, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    spread = ownership.layout(root) == ownership.SPREAD
    if spread:  # one listing per subfolder (256), not a stat per row
        videos, inputs = ({f"{sub.split('/')[-1]}/{n}" for sub in ownership.subfolders(root, top)
                           for n in _file_names(os.path.join(root, sub))} for top in (ownership.VIDEOS, INPUTS))
    else:
        videos, inputs = _file_names(os.path.join(root, ownership.VIDEOS)), _file_names(os.path.join(root, INPUTS))
    host_index = {h: i for i, h in enumerate(hosts)}
    n = results.num_rows
    chunks = max(1, math.ceil(n / chunk_rows)) if n else 0
    t0 = pc.min(results["finished_at"]).as_py() if n else None
    for k in range(chunks):
        part = results.slice(k * chunk_rows, chunk_rows)
        ids = part["id"].to_pylist()
        status = part["status"].to_pylist()
        failed = np.array([s != "ok" for s in status])
        cols: dict[str, Any] = {"id": ids, "st": _js_values(failed.astype(np.int8))}
        errors = part["error"].to_pylist()
        cols["err"] = [(e or "")[:300] if f else None for e, f in zip(errors, failed)] if failed.any() else None
        cols["seed"] = _js_values([str(s) for s in part["seed"].to_pylist()])
        for c in NUMERIC:
            if c not in part.column_names:
                cols[c] = None
                continue
            a = float_values(part[c])
            cols[c] = _js_values(a, ROUND.get(c))
        cols["host"] = _js_values(np.array([host_index.get(h, 0) for h in part["host"].to_pylist()], dtype=np.int64))
        fin = part["finished_at"]
        if t0 is not None:
            secs = pc.divide(pc.cast(pc.subtract(pc.cast(fin, pa.int64()), pa.scalar(int(t0.timestamp() * 1e6))),
                                     pa.float64()), 1e6)
            cols["t"] = _js_values(np.round(float_values(secs), 1))
        # The page loads only files svd-batch wrote in the run folder (videos/[<sub>/]<id>.mp4, inputs/...jpg),
        # never a row's own image reference: that may be a URL, a device or a FIFO, and opening the page would
        # fetch it. A row without its saved input shows the reference as text ("src").
        cols["vid"] = _js_values(_where(ids, videos, "mp4", spread, [not f for f in failed]))
        img = _where(ids, inputs, "jpg", spread)
        cols["img"] = _js_values(img)
        refs = part["image"].to_pylist()
        # sparse (row in chunk -> reference): most rows have their input saved
        cols["src"] = {str(j): refs[j][:300] for j, v in enumerate(img) if v == 0 and refs[j]}
        text = f"SVD.chunk({k},{json.dumps(cols, separators=(',', ':'), allow_nan=True)});\n"
        write_text_atomic(text, os.path.join(folder, f"data-{k:05d}.js"))
    own = ownership.real_folder(root, REPORT_DIR)  # never delete through a link out of the folder
    for stale in glob.glob(os.path.join(own, "data-*.js")) if own else []:  # chunks of an earlier, longer run
        name = os.path.basename(stale)
        if ownership.is_ours(REPORT_DIR, name) and int(name[5:10]) >= chunks:
            ownership.remove_file(stale)
    return chunks


def read_results(rd: RunDir) -> pa.Table:
    """results.parquet, or for an interrupted run the records so far."""
    if os.path.exists(rd.results_path):
        return pq.read_table(rd.results_path)
    return rd.read_records()
