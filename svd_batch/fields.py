"""One definition of a row, shared by every stage: its generation fields (names, types, allowed values), the
pipeline arguments they become, what counts as a change of a finished row, and the columns of its record."""

from __future__ import annotations

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

# column -> (lowest, highest, must be a multiple of, human description of what is allowed)
RULES: dict[str, tuple[float | None, float | None, int | None, str]] = {
    "seed": (0, SEED_MAX, None, "an integer in 0..2**63-1"),
    "fps": (1, None, None, "an integer >= 1"),
    "motion_bucket_id": (0, 255, None, "an integer in 0..255"),
    "num_frames": (1, None, None, "an integer >= 1"),
    "num_inference_steps": (1, None, None, "an integer >= 1"),
    "height": (8, None, 8, "a positive multiple of 8"),
    "width": (8, None, 8, "a positive multiple of 8"),
    "decode_chunk_size": (1, None, None, "an integer >= 1"),
    "noise_aug_strength": (0.0, None, None, "a number >= 0"),
    "min_guidance_scale": (0.0, None, None, "a number >= 0"),
    "max_guidance_scale": (0.0, None, None, "a number >= 0"),
}


def arrow_type(field: str) -> pa.DataType:
    return pa.int64() if field in INT_FIELDS else pa.float64()


# The values that fix a row's tensor shapes; with whether guidance is on (max_guidance_scale > 1: the UNet then
# runs on a batch of two), rows equal in them can share one pipeline batch (batch.batch_key, plan.batch_keys).
SHAPE_FIELDS = ("height", "width", "num_frames", "num_inference_steps")

# The row's values passed to StableVideoDiffusionPipeline.__call__ under their own names (the seed becomes the
# generator; the image, resized to width x height, is the first argument).
PIPELINE_FIELDS = tuple(f for f in GENERATION_FIELDS if f != "seed")


def pipeline_kwargs(row) -> dict:
    """A row's pipeline keyword arguments, as Python ints and floats (the snippet's own types)."""
    return {f: int(row[f]) if f in INT_FIELDS else float(row[f]) for f in PIPELINE_FIELDS}


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
