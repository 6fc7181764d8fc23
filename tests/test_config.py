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


def test_worker_settings_are_typed_once_from_the_composed_config():
    import dataclasses

    from svd_batch.settings import WorkerSettings, check

    c = cfg("runtime.batch_size=3", "runtime.overlap=false", "video.crf=23", "generation.seed=7",
            "runtime.max_same_failures=0", "report.scores=false")
    check(c)
    s = WorkerSettings.from_config(c)
    assert (s.batch_size, s.overlap, s.video_crf, s.base_seed, s.max_same_failures, s.scores) == (3, False, 23, 7, 0, False)
    assert not any(OmegaConf.is_config(v) for v in dataclasses.asdict(s).values())  # no DictConfig below the runner
    assert WorkerSettings.from_config(cfg()).overlap is None  # auto: decided by the device
    assert WorkerSettings.from_config(cfg("runtime.overlap=true")).overlap is True


def test_the_row_definition_matches_the_pipeline_and_the_record():
    import inspect

    from diffusers import StableVideoDiffusionPipeline

    from svd_batch.fields import (CHANGE_FIELDS, CONDITIONING_FIELDS, GENERATION_FIELDS, PIPELINE_FIELDS,
                                  RESULT_SCHEMA, pipeline_kwargs)

    accepted = set(inspect.signature(StableVideoDiffusionPipeline.__call__).parameters)
    assert set(PIPELINE_FIELDS) <= accepted and "seed" not in PIPELINE_FIELDS
    assert set(GENERATION_FIELDS) - set(PIPELINE_FIELDS) == {"seed"}  # the seed becomes the generator
    recorded = set(RESULT_SCHEMA.names)
    assert set(CHANGE_FIELDS) <= recorded and set(CONDITIONING_FIELDS) <= recorded
    assert "decode_chunk_size" not in CHANGE_FIELDS  # memory, not frames
    row = {f: "3" for f in GENERATION_FIELDS}
    kw = pipeline_kwargs(row)
    assert type(kw["fps"]) is int and type(kw["noise_aug_strength"]) is float and kw["num_frames"] == 3


def test_manifest_mappings_take_plain_overrides_as_the_hints_print_them():
    c = cfg("manifest.columns.image=frame", "manifest.defaults.fps=3", "manifest.where.split=[a,b]")
    assert c.manifest.columns.image == "frame" and c.manifest.defaults.fps == 3
    assert list(c.manifest.where.split) == ["a", "b"]
    assert cfg("+manifest.columns.image=frame").manifest.columns.image == "frame"  # the + form still works
    # Only those three mappings are open: a typo anywhere else is still refused by Hydra.
    for typo in ("manifest.colums.image=frame", "manifest.nmae=x", "generation.fsp=3"):
        with pytest.raises(Exception, match="Could not override"):
            cfg(typo)

