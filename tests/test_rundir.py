"""The run folder: latest record per id wins across unmerged runs; merges delete only parts read whole;
locking says what is wrong; renames are durable before the record that points at them."""

import errno
import fcntl
import os

import numpy as np
import pytest

from svd_batch.rundir import PartWriter, RunDir, RunDirError
from tests.conftest import record


def test_a_retry_in_a_later_unmerged_run_wins(tmp_path):
    for attempt in range(5):  # the random part of the names must not decide the order
        rd = RunDir(str(tmp_path / f"out{attempt}"))
        rd.create()
        PartWriter(rd, rank=1).add(record(id="x", status="failed", error="first try"))
        PartWriter(rd, rank=0).add(record(id="x", status="ok"))  # a later run, another rank
        PartWriter(rd, rank=0).add(record(id="y", status="ok"))
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "ok"}
        merged = rd.merge(all_parts=True)  # a start: no writer alive
        assert sorted(merged["id"].to_pylist()) == ["x", "y"] and rd.part_files() == []
        # After the merge, a newer part still wins over the merged file.
        PartWriter(rd, rank=0).add(record(id="y", status="failed", error="redone"))
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "failed"}


def finished_member(rd, writer, parts=None, state="done"):
    """A member file as a finished member leaves it: its final state and how many rows each part holds."""
    import json

    os.makedirs(rd.members, exist_ok=True)
    info = {"member": writer.member, "job": "j", "state": state, "parts": parts or dict(writer.written)}
    with open(os.path.join(rd.members, f"{writer.member}.json"), "w") as f:
        json.dump(info, f)


def test_merge_deletes_only_parts_read_whole(tmp_path):
    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    done, busy = PartWriter(rd, rank=0, session="s1"), PartWriter(rd, rank=1, session="s1")
    for i in range(3):
        done.add(record(id=f"a{i}", status="ok"))
    busy.add(record(id="b0", status="ok"))
    finished_member(rd, done)
    # Rank 1's file claims more rows than its part holds: the copy this merge reads is stale (an NFS cache)
    # or the rank is still writing. Its part must survive the merge.
    finished_member(rd, busy, {name: n + 1 for name, n in busy.written.items()})
    merged = rd.merge()
    assert sorted(merged["id"].to_pylist()) == ["a0", "a1", "a2", "b0"]
    assert [os.path.basename(p) for p in rd.part_files()] == list(busy.written)
    busy.add(record(id="b1", status="ok"))  # the rank goes on writing into the part the merge left alone
    assert sorted(rd.read_records()["id"].to_pylist()) == ["a0", "a1", "a2", "b0", "b1"]
    finished_member(rd, busy, state="working")  # still working: its part is not sealed yet
    rd.merge()
    assert [os.path.basename(p) for p in rd.part_files()] == list(busy.written)
    finished_member(rd, busy)
    rd.merge()
    assert rd.part_files() == []
    assert sorted(rd.read_records()["id"].to_pylist()) == ["a0", "a1", "a2", "b0", "b1"]


def test_a_merge_that_finds_the_records_replaced_meanwhile_writes_nothing(tmp_path, monkeypatch):
    """Two merges at once (a merge lock lost, or output.lock=false): the one that read an older records.parquet
    must not put it back over the newer one, nor delete any part."""
    import pyarrow.parquet as pq

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    w = PartWriter(rd, rank=0)
    w.add(record(id="a", status="ok"))
    rd.merge(all_parts=True)
    assert rd.generation() == 1
    w2 = PartWriter(rd, rank=1)
    w2.add(record(id="b", status="ok"))
    finished_member(rd, w2)
    real_write = pq.write_table
    other = RunDir(rd.root)

    def write_then_lose_the_race(table, where, *a, **k):
        real_write(table, where, *a, **k)
        if where.startswith(rd.records_path + ".tmp-"):
            monkeypatch.setattr(pq, "write_table", real_write)
            PartWriter(other, rank=2).add(record(id="c", status="ok"))
            assert other.merge() is not None  # the other merge completes first

    monkeypatch.setattr(pq, "write_table", write_then_lose_the_race)
    assert rd.merge() is None  # superseded: nothing written, nothing deleted by this one
    assert sorted(rd.read_records()["id"].to_pylist()) == ["a", "b", "c"]
    assert rd.generation() == 2


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
        rd.plan_lock.require()
    if code != errno.EWOULDBLOCK:
        assert "Another svd-batch run" not in str(info.value)
    if expect.startswith("does not"):
        assert "output.lock=false" in str(info.value) and "unsafe" in str(info.value)


def test_a_held_lock_refuses_a_second_holder_and_shared_holders_block_exclusive(tmp_path):
    first, second = RunDir(str(tmp_path / "out")), RunDir(str(tmp_path / "out"))
    first.create()
    first.plan_lock.require(describe=True)
    with pytest.raises(RunDirError, match=r"Another svd-batch run is using .* \(started by host"):
        second.plan_lock.require()
    first.active_lock.require(shared=True)  # a member of a launch
    other_member = RunDir(first.root)
    other_member.active_lock.require(shared=True)
    first.release_locks()
    assert not second.active_lock.acquire()  # a member still works there: not alone
    other_member.release_locks()
    assert second.active_lock.acquire()


@pytest.mark.process
def test_the_video_rename_is_durable_before_its_record(tmp_path, monkeypatch):
    import svd_batch.atomic as atomic
    from svd_batch.video import write_mp4

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    synced = []
    real = atomic.fsync_dir
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: (synced.append(os.path.basename(path)), real(path)))
    write_mp4(np.zeros((2, 16, 16, 3), np.uint8), rd.video_path("v"), fps=7)
    PartWriter(rd, rank=0).add(record(id="v", status="ok"))
    assert synced == [os.path.basename(os.path.dirname(rd.video_path("v"))), "parts"]  # its own subfolder


def test_a_new_folder_spreads_its_files_over_subfolders_and_an_older_one_stays_flat(tmp_path):
    from collections import Counter

    from svd_batch import ownership

    rd = RunDir(str(tmp_path / "new"))
    rd.create()
    sub = ownership.subfolder("a.b")
    assert os.path.relpath(rd.video_path("a.b"), rd.root) == f"videos/{sub}/a.b.mp4"
    assert os.path.relpath(rd.input_path("a.b"), rd.root) == f"inputs/{sub}/a.b.jpg"
    assert os.path.relpath(rd.thumb_path("a.b"), rd.root) == f".svd-batch/thumbs/{sub}/a.b.png"
    assert len(os.listdir(rd.videos)) == 256  # made before any rank writes
    # A million rows: 256 folders of about 3,900 files, none past a few thousand.
    per_folder = Counter(ownership.subfolder(f"img{i:07d}") for i in range(1_000_000))
    assert len(per_folder) == 256 and max(per_folder.values()) < 4300
    # A folder an earlier version made (records, no layout file) stays flat, also after a new start.
    old = RunDir(str(tmp_path / "old"))
    old.create()
    os.unlink(os.path.join(old.root, ownership.LAYOUT))
    for k in range(256):
        os.rmdir(os.path.join(old.videos, f"{k:02x}"))
    PartWriter(old, rank=0).add(record(id="x", status="ok", video_path="videos/x.mp4"))
    again = RunDir(old.root)
    again.create()
    assert again.video_path("x") == os.path.join(old.videos, "x.mp4") and os.listdir(old.videos) == []
    assert ownership.layout(old.root) == ownership.FLAT
