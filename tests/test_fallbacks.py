"""After any failure in a row, at any stage of the pipeline, the next row runs in the configured mode and gives
the frames it gives with no failure before it (failures injected through SVD_BATCH_INJECT_OOM)."""

import numpy as np
import pytest
import torch

from svd_batch.generate import Generator
from svd_batch.images import load_image
from svd_batch.tiny import ensure_tiny_model
from tests.conftest import SAMPLE, make_row, typed

pytestmark = pytest.mark.slow

STAGES = ("call", "clip", "vae_encode", "unet", "vae_decode")


def row(row_id, **kw):
    base = dict(id=row_id, width=64, height=48, num_frames=4, num_inference_steps=2, min_guidance_scale=1.0,
                max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=4,
                seed=5)
    return make_row(**{**base, **kw})


def state(gen):
    pipe = gen.pipe
    chunked = [m._chunk_size for m in pipe.unet.modules() if hasattr(m, "_chunk_size")]
    return {"dtypes": (pipe.image_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype), "chunked": chunked,
            "chunking_now": gen._chunking_now, "offload_now": gen._offload_now}


@pytest.fixture(scope="module")
def gen16():
    """float16, so that the VAE's upcast for encoding (diffusers does it only for float16) really happens."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setenv("SVD_BATCH_INJECT_OOM", ",".join(f"{s}:1@{s}" for s in STAGES) + ",batch-a:1@vae_encode")
    gen = Generator.load(str(ensure_tiny_model()), device=torch.device("cpu"), **typed("model.dtype=float16"))
    mp.undo()
    yield gen
    torch.set_num_threads(old)


def test_state_is_restored_after_an_oom_at_each_stage(gen16):
    image = load_image(str(SAMPLE / "cat.jpg"))
    before = state(gen16)
    assert before["dtypes"] == (torch.float16,) * 3 and gen16.pipe.vae.config.force_upcast
    [clean] = gen16.run([row("clean")], [image])
    assert clean.error is None
    for stage in STAGES:
        [failed_once] = gen16.run([row(stage)], [image])
        # The retry (smaller decode chunk) worked, and the pipeline is as configured again.
        assert failed_once.error is None and failed_once.memory_mode == "full+decode_chunk_2", stage
        assert state(gen16) == before, stage
        [after] = gen16.run([row("clean")], [image])
        assert after.error is None and np.array_equal(after.frames, clean.frames), stage


def test_a_failed_batch_falls_back_to_rows_that_record_their_own_size_and_time(gen16):
    image = load_image(str(SAMPLE / "rocket.jpg"))
    before = state(gen16)
    rows = [row("batch-a"), row("batch-b", seed=6), row("batch-c", seed=7)]
    messages = []
    outs = gen16.run(rows, [image] * 3, log=messages.append)
    assert [o.error for o in outs] == [None] * 3 and state(gen16) == before
    assert [o.batch_size for o in outs] == [1, 1, 1]
    assert "a batch of 3 failed (OutOfMemoryError" in messages[0] and "one by one" in messages[0]
    assert len({o.generate_seconds for o in outs}) == 3  # each row's own time, not a share of the batch
    # The row the injected OOM hit in the batch ran alone as configured: its first single pass succeeds.
    assert [o.memory_mode for o in outs] == ["full"] * 3
    again = gen16.run(rows, [image] * 3)  # no failure left: one batch pass
    assert [o.batch_size for o in again] == [3, 3, 3]
    for a, b in zip(outs, again):
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


def test_an_error_that_poisons_the_device_stops_instead_of_failing_the_row(monkeypatch):
    from svd_batch.device_errors import DeviceFailure

    monkeypatch.setenv("SVD_BATCH_INJECT_DEVICE_ERROR", "bad")
    gen = Generator.load(str(ensure_tiny_model()), device=torch.device("cpu"), **typed())
    image = load_image(str(SAMPLE / "cat.jpg"))
    with pytest.raises(DeviceFailure, match=r"device cpu on host .* row\(s\) bad: RuntimeError: CUDA error: an "
                                            r"illegal memory access was encountered\. .* resume"):
        gen.run([row("bad")], [image])
    with pytest.raises(DeviceFailure, match=r"row\(s\) ok, bad:"):  # in a batch: no one-by-one fallback either
        gen.run([row("ok"), row("bad")], [image, image])
    [fine] = gen.run([row("ok")], [image])
    assert fine.error is None
