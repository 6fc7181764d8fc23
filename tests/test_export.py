"""svd-batch-export: shards read back by the real clients (webdataset, datasets), on a local folder and on an S3 API
(moto) on 127.0.0.1, after a kill -9 half-way, and after the run got more rows.

Most run folders here are built without the model: svd-batch's own records (RESULT_SCHEMA via fields.Record and
rundir's writer) pointing at small files; the export treats a video as bytes. One slow test exports a real run."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svd_batch.export import INDEX_DIR, export
from svd_batch.export_shards import sample_key
from svd_batch.rundir import RunDir, write_parquet_atomic
from tests.conftest import REPO, read_results, record, run_cli, write_manifest

IDS = ["cat", "beach.motion_bucket_id=60.seed=1", "beach.motion_bucket_id=60.seed=2", "x_y",
       "dog-0123456789", "sun.rise", "moon", "a.b.c.d"]


def fake_run(root: Path, ids: list[str], failed: tuple[str, ...] = (), start: int = 0) -> pa.Table:
    """A run folder as svd-batch leaves it: results.parquet (every column, plus one extra), a video per ok row at
    the path RunDir gives, and the input image as the model saw it; rows already there are kept."""
    rd = RunDir(str(root))
    rd.create()
    old = pq.read_table(rd.results_path).to_pylist() if os.path.exists(rd.results_path) else []
    rows = []
    for k, rid in enumerate(ids, start=start):
        ok = rid not in failed
        path = rd.video_path(rid)
        if ok:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_bytes(b"\0\0\0\x18ftypisom" + f"video of {rid}".encode() * (k + 3))
            os.makedirs(os.path.dirname(rd.input_path(rid)), exist_ok=True)
            Path(rd.input_path(rid)).write_bytes(b"\xff\xd8\xff\xe0" + f"input of {rid}".encode())
        r = record(id=rid, row=k, seed=1000 + k, status="ok" if ok else "failed",
                   error=None if ok else f"row {rid}: image missing",
                   video_path=os.path.relpath(path, rd.root) if ok else None,
                   frames_sha256=f"{k:064x}" if ok else None, motion_score=0.1 * k if ok else None).as_dict()
        r["extra.caption"] = f"caption {k}"
        rows.append(r)
    schema = RESULT_SCHEMA_WITH_EXTRA
    table = pa.Table.from_pylist(old + rows, schema=schema)
    write_parquet_atomic(table, rd.results_path)
    return table


def _schema() -> pa.Schema:
    from svd_batch.fields import RESULT_SCHEMA

    return RESULT_SCHEMA.append(pa.field("extra.caption", pa.string()))


RESULT_SCHEMA_WITH_EXTRA = _schema()


def as_json(value):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return value


def ok_rows(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_results(run).to_pylist() if r["status"] == "ok"}


def read_webdataset(dest: Path) -> dict[str, dict]:
    import webdataset as wds

    urls = sorted(str(p) for p in dest.glob("shard-*.tar"))
    seen: dict[str, dict] = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["id"] not in seen, f"{meta['id']} exported twice"
        assert unquote(sample["__key__"]) == meta["id"]
        seen[meta["id"]] = {**sample, "meta": meta}
    return seen


def check_webdataset(run: Path, dest: Path) -> dict[str, dict]:
    """Every ok row once: MP4 bytes equal to the run's file, JSON equal to its results row, the input image."""
    rd, rows = RunDir(str(run)), ok_rows(run)
    got = read_webdataset(dest)
    assert sorted(got) == sorted(rows)
    for rid, s in got.items():
        assert s["mp4"] == (run / rows[rid]["video_path"]).read_bytes()
        assert s["meta"] == {k: as_json(v) for k, v in rows[rid].items()}
        assert s["jpg"] == Path(rd.input_path(rid)).read_bytes()
    return got


def shard_bytes(dest: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(dest.iterdir()) if p.is_file()}


def test_webdataset_shards_hold_every_ok_row_once_with_ids_that_have_dots(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "wds"
    fake_run(run, IDS, failed=("moon",))
    s = export(str(run), str(dest), "webdataset", shard_size=3, progress=False)
    assert (s.samples, s.shards, s.total_samples, s.missing, s.changed) == (7, 3, 7, [], [])
    got = check_webdataset(run, dest)
    assert got["a.b.c.d"]["__key__"] == "a%2Eb%2Ec%2Ed" and "." not in sample_key("beach.motion_bucket_id=60.seed=1")
    # One Parquet sidecar per shard: the shard's keys and results columns, in the tar's order.
    for tar in sorted(dest.glob("shard-*.tar")):
        side = pq.read_table(tar.with_suffix(".parquet"))
        import tarfile

        with tarfile.open(tar) as t:
            keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))
        assert side["key"].to_pylist() == keys and "extra.caption" in side.column_names
    assert sorted(p.name for p in (dest / INDEX_DIR).iterdir()) == [f"shard-{n:06d}.parquet" for n in range(3)]


def test_parquet_export_loads_in_datasets_as_video_and_image(tmp_path):
    import datasets

    run, dest = tmp_path / "run", tmp_path / "pq"
    fake_run(run, IDS, failed=("moon",))
    export(str(run), str(dest), "parquet", shard_size=4, progress=False)
    files = sorted(str(p) for p in (dest / "data").glob("train-*.parquet"))
    assert len(files) == 2
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["video"], datasets.Video) and isinstance(ds.features["input_image"], datasets.Image)
    ds = ds.cast_column("video", datasets.Video(decode=False)).cast_column("input_image", datasets.Image(decode=False))
    rows, rd = ok_rows(run), RunDir(str(run))
    assert ds.num_rows == len(rows) and sorted(ds["id"]) == sorted(rows)
    for r in ds:
        want = rows[r["id"]]
        assert r["video"]["bytes"] == (run / want["video_path"]).read_bytes()
        assert r["input_image"]["bytes"] == Path(rd.input_path(r["id"])).read_bytes()
        assert (r["seed"], r["frames_sha256"], r["extra.caption"]) == (want["seed"], want["frames_sha256"],
                                                                       want["extra.caption"])


