"""End to end: `python -m svd_batch` as a user runs it, on the tiny model."""

import os
import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

from svd_batch.fields import CONDITIONING_FIELDS
from svd_batch.plan import derive_seed
from tests.conftest import REPO, read_results, run_cli, video_names, write_manifest
from tests.test_video import read_mp4


@pytest.mark.slow
def test_bundled_sample_job_runs_every_row(tmp_path):
    """The README's run command: no arguments, the bundled sample, the tiny model, a stable folder."""
    env = {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "svd_batch", "runtime.progress=false"], cwd=tmp_path,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "outputs" / "sample-tiny"
    results = read_results(out)
    assert results.num_rows == 8 and set(results["status"].to_pylist()) == {"ok"}
    assert video_names(out) == sorted(f"{i}.mp4" for i in results["id"].to_pylist())
    assert "8 ok, 0 failed of 8 rows" in proc.stderr
    # The same command again reaches the same folder and finds nothing left to do.
    again = subprocess.run([sys.executable, "-m", "svd_batch", "runtime.progress=false"], cwd=tmp_path,
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing left to do" in again.stderr
    assert read_results(out).equals(results)


@pytest.mark.slow
def test_results_schema_videos_and_overrides(tmp_path, images):
    rows = [
        {"id": "a", "image": "images/cat.jpg", "fps": 12, "num_frames": 5},
        {"id": "b", "image": "images/coffee.jpg", "seed": 3, "height": 48, "width": 80, "motion_bucket_id": 10},
        {"image": "images/rocket.jpg", "caption": "a rocket"},
    ]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    # Command-line overrides set the defaults that rows without a value use.
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "generation.fps=5", "generation.seed=777",
                   "generation.noise_aug_strength=0.1", "video.crf=23")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    expected = {"id", "status", "error", "video_path", "image", "seed", "frames_sha256", "load_seconds",
                "generate_seconds", "write_seconds", "total_seconds", "peak_vram_bytes", "peak_host_memory_bytes",
                "device", "rank", "host", "started_at", "finished_at", *CONDITIONING_FIELDS}
    assert expected <= set(t.column_names)
    assert t.schema.field("seed").type == pa.int64() and t.schema.field("noise_aug_strength").type == pa.float64()
    assert t.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert "extra.caption" in t.column_names and t["extra.caption"].to_pylist() == [None, None, "a rocket"]

    df = pd.read_parquet(out / "results.parquet")  # what users open it with
    assert list(df["id"][:2]) == ["a", "b"] and df["id"][2].startswith("rocket-")
    a, b, c = (df.iloc[i] for i in range(3))
    assert (a.fps, a.num_frames, a.height, a.width) == (12, 5, 64, 64)
    assert (b.fps, b.seed, b.height, b.width, b.motion_bucket_id) == (5, 3, 48, 80, 10)
    assert a.seed == derive_seed(777, "a") and c.seed == derive_seed(777, df["id"][2])
    assert all(df.noise_aug_strength == 0.1) and all(df.status == "ok") and df.error.isna().all()
    assert all(df.device == "cpu") and df.peak_vram_bytes.isna().all() and all(df.peak_host_memory_bytes > 0)
    assert all(df.total_seconds >= df.generate_seconds) and all(df.generate_seconds > 0)
    assert all(df.finished_at >= df.started_at) and all(df["rank"] == 0)
    assert all(len(h) == 64 for h in df.frames_sha256)

    # polars and duckdb read it too, with the same rows and types.
    import duckdb
    import polars as pl

    pdf = pl.read_parquet(out / "results.parquet")
    assert pdf["id"].to_list() == list(df["id"]) and pdf.schema["started_at"] == pl.Datetime("us", "UTC")
    n_ok, max_frames = duckdb.sql(f"select count(*) filter (where status = 'ok'), max(num_frames) "
                                  f"from read_parquet('{out / 'results.parquet'}')").fetchall()[0]
    assert (n_ok, max_frames) == (3, 8)

    for r in df.itertuples():
        meta, frames = read_mp4(out / r.video_path)
        assert frames.shape == (r.num_frames, r.height, r.width, 3)
        assert meta["fps"] == r.fps
    assert (out / "config.yaml").exists() and "crf: 23" in (out / "config.yaml").read_text()
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]
    assert leftovers == [] and not list((out / ".svd-batch" / "parts").iterdir())


