"""`svd-batch-status <output.dir>`: where a run stands, from any node that sees the folder.

The run is ``running`` (a member is alive), ``stopped`` (nobody works on it and rows are left: rerun the same
command; no ETA) or ``finished`` (the job is complete). The rate and ETA are those of the current run only
(the latest launch), never averaged over the gap since an earlier one.

Each member of a run (one rank of one launch) keeps its member file in the ledger up to date every couple of
seconds and holds its lock while it lives; job.json says how many rows the job has and whether it is complete.
They are read as the run reads them (ledger.py, through the folder's store), and a member's liveness is decided
as the run decides it (``liveness``): never from another node's clock. A folder from an older svd-batch has no
member files: status then guesses from its records (see ``_legacy``).

Read-only by design: it never takes the run's lock and never writes, so it is safe beside a running job
(and on a read-only mount). Probing a member's lock takes it only when its owner is gone.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .manifest import load_for
from .results import epoch_seconds, float_values
from .settings import RunSettings
from .ledger import MEMBERS, JobInfo, read_key, read_members
from .rundir import RunDir
from .store import Store

LIVE_STATES = ("working", "waiting")
# A live member is stalled when its last row is this many times its median seconds per row old (and at least
# STALL_MIN_SECONDS): one slow row is normal, several rows' worth of silence is not (a hung device).
STALL_FACTOR = 5.0
STALL_MIN_SECONDS = 60.0


def manifest_rows(root: str) -> int | None:
    """Rows the run selected, from its config.yaml; None when the manifest cannot be read from here."""
    try:
        s = RunSettings.load(root)
        return None if s is None else load_for(s).table.num_rows
    except Exception:  # noqa: BLE001 - the manifest lives on another node or moved: report without a total
        return None


# -- the run's own account of itself ---------------------------------------------------------------------------
def liveness(store: Store, members: list[dict[str, Any]], clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Set each member's ``alive`` the way the run decides (ledger.Peers), never from another node's clock: a
    member in a final state is not alive; one whose lock is free is gone, one whose lock is held lives. Where the
    lock cannot be told (a store without locks, a mount where it cannot be probed), status watches the members'
    heartbeat counters on its own clock for two of their heartbeat intervals (and a second): a counter that moves
    is a live member, one that does not would be a lost one by the end of the run's lease."""
    undecided: dict[str, dict[str, Any]] = {}
    for m in members:
        m["alive"] = False
        if m.get("state") not in LIVE_STATES:
            continue
        free = store.probe(f"{MEMBERS}/{m.get('member')}.lock")
        if free is None:
            undecided[str(m.get("member"))] = m
        else:
            m["alive"] = not free
    if not undecided:
        return
    window = max(2.0 * float(m.get("heartbeat_seconds") or 2.0) + 1.0 for m in undecided.values())
    deadline = clock() + window
    while undecided and clock() < deadline:
        sleep(min(0.25, window))
        for d in read_members(store):
            m = undecided.get(d["member"])
            if m is not None and d.get("beat") != m.get("beat"):
                m.update(d, alive=d.get("state") in LIVE_STATES)
                del undecided[d["member"]]


