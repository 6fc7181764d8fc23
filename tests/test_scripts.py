"""The benchmark scripts run (at tiny sizes here; their real figures live in BENCHMARKS.md)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_bench_gpu_parts_in_the_development_venv(tmp_path):
    """The parts also run from the tree (scripts/gpu_check.sh --dry-run covers all of them from the kit)."""
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--tiny", "--parts", "versions,eager,frames",
                           "--repeats", "1", "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert list(report) == ["versions", "eager", "frames"] and "error" not in report["eager"]
    eager = report["eager"]["full_eager_fp16"]
    assert eager["seconds_per_video_with_mp4"] > eager["seconds_per_video"] > 0
    assert eager["timeline"]["unet"]["per_step_median_s"] > 0 and eager["attention"] == "flash"
    proc = subprocess.run([sys.executable, "scripts/bench_gpu.py", "--parts", "eager,warp"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown part(s) warp" in proc.stderr


@pytest.mark.process
def test_bench_bookkeeping_small(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/bench_bookkeeping.py", "--rows", "5000", "--done", "4000",
                           "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5000 selected, 4000 done" in proc.stdout and "1000 to run on 8 process(es)" in proc.stdout


@pytest.mark.slow
def test_bench_export_small():
    proc = subprocess.run([sys.executable, "scripts/bench_export.py", "--rows", "100", "--shard-size", "40"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "full export: 100 samples" in proc.stdout and "after 1% more rows: 1 samples" in proc.stdout
    assert "again, nothing new: 0 samples" in proc.stdout
