"""Step 4: frames to an MP4 that browsers play, written under a temporary name and renamed into place.

A video counts only when ffmpeg exited 0 and the file reads back as a whole MP4 (every top-level box
complete, a ``moov`` and an ``mdat`` present): imageio-ffmpeg's writer ignores ffmpeg's exit status, so a
full disk used to leave a file without its index that still got renamed into place.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import subprocess

import numpy as np

from .atomic import atomic_path
from .util import first_line

# Errors of the output filesystem: no row is to blame, and every later row would hit them too.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}
_FFMPEG_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                      "Input/output error")


class VideoWriteError(Exception):
    """ffmpeg failed or left an incomplete file; ``disk`` says whether the output filesystem is to blame."""

    def __init__(self, message: str, disk: bool = False):
        super().__init__(message)
        self.disk = disk


class OutputFolderError(Exception):
    """The output folder cannot take more files (full, over quota, read-only, failing): the run stops."""


def frames_sha256(frames: np.ndarray) -> str:
    """Hex SHA-256 of the (num_frames, height, width, 3) uint8 array, C order: checks a video's
    reproducibility without decoding the lossy MP4."""
    arr = np.ascontiguousarray(frames, dtype=np.uint8)
    return hashlib.sha256(arr.tobytes()).hexdigest()


def mp4_problem(path: str) -> str | None:
    """Why the file at ``path`` is not a whole MP4, or None. Reads only the top-level box headers."""
    try:
        size = os.path.getsize(path)
        seen = set()
        with open(path, "rb") as f:
            pos = 0
            while pos < size:
                f.seek(pos)
                head = f.read(16)
                if len(head) < 8:
                    return f"a truncated box header at byte {pos}"
                length, kind = struct.unpack(">I4s", head[:8])
                if length == 1:
                    if len(head) < 16:
                        return f"a truncated box header at byte {pos}"
                    length = struct.unpack(">Q", head[8:16])[0]
                elif length == 0:
                    length = size - pos  # the box runs to the end of the file
                if length < 8 or pos + length > size:
                    return f"box {kind!r} at byte {pos} claims {length} bytes, past the end of the file ({size})"
                seen.add(kind)
                pos += length
    except OSError as exc:
        return f"it cannot be read back ({exc})"
    missing = [k.decode() for k in (b"ftyp", b"moov", b"mdat") if k not in seen]
    return f"no {', '.join(missing)} box" if missing else None


def write_mp4(frames: np.ndarray, path: str, fps: int, *, crf: int = 18, codec: str = "libx264",
              pix_fmt: str = "yuv420p", preset: str = "medium", threads: int = 1,
              comment: str | None = None, decode: bool = False) -> np.ndarray | None:
    """H.264 + yuv420p + faststart: what every browser plays. The file at ``path`` is always complete:
    raises VideoWriteError (and leaves nothing) when ffmpeg fails or its output does not read back whole.
    ``comment`` goes into the container's standard ``comment`` tag (``ffprobe`` shows it), in the same ffmpeg
    call: the frames, and so their hash, do not depend on it.

    ``decode``: also return the video as a reader of the file decodes it (``read_mp4``), from the same ffmpeg
    process: a loopback decoder (ffmpeg >= 7) decodes the packets the encoder wrote, and they go through the
    same conversion to RGB. Scores then need no second ffmpeg per video. None when that gave another number
    of frames than were written (the caller reads the file instead)."""
    import imageio_ffmpeg

    n, height, width, _ = frames.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-f", "rawvideo",
           "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", f"{fps:.02f}",
           "-i", "-", "-map", "0:v", "-an", "-vcodec", codec, "-pix_fmt", pix_fmt, "-r", f"{fps:.02f}",
           "-crf", str(crf), "-preset", preset, "-movflags", "+faststart", "-threads", str(threads)]
    if comment is not None:
        cmd += ["-metadata", f"comment={comment}"]
    # The loopback decoder's frames as rawvideo on stdout; passthrough keeps their count (rawvideo would
    # otherwise fill to 25 fps).
    back = ["-dec", "0:0", "-filter_complex", "[dec:0]null[back]", "-map", "[back]", "-fps_mode", "passthrough",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-"] if decode else []
    data = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    # Hidden and ending in .mp4: ffmpeg picks the container from the name, and nobody mistakes it for a video.
    with atomic_path(path, hidden=True, keep_extension=True) as tmp:
        for attempt in (1, 2):
            try:
                # A session of its own: a launcher stopping this rank signals the rank's process group (torchrun
                # does), and the rank, not the signal, decides whether the video in hand is finished (StopFlag).
                proc = subprocess.run([*cmd, tmp, *back], input=data, stderr=subprocess.PIPE, start_new_session=True,
                                      stdout=subprocess.PIPE if decode else subprocess.DEVNULL)
            except OSError as exc:  # ffmpeg missing or not executable; a broken pipe when it dies early
                raise VideoWriteError(f"ffmpeg could not run: {exc}") from None
            # SLURM's --signal (no B:) reaches every process of the job step, ffmpeg too (255: it handled SIGTERM
            # or SIGINT; negative: killed by SIGUSR1): encoded once more, the rank decides (it got the signal too).
            if attempt == 1 and (proc.returncode < 0 or proc.returncode == 255):
                continue
            break
        err = proc.stderr.decode(errors="replace").strip()
        if proc.returncode < 0:  # killed by a signal (the machine going down, OOM killer): not the row's fault
            raise KeyboardInterrupt(f"ffmpeg was killed by signal {-proc.returncode}")
        if proc.returncode != 0:
            last = err.splitlines()[-1] if err else "no message"
            raise VideoWriteError(f"ffmpeg exited with status {proc.returncode}: {last}",
                                  disk=any(w in err for w in _FFMPEG_DISK_WORDS))
        problem = mp4_problem(tmp)
        if problem:
            raise VideoWriteError(f"ffmpeg's output is not a whole MP4 ({problem})")
    if not decode or len(proc.stdout) != len(data):
        return None
    return np.frombuffer(proc.stdout, np.uint8).reshape(n, height, width, 3)


def recipe_comment(record: dict) -> str:
    """The row's generation settings as one line of JSON, for the MP4's ``comment`` tag: a video copied out of
    its run folder still says how to make it again."""
    import json

    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def read_mp4(path: str) -> np.ndarray:
    """The decoded frames of an MP4, (num_frames, height, width, 3) uint8: for scores and the contact sheet."""
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def is_output_error(exc: BaseException) -> bool:
    """An error of the output filesystem rather than of a row."""
    if isinstance(exc, VideoWriteError):
        return exc.disk
    if isinstance(exc, OSError):
        return exc.errno in OUTPUT_ERRNOS
    return False


def output_folder_error(exc: BaseException, folder: str) -> OutputFolderError:
    return OutputFolderError(
        f"The output folder {folder} cannot take more files ({type(exc).__name__}: "
        f"{first_line(exc) or repr(exc)}): its filesystem is full, over quota, read-only or "
        "failing. The run stopped so that no row is recorded as failed for it; every finished video and record "
        "is kept. Free space (or fix the mount), then run the same command again to finish the rest."
    )
