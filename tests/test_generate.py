"""One row run by svd-batch gives the frames of the diffusers guide's snippet with the same inputs."""

import numpy as np
import pytest
import torch

from svd_batch.generate import Generator, ModelUnavailable, resolve_model_path
from svd_batch.tiny import ensure_tiny_model
from svd_batch.write import frames_sha256
from tests.conftest import read_results, run_cli, write_manifest


def guide_snippet(image_path, *, seed, height, width, num_frames, steps, fps, motion_bucket_id,
                  noise_aug_strength, decode_chunk_size, max_guidance_scale=3.0):
    """The diffusers SVD guide, verbatim apart from the tiny model and sizes."""
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import load_image

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ensure_tiny_model()))
    pipe.set_progress_bar_config(disable=True)
    image = load_image(str(image_path))
    image = image.resize((width, height))
    generator = torch.manual_seed(seed)
    frames = pipe(image, height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
                  decode_chunk_size=decode_chunk_size, generator=generator, fps=fps,
                  motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                  max_guidance_scale=max_guidance_scale).frames[0]
    return np.stack([np.asarray(f) for f in frames])


def test_runner_row_equals_guide_snippet(tmp_path, images):
    rows = [
        {"id": "cat", "image": "images/cat.jpg", "seed": 1234, "fps": 9, "motion_bucket_id": 200,
         "noise_aug_strength": 0.05, "num_frames": 6, "height": 64, "width": 96, "decode_chunk_size": 4},
        {"id": "rocket", "image": str(images / "rocket.jpg"), "seed": 7},
    ]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.num_inference_steps=3")
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r for r in read_results(out).to_pylist()}

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the run: CPU float results depend on it
    try:
        cat = guide_snippet(images / "cat.jpg", seed=1234, height=64, width=96, num_frames=6, steps=3, fps=9,
                            motion_bucket_id=200, noise_aug_strength=0.05, decode_chunk_size=4)
        rocket = guide_snippet(images / "rocket.jpg", seed=7, height=64, width=64, num_frames=8, steps=3, fps=7,
                               motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8)
    finally:
        torch.set_num_threads(old)
    assert cat.shape == (6, 64, 96, 3)
    assert got["cat"]["frames_sha256"] == frames_sha256(cat)
    assert got["rocket"]["frames_sha256"] == frames_sha256(rocket)
    assert got["cat"]["frames_sha256"] != got["rocket"]["frames_sha256"]


class RecordingPipe:
    """Stands in for the pipeline to show exactly which values a row passes on."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, **kwargs):
        from PIL import Image

        self.calls.append({"size": image.size, **kwargs, "seed_draw": kwargs["generator"].initial_seed()})
        frame = Image.new("RGB", (kwargs["width"], kwargs["height"]))
        return type("Out", (), {"frames": [[frame] * kwargs["num_frames"]]})()


def test_row_values_reach_the_pipeline():
    from PIL import Image

    pipe = RecordingPipe()
    gen = Generator(pipe=pipe, device=torch.device("cpu"), memory_mode="full")
    row = dict(width=96, height=64, num_frames=5, num_inference_steps=3, min_guidance_scale=0.5,
               max_guidance_scale=2.5, fps=11, motion_bucket_id=33, noise_aug_strength=0.07, decode_chunk_size=2,
               seed=99)
    frames = gen.frames(Image.new("RGB", (300, 200)), row)
    call = pipe.calls[0]
    assert frames.shape == (5, 64, 96, 3)
    assert call["size"] == (96, 64)  # resized to (width, height) before the pipeline, as in the guide
    for k in ("height", "width", "num_frames", "num_inference_steps", "min_guidance_scale", "max_guidance_scale",
              "fps", "motion_bucket_id", "noise_aug_strength", "decode_chunk_size"):
        assert call[k] == row[k], k
    assert call["seed_draw"] == 99 and call["generator"].device.type == "cpu"


def test_memory_mode_caps_decode_chunk():
    gen = Generator(pipe=None, device=torch.device("cpu"), memory_mode="low_vram", max_decode_chunk_size=2)
    assert gen.effective_decode_chunk(8) == 2 and gen.effective_decode_chunk(1) == 1
    assert Generator(pipe=None, device=torch.device("cpu"), memory_mode="full").effective_decode_chunk(8) == 8


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="model_index.json"):
        resolve_model_path(str(tmp_path / "empty"))