def collect_members(store: Store, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The run's members (each with ``alive``) and its job, as the ranks write them; ([], None) for a folder
    without member files."""
    members = read_members(store)
    liveness(store, members, clock, sleep)
    return members, read_key(store, JobInfo.KEY)


# -- figures ------------------------------------------------------------------------------------------------------
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


class Records:
    """The records as arrays: per-member figures come from the rows each rank recorded."""

    def __init__(self, records: pa.Table):
        self.n = records.num_rows
        self.status = records["status"].to_numpy(zero_copy_only=False)
        self.fin = epoch_seconds(records["finished_at"])
        self.start = epoch_seconds(records["started_at"])
        self.secs = float_values(records["total_seconds"])
        self.rank = pc.fill_null(records["rank"], -1).to_numpy()
        self.host = np.array(records["host"].to_pylist(), dtype=object)

    def rows_of(self, rank: int, host: str | None, since: float) -> np.ndarray:
        m = (self.rank == rank) & (self.fin >= since)
        return m & (self.host == host) if host is not None else m


def _median(a: np.ndarray) -> float | None:
    a = a[~np.isnan(a)]
    return float(np.median(a)) if len(a) else None


def _stalled(alive: bool, last: float | None, median: float | None, now: float) -> bool:
    return bool(alive and last is not None and median is not None
                and now - last > max(STALL_MIN_SECONDS, STALL_FACTOR * median))


def _member_view(m: dict[str, Any], rec: Records, now: float) -> dict[str, Any]:
    started = float(m.get("started_at") or now)
    end = now if m["alive"] else float(m.get("beat_at") or started)
    mine = rec.rows_of(int(m.get("rank", -1)), m.get("host"), started)
    last = float(np.nanmax(rec.fin[mine])) if mine.any() else None
    median = _median(rec.secs[mine])
    state = m.get("state") if m["alive"] or m.get("state") not in LIVE_STATES else "lost"
    return {"member": m.get("member"), "launch": m.get("launch"), "rank": m.get("rank"), "host": m.get("host"),
            "state": state, "alive": m["alive"], "rows": int(m.get("rows") or 0), "ok": int(m.get("ok") or 0),
            "failed": int(m.get("failed") or 0), "holding": len(m.get("holding") or []),
            "rows_per_minute": 60.0 * int(m.get("rows") or 0) / (end - started) if end > started else None,
            "median_seconds": median, "started_at": started,
            "last_activity": _iso(last if last is not None else m.get("beat_at")),
            "idle_seconds": None if last is None else now - last,
            "stalled": _stalled(m["alive"] and state == "working", last, median, now)}


def _current(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members of the current run: every launch with a live member, else the latest launch."""
    live = {m.get("launch") for m in members if m["alive"]}
    if not live and members:
        latest = max(members, key=lambda m: float(m.get("started_at") or 0.0))
        live = {latest.get("launch")}
    return [m for m in members if m.get("launch") in live]


def _from_members(members, job, rec: Records, now: float) -> dict[str, Any]:
    current = _current(members)
    views = sorted((_member_view(m, rec, now) for m in current), key=lambda v: (v["rank"] is None, v["rank"] or 0))
    alive = any(v["alive"] for v in views)
    state = "running" if alive else ("finished" if (job or {}).get("state") == "complete" else "stopped")
    first = min((v["started_at"] for v in views), default=now)
    # A member's counts reach its file with its next heartbeat, its records before that: the run's rows are
    # the more of the two (a snapshot in a run's first seconds would otherwise have records but no rate).
    rows = max(sum(v["rows"] for v in views), int(np.sum(rec.fin >= first)) if rec.n else 0)
    end = now if alive else max((float(m.get("beat_at") or first) for m in current), default=first)
    return {"state": state, "members": views, "run_rows": rows,
            "rows_per_minute": 60.0 * rows / (end - first) if rows and end > first else None,
            "total": (job or {}).get("total"), "left_at": None if alive else end}


def _legacy(rec: Records, now: float, finished: bool, parts: bool) -> dict[str, Any]:
    """A folder without member files (written by an older svd-batch, or before the ranks kept them): the
    current run is the part files' rows when there are any (a start merges the earlier ones away), else the
    last stretch of records without a long gap; running is guessed from how recent the last record is."""
    if not rec.n:
        return {"state": "finished" if finished else "stopped", "members": [], "run_rows": 0, "rows_per_minute": None,
                "total": None, "left_at": None}
    median = _median(rec.secs)
    gap = max(120.0, 20.0 * (median or 0.0))
    order = np.argsort(rec.fin)
    breaks = np.flatnonzero(np.diff(rec.fin[order]) > gap)
    run = np.zeros(rec.n, dtype=bool)
    run[order[(breaks[-1] + 1) if len(breaks) else 0:]] = True
    last = float(np.nanmax(rec.fin))
    running = not finished and parts and now - last <= max(STALL_MIN_SECONDS, STALL_FACTOR * (median or 0.0))
    views = []
    for r in sorted(set(rec.rank[run].tolist())):
        m = run & (rec.rank == r)
        r_last = float(np.nanmax(rec.fin[m]))
        r_median = _median(rec.secs[m])
        span = r_last - float(np.nanmin(rec.start[m]))
        views.append({"member": None, "launch": None, "rank": int(r), "host": rec.host[m][0],
                      "state": "working" if running else ("done" if finished else "gone"), "alive": running,
                      "rows": int(m.sum()), "ok": int(np.sum(m & (rec.status == "ok"))),
                      "failed": int(np.sum(m & (rec.status != "ok"))), "holding": 0,
                      "rows_per_minute": 60.0 * m.sum() / span if span > 0 else None, "median_seconds": r_median,
                      "started_at": None, "last_activity": _iso(r_last), "idle_seconds": now - r_last,
                      "stalled": _stalled(running, r_last, r_median, now)})
    span = (now if running else last) - float(np.nanmin(rec.start[run]))
    return {"state": "finished" if finished else ("running" if running else "stopped"), "members": views,
            "run_rows": int(run.sum()), "rows_per_minute": 60.0 * run.sum() / span if span > 0 else None,
            "total": None, "left_at": None if running else last}


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(float(t), dt.timezone.utc).isoformat()


def collect(root: str, now: dt.datetime | None = None, total: int | None = None,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """``now``: the wall clock for people's figures (rates, "ago"); ``clock``/``sleep``: the monotonic clock that
    liveness is judged on (tests pass fake ones)."""
    now_s = (now or dt.datetime.now(dt.timezone.utc)).timestamp()
    rd = RunDir(root)
    members, job = collect_members(rd.store, clock, sleep)
    # results.parquet is looked at before the records, so that "finished" describes the same moment as the rows:
    # a run that finishes while this reads is still seen as running.
    try:
        res_mtime = os.path.getmtime(rd.results_path)
    except OSError:
        res_mtime = None
    parts = bool(rd.part_files())
    rec = Records(read_consistent(rd))
    if members:
        run = _from_members(members, job, rec, now_s)
    else:
        finished = res_mtime is not None and (not np.any(~np.isnan(rec.fin)) or res_mtime >= np.nanmax(rec.fin) - 1.0)
        run = _legacy(rec, now_s, finished, parts)
    if total is None:
        total = run["total"] if run["total"] is not None else manifest_rows(root)
    ok = int(np.sum(rec.status == "ok"))
    todo = None if total is None else max(0, total - rec.n)
    rate = run["rows_per_minute"]
    eta = todo / rate * 60.0 if run["state"] == "running" and todo and rate else None
    return {"root": rd.root, "state": run["state"], "total": total, "done": rec.n, "ok": ok, "failed": rec.n - ok,
            "todo": todo, "run_rows": run["run_rows"], "rows_per_minute": rate, "eta_seconds": eta,
            "left_at": _iso(run["left_at"]), "left_seconds": None if run["left_at"] is None else now_s - run["left_at"],
            "members": run["members"], "finished": run["state"] == "finished", "member_files": bool(members)}


def _dur(s: float | None) -> str:
    if s is None:
        return "n/a"
    s = int(max(0.0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


STATE_LINES = {
    "running": "running",
    "stopped": "stopped: nobody is working on it (the last member left {ago} ago); run the same command again to "
               "do the {todo} rows left",
    "finished": "finished: every row is done; results.parquet and the report are written (svd-batch-report "
                "rewrites the report)",
}


def render(st: dict[str, Any]) -> str:
    total = "?" if st["total"] is None else st["total"]
    todo = "?" if st["todo"] is None else st["todo"]
    lines = [f"svd-batch status: {st['root']}",
             "state: " + STATE_LINES[st["state"]].format(ago=_dur(st["left_seconds"]), todo=todo),
             f"rows: {st['done']} of {total} done ({st['ok']} ok, {st['failed']} failed), {todo} to do"]
    rate = "n/a" if st["rows_per_minute"] is None else f"{st['rows_per_minute']:.1f} rows/min"
    which = "this run" if st["state"] == "running" else "the last run"
    lines.append(f"rate ({which}: {st['run_rows']} rows): {rate}"
                 + (f", ETA {_dur(st['eta_seconds'])}" if st["state"] == "running" else ""))
    lines.append(f"{'rank':>5} {'host':<20} {'state':<14} {'rows':>7} {'failed':>7} {'rows/min':>9} {'s/row':>7} "
                 f"{'last row':>12}")
    for r in st["members"]:
        rpm = "n/a" if r["rows_per_minute"] is None else f"{r['rows_per_minute']:.1f}"
        med = "n/a" if r["median_seconds"] is None else f"{r['median_seconds']:.2f}"
        ago = "n/a" if r["idle_seconds"] is None else _dur(r["idle_seconds"]) + " ago"
        flag = "  STALLED" if r["stalled"] else ""
        lines.append(f"{str(r['rank']):>5} {str(r['host'])[:20]:<20} {r['state']:<14} {r['rows']:>7} {r['failed']:>7} "
                     f"{rpm:>9} {med:>7} {ago:>12}{flag}")
    if any(r["state"] == "lost" for r in st["members"]):
        lines.append("lost: a member that stopped without saying so (killed, or its node went away); the rows it had "
                     "in hand are not done")
    if any(r["stalled"] for r in st["members"]):
        lines.append(f"STALLED: alive, but no row for more than {STALL_FACTOR:g}x its median seconds per row (at "
                     f"least {STALL_MIN_SECONDS:g} s); look at that host's log and device (nvidia-smi)")
    if not st["member_files"] and st["done"]:
        lines.append("(this folder has no member files, from an older svd-batch: the state is guessed from how "
                     "recent the last record is)")
    return "\n".join(lines)
