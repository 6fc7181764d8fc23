"""svd-batch-status beside a real 2-process run: live figures per rank, read-only, stall flag, ETA."""

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

from tests.conftest import REPO, SAMPLE, launch, write_manifest

N_ROWS = 12


def status(out, *flags) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "svd_batch.status", str(out), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def snapshot(root) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs}


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
    assert s["total"] == N_ROWS and s["todo"] == N_ROWS - s["done"] and not s["finished"]
    assert s["rows_per_minute"] > 0 and s["eta_seconds"] is not None and s["eta_seconds"] > 0
    assert all(r["host"] and r["last_activity"] and not r["stalled"] for r in s["ranks"])
    assert {r["rank"] for s in live for r in s["ranks"]} == {0, 1}  # both ranks seen while they worked
    assert [x["done"] for x in live] == sorted(x["done"] for x in live)  # never goes backwards

    # After the run: all done, finished, and a status call changes nothing in the folder.
    before = snapshot(out)
    st = status(out)
    assert st.returncode == 0, st.stderr
    assert f"rows: {N_ROWS} of {N_ROWS} done ({N_ROWS} ok, 0 failed), 0 to do" in st.stdout
    assert "STALLED" not in st.stdout and "finished" in st.stdout
    assert snapshot(out) == before

    # A run that stopped without finishing: ranks silent for much longer than a row takes are flagged.
    from svd_batch.status import collect, render

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    os.unlink(copy / "results.parquet")
    last = max(dt.datetime.fromisoformat(r["last_activity"]) for r in collect(str(copy))["ranks"])
    assert not any(r["stalled"] for r in collect(str(copy), now=last + dt.timedelta(seconds=1))["ranks"])
    late = collect(str(copy), now=last + dt.timedelta(hours=1))
    assert all(r["stalled"] for r in late["ranks"]) and "STALLED" in render(late)


def test_status_of_a_folder_that_is_not_a_run(tmp_path):
    st = status(tmp_path)
    assert st.returncode == 2 and "not an svd-batch output folder" in st.stderr
