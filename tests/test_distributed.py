"""Real multi-process runs: `accelerate launch` on CPU (gloo), one host standing in for many GPUs and nodes."""

import os
import signal

import pyarrow.compute as pc
import pytest

from tests.conftest import (
    descendants,
    free_port,
    launch,
    part_records,
    read_results,
    run_cli,
    start_cli,
    tmp_files,
    video_file,
    video_names,
    wait_for_records,
    write_manifest,
)

pytestmark = pytest.mark.distributed

N_ROWS = 10


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    from tests.conftest import SAMPLE

    # Mixed costs (frame counts) so that the cost-balanced split has something to balance.
    rows = [{"id": f"r{i:02d}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg")),
             "num_frames": 4 if i < N_ROWS // 2 else 8, "motion_bucket_id": 10 * i} for i in range(N_ROWS)]
    return write_manifest(d / "m.parquet", rows)


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """The uninterrupted single-process run every other run must match, hash for hash."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = run_cli(f"manifest.path={manifest}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    return dict(zip(t["id"].to_pylist(), t["frames_sha256"].to_pylist()))


def hashes(out):
    t = read_results(out)
    assert t["id"].to_pylist() == sorted(set(t["id"].to_pylist())), "every row exactly once, in manifest order"
    return dict(zip(t["id"].to_pylist(), t["frames_sha256"].to_pylist()))


def test_two_processes_match_one(manifest, reference, tmp_path):
    out = tmp_path / "out"
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashes(out) == reference
    t = read_results(out)
    assert set(t["rank"].to_pylist()) == {0, 1} and set(t["world_size"].to_pylist()) == {2}
    # One folder for all ranks, config saved once, summary printed once, no Hydra folders.
    assert sorted(p.name for p in out.iterdir()) == [".svd-batch", "config.yaml", "contact_sheet.png", "index.html",
                                                     "inputs", "report", "results.parquet", "stats", "videos"]
    assert sorted(p.name for p in (out / "stats").iterdir()) == ["rank-00000.json", "rank-00001.json"]
    assert (proc.stdout + proc.stderr).count(f"{N_ROWS} ok, 0 failed") == 1
    assert not tmp_files(out) and len(video_names(out)) == N_ROWS


def test_two_nodes_on_localhost(manifest, reference, tmp_path):
    out = tmp_path / "out"
    port = str(free_port())
    nodes = [
        launch(f"manifest.path={manifest}", f"output.dir={out}", num_processes=2, background=True,
               extra=("--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", port))
        for rank in (0, 1)
    ]
    logs = [p.communicate(timeout=600)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    assert hashes(out) == reference
    assert set(read_results(out)["rank"].to_pylist()) == {0, 1}


def test_sigkill_then_resume_on_two_processes(manifest, reference, tmp_path):
    out = tmp_path / "out"
    proc = start_cli(f"manifest.path={manifest}", f"output.dir={out}")
    done = wait_for_records(out, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done < N_ROWS
    before = part_records(out)
    # Resume with a different world size: 1 process -> 2 processes.
    again = launch(f"manifest.path={manifest}", f"output.dir={out}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{before.num_rows} done" in again.stdout + again.stderr
    assert hashes(out) == reference
    t = read_results(out)
    # Rows finished before the kill were not redone.
    finished_before = dict(zip(before["id"].to_pylist(), before["finished_at"].to_pylist()))
    for r in t.to_pylist():
        if r["id"] in finished_before:
            assert r["finished_at"] == finished_before[r["id"]] and r["world_size"] == 1
    assert not tmp_files(out) and not list((out / ".svd-batch" / "parts").iterdir())


def test_sigterm_on_two_processes_then_resume_on_one(manifest, reference, tmp_path):
    out = tmp_path / "out"
    # Overlap on: the writer thread must flush what the model already computed before the rank exits.
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}", "runtime.overlap=true", background=True)
    wait_for_records(out, 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler's preemption sends to the job
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "Run the same command again to resume" in log
    recorded = part_records(out)
    assert 0 < recorded.num_rows < N_ROWS and set(recorded["status"].to_pylist()) == {"ok"}
    for row_id in recorded["id"].to_pylist():  # each flushed record has its finished video
        assert video_file(out, row_id).stat().st_size > 0
    again = run_cli(f"manifest.path={manifest}", f"output.dir={out}")
    assert again.returncode == 0, again.stderr
    assert hashes(out) == reference and not tmp_files(out)


# -- the executor (issue 10): claims, no waiting on lost ranks, one clean exit ------------------------------

def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, found through /proc (they may sit in other sessions)."""
    tree = [pid, *descendants(pid)]
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def two_nodes(*overrides, env=None, node_env=None):
    """Two "nodes" on localhost, one process each, as `accelerate launch --num_machines 2` on each."""
    port = str(free_port())
    return [
        launch(*overrides, num_processes=2, background=True, env={**(env or {}), **((node_env or {}).get(r, {}))},
               extra=("--num_machines", "2", "--machine_rank", str(r), "--main_process_ip", "127.0.0.1",
                      "--main_process_port", port))
        for r in (0, 1)
    ]


