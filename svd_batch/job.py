"""Step 2: the job a launch works on. Under the run folder's planning lock, rank 0 either joins the job in
progress there or plans a new one from one snapshot of the records (the rows still to do, in claim order);
every other rank checks that it sees the same model files, manifest rows and device type (executor.agree
carries the messages)."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import pyarrow.compute as pc

from .executor import Start
from .fields import CHANGE_FIELDS, CONDITIONING_FIELDS, GENERATION_FIELDS, RESULT_SCHEMA
from .images import changed_images
from .ledger import JobDir, JobInfo
from .manifest import Manifest
from .identity import changed_weights, facts_digest, model_facts
from .model import ModelUnavailable, check_unet_weights, model_path, unet_weights_path
from .plan import Plan, PlanSpec, changed_rows, make_plan
from .rundir import RunDir, RunDirError, new_session, write_text_atomic
from .fingerprint import fingerprint, fingerprint_diff, joining_diff
from .settings import RunSettings


def plan_run(s: RunSettings, manifest: Manifest, rundir: RunDir, world: int) -> Plan:
    """What is left to do in ``rundir``, in claim order; raises RunDirError for an unusable folder."""
    has_state = os.path.isdir(rundir.state)
    records = (rundir.read_records(["id", "status", "image", "image_uri", "image_sha256", *CHANGE_FIELDS])
               if has_state else RESULT_SCHEMA.empty_table())
    check_unchanged(manifest.table, records, s)
    return make_plan(manifest.table, records, world_size=world, retry_failed=s.retry_failed,
                     batch_size=s.runtime.batch_size)


def check_unchanged(manifest, records, s: RunSettings) -> None:
    """A manifest edited since rows finished would leave videos that no longer match their rows: other values, or
    another image (another location or reference whose bytes differ from the recorded hash)."""
    n, examples = changed_rows(manifest, records)
    n_img, img_examples = changed_images(manifest, records, timeout=s.images.timeout, max_bytes=s.images.max_bytes)
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


def model_problem(s: RunSettings) -> str | None:
    """Why the model cannot be used (missing, not downloadable here, a model.unet_weights file that does not fit
    its UNet), or None; rank 0 downloads it and hashes its weights here (once per file and machine: the hash
    cache), before the run folder is touched."""
    try:
        local, weights = model_path(s.model), unet_weights_path(s.model)
        check_unet_weights(local, weights, s.model.unet_weights)
        model_facts(local, weights)
        return None
    except ModelUnavailable as exc:
        return f"svd-batch: {exc}"


def local_model_facts(s: RunSettings) -> tuple[str, dict[str, str]]:
    """(the checkpoint folder, what the model is: identity.model_facts) as this process sees it."""
    local = model_path(s.model)
    return local, model_facts(local, unet_weights_path(s.model))


def propose(s: RunSettings, manifest: Manifest, rundir: RunDir, device_type: str, world: int, alone: bool) -> Start:
    """Rank 0, under the folder's planning lock: join the job in progress, or (no other launch alive, or none
    active) check the folder may take this start and plan a new job from one snapshot of the records."""
    _, model = local_model_facts(s)  # resolved (downloaded, hashed) before the folder was touched
    facts = {"identity": facts_digest(model), "manifest": manifest_digest(manifest), "device_type": device_type}
    if alone:
        # No member of any launch is alive: every part can be merged and deleted, and half-written files swept.
        rundir.remove_temporaries()
        if rundir.part_files():
            rundir.merge(all_parts=True)
        rundir.forget_finished_work()
    fp = fingerprint(s, model, device_type)
    if s.overwrite:
        if not alone:
            raise RunDirError(f"Another svd-batch run is using {rundir.root}, and overwrite=true would delete the "
                              "videos it is making. Wait for it to finish (or stop it), or use another output.dir.")
        rundir.clear()
    elif rundir.has_previous_work():
        if not s.resume:
            raise RunDirError(
                f"{rundir.root} already holds results of an earlier run and resume=false was given. Rerun "
                "without resume=false to continue it, with overwrite=true to delete it and start again, or "
                "choose another output.dir."
            )
        before = rundir.read_fingerprint()
        diff = fingerprint_diff(before, fp) if before is not None else []
        changed = changed_weights(before, fp) if before is not None else []
        if changed:
            raise RunDirError(
                f"The weights of model {s.model.name} ({s.model.path}"
                + (f", model.unet_weights={s.model.unet_weights}" if s.model.unet_weights else "")
                + f") changed since the videos in {rundir.root} were made: other bytes in " + ", ".join(changed)
                + " (replaced in place, or another revision), and resuming would mix two models' videos in one "
                "folder. Differing keys (earlier -> now): " + "; ".join(diff) + ". Put the earlier weights back to "
                "resume, use another output.dir for this model, or add overwrite=true to delete the earlier "
                "results and redo everything."
            )
        if diff:
            raise RunDirError(
                f"{rundir.root} holds videos made with a different configuration, and resuming would mix "
                "them with videos made now. Differing keys (earlier -> now): " + "; ".join(diff) + ". "
                "Run with the earlier values to resume, use another output.dir for the new settings, or "
                "add overwrite=true to delete the earlier results and redo everything."
            )
    current = JobInfo.read(rundir.store)
    if (not alone and current is not None and current.state == "active"
            and not JobDir(rundir.store, current.job).aborted()):  # an aborted job's members are leaving
        # Checked whether or not a row is recorded yet: launches starting together (an array's tasks) join
        # before the first one's first row, and would otherwise make their share of videos their own way.
        job_fp = rundir.read_fingerprint()
        diff = joining_diff(job_fp, fp) if job_fp is not None else []
        if diff:
            raise RunDirError(
                f"Another launch is working on {rundir.root} with other settings, and this launch would make its "
                "share of the videos differently. Differing keys: " + "; ".join(diff) + ". Start this launch "
                "with the job's values (.svd-batch/run.json holds them), or give it its own output.dir."
            )
        if current.manifest != facts["manifest"]:
            raise RunDirError(
                f"Another launch is working on {rundir.root} with other manifest rows (a different manifest, "
                "selection or defaults). Launches that share a folder must run the same rows: start this one "
                "with the same manifest settings, or give it its own output.dir."
            )
        indices, starts = JobDir(rundir.store, current.job).read_plan()
        spec = PlanSpec(total=current.total, done=current.done, failed_skipped=current.failed_skipped,
                        indices=indices, starts=starts, world_size=world)
        return Start(job=current, joined=True, facts={**facts, "plan": spec})
    plan = plan_run(s, manifest, rundir, world)
    job = JobInfo(job=new_session(), state="active", total=plan.total, done=plan.done,
                  failed_skipped=plan.failed_skipped, todo=plan.todo.num_rows, units=plan.num_units,
                  manifest=facts["manifest"], started_at=time.time(), retry_failed=s.retry_failed)
    JobDir(rundir.store, job.job).create(plan.indices, plan.starts)
    job.write(rundir.store)
    rundir.write_fingerprint(fp)
    write_text_atomic(s.to_yaml(), rundir.config_path)
    return Start(job=job, joined=False, facts={**facts, "plan": plan.spec()})


def check_facts(s: RunSettings, manifest: Manifest, device_type: str, start: Start) -> str | None:
    """Every rank but 0: the same model (node-local caches can hold another revision), manifest and device."""
    where = f"rank {int(os.environ.get('RANK', 0))} on host {socket.gethostname()}"
    facts = start.facts
    try:
        local, model = local_model_facts(s)
    except ModelUnavailable as exc:
        return f"{where}: {exc}"
    identity = facts_digest(model)
    if identity != facts["identity"]:
        extra = f" and model.unet_weights={s.model.unet_weights}" if s.model.unet_weights else ""
        return (f"{where} sees model files {identity} at {local}{extra}, rank 0 sees {facts['identity']}: another "
                "revision in this node's cache, or weights with other bytes. Share one HF_HOME, or point model.path "
                "(and model.unet_weights) at files every node sees.")
    if manifest_digest(manifest) != facts["manifest"]:
        return (f"{where} read other manifest rows than rank 0 (a manifest changed while the run started, or files "
                "not visible on every node yet). Make the manifest visible to every node and start again.")
    if device_type != facts["device_type"]:
        return (f"{where} runs on {device_type}, rank 0 on {facts['device_type']}: frames differ between the two. "
                "Make every node see its GPUs, or set runtime.device.")
    return None
