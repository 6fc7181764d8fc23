"""The run folder's records: latest record per id wins, across interrupted runs that never merged."""

from svd_batch.rundir import PartWriter, RunDir


def test_a_retry_in_a_later_unmerged_run_wins(tmp_path):
    for attempt in range(5):  # the random part of the names must not decide the order
        rd = RunDir(str(tmp_path / f"out{attempt}"))
        rd.create()
        PartWriter(rd, rank=1).add({"id": "x", "status": "failed", "error": "first try"})
        PartWriter(rd, rank=0).add({"id": "x", "status": "ok"})  # a later run, another rank
        PartWriter(rd, rank=0).add({"id": "y", "status": "ok"})
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "ok"}
        merged = rd.merge()
        assert sorted(merged["id"].to_pylist()) == ["x", "y"] and rd.part_files() == []
        # After the merge, a newer part still wins over the merged file.
        PartWriter(rd, rank=0).add({"id": "y", "status": "failed", "error": "redone"})
        got = {r["id"]: r["status"] for r in rd.read_records(["id", "status"]).to_pylist()}
        assert got == {"x": "ok", "y": "failed"}
