"""The orchestration, in one place: manifest -> plan -> generate -> write -> report, on every rank.

Rank and world size come from the launcher (accelerate, torchrun, srun through accelerate); a plain
``svd-batch`` is a world of one. The ranks agree once at the start (executor.py): rank 0 prepares the folder
and plans from one snapshot of the records, every rank checks the model and manifest it sees, all go or
none does. Then each rank claims units of work until none is left, records its completion, and whichever
rank finishes last merges the records and writes results.parquet and the report.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import time
from typing import Any, Callable

import pyarrow.compute as pc
from omegaconf import DictConfig, OmegaConf

from .fields import CHANGE_FIELDS, CONDITIONING_FIELDS, GENERATION_FIELDS, RESULT_SCHEMA
from .manifest import Manifest, ManifestError, load_manifest
from .executor import EXIT_INCOMPLETE, EXIT_OK, EXIT_OUTPUT, EXIT_ROWS_FAILED, EXIT_USAGE
from .plan import Plan, changed_rows, make_plan
from .rundir import RunDir, RunDirError, new_session, write_text_atomic
from .settings import WorkerSettings


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
        timeout=float(cfg.images.timeout),
    )


def fingerprint(cfg: DictConfig, identity: str, device_type: str = "cpu") -> dict[str, Any]:
    """Everything a finished video depends on, resolved: a resume that changes any of it would mix two kinds of
    video. Left out on purpose (documented): runtime.threads (CPU float rounding), overlap, prefetch, schedule,
    progress and the other runtime knobs that do not touch frames; decode chunks are recorded per row."""
    from .generate import resolve_dtype

    fp: dict[str, Any] = {
        "model.path": str(cfg.model.path),
        "model.variant": cfg.model.variant,
        "model.dtype": str(resolve_dtype(str(cfg.model.dtype), device_type)).replace("torch.", ""),
        "model.identity": identity,
        "runtime.device_type": device_type,
        "runtime.batch_size": max(1, int(cfg.runtime.batch_size)),
        "runtime.compile": (f"{cfg.runtime.compile_backend}:{cfg.runtime.compile_mode}" if cfg.runtime.compile
                            else False),
        "memory.max_decode_chunk_size": cfg.memory.get("max_decode_chunk_size"),
    }
    if cfg.runtime.get("attention") is not None:
        fp["runtime.attention"] = str(cfg.runtime.attention)
    for k in GENERATION_FIELDS:
        fp[f"generation.{k}"] = cfg.generation.get(k)
    for k, v in (plain(cfg.manifest.get("defaults")) or {}).items():
        fp[f"manifest.defaults.{k}"] = v
    for k, v in plain(cfg.video).items():
        fp[f"video.{k}"] = v
    return fp


def fingerprint_diff(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Differing keys, "key: before -> now". A key the earlier fingerprint lacks was added by a later svd-batch
    and is not compared, nor is a dtype recorded as "auto" before dtypes were recorded resolved: upgrading
    must not make a folder impossible to resume."""
    now = {k: v for k, v in now.items() if k in before}
    if before.get("model.dtype") == "auto":
        now["model.dtype"] = "auto"
    keys = sorted(set(before) | set(now))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]


def prepare_rundir(cfg: DictConfig, rundir: RunDir, identity: str, device_type: str) -> None:
    """Rank 0 only: lock the folder, fold in what earlier runs left, and make sure this start may add to it."""
    rundir.create()
    if use_lock(cfg):
        rundir.acquire_lock()
    # Under the exclusive lock no writer of an earlier run is alive: every part can be merged and deleted, and
    # half-written files swept. This merged file is the one snapshot every rank plans from.
    rundir.remove_temporaries()
    if rundir.part_files():
        rundir.merge(all_parts=True)
    fp = fingerprint(cfg, identity, device_type)
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
    write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), rundir.config_path)


