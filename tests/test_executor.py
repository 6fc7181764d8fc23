"""The run folder decides (issue 16): leases, takeovers, one merge at a time, any number of launches on one
folder, preemption. The process tests run real launches on localhost ("nodes" are `accelerate launch
--num_machines 2` on 127.0.0.1) and each ends with every row recorded exactly once, all ok, frames equal to a
single-process run, and no working rank SIGTERMed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (REPO, SAMPLE, cli_args, free_port, launch, part_records, read_results, record,
                            run_cli, start_cli, tmp_files, write_manifest)

N_ROWS = 10
# A lease of seconds, not minutes, yet 24 heartbeats long: on a loaded 2-core machine running four torch
# processes a live rank's heartbeat thread can be starved for seconds, and must not be taken for a lost rank. The
# rules' timing (nothing taken over before the lease, on the observer's clock) is tested in milliseconds with a
# fake clock in test_rules.py; these tests wait on states, and only a pause meant to outlast the lease waits it.
FAST = ["runtime.lease_seconds=12", "runtime.heartbeat_seconds=0.5", "report.enabled=false"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("exec")
    rows = [{"id": f"r{i:02d}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg")), "num_frames": 6,
             "motion_bucket_id": 10 * i} for i in range(N_ROWS)]
    return write_manifest(d / "m.parquet", rows)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = run_cli(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    return dict(zip(t["id"].to_pylist(), t["frames_sha256"].to_pylist()))


def exactly_once(out: Path, reference: dict) -> None:
    t = read_results(out)
    ids = t["id"].to_pylist()
    assert ids == sorted(set(ids)) and len(ids) == len(reference), "every row exactly once"
    assert set(t["status"].to_pylist()) == {"ok"}
    assert dict(zip(ids, t["frames_sha256"].to_pylist())) == reference
    assert not tmp_files(out / "videos")


def members(out: Path) -> list[dict]:
    d = out / ".svd-batch" / "members"
    found = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return found


def wait_until(pred, what: str, timeout: float = 240.0, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"a process ended (exit {p.returncode}) before {what}:\n{p.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def holding(out: Path, rank: int | None = None, launch_of: int | None = None):
    """A member (of a rank, or with a given pid) that is working on a unit right now."""
    for m in members(out):
        if m["state"] == "working" and m["holding"] and m.get("exit_code") is None \
                and (rank is None or m["rank"] == rank) and (launch_of is None or m["pid"] == launch_of):
            return m
    return None


def takeovers(out: Path) -> list[str]:
    return [p.name for p in (out / ".svd-batch" / "jobs").glob("*/claims/*.g*")]


def two_nodes(*overrides, env=None, node_env=None):
    port = str(free_port())
    return [
        launch(*overrides, num_processes=2, background=True, env={**(env or {}), **((node_env or {}).get(r, {}))},
               extra=("--num_machines", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", port))
        for r in (0, 1)
    ]


def no_teardown(log: str) -> None:
    assert "closing signal SIGTERM" not in log and "exitcode: -15" not in log, log


# -- real launches -----------------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("node,long", [(1, False), (1, True), (0, True)])
def test_a_paused_rank_loses_nothing_and_duplicates_nothing(manifest, reference, tmp_path, node, long):
    """SIGSTOP one node's worker while it holds a unit: shorter than the lease nothing is taken over; longer,
    the other node takes the unit over, and the paused worker, once resumed, drops its late result."""
    out = tmp_path / "out"
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", *FAST,
                      env={"SVD_BATCH_INJECT_SLOW": "0:1,1:1"})
    m = wait_until(lambda: holding(out, rank=node), f"rank {node} to hold a unit", procs=nodes)
    os.kill(m["pid"], signal.SIGSTOP)
    if long:
        wait_until(lambda: takeovers(out), "the other rank to take the unit over", procs=nodes)
        time.sleep(1.0)
    else:
        time.sleep(1.5)  # well inside the 12 s lease
    os.kill(m["pid"], signal.SIGCONT)
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    for log in logs:
        no_teardown(log)
    exactly_once(out, reference)
    if long:
        assert "took over unit" in logs[1 - node]
    else:
        assert takeovers(out) == []


@pytest.mark.distributed
def test_the_store_host_going_away_cuts_no_rank_short(manifest, reference, tmp_path):
    """Node 0's launcher hosts the store torchrun's agents use. One node runs out of units while the other is on
    long ones; then node 0's launcher is killed (its exit barrier giving up looks the same to node 1). Every rank
    finishes every unit it has and the results are written; nothing a rank needs lived in the store."""
    out = tmp_path / "out"
    # Node 1's units take 41x their compute, so node 1 is usually the one still working; but which node claims
    # first is the loaded machine's choice (CI once saw the other order), so the test waits for either state.
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", *FAST,
                      env={"SVD_BATCH_INJECT_SLOW": "0:1,1:40"})
    wait_until(lambda: sorted(m["state"] for m in members(out)) == ["waiting", "working"],
               "one node to wait while the other works", procs=nodes)
    worker0 = next(m["pid"] for m in members(out) if m["rank"] == 0)
    os.kill(nodes[0].pid, signal.SIGKILL)  # the launcher (agent and store), not its worker
    log1 = nodes[1].communicate(timeout=300)[0]
    nodes[0].wait()
    assert nodes[1].returncode == 0, log1
    no_teardown(log1)
    wait_until(lambda: not os.path.exists(f"/proc/{worker0}"), "node 0's worker to finish", timeout=120)
    assert [m["exit_code"] for m in members(out)] == [0, 0]
    exactly_once(out, reference)


@pytest.mark.distributed
def test_a_hung_store_blocks_no_rank(manifest, reference, tmp_path):
    out = tmp_path / "out"
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", *FAST, env={"SVD_BATCH_INJECT_SLOW": "0:1,1:1"})
    wait_until(lambda: holding(out, 0) and holding(out, 1), "both ranks at work", procs=nodes)
    os.kill(nodes[0].pid, signal.SIGSTOP)  # the store's host stops answering (not dead: its socket stays open)
    try:
        # The whole job completes while the store is hung.
        wait_until(lambda: (out / "results.parquet").exists() and read_results(out).num_rows == N_ROWS,
                   "the results while the store is hung", timeout=300)
    finally:
        os.kill(nodes[0].pid, signal.SIGCONT)
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    exactly_once(out, reference)


@pytest.mark.distributed
def test_independent_launches_share_a_folder_and_finish_a_killed_ones_units(manifest, reference, tmp_path):
    """Three launches on one folder: A, then B a moment later, then C (two processes) joining late. A is killed
    while it holds a unit; B and C take it over at once (A's lock is free) and finish the job."""
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    log_a, log_b = open(tmp_path / "a.log", "w+"), open(tmp_path / "b.log", "w+")
    a = start_cli(*common, log=log_a, env={"SVD_BATCH_INJECT_SLOW": "0:2"})
    wait_until(lambda: (out / ".svd-batch" / "parts").is_dir() and part_records(out).num_rows >= 1, "A's first row",
               procs=[a])
    b = start_cli(*common, log=log_b, env={"SVD_BATCH_INJECT_SLOW": "0:2"})
    wait_until(lambda: holding(out, launch_of=b.pid), "B to claim a unit", procs=[a, b])
    c = launch(*common, background=True)
    wait_until(lambda: sum(1 for m in members(out) if m["world_size"] == 2) == 2 and holding(out, launch_of=a.pid),
               "C to join and A to hold a unit", procs=[a, b, c])
    a.kill()
    killed = time.time()
    a.wait()
    c_log = c.communicate(timeout=300)[0]
    b.wait(timeout=300)
    log_b.seek(0)
    b_log = log_b.read()
    assert b.returncode == 0 and c.returncode == 0, b_log + c_log
    assert "took over unit" in b_log + c_log
    assert "joined job" in b_log and "joined job" in c_log
    no_teardown(c_log)
    exactly_once(out, reference)
    print(f"kill -> results {time.time() - killed:.1f} s")


@pytest.mark.distributed
def test_a_launch_with_other_video_settings_cannot_join_before_the_first_row(manifest, tmp_path):
    """SLURM array tasks start together: the second launch comes while the first has planned the job and holds
    its first unit, nothing recorded yet (the window held open by a slow first unit). It must be refused
    naming the key, not make its share of the videos at crf 30."""
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    a = start_cli(*common, env={"SVD_BATCH_INJECT_SLOW": "0:200"})
    try:
        wait_until(lambda: (out / ".svd-batch" / "job.json").exists() and holding(out, launch_of=a.pid)
                   and part_records(out).num_rows == 0, "A's plan and first unit, nothing recorded", procs=[a])
        b = run_cli(*common, "video.crf=30", timeout=300)
    finally:
        a.kill()
        a.wait()
    assert b.returncode == 2, b.stderr
    assert "video.crf: the job has 18, this launch 30" in b.stderr and "joined job" not in b.stderr
    assert not list(out.glob("videos/*.mp4")) and part_records(out).num_rows == 0


@pytest.mark.distributed
def test_sigterm_finishes_the_unit_in_hand_within_the_grace_period(manifest, reference, tmp_path):
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    a = start_cli(*common, "runtime.grace_seconds=120", env={"SVD_BATCH_INJECT_SLOW": "0:4"})
    wait_until(lambda: (out / ".svd-batch" / "parts").is_dir() and part_records(out).num_rows >= 1
               and holding(out, launch_of=a.pid), "A at work", procs=[a])
    before = part_records(out).num_rows
    a.send_signal(signal.SIGTERM)
    log = a.communicate(timeout=120)[0]
    assert a.returncode == 128 + signal.SIGTERM, log
    assert log.rstrip().splitlines()[-1].startswith("svd-batch: interrupted by SIGTERM")
    assert "Run the same command again to resume" in log.rstrip().splitlines()[-1]
    assert part_records(out).num_rows == before + 1  # the unit in hand was finished, not thrown away
    me = next(m for m in members(out) if m["pid"] == a.pid)
    assert me["state"] == "stopped" and me["released"] == [] and me["holding"] == []
    again = run_cli(*common)
    assert again.returncode == 0, again.stderr
    exactly_once(out, reference)


@pytest.mark.distributed
def test_sigterm_gives_back_a_unit_that_would_outlast_the_grace_period(manifest, reference, tmp_path):
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    # The unit in hand has 300x its compute left (minutes on this machine): a stop within a minute gave it back.
    a = start_cli(*common, "runtime.grace_seconds=1", env={"SVD_BATCH_INJECT_SLOW": "0:300"})
    m = wait_until(lambda: holding(out, launch_of=a.pid), "A at work", procs=[a])
    b = start_cli(*common)
    wait_until(lambda: holding(out, launch_of=b.pid) or any(x["pid"] == b.pid and x["state"] == "waiting"
                                                            for x in members(out)), "B at work", procs=[a, b])
    a.send_signal(signal.SIGTERM)
    sent = time.time()
    log = a.communicate(timeout=60)[0]
    assert time.time() - sent < 60, "A waited past its grace period"
    assert a.returncode == 128 + signal.SIGTERM, log
    me = next(x for x in members(out) if x["pid"] == a.pid)
    assert me["state"] == "stopped" and [u for u, _ in me["released"]] == [u for u, _ in m["holding"]]
    b_log = b.communicate(timeout=300)[0]
    assert b.returncode == 0, b_log
    assert "took over unit" in b_log and "(stopped)" in b_log
    exactly_once(out, reference)


@pytest.mark.distributed
def test_two_ranks_on_a_full_disk_exit_without_signalling_each_other(tmp_path, small_fs):
    rows = [{"id": f"d{i}", "image": str(SAMPLE / "cat.jpg"), "num_frames": 8} for i in range(14)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = small_fs / "out"
    filler = small_fs / "other-data"
    filler.write_bytes(b"\0" * (200 * 1024))
    proc = launch(f"manifest.path={m}", f"output.dir={out}", *FAST)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "exitcode: 4" in log, log  # one rank reports 4, after the other left
    no_teardown(log)
    assert "cannot take more files" in log
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_fs)], check=True)
    again = launch(f"manifest.path={m}", f"output.dir={out}", *FAST)
    assert again.returncode == 0, again.stdout + again.stderr
    t = read_results(out)
    assert t.num_rows == 14 and set(t["status"].to_pylist()) == {"ok"}


