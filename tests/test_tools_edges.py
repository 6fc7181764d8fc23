"""The side tools at their edges: verify never reports success it did not check, score and the manifest builder
take what a real folder holds, and the wording says what happened."""

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd_batch.fields import RESULT_SCHEMA
from tests.conftest import REPO, SAMPLE, TINY, read_results, write_manifest

GEN = dict(seed=42, height=64, width=64, num_frames=8, num_inference_steps=4, fps=7, motion_bucket_id=127,
           noise_aug_strength=0.02, min_guidance_scale=1.0, max_guidance_scale=3.0, decode_chunk_size=8)


def exits(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


# -- svd-batch-verify ---------------------------------------------------------------------------------------------
def verify_folder(root, statuses=("ok", "failed"), manifest="m.parquet", image_uri=True, drop=()):
    """A folder as a run leaves it (config.yaml, results.parquet), without videos: verify's checks need no more."""
    from svd_batch.settings import RunSettings

    root.mkdir(parents=True)
    (root / "config.yaml").write_text(RunSettings.compose(*TINY, f"manifest.path={manifest}").to_yaml())
    ids = ["a", "b", "c"][:len(statuses)]
    rows = [{"id": i, "status": s, "image": "cat.jpg", "image_uri": str(SAMPLE / "cat.jpg") if image_uri else None,
             "frames_sha256": "0" * 64 if s == "ok" else None, "device": "cpu", "seed": 1, "row": k}
            for k, (i, s) in enumerate(zip(ids, statuses))]
    t = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    pq.write_table(t.drop_columns(list(drop)), root / "results.parquet")
    return root


def test_verify_refuses_what_it_cannot_check_before_loading_anything(tmp_path, capsys):
    from svd_batch.commands.verify import main

    root = verify_folder(tmp_path / "run")
    code, err = exits(main, [str(root), "--ids", "nope"], capsys)
    assert code == 2 and "'nope' is not in" in err and "0 of 0" not in err
    code, err = exits(main, [str(root), "--ids", "b"], capsys)
    assert code == 2 and "'b' did not finish ok (status 'failed')" in err
    code, err = exits(main, [str(root), "--ids", "a,nope,b"], capsys)
    assert code == 2 and "'nope'" in err and "'b'" in err
    code, err = exits(main, [str(root), "--ids", ","], capsys)
    assert code == 2 and "names no id" in err
    code, err = exits(main, [str(root), "--sample", "-3"], capsys)
    assert code == 2 and "1 or more" in err and "Traceback" not in err
    # Folders svd-batch did not make: nothing to compare with, or no settings to make the rows with.
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = exits(main, [str(empty)], capsys)
    assert code == 2 and "has no results.parquet" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.table({"id": ["a"], "status": ["ok"]}), foreign / "results.parquet")
    code, err = exits(main, [str(foreign)], capsys)
    assert code == 2 and "has no config.yaml" in err and "svd-batch run" in err
    old = verify_folder(tmp_path / "old", drop=("frames_sha256",))
    code, err = exits(main, [str(old)], capsys)
    assert code == 2 and "lacks the column(s) frames_sha256" in err
    nothing_ok = verify_folder(tmp_path / "allfailed", statuses=("failed", "failed"))
    code, err = exits(main, [str(nothing_ok)], capsys)
    assert code == 2 and "no row with status 'ok'" in err
    assert len(err.strip().splitlines()) == 1  # one paragraph