def test_more_rows_add_shards_and_leave_earlier_ones_byte_for_byte(tmp_path, capsys):
    run, dest = tmp_path / "run", tmp_path / "wds"
    fake_run(run, IDS[:5])
    export(str(run), str(dest), "webdataset", shard_size=2, progress=False)
    before = shard_bytes(dest)
    assert sorted(before) == [f"shard-{n:06d}.{e}" for n in range(3) for e in ("parquet", "tar")]
    fake_run(run, IDS[5:], start=5)  # a longer run: three more rows
    s = export(str(run), str(dest), "webdataset", shard_size=2, progress=False)
    assert (s.samples, s.shards, s.total_shards, s.total_samples) == (3, 2, 5, 8)
    after = shard_bytes(dest)
    assert {k: after[k] for k in before} == before and len(after) == 10
    check_webdataset(run, dest)
    assert export(str(run), str(dest), "webdataset", shard_size=2, progress=False).samples == 0
    # A video remade since it was exported (overwrite=true): named, not duplicated.
    rd = RunDir(str(run))
    table = pq.read_table(rd.results_path)
    shas = table["frames_sha256"].to_pylist()
    shas[1] = "f" * 64
    write_parquet_atomic(table.set_column(table.schema.get_field_index("frames_sha256"), "frames_sha256",
                                          pa.array(shas, pa.string())), rd.results_path)
    os.utime(rd.video_path(IDS[2]), ns=(1, 1))
    s = export(str(run), str(dest), "webdataset", shard_size=2, progress=False)
    assert (s.samples, sorted(s.changed)) == (0, sorted(IDS[1:3]))
    assert shard_bytes(dest) == after


def test_an_ok_row_without_its_video_is_named_and_the_rest_exported(tmp_path):
    from svd_batch.commands.export import main

    run, dest = tmp_path / "run", tmp_path / "wds"
    fake_run(run, IDS[:4])
    os.unlink(RunDir(str(run)).video_path("cat"))
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--to", str(dest), "--no-progress"])
    assert exit_.value.code == 1
    assert sorted(read_webdataset(dest)) == sorted(IDS[1:4])
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--to", str(dest), "--format", "parquet"])
    assert exit_.value.code == 2  # a webdataset export is there
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nothing"), "--to", str(dest)])
    assert exit_.value.code == 2


@pytest.fixture()
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(k, v)
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="train")
    s3fs.S3FileSystem.clear_instance_cache()
    yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_export_to_an_s3_api_gives_the_same_shards(tmp_path, s3_server):
    import s3fs

    run = tmp_path / "run"
    fake_run(run, IDS, failed=("moon",))
    export(str(run), str(tmp_path / "local"), "webdataset", shard_size=3, progress=False)
    s = export(str(run), "s3://train/svd/xt", "webdataset", shard_size=3, progress=False)
    assert (s.samples, s.shards) == (7, 3)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    remote = tmp_path / "remote"
    fs.get("train/svd/xt/", str(remote), recursive=True)
    local = shard_bytes(tmp_path / "local")
    assert {k: v for k, v in shard_bytes(remote).items() if k in local} == local
    check_webdataset(run, remote)
    fake_run(run, ["late.one"], start=len(IDS))
    s = export(str(run), "s3://train/svd/xt", "webdataset", shard_size=3, progress=False)
    assert (s.samples, s.shards, s.total_samples) == (1, 1, 8)


@pytest.mark.slow
def test_kill_9_half_way_then_the_same_command_exports_every_row_once(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "wds"
    fake_run(run, [f"r{i}.v" for i in range(12)])
    cmd = [sys.executable, "-m", "svd_batch.commands.export", str(run), "--to", str(dest), "--shard-size", "4",
           "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "SVD_BATCH_INJECT_PAUSE": "export:1"}, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline:  # stopped by its own SIGSTOP half-way through shard 1
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            break
        assert proc.poll() is None, "the export ended before its pause"
        time.sleep(0.02)
    assert (dest / "shard-000000.tar").exists() and not (dest / "shard-000001.tar").exists()
    assert any(".tmp-" in p.name for p in dest.iterdir())  # shard 1, half-written under its temporary name
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 new shard(s), 8 samples" in done.stdout and "3 shard(s), 12 samples" in done.stdout
    assert not any(".tmp-" in p.name for p in dest.iterdir())
    check_webdataset(run, dest)


@pytest.mark.slow
def test_a_real_run_exports_and_its_videos_live_in_subfolders(tmp_path, images):
    rows = [{"id": "cat.1", "image": str(images / "cat.jpg")}, {"id": "rocket", "image": str(images / "rocket.jpg")}]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={manifest}", f"output.dir={out}", "report.enabled=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    paths = read_results(out)["video_path"].to_pylist()
    assert all(p.count("/") == 2 and p.startswith("videos/") for p in paths), paths  # videos/<2 hex>/<id>.mp4
    dest = tmp_path / "wds"
    done = subprocess.run([sys.executable, "-m", "svd_batch.commands.export", str(out), "--to", str(dest),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = check_webdataset(out, dest)
    assert got["cat.1"]["mp4"][4:8] == b"ftyp"
