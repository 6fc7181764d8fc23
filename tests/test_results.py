"""The closing summary a person reads at the end of a run."""

import pyarrow as pa
import pytest

from svd_batch.fields import RESULT_SCHEMA
from svd_batch.results import summary
from tests.conftest import run_cli, write_manifest


def results(statuses):
    return pa.Table.from_pylist([{"id": f"r{i}", "status": s} for i, s in enumerate(statuses)], schema=RESULT_SCHEMA)


def figures(rank, host, rows, failed=0):
    return {"rank": rank, "host": host, "rows": rows, "ok": rows - failed, "failed": failed,
            "model_load_seconds": 2.0 + rank, "warmup_seconds": 0.0, "pipeline_seconds": 10.0, "wall_seconds": 12.5}


def test_one_line_per_rank_in_rank_order(tmp_path):
    (tmp_path / "index.html").write_text("")
    (tmp_path / "videos").mkdir()
    text = summary(results(["ok"] * 5 + ["failed"]), total=6, ran=[1.0] * 5, wall_seconds=30.0,
                   output_dir=str(tmp_path), ranks=[figures(1, "node-b", 4, failed=1), figures(0, "node-a", 2)])
    lines = text.splitlines()
    assert lines[0] == "svd-batch: 5 ok, 1 failed of 6 rows"
    assert lines[1].startswith("  this run: 6 rows in 30.0 s (1 failed), 10.0 videos/min")
    assert lines[2] == "  rank 0 (node-a): 2 rows, model load 2.0 s, pipeline busy 10.0 s of 12.5 s"
    assert lines[3] == "  rank 1 (node-b): 4 rows (3 ok, 1 failed), model load 3.0 s, pipeline busy 10.0 s of 12.5 s"
    assert f"output: {tmp_path}  (videos/, index.html (the report))" in text  # what exists, the report included
    assert "and in index.html" in text


def test_a_run_whose_rows_all_failed_is_not_nothing_to_do(tmp_path):
    text = summary(results(["failed"] * 3), total=3, ran=[], wall_seconds=4.0, output_dir=str(tmp_path),
                   ranks=[figures(0, "h", 3, failed=3)])
    assert "this run: 3 rows in 4.0 s, every one failed" in text and "nothing left to do" not in text
    again = summary(results(["failed"] * 3), total=3, ran=[], wall_seconds=1.0, output_dir=str(tmp_path), ranks=[])
    assert "this run: nothing left to do" in again


@pytest.mark.slow
def test_a_real_run_of_failing_rows_and_its_outputs(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": "gone-a.jpg"}, {"id": "b", "image": "gone-b.jpg"}])
    proc = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'out'}")
    assert proc.returncode == 1, proc.stderr
    assert "this run: 2 rows in" in proc.stderr and "every one failed" in proc.stderr
    assert "rank 0 (" in proc.stderr  # the rank's own line, with its host
    assert "index.html (the report)" in proc.stderr and "contact_sheet.png" in proc.stderr


def scored_results(tmp_path, rows):
    """A run folder's results.parquet with these rows (their videos absent: rescore leaves their scores empty)."""
    from svd_batch.rundir import RunDir, write_parquet_atomic

    rd = RunDir(str(tmp_path))
    rd.create()
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), rd.results_path)
    return rd


def test_rescore_refuses_while_a_merge_holds_the_folder_and_writes_nothing(tmp_path):
    import os

    from svd_batch.results import rescore
    from svd_batch.rundir import FolderLock, RunDirError

    rd = scored_results(tmp_path, [{"id": "a", "status": "ok", "video_path": "videos/a.mp4", "motion_score": 0.5}])
    before = os.stat(rd.results_path).st_mtime_ns, (tmp_path / "results.parquet").read_bytes()
    merging = FolderLock(rd.store, rd.merge_lock.key, rd.root)  # another open file: conflicts even within this process
    assert merging.acquire(describe=True)
    try:
        with pytest.raises(RunDirError, match="merging its records") as exc:
            rescore(str(tmp_path), None, log=lambda msg: None, lock_wait=0.2)
        assert f"pid {os.getpid()}" in str(exc.value)  # names the holder
        assert (os.stat(rd.results_path).st_mtime_ns, (tmp_path / "results.parquet").read_bytes()) == before
    finally:
        merging.release()


def test_rescore_writes_under_the_merge_lock_and_keeps_rows_merged_meanwhile(tmp_path, monkeypatch):
    import svd_batch.results as results_mod
    from svd_batch.rundir import FolderLock, write_parquet_atomic

    rd = scored_results(tmp_path, [{"id": "a", "status": "ok", "video_path": "videos/a.mp4", "motion_score": 0.5}])
    real_write = results_mod.write_parquet_atomic
    (tmp_path / "videos").mkdir(exist_ok=True)
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")

    def score_then_a_merge_lands(video, image, embed):
        # While rescore reads videos, a run's merge adds row b (scored by the run) to results.parquet.
        write_parquet_atomic(pa.Table.from_pylist(
            [{"id": "a", "status": "ok", "video_path": "videos/a.mp4", "motion_score": 0.5},
             {"id": "b", "status": "ok", "video_path": "videos/b.mp4", "motion_score": 0.25}],
            schema=RESULT_SCHEMA), rd.results_path)
        return {c: 0.75 for c in results_mod.SCORE_COLUMNS}

    def write_checking_the_lock(table, path):
        probe = FolderLock(rd.store, rd.merge_lock.key, rd.root)
        assert not probe.acquire(), "results.parquet rewritten without the merge lock"
        probe.release()
        real_write(table, path)

    monkeypatch.setattr(results_mod, "score_files", score_then_a_merge_lands)
    monkeypatch.setattr(results_mod, "write_parquet_atomic", write_checking_the_lock)
    table, _ = results_mod.rescore(str(tmp_path), None, log=lambda msg: None)
    assert table["id"].to_pylist() == ["a", "b"] and table["motion_score"].to_pylist() == [0.75, 0.25]
