import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from svd_batch.commands.manifest import main
from tests.conftest import REPO, SAMPLE, read_results, run_cli


@pytest.mark.slow
def test_folder_with_sweeps_gives_the_cartesian_product_with_readable_ids(tmp_path):
    (tmp_path / "photos" / "trip").mkdir(parents=True)
    shutil.copy(SAMPLE / "cat.jpg", tmp_path / "photos" / "cat.jpg")
    shutil.copy(SAMPLE / "rocket.jpg", tmp_path / "photos" / "trip" / "launch day.JPG")
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    out = tmp_path / "data" / "m.parquet"
    main([str(tmp_path / "photos"), "-o", str(out), "--sweep", "motion_bucket_id=60,127,180", "--sweep", "seed=1,2"])
    t = pq.read_table(out).to_pylist()
    assert len(t) == 2 * 3 * 2
    assert t[0] == {"id": "cat.motion_bucket_id=60.seed=1", "image": "../photos/cat.jpg", "motion_bucket_id": 60, "seed": 1}
    assert t[-1]["id"] == "trip_launch_day.motion_bucket_id=180.seed=2"
    # It runs as is: images resolve from the manifest's folder.
    res = run_cli(f"manifest.path={out}", f"output.dir={tmp_path / 'run'}", "manifest.limit=2")
    assert res.returncode == 0, res.stderr
    assert read_results(tmp_path / "run")["motion_bucket_id"].to_pylist() == [60, 60]


def test_csv_and_jsonl_sources(tmp_path):
    shutil.copy(SAMPLE / "coffee.jpg", tmp_path / "coffee.jpg")
    (tmp_path / "in.csv").write_text("path,fps,caption\ncoffee.jpg,9,hot\ncoffee.jpg,,cold\n")
    main([str(tmp_path / "in.csv"), "-o", str(tmp_path / "a.parquet"), "--image-column", "path",
          "--sweep", "noise_aug_strength=0.0,0.1"])
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == 4 and all(i.startswith("coffee-") for i in ids)
    assert [i.split(".", 1)[1] for i in ids] == ["noise_aug_strength=0.0", "noise_aug_strength=0.1"] * 2
    # Ids come from content, not position: a line added on top leaves the others' ids as they were.
    (tmp_path / "in2.csv").write_text("path,fps,caption\nrocket.jpg,3,new\ncoffee.jpg,9,hot\ncoffee.jpg,,cold\n")
    main([str(tmp_path / "in2.csv"), "-o", str(tmp_path / "a2.parquet"), "--image-column", "path",
          "--sweep", "noise_aug_strength=0.0,0.1"])
    assert [r["id"] for r in pq.read_table(tmp_path / "a2.parquet").to_pylist()][2:] == ids
    assert [r["fps"] for r in rows] == [9, 9, None, None] and rows[0]["caption"] == "hot"
    with open(tmp_path / "in.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": f"j{i}", "image": "coffee.jpg", "motion_bucket_id": 10 * i}) + "\n")
    main([str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "b.parquet")])
    assert pq.read_table(tmp_path / "b.parquet")["id"].to_pylist() == ["j0", "j1", "j2"]


@pytest.mark.process
def test_invalid_values_are_refused_like_the_runner_does(tmp_path):
    (tmp_path / "img").mkdir()
    shutil.copy(SAMPLE / "cat.jpg", tmp_path / "img" / "cat.jpg")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.manifest", str(tmp_path / "img"), "-o",
                           str(tmp_path / "m.parquet"), "--sweep", "motion_bucket_id=100,300"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "motion_bucket_id" in proc.stderr and "300" in proc.stderr
    assert not (tmp_path / "m.parquet").exists() and list(tmp_path.iterdir()) == [tmp_path / "img"]
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.manifest", str(tmp_path / "img"), "--sweep",
                           "colour=1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "not a generation column" in proc.stderr


def test_parquet_source_with_embedded_images_references_cells(tmp_path):
    """Hugging Face-style shard in, a small manifest out: sweeps multiply references, not image bytes."""
    import hashlib

    import pyarrow as pa

    from svd_batch.images import load_image_digest
    from svd_batch.manifest import load_manifest

    blob = (SAMPLE / "cat.jpg").read_bytes()
    (tmp_path / "rocket.jpg").write_bytes((SAMPLE / "rocket.jpg").read_bytes())
    img = pa.StructArray.from_arrays([pa.array([blob, None], pa.binary()), pa.array(["cat.jpg", "rocket.jpg"])],
                                     ["bytes", "path"])
    pq.write_table(pa.table({"picture": img, "label": [3, 4]}), tmp_path / "train.parquet")
    out = tmp_path / "m" / "m.parquet"
    main([str(tmp_path / "train.parquet"), "-o", str(out), "--image-column", "picture", "--sweep", "seed=1,2"])
    t = pq.read_table(out)
    assert not any(pa.types.is_binary(f.type) for f in t.schema) and t.num_rows == 4
    rows = t.to_pylist()
    assert rows[0]["id"].startswith("cat-") and rows[0]["id"].endswith(".seed=1") and rows[0]["label"] == 3
    assert rows[0]["image"] == f"parquet://{tmp_path / 'train.parquet'}#row=0&column=picture.bytes"
    assert rows[2]["image"] == "../rocket.jpg"  # no bytes: the path, relative to the new manifest
    m = load_manifest(str(out), {"fps": 7, "motion_bucket_id": 127, "noise_aug_strength": 0.02, "num_frames": 8,
                                 "num_inference_steps": 4, "height": 64, "width": 64, "min_guidance_scale": 1.0,
                                 "max_guidance_scale": 3.0, "decode_chunk_size": 8})
    assert load_image_digest(m.table["image_uri"][0].as_py())[1] == hashlib.sha256(blob).hexdigest()
    rocket = (tmp_path / "rocket.jpg").read_bytes()
    assert load_image_digest(m.table["image_uri"][2].as_py())[1] == hashlib.sha256(rocket).hexdigest()
