"""The orchestration of one process, in one place: manifest -> plan -> generate -> write -> report.

Each rank of each launch runs ``run``: numbered steps, like a diffusers pipeline's ``__call__``. The protocol
between processes (the agreement, claims, takeovers, who merges and reports, exit codes) is the executor's;
what a job is and how it is planned is job.py's; what a rank does with its units is the worker's.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import DictConfig

from .executor import EXIT_INCOMPLETE, EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, Executor, Timing, static_deal
from .fields import RESULT_SCHEMA
from .job import check_facts, describe_plan, model_problem, plan_run, propose
from .launch import LaunchError, start_launch
from .ledger import JobInfo
from .manifest import Manifest, ManifestError, load_for
from .model import SettingRefused, check_settings, device_type, model_path, unet_weights_path
from .plan import Plan
from .results import results_table, summary, write_results
from .rundir import RunDir, RunDirError
from .settings import RunSettings, SettingsError
from .signals import StopFlag, effective_grace, launcher_kill_seconds, parent_cmdline, say_after_exit


def log(msg: str, rank: int = 0) -> None:
    print(msg if rank == 0 else f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def run(cfg: DictConfig) -> int:
    """One process of a run, from the composed config; returns its exit code (README: Failures and exit codes)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    say = (lambda msg: log(msg)) if rank == 0 else (lambda msg: None)  # noqa: E731 - errors of the whole run, once

    # 1. Settings and manifest, read and checked by every rank (each must see the same rows) before anything else.
    try:
        s = RunSettings.from_config(cfg)
        manifest = load_for(s)
    except (SettingsError, ManifestError) as exc:
        say(f"svd-batch: {exc}")
        return EXIT_USAGE
    rundir = RunDir(s.output.dir, locks=s.output.lock)
    if s.dry_run:
        try:
            plan = plan_run(s, manifest, rundir, world)
        except RunDirError as exc:
            say(f"svd-batch: {exc}")
            return EXIT_USAGE
        if rank == 0:
            print(describe_plan(plan, manifest, s.manifest.name))
            print(f"output: {rundir.root} (dry run: no model loaded, nothing written)")
        return EXIT_OK
    device = device_type(s.runtime)
    try:
        check_settings(s, device)  # settings that cannot work are refused before anything is written
    except SettingRefused as exc:
        say(f"svd-batch: {exc}")
        return EXIT_USAGE

    # 2. Join this command's other ranks, and the run folder as a member.
    grace, note = effective_grace(s.runtime.grace_seconds, launcher_kill_seconds(os.environ, parent_cmdline()))
    if note:
        say(note)
    stop = StopFlag(grace)
    stop.install()
    try:
        launch = start_launch(s.runtime.dist_timeout_minutes)
    except LaunchError as exc:
        log(f"svd-batch: rank {rank}: {exc}")
        return EXIT_USAGE
    timing = Timing(lease=s.runtime.lease_seconds, heartbeat=s.runtime.heartbeat_seconds,
                    poll=min(1.0, s.runtime.heartbeat_seconds))
    ex = Executor(launch, rundir, timing, log=lambda msg: log(msg, launch.rank))
    ex.stopped = stop
    code = None
    try:
        code = _member(s, manifest, rundir, ex, stop, device)
        return code
    finally:
        ex.close(code)


