import hashlib
import os

import imageio_ffmpeg
import numpy as np
import pytest

from svd_batch.video import frames_sha256, write_mp4


def read_mp4(path):
    gen = imageio_ffmpeg.read_frames(str(path))
    meta = gen.__next__()
    frames = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in gen]
    return meta, np.stack(frames)


def test_hash_is_of_the_c_contiguous_uint8_array():
    a = np.arange(2 * 8 * 16 * 3, dtype=np.uint8).reshape(2, 8, 16, 3)
    assert frames_sha256(a) == hashlib.sha256(a.tobytes()).hexdigest()
    assert frames_sha256(np.asfortranarray(a)) == frames_sha256(a)
    b = a.copy()
    b[1, 2, 3, 0] ^= 1
    assert frames_sha256(b) != frames_sha256(a)


@pytest.mark.process
def test_mp4_has_the_frames_size_and_fps(tmp_path):
    y, x = np.mgrid[0:40, 0:72]
    base = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)  # smooth: survives yuv420p
    frames = np.stack([np.roll(base, i, axis=1) for i in range(11)])
    path = tmp_path / "v.mp4"
    write_mp4(frames, str(path), fps=9, crf=10)
    meta, back = read_mp4(path)
    assert back.shape == frames.shape
    assert meta["fps"] == 9 and tuple(meta["size"]) == (72, 40)
    assert "h264" in meta["codec"] and "yuv420p" in meta["pix_fmt"]
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4  # lossy, but the same picture
    assert os.listdir(tmp_path) == ["v.mp4"]  # no temporary left


def test_failed_write_leaves_nothing(tmp_path):
    frames = np.zeros((3, 8, 8, 3), np.uint8)
    try:
        write_mp4(frames, str(tmp_path / "v.mp4"), fps=7, codec="no-such-codec")
    except Exception:
        pass
    assert os.listdir(tmp_path) == []


@pytest.mark.process
def test_a_full_disk_raises_and_leaves_no_video(tmp_path, small_fs):
    from svd_batch.video import VideoWriteError, is_output_error

    filler = small_fs / "filler"
    filler.write_bytes(b"\0" * (300 * 1024))  # leave about 20 KB
    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)  # noise: ~50 KB of H.264
    with pytest.raises(VideoWriteError) as info:
        write_mp4(frames, str(small_fs / "v.mp4"), fps=7)
    assert is_output_error(info.value)
    assert sorted(os.listdir(small_fs)) == ["filler"]  # nothing half-written left, nothing renamed into place


@pytest.mark.process
def test_a_truncated_mp4_is_told_apart(tmp_path):
    from svd_batch.video import mp4_problem

    frames = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    write_mp4(frames, str(path), fps=7)
    assert mp4_problem(str(path)) is None
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    assert "past the end of the file" in mp4_problem(str(cut))
    cut.write_bytes(data[:20])
    assert mp4_problem(str(cut)) is not None


@pytest.mark.process
def test_ffmpeg_hit_by_a_stop_signal_encodes_once_more(tmp_path, monkeypatch):
    """SLURM's --signal (no B:) reaches every process of the job step, ffmpeg too: it exits 255 after SIGTERM
    (or dies of SIGUSR1). The rank decides about the unit in hand, so the video is encoded once more."""
    import subprocess

    from svd_batch import video

    real, calls = subprocess.run, []

    def run(args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            return subprocess.CompletedProcess(args, 255, b"", b"")  # "Exiting normally, received signal 15."
        return real(args, **kwargs)

    monkeypatch.setattr(video.subprocess, "run", run)
    write_mp4(np.zeros((3, 16, 16, 3), np.uint8), str(tmp_path / "v.mp4"), fps=7)
    assert len(calls) == 2 and os.listdir(tmp_path) == ["v.mp4"]
