"""Step 4: frames to an MP4 that browsers play, written under a temporary name and renamed into place."""

from __future__ import annotations

import hashlib

import numpy as np

from .atomic import atomic_path


def frames_sha256(frames: np.ndarray) -> str:
    """Hex SHA-256 of the (num_frames, height, width, 3) uint8 array, C order: checks a video's
    reproducibility without decoding the lossy MP4."""
    arr = np.ascontiguousarray(frames, dtype=np.uint8)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def write_mp4(frames: np.ndarray, path: str, fps: int, *, crf: int = 18, codec: str = "libx264",
              pix_fmt: str = "yuv420p", preset: str = "medium", threads: int = 1) -> None:
    """H.264 + yuv420p + faststart: what every browser plays. The file at ``path`` is always complete."""
    import imageio_ffmpeg

    _, height, width, _ = frames.shape
    # Hidden and ending in .mp4: ffmpeg picks the container from the name, and nobody mistakes it for a video.
    with atomic_path(path, hidden=True, keep_extension=True) as tmp:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (width, height),
            fps=fps,
            codec=codec,
            pix_fmt_in="rgb24",
            pix_fmt_out=pix_fmt,
            quality=None,
            bitrate=None,
            macro_block_size=1,  # sizes are multiples of 8 already; never let the writer rescale frames
            ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", preset, "-movflags", "+faststart", "-threads", str(threads)],
        )
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
        writer.close()
