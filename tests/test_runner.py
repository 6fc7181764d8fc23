"""Resume, guards and locking of the run folder, through the CLI."""

import os
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    SAMPLE,
    read_results,
    run_cli,
    start_cli,
    tmp_files,
    video_file,
    wait_for_records,
    write_manifest,
)


def small_manifest(tmp_path, n=3, **extra):
    rows = [{"id": f"r{i}", "image": str(SAMPLE / "cat.jpg"), **extra} for i in range(n)]
    return write_manifest(tmp_path / "m.parquet", rows)


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_false_with_existing_results_stops(tmp_path):
    m, out = small_manifest(tmp_path, n=1), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}").returncode == 0
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "resume=false")
    assert proc.returncode == 2 and "resume=false" in proc.stderr and "overwrite=true" in proc.stderr


@pytest.mark.distributed
def test_a_second_launch_joins_and_a_killed_run_leaves_no_stale_lock(tmp_path):
    m, out = small_manifest(tmp_path, n=40), tmp_path / "out"  # long enough to still run when the second starts
    first = start_cli(f"manifest.path={m}", f"output.dir={out}")
    wait_for_records(out, 1, first)
    second = start_cli(f"manifest.path={m}", f"output.dir={out}")
    wait_for_records(out, 4, second)
    # Launches on one folder share its job; overwrite=true would delete their work and is refused meanwhile.
    refused = run_cli(f"manifest.path={m}", f"output.dir={out}", "overwrite=true")
    assert refused.returncode == 2 and "Another svd-batch run is using" in refused.stderr
    first.send_signal(signal.SIGKILL)
    second.send_signal(signal.SIGKILL)
    first.wait()
    second.wait()
    from svd_batch.rundir import RunDir

    ranks = {r["rank"] for r in RunDir(str(out)).read_records().to_pylist()}
    resumed = run_cli(f"manifest.path={m}", f"output.dir={out}")  # nobody alive: no lock left, nothing waits
    assert resumed.returncode == 0, resumed.stderr
    assert "joined" not in resumed.stderr
    t = read_results(out)
    assert t.num_rows == 40 and set(t["status"].to_pylist()) == {"ok"} and not tmp_files(out)
    assert ranks == {0}  # both launches were single-process launches


@pytest.mark.slow
def test_failed_rows_are_kept_until_retry_failed(tmp_path, images):
    rows = [{"id": "good", "image": "images/cat.jpg"}, {"id": "late", "image": "images/later.jpg"}]
    m, out = write_manifest(tmp_path / "m.parquet", rows), tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 1
    t = {r["id"]: r for r in read_results(out).to_pylist()}
    assert t["good"]["status"] == "ok" and t["late"]["status"] == "failed"
    assert "late" in t["late"]["error"] and "file not found" in t["late"]["error"]
    assert t["late"]["video_path"] is None and not video_file(out, "late").exists()
    (images / "later.jpg").write_bytes((images / "coffee.jpg").read_bytes())
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 1 and "1 failed earlier" in proc.stderr  # not retried by default
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "retry_failed=true")
    assert proc.returncode == 0, proc.stderr
    t = {r["id"]: r for r in read_results(out).to_pylist()}
    assert t["late"]["status"] == "ok" and video_file(out, "late").exists()
    assert read_results(out).num_rows == 2


@pytest.mark.slow
def test_video_without_record_is_regenerated(tmp_path):
    m, out = small_manifest(tmp_path, n=2), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}", "manifest.limit=1").returncode == 0
    # A crash between the video's rename and its record leaves a video nobody vouches for.
    video_file(out, "r1").write_bytes(b"not a finished video")
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert video_file(out, "r1").read_bytes()[4:8] == b"ftyp"
    assert read_results(out).num_rows == 2


