"""svd-batch-status: running, stopped or finished, with the current run's rate and ETA; read-only."""

import datetime as dt
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svd_batch.fields import RESULT_SCHEMA
from svd_batch.status import collect, render
from tests.conftest import REPO, SAMPLE, launch, write_manifest

N_ROWS = 12


def status(out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svd_batch.commands.status", str(out), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def snapshot(root) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.distributed
def test_status_while_two_processes_write(tmp_path):
    rows = [{"id": f"r{i:02d}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg"))} for i in range(N_ROWS)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    log = open(tmp_path / "run.log", "w")
    proc = launch(f"manifest.path={m}", f"output.dir={out}", background=True, log=log)
    live = []
    try:
        deadline = time.time() + 400
        while proc.poll() is None and time.time() < deadline:
            if (out / "config.yaml").exists():  # rank 0 has prepared the folder and holds the lock
                st = status(out, "--json")
                assert st.returncode == 0, st.stderr  # never blocked by the run's lock, never in its way
                live.append(json.loads(st.stdout))
            time.sleep(0.5)
        assert proc.wait(timeout=60) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
        log.close()
    during = [s for s in live if 0 < s["done"] < N_ROWS]
    assert during, f"no snapshot caught the run half-way: {[s['done'] for s in live]}"
    s = during[-1]
    assert s["state"] == "running" and s["total"] == N_ROWS and s["todo"] == N_ROWS - s["done"]
    assert s["rows_per_minute"] > 0 and s["eta_seconds"] is not None and s["eta_seconds"] > 0
    assert all(r["host"] and r["last_activity"] and not r["stalled"] for r in s["members"])
    assert {r["rank"] for s in live for r in s["members"]} == {0, 1}  # both ranks seen while they worked
    assert [x["done"] for x in live] == sorted(x["done"] for x in live)  # never goes backwards

    # After the run: all done, finished, no ETA, and a status call changes nothing in the folder.
    before = snapshot(out)
    st = status(out)
    assert st.returncode == 0, st.stderr
    assert f"rows: {N_ROWS} of {N_ROWS} done ({N_ROWS} ok, 0 failed), 0 to do" in st.stdout
    assert "state: finished" in st.stdout and "STALLED" not in st.stdout and "ETA" not in st.stdout
    assert snapshot(out) == before


@pytest.mark.process
def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    st = status(tmp_path)
    assert st.returncode == 2 and "not an svd-batch output folder" in st.stderr


# -- member files (the ranks' own account): a fake run folder -------------------------------------------------
NOW = 1_800_000_000.0
HOST = socket.gethostname()


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def member(root, launch, rank, *, state, started, beat, rows, failed=0, host=HOST, hold=False):
    name = f"{launch}-r{rank:05d}"
    write_json(root / ".svd-batch" / "members" / f"{name}.json", {
        "member": name, "launch": launch, "job": "job-1", "rank": rank, "world_size": 2, "host": host, "pid": 1,
        "state": state, "beat": int(beat - started), "beat_at": beat, "started_at": started,
        "holding": [[7, 1]] if state == "working" else [], "rows": rows, "ok": rows - failed, "failed": failed,
        "exit_code": None if state in ("working", "waiting") else 0})
    lock = root / ".svd-batch" / "members" / f"{name}.lock"
    lock.touch()
    if hold:  # the member's process holds its lock while it lives (another open file: flock conflicts with it)
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    return None


def records(root, rows):
    """rows: (rank, started, finished) -> a records file with one row each."""
    table = pa.Table.from_pylist([
        {"id": f"x{i}", "status": "ok", "rank": r, "host": HOST, "total_seconds": f - s,
         "started_at": dt.datetime.fromtimestamp(s, dt.timezone.utc), "finished_at": dt.datetime.fromtimestamp(f, dt.timezone.utc)}
        for i, (r, s, f) in enumerate(rows)], schema=RESULT_SCHEMA)
    pq.write_table(table, root / ".svd-batch" / "records.parquet")


@pytest.fixture()
def resumed_run(tmp_path):
    """An earlier launch (an hour ago: 100 rows in 10 minutes) and the current one (2 ranks, 30 rows in 5 minutes,
    12 s a row), of a job of 200 rows."""
    root = tmp_path / "run"
    (root / ".svd-batch").mkdir(parents=True)
    old_start, start = NOW - 3600 - 600, NOW - 300
    write_json(root / ".svd-batch" / "job.json", {"job": "job-1", "started_at": old_start, "total": 200, "todo": 100,
                                                  "state": "active"})
    for r in (0, 1):
        member(root, "L1", r, state="done", started=old_start, beat=old_start + 600, rows=50)
    rows = [(r, old_start + 12 * k, old_start + 12 * (k + 1)) for r in (0, 1) for k in range(50)]
    rows += [(r, start + 20 * k, start + 20 * (k + 1)) for r in (0, 1) for k in range(15)]
    records(root, rows)
    return root, start


