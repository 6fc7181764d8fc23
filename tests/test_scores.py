"""Quality scores: they rank a static clip and a moving one the right way, from a run's files alone."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd_batch.fields import RESULT_SCHEMA
from svd_batch.rundir import RunDir
from svd_batch.scores import flicker_score, motion_score, score_video
from svd_batch.video import write_mp4
from tests.conftest import REPO, SAMPLE, input_file, read_results, run_cli, write_manifest

W = H = 64
F = 8


def _image() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE / "cat.jpg").convert("RGB").resize((W, H)))


def _moving(img: np.ndarray) -> np.ndarray:
    """A pan across the picture and into another one: what a video with motion looks like to the scores."""
    other = np.asarray(Image.open(SAMPLE / "rocket.jpg").convert("RGB").resize((W, H)))
    strip = np.concatenate([img, other], axis=1)
    return np.stack([strip[:, 8 * t: 8 * t + W] for t in range(F)])


def test_pixel_scores_on_synthetic_frames():
    img = _image()
    static = np.repeat(img[None], F, axis=0)
    assert motion_score(static) == 0.0 and flicker_score(static) == 0.0
    moving = _moving(img)
    assert motion_score(moving) > 0.02
    # Brightness pumping from frame to frame flickers; a steady pan with more per-frame change does not.
    pumping = np.stack([img if t % 2 else (img * 0.8).astype(np.uint8) for t in range(F)])
    assert motion_score(pumping) < motion_score(moving)
    assert flicker_score(pumping) > 2 * flicker_score(moving)
    assert score_video(static[:1])["motion_score"] is None  # one frame: no motion to measure
    assert score_video(static)["image_similarity"] is None  # no encoder: left empty, not made up


@pytest.fixture()
def scored_folder(tmp_path):
    """A run folder laid out as svd-batch lays it out: one static video, one with motion, their inputs."""
    root = tmp_path / "run"
    (root / "videos").mkdir(parents=True)
    (root / ".svd-batch").mkdir()
    img = _image()
    rows = []
    for i, (rid, frames) in enumerate([("static", np.repeat(img[None], F, axis=0)), ("moving", _moving(img))]):
        write_mp4(frames, str(root / "videos" / f"{rid}.mp4"), 8)
        RunDir(str(root)).save_input(rid, Image.fromarray(img))
        rows.append({"id": rid, "status": "ok", "video_path": f"videos/{rid}.mp4", "image": str(SAMPLE / "cat.jpg"),
                     "row": i, "width": W, "height": H, "num_frames": F, "fps": 8})
    rows.append({"id": "broken", "status": "failed", "error": "row broken: file not found", "row": 2,
                 "image": "nowhere.jpg", "width": W, "height": H})
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), root / "results.parquet")
    (root / "config.yaml").write_text("model:\n  name: tiny\n  path: builtin:tiny\n  variant: null\n")
    return root


@pytest.mark.slow
def test_svd_batch_score_ranks_static_below_moving(scored_folder):
    before = (scored_folder / "results.parquet").stat().st_ino
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(scored_folder)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "scored 2 rows" in proc.stdout
    # A summary per score: its distribution, then the lowest rows (the static clip first for motion).
    assert "motion_score (2 rows): min " in proc.stdout and "median" in proc.stdout
    assert "lowest 2: static " in proc.stdout.split("motion_score (2 rows)")[1].splitlines()[1]
    # The report shows the scores, so it is written again from the new results.
    assert "report rewritten with the new scores: contact_sheet.png, index.html" in proc.stdout
    assert (scored_folder / "index.html").exists()
    assert "torchvision" not in proc.stderr and "Loading weights" not in proc.stderr  # library noise is hidden
    t = {r["id"]: r for r in read_results(scored_folder).to_pylist()}
    assert (scored_folder / "results.parquet").stat().st_ino != before  # replaced whole, by rename
    static, moving, broken = t["static"], t["moving"], t["broken"]
    assert static["motion_score"] < moving["motion_score"]
    assert static["motion_score"] < 0.01  # only H.264 noise
    assert static["image_similarity"] > moving["image_similarity"]
    assert static["image_similarity"] > 0.95
    assert static["flicker_score"] is not None and moving["flicker_score"] is not None
    assert broken["motion_score"] is None and broken["image_similarity"] is None
    assert not [p for p in scored_folder.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_svd_batch_score_without_results_or_encoder_is_a_usage_error(scored_folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(empty)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no results.parquet" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(scored_folder), "--model", str(tmp_path / "nope")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--no-embed" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(scored_folder), "--no-embed"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    t = {r["id"]: r for r in read_results(scored_folder).to_pylist()}
    assert t["static"]["image_similarity"] is None and t["moving"]["motion_score"] > 0.02


@pytest.mark.slow
def test_svd_batch_score_gives_the_run_s_own_values(tmp_path):
    """The run scores its files as written (MP4 decoded, input as saved), exactly as svd-batch-score reads them."""
    rows = [{"id": "cat", "image": str(SAMPLE / "cat.jpg")}, {"id": "rocket", "image": str(SAMPLE / "rocket.jpg")}]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.page_size=7")
    assert proc.returncode == 0, proc.stderr
    ran = {r["id"]: r for r in read_results(out).to_pylist()}
    page = (out / "index.html").read_text()
    os.unlink(out / "index.html")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    again = {r["id"]: r for r in read_results(out).to_pylist()}
    for rid in ran:
        assert again[rid]["motion_score"] == ran[rid]["motion_score"]
        assert again[rid]["flicker_score"] == ran[rid]["flicker_score"]
        # the same encoder on the same device; only CPU thread counts may round differently
        assert abs(again[rid]["image_similarity"] - ran[rid]["image_similarity"]) < 1e-5
    assert '"pageSize": 7' in (out / "index.html").read_text() and '"pageSize": 7' in page  # the run's settings


@pytest.mark.slow
def test_a_run_records_scores_and_report_scores_false_turns_them_off(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "cat", "image": str(SAMPLE / "cat.jpg")}])
    proc = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'on'}", "report.enabled=false")
    assert proc.returncode == 0, proc.stderr
    r = read_results(tmp_path / "on").to_pylist()[0]
    assert r["motion_score"] > 0 and -1 <= r["image_similarity"] <= 1 and r["flicker_score"] >= 0
    # The conditioning image as the model saw it (resized to the row's size) is kept for the gallery.
    assert Image.open(input_file(tmp_path / "on", "cat")).size == (64, 64)
    proc = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'off'}", "report.enabled=false", "report.scores=false")
    assert proc.returncode == 0, proc.stderr
    r = read_results(tmp_path / "off").to_pylist()[0]
    assert r["motion_score"] is None and r["image_similarity"] is None and r["flicker_score"] is None