def test_failed_rows_on_both_ranks_exit_1_with_results_and_no_teardown(tmp_path):
    from tests.conftest import SAMPLE

    rows = [{"id": f"f{i}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "missing.jpg")), "num_frames": 4}
            for i in range(8)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    # A static deal makes sure each rank gets failing rows (with claims it is likely, not certain).
    proc = launch(f"manifest.path={m}", f"output.dir={out}", "runtime.schedule=static", "report.enabled=false")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    t = read_results(out)
    assert t.num_rows == 8 and t.filter(pc.equal(t["status"], "failed")).num_rows == 4
    assert set(t.filter(pc.equal(t["status"], "failed"))["rank"].to_pylist()) == {0, 1}
    assert "SIGTERM" not in log and "exitcode: -15" not in log  # no rank was signalled by the launcher
    summary = log.index("4 ok, 4 failed of 8 rows")
    assert summary < log.index("ChildFailedError")  # our last words come before the launcher's report
    assert "retry_failed=true" in log[summary:log.index("ChildFailedError")]


def test_a_slow_rank_claims_fewer_rows(manifest, reference, tmp_path):
    out = tmp_path / "out"
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false",
                  env={"SVD_BATCH_INJECT_SLOW": "1:4"})  # rank 1 runs at a fifth of its speed
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashes(out) == reference  # the same frames whoever ran a row
    ranks = read_results(out)["rank"].to_pylist()
    assert ranks.count(1) < ranks.count(0), ranks


def test_a_lost_node_s_units_are_finished_by_the_survivor(manifest, reference, tmp_path):
    """A whole node is killed (launcher and worker) while its rank holds a unit: the survivor sees the rank's lock
    free at once, takes its units over and completes the run. (torchrun's agent on the surviving node then
    waits in its exit barrier for the lost node's agent, up to 300 s; its worker has long exited 0.)"""
    import json
    import time

    out = tmp_path / "out"
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false",
                      "runtime.lease_seconds=600", env={"SVD_BATCH_INJECT_SLOW": "0:1,1:3"})

    def member(rank):
        for p in (out / ".svd-batch" / "members").glob("*.json"):
            d = json.loads(p.read_text())
            if d["rank"] == rank:
                return d
        return None

    # Rank 1 is paused to look at it: killed only when it holds a unit (else it is let go and looked at again),
    # so there surely is a unit to take over; a look without the pause could see a unit it finishes meanwhile.
    deadline = time.time() + 300
    while True:
        assert time.time() < deadline, "rank 1 was never seen holding a unit"
        m = member(1) if (out / ".svd-batch" / "members").is_dir() else None
        if m is not None and m["exit_code"] is None:
            os.kill(m["pid"], signal.SIGSTOP)
            m = member(1)
            if m["holding"] and m["exit_code"] is None:
                break
            os.kill(m["pid"], signal.SIGCONT)
        time.sleep(0.05)
    kill_tree(nodes[1].pid)  # the whole node goes: launcher and worker (torchrun starts workers in sessions of their own)
    killed_at = time.time()
    nodes[1].wait()
    while member(0)["exit_code"] is None:  # no wall-clock bound: the lease is what a bound would race against
        assert time.time() - killed_at < 900, "the survivor did not finish the lost node's units"
        time.sleep(0.2)
    assert member(0)["exit_code"] == 0
    kill_tree(nodes[0].pid)  # its launcher waits in torchrun's exit barrier for the lost node's agent
    # Taken over because the lost rank's lock was free (at once), not because its 600 s lease ran out.
    assert "(lost: its lock is free)" in nodes[0].communicate(timeout=60)[0]
    assert hashes(out) == reference and not tmp_files(out / "videos")
    assert set(read_results(out)["status"].to_pylist()) == {"ok"}


def test_a_node_with_another_model_revision_stops_the_run_before_work(manifest, tmp_path, tiny_cache):
    import json
    import shutil

    other = tmp_path / "other-cache"
    shutil.copytree(tiny_cache, other)
    cfg_path = next(other.rglob("unet/config.json"))
    cfg = json.loads(cfg_path.read_text())
    cfg["_note"] = "another revision"  # still loads; a different checkpoint all the same
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    nodes = two_nodes(f"manifest.path={manifest}", f"output.dir={out}", node_env={1: {"SVD_BATCH_CACHE": str(other)}})
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [1, 1] and all("exitcode: 2" in x for x in logs), logs
    assert "rank 1 on host" in logs[0] and "another revision in this node's cache" in logs[0]
    assert not video_names(out) and not (out / "results.parquet").exists()


def test_a_broken_device_stops_its_rank_and_leaves_its_rows_to_others(manifest, reference, tmp_path):
    out = tmp_path / "out"
    # Whichever rank claims r03 meets a sticky CUDA error there (injected): that rank stops, the other one runs
    # every row still unclaimed, and r03 is left undone, not recorded failed.
    proc = launch(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false",
                  env={"SVD_BATCH_INJECT_DEVICE_ERROR": "r03"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "exitcode: 3" in log, log  # incomplete, not "rows failed"
    assert "stopped: device cpu on host" in log and "illegal memory access" in log
    assert "SIGTERM" not in log and "exitcode: -15" not in log
    t = read_results(out)
    assert "r03" not in t["id"].to_pylist() and t.num_rows == N_ROWS - 1
    assert set(t["status"].to_pylist()) == {"ok"}
    again = run_cli(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false")
    assert again.returncode == 0, again.stderr
    assert hashes(out) == reference
