"""Batches of rows give, row by row, the frames of batch size 1 (within float rounding)."""

import numpy as np
import pytest
import torch

from svd_batch.batch import batch_key, batched_frames
from svd_batch.generate import Generator
from svd_batch.images import load_image
from svd_batch.tiny import ensure_tiny_model
from tests.conftest import SAMPLE, make_row, typed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gen():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Generator.load(str(ensure_tiny_model()), device=torch.device("cpu"), **typed())
    torch.set_num_threads(old)


def row(**kw):
    base = dict(width=64, height=48, num_frames=7, num_inference_steps=3, min_guidance_scale=1.0,
                max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=4,
                seed=0)
    return make_row(**{**base, **kw})


def test_batch_matches_one_by_one_with_per_row_conditioning(gen):
    images = [load_image(str(SAMPLE / f)) for f in ("cat.jpg", "rocket.jpg", "coffee.jpg", "astronaut.jpg")]
    # num_frames 7 with decode chunks of 4 and 3: a flattened decode would mix two videos in one chunk.
    rows = [row(seed=1), row(seed=2, fps=12, motion_bucket_id=30, noise_aug_strength=0.1, decode_chunk_size=3),
            row(seed=3, min_guidance_scale=0.5, max_guidance_scale=2.0, motion_bucket_id=250),
            row(seed=4, fps=3, noise_aug_strength=0.0)]
    batch = batched_frames(gen.pipe, images, rows)
    for image, r, got in zip(images, rows, batch):
        alone = gen.frames(image, r)
        assert got.shape == alone.shape == (7, 48, 64, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(int) - alone.astype(int)).max() <= 2
    # The rows really differ: conditioning reached each sample, not just the first.
    assert all(np.abs(batch[0].astype(int) - b.astype(int)).mean() > 1 for b in batch[1:])


def test_naive_flattened_decode_would_mix_videos(gen):
    """Why decoding is per video: diffusers' decode_latents over a batch differs from decoding alone."""
    latents = torch.randn(2, 7, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = gen.pipe.decode_latents(latents, 7, 4)
        alone = gen.pipe.decode_latents(latents[1:], 7, 4)
    assert (together[1] - alone[0]).abs().max() > 1e-3


def test_rows_with_different_shapes_cannot_share_a_batch(gen):
    assert batch_key(row()) != batch_key(row(num_frames=8))
    assert batch_key(row()) != batch_key(row(max_guidance_scale=1.0))  # guidance off: another UNet batch
    assert batch_key(row()) == batch_key(row(fps=3, seed=9, motion_bucket_id=1))
    with pytest.raises(ValueError, match="must share"):
        batched_frames(gen.pipe, [None, None], [row(), row(height=64)])
