"""settings.py: the Hydra configs composed as the CLI composes them, checked, and typed once (RunSettings)."""

import pytest
from omegaconf import OmegaConf


def cfg(*overrides):
    from svd_batch.settings import compose_config

    return compose_config(*overrides)


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


def test_run_settings_are_typed_once_from_the_composed_config():
    import dataclasses

    from svd_batch.settings import RunSettings

    s = RunSettings.from_config(cfg("runtime.batch_size=3", "runtime.overlap=false", "video.crf=23",
                                    "generation.seed=7", "runtime.max_same_failures=0", "report.scores=false"))
    assert (s.runtime.batch_size, s.runtime.overlap_setting, s.video.crf, s.generation.seed,
            s.runtime.max_same_failures, s.report.scores) == (3, False, 23, 7, 0, False)
    assert not any(OmegaConf.is_config(v) for v in dataclasses.astuple(s))  # no DictConfig below the boundary
    assert RunSettings.from_config(cfg()).runtime.overlap_setting is None  # auto: decided by the device
    assert RunSettings.from_config(cfg("runtime.overlap=true")).runtime.overlap_setting is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.runtime.batch_size = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.manifest.columns["image"] = "x"  # frozen all the way down


def test_manifest_mappings_take_plain_overrides_as_the_hints_print_them():
    c = cfg("manifest.columns.image=frame", "manifest.defaults.fps=3", "manifest.where.split=[a,b]")
    assert c.manifest.columns.image == "frame" and c.manifest.defaults.fps == 3
    assert list(c.manifest.where.split) == ["a", "b"]
    assert cfg("+manifest.columns.image=frame").manifest.columns.image == "frame"  # the + form still works
    # Only those three mappings are open: a typo anywhere else is still refused by Hydra.
    for typo in ("manifest.colums.image=frame", "manifest.nmae=x", "generation.fsp=3"):
        with pytest.raises(Exception, match="Could not override"):
            cfg(typo)


def test_keys_no_longer_used_are_dropped_with_a_note():
    from svd_batch.commands.run import without_deprecated

    kept, notes = without_deprecated(["runtime.prefetch_batches=2", "model=svd", "+model.num_frames=25", "dry_run=true"])
    assert kept == ["model=svd", "dry_run=true"]
    assert len(notes) == 2 and "runtime.prefetch_batches is no longer used" in notes[0] and "drop it" in notes[0]
    with pytest.raises(Exception, match="Could not override"):
        cfg("runtime.prefetch_batches=2")  # the key itself is gone from the config


def test_a_saved_config_of_an_older_version_loads_with_todays_defaults(tmp_path):
    from svd_batch.settings import RunSettings

    (tmp_path / "config.yaml").write_text(RunSettings.compose().to_yaml().replace("  lease_seconds: 180\n", "")
                                          .replace("  grace_seconds: 25\n", "") + "runtime_extra: 1\n")
    s = RunSettings.load(str(tmp_path))
    assert s.runtime.lease_seconds == 180 and s.runtime.grace_seconds == 25  # filled from conf/
    assert RunSettings.load(str(tmp_path / "nowhere")) is None


def test_an_unresolvable_interpolation_is_a_usage_error_naming_the_key():
    from svd_batch.settings import RunSettings, SettingsError

    with pytest.raises(SettingsError) as refused:
        RunSettings.from_config(cfg("output.dir=/x/${oops}", "+extra.note=${nowhere.at_all}"))
    msg = str(refused.value)
    assert "output.dir = '/x/${oops}'" in msg and "'oops' not found" in msg and "extra.note" in msg
    assert "2 config values could not be resolved" in msg and "\n" not in msg
    assert RunSettings.from_config(cfg(r"output.dir=/x/\${oops}")).output.dir == "/x/${oops}"  # the escape it names
    assert RunSettings.from_config(cfg("+extra.later=???"))  # a mandatory value left open is no interpolation