@pytest.mark.distributed
def test_torchrun_max_restarts_after_a_killed_worker(manifest, reference, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--max-restarts", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
            *cli_args(f"manifest.path={manifest}", f"output.dir={out}", *FAST)]
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                 "SVD_BATCH_INJECT_SLOW": "0:1,1:1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    m = wait_until(lambda: (out / ".svd-batch" / "parts").is_dir() and part_records(out).num_rows >= 2
                   and holding(out, rank=1), "rank 1 at work", procs=[proc])
    os.kill(m["pid"], signal.SIGKILL)
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, log
    # torchrun stopped the surviving worker (it finished or gave back its unit) and started both again; the
    # new workers found no member alive, so they planned what was left from the records.
    assert "interrupted by SIGTERM" in log and "exitcode: -9" in log
    assert f"{N_ROWS} ok, 0 failed of {N_ROWS} rows" in log
    exactly_once(out, reference)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["wait", "lock_lost", "sigterm"])
def test_a_merge_paused_half_way_never_puts_back_older_records(manifest, reference, tmp_path, case):
    """A stops itself half-way through its final merge (its temporary records file written, the merge lock held).
    A second launch then waits for the lock, and when it gives up says that every row is recorded, only not
    merged; or it gets SIGTERM while waiting (Kubernetes' 30 s grace, shorter than the lease) and stops at once,
    exiting as interrupted. Or, as if a file server had revoked the paused process's lock, another process merges
    anyway, with a record A never read: A, resumed, sees records.parquet replaced and merges again on top
    instead of putting back the older table."""
    from svd_batch.rundir import PartWriter, RunDir

    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    a = start_cli(*common, env={"SVD_BATCH_INJECT_PAUSE": "merge"})
    wait_until(lambda: (out / ".svd-batch").is_dir() and any(p.name.startswith("records.parquet.tmp-")
                                                            for p in (out / ".svd-batch").iterdir()),
               "A inside its merge", procs=[a])
    wait_until(lambda: open(f"/proc/{a.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", "A stopped")
    if case == "lock_lost":
        PartWriter(RunDir(str(out)), member="late-r00000").add(record(id="late", status="ok"))
        subprocess.run([sys.executable, "-c", f"from svd_batch.rundir import RunDir; RunDir({str(out)!r}).merge()"],
                       cwd=REPO, check=True)
    elif case == "wait":
        b = run_cli(*common)
        assert b.returncode == 3 and "merge lock" in b.stderr, b.stderr
        assert f"{N_ROWS} ok, 0 failed of {N_ROWS} rows" in b.stderr and "not done" not in b.stderr, b.stderr
        assert "recorded" in b.stderr and "not yet merged" in b.stderr
    else:
        b = start_cli(*common, "runtime.lease_seconds=120")
        wait_until(lambda: any(m["pid"] == b.pid and m["state"] == "done" for m in members(out)),
                   "B done, waiting for the merge lock", procs=[b])
        b.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        b_log = b.communicate(timeout=150)[0]
        waited = time.monotonic() - sent
        assert b.returncode == 128 + signal.SIGTERM and waited < 10, (waited, b_log)
        assert b_log.rstrip().splitlines()[-1].startswith("svd-batch: interrupted by SIGTERM"), b_log
        print(f"SIGTERM during the merge-lock wait -> exit {waited:.1f} s")
    os.kill(a.pid, signal.SIGCONT)
    a_log = a.communicate(timeout=300)[0]
    assert a.returncode == 0, a_log
    exactly_once(out, reference)
    records = RunDir(str(out)).read_records()["id"].to_pylist()
    assert ("late" in records) == (case == "lock_lost") and len(records) == len(set(records))


@pytest.mark.distributed
def test_ctrl_c_under_accelerate_ends_with_one_resume_line(manifest, tmp_path):
    out = tmp_path / "out"
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}", *FAST, background=True,
                  env={"SVD_BATCH_INJECT_SLOW": "0:2,1:2"})
    wait_until(lambda: (out / ".svd-batch" / "parts").is_dir() and part_records(out).num_rows >= 1, "a first row",
               procs=[proc])
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the launcher
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGINT, log  # README, Preemption recipes: Ctrl-C
    lines = [x for x in log.splitlines() if x.strip()]
    assert lines[-1].startswith("svd-batch: interrupted by SIGINT") and "Run the same command again" in lines[-1]
    assert log.count("interrupted by SIGINT") == 1, log
    failed = [(r["id"], r["error"]) for r in part_records(out).to_pylist() if r["status"] != "ok"]
    assert not failed, (failed, log)  # an interrupted row is given back, never recorded failed
    again = run_cli(f"manifest.path={manifest}", f"output.dir={out}", *FAST)
    assert again.returncode == 0, again.stderr
