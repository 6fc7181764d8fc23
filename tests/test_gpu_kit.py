"""`make gpu-kit` and `scripts/gpu_check.sh --dry-run`: the GPU window's steps, rehearsed on CPU from a fresh
environment that holds only the GPU image's packages, with the kit installed offline as on the device."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PINNED = {"antlr4_python3_runtime": "4.9.3", "diffusers": "0.42.1", "hydra_core": "1.3.8", "imageio_ffmpeg": "0.6.0",
          "omegaconf": "2.3.1", "svd_batch": "0.1.0"}

pytestmark = pytest.mark.slow


def test_make_gpu_kit_then_the_device_steps_rehearsed_on_cpu(tmp_path):
    kit = tmp_path / "kit"
    proc = subprocess.run(["make", "gpu-kit", f"GPU_KIT={kit}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = sorted(p.name for p in kit.glob("*.whl"))
    assert {w.split("-")[0]: w.split("-")[1] for w in wheels} == PINNED, wheels
    assert sum(p.stat().st_size for p in kit.glob("*.whl")) <= 60 * 2**20
    assert not list(tmp_path.glob("kit.tmp.*"))  # built aside, renamed into place

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEV_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--kit", str(kit)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert sorted(os.listdir(out)) == ["gpu_check.json", "log.txt", "summary.txt"]  # within the 8 files that return
    # The environment is the image's (its transformers and huggingface_hub), the kit's packages came offline.
    assert "transformers 5.17.0; accelerate 1.15.0; huggingface_hub 1.33.0; hydra-core 1.3.8" in log
    assert "gpu-kit installed offline" in log and "differs from this tree" not in log
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report) == ["versions", "fast", "eager", "attention", "e2e", "compiled", "levers", "frames", "memory"]
    assert not [p for p, v in report.items() if "error" in v or "skipped" in v]
    assert report["versions"]["versions"]["svd_batch_from"].endswith("/site/svd_batch")  # the kit's, not the tree

    eager = report["eager"]["full_eager_fp16"]
    assert eager["seconds_per_video"] > 0 and eager["unet_tflops"] > 0 and report["eager"]["flops"]["video_total"] > 0
    stages = eager["timeline"]
    assert {"clip", "vae_encode", "unet", "vae_decode", "uint8", "copy"} <= set(stages)
    assert stages["unet"]["calls"] == 2 and stages["pass_s"] >= sum(stages[s]["seconds"] for s in ("clip", "vae_encode", "unet", "vae_decode"))
    assert stages["mp4_s"] > 0 and any(line.startswith("unet ") for line in eager["timeline_table"])

    fast = report["fast"]  # the fast path first: AnimateLCM's sampler, 4 steps, the UNet at batch 1
    assert fast["animatelcm_eager"]["seconds_per_video"] > 0 and fast["animatelcm_eager"]["unet_calls"] == 4
    assert fast["animatelcm_eager"]["timeline"]["mp4_s"] > 0
    assert fast["animatelcm_compiled_reduce-overhead"]["frames_vs_eager"]["identical"] and fast["compile_s"] > 0
    for loop in ("svd_batch_loop_eager", "svd_batch_loop_compiled"):
        assert fast[loop]["exit_code"] == 0 and fast[loop]["steady_rows"] == 1, loop
        assert fast[loop]["sampler_recorded"] == ["animatelcm"] and fast[loop]["steps_recorded"] == [4], loop
        assert fast[loop]["scored_rows"] == 2, loop
        assert 0 <= fast[loop]["gpu_idle_fraction"] < 1, loop
    assert report["e2e"]["svd_batch_loop"]["sampler_recorded"] == ["euler"]  # the fast part put euler back

    att = report["attention"]
    assert att["auto"]["row_records"] == "flash" and att["math"]["row_records"] == "math"
    assert att["math"]["kernels"]["unet self (head dim 16)"] == "math" and att["math"]["kernels"]["vae (head dim 32)"] == "flash"
    assert "runs only on CUDA" in att["cudnn"]["refused"]

    e2e = report["e2e"]["svd_batch_loop"]
    assert e2e["exit_code"] == 0 and e2e["steady_rows"] == 1 and 0 <= e2e["gpu_idle_fraction"] < 1
    assert e2e["gpu_idle_fraction"] >= e2e["gpu_idle_outside_pipeline_call"]  # CPU work inside the call counts too

    compiled = report["compiled"]["unet_reduce-overhead"]
    assert report["compiled"]["compile_s"] > 0 and report["compiled"]["recompiles_after_warmup"] == 0
    assert compiled["frames_vs_eager"]["identical"]  # the eager backend here: same operations, same frames
    assert report["levers"]["compile_vae"]["seconds_per_video"] > 0 and report["levers"]["compile_vae_compile_s"] > 0
    assert report["levers"]["compile_vae_frames_vs_compiled_unet_only"]["identical"]
    assert report["frames"]["frames_finish"]["same_bytes"]
    assert report["memory"]["offload"]["frames_vs_eager"]["identical"]  # offload only moves models (none on CPU)
    assert report["memory"]["low_vram"]["seconds_per_video"] > 0
    summary = (out / "summary.txt").read_text()
    assert "eager fp16:" in summary and "fast eager" in summary and "GPU idle" in summary and len(summary.splitlines()) < 60  # one screen


def test_gpu_check_needs_out_and_a_kit(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "eager"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "set OUT" in proc.stderr
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--kit", str(tmp_path / "none"), "eager"], cwd=REPO,
                          env={**env, "OUT": str(tmp_path / "out")}, capture_output=True, text=True)
    assert proc.returncode == 2 and "make gpu-kit" in (tmp_path / "out" / "log.txt").read_text()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "fast ~330" in proc.stdout and "eager ~80" in proc.stdout and "--dry-run" in proc.stdout