def _member(s: RunSettings, manifest: Manifest, rundir: RunDir, ex: Executor, stop: StopFlag, device_type_: str) -> int:
    import torch

    device = _device(device_type_, ex.local_rank)
    if s.runtime.threads:
        torch.set_num_threads(s.runtime.threads)
    rank, world = ex.rank, ex.world
    say = lambda msg: log(msg, rank)  # noqa: E731

    # 3. Agree on the job: join the one in progress in this folder, or plan a new one.
    start = ex.agree(lambda alone: propose(s, manifest, rundir, device.type, world, alone),
                     lambda proposal: check_facts(s, manifest, device.type, proposal),
                     before=lambda: model_problem(s))
    if start is None:
        return EXIT_USAGE
    plan = start.facts["plan"].build(manifest.table)
    static = static_deal(plan.unit_costs(), world, rank) if s.runtime.schedule == "static" and not start.joined else None
    ex.begin(start, plan.num_units, static)
    if rank == 0:
        if start.joined:
            say(f"svd-batch: joined job {start.job.job} in progress in {rundir.root}: {plan.todo.num_rows} rows "
                f"in {plan.num_units} units, shared with the launches already working there")
        log(describe_plan(plan, manifest, s.manifest.name))
    started = time.perf_counter()

    # 4. Work: claim units until none is left (the model loads only once this member has work).
    state, parts, stats = _work(s, manifest, rundir, ex, stop, device, plan, start)

    # 5. Leave: a final state (units still held are given back); the last ones merge, one per node reports.
    code = ex.end(state, parts, stats, signum=stop.signum, say=say,
                  merge=lambda: _merge_and_report(s, manifest, rundir),
                  report=lambda results, lost: _summarize(s, rundir, plan, start, results, started, lost,
                                                          ex.launch_figures(), manifest))
    if stop.signum is not None and code == 128 + stop.signum:  # a signal after the report changes nothing
        name = signal.Signals(stop.signum).name
        text = (f"svd-batch: interrupted by {name}; every finished row is recorded in {rundir.root}. Run the same "
                "command again to resume: finished rows are skipped.")
        if stop.signum == signal.SIGINT and "TORCHELASTIC_RUN_ID" in os.environ:
            # Ctrl-C: the launcher prints its own traceback once its workers are gone; one line per node, after
            # it. (SIGTERM also comes from torchrun restarting its workers, which then carry on: said at once.)
            if ex.local_rank == 0:
                say_after_exit(os.getppid(), text)
        else:
            say(text)
    return code


def _work(s: RunSettings, manifest: Manifest, rundir: RunDir, ex: Executor, stop: StopFlag, device, plan: Plan,
          start) -> tuple[str, dict[str, int], dict[str, Any]]:
    """Run this member's units; (how it ended, its part files with their row counts, its figures)."""
    from .device_errors import DeviceFailure
    from .generate import Generator
    from .model import ModelUnavailable
    from .outage import SourceOutage
    from .video import OutputFolderError
    from .worker import RankWorker

    say = lambda msg: log(msg, ex.rank)  # noqa: E731
    first = ex.next_unit(wait=True)
    if first is None:
        return "done", {}, {}
    t = time.perf_counter()
    try:
        gen = Generator.load(model_path(s.model), device=device, model=s.model, memory=s.memory, runtime=s.runtime,
                             unet_weights=unet_weights_path(s.model), sampler=s.generation.sampler)
    except ModelUnavailable as exc:
        say(f"svd-batch: {exc}")
        ex.abort(f"model: {exc}")
        return "aborted", {}, {}
    # With claims nobody knows a rank's share in advance: a bar per rank counts rows and rate.
    bar = _progress(s, plan.todo.num_rows if ex.world == 1 and not start.joined else None, ex.rank, ex.world)
    worker = RankWorker(gen, rundir, s, rank=ex.rank, world=ex.world, stop=stop, progress=bar, log=say,
                        thumb_max_row=_thumb_max_row(s, manifest), member=ex.name)
    worker.stats.model_load_seconds = time.perf_counter() - t
    state = "done"
    try:
        worker.run(plan, _FirstThen(first, ex))
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
    except DeviceFailure as exc:
        state = "device_failure"
        say(f"svd-batch: rank {ex.rank} stopped: {exc}")
    except OutputFolderError as exc:
        state = "aborted"
        ex.abort(f"output: {exc}")
        say(f"svd-batch: {exc}")
    except SourceOutage as exc:
        state = "aborted"
        ex.abort(f"source: {exc}")
        say(f"svd-batch: {exc}")
    finally:
        bar.close()
    if state == "done" and ex.aborted() and stop.signum is None:
        source = ex.abort_reason().startswith("source:")
        say("svd-batch: stopped: another process stopped the run (its message says why: "
            + ("a source of images is down" if source else "the output folder could not take more files")
            + "); every finished row is recorded.")
    return state, dict(worker.parts.written), worker.stats.figures()


