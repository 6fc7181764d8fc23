"""model.unet_weights: a UNet state dict over the checkpoint's, found like the other weights, checked strictly before
anything is written; and a model known by its weights' bytes when a run resumes."""

import hashlib
import shutil

import numpy as np
import pytest
import torch

from svd_batch.model import (ModelUnavailable, SettingRefused, safetensors_shapes, unet_weights_path,
                             unet_weights_problems)
from svd_batch.settings import ModelSettings
from tests.conftest import read_results, run_cli, write_manifest
from tests.test_identity import fake_hub_file


def model(unet_weights):
    return ModelSettings(name="tiny", path="builtin:tiny", variant=None, unet_weights=unet_weights, dtype="auto")


def test_what_a_strict_load_would_refuse_is_named_with_counts():
    unet = {f"down.{i}.weight": (4, 4) for i in range(8)} | {"conv_in.weight": (32, 8, 3, 3)}
    file = {f"down.{i}.weight": (4, 4) for i in range(1, 8)} | {"conv_in.weight": (32, 4, 3, 3), "extra.bias": (4,)}
    text = unet_weights_problems(file, unet)
    assert text == ("1 missing key (down.0.weight); 1 unexpected key (extra.bias); 1 key of another shape "
                    "(conv_in.weight [32, 4, 3, 3] in the file, [32, 8, 3, 3] in the UNet)")
    many = unet_weights_problems({}, unet)
    assert many.startswith("9 missing keys (conv_in.weight, down.0.weight, down.1.weight, down.2.weight, "
                           "down.3.weight, ...)")
    assert unet_weights_problems(dict(unet), unet) is None


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    bad = tmp_path / "lcm.safetensors"
    bad.write_bytes(b"\x00garbage, not a safetensors header" * 10)
    with pytest.raises(SettingRefused, match="is not a safetensors file"):
        safetensors_shapes(str(bad), "lcm.safetensors")


def test_local_files_and_missing_ones(tmp_path):
    f = tmp_path / "lcm.safetensors"
    f.write_bytes(b"x")
    assert unet_weights_path(model(None)) is None
    assert unet_weights_path(model(str(f))) == str(f)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        unet_weights_path(model(str(tmp_path / "nope.safetensors")))
    with pytest.raises(ModelUnavailable, match="is a folder"):
        unet_weights_path(model(str(tmp_path)))


def test_a_hub_name_is_found_in_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    link, sha = fake_hub_file(tmp_path / "hub", "wangfuyun/AnimateLCM-SVD-xt", "AnimateLCM-SVD-xt.safetensors",
                              b"w" * 64)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    found = unet_weights_path(model("wangfuyun/AnimateLCM-SVD-xt/AnimateLCM-SVD-xt.safetensors"))
    assert found == str(link)
    from svd_batch.identity import file_sha256s

    assert file_sha256s([found], str(tmp_path / "h.json")) == {found: sha}  # the Hub's hash, unread
    with pytest.raises(ModelUnavailable) as exc:
        unet_weights_path(model("wangfuyun/AnimateLCM-SVD-xt/AnimateLCM-SVD-xt-1.1.safetensors"))
    assert "`hf download wangfuyun/AnimateLCM-SVD-xt AnimateLCM-SVD-xt-1.1.safetensors`" in str(exc.value)


def test_loading_is_strict_and_casts_to_the_modules_dtype(tmp_path):
    from svd_batch.model import load_unet_weights

    unet = torch.nn.Linear(3, 2).to(torch.bfloat16)
    sd = {"weight": torch.randn(2, 3, dtype=torch.float32), "bias": torch.randn(2, dtype=torch.float32)}
    path = save_unet(sd, tmp_path / "w.safetensors")
    load_unet_weights(unet, str(path), "w.safetensors")
    assert unet.weight.dtype == torch.bfloat16 and torch.equal(unet.weight, sd["weight"].to(torch.bfloat16))
    save_unet({"weight": sd["weight"]}, path)
    with pytest.raises(ModelUnavailable, match="bias"):
        load_unet_weights(unet, str(path), "w.safetensors")


