"""The `tiny` model preset: a small random-weight SVD pipeline with the real architecture's shape.

It is materialised once on disk with ``save_pretrained`` and then loaded with ``from_pretrained``, the
same code path as a real checkpoint, so tests and demos exercise what users run. The VAE keeps the real
downsampling factor 8 (four blocks): a shallower VAE would make latents, and run time, many times larger.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Bump when the architecture or seeding changes: the cache folder is keyed on it, so old folders are
# never mistaken for the new model.
TINY_VERSION = "v1"


def default_cache_dir() -> Path:
    from .identity import cache_root

    return Path(cache_root()) / "models" / f"tiny-{TINY_VERSION}"


def build_tiny_pipeline():
    """Build the pipeline from configs with fixed seeds, so every machine gets the same weights."""
    import torch

    from .util import quiet_hf_logging

    quiet_hf_logging()
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        num_attention_heads=(2, 4),
        transformer_layers_per_block=1,
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=96,  # 3 added time ids x 32
        num_frames=8,
    )
    torch.manual_seed(1)
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),  # four blocks: downsampling factor 8, like SVD's
        layers_per_block=1,
        latent_channels=4,
        sample_size=64,
    )
    torch.manual_seed(2)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            image_size=224,  # the pipeline always resizes to 224 px for CLIP, as for the real encoder
            patch_size=32,
        )
    )
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    # SVD's own scheduler configuration (stabilityai/stable-video-diffusion-img2vid/scheduler).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def ensure_tiny_model(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the folder of the tiny checkpoint, building it on first use.

    Several processes may race here (every rank of a launch); each builds into its own temporary folder and
    renames it into place, so the folder that exists is always complete.
    """
    target = Path(cache_dir) if cache_dir else default_cache_dir()
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Said before the build: otherwise the first run shows a "model load 0.1 s" that hides the build's seconds.
    print(f"svd-batch: building the tiny model (random weights, the real SVD architecture: its videos are noise, "
          f"by design) in {target}; first use only", file=sys.stderr, flush=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_pipeline().save_pretrained(tmp)
        print(f"svd-batch: tiny model built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
