"""The per-row generation fields: their names, types and allowed values, shared by every stage."""

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
