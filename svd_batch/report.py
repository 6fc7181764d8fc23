"""Step 5: results.parquet for the manifest, and the short summary a person reads at the end."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fields import RESULT_SCHEMA
from .rundir import RunDir, write_parquet_atomic


def float_values(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric results column as float64, NaN for nulls."""
    return pc.fill_null(pc.cast(col, pa.float64()), float("nan")).to_numpy()


def epoch_seconds(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A timestamp[us] results column (started_at, finished_at) as float seconds since the epoch, NaN for nulls."""
    return float_values(pc.divide(pc.cast(pc.cast(col, pa.int64()), pa.float64()), 1e6))


def results_table(records: pa.Table, manifest: pa.Table, extra_columns: list[str]) -> pa.Table:
    """One row per manifest row that has a record, in manifest order, with the manifest's extra columns."""
    if records.num_rows == 0:
        return RESULT_SCHEMA.empty_table()
    keep = manifest.select(["id", "row", *extra_columns]).rename_columns(["id", "__row", *extra_columns])
    joined = records.join(keep, "id", join_type="inner", use_threads=False)
    joined = joined.sort_by("__row")
    row_idx = joined.schema.get_field_index("row")
    joined = joined.set_column(row_idx, "row", joined["__row"]).drop_columns(["__row"])
    for f in RESULT_SCHEMA:  # records made before a column existed (e.g. the scores) have it empty
        if f.name not in joined.column_names:
            joined = joined.append_column(f.name, pa.nulls(joined.num_rows, f.type))
    ordered = [f.name for f in RESULT_SCHEMA] + extra_columns
    return joined.select(ordered)


def write_results(rundir: RunDir, records: pa.Table, manifest: pa.Table, extra_columns: list[str]) -> pa.Table:
    table = results_table(records, manifest, extra_columns)
    write_parquet_atomic(table, rundir.results_path)
    return table


def summary(results: pa.Table, *, total: int, ran: list[float], wall_seconds: float, output_dir: str,
            stats=None) -> str:
    ok = pc.sum(pc.equal(results["status"], "ok")).as_py() or 0 if results.num_rows else 0
    failed = pc.sum(pc.equal(results["status"], "failed")).as_py() or 0 if results.num_rows else 0
    pending = total - ok - failed
    lines = [f"svd-batch: {ok} ok, {failed} failed" + (f", {pending} not done" if pending else "") + f" of {total} rows"]
    if ran:
        per_min = 60.0 * len(ran) / wall_seconds if wall_seconds > 0 else float("nan")
        lines.append(
            f"  this run: {len(ran)} rows in {wall_seconds:.1f} s, {per_min:.1f} videos/min, "
            f"median {float(np.median(ran)):.2f} s per video"
        )
        if stats is not None:
            warmup = f", compile warm-up {stats.warmup_seconds:.1f} s" if stats.warmup_seconds else ""
            lines.append(f"  rank 0: model load {stats.model_load_seconds:.1f} s{warmup}, pipeline busy "
                         f"{stats.pipeline_seconds:.1f} s of {stats.wall_seconds:.1f} s")
    else:
        lines.append("  this run: nothing left to do")
    lines.append(f"  output: {output_dir}  (videos/, results.parquet)")
    if failed:
        lines.append("  failed rows are listed with their errors in results.parquet (status == 'failed'); "
                     "fix them and rerun with retry_failed=true")
    return "\n".join(lines)
