"""generation.sampler=animatelcm: AnimateLCM's consistency sampler, each step's noise from the row's generator.

The reference below is the stock diffusers SVD pipeline with a scheduler written here from the equations of
AnimateLCM's published ``AnimateLCMSVDStochasticIterativeScheduler`` (G-U-N/AnimateLCM,
animatelcm_svd/animatelcm_scheduler.py), drawing its step noise from torch's global RNG as that code does, and
``generator=torch.manual_seed(seed)`` as its scripts pass: a row run by svd-batch must give its frames hash for
hash."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from svd_batch.settings import RunSettings, SettingsError
from tests.conftest import SAMPLE, launch, read_results, run_cli, write_manifest

PUBLISHED = dict(num_train_timesteps=40, sigma_min=0.002, sigma_max=700.0, sigma_data=1.0, s_noise=1.0, rho=7,
                 clip_denoised=False)


def reference_scheduler(**config):
    """A compact copy of the published scheduler's computation (not svd-batch's code), global-RNG noise."""
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class Reference(SchedulerMixin, ConfigMixin):
        order = 1

        @register_to_config
        def __init__(self, num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, s_noise=1.0,
                     rho=7.0, clip_denoised=True):
            self.init_noise_sigma = (sigma_max**2 + 1) ** 0.5
            self._step_index = None

        def karras(self, ramp):
            c = self.config
            min_inv_rho, max_inv_rho = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** c.rho

        def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None):
            n, total = num_inference_steps, self.config.num_train_timesteps
            timesteps = (np.arange(0, n) * (total // n)).round()[::-1].copy().astype(np.int64)
            sigmas = self.karras(timesteps[::-1].copy() / (total - 1))
            self.timesteps = torch.from_numpy(0.25 * np.log(sigmas + 1e-44)).to(device=device)
            self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32)).to(device=device)
            self._step_index = None

        def _index(self, timestep):
            if self._step_index is None:
                self._step_index = (self.timesteps == timestep).nonzero()[0].item()

        def scale_model_input(self, sample, timestep):
            self._index(timestep)
            sigma = self.sigmas[self._step_index]
            return sample / ((sigma**2 + self.config.sigma_data**2) ** 0.5)

        def step(self, model_output, timestep, sample, generator=None, return_dict=True):
            self._index(timestep)
            c = self.config
            sigma = self.sigmas[self._step_index]
            i = self._step_index + 1
            sigma_next = self.sigmas[i] if i < c.num_train_timesteps else self.sigmas[-1]
            c_skip = c.sigma_data**2 / ((sigma) ** 2 + c.sigma_data**2)
            c_out = -sigma * c.sigma_data / (sigma**2 + c.sigma_data**2) ** 0.5
            denoised = c_out * model_output + c_skip * sample
            if c.clip_denoised:
                denoised = denoised.clamp(-1, 1)
            if len(self.timesteps) > 1:  # the published call passes no generator: torch's global RNG
                noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                     generator=generator)
            else:
                noise = torch.zeros_like(model_output)
            prev = denoised + noise * c.s_noise * sigma_next.clamp(min=0, max=c.sigma_max)
            self._step_index += 1
            return SchedulerOutput(prev_sample=prev)

    return Reference(**config)


# -- fast: settings, presets, the sampler's draws -------------------------------------------------------------
def test_sampler_setting_is_checked_and_in_the_fingerprint():
    from svd_batch.fingerprint import fingerprint, fingerprint_diff

    euler = RunSettings.compose()
    assert euler.generation.sampler == "euler"
    lcm = RunSettings.compose("generation.sampler=animatelcm")
    assert lcm.generation.sampler == "animatelcm"
    assert fingerprint_diff(fingerprint(euler, "x"), fingerprint(lcm, "x")) == \
        ["generation.sampler: 'euler' -> 'animatelcm'"]
    with pytest.raises(SettingsError, match=r"generation.sampler = 'lcm'.*one of euler, animatelcm"):
        RunSettings.compose("generation.sampler=lcm")


@pytest.mark.parametrize("preset,path,weights", [
    ("animatelcm_svd_xt", "stabilityai/stable-video-diffusion-img2vid-xt",
     "wangfuyun/AnimateLCM-SVD-xt/AnimateLCM-SVD-xt.safetensors"),
    ("animatelcm_svd_xt_1_1", "stabilityai/stable-video-diffusion-img2vid-xt-1-1",
     "wangfuyun/AnimateLCM-SVD-xt/AnimateLCM-SVD-xt-1.1.safetensors"),
])
def test_animatelcm_presets(preset, path, weights):
    s = RunSettings.compose(f"model={preset}")
    assert (s.model.name, s.model.path, s.model.variant, s.model.unet_weights) == (preset, path, "fp16", weights)
    g = s.generation
    assert (g.sampler, g.num_inference_steps, g.min_guidance_scale, g.max_guidance_scale) == ("animatelcm", 4, 1.0, 1.0)
    # The published app's conditioning (animatelcm_svd/app.py) at SVD-XT's size.
    assert (g.num_frames, g.height, g.width, g.fps, g.motion_bucket_id, g.noise_aug_strength, g.decode_chunk_size) == \
        (25, 576, 1024, 7, 80, 0.02, 4)
    # The command line still wins over the preset.
    steps = RunSettings.compose(f"model={preset}", "generation.num_inference_steps=8").generation.num_inference_steps
    assert steps == 8
    assert RunSettings.compose("model=svd_xt").model.unet_weights is None


def test_step_noise_comes_from_the_given_generator_not_the_global_rng():
    from svd_batch.samplers import animatelcm_scheduler, row_generator

    def sample(draw_global_between: bool):
        s = animatelcm_scheduler()
        s.set_timesteps(4)
        pipe = type("Pipe", (), {"scheduler": s})()
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(1, 2, 4, 3, 3, generator=gen) * s.init_noise_sigma
        with row_generator(pipe, gen):
            for t in s.timesteps:
                if draw_global_between:
                    torch.rand(7)
                x = s.step(s.scale_model_input(x, t) * 0.1, t, x).prev_sample
        assert s.generator is None  # only while the row runs
        return x

    torch.manual_seed(0)
    a = sample(False)
    torch.manual_seed(123)
    b = sample(True)
    assert torch.equal(a, b)
    # ... and the same draws as the global RNG seeded alike (the published scripts' stream on CPU).
    s = animatelcm_scheduler()
    s.set_timesteps(4)
    torch.manual_seed(5)
    x = torch.randn(1, 2, 4, 3, 3) * s.init_noise_sigma
    for t in s.timesteps:
        x = s.step(s.scale_model_input(x, t) * 0.1, t, x).prev_sample
    assert torch.equal(a, x)


def test_schedule_equals_the_reference_and_refuses_more_than_40_steps():
    from svd_batch.samplers import animatelcm_scheduler

    for n in (1, 2, 3, 4, 8, 25, 40):
        ours, ref = animatelcm_scheduler(), reference_scheduler(**PUBLISHED)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps) and torch.equal(ours.sigmas, ref.sigmas)
        assert ours.timesteps.dtype == torch.float64 and len(ours.sigmas) == n + 1
    assert ours.init_noise_sigma == ref.init_noise_sigma == (700.0**2 + 1) ** 0.5
    with pytest.raises(ValueError, match="sampler=animatelcm takes 1 to 40 steps.*num_inference_steps=41"):
        animatelcm_scheduler().set_timesteps(41)


def test_more_steps_than_animatelcm_was_distilled_on_are_refused_before_the_run():
    from svd_batch.model import SettingRefused, check_settings

    check_settings(RunSettings.compose("generation.sampler=animatelcm", "generation.num_inference_steps=40"), "cpu")
    check_settings(RunSettings.compose("generation.num_inference_steps=41"), "cpu")  # euler: any count
    with pytest.raises(SettingRefused, match="sampler=animatelcm takes 1 to 40 steps.*is 41"):
        check_settings(RunSettings.compose("generation.sampler=animatelcm", "generation.num_inference_steps=41"), "cpu")


# -- slow: rows through svd-batch against the stock pipeline with the reference scheduler ------------------------
STEPS = (1, 2, 4, 8)
GUIDANCE = (1.0, 1.2)  # off, and the published app's maximum


def rows():
    """Two rows of each (steps, guidance), so that runtime.batch_size=2 batches every row."""
    out = []
    for steps in STEPS:
        for guidance in GUIDANCE:
            for k, image in enumerate(("rocket.jpg", "cat.jpg")):
                out.append({"id": f"s{steps}-g{guidance}-{k}", "image": str(SAMPLE / image),
                            "seed": 100 * steps + 10 * int(guidance > 1) + k, "num_inference_steps": steps,
                            "max_guidance_scale": guidance, "min_guidance_scale": 1.0, "num_frames": 4,
                            "decode_chunk_size": 4})
    return out


@contextmanager
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runs: CPU float results depend on it
    try:
        yield
    finally:
        torch.set_num_threads(old)


def reference_frames() -> dict[str, np.ndarray]:
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import load_image

    from svd_batch.tiny import ensure_tiny_model

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ensure_tiny_model()),
                                                        scheduler=reference_scheduler(**PUBLISHED))
    pipe.set_progress_bar_config(disable=True)
    want = {}
    with one_thread():
        for r in rows():
            image = load_image(r["image"]).resize((64, 64))
            frames = pipe(image, height=64, width=64, num_frames=4, num_inference_steps=r["num_inference_steps"],
                          decode_chunk_size=4, generator=torch.manual_seed(r["seed"]), fps=7, motion_bucket_id=127,
                          noise_aug_strength=0.02, min_guidance_scale=1.0,
                          max_guidance_scale=r["max_guidance_scale"]).frames[0]
            want[r["id"]] = np.stack([np.asarray(f) for f in frames])
    return want


def hashes(out) -> dict[str, str]:
    t = read_results(out)
    assert set(t["sampler"].to_pylist()) == {"animatelcm"} and set(t["status"].to_pylist()) == {"ok"}
    return dict(zip(t["id"].to_pylist(), t["frames_sha256"].to_pylist()))


@pytest.fixture(scope="module")
def lcm_manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("lcm") / "m.parquet", rows())


@pytest.fixture(scope="module")
def want(lcm_manifest):
    from svd_batch.video import frames_sha256

    frames = reference_frames()
    return frames, {k: frames_sha256(v) for k, v in frames.items()}


LCM = ("generation.sampler=animatelcm", "report.enabled=false", "report.scores=false")


@pytest.mark.slow
def test_animatelcm_rows_equal_the_published_sampler_in_the_stock_pipeline_with_resume(lcm_manifest, want,
                                                                                      tmp_path):
    out = tmp_path / "out"
    first = run_cli(f"manifest.path={lcm_manifest}", f"output.dir={out}", *LCM, "manifest.limit=5")
    assert first.returncode == 0, first.stderr
    assert len(read_results(out)) == 5
    again = run_cli(f"manifest.path={lcm_manifest}", f"output.dir={out}", *LCM)  # resumes the other rows
    assert again.returncode == 0, again.stderr
    got = hashes(out)
    assert got == want[1] and len(set(got.values())) == len(rows())
    # Another sampler would mix two kinds of video in the folder: refused, naming the key.
    mixed = run_cli(f"manifest.path={lcm_manifest}", f"output.dir={out}", "report.enabled=false")
    assert mixed.returncode == 2 and "generation.sampler" in mixed.stderr


@pytest.mark.slow
def test_animatelcm_batches_give_each_row_its_own_noise(lcm_manifest, want, tmp_path):
    """A batch of two gives each row its frames whatever its batch-mate or place, within the float rounding that
    batching itself brings (as with euler: tests/test_batch.py); the CLI's batches give those same bytes."""
    from diffusers.utils import load_image

    from svd_batch.generate import Generator
    from svd_batch.tiny import ensure_tiny_model
    from svd_batch.video import frames_sha256
    from tests.conftest import make_row, typed

    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={lcm_manifest}", f"output.dir={out}", *LCM, "runtime.batch_size=2")
    assert proc.returncode == 0, proc.stderr
    assert set(read_results(out)["batch_size"].to_pylist()) == {2}
    got = hashes(out)

    frames, _ = want
    spec = {r["id"]: r for r in rows()}
    with one_thread():
        gen = Generator.load(str(ensure_tiny_model()), device=torch.device("cpu"), sampler="animatelcm", **typed())
        for a, b in (("s8-g1.2-0", "s8-g1.2-1"), ("s4-g1.0-0", "s4-g1.0-1")):
            pair = [make_row(id=i, **{k: v for k, v in spec[i].items() if k not in ("id", "image")},
                             height=64, width=64) for i in (a, b)]
            images = [load_image(spec[i]["image"]) for i in (a, b)]
            outs = gen.run(pair, images)
            swapped = gen.run(pair[::-1], images[::-1])
            assert [o.batch_size for o in outs] == [2, 2]
            for o, s, i in zip(outs, swapped[::-1], (a, b)):
                assert np.array_equal(o.frames, s.frames)  # its place in the batch does not matter
                assert frames_sha256(o.frames) == got[i]  # the CLI's batches: the same bytes
                assert np.abs(o.frames.astype(int) - frames[i].astype(int)).max() <= 2


@pytest.mark.distributed
def test_animatelcm_on_two_processes(lcm_manifest, want, tmp_path):
    out = tmp_path / "out"
    proc = launch(f"manifest.path={lcm_manifest}", f"output.dir={out}", *LCM)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(read_results(out)["rank"].to_pylist()) == {0, 1}
    assert hashes(out) == want[1]