def saved_config(root: str) -> DictConfig | None:
    """The config.yaml a run saved in its folder (for the tools that work on a finished folder), or None."""
    path = RunDir(root).config_path
    if not os.path.exists(path):
        return None
    from .cli import register_resolvers

    register_resolvers()  # saved resolved; a hand-edited one may still name ${pkgdata:...}
    return OmegaConf.load(path)


def model_path(cfg: DictConfig) -> str:
    """model.path as a local diffusers folder (built-in, local, Hugging Face cache, or the Hub)."""
    from .generate import resolve_model_path

    return resolve_model_path(str(cfg.model.path), cfg.model.get("variant"), str(cfg.model.get("name")))


def device_type(cfg: DictConfig) -> str:
    """cuda when a GPU is visible and runtime.device allows it, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() and str(cfg.runtime.device) != "cpu" else "cpu"


def use_lock(cfg: DictConfig) -> bool:
    return bool(cfg.output.get("lock", True))


def plan_run(cfg: DictConfig, manifest: Manifest, rundir: RunDir, world: int) -> Plan:
    """What is left to do in ``rundir``, in claim order; raises RunDirError for an unusable folder."""
    has_state = os.path.isdir(rundir.state)
    records = (rundir.read_records(["id", "status", "image", "image_uri", "image_sha256", *CHANGE_FIELDS])
               if has_state else RESULT_SCHEMA.empty_table())
    check_unchanged(manifest.table, records, cfg)
    return make_plan(manifest.table, records, world_size=world, retry_failed=bool(cfg.retry_failed),
                     batch_size=int(cfg.runtime.batch_size))


def plan_or_report(cfg: DictConfig, manifest: Manifest, rundir: RunDir, world: int, rank: int) -> Plan | None:
    """plan_run, with an unusable folder reported once (by rank 0) instead of raised."""
    try:
        return plan_run(cfg, manifest, rundir, world)
    except RunDirError as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return None


def check_unchanged(manifest, records, cfg: DictConfig) -> None:
    """A manifest edited since rows finished would leave videos that no longer match their rows: other values, or
    another image (another location or reference whose bytes differ from the recorded hash)."""
    from .images import changed_images

    n, examples = changed_rows(manifest, records)
    n_img, img_examples = changed_images(manifest, records, timeout=float(cfg.images.timeout),
                                         max_bytes=int(cfg.images.max_bytes))
    n, examples = n + n_img, examples + img_examples
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
    if plan.todo.num_rows:
        costs = plan.unit_costs()
        one = 14 * 576 * 1024 * (25 * 2 + 1)  # an SVD row at the guide's defaults
        lines.append(f"work: {plan.num_units} unit(s) handed out largest first as ranks ask for work; estimated "
                     f"cost {costs.sum() / one:.4g} SVD-row equivalents (largest unit {costs.max() / one:.3g})")
    t = manifest.table
    if t.num_rows:
        ranges = []
        for f in CONDITIONING_FIELDS:
            mm = pc.min_max(t[f])
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            ranges.append(f"{f} {lo}" if lo == hi else f"{f} {lo}..{hi}")
        lines.append("values: " + ", ".join(ranges))
    return "\n".join(lines)


def manifest_digest(manifest: Manifest) -> str:
    """What a rank read as the manifest, in 16 hex digits: ranks that read different rows must not share work."""
    h = hashlib.sha256(str(manifest.table.num_rows).encode())
    for col in ("id", "image_uri"):
        h.update("\n".join(manifest.table[col].to_pylist()).encode())
    for f in GENERATION_FIELDS:
        h.update(pc.fill_null(manifest.table[f], 0).to_numpy().tobytes())
    return h.hexdigest()[:16]


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

    import torch

    from .generate import SettingRefused, check_attention, check_compile_with_memory

    try:  # settings that cannot work are refused before anything is written
        check_compile_with_memory(compile_options(cfg), plain(cfg.memory))
        check_attention(str(cfg.runtime.get("attention") or "auto"), device_type(cfg))
    except SettingRefused as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    if str(cfg.runtime.device) == "cuda" and not torch.cuda.is_available():
        if rank == 0:
            log("svd-batch: runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
        return EXIT_USAGE
    from .executor import Executor

    ex = Executor.start(float(cfg.runtime.dist_timeout_minutes))
    try:
        return _run_rank(cfg, manifest, rundir, ex)
    finally:
        ex.close()


def _device(cfg: DictConfig, local_rank: int):
    import torch

    if device_type(cfg) == "cpu":
        # Plain "cpu", never "cpu:0": diffusers takes other code paths for the latter, whose floats differ.
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _agree(cfg: DictConfig, manifest: Manifest, rundir: RunDir, ex, device) -> tuple[Plan, str, str] | None:
    """The one agreement of a run: rank 0 prepares the folder and the plan; every rank checks that it sees the
    same model, manifest and device type and holds the folder's lock; all go, or none does (exit 2)."""
    from .generate import ModelUnavailable, model_identity

    proposal: dict[str, Any]
    local = None
    if ex.rank == 0:
        try:
            local = model_path(cfg)
            identity = model_identity(local)
            prepare_rundir(cfg, rundir, identity, device.type)
            plan = plan_run(cfg, manifest, rundir, ex.world)
            if use_lock(cfg):
                rundir.acquire_lock(shared=True)  # from now on every rank holds it shared while it works
            proposal = {"error": None, "identity": identity, "session": new_session(), "plan": plan.spec(),
                        "manifest": manifest_digest(manifest), "device_type": device.type}
        except (ModelUnavailable, RunDirError) as exc:
            proposal = {"error": f"svd-batch: {exc}"}
        except OSError as exc:
            proposal = {"error": f"svd-batch: cannot use output.dir={rundir.root}: {exc}. Choose a writable folder."}
    else:
        proposal = None
    proposal = ex.broadcast(proposal)
    if proposal["error"] is not None:
        if ex.rank == 0:
            log(proposal["error"])
        return None

    # Every rank: the same model (node-local caches can hold another revision), manifest and device type.
    problem = None
    where = f"rank {ex.rank} on host {socket.gethostname()}"
    try:
        if ex.rank != 0:
            local = model_path(cfg)
            identity = model_identity(local)
            if identity != proposal["identity"]:
                problem = (f"{where} sees model files {identity} at {local}, rank 0 sees {proposal['identity']}: "
                           "another revision in this node's cache. Share one HF_HOME, or point model.path at one "
                           "folder every node sees.")
            elif manifest_digest(manifest) != proposal["manifest"]:
                problem = (f"{where} read other manifest rows than rank 0 (a manifest changed while the run started, "
                           "or files not visible on every node yet). Make the manifest visible to every node "
                           "and start again.")
            elif device.type != proposal["device_type"]:
                problem = (f"{where} runs on {device.type}, rank 0 on {proposal['device_type']}: frames differ "
                           "between the two. Make every node see its GPUs, or set runtime.device.")
            elif use_lock(cfg):
                rundir.acquire_lock(shared=True)
    except (ModelUnavailable, RunDirError, OSError) as exc:
        problem = f"{where}: {exc}"
    problems = [p for p in ex.gather(problem) if p]
    if problems:
        if ex.rank == 0:
            log("svd-batch: the ranks do not agree, so nothing was run:\n" + "\n".join(f"  {p}" for p in problems))
        return None
    return proposal["plan"].build(manifest.table), proposal["session"], local