class _FirstThen:
    """The executor as the worker's unit source, after the unit claimed before the model loaded."""

    def __init__(self, first, ex: Executor):
        self.first, self.ex = first, ex

    def next_unit(self, wait: bool):
        if self.first is not None:
            t, self.first = self.first, None
            return t
        return self.ex.next_unit(wait)

    def superseded(self, t) -> bool:
        return self.ex.superseded(t)

    def finished(self, t) -> None:
        self.ex.finished(t)

    def recorded(self, parts, **counts) -> None:
        self.ex.recorded(parts, **counts)


def _device(device_type_: str, local_rank: int):
    import torch

    if device_type_ == "cpu":
        # Plain "cpu", never "cpu:0": diffusers takes other code paths for the latter, whose floats differ.
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _thumb_max_row(s: RunSettings, manifest: Manifest) -> int:
    """Rows up to this manifest row keep contact-sheet thumbnails as they are written (no decode later)."""
    n = min(s.report.contact_sheet_rows, manifest.table.num_rows)
    return int(manifest.table["row"][n - 1].as_py()) if s.report.enabled and n > 0 else -1


def _progress(s: RunSettings, total: int | None, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}" if world > 1 else "videos", unit="video",
                position=rank if world > 1 else None, leave=True, mininterval=1.0, dynamic_ncols=True,
                disable=not s.runtime.progress, file=sys.stderr)


def _merge_and_report(s: RunSettings, manifest: Manifest, rundir: RunDir):
    records = None
    for _ in range(5):  # another merge replaced the records meanwhile (its lock was lost): merge again on top
        records = rundir.merge()
        if records is not None:
            break
    if records is None:
        return None
    results = write_results(rundir, records, manifest.table, manifest.extra_columns)
    if s.report.enabled:
        from .report import write_report

        try:  # the report and contact sheet are for people: a failure there is reported, never fatal
            write_report(rundir.root, s.report.page_size, s.report.contact_sheet_rows)
        except Exception as exc:  # noqa: BLE001
            log(f"svd-batch: could not write the report ({type(exc).__name__}: {exc}); "
                f"retry with svd-batch-report {rundir.root}")
    return results


def _summarize(s: RunSettings, rundir: RunDir, plan: Plan, start, results, started: float, lost: list[str],
               ranks: list[dict], manifest: Manifest) -> int:
    unmerged = results is None and not rundir.up_to_date()
    if unmerged:
        # Another process holds the merge lock (paused?): count what is recorded, not the stale results.parquet.
        results = results_table(rundir.read_records(), manifest.table, manifest.extra_columns, warn=lambda m: None)
    elif results is None:
        try:
            results = pq.read_table(rundir.results_path)
        except Exception:  # noqa: BLE001 - no results yet (another process's merge is pending)
            results = RESULT_SCHEMA.empty_table()
    ran = results.filter(pc.and_(pc.is_in(results["id"], value_set=plan.todo["id"]),
                                 pc.equal(results["status"], "ok")))["total_seconds"].to_pylist()
    failed = results.filter(pc.equal(results["status"], "failed")).num_rows
    not_done = plan.total - results.num_rows
    text = summary(results, total=plan.total, ran=ran, wall_seconds=time.perf_counter() - started,
                   output_dir=rundir.root, ranks=[r for r in ranks if r.get("rank") is not None])
    if lost:
        text += (f"\n  {len(lost)} process(es) stopped answering during the run ({', '.join(lost)}); their units "
                 "were taken over by the others.")
    if unmerged:
        text += (f"\n  these rows are recorded in {rundir.root}, but not yet merged into results.parquet: the process "
                 "holding the merge lock merges them when it resumes, or the next run does (run the same command "
                 "again, or svd-batch-report on the folder; exit code 3).")
    if not_done:
        text += f"\n  {not_done} row(s) not done: run the same command again to finish them (exit code 3)."
    elif not unmerged:
        job = JobInfo.read(rundir.store)
        if job is not None and job.job == start.job.job and job.state != "complete":
            job.state = "complete"
            try:
                job.write(rundir.store)
            except OSError:
                pass
    log(text)
    if not_done or unmerged:
        return EXIT_INCOMPLETE
    return EXIT_ROWS_FAILED if failed else EXIT_OK
