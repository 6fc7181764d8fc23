"""Images inside the manifest (Hugging Face struct<bytes, path>, raw bytes) and manifests/images behind fsspec
URLs: same frames as the same images given as files, small tables, bounded reads, clear errors."""

import hashlib
import http.server
import io
import json
import os
import sys
import threading

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd_batch import embedded
from svd_batch.images import ImageError, changed_images, load_image, load_image_digest
from svd_batch.manifest import ManifestError, load_manifest
from tests.conftest import SAMPLE, read_results, run_cli, write_manifest

GEN = dict(seed=42, height=64, width=64, num_frames=8, num_inference_steps=4, fps=7, motion_bucket_id=127,
           noise_aug_strength=0.02, min_guidance_scale=1.0, max_guidance_scale=3.0, decode_chunk_size=8)
NAMES = ["cat.jpg", "rocket.jpg"]
HF_META = {b"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"}, "seed": {"dtype": "int64", "_type": "Value"}}}}).encode()}


def hf_table(blobs: list[bytes | None], paths: list[str | None], **extra) -> pa.Table:
    """A table laid out as `datasets` writes an Image column: struct<bytes: binary, path: string>, metadata."""
    image = pa.StructArray.from_arrays([pa.array(blobs, pa.binary()), pa.array(paths, pa.string())],
                                       ["bytes", "path"])
    return pa.table({"image": image, **extra}).replace_schema_metadata(HF_META)


def sample_bytes() -> list[bytes]:
    return [(SAMPLE / n).read_bytes() for n in NAMES]


def hashes(out) -> dict:
    t = read_results(out)
    assert set(t["status"].to_pylist()) == {"ok"}, t["error"].to_pylist()
    return dict(zip(t["seed"].to_pylist(), t["frames_sha256"].to_pylist()))


@pytest.mark.slow
def test_hf_and_raw_shards_give_the_frames_of_the_files(tmp_path, images):
    blobs = sample_bytes()
    seeds = [11, 12]
    files = write_manifest(tmp_path / "files.parquet", [{"image": str(images / n), "seed": s} for n, s in zip(NAMES, seeds)])
    hf = tmp_path / "hf" / "train-00000-of-00001.parquet"
    hf.parent.mkdir()
    pq.write_table(hf_table(blobs, ["cat.jpg", None], seed=seeds), hf)
    raw = tmp_path / "raw.parquet"
    pq.write_table(pa.table({"png": pa.array(blobs, pa.binary()), "seed": seeds}), raw, row_group_size=1)

    runs = {}
    for name, overrides in {
        "files": [f"manifest.path={files}"],
        "hf": [f"manifest.path={hf}"],
        # raw bytes under another name (column mapping), read through fsspec's file:// filesystem
        "raw": [f"manifest.path=file://{raw}", "+manifest.columns.image=png"],
    }.items():
        # Beside the data, not in its folder: a folder holding files svd-batch did not make is refused (issue 20).
        proc = run_cli(*overrides, f"output.dir={tmp_path / f'out-{name}'}")
        assert proc.returncode == 0, proc.stderr
        runs[name] = hashes(tmp_path / f"out-{name}")
    assert runs["hf"] == runs["files"] and runs["raw"] == runs["files"]

    # results.parquet keeps a readable reference, never bytes; the bytes' hash is recorded.
    for name, refs in {"hf": ["cat.jpg", "train-00000-of-00001.parquet#row=1"],
                       "raw": ["raw.parquet#row=0", "raw.parquet#row=1"]}.items():
        t = read_results(tmp_path / f"out-{name}")
        assert not any(pa.types.is_binary(f.type) or pa.types.is_struct(f.type) for f in t.schema)
        assert t.sort_by("row")["image"].to_pylist() == refs
        assert t.sort_by("row")["image_sha256"].to_pylist() == [hashlib.sha256(b).hexdigest() for b in blobs]
    # A second start finds everything done (ids derived from the references are stable).
    again = run_cli(f"manifest.path={hf}", f"output.dir={tmp_path / 'out-hf'}", "dry_run=true")
    assert again.returncode == 0 and "0 to run" in again.stdout + again.stderr, again.stdout + again.stderr


