"""`svd-batch-status <output.dir>`: where a run stands, from any node that sees the folder.

Read-only by design: it never takes the run's lock and never writes, so it is safe beside a running job
(and on a read-only mount). It reads the records every rank has made so far (merged records plus part
files) and the manifest named in the run's config.yaml for the number of rows selected.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .report import epoch_seconds, float_values
from .rundir import RunDir, RunDirError

# A rank is stalled when its last record is this many times its median seconds per row old (and at least
# STALL_MIN_SECONDS): one slow row is normal, several rows' worth of silence is not.
STALL_FACTOR = 5.0
STALL_MIN_SECONDS = 60.0


def manifest_rows(root: str) -> int | None:
    """Rows the run selected, from its config.yaml; None when the manifest cannot be read from here."""
    try:
        from .runner import read_manifest, saved_config

        cfg = saved_config(root)
        return None if cfg is None else read_manifest(cfg).table.num_rows
    except Exception:  # noqa: BLE001 - the manifest lives on another node or moved: report without a total
        return None


def _state(rd: RunDir) -> tuple:
    try:
        merged = os.stat(rd.records_path).st_mtime_ns
    except FileNotFoundError:
        merged = None
    return merged, tuple(rd.part_files())


def read_consistent(rd: RunDir, tries: int = 5) -> pa.Table:
    """The records, read again when the run merged its parts meanwhile (a read across a merge misses rows
    for a moment: the parts were listed, then folded into records.parquet and deleted)."""
    cols = ["id", "status", "rank", "host", "total_seconds", "started_at", "finished_at"]
    for _ in range(tries):
        before = _state(rd)
        records = rd.read_records(cols)
        if _state(rd) == before:
            break
    return records


def collect(root: str, now: dt.datetime | None = None, total: int | None = None) -> dict[str, Any]:
    now_s = (now or dt.datetime.now(dt.timezone.utc)).timestamp()
    # results.parquet is looked at before the records, so that "finished" describes the same moment as the rows:
    # a run that finishes while this reads (or while the manifest below loads) is still seen as running.
    res = os.path.join(root, "results.parquet")
    try:
        res_mtime = os.path.getmtime(res)
    except OSError:
        res_mtime = None
    records = read_consistent(RunDir(root))
    if total is None:
        total = manifest_rows(root)
    ok = pc.sum(pc.equal(records["status"], "ok")).as_py() or 0 if records.num_rows else 0
    failed = records.num_rows - ok
    fin = epoch_seconds(records["finished_at"])
    start = epoch_seconds(records["started_at"])
    secs = float_values(records["total_seconds"])
    ranks = pc.fill_null(records["rank"], -1).to_numpy()
    hosts = records["host"].to_pylist()
    # results.parquet newer than every record: the last start finished, so quiet ranks are done, not stalled.
    finished = res_mtime is not None and (not np.any(~np.isnan(fin)) or res_mtime >= np.nanmax(fin) - 1.0)
    per_rank = []
    for r in sorted(set(ranks.tolist())):
        m = ranks == r
        f, s = fin[m], secs[m]
        last = float(np.nanmax(f)) if np.any(~np.isnan(f)) else float("nan")
        first = float(np.nanmin(start[m])) if np.any(~np.isnan(start[m])) else float("nan")
        med = float(np.nanmedian(s)) if np.any(~np.isnan(s)) else float("nan")
        # The recent rate: a resumed run's records of days ago must not dilute it.
        window = max(600.0, 20.0 * (0.0 if np.isnan(med) else med))
        recent = m & (fin >= last - window)
        first = float(np.nanmin(start[recent])) if np.any(~np.isnan(start[recent])) else first
        span = last - first
        idle = now_s - last
        per_rank.append({
            "rank": int(r), "host": next((h for h, k in zip(hosts, m) if k), None),
            "done": int(m.sum()), "failed": int(np.sum(m & (records["status"].to_numpy(zero_copy_only=False) != "ok"))),
            "rows_per_minute": 60.0 * recent.sum() / span if span > 0 else None,
            "median_seconds": None if np.isnan(med) else med,
            "last_activity": None if np.isnan(last) else dt.datetime.fromtimestamp(last, dt.timezone.utc).isoformat(),
            "idle_seconds": None if np.isnan(last) else idle,
            "stalled": bool(not finished and not np.isnan(last) and idle > max(STALL_MIN_SECONDS, STALL_FACTOR * (0 if np.isnan(med) else med))),
        })
    # The rate of the run as a whole: rows over the time since the first row of the current stretch.
    rate = sum(r["rows_per_minute"] or 0.0 for r in per_rank if not r["stalled"])
    todo = None if total is None else max(0, total - records.num_rows)
    eta = None if not todo or rate <= 0 else todo / rate * 60.0
    return {"root": os.path.abspath(root), "total": total, "done": records.num_rows, "ok": ok, "failed": failed,
            "todo": todo, "rows_per_minute": rate, "eta_seconds": eta, "ranks": per_rank,
            "finished": bool(finished)}


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def render(st: dict[str, Any]) -> str:
    total = "?" if st["total"] is None else st["total"]
    todo = "?" if st["todo"] is None else st["todo"]
    lines = [f"svd-batch status: {st['root']}",
             f"rows: {st['done']} of {total} done ({st['ok']} ok, {st['failed']} failed), {todo} to do",
             f"rate: {st['rows_per_minute']:.1f} rows/min, ETA {_dur(st['eta_seconds'])}"]
    lines.append(f"{'rank':>5} {'host':<20} {'done':>8} {'failed':>7} {'rows/min':>9} {'s/row':>7} {'last activity':>14}")
    for r in st["ranks"]:
        rpm = "n/a" if r["rows_per_minute"] is None else f"{r['rows_per_minute']:.1f}"
        med = "n/a" if r["median_seconds"] is None else f"{r['median_seconds']:.2f}"
        ago = "n/a" if r["idle_seconds"] is None else _dur(max(0.0, r["idle_seconds"])) + " ago"
        flag = "  STALLED" if r["stalled"] else ""
        lines.append(f"{r['rank']:>5} {str(r['host'])[:20]:<20} {r['done']:>8} {r['failed']:>7} {rpm:>9} {med:>7} {ago:>14}{flag}")
    if st["finished"]:
        lines.append("results.parquet is written: the last run on this folder finished (svd-batch-report shows it)")
    if any(r["stalled"] for r in st["ranks"]) and not st["finished"]:
        lines.append(f"STALLED: no record for more than {STALL_FACTOR:g}x the rank's median seconds per row "
                     f"(at least {STALL_MIN_SECONDS:g} s); look at that host's log, or at whether the run is still up")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-status", description="Rows done, failed and to do, rate, last "
                                 "activity and stalls per rank, and ETA of a running or stopped svd-batch run. "
                                 "Read-only: takes no lock, writes nothing.")
    ap.add_argument("output_dir")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.output_dir, ".svd-batch")):
        print(f"svd-batch-status: {args.output_dir} is not an svd-batch output folder (no .svd-batch/ inside). "
              "Pass the output.dir of a run.", file=sys.stderr)
        sys.exit(2)
    try:
        st = collect(args.output_dir)
    except RunDirError as exc:
        print(f"svd-batch-status: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(st, indent=2) if args.json else render(st))


if __name__ == "__main__":
    main()