def test_running_rate_and_eta_are_the_current_run_s(resumed_run):
    root, start = resumed_run
    fds = [member(root, "L2", r, state="working", started=start, beat=NOW - 1, rows=15, hold=True) for r in (0, 1)]
    try:
        st = collect(str(root), now=dt.datetime.fromtimestamp(NOW, dt.timezone.utc))
    finally:
        for fd in fds:
            os.close(fd)
    assert st["state"] == "running" and st["total"] == 200 and st["done"] == 130 and st["todo"] == 70
    # 30 rows in the 5 minutes of this run: 6 rows/min (over both runs and the gap it would be 130 in 75 minutes)
    assert st["run_rows"] == 30 and abs(st["rows_per_minute"] - 6.0) < 1e-6
    assert abs(st["eta_seconds"] - 70 / 6.0 * 60) < 1e-6
    assert [(m["rank"], m["state"], m["rows"], m["holding"]) for m in st["members"]] == [(0, "working", 15, 1),
                                                                                          (1, "working", 15, 1)]
    text = render(st)
    assert "state: running" in text and "rate (this run: 30 rows): 6.0 rows/min, ETA 11m40s" in text


def test_rows_recorded_before_the_members_next_heartbeat_count_in_the_rate(resumed_run):
    """Records are durable before the member's file says so (its counts go out with its next heartbeat): a
    snapshot in between still has the current run's rows, a rate and an ETA (CI caught one with none)."""
    root, start = resumed_run
    fds = [member(root, "L2", r, state="working", started=start, beat=NOW - 1, rows=0, hold=True) for r in (0, 1)]
    try:
        st = collect(str(root), now=dt.datetime.fromtimestamp(NOW, dt.timezone.utc))
    finally:
        for fd in fds:
            os.close(fd)
    assert st["state"] == "running" and st["run_rows"] == 30 and abs(st["rows_per_minute"] - 6.0) < 1e-6
    assert st["eta_seconds"] is not None and st["eta_seconds"] > 0


def test_a_run_whose_members_are_gone_is_stopped_with_no_eta(resumed_run):
    root, start = resumed_run
    # Killed: their files still say "working", but nobody holds their locks any more.
    for r in (0, 1):
        member(root, "L2", r, state="working", started=start, beat=NOW - 1, rows=15)
    st = collect(str(root), now=dt.datetime.fromtimestamp(NOW + 60, dt.timezone.utc))
    assert st["state"] == "stopped" and st["eta_seconds"] is None and st["todo"] == 70
    assert {m["state"] for m in st["members"]} == {"lost"}
    assert abs(st["rows_per_minute"] - 30 / ((NOW - 1 - start) / 60)) < 1e-6  # the last run's, up to its last beat
    text = render(st)
    assert "state: stopped" in text and "run the same command again to do the 70 rows left" in text
    assert "ETA" not in text and "STALLED" not in text and "lost:" in text


def test_members_whose_lock_cannot_be_probed_are_judged_by_their_beat_moving_on_status_s_clock(resumed_run):
    """As the run decides (ledger.Peers): never from another node's wall clock (``beat_at``), but from whether
    the heartbeat counter moves, watched on this process's own clock."""
    root, start = resumed_run
    members = root / ".svd-batch" / "members"
    for r in (0, 1):
        member(root, "L2", r, state="waiting", started=start, beat=NOW - 2, rows=15, host="gpu-node-7")
        (members / f"L2-r{r:05d}.lock").unlink()  # its lock is not visible from here (a store without locks)
    clock = [100.0]

    def sleep(seconds):  # rank 0 beats while status watches; rank 1 is silent
        clock[0] += seconds
        path = members / "L2-r00000.json"
        d = json.loads(path.read_text())
        path.write_text(json.dumps({**d, "beat": d["beat"] + 1}))

    far = dt.datetime.fromtimestamp(NOW + 86400, dt.timezone.utc)  # a wall clock a day ahead changes nothing
    st = collect(str(root), now=far, clock=lambda: clock[0], sleep=sleep)
    assert st["state"] == "running" and [m["state"] for m in st["members"]] == ["waiting", "lost"]
    assert 5.0 <= clock[0] - 100.0 <= 6.0  # watched two heartbeats (2 s each) and a second, not the lease
    clock[0] = 0.0
    quiet = collect(str(root), now=dt.datetime.fromtimestamp(NOW, dt.timezone.utc), clock=lambda: clock[0],
                    sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    assert quiet["state"] == "stopped" and {m["state"] for m in quiet["members"]} == {"lost"}


def test_a_hung_member_is_flagged_stalled(resumed_run):
    root, start = resumed_run
    fds = [member(root, "L2", r, state="working", started=start, beat=NOW + 600, rows=15, hold=True) for r in (0, 1)]
    try:
        st = collect(str(root), now=dt.datetime.fromtimestamp(NOW + 600, dt.timezone.utc))  # no row for 10 minutes
    finally:
        for fd in fds:
            os.close(fd)
    assert st["state"] == "running" and all(m["stalled"] for m in st["members"]) and "STALLED" in render(st)


def test_a_complete_job_is_finished(resumed_run):
    root, start = resumed_run
    write_json(root / ".svd-batch" / "job.json", {"job": "job-1", "started_at": start, "total": 130, "todo": 0,
                                                  "state": "complete"})
    for r in (0, 1):
        member(root, "L2", r, state="done", started=start, beat=NOW, rows=15)
    st = collect(str(root), now=dt.datetime.fromtimestamp(NOW + 3600, dt.timezone.utc))
    assert st["state"] == "finished" and st["todo"] == 0 and st["eta_seconds"] is None
    assert abs(st["rows_per_minute"] - 6.0) < 1e-6 and "state: finished" in render(st)
