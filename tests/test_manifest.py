import math

import pyarrow as pa
import pytest

from svd_batch.manifest import ManifestError, load_manifest
from tests.conftest import write_manifest

GEN = dict(seed=42, height=576, width=1024, num_frames=14, num_inference_steps=25, fps=7, motion_bucket_id=127,
           noise_aug_strength=0.02, min_guidance_scale=1.0, max_guidance_scale=3.0, decode_chunk_size=8)


def load(tmp_path, rows, **kw):
    return load_manifest(str(write_manifest(tmp_path / "m.parquet", rows)), GEN, **kw)


def problems_of(tmp_path, rows, **kw):
    with pytest.raises(ManifestError) as info:
        load(tmp_path, rows, **kw)
    return info.value


def test_defaults_fill_nulls_and_rows_override(tmp_path):
    m = load(tmp_path, [{"image": "a.jpg", "fps": 12, "height": None}, {"image": "b.jpg", "fps": None, "height": 64}])
    t = m.table.to_pylist()
    assert t[0]["fps"] == 12 and t[0]["height"] == 576
    assert t[1]["fps"] == 7 and t[1]["height"] == 64
    assert t[0]["motion_bucket_id"] == 127 and t[0]["noise_aug_strength"] == 0.02
    assert t[0]["seed"] is None  # derived later, from the id


def test_dataset_defaults_sit_between_generation_and_rows(tmp_path):
    m = load(tmp_path, [{"image": "a.jpg", "fps": None}, {"image": "b.jpg", "fps": 3}], defaults={"fps": 10})
    assert m.table["fps"].to_pylist() == [10, 3]


def test_relative_images_resolve_against_manifest_folder(tmp_path):
    m = load(tmp_path, [{"image": "sub/a.jpg"}, {"image": "/abs/b.png"}, {"image": "https://x.org/c.jpg"}])
    assert m.table["image_uri"].to_pylist() == [str(tmp_path / "sub/a.jpg"), "/abs/b.png", "https://x.org/c.jpg"]
    assert m.table["image"].to_pylist()[0] == "sub/a.jpg"


def test_derived_ids_are_stable_and_safe(tmp_path):
    m = load(tmp_path, [{"image": "dir/my photo.jpg"}, {"image": "http://h/x/y.png?x=1"}])
    ids = m.table["id"].to_pylist()
    assert [i.rsplit("-", 1)[0] for i in ids] == ["my_photo", "y"]
    assert all(len(i.rsplit("-", 1)[1]) == 10 for i in ids)
    again = load(tmp_path / "again", [{"image": "new.png"}, {"image": "http://h/x/y.png?x=1"},
                                       {"image": "dir/my photo.jpg"}])
    assert again.table["id"].to_pylist()[1:] == list(reversed(ids))  # position plays no part


def test_pandas_style_float_ints_are_accepted(tmp_path):
    m = load(tmp_path, [{"image": "a.jpg", "fps": 8.0}, {"image": "b.jpg", "fps": float("nan")}])
    assert m.table["fps"].to_pylist() == [8, 7]


@pytest.mark.parametrize(
    "column,value,allowed",
    [
        ("motion_bucket_id", 256, "0..255"),
        ("motion_bucket_id", -1, "0..255"),
        ("fps", 0, "1..1000"),
        ("noise_aug_strength", -0.1, "0..10"),
        ("noise_aug_strength", math.inf, "0..10"),
        ("num_frames", 0, ">= 2"),
        ("num_inference_steps", 0, "1..1000"),
        ("height", 100, "multiple of 8"),
        ("width", 0, "multiple of 8"),
        ("decode_chunk_size", 0, ">= 1"),
        ("seed", -5, "0..2**63-1"),
        ("min_guidance_scale", -1.0, "0..100"),
        ("fps", 7.5, "1..1000"),
        # issue 20: what the pipeline cannot run, and what no longer falls back to a default in silence
        ("num_frames", 1, ">= 2"),
        ("height", 8, "at least 16"),
        ("num_inference_steps", 10**8, "1..1000"),
        ("fps", 10**6, "1..1000"),
        ("noise_aug_strength", 1e30, "0..10"),
        ("max_guidance_scale", 1e30, "0..100"),
        ("fps", math.inf, "1..1000"),
        ("fps", -math.inf, "1..1000"),
        ("motion_bucket_id", 1e30, "0..255"),
        ("seed", math.inf, "0..2**63-1"),
        ("seed", 1e30, "0..2**63-1"),
        ("seed", 2.0**63, "0..2**63-1"),
        ("seed", 2.0**64, "0..2**63-1"),
    ],
)
def test_out_of_range_values_are_listed_with_row_column_value_and_rule(tmp_path, column, value, allowed):
    err = problems_of(tmp_path, [{"id": "good", "image": "a.jpg"}, {"id": "bad", "image": "b.jpg", column: value}])
    assert len(err.problems) == 1
    p = err.problems[0]
    assert (p.row, p.id, p.column) == (1, "bad", column)
    text = str(err)
    assert "row 1 (id 'bad')" in text and repr(column) in text and allowed in text and repr(value) in text