def test_manifest_table_holds_references_not_bytes(tmp_path):
    blobs = sample_bytes()
    pq.write_table(hf_table([blobs[0], None, blobs[1], None], ["a/cat.jpg", "rocket.jpg", None, None],
                            mask=pa.array([b"x"] * 4, pa.binary()), caption=["c0", "c1", "c2", "c3"]),
                   tmp_path / "s.parquet", row_group_size=2)
    with pytest.raises(ManifestError) as info:  # row 3 has neither bytes nor path
        load_manifest(str(tmp_path / "s.parquet"), GEN)
    assert "row 3" in str(info.value) and "image bytes" in str(info.value)

    m = load_manifest(str(tmp_path / "s.parquet"), GEN, limit=3)
    t = m.table
    assert not any(pa.types.is_binary(f.type) or pa.types.is_struct(f.type) for f in t.schema)
    assert m.extra_columns == ["extra.caption"]  # other byte columns are not carried
    assert t["image"].to_pylist() == ["a/cat.jpg", "rocket.jpg", "s.parquet#row=2"]
    uris = t["image_uri"].to_pylist()
    assert uris[0] == f"parquet://{tmp_path / 's.parquet'}#row=0&column=image.bytes"  # bytes win over the path
    assert uris[1] == str(tmp_path / "rocket.jpg")  # no bytes: the path, as for a string column
    assert load_image_digest(uris[2])[1] == hashlib.sha256(blobs[1]).hexdigest()
    # The type check names what is accepted.
    pq.write_table(pa.table({"image": [1, 2]}), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="struct<bytes: binary, path: string>"):
        load_manifest(str(tmp_path / "bad.parquet"), GEN)


def test_cell_reader_is_bounded_in_any_order(tmp_path):
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(10_000) for _ in range(200)]
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"b": pa.array(blobs, pa.binary())}), path, compression="none")  # one row group
    reader = embedded.CellReader(window_bytes=50_000, cache_bytes=120_000)
    for i in range(200):  # in order: each window read once, no restarts
        assert reader.read(str(path), i, "b") == blobs[i]
    w = embedded.window_rows(embedded.parquet_file(open(path, "rb")), 0, "b", 50_000)
    assert 1 < w < 10 and reader.windows_read == -(-200 // w) and reader.restarts == 0
    for i in rng.permutation(200):  # any order: still right, cache within its bound
        assert reader.read(str(path), int(i), "b") == blobs[i]
        assert reader._cached <= 120_000
    with pytest.raises(IndexError):
        reader.read(str(path), 200, "b")
    reader.close()


def test_memory_filesystem_manifest_and_images():
    fs = fsspec.filesystem("memory")
    blobs = sample_bytes()
    for n, b in zip(NAMES, blobs):
        fs.pipe(f"/t13/img/{n}", b)
    with fs.open("/t13/strings.parquet", "wb") as f:  # relative and absolute memory:// image references
        pq.write_table(pa.table({"image": ["img/cat.jpg", "memory://t13/img/rocket.jpg"]}), f)
    for i in range(2):
        with fs.open(f"/t13/hf/train-{i:05d}-of-00002.parquet", "wb") as f:
            pq.write_table(hf_table([blobs[i]], [NAMES[i]]), f)

    m = load_manifest("memory://t13/strings.parquet", GEN)
    got = [load_image(u) for u in m.table["image_uri"].to_pylist()]
    want = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, want)] == [True, True]

    m = load_manifest("memory://t13/hf/*.parquet", GEN)
    assert m.table["image"].to_pylist() == NAMES
    assert [load_image_digest(u)[1] for u in m.table["image_uri"].to_pylist()] == [
        hashlib.sha256(b).hexdigest() for b in blobs]

    with pytest.raises(ImageError, match="not found: memory://t13/img/nope.jpg"):
        load_image("memory://t13/img/nope.jpg")
    with pytest.raises(ImageError, match="byte cap"):
        load_image("memory://t13/img/cat.jpg", max_bytes=1000)
    with pytest.raises(ManifestError, match="existing Parquet file"):
        load_manifest("memory://t13/nope.parquet", GEN)


