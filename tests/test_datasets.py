"""Describing a dataset with a manifest config entry: sharded Parquet, foreign columns, defaults, filters."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from svd_batch.manifest import ManifestError, load_for, load_manifest
from svd_batch.manifest_files import read_table
from svd_batch.settings import RunSettings
from tests.conftest import SAMPLE, read_results, run_cli, video_names, write_manifest


def read_manifest(cfg):
    return load_for(RunSettings.from_config(cfg))


ENTRY = """\
# @package _global_
manifest:
  name: mydata
  path: {path}
  image_root: {root}
  columns: {{image: image_path, id: uid, motion_bucket_id: motion}}
  defaults: {{fps: 10, noise_aug_strength: 0.05}}
  limit: null
  where: {{split: val}}
"""


@pytest.fixture()
def dataset(tmp_path):
    """Three Parquet shards, as Spark writes them, with their own column names and extra columns."""
    root = tmp_path / "images"
    root.mkdir()
    for f in ("cat.jpg", "rocket.jpg"):
        (root / f).write_bytes((SAMPLE / f).read_bytes())
    shards = tmp_path / "ds"
    shards.mkdir()
    uid = 0
    for part in range(3):
        rows = []
        for k in range(3):
            rows.append({"uid": f"u{uid}", "image_path": ["cat.jpg", "rocket.jpg"][uid % 2],
                         "motion": 20 * uid, "caption": f"caption {uid}",
                         "split": "val" if uid % 3 != 2 else "train", "fps": 4 if uid == 0 else None})
            uid += 1
        pq.write_table(pa.Table.from_pylist(rows), shards / f"part-{part:05d}.snappy.parquet")
    (shards / "_SUCCESS").write_text("")
    conf = tmp_path / "myconf" / "manifest"
    conf.mkdir(parents=True)
    (conf / "mydata.yaml").write_text(ENTRY.format(path=shards, root=root))
    return tmp_path


@pytest.mark.slow
def test_config_entry_maps_filters_and_keeps_extras(dataset):
    out = dataset / "out"
    proc = run_cli(f"--config-dir={dataset / 'myconf'}", "manifest=mydata", f"output.dir={out}")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    val = [f"u{i}" for i in range(9) if i % 3 != 2]
    assert t["id"].to_pylist() == val  # sorted files, then row order; train rows filtered out
    assert t["extra.caption"].to_pylist() == [f"caption {i[1:]}" for i in val]
    assert set(t["extra.split"].to_pylist()) == {"val"}
    assert t["motion_bucket_id"].to_pylist() == [20 * int(i[1:]) for i in val]
    assert t["fps"].to_pylist() == [4] + [10] * (len(val) - 1)  # row value beats dataset default
    assert set(t["noise_aug_strength"].to_pylist()) == {0.05}
    assert set(t["status"].to_pylist()) == {"ok"}
    assert video_names(out) == sorted(f"{i}.mp4" for i in val)
    # Default output folder is named after the entry.
    dry = run_cli(f"--config-dir={dataset / 'myconf'}", "manifest=mydata", "dry_run=true", "manifest.limit=2")
    assert dry.returncode == 0 and "manifest: 'mydata'" in dry.stdout and "2 selected" in dry.stdout
    assert "outputs/mydata-tiny" in dry.stdout


def test_precedence_row_over_dataset_over_generation_over_preset(dataset):
    with initialize_config_module("svd_batch.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny", "generation.num_inference_steps=3", f"manifest.path={dataset / 'm.parquet'}",
            "+manifest.defaults.fps=10", "+manifest.defaults.num_inference_steps=5"])
    write_manifest(dataset / "m.parquet", [{"image": "a.jpg", "fps": 2}, {"image": "b.jpg"}])
    t = read_manifest(cfg).table
    assert t["fps"].to_pylist() == [2, 10]                  # row > dataset defaults
    assert t["num_inference_steps"].to_pylist() == [5, 5]   # dataset defaults > generation.*
    assert t["height"].to_pylist() == [64, 64]              # model preset (tiny), nothing above it
    cfg.manifest.defaults = {}
    assert read_manifest(cfg).table["num_inference_steps"].to_pylist() == [3, 3]  # generation.* > preset
    assert read_manifest(cfg).table["motion_bucket_id"].to_pylist() == [127, 127]  # config.yaml base


def test_row_order_is_stable_across_reads(dataset):
    a, _ = read_table(str(dataset / "ds"))
    b, _ = read_table(str(dataset / "ds"))
    assert a.equals(b) and a["uid"].to_pylist() == [f"u{i}" for i in range(9)]


@pytest.mark.slow
def test_dataset_errors_name_the_entry(dataset):
    gen = {"fps": 7}
    with pytest.raises(ManifestError, match="'nope'.*mapped from 'image'"):
        load_manifest(str(dataset / "ds"), gen, columns={"image": "nope"})
    pq.write_table(pa.table({"image": ["a.jpg"], "fps": ["fast"]}), dataset / "s.parquet")
    with pytest.raises(ManifestError, match="'fps'.*integer column"):
        load_manifest(str(dataset / "s.parquet"), gen)
    with pytest.raises(ManifestError, match="at least one row"):
        load_manifest(str(dataset / "ds"), gen, columns={"image": "image_path"}, where={"split": "test"})
    (dataset / "empty").mkdir()
    with pytest.raises(ManifestError, match="no Parquet|No Parquet"):
        load_manifest(str(dataset / "empty"), gen)
    pq.write_table(pa.table({"motion": ["high"]}), dataset / "ds" / "part-00009.parquet")
    with pytest.raises(ManifestError, match="do not fit together"):
        load_manifest(str(dataset / "ds"), gen)
    # Through the CLI, the message names the config entry.
    proc = run_cli(f"--config-dir={dataset / 'myconf'}", "manifest=mydata", f"output.dir={dataset / 'o'}")
    assert proc.returncode == 2 and "The manifest 'mydata'" in proc.stderr and "do not fit together" in proc.stderr


HF_ENTRY = """\
# @package _global_
manifest:
  name: hub
  path: {path}/data/train-*.parquet
  image_root: null
  columns: {{image: frame, motion_bucket_id: motion}}
  defaults: {{}}
  limit: null
  where: {{}}
