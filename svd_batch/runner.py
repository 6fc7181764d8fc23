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
from .executor import (EXIT_INCOMPLETE, EXIT_OK, EXIT_OUTPUT, EXIT_ROWS_FAILED, EXIT_USAGE, Executor, LaunchError,
                       Start, StopFlag, Timing, start_launch, static_deal)
from .ledger import JobDir, JobInfo
from .plan import Plan, PlanSpec, changed_rows, make_plan
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
        max_row_bytes=cfg.runtime.get("max_row_bytes"),
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
    fp["runtime.compile_vae"] = bool(cfg.runtime.get("compile_vae", False)) and bool(cfg.runtime.compile)
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


def propose(cfg: DictConfig, manifest: Manifest, rundir: RunDir, device_type_: str, world: int, alone: bool) -> Start:
    """Rank 0, under the folder's planning lock: join the job in progress, or (no other launch alive, or none
    active) check the folder may take this start and plan a new job from one snapshot of the records."""
    from .generate import model_identity

    identity = model_identity(model_path(cfg))  # resolved (downloaded) before the folder was touched
    facts = {"identity": identity, "manifest": manifest_digest(manifest), "device_type": device_type_}
    if alone:
        # No member of any launch is alive: every part can be merged and deleted, and half-written files swept.
        rundir.remove_temporaries()
        if rundir.part_files():
            rundir.merge(all_parts=True)
        rundir.forget_finished_work()
    fp = fingerprint(cfg, identity, device_type_)
    if cfg.overwrite:
        if not alone:
            raise RunDirError(f"Another svd-batch run is using {rundir.root}, and overwrite=true would delete the "
                              "videos it is making. Wait for it to finish (or stop it), or use another output.dir.")
        rundir.clear()
    elif rundir.has_previous_work():
        if not cfg.resume:
            raise RunDirError(
                f"{rundir.root} already holds results of an earlier run and resume=false was given. Rerun "
                "without resume=false to continue it, with overwrite=true to delete it and start again, or "
                "choose another output.dir."
            )
        before = rundir.read_fingerprint()
        diff = fingerprint_diff(before, fp) if before is not None else []
        if diff:
            raise RunDirError(
                f"{rundir.root} holds videos made with a different configuration, and resuming would mix "
                "them with videos made now. Differing keys (earlier -> now): " + "; ".join(diff) + ". "
                "Run with the earlier values to resume, use another output.dir for the new settings, or "
                "add overwrite=true to delete the earlier results and redo everything."
            )
    current = JobInfo.read(rundir.job_json)
    if (not alone and current is not None and current.state == "active"
            and not JobDir(rundir.state, current.job).aborted()):  # an aborted job's members are leaving
        if current.manifest != facts["manifest"]:
            raise RunDirError(
                f"Another launch is working on {rundir.root} with other manifest rows (a different manifest, "
                "selection or defaults). Launches that share a folder must run the same rows: start this one "
                "with the same manifest settings, or give it its own output.dir."
            )
        indices, starts = JobDir(rundir.state, current.job).read_plan()
        spec = PlanSpec(total=current.total, done=current.done, failed_skipped=current.failed_skipped,
                        indices=indices, starts=starts, world_size=world)
        return Start(job=current, joined=True, facts={**facts, "plan": spec})
    plan = plan_run(cfg, manifest, rundir, world)
    job = JobInfo(job=new_session(), state="active", total=plan.total, done=plan.done,
                  failed_skipped=plan.failed_skipped, todo=plan.todo.num_rows, units=plan.num_units,
                  manifest=facts["manifest"], started_at=time.time(), retry_failed=bool(cfg.retry_failed))
    JobDir(rundir.state, job.job).create(plan.indices, plan.starts)
    job.write(rundir.job_json)
    rundir.write_fingerprint(fp)
    write_text_atomic(OmegaConf.to_yaml(cfg, resolve=True), rundir.config_path)
    return Start(job=job, joined=False, facts={**facts, "plan": plan.spec()})


def model_problem(cfg: DictConfig) -> str | None:
    """Why the model cannot be used (missing, not downloadable here), or None; rank 0 downloads it here."""
    from .generate import ModelUnavailable, model_identity

    try:
        model_identity(model_path(cfg))
        return None
    except ModelUnavailable as exc:
        return f"svd-batch: {exc}"


