"""One row run by svd-batch gives the frames of the diffusers guide's snippet with the same inputs."""

import numpy as np
import pytest
import torch

from svd_batch.generate import Generator
from svd_batch.model import ModelUnavailable, resolve_model_path
from svd_batch.tiny import ensure_tiny_model
from svd_batch.video import frames_sha256
from tests.conftest import make_row, read_results, run_cli, write_manifest


def guide_snippet(image_path, *, seed, height, width, num_frames, steps, fps, motion_bucket_id,
                  noise_aug_strength, decode_chunk_size, max_guidance_scale=3.0):
    """The diffusers SVD guide, verbatim apart from the tiny model and sizes."""
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import load_image

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ensure_tiny_model()))
    pipe.set_progress_bar_config(disable=True)
    image = load_image(str(image_path))
    image = image.resize((width, height))
    generator = torch.manual_seed(seed)
    frames = pipe(image, height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
                  decode_chunk_size=decode_chunk_size, generator=generator, fps=fps,
                  motion_bucket_id=motion_bucket_id, noise_aug_strength=noise_aug_strength,
                  max_guidance_scale=max_guidance_scale).frames[0]
    return np.stack([np.asarray(f) for f in frames])


@pytest.mark.slow
def test_runner_row_equals_guide_snippet(tmp_path, images):
    rows = [
        {"id": "cat", "image": "images/cat.jpg", "seed": 1234, "fps": 9, "motion_bucket_id": 200,
         "noise_aug_strength": 0.05, "num_frames": 6, "height": 64, "width": 96, "decode_chunk_size": 4},
        {"id": "rocket", "image": str(images / "rocket.jpg"), "seed": 7},
    ]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.num_inference_steps=3")
    assert proc.returncode == 0, proc.stderr
    got = {r["id"]: r for r in read_results(out).to_pylist()}

    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the run: CPU float results depend on it
    try:
        cat = guide_snippet(images / "cat.jpg", seed=1234, height=64, width=96, num_frames=6, steps=3, fps=9,
                            motion_bucket_id=200, noise_aug_strength=0.05, decode_chunk_size=4)
        rocket = guide_snippet(images / "rocket.jpg", seed=7, height=64, width=64, num_frames=8, steps=3, fps=7,
                               motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8)
    finally:
        torch.set_num_threads(old)
    assert cat.shape == (6, 64, 96, 3)
    assert got["cat"]["frames_sha256"] == frames_sha256(cat)
    assert got["rocket"]["frames_sha256"] == frames_sha256(rocket)
    assert got["cat"]["frames_sha256"] != got["rocket"]["frames_sha256"]
    assert got["cat"]["sampler"] == got["rocket"]["sampler"] == "euler"  # the default: the checkpoint's scheduler


