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

from svd_batch.ledger import Claims, JobDir, Member, Peers, Ticket, member_gone, takeover_candidates
from tests.conftest import (REPO, SAMPLE, cli_args, free_port, launch, part_records, read_results, run_cli,
                            start_cli, tmp_files, write_manifest)

N_ROWS = 10
# Short lease and heartbeat so that "lost" is seconds, not minutes.
FAST = ["runtime.lease_seconds=4", "runtime.heartbeat_seconds=0.5", "report.enabled=false"]


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


# -- the ledger, in one process ----------------------------------------------------------------------------------
def test_each_unit_is_claimed_once_by_racing_processes(tmp_path):
    jobdir = JobDir(str(tmp_path), "j")
    jobdir.create([0, 1, 2], [0, 1, 2, 3])
    code = ("import sys; from svd_batch.ledger import Claims, JobDir, Ticket\n"
            "c = Claims(JobDir(sys.argv[1], 'j'), sys.argv[2], sys.argv[1])\n"
            "print(' '.join(str(u) for u in range(300) if c.take(Ticket(u))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"m{k}"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for k in range(4)]
    won = [list(map(int, p.communicate()[0].split())) for p in procs]
    assert sorted(u for w in won for u in w) == list(range(300))  # each unit once, none lost
    claims = Claims(jobdir, "x", str(tmp_path))
    for k, w in enumerate(won):
        assert all(claims.holder(Ticket(u)) == f"m{k}" for u in w)  # a claim names its holder


def test_a_claim_names_its_holder_without_hard_links_and_past_the_link_limit(tmp_path, monkeypatch):
    import errno

    jobdir = JobDir(str(tmp_path), "j")
    jobdir.create([0], [0, 1])
    c = Claims(jobdir, "me", str(tmp_path))
    real = os.link
    calls = []

    def link(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EMLINK, "too many links")
        if len(calls) == 4:
            raise OSError(errno.EPERM, "no hard links here")
        return real(src, dst)

    monkeypatch.setattr(os, "link", link)
    assert c.take(Ticket(0)) and c.take(Ticket(1)) and c.take(Ticket(2)) and c.take(Ticket(3))
    assert calls[2] != calls[0]  # a new token after EMLINK
    assert not c.take(Ticket(3)) and not c.take(Ticket(1))
    assert [c.holder(Ticket(u)) for u in range(4)] == ["me"] * 4
    assert c.take(Ticket(3, 1)) and c.superseded(Ticket(3)) and c.latest(3) == Ticket(3, 1)


def test_the_heartbeat_survives_write_errors(tmp_path, monkeypatch):
    import svd_batch.ledger as ledger

    said = []
    m = Member(str(tmp_path), "m", launch="l", job="j", rank=0, local_rank=0, world_size=1, heartbeat_seconds=0.05,
               log=said.append)
    m.start()
    real = ledger.write_text_atomic
    failures = [0]

    def flaky(text, path, durable=True):
        if failures[0] < 5:
            failures[0] += 1
            raise OSError(5, "Input/output error")
        return real(text, path, durable=durable)

    monkeypatch.setattr(ledger, "write_text_atomic", flaky)
    before = json.loads((tmp_path / "m.json").read_text())["beat"]
    wait_until(lambda: json.loads((tmp_path / "m.json").read_text())["beat"] > before + 3, "beats after the errors",
               timeout=20)
    m.close(0)
    assert failures[0] == 5 and len(said) == 2 and "retrying" in said[0] and "writable again" in said[1]


def test_a_paused_member_is_lost_only_after_the_lease_and_a_dead_one_at_once(tmp_path):
    code = ("import sys, time; from svd_batch.ledger import Member\n"
            "m = Member(sys.argv[1], sys.argv[2], launch='l', job='j', rank=0, local_rank=0, world_size=1,"
            " heartbeat_seconds=0.1)\n"
            "m.start(); m.hold(__import__('svd_batch.ledger').ledger.Ticket(7)); print('up', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "other"], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        peers = Peers(str(tmp_path), "j", "me", lease=2.0)
        assert [d["lost"] for d in peers.poll()] == [False]
        os.kill(p.pid, signal.SIGSTOP)  # paused: holds its lock, stops beating
        t = time.monotonic()
        while not peers.poll()[0]["lost"]:
            assert time.monotonic() - t < 15
            time.sleep(0.1)
        assert time.monotonic() - t >= 1.5  # not before the lease (on this process's own clock)
        assert not member_gone(str(tmp_path), "other")
        jobdir = JobDir(str(tmp_path), "j")
        jobdir.create([0] * 8, list(range(9)))
        c = Claims(jobdir, "other", str(tmp_path))
        assert c.take(Ticket(7))
        assert [(t.unit, why) for t, _, why in takeover_candidates(peers.poll(), c, 8)] == [(7, "lost")]
        os.kill(p.pid, signal.SIGCONT)
        wait_until(lambda: not peers.poll()[0]["lost"], "the heartbeat to move again", timeout=10)
        p.kill()
        p.wait()
        assert member_gone(str(tmp_path), "other")
        fresh = Peers(str(tmp_path), "j", "me", lease=3600)  # a newcomer with a long lease: the lock decides
        assert fresh.poll()[0]["lost"]
    finally:
        p.kill()


# -- real launches -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("node,long", [(1, False), (1, True), (0, True), (0, False)])
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
        time.sleep(1.5)  # well inside the 4 s lease
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


def test_the_store_host_going_away_cuts_no_rank_short(manifest, reference, tmp_path):
    """Node 0's launcher hosts the store torchrun's agents use. Node 0 runs out of units while node 1 is on long
    ones; then node 0's launcher is killed (its exit barrier giving up looks the same to node 1). Node 1 finishes
    every unit it has and writes the results; nothing it needs lived in the store."""
    out = tmp_path / "out"
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", *FAST, env={"SVD_BATCH_INJECT_SLOW": "1:12"})
    wait_until(lambda: {m["rank"]: m["state"] for m in members(out)} == {0: "waiting", 1: "working"},
               "node 0 to wait while node 1 works", procs=nodes)
    worker0 = next(m["pid"] for m in members(out) if m["rank"] == 0)
    os.kill(nodes[0].pid, signal.SIGKILL)  # the launcher (agent and store), not its worker
    log1 = nodes[1].communicate(timeout=300)[0]
    nodes[0].wait()
    assert nodes[1].returncode == 0, log1
    no_teardown(log1)
    wait_until(lambda: not os.path.exists(f"/proc/{worker0}"), "node 0's worker to finish", timeout=120)
    assert [m["exit_code"] for m in members(out)] == [0, 0]
    exactly_once(out, reference)


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


def test_sigterm_gives_back_a_unit_that_would_outlast_the_grace_period(manifest, reference, tmp_path):
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    a = start_cli(*common, "runtime.grace_seconds=1", env={"SVD_BATCH_INJECT_SLOW": "0:30"})
    m = wait_until(lambda: holding(out, launch_of=a.pid), "A at work", procs=[a])
    b = start_cli(*common)
    wait_until(lambda: holding(out, launch_of=b.pid) or any(x["pid"] == b.pid and x["state"] == "waiting"
                                                            for x in members(out)), "B at work", procs=[a, b])
    a.send_signal(signal.SIGTERM)
    sent = time.time()
    log = a.communicate(timeout=60)[0]
    assert time.time() - sent < 20, "A waited past its grace period"
    assert a.returncode == 128 + signal.SIGTERM, log
    me = next(x for x in members(out) if x["pid"] == a.pid)
    assert me["state"] == "stopped" and [u for u, _ in me["released"]] == [u for u, _ in m["holding"]]
    b_log = b.communicate(timeout=300)[0]
    assert b.returncode == 0, b_log
    assert "took over unit" in b_log and "(stopped)" in b_log
    exactly_once(out, reference)


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


@pytest.mark.parametrize("lock_lost", [False, True])
def test_a_merge_paused_half_way_never_puts_back_older_records(manifest, reference, tmp_path, lock_lost):
    """A stops itself half-way through its final merge (its temporary records file written, the merge lock held).
    A second launch then waits for the lock, and says so when it gives up. Or, as if a file server had revoked
    the paused process's lock, another process merges anyway, with a record A never read: A, resumed, sees
    records.parquet replaced and merges again on top instead of putting back the older table."""
    from svd_batch.rundir import PartWriter, RunDir

    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    a = start_cli(*common, env={"SVD_BATCH_INJECT_PAUSE": "merge"})
    wait_until(lambda: (out / ".svd-batch").is_dir() and any(p.name.startswith("records.parquet.tmp-")
                                                            for p in (out / ".svd-batch").iterdir()),
               "A inside its merge", procs=[a])
    wait_until(lambda: open(f"/proc/{a.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T", "A stopped")
    if lock_lost:
        PartWriter(RunDir(str(out)), member="late-r00000").add({"id": "late", "status": "ok"})
        subprocess.run([sys.executable, "-c", f"from svd_batch.rundir import RunDir; RunDir({str(out)!r}).merge()"],
                       cwd=REPO, check=True)
    else:
        b = run_cli(*common)
        assert b.returncode == 3 and "merge lock" in b.stderr, b.stderr
    os.kill(a.pid, signal.SIGCONT)
    a_log = a.communicate(timeout=300)[0]
    assert a.returncode == 0, a_log
    exactly_once(out, reference)
    records = RunDir(str(out)).read_records()["id"].to_pylist()
    assert ("late" in records) == lock_lost and len(records) == len(set(records))


def test_ctrl_c_under_accelerate_ends_with_one_resume_line(manifest, tmp_path):
    out = tmp_path / "out"
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}", *FAST, background=True,
                  env={"SVD_BATCH_INJECT_SLOW": "0:2,1:2"})
    wait_until(lambda: (out / ".svd-batch" / "parts").is_dir() and part_records(out).num_rows >= 1, "a first row",
               procs=[proc])
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends to the launcher
    log = proc.communicate(timeout=120)[0]
    lines = [x for x in log.splitlines() if x.strip()]
    assert lines[-1].startswith("svd-batch: interrupted by SIGINT") and "Run the same command again" in lines[-1]
    assert log.count("interrupted by SIGINT") == 1, log
    again = run_cli(f"manifest.path={manifest}", f"output.dir={out}", *FAST)
    assert again.returncode == 0, again.stderr
