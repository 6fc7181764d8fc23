"""svd-batch: turn a Parquet manifest of images into videos with Stable Video Diffusion, at scale."""

__version__ = "0.1.0"
