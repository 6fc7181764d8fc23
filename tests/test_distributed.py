"""Real multi-process runs: `accelerate launch` on CPU (gloo), one host standing in for many GPUs and nodes."""

import os
import signal

import pytest

from tests.conftest import (
    free_port, launch, part_records, read_results, run_cli, start_cli, tmp_files, wait_for_records,
    write_manifest,
)

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
    assert not tmp_files(out) and len(os.listdir(out / "videos")) == N_ROWS


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
        assert (out / "videos" / f"{row_id}.mp4").stat().st_size > 0
    again = run_cli(f"manifest.path={manifest}", f"output.dir={out}")
    assert again.returncode == 0, again.stderr
    assert hashes(out) == reference and not tmp_files(out)