@pytest.mark.slow
def test_a_flat_folder_of_an_earlier_version_resumes_flat(tmp_path):
    """A folder made before the spread layout (videos/<id>.mp4, no layout file) keeps its layout: resume skips its
    rows, and new rows go beside them, where earlier versions put them."""
    import pyarrow as pa

    from svd_batch import ownership
    from svd_batch.rundir import RunDir

    m, out = small_manifest(tmp_path, n=3), tmp_path / "out"
    assert run_cli(f"manifest.path={m}", f"output.dir={out}", "manifest.limit=2", "report.enabled=false").returncode == 0
    rd = RunDir(str(out))
    assert read_results(out)["video_path"].to_pylist() == [os.path.relpath(rd.video_path(i), out) for i in ("r0", "r1")]
    # Make it the folder an earlier version left: files in the old places, records saying so, no layout file.
    for rid in ("r0", "r1"):
        os.rename(rd.video_path(rid), out / "videos" / f"{rid}.mp4")
        os.rename(rd.input_path(rid), out / "inputs" / f"{rid}.jpg")
    for sub in ownership.subfolders(str(out), "videos") + ownership.subfolders(str(out), "inputs"):
        os.rmdir(out / sub)
    for path in (rd.records_path, rd.results_path):
        t = pq.read_table(path)
        flat = pa.array([f"videos/{i}.mp4" for i in t["id"].to_pylist()])
        pq.write_table(t.set_column(t.schema.get_field_index("video_path"), "video_path", flat), path)
    os.unlink(out / ownership.LAYOUT)
    before = {rid: (out / "videos" / f"{rid}.mp4").stat().st_mtime_ns for rid in ("r0", "r1")}
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "1 rows in" in proc.stderr or "this run: 1 rows" in proc.stderr, proc.stderr
    assert read_results(out)["video_path"].to_pylist() == [f"videos/r{i}.mp4" for i in range(3)]
    assert {rid: (out / "videos" / f"{rid}.mp4").stat().st_mtime_ns for rid in ("r0", "r1")} == before
    assert sorted(os.listdir(out / "videos")) == ["r0.mp4", "r1.mp4", "r2.mp4"]
    assert (out / "inputs" / "r2.jpg").is_file() and ownership.layout(str(out)) == ownership.FLAT


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# -- issue 10: a broken device stops its rank, a full disk stops the run, resume sees changed inputs --------

@pytest.mark.slow
def test_the_same_failure_row_after_row_stops_the_rank_without_recording_those_rows(tmp_path):
    m, out = small_manifest(tmp_path, n=6), tmp_path / "out"
    # r1..r3 fail in every memory mode (as every row does on a GPU that has gone bad): equal failures in a row.
    bad = {"SVD_BATCH_INJECT_OOM": "r1:99,r2:99,r3:99"}
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "runtime.max_same_failures=3", env=bad)
    assert proc.returncode == 3, proc.stderr  # incomplete, not "rows failed"
    assert "rank 0 stopped: cpu on host" in proc.stderr and "3 rows in a row failed the same way" in proc.stderr
    t = read_results(out)
    assert t["id"].to_pylist() == ["r0"] and t["status"].to_pylist() == ["ok"]  # none recorded failed
    assert "5 row(s) not done" in proc.stderr
    again = run_cli(f"manifest.path={m}", f"output.dir={out}")  # the device is fine again
    assert again.returncode == 0, again.stderr
    assert set(read_results(out)["status"].to_pylist()) == {"ok"} and read_results(out).num_rows == 6
    # Turned off, the same failures are the rows' own: recorded failed, and the run goes on.
    off = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'off'}", "runtime.max_same_failures=0", env=bad)
    assert off.returncode == 1
    assert read_results(tmp_path / "off")["status"].to_pylist() == ["ok", "failed", "failed", "failed", "ok", "ok"]


@pytest.mark.slow
def test_resume_sees_a_changed_image_root_and_column_mapping(tmp_path):
    import shutil

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    shutil.copy(SAMPLE / "cat.jpg", tmp_path / "a" / "x.jpg")
    shutil.copy(SAMPLE / "rocket.jpg", tmp_path / "b" / "x.jpg")  # another picture, the same name
    m = write_manifest(tmp_path / "m.parquet", [{"image": "x.jpg", "motion": 10, "motion2": 200}])
    out = tmp_path / "out"
    base = [f"manifest.path={m}", f"output.dir={out}", "+manifest.columns.motion_bucket_id=motion"]
    assert run_cli(*base, f"manifest.image_root={tmp_path / 'a'}").returncode == 0
    moved = run_cli(*base, f"manifest.image_root={tmp_path / 'b'}")
    assert moved.returncode == 2
    assert "image_uri" in moved.stderr and str(tmp_path / "b" / "x.jpg") in moved.stderr
    assert run_cli(*base, f"manifest.image_root={tmp_path / 'a'}").returncode == 0  # unchanged: resumes
    # Another column mapping: a derived id hashes the mapped cells, so the row is a new one and runs with the
    # new value (nothing old is passed off as new) ...
    remap = [f"manifest.path={m}", f"output.dir={out}", "+manifest.columns.motion_bucket_id=motion2",
             f"manifest.image_root={tmp_path / 'a'}"]
    assert run_cli(*remap).returncode == 0
    assert read_results(out)["motion_bucket_id"].to_pylist() == [200]
    # ... and with ids given in the manifest, the changed value of a finished row is named.
    m2 = write_manifest(tmp_path / "m2.parquet", [{"id": "x", "image": "x.jpg", "motion": 10, "motion2": 200}])
    out2 = tmp_path / "out2"
    assert run_cli(f"manifest.path={m2}", f"output.dir={out2}", "+manifest.columns.motion_bucket_id=motion",
                   f"manifest.image_root={tmp_path / 'a'}").returncode == 0
    remapped = run_cli(f"manifest.path={m2}", f"output.dir={out2}", "+manifest.columns.motion_bucket_id=motion2",
                       f"manifest.image_root={tmp_path / 'a'}")
    assert remapped.returncode == 2 and "motion_bucket_id 10 -> 200" in remapped.stderr