def check_facts(cfg: DictConfig, manifest: Manifest, device_type_: str, start: Start) -> str | None:
    """Every rank but 0: the same model (node-local caches can hold another revision), manifest and device."""
    from .generate import ModelUnavailable, model_identity

    where = f"rank {int(os.environ.get('RANK', 0))} on host {socket.gethostname()}"
    facts = start.facts
    try:
        local = model_path(cfg)
        identity = model_identity(local)
    except ModelUnavailable as exc:
        return f"{where}: {exc}"
    if identity != facts["identity"]:
        return (f"{where} sees model files {identity} at {local}, rank 0 sees {facts['identity']}: another revision "
                "in this node's cache. Share one HF_HOME, or point model.path at one folder every node sees.")
    if manifest_digest(manifest) != facts["manifest"]:
        return (f"{where} read other manifest rows than rank 0 (a manifest changed while the run started, or files "
                "not visible on every node yet). Make the manifest visible to every node and start again.")
    if device_type_ != facts["device_type"]:
        return (f"{where} runs on {device_type_}, rank 0 on {facts['device_type']}: frames differ between the two. "
                "Make every node see its GPUs, or set runtime.device.")
    return None


def timing(cfg: DictConfig) -> Timing:
    r = cfg.runtime
    return Timing(lease=float(r.get("lease_seconds", 180)), heartbeat=float(r.get("heartbeat_seconds", 2)),
                  poll=min(1.0, float(r.get("heartbeat_seconds", 2))))


