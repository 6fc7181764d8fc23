"""Rebuild the bundled sample (svd_batch/data/sample/): four scikit-image photographs and a manifest.

    .venv/bin/pip install scikit-image && .venv/bin/python scripts/make_sample.py

The photographs come from scikit-image's bundled data (see svd_batch/data/sample/SOURCES.md for their
origin and licences); the manifest's rows vary the conditioning so the demo shows what a manifest can do.
"""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "svd_batch" / "data" / "sample"

IMAGES = {"rocket": skimage.data.rocket, "astronaut": skimage.data.astronaut,
          "cat": skimage.data.chelsea, "coffee": skimage.data.coffee}

ROWS = [
    # id, image, seed, motion_bucket_id, fps, noise_aug_strength, height, width, num_frames, steps, guidance max
    ("rocket-calm", "rocket.jpg", 1, 40, 7, 0.02, 128, 192, 14, 8, 3.0),
    ("rocket-wild", "rocket.jpg", 1, 255, 7, 0.02, 128, 192, 14, 8, 3.0),
    ("astronaut", "astronaut.jpg", 2, 127, 6, 0.02, 192, 192, 14, 8, 3.0),
    ("astronaut-derived-seed", "astronaut.jpg", None, 127, 6, 0.02, 192, 192, 14, 8, 3.0),
    ("cat-noisy", "cat.jpg", 3, 180, 10, 0.1, 128, 192, 14, 8, 3.0),
    ("cat-xt-length", "cat.jpg", 7, 127, 12, 0.02, 128, 192, 25, 8, 3.0),
    ("coffee", "coffee.jpg", 5, 127, 8, 0.02, 128, 192, 14, 8, 3.0),
    ("coffee-no-guidance", "coffee.jpg", 5, 30, 8, 0.02, 128, 192, 14, 8, 1.0),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, fn in IMAGES.items():
        img = Image.fromarray(fn()).convert("RGB")
        img.thumbnail((384, 384))
        img.save(OUT / f"{name}.jpg", quality=88)
    cols = list(zip(*ROWS))
    table = pa.table({
        "id": pa.array(cols[0]), "image": pa.array(cols[1]), "seed": pa.array(cols[2], pa.int64()),
        "motion_bucket_id": pa.array(cols[3], pa.int64()), "fps": pa.array(cols[4], pa.int64()),
        "noise_aug_strength": pa.array(cols[5], pa.float64()), "height": pa.array(cols[6], pa.int64()),
        "width": pa.array(cols[7], pa.int64()), "num_frames": pa.array(cols[8], pa.int64()),
        "num_inference_steps": pa.array(cols[9], pa.int64()), "max_guidance_scale": pa.array(cols[10], pa.float64()),
    })
    pq.write_table(table, OUT / "sample.parquet")
    print(f"wrote {len(ROWS)} rows and {len(IMAGES)} images to {OUT}")


if __name__ == "__main__":
    main()
