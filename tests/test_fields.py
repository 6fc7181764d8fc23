"""fields.py: the one definition of a row (pipeline arguments, what resume compares, the record's columns) and
the typed Row and Record it travels as."""

import dataclasses

import pytest

from tests.conftest import record


def test_the_row_definition_matches_the_pipeline_and_the_record():
    import inspect

    from diffusers import StableVideoDiffusionPipeline

    from svd_batch.fields import (CHANGE_FIELDS, CONDITIONING_FIELDS, GENERATION_FIELDS, PIPELINE_FIELDS,
                                  RESULT_SCHEMA, Row)

    accepted = set(inspect.signature(StableVideoDiffusionPipeline.__call__).parameters)
    assert set(PIPELINE_FIELDS) <= accepted and "seed" not in PIPELINE_FIELDS
    assert set(GENERATION_FIELDS) - set(PIPELINE_FIELDS) == {"seed"}  # the seed becomes the generator
    recorded = set(RESULT_SCHEMA.names)
    assert set(CHANGE_FIELDS) <= recorded and set(CONDITIONING_FIELDS) <= recorded
    assert "decode_chunk_size" not in CHANGE_FIELDS  # memory, not frames
    row = Row(id="a", image="a.jpg", image_uri="/a.jpg", row=0, **{f: "3" for f in GENERATION_FIELDS})
    kw = row.pipeline_kwargs()
    assert type(kw["fps"]) is int and type(kw["noise_aug_strength"]) is float and kw["num_frames"] == 3


def test_a_record_that_misses_a_column_fails_loudly():
    from svd_batch.fields import RESULT_SCHEMA, Record

    full = dataclasses.asdict(record(id="a"))
    assert list(full) == RESULT_SCHEMA.names  # every column, in results.parquet's order
    del full["motion_score"]
    with pytest.raises(TypeError, match="motion_score"):
        Record(**full)


def test_part_writers_take_records_only(tmp_path):
    from svd_batch.rundir import PartWriter, RunDir

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    with pytest.raises(TypeError, match="fields.Record"):
        PartWriter(rd).add({"id": "a", "status": "ok"})  # a dict would have had its missing columns filled with nulls
    PartWriter(rd).add(record(id="a"))
    assert rd.read_records()["id"].to_pylist() == ["a"]
