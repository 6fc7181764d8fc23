"""runtime.attention: the requested SDPA backend goes first for the UNet's attention only, with torch's own
order behind it, and each row records the kernels the UNet actually ran."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.attention import SDPBackend
from torch.overrides import TorchFunctionMode

from svd_batch.attention import default_order, describe, priority
from svd_batch.generate import Generator
from svd_batch.tiny import ensure_tiny_model
from tests.conftest import make_row, read_results, run_cli, typed, write_manifest

ROW = make_row(id="a", width=64, height=64, num_frames=8, num_inference_steps=2, min_guidance_scale=1.0,
           max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8, seed=1)
KERNEL = {int(SDPBackend.MATH.value): "math", int(SDPBackend.FLASH_ATTENTION.value): "flash"}


class SdpaCalls(TorchFunctionMode):
    """Every SDPA call of a pass: the model it came from, its shapes, the backends allowed and their order at
    that moment, and the kernel torch's dispatch picks for it."""

    def __init__(self, pipe):
        super().__init__()
        self.calls, self.model = [], []
        for name, module in (("clip", pipe.image_encoder), ("vae", pipe.vae.encoder), ("vae", pipe.vae.decoder),
                             ("unet", pipe.unet)):
            module.register_forward_pre_hook(lambda m, a, name=name: self.model.append(name))
            module.register_forward_hook(lambda m, a, o: self.model.pop() and None)  # None: keep the output

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.calls.append({
                "model": self.model[-1], "head_dim": q.shape[-1], "key_len": k.shape[-2],
                "allowed": {"math": torch.backends.cuda.math_sdp_enabled(),
                            "flash": torch.backends.cuda.flash_sdp_enabled()},
                "order": list(torch._C._get_sdp_priority_order()),
                "kernel": KERNEL[int(torch._fused_sdp_choice(*args, **kwargs))],
            })
        return func(*args, **kwargs)


def run_with_spy(gen, rows):
    spy = SdpaCalls(gen.pipe)
    with spy:
        outs = gen.run(rows, [Image.new("RGB", (64, 64), (200, 30, 30))] * len(rows))
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return outs, spy.calls


@pytest.mark.slow
def test_the_requested_backend_goes_first_for_the_unet_alone_and_rows_record_the_real_kernel():
    torch.set_num_threads(1)
    path = str(ensure_tiny_model())
    default = list(torch._C._get_sdp_priority_order())
    frames = {}
    for name in ("auto", "math", "flash"):
        gen = Generator.load(path, device=torch.device("cpu"), **typed(f"runtime.attention={name}"))
        outs, calls = run_with_spy(gen, [ROW, ROW.with_(id="b", seed=2)])  # a batch of two
        [single], single_calls = run_with_spy(gen, [ROW])
        frames[name] = single.frames
        unet = [c for c in calls + single_calls if c["model"] == "unet"]
        others = [c for c in calls + single_calls if c["model"] != "unet"]
        # The tiny model's every kind of attention ran: UNet self (spatial and temporal) and cross (one image
        # token), the VAE encoder's single head, CLIP's.
        assert {c["key_len"] for c in unet} >= {1, 8, 64} and {c["model"] for c in others} == {"clip", "vae"}
        # The VAE and CLIP keep torch's own choice whatever was asked; on CPU that is flash.
        for c in others:
            assert c["allowed"] == {"math": True, "flash": True} and c["order"] == default and c["kernel"] == "flash", c
        for c in unet:
            if name == "auto":
                assert c["allowed"] == {"math": True, "flash": True} and c["order"] == default, c
            elif name == "math":
                assert c["allowed"] == {"math": True, "flash": False}, c
            else:  # flash first, then torch's order as a fallback
                assert c["allowed"]["flash"] and c["allowed"]["math"], c
                assert c["order"][0] == int(SDPBackend.FLASH_ATTENTION.value), c
        # Each row records the kernel the UNet's calls actually ran (auto: torch's real choice, not "auto").
        ran = {c["kernel"] for c in unet}
        assert len(ran) == 1 and {o.attention for o in [*outs, single]} == ran
        assert ran == {"math" if name == "math" else "flash"}
        # Kernels are noted in one eager call per shape: a later pass of a known shape records them all the same.
        [again] = gen.run([ROW], [Image.new("RGB", (64, 64), (200, 30, 30))])
        assert again.attention == single.attention and len(gen._unet_attention.by_shape) == 2
    # A backend setting changes kernels, not the row: on CPU fp32 the two kernels agree to within rounding.
    assert np.array_equal(frames["auto"], frames["flash"])
    assert np.abs(frames["math"].astype(int) - frames["auto"].astype(int)).max() <= 1


@pytest.mark.slow
def test_a_compiled_unet_records_the_kernels_of_an_eager_call_of_the_same_shape():
    torch.set_num_threads(1)
    path = str(ensure_tiny_model())
    eager = Generator.load(path, device=torch.device("cpu"), **typed("runtime.attention=math"))
    [expected], _ = run_with_spy(eager, [ROW])
    gen = Generator.load(path, device=torch.device("cpu"), **typed(
        "runtime.attention=math", "runtime.compile=true", "runtime.compile_backend=eager", "runtime.compile_mode=null",
        "runtime.compile_vae=true"))
    gen.warmup([(ROW, 1)])
    # (No spy here: a function mode around a compiled call would make dynamo trace it.)
    [out] = gen.run([ROW], [Image.new("RGB", (64, 64), (200, 30, 30))])
    assert out.error is None and out.attention == "math" and gen.recompiles() == 0
    # One eager call per UNet input shape, made in the warm-up (guidance doubles the batch of 1).
    assert list(gen._unet_attention.by_shape) == [(2, 8, 8, 8, 8)]
    assert gen._unet_attention.by_shape[(2, 8, 8, 8, 8)] == {"self": {"math"}, "cross": {"math"}}
    assert np.array_equal(out.frames, expected.frames)  # the eager backend runs the same operations


def test_priority_orders_and_descriptions():
    assert priority("auto") is None
    assert priority("math") == [SDPBackend.MATH]  # alone: CPU torch would take flash whenever it is allowed
    order = default_order()
    assert set(order) == {SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
                          SDPBackend.CUDNN_ATTENTION}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        assert priority(name) == [backend, *(b for b in order if b != backend)]
    assert describe({"self": {"cudnn"}, "cross": {"cudnn"}}) == "cudnn"
    assert describe({"cross": {"flash"}, "self": {"cudnn", "efficient"}}) == "self:cudnn+efficient cross:flash"
    assert describe({}) is None


def test_compile_vae_needs_compile():
    from svd_batch.model import SettingRefused, check_settings
    from svd_batch.settings import RunSettings

    with pytest.raises(SettingRefused, match="runtime.compile_vae=true .* needs runtime.compile=true"):
        check_settings(RunSettings.compose("runtime.compile_vae=true"), "cpu")


@pytest.mark.slow
def test_cli_rows_record_the_unet_kernel(tmp_path, images):
    m = write_manifest(tmp_path / "m.parquet", [{"image": str(images / "cat.jpg")}])
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.enabled=false")
    assert proc.returncode == 0, proc.stderr
    assert read_results(out)["attention"].to_pylist() == ["flash"]  # auto on CPU: torch's flash kernel