@pytest.mark.slow
def test_missing_filesystem_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ManifestError, match=r"pip install s3fs \(or pip install 'svd-batch\[s3\]'\)"):
        load_manifest("s3://bucket/train.parquet", GEN)
    with pytest.raises(ImageError, match="pip install gcsfs"):
        load_image("gs://bucket/cat.jpg")
    # Through the CLI: exit 2 and the package in the message (a stand-in s3fs that fails to import).
    (tmp_path / "s3fs.py").write_text("raise ImportError('no s3fs here')")
    proc = run_cli("manifest.path=s3://bucket/train.parquet", f"output.dir={tmp_path / 'o'}", "dry_run=true",
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode == 2 and "pip install s3fs" in proc.stderr, proc.stderr


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with HTTP Range support, as object stores and the Hub do."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        data = open(path, "rb").read()
        start, _, end = rng.removeprefix("bytes=").partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:end + 1])


@pytest.fixture()
def http_folder(tmp_path):
    handler = lambda *a, **k: RangeHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_loopback_http_images_and_manifest(http_folder):
    root, url = http_folder
    blobs = sample_bytes()
    for n, b in zip(NAMES, blobs):
        (root / n).write_bytes(b)
    # Images by URL (urllib, as before) from a manifest of strings.
    write_manifest(root / "urls.parquet", [{"image": f"{url}/{n}"} for n in NAMES])
    m = load_manifest(str(root / "urls.parquet"), GEN)
    assert [load_image_digest(u)[1] for u in m.table["image_uri"].to_pylist()] == [
        hashlib.sha256(b).hexdigest() for b in blobs]
    # A Hugging Face shard served over HTTP: the manifest and its embedded cells are read with range requests.
    pq.write_table(hf_table(blobs, [None, None]), root / "train.parquet", row_group_size=1)
    m = load_manifest(f"{url}/train.parquet", GEN)
    assert m.table["image"].to_pylist() == ["train.parquet#row=0", "train.parquet#row=1"]
    assert [load_image_digest(u)[1] for u in m.table["image_uri"].to_pylist()] == [
        hashlib.sha256(b).hexdigest() for b in blobs]


def test_changed_image_bytes_are_seen_only_where_the_reference_moved(tmp_path):
    blobs = sample_bytes()
    for n, b in zip(NAMES, blobs):
        (tmp_path / n).write_bytes(b)
    (tmp_path / "cat_copy.jpg").write_bytes(blobs[0])
    m = load_manifest(str(write_manifest(tmp_path / "m.parquet", [
        {"id": "a", "image": "cat_copy.jpg"},   # moved, same bytes: not a change
        {"id": "b", "image": "cat.jpg"},        # moved to other bytes: a change
        {"id": "c", "image": "rocket.jpg"},     # unchanged reference: not read
    ])), GEN).table
    sha = [hashlib.sha256(b).hexdigest() for b in blobs]
    records = pa.table({"id": ["a", "b", "c"], "status": ["ok"] * 3,
                        "image": ["cat.jpg", "rocket.jpg", "rocket.jpg"],
                        "image_sha256": [sha[0], sha[1], "not-read"]})
    n, lines = changed_images(m, records)
    assert n == 1 and lines[0].startswith("b: image 'rocket.jpg' -> 'cat.jpg'")


@pytest.mark.slow
def test_bench_embedded_small(tmp_path):
    import subprocess

    from tests.conftest import REPO

    proc = subprocess.run([sys.executable, "scripts/bench_embedded.py", "--rows", "1500", "--kb", "8",
                           "--real-rows", "1", "--keep", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dry run, embedded" in proc.stdout and "real run, 1 rows, image files" in proc.stdout
    assert "cell reader, every row in order: 1500 cells" in proc.stdout and "(0 re-reads" in proc.stdout