def _run_rank(cfg: DictConfig, manifest: Manifest, rundir: RunDir, ex) -> int:
    import torch

    from .generate import DeviceFailure, Generator, ModelUnavailable
    from .outage import EXIT_SOURCE, SourceOutage
    from .worker import RankWorker
    from .write import OutputFolderError

    device = _device(cfg, ex.local_rank)
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    stop = StopFlag()
    stop.install()
    rank, world = ex.rank, ex.world

    # 1. One agreement, then no collective.
    agreed = _agree(cfg, manifest, rundir, ex, device)
    if agreed is None:
        return EXIT_USAGE
    plan, session, local = agreed
    ex.begin(session)
    if rank == 0:
        log(describe_plan(plan, manifest, cfg.manifest.get("name")))
    started = time.perf_counter()

    # 2. Claim units until none is left; the model loads only once this rank has work.
    next_unit = _unit_source(cfg, plan, ex, stop, lambda msg: log(msg, rank))
    first = next_unit()
    status, stats, parts = "finished", None, {}
    try:
        if first is not None:
            t = time.perf_counter()
            try:
                gen = Generator.load(local, device=device, dtype_name=str(cfg.model.dtype),
                                     variant=cfg.model.variant, memory=plain(cfg.memory),
                                     compile=compile_options(cfg), runtime=plain(cfg.runtime))
            except ModelUnavailable as exc:
                log(f"svd-batch: {exc}", rank)
                ex.abort()
                return EXIT_USAGE
            pending = [first]
            # With claims nobody knows a rank's share in advance: a bar per rank counts rows and rate.
            bar = _progress(cfg, plan.todo.num_rows if world == 1 else None, rank, world)
            worker = RankWorker(gen, rundir, WorkerSettings.from_config(cfg), rank=rank, world=world, stop=stop,
                                progress=bar, log=lambda msg: log(msg, rank),
                                thumb_max_row=_thumb_max_row(cfg, manifest), session=session)
            worker.stats.model_load_seconds = time.perf_counter() - t
            try:
                stats = worker.run(plan, lambda: pending.pop() if pending else next_unit())
            finally:
                parts = dict(worker.parts.written)
                bar.close()
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
    except DeviceFailure as exc:
        status = "device_failure"
        log(f"svd-batch: rank {rank} stopped: {exc}", rank)
    except OutputFolderError as exc:
        ex.abort()
        log(f"svd-batch: {exc}", rank)
        return EXIT_OUTPUT
    except SourceOutage as exc:
        ex.abort()
        log(f"svd-batch: {exc}", rank)
        return EXIT_SOURCE

    if stop.signum is not None or ex.aborted():
        _write_marker(rundir, session, rank, "stopped", parts)
        if stop.signum is None:
            log("svd-batch: stopped: another rank stopped the run (its message says why: the output folder or the "
                "model could not be used); every finished row is recorded.", rank)
            return EXIT_OUTPUT
        name = signal.Signals(stop.signum).name
        log(f"svd-batch: stopped by {name}; every finished row is recorded in {rundir.root}. Run the same "
            "command again to resume: finished rows are skipped.", rank)
        return 128 + stop.signum

    # 3. Record this rank's completion; the last rank to finish merges and reports.
    _write_marker(rundir, session, rank, status, parts)
    ending = ex.finish()
    if not ending.merge:
        if ending.others_running < 0:
            log(f"svd-batch: rank {rank} done, but the run's coordinator (the first node's launcher) is gone; "
                f"results.parquet is written by the next run on {rundir.root} or by svd-batch-report.", rank)
        elif world > 1:
            log(f"svd-batch: rank {rank} done ({stats.rows if stats else 0} rows); the last rank to finish writes "
                "results.parquet and the summary.", rank)
        return EXIT_OK
    peers = _local_ranks(rundir, session, rank)  # read before the merge removes the markers
    code = _merge_and_report(cfg, manifest, rundir, plan, started, stats, ending.lost_ranks)
    if code != EXIT_OK:
        # torchrun stops every worker of a node as soon as one exits non-zero: let this node's other ranks, done
        # but maybe still exiting, leave first, so that none is ever signalled because of this exit code.
        _wait_until_gone(peers)
    return code


