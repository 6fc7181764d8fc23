"""The run folder: latest record per id wins across unmerged runs; merges delete only parts read whole;
locking says what is wrong; renames are durable before the record that points at them."""

import errno
import fcntl
import os

import numpy as np
import pytest

from svd_batch.rundir import PartWriter, RunDir, RunDirError


def test_a_retry_in_a_later_unmerged_run_wins(tmp_path):
    for attempt in range(5):  # the random part of the names must not decide the order
        rd = RunDir(str(tmp_path / f"out{attempt}"))
        rd.create()
        PartWriter(rd, rank=1).add({"id": "x", "status": "failed", "error": "first try"})
        PartWriter(rd, rank=0).add({"id": "x", "status": "ok"})  # a later run, another rank
        PartWriter(rd, rank=0).add({"id": "y", "status": "ok"})
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "ok"}
        merged = rd.merge(all_parts=True)  # a start: no writer alive
        assert sorted(merged["id"].to_pylist()) == ["x", "y"] and rd.part_files() == []
        # After the merge, a newer part still wins over the merged file.
        PartWriter(rd, rank=0).add({"id": "y", "status": "failed", "error": "redone"})
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "failed"}


def test_merge_deletes_only_parts_read_whole(tmp_path):
    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    done, busy = PartWriter(rd, rank=0, session="s1"), PartWriter(rd, rank=1, session="s1")
    for i in range(3):
        done.add({"id": f"a{i}", "status": "ok"})
    busy.add({"id": "b0", "status": "ok"})
    rd.write_marker("s1", 0, {"parts": dict(done.written)})
    # Rank 1's marker claims more rows than its part holds: the copy this merge reads is stale (an NFS cache)
    # or the rank is still writing. Its part must survive the merge.
    rd.write_marker("s1", 1, {"parts": {name: n + 1 for name, n in busy.written.items()}})
    merged = rd.merge()
    assert sorted(merged["id"].to_pylist()) == ["a0", "a1", "a2", "b0"]
    assert [os.path.basename(p) for p in rd.part_files()] == list(busy.written)
    assert len(rd.markers()) == 1  # rank 0's marker went with its parts; rank 1's still vouches for its part
    busy.add({"id": "b1", "status": "ok"})  # the rank goes on writing into the part the merge left alone
    assert sorted(rd.read_records()["id"].to_pylist()) == ["a0", "a1", "a2", "b0", "b1"]
    rd.write_marker("s1", 1, {"parts": dict(busy.written)})
    rd.merge()
    assert rd.part_files() == [] and rd.markers() == []
    assert sorted(rd.read_records()["id"].to_pylist()) == ["a0", "a1", "a2", "b0", "b1"]


@pytest.mark.parametrize("code,expect", [
    (errno.EWOULDBLOCK, "Another svd-batch run is using"),
    (errno.ENOLCK, "does not support file locks"),
    (errno.EOPNOTSUPP, "does not support file locks"),
    (errno.ENOSYS, "does not support file locks"),
    (errno.EBADF, "Could not lock"),
])
def test_lock_errors_say_what_is_wrong(tmp_path, monkeypatch, code, expect):
    rd = RunDir(str(tmp_path / "out"))
    rd.create()

    def flock(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)
    with pytest.raises(RunDirError, match=expect) as info:
        rd.acquire_lock()
    if code != errno.EWOULDBLOCK:
        assert "Another svd-batch run" not in str(info.value)
    if expect.startswith("does not"):
        assert "output.lock=false" in str(info.value) and "unsafe" in str(info.value)


def test_a_held_lock_refuses_a_second_run_and_shared_holders_block_it_too(tmp_path):
    first, second = RunDir(str(tmp_path / "out")), RunDir(str(tmp_path / "out"))
    first.create()
    first.acquire_lock()
    with pytest.raises(RunDirError, match=r"Another svd-batch run is using .* \(started by host"):
        second.acquire_lock()
    first.acquire_lock(shared=True)  # rank 0 after planning: every rank now holds it shared
    other_rank = RunDir(first.root)
    other_rank.acquire_lock(shared=True)
    first.release_lock()
    with pytest.raises(RunDirError, match="Another svd-batch run"):
        second.acquire_lock()  # a rank of the first run still works there
    other_rank.release_lock()
    second.acquire_lock()


def test_the_video_rename_is_durable_before_its_record(tmp_path, monkeypatch):
    import svd_batch.atomic as atomic
    from svd_batch.write import write_mp4

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    synced = []
    real = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: (synced.append(os.path.basename(path)), real(path)))
    write_mp4(np.zeros((2, 16, 16, 3), np.uint8), rd.video_path("v"), fps=7)
    PartWriter(rd, rank=0).add({"id": "v", "status": "ok"})
    assert synced == ["videos", "parts"]
