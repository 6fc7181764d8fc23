"""The orchestration, in one place: manifest -> plan -> generate -> write -> report, on every rank.

Rank and world size come from the launcher (accelerate, torchrun, srun through accelerate); a plain
``svd-batch`` is a world of one. Ranks talk only twice: rank 0 prepares the run folder and tells the
others whether to go on, and a barrier before any rank writes, so that every rank plans from the same
records. Everything else each rank derives on its own.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from .fields import CONDITIONING_FIELDS, GENERATION_FIELDS
from .manifest import Manifest, ManifestError, load_manifest
from .plan import CHANGE_FIELDS, Plan, changed_rows, make_plan
from .rundir import RESULT_SCHEMA, RunDir, RunDirError, write_text_atomic

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE = 0, 1, 2


def log(msg: str, rank: int = 0) -> None:
    print(msg if rank == 0 else f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def env_rank_world() -> tuple[int, int]:
    """Rank and world size as launchers export them, without importing torch (dry runs stay fast)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def plain(node: Any) -> Any:
    """A config node as plain Python (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def read_manifest(cfg: DictConfig) -> Manifest:
    m = cfg.manifest
    return load_manifest(
        str(m.path),
        plain(cfg.generation),
        columns=plain(m.get("columns")),
        defaults=plain(m.get("defaults")),
        image_root=m.get("image_root"),
        limit=m.get("limit"),
        where=plain(m.get("where")),
    )


def fingerprint(cfg: DictConfig, identity: str) -> dict[str, Any]:
    """Everything a finished video depends on: a resume that changes any of it would mix two kinds of video."""
    fp: dict[str, Any] = {
        "model.path": str(cfg.model.path),
        "model.variant": cfg.model.variant,
        "model.dtype": str(cfg.model.dtype),
        "model.identity": identity,
        "memory.max_decode_chunk_size": cfg.memory.get("max_decode_chunk_size"),
    }
    for k in GENERATION_FIELDS:
        fp[f"generation.{k}"] = cfg.generation.get(k)
    for k, v in (plain(cfg.manifest.get("defaults")) or {}).items():
        fp[f"manifest.defaults.{k}"] = v
    for k, v in plain(cfg.video).items():
        fp[f"video.{k}"] = v
    return fp


def fingerprint_diff(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def prepare_rundir(cfg: DictConfig, rundir: RunDir, identity: str) -> None:
    """Rank 0 only: lock the folder and make sure this start may add to what is there."""
    rundir.create()
    rundir.acquire_lock()
    rundir.remove_temporaries()
    fp = fingerprint(cfg, identity)
    if cfg.overwrite:
        rundir.clear()
    elif rundir.has_previous_work():
        if not cfg.resume:
            raise RunDirError(
                f"{rundir.root} already holds results of an earlier run and resume=false was given. Rerun "
                "without resume=false to continue it, with overwrite=true to delete it and start again, or "
                "choose another output.dir."
            )
        before = rundir.read_fingerprint()
        if before is not None:
            diff = fingerprint_diff(before, fp)
            if diff:
                raise RunDirError(
                    f"{rundir.root} holds videos made with a different configuration, and resuming would mix "
                    "them with videos made now. Differing keys (earlier -> now): " + "; ".join(diff) + ". "
                    "Run with the earlier values to resume, use another output.dir for the new settings, or "
                    "add overwrite=true to delete the earlier results and redo everything."
                )
    rundir.write_fingerprint(fp)
    write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), os.path.join(rundir.root, "config.yaml"))


def plan_run(cfg: DictConfig, manifest: Manifest, rundir: RunDir, world: int) -> Plan:
    """What is left to do in ``rundir`` and who does it; raises RunDirError for an unusable folder."""
    has_state = os.path.isdir(rundir.state)
    records = rundir.read_records(["id", "status", *CHANGE_FIELDS]) if has_state else RESULT_SCHEMA.empty_table()
    check_unchanged(manifest.table, records)
    return make_plan(manifest.table, records, world_size=world, retry_failed=bool(cfg.retry_failed),
                     strategy=str(cfg.runtime.shard_strategy))


def plan_or_report(cfg: DictConfig, manifest: Manifest, rundir: RunDir, world: int, rank: int) -> Plan | None:
    """plan_run, with an unusable folder reported once (by rank 0) instead of raised."""
    try:
        return plan_run(cfg, manifest, rundir, world)
    except RunDirError as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return None


def check_unchanged(manifest, records) -> None:
    """A manifest edited since rows finished would leave videos that no longer match their rows."""
    n, examples = changed_rows(manifest, records)
    if n:
        raise RunDirError(
            f"{n} finished row{'s' if n != 1 else ''} changed in the manifest since {'their' if n != 1 else 'its'} "
            f"video was made (recorded -> manifest): " + "; ".join(examples) + ("; ..." if n > len(examples) else "")
            + ". Resuming would keep videos that no longer match their rows. Restore those values, give the "
            "changed rows new ids (they are then new rows), or add overwrite=true to redo everything."
        )


def describe_plan(plan: Plan, manifest: Manifest, dataset: str | None = None) -> str:
    lines = [
        f"manifest: {dataset!r} ({manifest.source})" if dataset else f"manifest: {manifest.source}",
        f"rows: {plan.total} selected, {plan.done} done, {plan.failed_skipped} failed earlier (skipped; "
        f"retry_failed=true runs them), {plan.todo.num_rows} to run on {plan.world_size} process(es)",
    ]
    costs = plan.shard_costs()
    if plan.todo.num_rows and plan.world_size > 1:
        counts = [int(x) for x in np.bincount(plan.todo["rank"].to_numpy(), minlength=plan.world_size)]
        balance = costs.mean() / costs.max() if costs.max() > 0 else 1.0
        lines.append(f"rows per rank: {counts}; cost balance (mean/max): {balance:.3f}")
    t = manifest.table
    if t.num_rows:
        ranges = []
        for f in CONDITIONING_FIELDS:
            mm = pc.min_max(t[f])
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            ranges.append(f"{f} {lo}" if lo == hi else f"{f} {lo}..{hi}")
        lines.append("values: " + ", ".join(ranges))
    return "\n".join(lines)


def _thumb_max_row(cfg: DictConfig, manifest: Manifest) -> int:
    """Rows up to this manifest row keep contact-sheet thumbnails as they are written (no decode later)."""
    n = min(int(cfg.report.contact_sheet_rows), manifest.table.num_rows)
    return int(manifest.table["row"][n - 1].as_py()) if cfg.report.enabled and n > 0 else -1


def _write_report(root: str, cfg: DictConfig) -> None:
    """The gallery and contact sheet are for people: a failure there is reported, never fatal."""
    from .gallery import write_report

    try:
        write_report(root, int(cfg.report.page_size), int(cfg.report.contact_sheet_rows))
    except Exception as exc:  # noqa: BLE001
        log(f"svd-batch: could not write the gallery ({type(exc).__name__}: {exc}); "
            f"retry with svd-batch-report {root}")


def compile_options(cfg: DictConfig) -> dict[str, Any] | None:
    if not cfg.runtime.compile:
        return None
    return {"mode": cfg.runtime.compile_mode, "backend": str(cfg.runtime.compile_backend), "fullgraph": True}


class StopFlag:
    """SIGINT/SIGTERM: stop taking rows, finish the current one; a second signal abandons it."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def run(cfg: DictConfig) -> int:
    rank, world = env_rank_world()
    try:
        from .settings import SettingsError, check as check_settings

        check_settings(cfg)
    except SettingsError as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    try:
        manifest = read_manifest(cfg)
    except ManifestError as exc:
        exc.dataset = str(cfg.manifest.get("name") or "") or None
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    rundir = RunDir(str(cfg.output.dir))

    if cfg.dry_run:
        plan = plan_or_report(cfg, manifest, rundir, world, rank)
        if plan is None:
            return EXIT_USAGE
        if rank == 0:
            print(describe_plan(plan, manifest, cfg.manifest.get("name")))
            print(f"output: {rundir.root} (dry run: no model loaded, nothing written)")
        return EXIT_OK
    return _run_distributed(cfg, manifest, rundir)


def _run_distributed(cfg: DictConfig, manifest: Manifest, rundir: RunDir) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from .generate import Generator, ModelUnavailable, model_identity, resolve_model_path
    from .report import summary, write_results
    from .worker import RankWorker

    want_cpu = str(cfg.runtime.device) == "cpu" or not torch.cuda.is_available()
    if str(cfg.runtime.device) == "cuda" and not torch.cuda.is_available():
        log("svd-batch: runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
        return EXIT_USAGE
    # Ranks wait for each other twice: while rank 0 downloads the model (minutes for SVD-XT) and at the end,
    # when the fastest rank waits for the slowest. torch's default 10-minute collective timeout would kill
    # healthy runs at either point.
    state = PartialState(cpu=want_cpu, timeout=dt.timedelta(minutes=float(cfg.runtime.dist_timeout_minutes)))
    rank, world = state.process_index, state.num_processes
    # accelerate names the CPU "cpu:0" under a launcher; diffusers then takes other code paths whose floats
    # differ from plain "cpu". Plain "cpu" keeps rows identical to the guide's snippet at any world size.
    device = state.device if state.device.type == "cuda" else torch.device("cpu")
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    stop = StopFlag()
    stop.install()

    # 1. Rank 0 resolves the model (a download happens once) and prepares the folder; the rest wait.
    outcome: list[Any] = [None]
    if state.is_main_process:
        try:
            local = resolve_model_path(str(cfg.model.path), cfg.model.variant, str(cfg.model.name))
            prepare_rundir(cfg, rundir, model_identity(local))
        except (ModelUnavailable, RunDirError) as exc:
            outcome = [f"svd-batch: {exc}"]
        except OSError as exc:
            outcome = [f"svd-batch: cannot use output.dir={rundir.root}: {exc}. Choose a writable folder."]
    if world > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0] is not None:
        if rank == 0:
            log(outcome[0])
        return EXIT_USAGE

    # 2. Every rank plans from the same records; nobody writes until all have read them.
    local = resolve_model_path(str(cfg.model.path), cfg.model.variant, str(cfg.model.name))
    plan = plan_or_report(cfg, manifest, rundir, world, rank)
    if plan is None:
        return EXIT_USAGE
    shard = plan.shard(rank)
    if rank == 0:
        log(describe_plan(plan, manifest, cfg.manifest.get("name")))
    state.wait_for_everyone()
    started = time.perf_counter()

    # 3. Generate this rank's rows: the model computes while threads load images and write videos.
    stats = None
    try:
        if shard.num_rows:
            t = time.perf_counter()
            try:
                gen = Generator.load(local, device=device, dtype_name=str(cfg.model.dtype),
                                     variant=cfg.model.variant, memory=plain(cfg.memory),
                                     compile=compile_options(cfg))
            except ModelUnavailable as exc:
                log(f"svd-batch: {exc}", rank)
                return EXIT_USAGE
            bar = _progress(cfg, shard.num_rows, rank, world)
            worker = RankWorker(gen, rundir, cfg, rank=rank, world=world, stop=stop, progress=bar,
                                log=lambda msg: log(msg, rank), thumb_max_row=_thumb_max_row(cfg, manifest))
            worker.stats.model_load_seconds = time.perf_counter() - t
            stats = worker.run(shard)
            bar.close()
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT

    if stop.signum is not None:
        name = signal.Signals(stop.signum).name
        log(f"svd-batch: stopped by {name}; every finished row is recorded in {rundir.root}. Run the same "
            "command again to resume: finished rows are skipped.", rank)
        if rank == 0:
            rundir.release_lock()
        return 128 + stop.signum

    # 4. Once every rank is through, rank 0 merges the records and writes results.parquet.
    state.wait_for_everyone()
    if not state.is_main_process:
        return EXIT_ROWS_FAILED if stats is not None and stats.failed else EXIT_OK
    records = rundir.merge()
    results = write_results(rundir, records, manifest.table, manifest.extra_columns)
    rundir.remove_temporaries()
    if cfg.report.enabled:
        _write_report(rundir.root, cfg)
    rundir.release_lock()
    ran = results.filter(pc.and_(pc.is_in(results["id"], value_set=plan.todo["id"]),
                                 pc.equal(results["status"], "ok")))["total_seconds"].to_pylist()
    log(summary(results, total=plan.total, ran=ran, wall_seconds=time.perf_counter() - started,
                output_dir=rundir.root, stats=stats))
    failed = results.filter(pc.equal(results["status"], "failed")).num_rows
    return EXIT_ROWS_FAILED if failed else EXIT_OK


def _progress(cfg: DictConfig, total: int, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}" if world > 1 else "videos", unit="video",
                position=rank if world > 1 else None, leave=True, mininterval=1.0, dynamic_ncols=True,
                disable=not cfg.runtime.progress, file=sys.stderr)
