"""The Hydra configs, composed as the CLI composes them."""

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import svd_batch.cli  # noqa: F401  (registers the resolvers)


def cfg(*overrides):
    with initialize_config_module("svd_batch.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_are_the_tiny_model_and_sample():
    c = cfg()
    assert c.model.name == "tiny" and c.model.path == "builtin:tiny"
    assert c.manifest.path.endswith("svd_batch/data/sample/sample.parquet")
    assert c.output.dir == "outputs/sample-tiny"
    assert c.memory.mode == "full" and c.runtime.batch_size == 1 and c.dry_run is False


@pytest.mark.parametrize("preset,path,frames", [
    ("svd", "stabilityai/stable-video-diffusion-img2vid", 14),
    ("svd_xt", "stabilityai/stable-video-diffusion-img2vid-xt", 25),
    ("svd_xt_1_1", "stabilityai/stable-video-diffusion-img2vid-xt-1-1", 25),
])
def test_real_presets(preset, path, frames):
    c = cfg(f"model={preset}")
    assert c.model.path == path and c.generation.num_frames == frames and c.model.variant == "fp16"
    assert (c.generation.height, c.generation.width, c.generation.num_inference_steps) == (576, 1024, 25)
    assert (c.generation.fps, c.generation.motion_bucket_id, c.generation.noise_aug_strength) == (7, 127, 0.02)
    assert (c.generation.min_guidance_scale, c.generation.max_guidance_scale) == (1.0, 3.0)
    assert (c.generation.decode_chunk_size, c.generation.seed) == (8, 42)
    assert c.output.dir == f"outputs/sample-{preset}"


def test_command_line_beats_preset_and_output_dir_follows_manifest():
    c = cfg("model=svd_xt", "generation.num_frames=14", "manifest.path=/data/shots.parquet")
    assert c.generation.num_frames == 14
    assert c.output.dir == "outputs/shots-svd_xt"


def test_memory_modes():
    assert cfg("memory=offload").memory.cpu_offload is True
    low = cfg("memory=low_vram").memory
    assert low.cpu_offload and low.forward_chunking and low.max_decode_chunk_size == 2
    OmegaConf.resolve(cfg("memory=low_vram"))