"""


@pytest.mark.slow
def test_entry_for_hugging_face_shards(tmp_path):
    """A dataset entry over Hub-style shards: struct image column under its own name, mapped with columns:."""
    import json

    (tmp_path / "data").mkdir()
    blob = (SAMPLE / "cat.jpg").read_bytes()
    for i in range(2):
        frame = pa.StructArray.from_arrays([pa.array([blob, blob], pa.binary()), pa.array([f"{i}a.jpg", None])],
                                           ["bytes", "path"])
        t = pa.table({"frame": frame, "motion": [10 * i, 10 * i + 1], "label": [i, i]})
        t = t.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": {"frame": {"_type": "Image"}}}})})
        pq.write_table(t, tmp_path / "data" / f"train-{i:05d}-of-00002.parquet")
    conf = tmp_path / "myconf" / "manifest"
    conf.mkdir(parents=True)
    (conf / "hub.yaml").write_text(HF_ENTRY.format(path=tmp_path))
    with initialize_config_module("svd_batch.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny"])
    cfg.manifest = OmegaConf.load(conf / "hub.yaml").manifest
    t = read_manifest(cfg).table
    assert t["image"].to_pylist() == ["0a.jpg", "train-00000-of-00002.parquet#row=1",
                                      "1a.jpg", "train-00001-of-00002.parquet#row=1"]
    assert t["motion_bucket_id"].to_pylist() == [0, 1, 10, 11] and "extra.label" in t.column_names
    assert all(u.startswith("parquet://") for u in t["image_uri"].to_pylist())
    dry = run_cli(f"--config-dir={tmp_path / 'myconf'}", "manifest=hub", "dry_run=true",
                  f"output.dir={tmp_path / 'o'}")
    assert dry.returncode == 0 and "manifest: 'hub'" in dry.stdout, dry.stderr


@pytest.mark.slow
def test_plain_overrides_add_to_an_entry_s_own_mapping(dataset):
    """`manifest.columns.X=...` (no `+`) on top of an entry that maps columns itself, as the hints write it."""
    proc = run_cli(f"--config-dir={dataset / 'myconf'}", "manifest=mydata", "dry_run=true",
                   "manifest.columns.seed=motion", "manifest.where.split=[val,train]",
                   "manifest.defaults.num_inference_steps=3")
    assert proc.returncode == 0, proc.stderr
    assert "9 selected" in proc.stdout and "num_inference_steps 3" in proc.stdout


def save_to_disk(folder, table: pa.Table, shards: int = 2):
    """The layout `datasets`' Dataset.save_to_disk writes: Arrow IPC streams listed in state.json."""
    import json

    folder.mkdir(parents=True)
    names, per = [], -(-table.num_rows // shards)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(k * per, per))
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return folder


@pytest.mark.slow
def test_a_datasets_save_to_disk_folder_runs_or_says_what_to_do(tmp_path):
    meta = {b"huggingface": b'{"info": {"features": {"image": {"_type": "Image"}}}}'}
    rows = pa.table({"image": [str(SAMPLE / "cat.jpg"), str(SAMPLE / "rocket.jpg"), str(SAMPLE / "coffee.jpg")],
                     "id": ["c", "r", "k"], "motion": [10, 20, 30]})
    saved = save_to_disk(tmp_path / "saved", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={saved}", f"output.dir={out}", "manifest.columns.motion_bucket_id=motion")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    assert t["id"].to_pylist() == ["c", "r", "k"] and t["motion_bucket_id"].to_pylist() == [10, 20, 30]
    assert set(t["status"].to_pylist()) == {"ok"}
    one, _ = read_table(str(saved / "data-00001-of-00002.arrow"))  # one Arrow file by itself
    assert one["id"].to_pylist() == ["k"]

    # Images stored inside the Arrow files: not read there; the message gives the to_parquet line to run.
    png = (SAMPLE / "cat.jpg").read_bytes()
    embedded = pa.table({"image": pa.array([{"bytes": png, "path": "cat.jpg"}],
                                           pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
                        ).replace_schema_metadata(meta)
    inside = save_to_disk(tmp_path / "inside", embedded, shards=1)
    proc = run_cli(f"manifest.path={inside}", "dry_run=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"load_from_disk('{inside}').to_parquet('inside.parquet')" in proc.stderr, proc.stderr
    assert "No Parquet files" not in proc.stderr and "magic bytes" not in proc.stderr

    # A DatasetDict: one folder per split; the message names them.
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    save_to_disk(tmp_path / "dict" / "train", rows)
    with pytest.raises(ManifestError, match=r"(?s)DatasetDict.*/dict/train, .*/dict/test"):
        read_table(str(tmp_path / "dict"))