def test_verify_reads_each_row_s_image_where_the_run_resolved_it(tmp_path, monkeypatch):
    """A run whose relative manifest.path was relative to another directory verifies from anywhere: results.parquet
    records where each row's image was read from; a table too old to record it says how to pass the manifest."""
    from svd_batch.verify import VerifyError, plan

    root = verify_folder(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # m.parquet is not here (nor anywhere)
    p = plan(str(root), ids=["a"])
    assert [r["image_uri"] for r in p.rows] == [str(SAMPLE / "cat.jpg")]
    old = verify_folder(tmp_path / "old", image_uri=False)
    with pytest.raises(VerifyError, match=r"manifest.path 'm.parquet' is relative .* pass --manifest"):
        plan(str(old), ids=["a"])
    write_manifest(tmp_path / "elsewhere" / "m.parquet", [{"id": "a", "image": str(SAMPLE / "rocket.jpg")}])
    assert plan(str(old), ids=["a"], manifest=str(tmp_path / "elsewhere" / "m.parquet")).rows[0]["image_uri"] == \
        str(SAMPLE / "rocket.jpg")


# -- svd-batch-score ----------------------------------------------------------------------------------------------
def test_score_refuses_a_foreign_results_table_in_one_paragraph(tmp_path, capsys):
    from svd_batch.commands.score import main

    root = tmp_path / "run"
    root.mkdir()
    pq.write_table(pa.table({"id": ["a"], "path": ["videos/a.mp4"]}), root / "results.parquet")
    code, err = exits(main, [str(root), "--no-embed"], capsys)
    assert code == 2 and "lacks the column(s) status, video_path" in err and "KeyError" not in err
    (root / "results.parquet").write_bytes(b"PAR1 not parquet")
    code, err = exits(main, [str(root), "--no-embed"], capsys)
    assert code == 2 and "cannot be read as Parquet" in err


@pytest.mark.slow
def test_score_names_a_corrupt_video_and_scores_the_rest(tmp_path):
    from svd_batch.video import write_mp4

    root = tmp_path / "run"
    (root / "videos").mkdir(parents=True)
    frames = np.stack([np.roll(np.asarray(Image.open(SAMPLE / "cat.jpg").convert("RGB").resize((64, 64))), 4 * t, 1)
                       for t in range(8)])
    write_mp4(frames, str(root / "videos" / "good.mp4"), 8)
    (root / "videos" / "bad.mp4").write_bytes((root / "videos" / "good.mp4").read_bytes()[:300])  # cut short
    (root / "videos" / "zero.mp4").write_bytes(b"")
    rows = [{"id": i, "status": "ok", "video_path": f"videos/{i}.mp4", "row": k, "width": 64, "height": 64}
            for k, i in enumerate(("bad", "good", "zero"))]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), root / "results.parquet")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.score", str(root), "--no-embed", "--no-report"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    named = [line for line in proc.stdout.splitlines() if "cannot be scored" in line]
    assert len(named) == 2 and "row 'bad': videos/bad.mp4" in named[0] and "row 'zero'" in named[1]
    assert "scored 1 rows" in proc.stdout
    t = {r["id"]: r for r in read_results(root).to_pylist()}
    assert t["good"]["motion_score"] > 0 and t["bad"]["motion_score"] is None and t["zero"]["motion_score"] is None


# -- svd-batch-manifest -------------------------------------------------------------------------------------------
def test_folder_ids_are_unique_valid_and_stable():
    from svd_batch.build_manifest import folder_ids
    from svd_batch.manifest import ID_PATTERN

    long = "x" * 250
    names = ["A.jpg", "a.jpg", "x.jpg", "x.png", "sub/y.jpg", "sub_y.jpg", "=z.jpg", "é.png", "plain.jpg",
             f"{long}.jpg", f"{long}.png", f"dir/{long}.webp"]
    ids = folder_ids(names)
    assert len({i.lower() for i in ids}) == len(ids)
    assert all(re.match(ID_PATTERN, i) for i in ids), ids
    d = dict(zip(names, ids))
    assert d["plain.jpg"] == "plain" and d["x.jpg"] == "x.jpg" and d["x.png"] == "x.png"  # extension when shared
    assert re.fullmatch(r"A-[0-9a-f]{8}", d["A.jpg"]) and re.fullmatch(r"a-[0-9a-f]{8}", d["a.jpg"])
    assert d["=z.jpg"] == "z" and d["é.png"] == "_"
    assert all(len(d[n]) == 200 for n in names if long in n)
    assert folder_ids(list(reversed(names))) == list(reversed(ids))  # the same folder, the same ids
    assert max(len(i) for i in folder_ids(names, room=150)) == 150


def test_any_folder_of_images_becomes_a_manifest(tmp_path, capsys):
    from svd_batch.commands.manifest import main
    from svd_batch.manifest import load_manifest

    src = tmp_path / "photos"
    src.mkdir()
    long = "holiday " * 30
    for name in ("A.jpg", "a.jpg", "x.jpg", "x.png", f"{long}.jpg", f"{long}.png"):
        shutil.copy(SAMPLE / "cat.jpg", src / name)
    out = tmp_path / "m.parquet"
    main([str(src), "-o", str(out), "--sweep", "seed=1,22"])
    assert "wrote 12 rows" in capsys.readouterr().out
    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == 12 and max(map(len, ids)) <= 200
    assert len(load_manifest(str(out), GEN)) == 12  # the runner takes it as it is
    # A source whose rows cannot be run is named, in this command's words (not a temporary file's, nor "run").
    (tmp_path / "in.csv").write_text("id,image,fps\nok,a.jpg,7\nbad id,a.jpg,7\n")
    code, err = exits(main, [str(tmp_path / "in.csv"), "-o", str(tmp_path / "c.parquet")], capsys)
    assert code == 2 and str(tmp_path / "in.csv") in err and "c.parquet was not written" in err
    assert ".tmp-" not in err and "nothing was run" not in err and "'bad id'" in err


