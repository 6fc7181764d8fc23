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
        "videos_per_hour": None, "peak_vram": {},
    }
    if ok.num_rows:
        first, last = pc.min(ok["started_at"]).as_py(), pc.max(ok["finished_at"]).as_py()
        span = (last - first).total_seconds() if first is not None and last is not None else 0.0  # None: made elsewhere
        s["videos_per_hour"] = 3600.0 * ok.num_rows / span if span > 0 else None
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
    """One listing instead of a stat per row."""
    try:
        return {e.name for e in os.scandir(folder)}
    except FileNotFoundError:
        return set()


def _paths(root: str, ids: list[str], given: list[str | None], default_dir: str, ext: str,
           present: set[str], fallback: list[str | None] | None = None, spread: bool = False) -> list[Any]:
    """Per row: 1 when <default_dir>/<id>.<ext> exists (the page builds the name), else a relative path or 0.
    In a spread folder ``present`` holds <subfolder>/<name>, and the path is given."""
    out: list[Any] = []
    for k, rid in enumerate(ids):
        name = f"{ownership.subfolder(rid)}/{rid}.{ext}" if spread else f"{rid}.{ext}"
        if name in present:
            out.append(f"{default_dir}/{name}" if spread else 1)
            continue
        p = given[k] if given is not None else None
        if p is None and fallback is not None and fallback[k] and not str(fallback[k]).startswith(("http://", "https://")):
            src = str(fallback[k])
            p = os.path.relpath(src, root) if os.path.isabs(src) else src
        elif p is None and fallback is not None and fallback[k]:
            p = fallback[k]
        out.append(p or 0)
    return out


def write_data_chunks(root: str, results: pa.Table, hosts: list[str], chunk_rows: int = CHUNK_ROWS) -> int:
    """report/data-NNNNN.js, one per ``chunk_rows`` rows, each a single ``SVD.chunk(k, {...})`` call."""
    folder = os.path.join(root, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    videos, inputs = _file_names(os.path.join(root, ownership.VIDEOS)), _file_names(os.path.join(root, INPUTS))
    spread = ownership.layout(root) == ownership.SPREAD
    if spread:  # one listing per subfolder (256), not a stat per row
        inputs = {f"{sub.split('/')[-1]}/{n}" for sub in ownership.subfolders(root, INPUTS)
                  for n in _file_names(os.path.join(root, sub))}
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
        vp = part["video_path"].to_pylist()
        cols["vid"] = _js_values([1 if (not f and f"{i}.mp4" in videos and p == f"videos/{i}.mp4") else (p if not f else 0)
                                  for i, p, f in zip(ids, vp, failed)])
        cols["img"] = _js_values(_paths(root, ids, None, INPUTS, "jpg", inputs, part["image"].to_pylist(), spread))
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