@pytest.mark.slow
def test_bad_manifest_stops_before_work_with_exit_2(tmp_path):
    rows = [{"id": "ok", "image": "x.jpg"}, {"id": "loud", "image": "x.jpg", "motion_bucket_id": 300},
            {"id": "slow", "image": "x.jpg", "fps": 0}, {"id": "ok", "image": "y.jpg"}]
    m = write_manifest(tmp_path / "m.parquet", rows)
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}")
    assert proc.returncode == 2
    err = proc.stderr
    assert "row 1 (id 'loud'): column 'motion_bucket_id' = 300; allowed: an integer in 0..255" in err
    assert "row 2 (id 'slow'): column 'fps' = 0" in err
    assert "row 3 (id 'ok')" in err and "unique id" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_missing_real_checkpoint_gives_the_fetch_command(tmp_path):
    proc = run_cli("model=svd_xt", f"output.dir={tmp_path / 'out'}",
                   env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "stabilityai/stable-video-diffusion-img2vid-xt" in proc.stderr
    assert "hf download stabilityai/stable-video-diffusion-img2vid-xt" in proc.stderr
    assert "model.path" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "videos").exists()


@pytest.mark.slow
def test_dry_run_prints_plan_without_model(tmp_path, images):
    m = write_manifest(tmp_path / "m.parquet", [{"image": "images/cat.jpg", "fps": f} for f in (5, 9)])
    proc = run_cli(f"manifest.path={m}", f"output.dir={tmp_path / 'out'}", "dry_run=true")
    assert proc.returncode == 0, proc.stderr
    assert "2 to run" in proc.stdout and "fps 5..9" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_non_editable_install_carries_configs_and_sample(tmp_path):
    """`pip install .` (a wheel) must work without the source tree: configs and sample travel."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO)], check=True, capture_output=True, timeout=300)
    target = tmp_path / "site"
    whl = next(wheels.glob("svd_batch-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(whl)],
                   check=True, capture_output=True, timeout=300)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", "import svd_batch, sys; print(svd_batch.__file__)"],
                          cwd=work, env=env, capture_output=True, text=True)
    assert proc.stdout.startswith(str(target))
    proc = subprocess.run([str(target / "bin" / "svd-batch") if (target / "bin" / "svd-batch").exists()
                           else sys.executable, *([] if (target / "bin" / "svd-batch").exists() else
                           ["-m", "svd_batch"]), "dry_run=true"], cwd=work, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "8 selected" in proc.stdout and str(target) in proc.stdout


@pytest.mark.slow
def test_bad_override_is_a_usage_error(tmp_path):
    proc = run_cli("generation.no_such_key=3", f"output.dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and "no_such_key" in proc.stderr
    proc = run_cli("output.dir=/x/${oops}", "dry_run=true")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "output.dir = '/x/${oops}'" in proc.stderr and "\n" not in proc.stderr.strip()


@pytest.mark.process
def test_help_lists_usage_groups_and_exit_codes():
    proc = subprocess.run([sys.executable, "-m", "svd_batch", "--help"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0
    assert "Usage: svd-batch" in proc.stdout and "Exit codes" in proc.stdout
    assert "model: animatelcm_svd_xt, animatelcm_svd_xt_1_1, svd, svd_xt, svd_xt_1_1, tiny" in proc.stdout and "memory: full, low_vram, offload" in proc.stdout


@pytest.mark.process
def test_multirun_is_refused_before_anything_runs(tmp_path):
    for flag in ("-m", "--multirun"):
        proc = subprocess.run([sys.executable, "-m", "svd_batch", flag, "generation.seed=1,2", "runtime.progress=false"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "svd-batch-manifest" in proc.stderr and "--sweep seed=1,2" in proc.stderr
        assert "\n" not in proc.stderr.strip()  # one paragraph
        assert os.listdir(tmp_path) == []  # no multirun/<date>, no outputs/<date>, no run folder


@pytest.mark.slow
def test_config_values_of_the_wrong_type_are_named_with_exit_2(tmp_path):
    proc = run_cli("runtime.batch_size=two", "report.enabled=yes", "generation.fps=0.5", "dry_run=true",
                   f"output.dir={tmp_path / 'out'}")
    assert proc.returncode == 2, proc.stderr
    msg = proc.stderr.strip()
    assert "\n" not in msg and "Traceback" not in msg
    for part in ("runtime.batch_size = 'two'", "an integer >= 1", "report.enabled = 'yes'", "true or false",
                 "generation.fps = 0.5", "3 config values", "runtime.batch_size=<value>"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_manifest_where_of_the_wrong_type_is_a_manifest_error(tmp_path):
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "image": "a.jpg", "fps": 7}])
    for override, part in (("+manifest.where.fps=fast", "column 'fps' = 'fast'"),
                           ("+manifest.where.id={x:1}", "manifest.where.id = {'x': 1}")):
        proc = run_cli(f"manifest.path={m}", override, "dry_run=true")
        assert proc.returncode == 2, proc.stderr
        assert part in proc.stderr and "Traceback" not in proc.stderr and "Arrow" not in proc.stderr, proc.stderr
    proc = run_cli(f"manifest.path={m}", "+manifest.where.fps=7", "dry_run=true")
    assert proc.returncode == 0 and "1 selected" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_the_image_column_hint_works_as_printed(tmp_path):
    """The tool's own hint (`manifest.columns.image=<your column>`) is a plain override that Hydra accepts."""
    m = write_manifest(tmp_path / "m.parquet", [{"id": "a", "frame": "a.jpg"}])
    proc = run_cli(f"manifest.path={m}", "dry_run=true")
    assert proc.returncode == 2
    hint = "manifest.columns.image=<your column>"
    assert hint in proc.stderr, proc.stderr
    proc = run_cli(f"manifest.path={m}", "dry_run=true", hint.replace("<your column>", "frame"))
    assert proc.returncode == 0 and "1 selected" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_num_processes_without_multi_gpu_warns_that_the_world_is_one(tmp_path):
    from pathlib import Path

    from tests.conftest import free_port

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    proc = subprocess.run([accelerate, "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
                           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "svd_batch",
                           "dry_run=true", f"output.dir={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "to run on 1 process(es)" in proc.stdout  # what happened: one process
    assert "--num_processes 2 but started this one process alone" in proc.stderr  # and now it says so
    assert "accelerate launch --multi_gpu --num_processes 2 -m svd_batch" in proc.stderr


def test_lone_process_warning_only_for_a_world_of_one_that_asked_for_more():
    from svd_batch.commands.run import lone_process_warning

    simple = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    parent = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes=4", "-m", "svd_batch"]
    assert "--num_processes 4" in lone_process_warning(simple, parent)
    assert lone_process_warning({**simple, "WORLD_SIZE": "4", "RANK": "1"}, parent) is None  # a real world
    one = ["/venv/bin/accelerate", "launch", "--num_processes", "1", "-m", "svd_batch"]
    assert lone_process_warning({"ACCELERATE_MIXED_PRECISION": "no"}, one) is None  # asked for one
    assert lone_process_warning({}, ["bash"]) is None  # plain svd-batch


@pytest.mark.process
def test_library_info_lines_are_hidden_and_their_warnings_kept(tmp_path):
    """botocore logs "Found credentials in environment variables." at INFO through Hydra's root logger."""
    code = ("import logging, sys\n"
            "import svd_batch.runner as runner\n"
            "def fake_run(cfg):\n"
            "    log = logging.getLogger('botocore.credentials')\n"
            "    log.info('Found credentials in environment variables.')\n"
            "    log.warning('a botocore warning')\n"
            "    return 0\n"
            "runner.run = fake_run\n"
            "sys.argv = ['svd-batch']\n"
            "from svd_batch.commands.run import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a botocore warning" in proc.stdout + proc.stderr  # Hydra's handler is live: warnings show
    assert "Found credentials" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_building_the_tiny_model_says_so(tmp_path, capfd):
    from svd_batch.tiny import ensure_tiny_model

    ensure_tiny_model(tmp_path / "tiny")
    err = capfd.readouterr().err
    assert "building the tiny model" in err and "tiny model built in" in err
    ensure_tiny_model(tmp_path / "tiny")  # built once: nothing to say the second time
    assert "tiny model" not in capfd.readouterr().err
