"""One definition of a row, shared by every stage: its generation fields (names, types, allowed values), the
pipeline arguments they become, what counts as a change of a finished row, and its record's columns; and the
typed Row (what a unit's rows travel as) and Record (what is written for each)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

INT_FIELDS = (
    "seed",
    "fps",
    "motion_bucket_id",
    "num_frames",
    "num_inference_steps",
    "height",
    "width",
    "decode_chunk_size",
)
FLOAT_FIELDS = ("noise_aug_strength", "min_guidance_scale", "max_guidance_scale")
GENERATION_FIELDS = INT_FIELDS + FLOAT_FIELDS

# The conditioning values a result row records, in the order results.parquet lists them.
CONDITIONING_FIELDS = (
    "fps",
    "motion_bucket_id",
    "noise_aug_strength",
    "num_frames",
    "num_inference_steps",
    "height",
    "width",
    "min_guidance_scale",
    "max_guidance_scale",
    "decode_chunk_size",
)

SEED_MAX = 2**63 - 1

# column -> (lowest, highest, must be a multiple of, human description of what is allowed). The bounds are what
# the pipeline can do, not taste: one frame fails inside it (guidance is turned on for the image and off for the
# frames), 8 px is a 1x1 latent that some models' group norms cannot take, steps past 1000 (the model's own
# timesteps) only cost memory, and values like noise 1e30 give videos of NaN. Sizes and frame counts are further
# bounded together by the row's memory (row_memory_bytes).
RULES: dict[str, tuple[float | None, float | None, int | None, str]] = {
    "seed": (0, SEED_MAX, None, "an integer in 0..2**63-1"),
    "fps": (1, 1000, None, "an integer in 1..1000"),
    "motion_bucket_id": (0, 255, None, "an integer in 0..255"),
    "num_frames": (2, None, None, "an integer >= 2"),
    "num_inference_steps": (1, 1000, None, "an integer in 1..1000"),
    "height": (16, None, 8, "a multiple of 8, at least 16"),
    "width": (16, None, 8, "a multiple of 8, at least 16"),
    "decode_chunk_size": (1, None, None, "an integer >= 1"),
    "noise_aug_strength": (0.0, 10.0, None, "a number in 0..10"),
    "min_guidance_scale": (0.0, 100.0, None, "a number in 0..100"),
    "max_guidance_scale": (0.0, 100.0, None, "a number in 0..100"),
}

ROW_MEMORY_KEY = "runtime.max_row_bytes"


def row_memory_bytes(height, width, num_frames):
    """A lower bound on the memory one row needs, from its size alone (numbers or numpy arrays, as floats: the
    product of absurd sizes must not wrap around): its video as float32, which the VAE decodes whole
    (height x width x num_frames x 3 x 4 bytes), plus the temporal attention scores over its frames at every
    latent position (height/8 x width/8 x num_frames^2 x 4 bytes), which grow with the square of the frames."""
    pixels = np.asarray(height, np.float64) * np.asarray(width, np.float64)
    frames = np.asarray(num_frames, np.float64)
    return pixels * frames * 12.0 + pixels / 64.0 * frames**2 * 4.0


def arrow_type(field: str) -> pa.DataType:
    return pa.int64() if field in INT_FIELDS else pa.float64()


# The values that fix a row's tensor shapes; with whether guidance is on (max_guidance_scale > 1: the UNet then
# runs on a batch of two), rows equal in them can share one pipeline batch (batch.batch_key, plan.batch_keys).
SHAPE_FIELDS = ("height", "width", "num_frames", "num_inference_steps")

# The row's values passed to StableVideoDiffusionPipeline.__call__ under their own names (the seed becomes the
# generator; the image, resized to width x height, is the first argument).
PIPELINE_FIELDS = tuple(f for f in GENERATION_FIELDS if f != "seed")


# What a finished row is compared on when a run resumes: a different value means its video no longer matches.
# decode_chunk_size is left out (it changes memory use, not frames); the image is compared by location and hash
# (images.changed_images).
CHANGE_FIELDS = tuple(f for f in ("seed", *CONDITIONING_FIELDS) if f != "decode_chunk_size")

# One record per row attempt: results.parquet's columns, in order.
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("video_path", pa.string()),
        ("image", pa.string()),
        ("image_uri", pa.string()),
        ("row", pa.int64()),
        ("seed", pa.int64()),
        *[(f, arrow_type(f)) for f in CONDITIONING_FIELDS],
        ("frames_sha256", pa.string()),
        ("image_sha256", pa.string()),  # of the encoded image bytes the row was made from (see images.py)
        ("load_seconds", pa.float64()),
        ("generate_seconds", pa.float64()),
        ("write_seconds", pa.float64()),
        ("total_seconds", pa.float64()),
        ("peak_vram_bytes", pa.int64()),
        ("peak_host_memory_bytes", pa.int64()),
        ("memory_mode", pa.string()),
        ("batch_size", pa.int32()),
        ("compiled", pa.bool_()),
        ("attention", pa.string()),  # runtime.attention the row ran with (auto: torch's choice)
        ("sampler", pa.string()),  # generation.sampler: euler (the checkpoint's) or animatelcm
        ("model", pa.string()),
        ("device", pa.string()),
        ("rank", pa.int32()),
        ("world_size", pa.int32()),
        ("host", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("motion_score", pa.float64()),  # scores.py: null when report.scores=false or the row failed
        ("image_similarity", pa.float64()),
        ("flicker_score", pa.float64()),
    ]
)


@dataclass
class Row:
    """One manifest row as it runs: the values its video is made with (the manifest's other columns stay in the
    table). Built from the plan's table as a unit is claimed; the seed is derived then when the row has none."""

    id: str
    image: str             # as the manifest writes it (path, URL, struct path or <shard>#row=<n>)
    image_uri: str         # where it is read from (resolved; what resume compares)
    row: int               # position in the manifest
    seed: int | None
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    num_frames: int
    num_inference_steps: int
    height: int
    width: int
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int
    image_sha256: str | None = None  # of the encoded bytes, once the image is read

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "Row":
        """From a table row or a record (columns it does not know, e.g. ``extra.*``, are left out)."""
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def pipeline_kwargs(self) -> dict:
        """The pipeline's keyword arguments, as Python ints and floats (the snippet's own types)."""
        return {f: int(getattr(self, f)) if f in INT_FIELDS else float(getattr(self, f)) for f in PIPELINE_FIELDS}

    def with_(self, **changes: Any) -> "Row":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Record:
    """One row attempt's record: results.parquet's columns, every one given (a column added to RESULT_SCHEMA and
    forgotten here, or here and not given where a record is made, fails at once rather than writing nulls)."""

    id: str
    status: str
    error: str | None
    video_path: str | None
    image: str
    image_uri: str
    row: int
    seed: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    num_frames: int
    num_inference_steps: int
    height: int
    width: int
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int
    frames_sha256: str | None
    image_sha256: str | None
    load_seconds: float
    generate_seconds: float | None
    write_seconds: float
    total_seconds: float
    peak_vram_bytes: int | None
    peak_host_memory_bytes: int
    memory_mode: str
    batch_size: int | None
    compiled: bool
    attention: str | None
    sampler: str
    model: str
    device: str
    rank: int
    world_size: int
    host: str
    started_at: Any  # datetime (UTC)
    finished_at: Any
    motion_score: float | None
    image_similarity: float | None
    flicker_score: float | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


if [f.name for f in dataclasses.fields(Record)] != RESULT_SCHEMA.names:
    raise AssertionError("fields.Record and fields.RESULT_SCHEMA list other columns")
if [f.name for f in dataclasses.fields(Row)][5:15] != list(CONDITIONING_FIELDS):
    raise AssertionError("fields.Row and fields.CONDITIONING_FIELDS list other fields")