def _local_ranks(rundir: RunDir, session: str, rank: int) -> list[int]:
    """Pids of this run's other ranks on this host, from their completion markers."""
    host, pids = socket.gethostname(), []
    for path in rundir.markers():
        if os.path.basename(path).startswith(session):
            info = rundir.read_marker(path)
            if info.get("host") == host and info.get("rank") != rank and info.get("pid"):
                pids.append(int(info["pid"]))
    return pids


def _wait_until_gone(pids: list[int], timeout: float = 30.0) -> None:
    def running(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited already
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if running(p)]
        if pids:
            time.sleep(0.05)


def _write_marker(rundir: RunDir, session: str, rank: int, status: str, parts: dict[str, int]) -> None:
    """Seal this rank's parts. Without a marker (a full disk) they stay unsealed: merged, never deleted."""
    try:
        rundir.write_marker(session, rank, {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                                            "status": status, "parts": parts, "finished_at": time.time()})
    except OSError:
        pass


def _unit_source(cfg: DictConfig, plan: Plan, ex, stop: "StopFlag", say: Callable[[str], None]):
    """The next unit number for this rank, or None when it should take no more work."""
    from .executor import StoreGone

    def stopped() -> bool:
        return stop.signum is not None or ex.aborted()

    if str(cfg.runtime.get("schedule", "claim")) == "static":
        mine = iter(plan.static_units(ex.rank).tolist())
        return lambda: None if stopped() else next(mine, None)
    claims = ex.claims(plan.num_units, stopped)

    def next_unit() -> int | None:
        try:
            return next(claims, None)
        except StoreGone as exc:
            say(f"svd-batch: rank {ex.rank} cannot reach the run's coordinator any more ({exc}); it stops taking "
                "rows. Every finished row is recorded; the next run does the rest.")
            return None

    return next_unit