def test_derived_ids_do_not_move_when_rows_are_inserted(tmp_path):
    from svd_batch.manifest import load_manifest
    from tests.test_manifest import GEN

    rows = [{"image": f"img{i}.jpg", "motion_bucket_id": i} for i in range(4)] + [{"image": "img0.jpg"}] * 2
    first = load_manifest(str(write_manifest(tmp_path / "a.parquet", rows)), GEN).table["id"].to_pylist()
    assert len(set(first)) == 6 and first[5] == first[4] + "-2"  # identical rows are told apart in order
    inserted = [{"image": "new.jpg"}] + rows[:2] + [{"image": "img9.jpg", "motion_bucket_id": 9}] + rows[2:]
    second = load_manifest(str(write_manifest(tmp_path / "b.parquet", inserted)), GEN).table["id"].to_pylist()
    assert [x for x in second if x in first] == first and len(second) == 8
    reordered = list(reversed(rows[:4])) + rows[4:]
    third = load_manifest(str(write_manifest(tmp_path / "c.parquet", reordered)), GEN).table["id"].to_pylist()
    assert sorted(third) == sorted(first)


def test_the_fingerprint_holds_resolved_values():
    from svd_batch.fingerprint import fingerprint, fingerprint_diff
    from svd_batch.settings import RunSettings

    s = RunSettings.compose()
    cpu, cuda = fingerprint(s, "abc", "cpu"), fingerprint(s, "abc", "cuda")
    assert s.model.dtype == "auto" and cpu["model.dtype"] == "float32" and cuda["model.dtype"] == "float16"
    assert "runtime.device_type: 'cpu' -> 'cuda'" in fingerprint_diff(cpu, cuda)
    s2 = RunSettings.compose("runtime.compile=true", "runtime.batch_size=4")
    diff = "; ".join(fingerprint_diff(cpu, fingerprint(s2, "abc", "cpu")))
    assert "runtime.compile" in diff and "runtime.batch_size: 1 -> 4" in diff
    s3 = RunSettings.compose("runtime.threads=3", "runtime.overlap=true", "runtime.schedule=static")
    assert fingerprint_diff(cpu, fingerprint(s3, "abc", "cpu")) == []  # knobs that do not change frames


@pytest.mark.slow
def test_a_full_output_disk_stops_the_run_and_blames_no_row(tmp_path, small_fs):
    from svd_batch.video import mp4_problem

    m = small_manifest(tmp_path, n=14, num_frames=8)
    out = small_fs / "out"
    filler = small_fs / "other-data"
    filler.write_bytes(b"\0" * (200 * 1024))  # about 100 KB left: room for a few videos, not for 14
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.enabled=false")
    assert proc.returncode == 4, proc.stderr
    assert f"The output folder {out} cannot take more files" in proc.stderr
    assert "Free space" in proc.stderr and "Traceback" not in proc.stderr
    from svd_batch.rundir import RunDir

    records = RunDir(str(out)).read_records()
    assert set(records["status"].to_pylist()) <= {"ok"} and records.num_rows < 14  # none failed for the disk
    for v in (p for p in (out / "videos").rglob("*") if p.is_file()):  # whatever is in videos/ plays
        assert v.name.endswith(".mp4") and not v.name.startswith(".") and mp4_problem(str(v)) is None
    filler.unlink()  # space freed
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_fs)], check=True)
    again = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.enabled=false")
    assert again.returncode == 0, again.stderr
    t = read_results(out)
    assert t.num_rows == 14 and set(t["status"].to_pylist()) == {"ok"} and not tmp_files(out)
