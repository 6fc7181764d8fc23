"""Step 5: results.parquet for the manifest, and the short summary a person reads at the end."""

from __future__ import annotations

import os
import sys
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .fields import RESULT_SCHEMA
from .rundir import RunDir, write_parquet_atomic


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
OUTPUTS = (("videos", "videos/"), ("results.parquet", "results.parquet"), ("index.html", "index.html (the report)"),
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
                         + f", {per_min:.1f} videos/min, median {float(np.median(ran)):.2f} s per video")
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