class RecordingPipe:
    """Stands in for the pipeline to show exactly which values a row passes on."""

    def __init__(self):
        self.calls = []

    def __call__(self, image, **kwargs):
        self.calls.append({"size": image.size, **kwargs, "seed_draw": kwargs["generator"].initial_seed()})
        # output_type="pt": (batch, frames, channels, height, width) in [0, 1], as diffusers' postprocess gives
        video = torch.zeros(1, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
        return type("Out", (), {"frames": video})()


def test_row_values_reach_the_pipeline():
    from PIL import Image

    pipe = RecordingPipe()
    gen = Generator(pipe=pipe, device=torch.device("cpu"), memory_mode="full")
    row = make_row(width=96, height=64, num_frames=5, num_inference_steps=3, min_guidance_scale=0.5,
                   max_guidance_scale=2.5, fps=11, motion_bucket_id=33, noise_aug_strength=0.07, decode_chunk_size=2,
                   seed=99)
    frames = gen.frames(Image.new("RGB", (300, 200)), row)
    call = pipe.calls[0]
    assert frames.shape == (5, 64, 96, 3)
    assert call["size"] == (96, 64)  # resized to (width, height) before the pipeline, as in the guide
    for k in ("height", "width", "num_frames", "num_inference_steps", "min_guidance_scale", "max_guidance_scale",
              "fps", "motion_bucket_id", "noise_aug_strength", "decode_chunk_size"):
        assert call[k] == getattr(row, k), k
    assert call["seed_draw"] == 99 and call["generator"].device.type == "cpu"


def test_memory_mode_caps_decode_chunk():
    gen = Generator(pipe=None, device=torch.device("cpu"), memory_mode="low_vram", max_decode_chunk_size=2)
    assert gen.effective_decode_chunk(8) == 2 and gen.effective_decode_chunk(1) == 1
    assert Generator(pipe=None, device=torch.device("cpu"), memory_mode="full").effective_decode_chunk(8) == 8


def test_missing_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match="model_index.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_device_quantization_gives_the_bytes_of_diffusers_pil_frames():
    """Frames are quantized where they are made; the bytes must be those of diffusers' numpy -> PIL path,
    including values that land exactly between two levels and values outside [-1, 1]."""
    from diffusers.video_processor import VideoProcessor

    from svd_batch.batch import decoded_to_frames

    processor = VideoProcessor(do_resize=True, vae_scale_factor=8)
    g = torch.Generator().manual_seed(0)
    video = torch.rand(2, 3, 5, 16, 24, generator=g) * 2.4 - 1.2  # (batch, channels, frames, H, W) as decoded
    halves = (torch.arange(256, dtype=torch.float32) + 0.5) / 255 * 2 - 1  # k.5 / 255 after denormalize
    video[0, 0, 0].view(-1)[:256] = halves
    video[1, 0, 1, 0, :3] = torch.tensor([-1.0, 1.0, 0.0])
    pipe = type("Pipe", (), {"video_processor": processor})()
    got = decoded_to_frames(pipe, video)
    want = [np.stack([np.asarray(f) for f in v]) for v in processor.postprocess_video(video, output_type="pil")]
    assert [g.shape for g in got] == [(5, 16, 24, 3)] * 2 and got[0].dtype == np.uint8
    for a, b in zip(got, want):
        assert np.array_equal(a, b)
    assert got[0].min() == 0 and got[0].max() == 255  # the clamp is exercised


class StubUNet:
    """Just what forward chunking touches, to see it switched on for a retry and off again."""

    chunked = False

    def enable_forward_chunking(self):
        self.chunked = True

    def modules(self):
        return [self]

    def set_chunk_feed_forward(self, chunk_size, dim):
        self.chunked = chunk_size is not None


class FailingPipe(RecordingPipe):
    """Raises the given errors on its first calls, then records like RecordingPipe."""

    def __init__(self, *errors):
        super().__init__()
        self.errors = list(errors)
        self.unet = StubUNet()
        self.chunked_at_call = []

    def __call__(self, image, **kwargs):
        self.chunked_at_call.append(self.unet.chunked)
        if self.errors:
            raise self.errors.pop(0)
        return super().__call__(image, **kwargs)


ROW = make_row(id="a", width=32, height=32, num_frames=3, num_inference_steps=2, min_guidance_scale=1.0,
           max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8, seed=1)


def test_cublas_and_cudnn_allocation_failures_enter_the_fallback_ladder():
    from PIL import Image

    pipe = FailingPipe(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                       RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"))
    gen = Generator(pipe=pipe, device=torch.device("cpu"), memory_mode="full")
    [out] = gen.run([ROW], [Image.new("RGB", (40, 40))])
    assert out.error is None and out.frames.shape == (3, 32, 32, 3)
    assert out.memory_mode == "full+decode_chunk_2+forward_chunking" and out.decode_chunk_size == 2
    assert out.batch_size == 1 and out.attention == "auto"
    assert pipe.chunked_at_call == [False, False, True] and not pipe.unet.chunked  # back to the configured mode
    # Any other error is the row's own: recorded in one line, no retry in cheaper modes.
    pipe = FailingPipe(ValueError("bad conditioning\nsecond line"))
    [out] = Generator(pipe=pipe, device=torch.device("cpu"), memory_mode="full").run([ROW], [Image.new("RGB", (8, 8))])
    assert out.frames is None and out.error == "row a: generate failed: ValueError: bad conditioning"
    assert out.memory_mode == "full" and not pipe.calls


def test_errors_that_poison_the_device_are_classified_and_raised():
    from PIL import Image

    from svd_batch.device_errors import DeviceFailure, is_device_poisoned, is_oom

    poisoned = ["CUDA error: an illegal memory access was encountered",
                "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA`",
                "CUDA error: unspecified launch failure", "CUDA error: uncorrectable ECC error encountered",
                "CUDA error: misaligned address", "CUDA error: an illegal instruction was encountered",
                "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx( handle, opa, ...)`",
                "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"]
    for msg in poisoned:
        assert is_device_poisoned(RuntimeError(msg)) and not is_oom(RuntimeError(msg)), msg
    for msg in ["CUDA out of memory. Tried to allocate 2.00 GiB", "CUDNN_STATUS_ALLOC_FAILED",
                "CUBLAS_STATUS_ALLOC_FAILED"]:
        assert is_oom(RuntimeError(msg)) and not is_device_poisoned(RuntimeError(msg)), msg
    assert is_oom(torch.cuda.OutOfMemoryError("x"))
    assert not is_oom(ValueError("shape mismatch")) and not is_device_poisoned(ValueError("shape mismatch"))
    try:  # found through the cause, as when a library wraps the CUDA error
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as inner:
            raise ValueError("decode failed") from inner
    except ValueError as wrapped:
        assert is_device_poisoned(wrapped)

    gen = Generator(pipe=FailingPipe(RuntimeError(poisoned[0])), device=torch.device("cpu"), memory_mode="full")
    with pytest.raises(DeviceFailure) as info:
        gen.run([ROW], [Image.new("RGB", (8, 8))])
    msg = str(info.value)
    import socket

    assert "device cpu" in msg and socket.gethostname() in msg and "row(s) a" in msg and "illegal memory" in msg
    assert "\n" not in msg and "resume" in msg


def test_attention_setting_is_checked_before_the_model_loads():
    from svd_batch.model import SettingRefused, check_attention

    check_attention("math", "cpu")
    check_attention("cudnn", "cuda")
    with pytest.raises(SettingRefused, match="runtime.attention=cudnn runs only on CUDA"):
        check_attention("cudnn", "cpu")
    with pytest.raises(SettingRefused, match="not a known attention backend.*auto, flash, cudnn, efficient, math"):
        check_attention("fast", "cpu")
