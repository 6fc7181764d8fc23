"""Step 5: results.parquet for the manifest (from the records of every rank), the short summary a person reads
at the end, and the post-run rewrites of results.parquet: completing a folder its run left unmerged, and
recomputing its quality scores (``svd-batch-score``)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import ownership
from .fields import RESULT_SCHEMA
from .manifest import ManifestError, load_for
from .rundir import RunDir, RunDirError, write_parquet_atomic
from .scores import SCORE_COLUMNS, Embed, score_files
from .settings import RunSettings


def float_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric results column as float64, NaN for nulls."""
    return pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy()


def epoch_seconds(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A timestamp[us] results column (started_at, finished_at) as float seconds since the epoch, NaN for nulls."""
    return float_values(pc.divide(pc.cast(pc.cast(col, pa.int64()), pa.float64()), 1e6))


def results_table(records: pa.Table, manifest: pa.Table, extra_columns: list[str],
                  warn: Callable[[str], None] | None = None) -> pa.Table:
    """One row per manifest row that has a record, in manifest order, with the manifest's extra columns.

    The extras are taken by position, not joined: a join cannot carry list, map or struct columns (tags, boxes,
    captions per frame in Hugging Face datasets), and ``take`` carries any type as it was. An extra column that
    Parquet cannot store is left out with one warning; the results are never lost for it."""
    if records.num_rows == 0:
        return RESULT_SCHEMA.empty_table()
    pos = pc.index_in(records["id"], value_set=manifest["id"])
    present = pc.is_valid(pos)
    records, pos = records.filter(present), pos.filter(present)
    order = pc.sort_indices(pos)  # the manifest table is in manifest order
    records, pos = records.take(order), pos.take(order)
    for f in RESULT_SCHEMA:  # records made before a column existed (e.g. the scores) have it empty
        if f.name not in records.column_names:
            records = records.append_column(f.name, pa.nulls(records.num_rows, f.type))
    records = records.set_column(records.schema.get_field_index("row"), "row", manifest["row"].take(pos))
    table = records.select([f.name for f in RESULT_SCHEMA])
    dropped = []
    for name in extra_columns:
        try:
            column = manifest[name].take(pos)
            _storable(column)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            dropped.append(f"{name} ({manifest[name].type}: {type(exc).__name__})")
            continue
        table = table.append_column(name, column)
    if dropped:
        (warn or _warn)(f"svd-batch: results.parquet leaves out {len(dropped)} manifest column(s) it cannot store: "
                        + ", ".join(dropped) + "; they stay in the manifest")
    return table


def _storable(column: pa.ChunkedArray) -> None:
    """Raise if Parquet cannot store this column's type (tried on one row)."""
    pq.write_table(pa.table({"c": column.slice(0, 1)}), pa.BufferOutputStream())


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def write_results(rundir: RunDir, records: pa.Table, manifest: pa.Table, extra_columns: list[str]) -> pa.Table:
    table = results_table(records, manifest, extra_columns)
    write_parquet_atomic(table, rundir.results_path)
    return table


RANK_FIGURES = ("rank", "host", "rows", "ok", "failed", "model_load_seconds", "warmup_seconds", "pipeline_seconds",
                "wall_seconds")


def rank_figures(stats) -> dict:
    """One rank's figures for ``summary`` from its RankStats (or anything with those attributes)."""
    return {k: getattr(stats, k, None) for k in RANK_FIGURES}


def _rank_line(r: dict) -> str:
    where = f"rank {r['rank']}" + (f" ({r['host']})" if r.get("host") else "")
    rows = f"{r.get('rows') or 0} rows" + (f" ({r.get('ok') or 0} ok, {r['failed']} failed)" if r.get("failed") else "")
    warmup = f", compile warm-up {r['warmup_seconds']:.1f} s" if r.get("warmup_seconds") else ""
    busy = (f", pipeline busy {r.get('pipeline_seconds') or 0.0:.1f} s of {r['wall_seconds']:.1f} s"
            if r.get("wall_seconds") is not None else "")
    return f"  {where}: {rows}, model load {r.get('model_load_seconds') or 0.0:.1f} s{warmup}{busy}"


# What a run leaves for people to open, in the order the summary names them.
OUTPUTS = ((ownership.VIDEOS, "videos/"), ("results.parquet", "results.parquet"), ("index.html", "index.html (the report)"),
           ("contact_sheet.png", "contact_sheet.png"))


def summary(results: pa.Table, *, total: int, ran: list[float], wall_seconds: float, output_dir: str,
            stats=None, ranks: list[dict] | None = None) -> str:
    """The closing lines of a run.

    ``ran``: seconds per video of the rows this run finished ok. ``ranks``: per rank of this run, a dict with
    rank, host, rows, ok, failed, model_load_seconds, warmup_seconds, pipeline_seconds, wall_seconds (one line
    each, in rank order); ``stats`` (one rank's RankStats) stands in for it when only that rank is known."""
    if ranks is None and stats is not None:
        ranks = [rank_figures(stats)]
    ranks = sorted(ranks or [], key=lambda r: r["rank"])
    ok = pc.sum(pc.equal(results["status"], "ok")).as_py() or 0 if results.num_rows else 0
    failed = pc.sum(pc.equal(results["status"], "failed")).as_py() or 0 if results.num_rows else 0
    pending = total - ok - failed
    lines = [f"svd-batch: {ok} ok, {failed} failed" + (f", {pending} not done" if pending else "") + f" of {total} rows"]
    attempted = sum(r.get("rows") or 0 for r in ranks) if ranks else len(ran)
    if attempted:
        run_failed = sum(r.get("failed") or 0 for r in ranks)
        per_min = 60.0 * len(ran) / wall_seconds if wall_seconds > 0 else float("nan")
        if ran:
            lines.append(f"  this run: {attempted} rows in {wall_seconds:.1f} s"
                         + (f" ({run_failed} failed)" if run_failed else "")
                         + f", {per_min:.1f} videos/min (wall time, model load included), "
                         f"median {float(np.median(ran)):.2f} s per video")
        else:
            lines.append(f"  this run: {attempted} rows in {wall_seconds:.1f} s, every one failed")
        lines += [_rank_line(r) for r in ranks]
    else:
        lines.append("  this run: nothing left to do")
    present = [text for name, text in OUTPUTS if os.path.exists(os.path.join(output_dir, name))]
    lines.append(f"  output: {output_dir}" + (f"  ({', '.join(present)})" if present else ""))
    if failed:
        lines.append("  failed rows are listed with their errors in results.parquet (status == 'failed')"
                     + (" and in index.html" if os.path.exists(os.path.join(output_dir, "index.html")) else "")
                     + "; fix them and rerun with retry_failed=true")
    return "\n".join(lines)


def complete_folder(root: str, say: Callable[[str], None] = _warn) -> bool:
    """Merge what a run left unmerged (its last process was lost or stopped) and write results.parquet, as its
    own last process would have. Needs the folder to itself (no member of any launch alive), so it never
    touches a folder that a run is using; returns whether results.parquet is now up to date."""
    rundir = RunDir(root)
    if not rundir.part_files() and os.path.exists(rundir.results_path):
        return True
    settings = RunSettings.load(root)
    if settings is None:
        return False
    try:
        rundir.plan_lock.require(wait=60, describe=True)
        rundir.active_lock.require()
    except RunDirError as exc:
        say(f"svd-batch: {exc}")
        rundir.release_locks()
        return False
    try:
        manifest = load_for(settings)
        records = rundir.merge(all_parts=True)  # alone: no writer is alive
        write_results(rundir, records, manifest.table, manifest.extra_columns)
        return True
    except (ManifestError, RunDirError) as exc:
        say(f"svd-batch: could not merge the records in {root}: {exc}")
        return False
    finally:
        rundir.release_locks()


def conditioning_image(rd: RunDir, row: dict):
    """inputs/<id>.jpg when the run kept it; else the row's own image resized as the model resizes it."""
    from PIL import Image

    saved = rd.input_path(row["id"])
    if os.path.isfile(saved):
        return Image.open(saved).convert("RGB")
    src = row.get("image")
    if src and row.get("width") and row.get("height") and not src.startswith(("http://", "https://")):
        path = src if os.path.isabs(src) else os.path.join(rd.root, src)
        if os.path.isfile(path):  # never a FIFO or device: reading one could wait for ever
            return Image.open(path).convert("RGB").resize((int(row["width"]), int(row["height"])))
    return None


class ResultsError(ValueError):
    """results.parquet cannot be rescored as it is (not readable, or not one svd-batch wrote): a usage error."""


RESCORE_NEEDS = ("id", "status", "video_path")


def read_for_rescore(path: str) -> pa.Table:
    """results.parquet, checked for the columns rescoring reads (a foreign or very old table is refused whole)."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ResultsError(f"{path} cannot be read as Parquet ({type(exc).__name__}: {exc}).") from None
    missing = [c for c in RESCORE_NEEDS if c not in table.column_names]
    if missing:
        raise ResultsError(
            f"{path} lacks the column(s) {', '.join(missing)}, so it is not a results table svd-batch wrote (or one "
            "from a much older version). Point svd-batch-score at the output.dir of an svd-batch run; an old run's "
            "results can be rebuilt by running its svd-batch command again (it resumes).")
    return table


def rescore(root: str, embed: Embed | None, log: Callable[[str], None] = print,
            lock_wait: float = 60.0) -> tuple[pa.Table, list[str]]:
    """Recompute every ok row's scores from its MP4 and input image (what the run itself scores) and rewrite
    results.parquet atomically; rows whose video is missing keep empty scores. A video that cannot be read is
    that row's problem: its scores are left empty, one line names it (the returned list), the rest are scored.
    The scoring reads only videos; the rewrite happens under the folder's merge lock, on results.parquet as it
    is then (a run's merge may have rewritten it meanwhile: rows it added keep their scores, and a row gets new
    scores only for the video scored). A merge that holds the lock longer than ``lock_wait`` seconds makes it
    refuse (RunDirError), writing nothing."""
    import time

    from .util import first_line

    rd = RunDir(root)
    table = read_for_rescore(rd.results_path)
    keep = [c for c in ("id", "status", "video_path", "image", "width", "height") if c in table.column_names]
    started, missing, bad = time.perf_counter(), 0, []
    scores: dict[tuple[str, str], dict] = {}
    seen = set(zip(table["id"].to_pylist(), table["video_path"].to_pylist()))
    for row in table.select(keep).to_pylist():
        video = os.path.join(root, row["video_path"]) if row["status"] == "ok" and row["video_path"] else None
        if not video or not os.path.exists(video):
            missing += row["status"] == "ok"
            continue
        try:
            if not os.path.isfile(video):
                raise OSError("not a regular file")
            scores[(row["id"], row["video_path"])] = score_files(
                video, conditioning_image(rd, row) if embed is not None else None, embed)
        except Exception as exc:  # noqa: BLE001 - a corrupt or truncated video is its row's problem only
            bad.append(f"svd-batch-score: row {row['id']!r}: {row['video_path']} cannot be scored "
                       f"({type(exc).__name__}: {first_line(exc, 200)}); its scores are left empty")
            log(bad[-1])
    lock = rd.merge_lock
    if not lock.acquire(wait=lock_wait, describe=True):
        holder = lock.holder()
        lock.release()
        raise RunDirError(
            f"A run is merging its records into {rd.results_path} ({holder}) and held the folder's merge lock for "
            f"{lock_wait:.0f} s, so the new scores were not written (nothing changed). Run svd-batch-score again "
            "once the run has finished."
        )
    try:
        table = read_for_rescore(rd.results_path)
        keys = list(zip(table["id"].to_pylist(), table["video_path"].to_pylist()))
        for c in SCORE_COLUMNS:
            # A row merged in after the read above keeps the scores its run gave it.
            old = table[c].to_pylist() if c in table.column_names else [None] * table.num_rows
            arr = pa.array([scores[k][c] if k in scores else (None if k in seen else v) for k, v in zip(keys, old)],
                           pa.float64())
            if c in table.column_names:
                table = table.set_column(table.schema.get_field_index(c), c, arr)
            else:
                table = table.append_column(c, arr)
        write_parquet_atomic(table, rd.results_path)
    finally:
        lock.release()
    log(f"svd-batch-score: scored {len(scores)} rows in {time.perf_counter() - started:.1f} s"
        + (f"; {missing} ok rows have no video file (scores left empty)" if missing else "")
        + (f"; {len(bad)} could not be scored (named above)" if bad else ""))
    return table, bad
