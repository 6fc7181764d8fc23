"""Shared fixtures: the tiny model in a per-session cache, sample images, manifests and CLI runs.

Markers (pyproject.toml): ``slow`` runs the model (the CLI, or the tiny pipeline in-process), ``distributed``
starts several processes (accelerate launch, torchrun, independent launches), ``browser`` drives Chromium.
``make test-fast`` leaves the three out. The tiny model is built (once per session) only for tests marked so;
running the CLI from a test that is not marked fails at once, so the fast set stays fast."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "svd_batch" / "data" / "sample"

# Tiny rows: 64x64, 8 frames, 4 steps (about 0.2 s each on one core).
TINY = ["model=tiny", "generation.height=64", "generation.width=64", "generation.num_frames=8",
        "generation.num_inference_steps=4", "runtime.progress=false"]


MODEL_MARKS = {"slow", "distributed", "browser"}
# Tests that start a process (ffmpeg, a CLI usage error) but never run the model: out of the fast set too.
PROCESS_MARKS = MODEL_MARKS | {"process"}
# Kept in the environment: test modules import this file as tests.conftest, pytest as conftest (two copies).
MAY_RUN = "SVD_BATCH_TEST_MAY_RUN_MODEL"


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory):
    """Every test (and every subprocess it starts) shares one tiny checkpoint, in this session's cache."""
    cache = tmp_path_factory.mktemp("svd-batch-cache")
    os.environ["SVD_BATCH_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return cache


def _guarded_tiny_model(real):
    """svd_batch.tiny.ensure_tiny_model for the tests: only marked tests may use the model (see needs_model)."""
    def ensure_tiny_model(*args, **kwargs):
        needs_model()
        return real(*args, **kwargs)
    return ensure_tiny_model


import svd_batch.tiny as _tiny  # noqa: E402 - patched before any test module imports the name

_build_tiny_model = _tiny.ensure_tiny_model
_tiny.ensure_tiny_model = _guarded_tiny_model(_build_tiny_model)


@pytest.fixture(scope="session")
def tiny_model(tiny_cache):
    """The tiny checkpoint, built on first use (a few seconds): only tests that run the model pay for it."""
    return _build_tiny_model()


def _marked(item, marks=MODEL_MARKS) -> bool:
    return bool({m.name for m in item.iter_markers()} & marks)


_may_start_process = True


def _guarded(real):
    """A process start that fails in the fast set: `make test-fast` starts no process (issue 27)."""
    def start(*args, **kwargs):
        if not _may_start_process:
            raise AssertionError(f"{os.environ.get('PYTEST_CURRENT_TEST', 'this test')} starts a process: mark it "
                                 "process (or slow/distributed/browser), or test the logic without one")
        return real(*args, **kwargs)
    return start


subprocess.Popen._execute_child = _guarded(subprocess.Popen._execute_child)
os.fork = _guarded(os.fork)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _may_start_process
    # Before any fixture: a module-scoped fixture that runs svd-batch is set up within its first test's setup.
    os.environ[MAY_RUN] = item.nodeid if _marked(item) else ""
    _may_start_process = _marked(item, PROCESS_MARKS)


@pytest.fixture(autouse=True)
def _model_for_marked_tests(request):
    if _marked(request.node):
        request.getfixturevalue("tiny_model")


def needs_model() -> None:
    """Called where a test runs svd-batch: the test must be marked (else `make test-fast` would run it)."""
    if not os.environ.get(MAY_RUN):
        raise AssertionError(f"{os.environ.get('PYTEST_CURRENT_TEST', 'this test')} runs svd-batch: mark it slow "
                             "(or distributed/browser)")


@pytest.fixture()
def images(tmp_path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    for f in ("rocket.jpg", "cat.jpg", "coffee.jpg", "astronaut.jpg"):
        shutil.copy(SAMPLE / f, d / f)
    return d


def write_manifest(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:  # from_pylist would take the columns of the first row only
        keys = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, path)
    return path


def run_cli(*overrides: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            threads: int = 1) -> subprocess.CompletedProcess:
    """`python -m svd_batch` as a user runs it; one torch thread so frames compare across runs."""
    needs_model()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    args = [sys.executable, *cli_args(*overrides, threads=threads)]
    return subprocess.run(args, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def read_results(out: Path) -> pa.Table:
    return pq.read_table(out / "results.parquet")


def cli_args(*overrides: str, threads: int = 1) -> list[str]:
    """Hydra's flags (--config-dir=...) go before the overrides; the tiny sizes before the caller's."""
    flags = [o for o in overrides if o.startswith("--")]
    rest = [o for o in overrides if not o.startswith("--")]
    return ["-m", "svd_batch", *flags, *TINY, f"runtime.threads={threads}", *rest]


def launch(*overrides: str, num_processes: int = 2, extra: tuple[str, ...] = (), env: dict | None = None,
           timeout: float = 600, background: bool = False, log=None):
    """`accelerate launch --multi_gpu --num_processes N -m svd_batch ...` on CPU, as users run it."""
    needs_model()
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    args = [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--mixed_precision", "no", "--dynamo_backend", "no",
            *(extra or ("--num_machines", "1", "--main_process_port", str(free_port()))), *cli_args(*overrides)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if background:
        return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=log or subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(*overrides: str, threads: int = 1, log=None, env: dict | None = None) -> subprocess.Popen:
    needs_model()
    return subprocess.Popen([sys.executable, *cli_args(*overrides, threads=threads)], cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=log or subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def part_records(out: Path) -> pa.Table:
    from svd_batch.rundir import RunDir

    return RunDir(str(out)).read_records()


def wait_for_records(out: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / ".svd-batch").exists():
            got = part_records(out).num_rows
            if got >= n:
                return got
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} records (exit {proc.returncode})")
        time.sleep(0.05)
    raise AssertionError(f"no {n} records within {timeout} s")


def tmp_files(out: Path) -> list[str]:
    return [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]


@pytest.fixture()
def small_fs(tmp_path):
    """A 320 KB tmpfs: an output disk that fills up after a few tiny videos (mount needs root, as CI has)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def settings(*overrides: str):
    """RunSettings as the command line composes them (Hydra's compose API), with the tests' tiny sizes first."""
    from svd_batch.settings import RunSettings

    return RunSettings.compose(*TINY, *overrides)


def typed(*overrides: str) -> dict:
    """Generator.load's model, memory and runtime settings for these overrides."""
    s = settings(*overrides)
    return {"model": s.model, "memory": s.memory, "runtime": s.runtime}


def record(**values):
    """A fields.Record with the columns a test does not care about filled in (a real record gives every one)."""
    import dataclasses
    import datetime as dt

    from svd_batch.fields import Record

    now = dt.datetime.now(dt.timezone.utc)
    filler = {f.name: None for f in dataclasses.fields(Record)}
    filler.update(status="ok", image="x.jpg", image_uri="/x.jpg", row=0, seed=0, fps=7, motion_bucket_id=127,
                  noise_aug_strength=0.02, num_frames=2, num_inference_steps=1, height=16, width=16,
                  min_guidance_scale=1.0, max_guidance_scale=1.0, decode_chunk_size=2, load_seconds=0.0,
                  write_seconds=0.0, total_seconds=0.0, peak_host_memory_bytes=0, memory_mode="full", compiled=False,
                  sampler="euler", model="tiny", device="cpu", rank=0, world_size=1, host="h", started_at=now, finished_at=now)
    filler.update(values)
    return Record(**filler)


def make_row(**values):
    """A fields.Row: the values a test gives, plausible ones for the rest."""
    from svd_batch.fields import Row

    base = dict(id="r", image="x.jpg", image_uri="/x.jpg", row=0, seed=0, fps=7, motion_bucket_id=127,
                noise_aug_strength=0.02, num_frames=8, num_inference_steps=2, height=64, width=64,
                min_guidance_scale=1.0, max_guidance_scale=3.0, decode_chunk_size=8)
    base.update(values)
    return Row(**base)


def video_file(out: Path, row_id: str) -> Path:
    """Where a row's video is in this folder's layout (videos/<ab>/<id>.mp4, or videos/<id>.mp4 in old folders)."""
    from svd_batch.rundir import RunDir

    return Path(RunDir(str(out)).video_path(row_id))


def input_file(out: Path, row_id: str) -> Path:
    from svd_batch.rundir import RunDir

    return Path(RunDir(str(out)).input_path(row_id))


def video_names(out: Path) -> list[str]:
    """The names of the files under videos/, in any subfolder."""
    return sorted(f for _, _, fs in os.walk(out / "videos") for f in fs)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, through /proc: torchrun starts its workers in sessions of their own, and
    SLURM signals all of a job step's processes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo, found = list(children.get(pid, [])), []
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found
