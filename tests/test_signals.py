"""Stop signals as schedulers deliver them (issue 23): README's "Preemption recipes", each run end to end with
`accelerate launch` of 2 CPU processes, and the rank-side rules they rest on (one notice by two routes, a grace
period the launcher's SIGKILL does not cut short)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (REPO, SAMPLE, cli_args, descendants, free_port, needs_model, part_records, read_results,
                            run_cli, tmp_files, write_manifest)

N_ROWS = 8
FAST = ["runtime.lease_seconds=4", "runtime.heartbeat_seconds=0.5", "report.enabled=false"]


# -- the rules (no process) -----------------------------------------------------------------------------------
def test_the_same_signal_by_two_routes_is_one_notice(monkeypatch):
    """SLURM's --signal without B: signals every process of the step, and the launcher passes its copy on: each
    rank gets SIGTERM twice within milliseconds. That must not abandon the unit in hand; a later signal does."""
    from svd_batch import signals

    clock = [100.0]
    monkeypatch.setattr(signals.time, "monotonic", lambda: clock[0])
    flag = signals.StopFlag(grace=25)
    flag.busy(expected_seconds=3)
    monkeypatch.setattr(signals.signal, "setitimer", lambda *a: None)
    flag._handle(signal.SIGTERM, None)
    clock[0] += 0.01
    flag._handle(signal.SIGTERM, None)  # the launcher's copy: no KeyboardInterrupt
    assert flag.signum == signal.SIGTERM
    clock[0] += signals.SAME_NOTICE_SECONDS
    with pytest.raises(KeyboardInterrupt):  # a person pressing Ctrl-C again, or a second notice
        flag._handle(signal.SIGTERM, None)
    other = signals.StopFlag(grace=25)
    other._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt):  # another signal at once is not the same notice
        other._handle(signal.SIGINT, None)


def test_the_grace_period_fits_under_the_launchers_sigkill():
    from svd_batch.signals import effective_grace, launcher_kill_seconds

    elastic = {"TORCHELASTIC_RUN_ID": "x"}
    assert launcher_kill_seconds({}, []) is None  # a plain svd-batch: nobody SIGKILLs it
    assert launcher_kill_seconds(elastic, []) == 30
    assert launcher_kill_seconds({**elastic, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "50"}, []) == 50
    assert launcher_kill_seconds({**elastic, "PET_SHUTDOWN_TIMEOUT": "85", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "50"},
                                 []) == 85
    assert launcher_kill_seconds({**elastic, "PET_SHUTDOWN_TIMEOUT": "85"},
                                 ["python", "torchrun", "--shutdown-timeout", "40", "x.py"]) == 40
    assert effective_grace(25, 30) == (25, None) and effective_grace(75, None) == (75, None)
    grace, note = effective_grace(75, 30)
    assert grace == 25 and "runtime.grace_seconds=75 is cut to 25 s" in note and "PET_SHUTDOWN_TIMEOUT=80" in note


# -- the recipes, end to end ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("signals")
    rows = [{"id": f"r{i:02d}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "rocket.jpg")), "num_frames": 6,
             "motion_bucket_id": 10 * i} for i in range(N_ROWS)]
    return write_manifest(d / "m.parquet", rows)


def accelerate_launch(*overrides: str) -> list[str]:
    """The recipes' `accelerate launch --multi_gpu --num_processes 8 -m svd_batch ...`, with 2 CPU processes."""
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), *cli_args(*overrides)]


