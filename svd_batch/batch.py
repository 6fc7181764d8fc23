"""Several rows in one pipeline pass, each with its own seed and conditioning.

``StableVideoDiffusionPipeline.__call__`` takes fps, motion_bucket_id, noise_aug_strength and the guidance
range as one scalar per call. This module follows that ``__call__`` step by step (same helpers, same order of
random draws) but builds those values per sample, so a batch gives, row by row, the frames of batch size 1
up to float rounding. Rows of one batch share height, width, num_frames, num_inference_steps and whether
guidance is on: those fix the tensor shapes and the UNet's batch layout.

Decoding is per video: diffusers' ``decode_latents`` flattens batch x frames and decodes chunks of
``decode_chunk_size`` frames, so a chunk could hold frames of two videos and the temporal decoder would mix
them. Here each video is decoded on its own with its own chunk size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .fields import SHAPE_FIELDS, Row
from .samplers import is_animatelcm


def batch_key(row: Row) -> tuple:
    """Rows with equal keys can share one pipeline batch."""
    return (*(int(getattr(row, f)) for f in SHAPE_FIELDS), float(row.max_guidance_scale) > 1.0)


def quantize_on_device(video):
    """Decoded video (batch, frames, channels, H, W) in [0, 1], float32, as diffusers' postprocess leaves it
    -> uint8 (batch, frames, H, W, channels) on the same device. The same operations, in the same float32
    precision, as ``numpy_to_pil``'s ``(images * 255).round().astype("uint8")``, so the same bytes."""
    import torch

    return (video.float() * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).contiguous()


def to_host(frames) -> np.ndarray:
    """Only the uint8 frames cross to the host (a quarter of float32)."""
    return frames.cpu().numpy()


def decoded_to_frames(pipe, decoded) -> list[np.ndarray]:
    """``decode_latents`` output -> one uint8 (num_frames, height, width, 3) array per video."""
    video = pipe.video_processor.postprocess_video(video=decoded, output_type="pt")
    return list(to_host(quantize_on_device(video)))


def batched_frames(pipe, images: Sequence, rows: Sequence[Row]) -> list[np.ndarray]:
    """Generate ``len(rows)`` videos in one pass; ``images`` are the rows' PIL images (any size).

    Args:
        pipe: a loaded ``StableVideoDiffusionPipeline`` (any memory mode).
        images: one PIL image per row; resized to (width, height) here, as the guide does.
        rows: the rows' effective values; they must share ``batch_key``.

    Returns:
        One uint8 array (num_frames, height, width, 3) per row: what ``output_type="pil"`` frames stack to,
        quantized on the device (only uint8 crosses to the host).
    """
    import torch

    with torch.no_grad():
        return _batched_frames(pipe, images, rows)


def _batched_frames(pipe, images: Sequence, rows: Sequence[Row]) -> list[np.ndarray]:
    import torch
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _append_dims
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import retrieve_timesteps

    keys = {batch_key(r) for r in rows}
    if len(keys) != 1:
        raise ValueError(f"rows of one batch must share height, width, num_frames, steps and guidance: {keys}")
    height, width, num_frames, steps, _ = keys.pop()
    n = len(rows)

    # 0. The guide's resize, and one CPU generator per row: the same draws as batch size 1.
    images = [im.resize((width, height)) for im in images]
    generators = [torch.Generator("cpu").manual_seed(int(r.seed)) for r in rows]
    max_guidance = torch.tensor([float(r.max_guidance_scale) for r in rows])
    min_guidance = torch.tensor([float(r.min_guidance_scale) for r in rows])
    pipe._guidance_scale = max_guidance.view(n, 1)  # the pipeline's own do_classifier_free_guidance reads it
    cfg = pipe.do_classifier_free_guidance
    device = pipe._execution_device

    # 1. CLIP image embeddings (zeros for the unconditional half when guiding).
    image_embeddings = pipe._encode_image(images, device, 1, cfg)

    # 2. Noise-augmented image -> VAE latents, with each row's own noise strength.
    image = pipe.video_processor.preprocess(images, height=height, width=width).to(device)
    noise = _randn(image.shape, generators, device, image.dtype)
    strength = torch.tensor([float(r.noise_aug_strength) for r in rows], device=device, dtype=image.dtype)
    image = image + strength.view(n, 1, 1, 1) * noise
    needs_upcasting = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float32)
    try:
        image_latents = pipe._encode_vae_image(image, device=device, num_videos_per_prompt=1,
                                               do_classifier_free_guidance=cfg).to(image_embeddings.dtype)
    finally:  # an OOM here must not leave the VAE in float32 for every later row
        if needs_upcasting:
            pipe.vae.to(dtype=torch.float16)
    image_latents = image_latents.unsqueeze(1).repeat(1, num_frames, 1, 1, 1)

    # 3. Added time ids per row: fps - 1 (SVD was trained on fps - 1), motion bucket, noise strength.
    ids = torch.tensor([[int(r.fps) - 1, int(r.motion_bucket_id), float(r.noise_aug_strength)] for r in rows],
                       dtype=image_embeddings.dtype)
    expected = pipe.unet.add_embedding.linear_1.in_features
    if pipe.unet.config.addition_time_embed_dim * 3 != expected:
        raise ValueError("the UNet's added time embedding does not take (fps, motion_bucket_id, noise_aug_strength)")
    added_time_ids = (torch.cat([ids, ids]) if cfg else ids).to(device)

    # 4. Timesteps and initial latents (each row's generator draws its own, after its image noise).
    timesteps, steps = retrieve_timesteps(pipe.scheduler, steps, device, None, None)
    shape = (n, num_frames, pipe.unet.config.in_channels // 2, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    latents = _randn(shape, generators, device, image_embeddings.dtype) * pipe.scheduler.init_noise_sigma

    # 5. Per-row guidance ramps over frames.
    guidance = torch.stack([torch.linspace(float(lo), float(hi), num_frames) for lo, hi in zip(min_guidance, max_guidance)])
    guidance = _append_dims(guidance.to(device, latents.dtype), latents.ndim)
    pipe._guidance_scale = guidance

    # 6. Denoising loop, as the pipeline's; AnimateLCM's step draws its noise from each row's generator.
    pipe._num_timesteps = len(timesteps)
    step_kwargs = {"generator": generators if n > 1 else generators[0]} if is_animatelcm(pipe.scheduler) else {}
    for t in timesteps:
        model_input = torch.cat([latents] * 2) if cfg else latents
        model_input = pipe.scheduler.scale_model_input(model_input, t)
        model_input = torch.cat([model_input, image_latents], dim=2)
        noise_pred = pipe.unet(model_input, t, encoder_hidden_states=image_embeddings,
                               added_time_ids=added_time_ids, return_dict=False)[0]
        if cfg:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance * (cond - uncond)
        latents = pipe.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

    # 7. Decode each video on its own, with its own chunk size.
    if needs_upcasting:
        pipe.vae.to(dtype=torch.float16)
    out = []
    for i, r in enumerate(rows):
        decoded = pipe.decode_latents(latents[i : i + 1], num_frames, int(r.decode_chunk_size))
        out.extend(decoded_to_frames(pipe, decoded))
    pipe.maybe_free_model_hooks()
    return out


def _randn(shape, generators, device, dtype):
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=list(generators) if len(generators) > 1 else generators[0],
                        device=device, dtype=dtype)
