"""generation.sampler: which scheduler denoises a row's latents.

``euler``: the checkpoint's own scheduler (diffusers' Euler for every SVD checkpoint), untouched.

``animatelcm``: AnimateLCM's consistency sampler for its distilled SVD-XT UNets (G-U-N/AnimateLCM,
``animatelcm_svd/animatelcm_scheduler.py``, class ``AnimateLCMSVDStochasticIterativeScheduler``, Apache-2.0),
with the values its inference scripts build it with (``ANIMATELCM_CONFIG``; the class defaults are other ones).
Written here from that code's equations, in its order of float operations, so a row gives its frames bit for
bit on CPU. One difference: each step's noise comes from the row's own generator. The published scheduler is
called without one, so there it comes from torch's global RNG; with the published scripts'
``generator=torch.manual_seed(seed)`` that is the same CPU stream the row's generator continues, so on CPU the
frames are the published ones, and a row's frames no longer depend on its batch, rank or the process's RNG
state. (On CUDA the published noise comes from CUDA's global RNG instead, so frames there are not theirs.)

diffusers' SVD ``__call__`` never passes ``generator=`` to ``scheduler.step``: a row run through it (batch
size 1, generate.py) sets ``scheduler.generator`` for the call (``row_generator``); the batch loop (batch.py)
passes the rows' generators to ``step`` itself. diffusers' ``CMStochasticIterativeScheduler`` is a different
computation (timesteps x1000, other scalings and noise term): not a substitute.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

SAMPLERS = ("euler", "animatelcm")

# What AnimateLCM's batch_inference.py and app.py build the scheduler with.
ANIMATELCM_CONFIG = {"num_train_timesteps": 40, "sigma_min": 0.002, "sigma_max": 700.0, "sigma_data": 1.0,
                     "s_noise": 1.0, "rho": 7, "clip_denoised": False}
ANIMATELCM_MAX_STEPS = ANIMATELCM_CONFIG["num_train_timesteps"]


def animatelcm_scheduler() -> Any:
    """A fresh AnimateLCM sampler with the published values."""
    return _animatelcm_class()(**ANIMATELCM_CONFIG)


_CLASS: list = []


def _animatelcm_class():
    """The class, built on first use so that importing svd_batch does not import diffusers."""
    if _CLASS:
        return _CLASS[0]
    import torch
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
    from diffusers.utils.torch_utils import randn_tensor

    class AnimateLCMSampler(SchedulerMixin, ConfigMixin):
        """Multistep consistency sampling on a Karras sigma schedule (AnimateLCM-SVD)."""

        order = 1

        @register_to_config
        def __init__(self, num_train_timesteps: int = 40, sigma_min: float = 0.002, sigma_max: float = 700.0,
                     sigma_data: float = 1.0, s_noise: float = 1.0, rho: float = 7.0, clip_denoised: bool = False):
            # A Python float, as published: the initial latents are randn * this.
            self.init_noise_sigma = (sigma_max**2 + 1) ** 0.5
            sigmas = np.concatenate([self._karras(np.linspace(0, 1, num_train_timesteps)), np.array([0])])
            self.sigmas = torch.from_numpy(sigmas)
            self.timesteps = torch.from_numpy(self._t(sigmas))
            self.num_inference_steps = None
            self._step_index = None
            self.generator = None  # the row's generator(s) while a row runs through __call__ (row_generator)

        def _karras(self, ramp: np.ndarray) -> np.ndarray:
            c = self.config
            lo, hi = c.sigma_min ** (1 / c.rho), c.sigma_max ** (1 / c.rho)
            return (hi + ramp * (lo - hi)) ** c.rho

        @staticmethod
        def _t(sigmas: np.ndarray) -> np.ndarray:
            # The UNet's timestep input: a quarter of log sigma (float64, as published).
            return 0.25 * np.log(np.asarray(sigmas, dtype=np.float64) + 1e-44)

        @property
        def step_index(self):
            return self._step_index

        def set_timesteps(self, num_inference_steps: int | None = None, device=None, **unused: Any) -> None:
            total = self.config.num_train_timesteps
            if num_inference_steps is None or not 1 <= int(num_inference_steps) <= total:
                raise ValueError(
                    f"generation.sampler=animatelcm takes 1 to {total} steps (AnimateLCM was distilled on {total} "
                    f"timesteps; 4 is typical), not num_inference_steps={num_inference_steps}: set "
                    "generation.num_inference_steps (or the row's num_inference_steps) in that range")
            n = int(num_inference_steps)
            self.num_inference_steps = n
            # Every (total // n)-th training timestep from 0, walked from the noisiest.
            ramp = (np.arange(0, n) * (total // n)).astype(np.int64) / (total - 1)
            sigmas = self._karras(ramp)
            timesteps = self._t(sigmas)
            self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32)).to(device=device)
            self.timesteps = torch.from_numpy(timesteps).to(device=device)
            self._step_index = None

        def _init_step_index(self, timestep) -> None:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            found = (self.timesteps == timestep).nonzero()
            self._step_index = (found[1] if len(found) > 1 else found[0]).item()

        def scale_model_input(self, sample, timestep):
            if self._step_index is None:
                self._init_step_index(timestep)
            sigma = self.sigmas[self._step_index]
            return sample / ((sigma**2 + self.config.sigma_data**2) ** 0.5)

        def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
            if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
                raise ValueError("pass one of scheduler.timesteps to step(), not an integer index")
            c = self.config
            if self._step_index is None:
                self._init_step_index(timestep)
            sigma = self.sigmas[self._step_index]
            nxt = self._step_index + 1
            sigma_next = self.sigmas[nxt] if nxt < c.num_train_timesteps else self.sigmas[-1]

            # Consistency boundary scalings (sigma_data-scaled EDM form, as published).
            c_skip = c.sigma_data**2 / ((sigma) ** 2 + c.sigma_data**2)
            c_out = -sigma * c.sigma_data / (sigma**2 + c.sigma_data**2) ** 0.5
            denoised = c_out * model_output + c_skip * sample
            if c.clip_denoised:
                denoised = denoised.clamp(-1, 1)

            # Fresh noise at the next sigma; drawn at every step of a multistep schedule (the last one too,
            # where sigma_next is 0), never for a single step: the published order of draws.
            if len(self.timesteps) > 1:
                gen = generator if generator is not None else self.generator
                noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device,
                                     generator=gen)
            else:
                noise = torch.zeros_like(model_output)
            z = noise * c.s_noise
            sigma_hat = sigma_next.clamp(min=0, max=c.sigma_max)
            prev_sample = denoised + z * sigma_hat

            self._step_index += 1
            if not return_dict:
                return (prev_sample,)
            return SchedulerOutput(prev_sample=prev_sample)

        def __len__(self) -> int:
            return self.config.num_train_timesteps

    _CLASS.append(AnimateLCMSampler)
    return AnimateLCMSampler


def is_animatelcm(scheduler: Any) -> bool:
    return bool(_CLASS) and isinstance(scheduler, _CLASS[0])


def use_sampler(pipe: Any, name: str) -> None:
    """Put the sampler ``name`` in the loaded pipeline (euler: the checkpoint's scheduler stays)."""
    if name not in SAMPLERS:
        raise ValueError(f"generation.sampler={name!r}: use one of {', '.join(SAMPLERS)}")
    if name == "animatelcm":
        pipe.scheduler = animatelcm_scheduler()


@contextlib.contextmanager
def row_generator(pipe: Any, generator: Any) -> Iterator[None]:
    """While a row runs through the pipeline's own ``__call__`` (which passes no generator to ``step``), the
    AnimateLCM sampler draws its step noise from the row's generator."""
    scheduler = getattr(pipe, "scheduler", None)
    if not is_animatelcm(scheduler):
        yield
        return
    scheduler.generator = generator
    try:
        yield
    finally:
        scheduler.generator = None