def _merge_and_report(cfg: DictConfig, manifest: Manifest, rundir: RunDir, plan: Plan, started: float, stats,
                      lost: list[int]) -> int:
    from .report import summary, write_results

    records = rundir.merge()
    results = write_results(rundir, records, manifest.table, manifest.extra_columns)
    if cfg.report.enabled:
        _write_report(rundir.root, cfg)
    rundir.release_lock()
    ran = results.filter(pc.and_(pc.is_in(results["id"], value_set=plan.todo["id"]),
                                 pc.equal(results["status"], "ok")))["total_seconds"].to_pylist()
    failed = results.filter(pc.equal(results["status"], "failed")).num_rows
    not_done = plan.total - results.num_rows
    text = summary(results, total=plan.total, ran=ran, wall_seconds=time.perf_counter() - started,
                   output_dir=rundir.root, stats=stats)
    if lost:
        text += (f"\n  rank(s) {', '.join(map(str, lost))} stopped without finishing (killed, or their node was lost); "
                 "the rows they had in hand are not done.")
    if not_done:
        text += f"\n  {not_done} row(s) not done: run the same command again to finish them (exit code 3)."
    log(text)
    if not_done:
        return EXIT_INCOMPLETE
    return EXIT_ROWS_FAILED if failed else EXIT_OK


def _progress(cfg: DictConfig, total: int, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}" if world > 1 else "videos", unit="video",
                position=rank if world > 1 else None, leave=True, mininterval=1.0, dynamic_ncols=True,
                disable=not cfg.runtime.progress, file=sys.stderr)


def complete_folder(root: str, say: Callable[[str], None] = log) -> bool:
    """Merge what a run left unmerged (its last rank was lost, or the coordinator went away) and write
    results.parquet, as its own last rank would have. Needs the folder's exclusive lock, so it never touches a
    folder that a run is using; returns whether results.parquet is now up to date."""
    rundir = RunDir(root)
    if not rundir.part_files() and os.path.exists(rundir.results_path):
        return True
    cfg = saved_config(root)
    if cfg is None:
        return False
    try:
        rundir.acquire_lock()
    except RunDirError as exc:
        say(f"svd-batch: {exc}")
        return False
    try:
        from .report import write_results

        manifest = read_manifest(cfg)
        records = rundir.merge(all_parts=True)  # exclusive lock: no writer is alive
        write_results(rundir, records, manifest.table, manifest.extra_columns)
        return True
    except (ManifestError, RunDirError) as exc:
        say(f"svd-batch: could not merge the records in {root}: {exc}")
        return False
    finally:
        rundir.release_lock()
