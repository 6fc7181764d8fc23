"""The benchmark scripts run (at tiny sizes here; their real figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_bench_gpu_dry_check_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--out", str(out), "--e2e-rows", "2",
                           "--compile-modes", "default", "--attention-calls", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"full eager", "offload eager", "low_vram eager", "full compiled default"}
    for mode in report["modes"].values():
        for stage in ("clip_s", "vae_encode_s", "unet_per_step_s", "vae_decode_s", "to_host_s", "mp4_s",
                      "generate_s", "unet_tflops", "video_tflops"):
            assert mode[stage] > 0, stage
        assert mode["seconds_per_video_serial"] > mode["seconds_per_video"]
        # The staged pass's stages add up to no more than that pass (the rest: scheduler, host work).
        stages = sum(mode[k] for k in ("clip_s", "vae_encode_s", "unet_total_s", "vae_decode_s", "to_host_s"))
        assert stages <= mode["staged_generate_s"]
    compiled = report["modes"]["full compiled default"]
    assert compiled["compile_s"] > 0 and compiled["recompiles_after_warmup"] == 0
    assert report["flops"]["unet_step_cfg_batch2"] > 0 and report["flops"]["vae_decode"] > 0
    assert report["attention"]["math"]["unet_per_step_s"] > 0 and report["attention"]["cudnn"] == {"error": "CUDA only"}
    e2e = report["e2e_svd_batch"]
    assert e2e["rows"] == 2 and 0 <= e2e["gpu_idle_fraction"] < 1


def test_bench_bookkeeping_small(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/bench_bookkeeping.py", "--rows", "5000", "--done", "4000",
                           "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5000 selected, 4000 done" in proc.stdout and "1000 to run on 8 process(es)" in proc.stdout
