"""Compile as a production feature: every shape warmed up before rows are timed, the same frames as eager
with the eager backend, and refusals that come before the model loads."""

import json

import pytest
import torch

from tests.conftest import (
    SAMPLE,
    make_row,
    read_results,
    run_cli,
    typed,
    video_names,
    write_manifest,
)

pytestmark = pytest.mark.slow


def shapes_manifest(tmp_path):
    """With batch_size=2, four shapes: 64x64x8 in a batch of 2 and a tail of 1, 6 frames, guidance off."""
    rows = [{"id": f"a{i}", "seed": i} for i in range(3)]
    rows += [{"id": f"b{i}", "seed": 10 + i, "num_frames": 6} for i in range(2)]
    rows += [{"id": f"c{i}", "seed": 20 + i, "max_guidance_scale": 1.0, "min_guidance_scale": 1.0} for i in range(2)]
    for i, r in enumerate(rows):
        r["image"] = str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg"))
        r["motion_bucket_id"] = 20 * i
    return write_manifest(tmp_path / "m.parquet", rows)


def test_compiled_run_warms_every_shape_and_gives_the_frames_of_eager(tmp_path):
    m = shapes_manifest(tmp_path)
    common = [f"manifest.path={m}", "runtime.batch_size=2", "report.enabled=false", "runtime.attention=math"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    proc = run_cli(*common, f"output.dir={eager}")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(*common, f"output.dir={compiled}", "runtime.compile=true", "runtime.compile_backend=eager")
    assert proc.returncode == 0, proc.stderr
    assert "compile warm-up of 4 shape(s)" in proc.stderr
    e, c = read_results(eager), read_results(compiled)
    assert c["id"].to_pylist() == e["id"].to_pylist()
    assert c["frames_sha256"].to_pylist() == e["frames_sha256"].to_pylist()
    assert sorted(c["batch_size"].to_pylist()) == [1, 2, 2, 2, 2, 2, 2]
    assert set(c["compiled"].to_pylist()) == {True} and set(c["attention"].to_pylist()) == {"math"}
    stats = json.loads((compiled / "stats" / "rank-00000.json").read_text())
    assert stats["recompiles_after_warmup"] == 0 and stats["warmup_seconds"] > 0
    assert json.loads((eager / "stats" / "rank-00000.json").read_text())["recompiles_after_warmup"] is None


def test_recompiles_after_warmup_counts_a_shape_the_warmup_missed():
    from PIL import Image

    from svd_batch.generate import Generator
    from svd_batch.tiny import ensure_tiny_model

    gen = Generator.load(str(ensure_tiny_model()), device=torch.device("cpu"),
                         **typed("runtime.compile=true", "runtime.compile_backend=eager"))
    row = make_row(id="x", width=32, height=32, num_frames=3, num_inference_steps=2, min_guidance_scale=1.0,
               max_guidance_scale=3.0, fps=7, motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=8,
               seed=0)
    assert gen.warmup([(row, 1)]) > 0 and gen.recompiles() == 0
    gen.run([row], [Image.new("RGB", (32, 32))])
    assert gen.recompiles() == 0
    gen.run([row.with_(num_frames=2)], [Image.new("RGB", (32, 32))])  # a shape the warm-up did not cover
    assert gen.recompiles() == 1


def test_compile_with_cpu_offload_is_refused_before_the_model_loads(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": str(SAMPLE / "cat.jpg")}])
    for memory in ("offload", "low_vram"):
        out = tmp_path / memory
        proc = run_cli(f"manifest.path={m}", f"output.dir={out}", f"memory={memory}", "runtime.compile=true")
        assert proc.returncode == 2, proc.stderr
        assert f"runtime.compile=true cannot be combined with memory={memory}" in proc.stderr
        assert "Nothing was run" in proc.stderr and "Traceback" not in proc.stderr
        assert not video_names(out)


def test_resume_refuses_another_attention_backend(tmp_path):
    """Settings that change frames are in the run's fingerprint: a resume may not mix their videos."""
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": str(SAMPLE / "cat.jpg")}])
    out = tmp_path / "out"
    common = [f"manifest.path={m}", f"output.dir={out}", "report.enabled=false"]
    assert run_cli(*common, "runtime.attention=math").returncode == 0
    proc = run_cli(*common, "runtime.attention=flash")
    assert proc.returncode == 2 and "runtime.attention: 'math' -> 'flash'" in proc.stderr, proc.stderr
    # The fingerprint holds resolved values; a folder whose fingerprint predates some keys (an older svd-batch)
    # still resumes: keys it lacks are not compared.
    from svd_batch.rundir import RunDir

    rd = RunDir(str(out))
    fp = rd.read_fingerprint()
    assert fp["runtime.attention"] == "math" and fp["runtime.batch_size"] == 1 and fp["runtime.compile"] is False
    legacy = {k: v for k, v in fp.items() if not k.startswith("runtime.")}
    legacy["model.dtype"] = "auto"
    rd.write_fingerprint(legacy)
    again = run_cli(*common, "runtime.attention=math")
    assert again.returncode == 0 and "nothing left to do" in again.stderr, again.stderr