# -- scores, manifests and wording --------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 4096), (4096, 16), (1, 300), (2, 2)])
def test_scores_of_extreme_aspect_ratios_are_real_numbers_without_warnings(shape):
    from svd_batch.scores import score_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (8, *shape, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = score_video(frames)
    assert np.isfinite(s["motion_score"]) and s["motion_score"] > 0.05
    assert np.isfinite(s["flicker_score"]) and s["flicker_score"] > 0.0


def test_a_category_image_column_is_read_like_strings(tmp_path):
    import pandas as pd

    from svd_batch.manifest import load_manifest

    df = pd.DataFrame({"image": pd.Categorical(["a.jpg", "b.jpg", "a.jpg"]), "fps": [7, 8, 9],
                       "id": pd.Categorical(["x", "y", "z"]), "tag": pd.Categorical(["p", "q", "p"])})
    df.to_parquet(tmp_path / "m.parquet")
    assert pa.types.is_dictionary(pq.read_table(tmp_path / "m.parquet").schema.field("image").type)
    m = load_manifest(str(tmp_path / "m.parquet"), GEN, where={"tag": "p"})
    assert m.table["image"].to_pylist() == ["a.jpg", "a.jpg"] and m.table["id"].to_pylist() == ["x", "z"]
    # One shard of categories and one of plain strings are one manifest.
    (tmp_path / "shards").mkdir()
    df.to_parquet(tmp_path / "shards" / "0.parquet")
    df.astype({"image": str, "id": str, "tag": str}).assign(id=["u", "v", "w"]).to_parquet(tmp_path / "shards" / "1.parquet")
    assert len(load_manifest(str(tmp_path / "shards"), GEN)) == 6


def test_a_binary_id_that_is_not_text_names_its_row(tmp_path):
    from svd_batch.manifest import ManifestError, load_manifest

    write_manifest(tmp_path / "m.parquet", [{"id": b"ok", "image": "a.jpg"}, {"id": b"fine", "image": "b.jpg"},
                                            {"id": b"\xff\xfe", "image": "c.jpg"}])
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path / "m.parquet"), GEN)
    text = str(info.value)
    assert "row 2: column 'id' = b'\\xff\\xfe'" in text and "all rows" not in text and "UTF-8" in text


def test_the_id_rule_says_ascii_letters(tmp_path):
    from svd_batch.manifest import ManifestError, load_manifest

    write_manifest(tmp_path / "m.parquet", [{"id": "café", "image": "a.jpg"}])
    with pytest.raises(ManifestError, match="ASCII letters"):
        load_manifest(str(tmp_path / "m.parquet"), GEN)


def test_a_malformed_http_answer_is_not_called_a_timeout():
    from svd_batch.images import ImageError, fetch_bytes

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        with pytest.raises(ImageError) as info:
            fetch_bytes(f"http://127.0.0.1:{srv.getsockname()[1]}/x.png", timeout=3, max_bytes=1000)
    finally:
        t.join(10)
        srv.close()
    assert "BadStatusLine" in str(info.value) and "timeout" not in str(info.value)


def test_the_page_and_the_terminal_count_videos_per_minute_and_the_histogram_whole_videos(tmp_path):
    from svd_batch.report.charts import nice_ticks, seconds_histogram

    svg = seconds_histogram(np.array([10.0, 11.0, 30.0]))
    counts = re.findall(r'<text x="48" [^>]*>([^<]+)</text>', svg)  # the y axis' labels (left of the plot)
    assert counts and all(c.isdigit() for c in counts), counts
    assert nice_ticks(1, whole=True) == [0, 1] and nice_ticks(7, whole=True) == [0, 2, 4, 6, 8]
    assert nice_ticks(7) == [0, 2, 4, 6, 8] and nice_ticks(1)[1] == 0.25  # other axes keep their fine steps
    from tests.test_report_edges import hostile_run

    from svd_batch.report import write_gallery

    hostile_run(tmp_path / "run", "http://127.0.0.1:9")
    write_gallery(str(tmp_path / "run"))
    page = (tmp_path / "run" / "index.html").read_text()
    assert "videos per minute</th><td>" in page and "per hour" not in page
