"""Resume, guards and locking of the run folder, through the CLI."""

import os
import signal
import time

import pyarrow.parquet as pq

from tests.conftest import SAMPLE, read_results, run_cli, start_cli, tmp_files, wait_for_records, write_manifest


def small_manifest(tmp_path, n=3, **extra):
    rows = [{"id": f"r{i}", "image": str(SAMPLE / "cat.jpg"), **extra} for i in range(n)]
    return write_manifest(tmp_path / "m.parquet", rows)


def test_config_guard_names_differing_keys_and_overwrite_redoes(tmp_path):
    m, out = small_manifest(tmp_path), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}").returncode == 0
    first = read_results(out)
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.motion_bucket_id=3", "video.crf=30")
    assert proc.returncode == 2
    assert "generation.motion_bucket_id: 127 -> 3" in proc.stderr and "video.crf: 18 -> 30" in proc.stderr
    assert "overwrite=true" in proc.stderr
    assert read_results(out).equals(first)  # nothing touched
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.motion_bucket_id=3", "video.crf=30",
                   "overwrite=true")
    assert proc.returncode == 0, proc.stderr
    again = read_results(out)
    assert set(again["motion_bucket_id"].to_pylist()) == {3}
    assert again["frames_sha256"].to_pylist() != first["frames_sha256"].to_pylist()
    # A resume with the new settings is fine now.
    ok = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.motion_bucket_id=3", "video.crf=30")
    assert ok.returncode == 0 and "nothing left to do" in ok.stderr


def test_resume_false_with_existing_results_stops(tmp_path):
    m, out = small_manifest(tmp_path, n=1), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}").returncode == 0
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "resume=false")
    assert proc.returncode == 2 and "resume=false" in proc.stderr and "overwrite=true" in proc.stderr


def test_second_launch_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    m, out = small_manifest(tmp_path, n=40), tmp_path / "out"  # long enough to still run when the second starts
    first = start_cli(f"manifest.path={m}", f"output.dir={out}")
    wait_for_records(out, 1, first)
    second = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert second.returncode == 2
    assert "Another svd-batch run is using" in second.stderr and f"pid {first.pid}" in second.stderr
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert resumed.returncode == 0, resumed.stderr
    t = read_results(out)
    assert t.num_rows == 40 and set(t["status"].to_pylist()) == {"ok"} and not tmp_files(out)


def test_failed_rows_are_kept_until_retry_failed(tmp_path, images):
    rows = [{"id": "good", "image": "images/cat.jpg"}, {"id": "late", "image": "images/later.jpg"}]
    m, out = write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 1
    t = {r["id"]: r for r in read_results(out).to_pylist()}
    assert t["good"]["status"] == "ok" and t["late"]["status"] == "failed"
    assert "late" in t["late"]["error"] and "file not found" in t["late"]["error"]
    assert t["late"]["video_path"] is None and not (out / "videos" / "late.mp4").exists()
    (images / "later.jpg").write_bytes((images / "coffee.jpg").read_bytes())
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 1 and "1 failed earlier" in proc.stderr  # not retried by default
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "retry_failed=true")
    assert proc.returncode == 0, proc.stderr
    t = {r["id"]: r for r in read_results(out).to_pylist()}
    assert t["late"]["status"] == "ok" and (out / "videos" / "late.mp4").exists()
    assert read_results(out).num_rows == 2


def test_video_without_record_is_regenerated(tmp_path):
    m, out = small_manifest(tmp_path, n=2), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}", "manifest.limit=1").returncode == 0
    # A crash between the video's rename and its record leaves a video nobody vouches for.
    (out / "videos" / "r1.mp4").write_bytes(b"not a finished video")
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert (out / "videos" / "r1.mp4").read_bytes()[4:8] == b"ftyp"
    assert read_results(out).num_rows == 2


def test_corrupt_part_file_gets_a_clear_message(tmp_path):
    m, out = small_manifest(tmp_path, n=1), tmp_path / "out"
    proc = start_cli(f"manifest.path={m}", f"output.dir={out}")
    proc.wait()
    bad = out / ".svd-batch" / "parts" / "rank00000-deadbeef-00000.parquet"
    bad.write_bytes(b"PAR1 garbage")
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Move it away" in proc.stderr
    assert "Traceback" not in proc.stderr
    os.unlink(bad)
    assert run_cli(f"manifest.path={m}", f"output.dir={out}").returncode == 0


def test_records_are_durable_per_row(tmp_path):
    """Each finished row is in a part file (whole, readable) before the next row starts."""
    m, out = small_manifest(tmp_path, n=6), tmp_path / "out"
    proc = start_cli(f"manifest.path={m}", f"output.dir={out}")
    seen = set()
    while proc.poll() is None:
        parts = list((out / ".svd-batch" / "parts").glob("*.parquet")) if (out / ".svd-batch").exists() else []
        for p in parts:
            try:
                with open(p, "rb") as f:  # one open: the file is renamed over after every row
                    seen.add(pq.read_table(f).num_rows)
            except FileNotFoundError:
                pass  # merged away at the end
        time.sleep(0.02)
    assert proc.returncode == 0
    assert len(seen) >= 3 and max(seen) <= 6  # grew row by row, never half-written


def test_rows_edited_after_they_finished_are_named(tmp_path):
    rows = [{"id": f"r{i}", "image": str(SAMPLE / "cat.jpg"), "motion_bucket_id": 100} for i in range(3)]
    m, out = write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}").returncode == 0
    rows[1]["motion_bucket_id"] = 7
    rows.append({"id": "r3", "image": str(SAMPLE / "cat.jpg"), "motion_bucket_id": 100})  # new rows are fine
    write_manifest(m, rows)
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 2
    assert "1 finished row changed" in proc.stderr and "r1: motion_bucket_id 100 -> 7" in proc.stderr
    dry = run_cli(f"manifest.path={m}", f"output.dir={out}", "dry_run=true")
    assert dry.returncode == 2 and "r1: motion_bucket_id 100 -> 7" in dry.stderr
    rows[1]["motion_bucket_id"] = 100
    write_manifest(m, rows)
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0 and read_results(out).num_rows == 4