def run(cfg: DictConfig) -> int:
    """The orchestration of one rank, as numbered steps; the protocol between ranks is the executor's."""
    rank, world = env_rank_world()
    # 1. Check the settings and read the manifest (every rank: each checks it sees the same rows).
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
    rundir = RunDir(str(cfg.output.dir), locks=use_lock(cfg))

    if cfg.dry_run:
        plan = plan_or_report(cfg, manifest, rundir, world, rank)
        if plan is None:
            return EXIT_USAGE
        if rank == 0:
            print(describe_plan(plan, manifest, cfg.manifest.get("name")))
            print(f"output: {rundir.root} (dry run: no model loaded, nothing written)")
        return EXIT_OK

    import torch

    from .generate import SettingRefused, check_attention, check_compile_vae, check_compile_with_memory

    try:  # settings that cannot work are refused before anything is written
        check_compile_with_memory(compile_options(cfg), plain(cfg.memory))
        check_compile_vae(compile_options(cfg), plain(cfg.runtime))
        check_attention(str(cfg.runtime.get("attention") or "auto"), device_type(cfg))
    except SettingRefused as exc:
        if rank == 0:
            log(f"svd-batch: {exc}")
        return EXIT_USAGE
    if str(cfg.runtime.device) == "cuda" and not torch.cuda.is_available():
        if rank == 0:
            log("svd-batch: runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
        return EXIT_USAGE
    stop = StopFlag(float(cfg.runtime.get("grace_seconds", 25)))
    stop.install()
    try:
        launch = start_launch(float(cfg.runtime.dist_timeout_minutes))
    except LaunchError as exc:
        log(f"svd-batch: rank {rank}: {exc}")
        return EXIT_USAGE
    ex = Executor(launch, rundir, timing(cfg), log=lambda msg: log(msg, rank))
    ex.stopped = stop
    code = None
    try:
        code = _run_member(cfg, manifest, rundir, ex, stop)
        return code
    finally:
        ex.close(code)


def _device(cfg: DictConfig, local_rank: int):
    import torch

    if device_type(cfg) == "cpu":
        # Plain "cpu", never "cpu:0": diffusers takes other code paths for the latter, whose floats differ.
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def _run_member(cfg: DictConfig, manifest: Manifest, rundir: RunDir, ex: Executor, stop: StopFlag) -> int:
    import torch

    from .generate import DeviceFailure, Generator, ModelUnavailable
    from .outage import EXIT_SOURCE, SourceOutage
    from .worker import RankWorker
    from .write import OutputFolderError

    device = _device(cfg, ex.local_rank)
    if cfg.runtime.threads:
        torch.set_num_threads(int(cfg.runtime.threads))
    rank, world = ex.rank, ex.world
    say = lambda msg: log(msg, rank)  # noqa: E731

    # 2. Agree on the job: join the one in progress in this folder, or plan a new one.
    start = ex.agree(lambda alone: propose(cfg, manifest, rundir, device.type, world, alone),
                     lambda proposal: check_facts(cfg, manifest, device.type, proposal),
                     before=lambda: model_problem(cfg))
    if start is None:
        return EXIT_USAGE
    plan = start.facts["plan"].build(manifest.table)
    static = (static_deal(plan.unit_costs(), world, rank) if str(cfg.runtime.get("schedule", "claim")) == "static"
              and not start.joined else None)
    ex.begin(start, plan.num_units, static)
    if rank == 0:
        if start.joined:
            say(f"svd-batch: joined job {start.job.job} in progress in {rundir.root}: {plan.todo.num_rows} rows "
                f"in {plan.num_units} units, shared with the launches already working there")
        log(describe_plan(plan, manifest, cfg.manifest.get("name")))
    started = time.perf_counter()

    # 3. Claim units until none is left; the model loads only once this member has work.
    first = ex.next_unit(wait=True)
    state, stats, parts = "done", None, {}
    worker = None
    try:
        if first is not None:
            t = time.perf_counter()
            try:
                gen = Generator.load(model_path(cfg), device=device,
                                     dtype_name=str(cfg.model.dtype), variant=cfg.model.variant,
                                     memory=plain(cfg.memory), compile=compile_options(cfg), runtime=plain(cfg.runtime))
            except ModelUnavailable as exc:
                say(f"svd-batch: {exc}")
                ex.leave("aborted", {})
                ex.abort(str(exc))
                return EXIT_USAGE
            # With claims nobody knows a rank's share in advance: a bar per rank counts rows and rate.
            bar = _progress(cfg, plan.todo.num_rows if world == 1 and not start.joined else None, rank, world)
            worker = RankWorker(gen, rundir, WorkerSettings.from_config(cfg), rank=rank, world=world, stop=stop,
                                progress=bar, log=say, thumb_max_row=_thumb_max_row(cfg, manifest),
                                member=ex.name)
            worker.stats.model_load_seconds = time.perf_counter() - t
            units = _FirstThen(first, ex)
            try:
                stats = worker.run(plan, units)
            finally:
                parts = dict(worker.parts.written)
                bar.close()
    except KeyboardInterrupt:
        stop.signum = stop.signum or signal.SIGINT
    except DeviceFailure as exc:
        state = "device_failure"
        say(f"svd-batch: rank {rank} stopped: {exc}")
    except OutputFolderError as exc:
        ex.abort(f"output: {exc}")
        ex.leave("aborted", parts, _stats_dict(worker))
        say(f"svd-batch: {exc}")
        return ex.exit_code(EXIT_OUTPUT)
    except SourceOutage as exc:
        ex.abort(f"source: {exc}")
        ex.leave("aborted", parts, _stats_dict(worker))
        say(f"svd-batch: {exc}")
        return ex.exit_code(EXIT_SOURCE)

    # 4. Leave: a final state (units still held are given back), then the end of the job.
    if stop.signum is not None:
        ex.leave("stopped", parts, _stats_dict(worker))
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
        return 128 + stop.signum
    if ex.aborted():
        ex.leave("aborted", parts, _stats_dict(worker))
        source = ex.abort_reason().startswith("source:")
        say("svd-batch: stopped: another process stopped the run (its message says why: "
            + ("a source of images is down" if source else "the output folder could not take more files")
            + "); every finished row is recorded.")
        return ex.exit_code(EXIT_SOURCE if source else EXIT_OUTPUT)
    if state == "device_failure":
        ex.leave(state, parts, _stats_dict(worker), early=True)
        if ex.others_alive():
            # The others take this member's units over; this launch's other local ranks must not be cut short.
            return ex.exit_code(EXIT_INCOMPLETE, others_carry_on=True)
        ex.member.update(exit_code=None)  # nobody else is left: this member reports after all
    else:
        ex.leave(state, parts, _stats_dict(worker))
    lost = ex.wait_for_others()
    merged, results = ex.merge(lambda: _merge_and_report(cfg, manifest, rundir))
    if not ex.is_reporter():
        if world > 1:
            say(f"svd-batch: rank {rank} done ({stats.rows if stats else 0} rows)")
        return EXIT_OK
    if results is None:
        results = _read_results(rundir)
    code = _summarize(cfg, rundir, plan, start, results, started, stats, lost)
    return ex.exit_code(code)


def say_after_exit(pid: int, text: str) -> None:
    """Print ``text`` on this process's stderr once process ``pid`` (the launcher) has exited, from a small
    detached process, so that it is the last line of the job's output."""
    import subprocess

    code = ("import os, select, sys, time\n"
            "pid = int(sys.argv[1])\n"
            "try:\n"
            "    fd = os.pidfd_open(pid); select.select([fd], [], [], 3600)\n"
            "except (AttributeError, OSError):\n"
            "    while os.path.exists(f'/proc/{pid}'): time.sleep(0.05)\n"
            "sys.stderr.write(sys.argv[2] + '\\n')\n")
    try:
        subprocess.Popen([sys.executable, "-c", code, str(pid), text], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, start_new_session=True)
    except OSError:
        log(text)


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


def _stats_dict(worker) -> dict[str, Any]:
    if worker is None:
        return {}
    s = worker.stats
    return {"rows": s.rows, "ok": s.ok, "failed": s.failed, "model_load_seconds": s.model_load_seconds,
            "warmup_seconds": s.warmup_seconds, "pipeline_seconds": s.pipeline_seconds, "wall_seconds": s.wall_seconds}


def _merge_and_report(cfg: DictConfig, manifest: Manifest, rundir: RunDir):
    from .report import write_results

    records = None
    for _ in range(5):  # another merge replaced the records meanwhile (its lock was lost): merge again on top
        records = rundir.merge()
        if records is not None:
            break
    if records is None:
        return None
    results = write_results(rundir, records, manifest.table, manifest.extra_columns)
    if cfg.report.enabled:
        _write_report(rundir.root, cfg)
    return results


def _read_results(rundir: RunDir):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(rundir.results_path)
    except (OSError, Exception):  # noqa: BLE001 - no results yet (another process's merge is pending)
        return RESULT_SCHEMA.empty_table()


def _summarize(cfg: DictConfig, rundir: RunDir, plan: Plan, start: Start, results, started: float, stats,
               lost: list[str]) -> int:
    from .report import summary

    job_ids = plan.todo["id"]
    ran = results.filter(pc.and_(pc.is_in(results["id"], value_set=job_ids),
                                 pc.equal(results["status"], "ok")))["total_seconds"].to_pylist()
    failed = results.filter(pc.equal(results["status"], "failed")).num_rows
    not_done = plan.total - results.num_rows
    text = summary(results, total=plan.total, ran=ran, wall_seconds=time.perf_counter() - started,
                   output_dir=rundir.root, stats=stats)
    if lost:
        text += (f"\n  {len(lost)} process(es) stopped answering during the run ({', '.join(lost)}); their units "
                 "were taken over by the others.")
    if not_done:
        text += f"\n  {not_done} row(s) not done: run the same command again to finish them (exit code 3)."
    else:
        job = JobInfo.read(rundir.job_json)
        if job is not None and job.job == start.job.job and job.state != "complete":
            job.state = "complete"
            try:
                job.write(rundir.job_json)
            except OSError:
                pass
    log(text)
    if not_done:
        return EXIT_INCOMPLETE
    return EXIT_ROWS_FAILED if failed else EXIT_OK


def _progress(cfg: DictConfig, total: int | None, rank: int, world: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"rank {rank}" if world > 1 else "videos", unit="video",
                position=rank if world > 1 else None, leave=True, mininterval=1.0, dynamic_ncols=True,
                disable=not cfg.runtime.progress, file=sys.stderr)


def complete_folder(root: str, say: Callable[[str], None] = log) -> bool:
    """Merge what a run left unmerged (its last process was lost or stopped) and write results.parquet, as its
    own last process would have. Needs the folder to itself (no member of any launch alive), so it never
    touches a folder that a run is using; returns whether results.parquet is now up to date."""
    rundir = RunDir(root)
    if not rundir.part_files() and os.path.exists(rundir.results_path):
        return True
    cfg = saved_config(root)
    if cfg is None:
        return False
    try:
        rundir.plan_lock.require(wait=60, describe=True)
        rundir.active_lock.require()
    except RunDirError as exc:
        say(f"svd-batch: {exc}")
        rundir.release_locks()
        return False
    try:
        from .report import write_results

        manifest = read_manifest(cfg)
        records = rundir.merge(all_parts=True)  # alone: no writer is alive
        write_results(rundir, records, manifest.table, manifest.extra_columns)
        return True
    except (ManifestError, RunDirError) as exc:
        say(f"svd-batch: could not merge the records in {root}: {exc}")
        return False
    finally:
        rundir.release_locks()
