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


def ffmpeg_tags(path) -> dict:
    """The container's tags as ffmpeg itself prints them (``ffmpeg -i file -f ffmetadata -``: what ffprobe shows),
    unescaped as the ffmetadata format says (a backslash before '=', ';', '#', '\\' and newline)."""
    import subprocess

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path),
                          "-f", "ffmetadata", "-"], capture_output=True, check=True).stdout.decode()
    tags, key, value, escaped = {}, None, [], False
    for ch in out.split("\n", 1)[1]:  # after the ";FFMETADATA1" header
        if escaped:
            value.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "\n":
            if key is not None:
                tags[key] = "".join(value)
            key, value = None, []
        elif ch == "=" and key is None:
            key, value = "".join(value), []
        else:
            value.append(ch)
    return tags


@pytest.mark.process
def test_the_recipe_rides_in_the_comment_tag_and_changes_no_frame(tmp_path):
    import json

    from svd_batch.video import read_mp4 as decode, recipe_comment

    frames = np.random.default_rng(1).integers(0, 255, (4, 32, 48, 3), dtype=np.uint8)
    recipe = {"id": "a=b;c#d\\e ü", "seed": 7, "model": "svd_xt", "sampler": "euler", "fps": 6,
              "max_guidance_scale": 3.0, "svd_batch": "0.1.0"}
    write_mp4(frames, str(tmp_path / "plain.mp4"), fps=6)
    write_mp4(frames, str(tmp_path / "tagged.mp4"), fps=6, comment=recipe_comment(recipe))
    assert json.loads(ffmpeg_tags(tmp_path / "tagged.mp4")["comment"]) == recipe
    assert "comment" not in ffmpeg_tags(tmp_path / "plain.mp4")
    assert np.array_equal(decode(str(tmp_path / "plain.mp4")), decode(str(tmp_path / "tagged.mp4")))


@pytest.mark.process
def test_the_frames_ffmpeg_decodes_while_writing_are_those_a_reader_of_the_file_gets(tmp_path):
    """The run scores what the encoder's loopback decoder gives; svd-batch-score reads the file: both must see the
    same frames (the run's and the rescore's values are equal), and asking for them changes no byte of the file."""
    from svd_batch.video import read_mp4 as decode

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:40, 0:72]
    base = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1).astype(np.uint8)
    cases = {"noise": rng.integers(0, 256, (9, 48, 64, 3), dtype=np.uint8),
             "smooth": np.stack([np.roll(base, 2 * i, axis=1) for i in range(11)]),
             "odd size": rng.integers(0, 256, (5, 30, 46, 3), dtype=np.uint8)}
    for name, frames in cases.items():
        for fps in (6, 9):
            back = write_mp4(frames, str(tmp_path / "a.mp4"), fps=fps, decode=True)
            write_mp4(frames, str(tmp_path / "b.mp4"), fps=fps)
            assert back is not None and np.array_equal(back, decode(str(tmp_path / "a.mp4"))), (name, fps)
            assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes(), (name, fps)
            assert write_mp4(frames, str(tmp_path / "c.mp4"), fps=fps) is None