def test_every_offending_row_is_listed(tmp_path):
    rows = [{"id": f"r{i}", "image": "a.jpg", "fps": 0} for i in range(5)] + [{"id": "ok", "image": "a.jpg"}]
    err = problems_of(tmp_path, rows)
    assert [p.row for p in err.problems] == [0, 1, 2, 3, 4]


def test_missing_image_column_and_empty_image(tmp_path):
    err = problems_of(tmp_path, [{"path": "a.jpg"}])
    assert "image" in str(err) and "missing" in str(err)
    err = problems_of(tmp_path, [{"image": ""}, {"image": None}, {"image": "x.jpg"}])
    assert [p.row for p in err.problems] == [0, 1]


def test_duplicate_and_unsafe_ids(tmp_path):
    err = problems_of(tmp_path, [{"id": "a", "image": "x.jpg"}, {"id": "A", "image": "y.jpg"}])
    assert {p.row for p in err.problems} == {0, 1} and "unique" in str(err)
    for bad in ["../../etc/x", "/abs", "a/b", "nul\x00x", "ctl\x07", ".hidden", "x" * 300, ""]:
        err = problems_of(tmp_path, [{"id": bad, "image": "x.jpg"}])
        assert err.problems[0].column == "id", bad


def test_string_column_where_number_expected(tmp_path):
    err = problems_of(tmp_path, [{"image": "a.jpg", "fps": "seven"}])
    assert "'fps'" in str(err) and "integer column" in str(err)


def test_unreadable_and_missing_manifest(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="could not be read"):
        load_manifest(str(bad), GEN)
    with pytest.raises(ManifestError, match="manifest.path"):
        load_manifest(str(tmp_path / "nope.parquet"), GEN)


def test_null_generation_default_without_row_value_is_an_error(tmp_path):
    gen = dict(GEN, fps=None)
    with pytest.raises(ManifestError, match="no default"):
        load_manifest(str(write_manifest(tmp_path / "m.parquet", [{"image": "a.jpg"}])), gen)


def test_extra_columns_are_carried(tmp_path):
    m = load(tmp_path, [{"image": "a.jpg", "caption": "hi", "score": 0.5}])
    assert m.extra_columns == ["extra.caption", "extra.score"]
    assert m.table["extra.caption"].to_pylist() == ["hi"]


def test_unsigned_and_typed_schema(tmp_path):
    schema = pa.schema([("image", pa.string()), ("fps", pa.uint8()), ("seed", pa.uint64())])
    path = write_manifest(tmp_path / "u.parquet", [{"image": "a.jpg", "fps": 9, "seed": 2**64 - 1}], schema)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path), GEN)
    assert [p.column for p in info.value.problems] == ["seed"]


def test_raw_bytes_column_gives_references_and_names_empty_cells(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array([b"\x89PNG...", None, b"\xff\xd8..."], pa.binary())}),
                   tmp_path / "raw.parquet")
    with pytest.raises(ManifestError) as info:
        load_manifest(str(tmp_path / "raw.parquet"), GEN)
    assert len(info.value.problems) == 1 and info.value.problems[0].row == 1
    m = load_manifest(str(tmp_path / "raw.parquet"), GEN, where=None, limit=1)
    assert m.table["image"].to_pylist() == ["raw.parquet#row=0"]
    assert m.table["image_uri"].to_pylist() == [f"parquet://{tmp_path / 'raw.parquet'}#row=0&column=image"]