# -- the tiny model, run -------------------------------------------------------------------------------------
def save_unet(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def tiny_unet_state():
    from diffusers import UNetSpatioTemporalConditionModel

    from svd_batch.tiny import ensure_tiny_model

    unet = UNetSpatioTemporalConditionModel.from_pretrained(str(ensure_tiny_model()), subfolder="unet")
    return unet.state_dict()


def perturbed(sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in sd.items()}


def stock_frames(image, unet_state=None):
    """The stock pipeline, its UNet given the state dict by hand as AnimateLCM's scripts do, at the tests' sizes."""
    from diffusers import StableVideoDiffusionPipeline
    from diffusers.utils import load_image

    from svd_batch.tiny import ensure_tiny_model

    pipe = StableVideoDiffusionPipeline.from_pretrained(str(ensure_tiny_model()))
    if unet_state is not None:
        pipe.unet.load_state_dict(unet_state, strict=True)
    pipe.set_progress_bar_config(disable=True)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frames = pipe(load_image(str(image)).resize((64, 64)), height=64, width=64, num_frames=8, num_inference_steps=4,
                      decode_chunk_size=8, generator=torch.manual_seed(7)).frames[0]
    finally:
        torch.set_num_threads(old)
    return np.stack([np.asarray(f) for f in frames])


@pytest.mark.slow
def test_unet_weights_give_the_frames_of_loading_the_state_dict_by_hand(tmp_path, images):
    from svd_batch.video import frames_sha256

    state = perturbed(tiny_unet_state())
    weights = save_unet(state, tmp_path / "lcm.safetensors")
    m = write_manifest(tmp_path / "m.parquet", [{"id": "r", "image": str(images / "cat.jpg"), "seed": 7}])
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", f"model.unet_weights={weights}", "report.enabled=false")
    assert proc.returncode == 0, proc.stderr
    got = read_results(out)["frames_sha256"][0].as_py()
    assert got == frames_sha256(stock_frames(images / "cat.jpg", state))
    assert got != frames_sha256(stock_frames(images / "cat.jpg"))  # the file's weights ran, not the checkpoint's

    # The same file rewritten in place with other bytes of the same size: resume refuses, naming it.
    save_unet(perturbed(state, seed=1), weights)
    again = run_cli(f"manifest.path={m}", f"output.dir={out}", f"model.unet_weights={weights}", "report.enabled=false")
    assert again.returncode == 2, again.stderr
    assert "The weights of model tiny (builtin:tiny, model.unet_weights=" in again.stderr
    assert "changed since the videos" in again.stderr and "other bytes in model.unet_weights" in again.stderr


@pytest.mark.slow
def test_weights_files_that_do_not_fit_are_refused_before_the_folder_is_touched(tmp_path, images):
    from svd_batch.job import model_problem
    from tests.conftest import settings

    state = tiny_unet_state()
    names = sorted(state)
    wrong = dict(state)
    del wrong[names[0]], wrong[names[1]]
    wrong["extra.weight"] = torch.zeros(3)
    m = write_manifest(tmp_path / "m.parquet", [{"id": "r", "image": str(images / "cat.jpg")}])
    out = tmp_path / "out"
    bad = save_unet(wrong, tmp_path / "bad.safetensors")
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", f"model.unet_weights={bad}")
    assert proc.returncode == 2, proc.stderr
    assert f"2 missing keys ({names[0]}, {names[1]})" in proc.stderr
    assert "1 unexpected key (extra.weight)" in proc.stderr
    assert not out.exists()

    # The others, as the run checks them before the folder (model_problem: what printed the message above).
    shape = dict(state)
    shape[names[2]] = torch.zeros(*state[names[2]].shape[:-1], state[names[2]].shape[-1] + 1)
    save_unet(shape, tmp_path / "shape.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"GIF89a" + bytes(range(256)))
    save_unet(state, tmp_path / "good.safetensors")
    problem = lambda f: model_problem(settings(f"model.unet_weights={tmp_path / f}"))  # noqa: E731
    assert f"1 key of another shape ({names[2]} " in problem("shape.safetensors")
    assert "is not a safetensors file" in problem("garbage.safetensors")
    assert problem("good.safetensors") is None


@pytest.mark.slow
def test_a_checkpoint_rewritten_in_place_with_the_same_size_stops_resume_naming_it(tmp_path, images):
    from svd_batch.tiny import ensure_tiny_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny_model(), ckpt)
    m = write_manifest(tmp_path / "m.parquet", [{"id": "r", "image": str(images / "cat.jpg")}])
    out = tmp_path / "out"
    args = (f"manifest.path={m}", f"output.dir={out}", f"model.path={ckpt}", "report.enabled=false")
    assert run_cli(*args).returncode == 0
    unet = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    size, digest = unet.stat().st_size, hashlib.sha256(unet.read_bytes()).hexdigest()
    with open(unet, "r+b") as f:  # the last tensor's last values, overwritten in place: same size, other bytes
        f.seek(-64, 2)
        f.write(np.full(16, 0.5, np.float32).tobytes())
    assert unet.stat().st_size == size and hashlib.sha256(unet.read_bytes()).hexdigest() != digest
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert f"The weights of model tiny ({ckpt})" in proc.stderr
    assert "other bytes in unet/diffusion_pytorch_model.safetensors" in proc.stderr
    assert read_results(out).num_rows == 1  # nothing run, nothing lost
