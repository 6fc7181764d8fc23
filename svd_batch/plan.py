"""Step 2: decide which rows still need work and which rank does each of them.

Every rank computes the same plan from the manifest, the records in the run folder and the world size
alone, with no exchange of row lists: the assignment is a pure function of those inputs. Rows are
balanced by estimated cost (frames x steps x pixels), not by count, so mixed 14- and 25-frame rows
finish together; and, unlike accelerate's ``split_between_processes``, nothing is padded or duplicated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fields import SEED_MAX


def with_seed(row: dict, base_seed: int) -> dict:
    """The row with its seed: its own, or one derived from its id (done per row as it runs, so planning a
    million rows creates no Python object per row)."""
    if row.get("seed") is None:
        row["seed"] = derive_seed(base_seed, row["id"])
    return row


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row without a seed gets one from the base seed and its id: never from its shard or batch position,
    so the same row gives the same video whatever the world size or batching."""
    digest = hashlib.sha256(f"{int(base_seed)}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MAX


def row_cost(table: pa.Table) -> np.ndarray:
    """Relative cost of each row: UNet work per step grows with frames x latent pixels, and with guidance
    the UNet runs on a batch of two; the decode adds about one step's worth."""
    frames = table["num_frames"].to_numpy().astype(np.float64)
    steps = table["num_inference_steps"].to_numpy().astype(np.float64)
    pixels = table["height"].to_numpy().astype(np.float64) * table["width"].to_numpy().astype(np.float64)
    guided = np.where(table["max_guidance_scale"].to_numpy() > 1.0, 2.0, 1.0)
    return frames * pixels * (steps * guided + 1.0)


def assign_contiguous(n: int, world_size: int) -> np.ndarray:
    """Equal row counts in manifest order: what a naive split does (kept for benchmarks)."""
    return (np.arange(n) * world_size) // max(n, 1)


def assign_ranks(cost: np.ndarray, world_size: int) -> np.ndarray:
    """Deal rows to ranks in decreasing cost, snaking 0..W-1, W-1..0: balanced to within one row's cost."""
    n = len(cost)
    order = np.lexsort((np.arange(n), -cost))  # by cost descending, ties by manifest position: deterministic
    pos = np.arange(n)
    lap, within = np.divmod(pos, world_size)
    ranks_in_order = np.where(lap % 2 == 0, within, world_size - 1 - within)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = ranks_in_order
    return ranks


@dataclass
class Plan:
    total: int          # rows in the manifest (after selection)
    done: int           # finished ok earlier
    failed_skipped: int  # failed earlier and not retried
    todo: pa.Table      # rows to run now, with a ``rank`` column (missing seeds are derived as rows run)
    world_size: int

    def shard(self, rank: int) -> pa.Table:
        # Within a shard rows keep manifest order; the cost only decided who gets them.
        return self.todo.filter(pc.equal(self.todo["rank"], rank))

    def shard_costs(self) -> np.ndarray:
        if self.todo.num_rows == 0:
            return np.zeros(self.world_size)
        return np.bincount(self.todo["rank"].to_numpy(), weights=row_cost(self.todo), minlength=self.world_size)


def make_plan(
    manifest: pa.Table,
    records: pa.Table,
    *,
    world_size: int,
    retry_failed: bool = False,
    strategy: str = "cost",
) -> Plan:
    """Rows of ``manifest`` without a finished record (ok, or failed unless ``retry_failed``), dealt to ranks."""
    if records.num_rows:
        statuses = ["ok"] if retry_failed else ["ok", "failed"]
        finished_ids = records.filter(pc.is_in(records["status"], value_set=pa.array(statuses)))["id"]
        finished = pc.is_in(manifest["id"], value_set=finished_ids)
        ok_ids = records.filter(pc.equal(records["status"], "ok"))["id"]
        done = pc.sum(pc.is_in(manifest["id"], value_set=ok_ids)).as_py() or 0
        todo = manifest.filter(pc.invert(finished))
    else:
        done = 0
        todo = manifest
    skipped = (manifest.num_rows - todo.num_rows) - done

    if strategy == "contiguous":
        ranks = assign_contiguous(todo.num_rows, world_size)
    elif strategy == "cost":
        ranks = assign_ranks(row_cost(todo), world_size) if todo.num_rows else np.zeros(0, dtype=np.int64)
    else:
        raise ValueError(f"runtime.shard_strategy={strategy!r}: use cost or contiguous")
    todo = todo.append_column("rank", pa.array(ranks, pa.int64()))
    return Plan(total=manifest.num_rows, done=done, failed_skipped=skipped, todo=todo, world_size=world_size)


# Values a finished row's video depends on and that a manifest edit can change. decode_chunk_size is left out:
# the recorded value is the effective one (memory cap, out-of-memory fallback), not the manifest's.
CHANGE_FIELDS = ("seed", "fps", "motion_bucket_id", "noise_aug_strength", "num_frames", "num_inference_steps",
                 "height", "width", "min_guidance_scale", "max_guidance_scale")


def changed_rows(manifest: pa.Table, records: pa.Table, limit: int = 20) -> tuple[int, list[str]]:
    """Finished rows whose manifest values no longer match what their video was made with.

    Returns the count and up to ``limit`` descriptions ("id: column recorded -> manifest"). A missing seed in
    the manifest is not compared: it is derived from generation.seed, which the run's fingerprint guards."""
    ok = records.filter(pc.equal(records["status"], "ok"))
    if ok.num_rows == 0:
        return 0, []
    cols = [c for c in CHANGE_FIELDS if c in ok.column_names]
    # Align by position rather than a hash join: one index array, then one column at a time (memory stays
    # flat at a million rows).
    pos = pc.index_in(manifest["id"], value_set=ok["id"])
    present = pc.is_valid(pos)
    m = manifest.filter(present)
    pos = pos.filter(present)
    mask = None
    for c in cols:
        diff = pc.fill_null(pc.not_equal(m[c], pc.take(ok[c], pos)), False)  # null seed: not compared
        mask = diff if mask is None else pc.or_(mask, diff)
    if mask is None or not pc.any(mask).as_py():
        return 0, []
    bad_m = m.filter(mask).select(["id", *cols])
    bad_r = ok.select(cols).take(pos.filter(mask))
    out = []
    for mine, rec in zip(bad_m.slice(0, limit).to_pylist(), bad_r.slice(0, limit).to_pylist()):
        parts = [f"{c} {rec[c]!r} -> {mine[c]!r}" for c in cols if mine[c] is not None and mine[c] != rec[c]]
        out.append(f"{mine['id']}: " + ", ".join(parts))
    return bad_m.num_rows, out
