"""Bad rows, bad files and out-of-memory never stop a run or lose work (end to end through the CLI)."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from svd_batch.tiny import default_cache_dir
from tests.conftest import read_results, run_cli, tmp_files, video_names, write_manifest
from tests.test_images import server  # noqa: F401  (the HTTP fixture)

pytestmark = pytest.mark.slow


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_mixed_manifest_finishes_good_rows_and_records_bad_ones(tmp_path, server):  # noqa: F811
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGBA", (32, 32), (200, 10, 10, 128)).save(img / "rgba.png")
    Image.new("CMYK", (32, 32), (0, 200, 200, 0)).save(img / "cmyk.jpg")
    Image.new("L", (32, 32), 90).save(img / "grey.png")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(img / "grey16.png")
    Image.new("P", (32, 32), 5).save(img / "palette.gif")
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(img / "anim.gif", save_all=True, append_images=frames[1:], loop=0)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (48, 32), (9, 9, 9)).save(img / "rotated.jpg", exif=exif)
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (img / "trunc.jpg").write_bytes(buf.getvalue()[:300])
    (img / "notes.jpg").write_text("this is text")
    (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    Image.new("RGB", (600, 600)).save(img / "huge.png")

    good = ["img/rgba.png", "img/cmyk.jpg", "img/grey.png", "img/grey16.png", "img/palette.gif", "img/anim.gif",
            "img/rotated.jpg", f"{server}/ok.png"]
    bad = {"img/missing.jpg": "file not found", "img/trunc.jpg": "truncated", "img/notes.jpg": "not an image",
           "img/corrupt.png": "", "img/huge.png": "images.max_pixels", f"{server}/gone.png": "HTTP 404",
           f"{server}/slow.png": "images.timeout", f"{server}/big.png": "byte cap"}
    rows = [{"id": f"good{i}", "image": p} for i, p in enumerate(good)]
    rows += [{"id": f"bad{i}", "image": p} for i, p in enumerate(bad)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    before = [p for p in tree(tmp_path) if not p.startswith("out")]
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "images.timeout=1", "images.max_bytes=100000",
                   "images.max_pixels=200000")
    assert proc.returncode == 1, proc.stderr  # some rows failed, after all others finished
    res = {r["id"]: r for r in read_results(out).to_pylist()}
    assert len(res) == len(rows)
    for i in range(len(good)):
        assert res[f"good{i}"]["status"] == "ok", res[f"good{i}"]["error"]
    for i, (path, reason) in enumerate(bad.items()):
        r = res[f"bad{i}"]
        assert r["status"] == "failed" and r["frames_sha256"] is None and r["video_path"] is None
        assert r["error"].startswith(f"row bad{i}: image ") and path in r["error"] and reason in r["error"]
        assert "\n" not in r["error"]
    assert video_names(out) == sorted(f"good{i}.mp4" for i in range(len(good)))
    assert [p for p in tree(tmp_path) if not p.startswith("out")] == before  # nothing written outside
    assert not tmp_files(out)


def test_out_of_memory_retries_in_cheaper_modes(tmp_path):
    from tests.conftest import SAMPLE

    rows = [{"id": i, "image": str(SAMPLE / "cat.jpg")} for i in ("plain", "twice", "hopeless", "after")]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    # Injected CUDA OOM: "twice" fails its first two attempts, "hopeless" every attempt.
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}",
                   env={"SVD_BATCH_INJECT_OOM": "twice:2,hopeless:99"})
    assert proc.returncode == 1
    res = {r["id"]: r for r in read_results(out).to_pylist()}
    assert res["plain"]["memory_mode"] == "full" and res["plain"]["decode_chunk_size"] == 8
    assert res["twice"]["status"] == "ok"
    assert res["twice"]["memory_mode"] == "full+decode_chunk_2+forward_chunking"
    assert res["twice"]["decode_chunk_size"] == 2
    assert res["hopeless"]["status"] == "failed"
    assert "full, full+decode_chunk_2, full+decode_chunk_2+forward_chunking, " \
           "full+decode_chunk_2+forward_chunking+cpu_offload" in res["hopeless"]["error"]
    # The row after goes back to the configured mode, and gives what it gives without any OOM before it.
    assert res["after"]["memory_mode"] == "full" and res["after"]["decode_chunk_size"] == 8
    alone = tmp_path / "alone"
    assert run_cli(f"manifest.path={m}", f"output.dir={alone}", "+manifest.where.id=after").returncode == 0
    assert read_results(alone)["frames_sha256"].to_pylist() == [res["after"]["frames_sha256"]]


def test_truncated_weights_give_a_clear_message(tmp_path):
    from tests.conftest import SAMPLE

    model = tmp_path / "model"
    shutil.copytree(default_cache_dir(), model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": str(SAMPLE / "cat.jpg")}])
    proc = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'out'}", f"model.path={model}")
    assert proc.returncode == 2
    assert "could not be loaded" in proc.stderr and str(model) in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr
