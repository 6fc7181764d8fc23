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
import socket
import sys
import time
import traceback
from typing import Any

import numpy as np
import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from .fields import CONDITIONING_FIELDS, GENERATION_FIELDS
from .manifest import Manifest, ManifestError, load_manifest
from .plan import Plan, make_plan
from .rundir import RESULT_SCHEMA, PartWriter, RunDir, RunDirError, write_text_atomic

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
        manifest = read_manifest(cfg)
    except ManifestError as exc:
        exc.dataset = str(cfg.manifest.get("name") or "") or None
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    rundir = RunDir(str(cfg.output.dir))

    if cfg.dry_run:
        records = rundir.read_records(["id", "status"]) if os.path.isdir(rundir.state) else None
        plan = make_plan(manifest.table, records if records is not None else RESULT_SCHEMA.empty_table(),
                         world_size=world, base_seed=int(cfg.generation.seed), retry_failed=bool(cfg.retry_failed),
                         strategy=str(cfg.runtime.shard_strategy))
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

    want_cpu = str(cfg.runtime.device) == "cpu" or not torch.cuda.is_available()
    if str(cfg.runtime.device) == "cuda" and not torch.cuda.is_available():
        log("svd-batch: runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
        return EXIT_USAGE
    state = PartialState(cpu=want_cpu)
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
    try:
        records = rundir.read_records(["id", "status"])
    except RunDirError as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    plan = make_plan(manifest.table, records, world_size=world,
                     base_seed=int(cfg.generation.seed), retry_failed=bool(cfg.retry_failed),
                     strategy=str(cfg.runtime.shard_strategy))
    shard = plan.shard(rank)
    if rank == 0:
        log(describe_plan(plan, manifest, cfg.manifest.get("name")))
    state.wait_for_everyone()

    # 3. Generate this rank's rows.
    started = time.perf_counter()
    ran: list[float] = []
    failed_here = 0
    exit_code = EXIT_OK
    try:
        if shard.num_rows:
            try:
                gen = Generator.load(local, device=device, dtype_name=str(cfg.model.dtype),
                                     variant=cfg.model.variant, memory=plain(cfg.memory),
                                     compile=bool(cfg.runtime.compile))
            except ModelUnavailable as exc:
                log(f"svd-batch: {exc}", rank)
                return EXIT_USAGE
            writer = PartWriter(rundir, rank, int(cfg.runtime.results_chunk_rows))
            bar = _progress(cfg, shard.num_rows, rank, world)
            host = socket.gethostname()
            img_cfg = cfg.get("images") or {}
            for batch in shard.to_batches(max_chunksize=256):
                for row in batch.to_pylist():
                    if stop.signum is not None:
                        break
                    record = _run_row(row, gen, rundir, cfg, rank, world, host, img_cfg)
                    writer.add(record)
                    if record["status"] == "ok":
                        ran.append(record["total_seconds"])
                    else:
                        failed_here += 1
                        log(f"svd-batch: {record['error']}", rank)
                    bar.update(1)
                if stop.signum is not None:
                    break
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
    if state.is_main_process:
        records = rundir.merge()
        results = write_results(rundir, records, manifest.table, manifest.extra_columns)
        rundir.remove_temporaries()
        rundir.release_lock()
        log(summary(results, total=plan.total, ran=ran if world == 1 else _ran_all(results, plan),
                    wall_seconds=time.perf_counter() - started, output_dir=rundir.root))
        failed = results.filter(pc.equal(results["status"], "failed")).num_rows
        exit_code = EXIT_ROWS_FAILED if failed else EXIT_OK
    else:
        exit_code = EXIT_ROWS_FAILED if failed_here else EXIT_OK
    return exit_code


def _ran_all(results, plan: Plan) -> list[float]:
    mask = pc.and_(pc.is_in(results["id"], value_set=plan.todo["id"]), pc.equal(results["status"], "ok"))
    return results.filter(mask)["total_seconds"].to_pylist()


def _progress(cfg: DictConfig, total: int, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}" if world > 1 else "videos", unit="video",
                position=rank if world > 1 else None, leave=True, mininterval=1.0, dynamic_ncols=True,
                disable=not cfg.runtime.progress, file=sys.stderr)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _run_row(row, gen, rundir: RunDir, cfg, rank, world, host, img_cfg) -> dict[str, Any]:
    import torch

    from .generate import OutOfMemory, peak_host_memory_bytes
    from .images import ImageError, load_image
    from .write import frames_sha256, write_mp4

    started_at = _now()
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "id": row["id"],
        "image": row["image"],
        "row": row["row"],
        "seed": row["seed"],
        **{f: row[f] for f in CONDITIONING_FIELDS},
        "memory_mode": gen.memory_mode,
        "model": str(cfg.model.name),
        "device": str(gen.device),
        "rank": rank,
        "world_size": world,
        "host": host,
        "started_at": started_at,
    }
    record["decode_chunk_size"] = gen.effective_decode_chunk(row["decode_chunk_size"])  # until a fallback
    if gen.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(gen.device)
    stage = "image"
    try:
        image = load_image(row["image_uri"], timeout=float(img_cfg.get("timeout", 30)),
                           max_bytes=int(img_cfg.get("max_bytes", 64 << 20)),
                           max_pixels=img_cfg.get("max_pixels"))
        t1 = time.perf_counter()
        stage = "generate"
        frames, record["memory_mode"], record["decode_chunk_size"] = gen.frames_with_fallback(image, row)
        t2 = time.perf_counter()
        stage = "write"
        digest = frames_sha256(frames)
        write_mp4(frames, rundir.video_path(row["id"]), int(row["fps"]), crf=int(cfg.video.crf),
                  codec=str(cfg.video.codec), pix_fmt=str(cfg.video.pix_fmt), preset=str(cfg.video.preset))
        t3 = time.perf_counter()
        record.update(status="ok", error=None, video_path=f"videos/{row['id']}.mp4", frames_sha256=digest,
                      load_seconds=t1 - t0, generate_seconds=t2 - t1, write_seconds=t3 - t2)
    except ImageError as exc:
        record.update(status="failed", error=f"row {row['id']}: image {row['image']!r}: {exc}")
    except OutOfMemory as exc:
        record.update(status="failed", error=f"row {row['id']}: {exc}")
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - one bad row must not stop the run; the reason is recorded
        detail = str(exc).splitlines()[0][:500] if str(exc) else ""
        record.update(status="failed", error=f"row {row['id']}: {stage} failed: {type(exc).__name__}: {detail}")
        if os.environ.get("SVD_BATCH_DEBUG"):
            traceback.print_exc()
    record["total_seconds"] = time.perf_counter() - t0
    record["finished_at"] = _now()
    record["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated(gen.device)) if gen.device.type == "cuda" else None
    record["peak_host_memory_bytes"] = peak_host_memory_bytes()
    return record