def members(out: Path) -> list[dict]:
    found = []
    for p in sorted((out / ".svd-batch" / "members").glob("*.json")):
        try:
            found.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it: what SLURM signals for a job step (all of the step's processes)."""
    return [pid, *descendants(pid)]


def wait_until(pred, what: str, proc: subprocess.Popen, timeout: float = 240.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the launch ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def both_ranks_at_work(out: Path) -> bool:
    working = [m for m in members(out) if m["state"] == "working" and m["holding"]]
    return len(working) == 2 and part_records(out).num_rows >= 1


README_LAUNCH = ("accelerate launch --multi_gpu --num_processes 8 -m svd_batch model=svd_xt \\\n"
                 "    manifest.path=/shared/shots.parquet output.dir=/shared/runs/shots-xt")


def readme_recipe(marker: str, times: dict[str, str]) -> str:
    """The bash block of README.md holding ``marker``, as written, with the test's launch (2 CPU processes, tiny
    rows) in place of its `accelerate launch ... -m svd_batch model=svd_xt manifest.path=... output.dir=...`
    and shorter times: the test runs what the README says."""
    text = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    block = next(b for b in blocks if marker in b)
    lines = block.splitlines()
    indent = len(lines[0]) - len(lines[0].lstrip())  # a block inside a list item is indented
    block = "\n".join(line[indent:] for line in lines)
    assert README_LAUNCH in block, block
    for old, new in times.items():
        assert old in block, (old, block)
        block = block.replace(old, new)
    return block.replace(README_LAUNCH, "{launch}")


RECIPES = {
    # sbatch --signal=TERM@60 (no B:), `srun accelerate launch ...`: SIGTERM to every process of the step (this
    # test stands in for srun: the step's task is the launch itself).
    "slurm-srun": dict(marker="--signal=TERM@60", times={"srun ": ""}, deliver="step", sig=signal.SIGTERM,
                       grace=25),
    # sbatch --signal=B:USR1@90: USR1 to the batch shell only.
    "slurm-batch-shell": dict(marker="--signal=B:USR1@90", deliver="shell", sig=signal.SIGUSR1, grace=15,
                              times={"PET_SHUTDOWN_TIMEOUT=85": "PET_SHUTDOWN_TIMEOUT=20",
                                     "runtime.grace_seconds=75": "runtime.grace_seconds=15"}),
    # A container whose command is `accelerate launch ...` (exec form): SIGTERM to it, SIGKILL 30 s later.
    "kubernetes": dict(marker=None, deliver="launcher", sig=signal.SIGTERM, grace=25),
}


@pytest.mark.distributed
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_preemption_recipe_stops_every_rank_within_its_grace(manifest, tmp_path, recipe):
    """The signal delivered as the scheduler delivers it, while both ranks hold a unit: every rank finishes the
    unit in hand (nothing given back, nothing half-written), the launch exits 128+signal within the grace
    period, no process is left, and the same command run again finishes every row exactly once."""
    needs_model()
    r = RECIPES[recipe]
    out = tmp_path / "out"
    common = [f"manifest.path={manifest}", f"output.dir={out}", *FAST]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SVD_BATCH_INJECT_SLOW": "0:1,1:1"}
    if r["marker"]:
        script = tmp_path / "job.sh"
        launch = " ".join(f"'{a}'" for a in accelerate_launch(*common))
        script.write_text(readme_recipe(r["marker"], r["times"]).replace("{launch}", launch))
        args = ["bash", str(script)]
    else:
        args = accelerate_launch(*common)
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_until(lambda: both_ranks_at_work(out), "both ranks at work", proc)
        step = tree(proc.pid)
        sent = time.monotonic()
        if r["deliver"] == "step":
            # The order in which a step's processes get the signal is SLURM's; here the ranks first and the
            # launcher a moment later, so that each rank surely sees two signals (its own, then the launcher's
            # copy) as separate notices, not merged into one pending signal.
            ranks = [m["pid"] for m in members(out)]
            for pid in ranks + [p for p in step if p not in ranks and p != proc.pid]:  # not the batch shell
                try:
                    os.kill(pid, r["sig"])
                except ProcessLookupError:
                    pass
                if pid == ranks[-1]:
                    time.sleep(0.3)
        else:  # the batch shell (the launcher, exec'd) or the container's main process
            os.kill(proc.pid, r["sig"])
        log = proc.communicate(timeout=r["grace"] + 30)[0]
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    left = [p for p in step if os.path.exists(f"/proc/{p}") and
            open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert proc.returncode == 128 + r["sig"], log
    assert took < r["grace"] and not left, (took, left, log)
    ranks = [m for m in members(out) if m["world_size"] == 2]
    assert len(ranks) == 2 and all(m["state"] == "stopped" and m["released"] == [] and m["holding"] == []
                                   for m in ranks), (ranks, log)  # each finished its unit in hand
    assert log.count(f"interrupted by {signal.Signals(r['sig']).name}") >= 1, log
    assert not tmp_files(out / "videos") and not [p for p in (out / ".svd-batch" / "parts").iterdir()
                                                  if ".tmp-" in p.name]
    again = run_cli(*common)
    assert again.returncode == 0, again.stderr
    t = read_results(out)
    assert sorted(t["id"].to_pylist()) == [f"r{i:02d}" for i in range(N_ROWS)]
    assert set(t["status"].to_pylist()) == {"ok"}
    print(f"{recipe}: signal -> launcher exit {took:.1f} s")
