"""Step 2: decide which rows still need work and in which order they are handed out.

One rank (rank 0) computes the plan from the manifest and one snapshot of the run folder's records, and
shares it: every rank then works from the same list, whatever its filesystem cache shows. The rows to do are
ordered by estimated cost (frames x steps x pixels, x2 with guidance), largest first, and grouped into units
(one row, or one batch of rows that share shapes); ranks claim the next unit when they need work, so a slow
rank simply claims less and everyone finishes together. Nothing is padded or duplicated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fields import CHANGE_FIELDS, SEED_MAX, SHAPE_FIELDS, Row
from .util import occurrence


def with_seed(row: "Row", base_seed: int) -> "Row":
    """The row with its seed: its own, or one derived from its id (done per row as it runs, so planning a
    million rows creates no Python object per row)."""
    if row.seed is None:
        row.seed = derive_seed(base_seed, row.id)
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


def batch_keys(table: pa.Table) -> np.ndarray:
    """Per row, ``batch.batch_key`` as numbers: the shape fields and whether guidance is on."""
    cols = [table[c].to_numpy() for c in SHAPE_FIELDS]
    cols.append((table["max_guidance_scale"].to_numpy() > 1.0).astype(np.int64))
    return np.stack(cols, axis=1).astype(np.int64) if table.num_rows else np.zeros((0, 5), np.int64)


def group_units(cost: np.ndarray, keys: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order and unit boundaries: rows by cost, largest first (ties in manifest order); with batch_size > 1
    consecutive rows of equal ``keys`` in that order form batches of up to batch_size, and a batch goes where
    its first row stands. Returns (row positions in claim order, unit start offsets ending with n)."""
    n = len(cost)
    order = np.lexsort((np.arange(n), -cost))
    if n == 0:
        return order, np.zeros(1, np.int64)
    if batch_size <= 1:
        return order, np.arange(n + 1, dtype=np.int64)
    _, key_id = np.unique(keys[order], axis=0, return_inverse=True)
    key_id = key_id.reshape(-1)
    pos = np.arange(n)
    within = occurrence(key_id)  # place among the rows of its key, in claim order
    _, unit = np.unique(key_id * (n // batch_size + 1) + within // batch_size, return_inverse=True)
    unit = unit.reshape(-1)
    first = np.full(unit.max() + 1, n, np.int64)
    np.minimum.at(first, unit, pos)
    regroup = np.lexsort((pos, first[unit]))
    units_in_order = unit[regroup]
    starts = np.r_[0, np.flatnonzero(np.diff(units_in_order)) + 1, n].astype(np.int64)
    return order[regroup], starts


@dataclass
class Plan:
    total: int          # rows in the manifest (after selection)
    done: int           # finished ok earlier
    failed_skipped: int  # failed earlier and not retried
    todo: pa.Table      # rows to run now, in claim order (missing seeds are derived as rows run)
    starts: np.ndarray  # unit i is todo rows starts[i]:starts[i+1]
    world_size: int
    indices: np.ndarray | None = None  # todo's positions in the manifest table

    def spec(self) -> "PlanSpec":
        return PlanSpec(self.total, self.done, self.failed_skipped, self.indices, self.starts, self.world_size)

    @property
    def num_units(self) -> int:
        return len(self.starts) - 1

    def unit(self, i: int) -> pa.Table:
        return self.todo.slice(int(self.starts[i]), int(self.starts[i + 1] - self.starts[i]))

    def unit_costs(self) -> np.ndarray:
        cost = row_cost(self.todo) if self.todo.num_rows else np.zeros(0)
        return np.add.reduceat(cost, self.starts[:-1]) if self.num_units else np.zeros(0)

    def shapes(self) -> list[tuple[int, int]]:
        """(first todo row, unit size) for each distinct (shape key, unit size): what a compile warm-up covers."""
        if not self.num_units:
            return []
        keys = batch_keys(self.todo)[self.starts[:-1]]
        sizes = np.diff(self.starts)
        seen: dict[tuple, int] = {}
        for i, (k, n) in enumerate(zip(map(tuple, keys.tolist()), sizes.tolist())):
            seen.setdefault((k, n), int(self.starts[i]))
        return [(first, n) for (_, n), first in seen.items()]


def make_plan(
    manifest: pa.Table,
    records: pa.Table,
    *,
    world_size: int,
    retry_failed: bool = False,
    batch_size: int = 1,
) -> Plan:
    """Rows of ``manifest`` without a finished record (ok, or failed unless ``retry_failed``), in claim order."""
    if records.num_rows:
        statuses = ["ok"] if retry_failed else ["ok", "failed"]
        finished_ids = records.filter(pc.is_in(records["status"], value_set=pa.array(statuses)))["id"]
        finished = pc.is_in(manifest["id"], value_set=finished_ids).to_numpy(zero_copy_only=False)
        ok_ids = records.filter(pc.equal(records["status"], "ok"))["id"]
        done = pc.sum(pc.is_in(manifest["id"], value_set=ok_ids)).as_py() or 0
        left = np.flatnonzero(~finished)
    else:
        done = 0
        left = np.arange(manifest.num_rows)
    skipped = (manifest.num_rows - len(left)) - done
    todo = manifest.take(pa.array(left, pa.int64()))
    cost = row_cost(todo) if todo.num_rows else np.zeros(0)
    order, starts = group_units(cost, batch_keys(todo), max(1, int(batch_size)))
    spec = PlanSpec(total=manifest.num_rows, done=done, failed_skipped=skipped, indices=left[order],
                    starts=starts, world_size=world_size)
    return spec.build(manifest)


@dataclass
class PlanSpec:
    """A plan without its rows: what rank 0 sends to the others (positions in the manifest table, a few MB at a
    million rows), so every rank runs from rank 0's snapshot of the records, whatever its own cache shows."""

    total: int
    done: int
    failed_skipped: int
    indices: np.ndarray  # positions in the manifest table, in claim order
    starts: np.ndarray
    world_size: int

    def build(self, manifest: pa.Table) -> Plan:
        todo = manifest.take(pa.array(self.indices, pa.int64()))
        return Plan(total=self.total, done=self.done, failed_skipped=self.failed_skipped, todo=todo,
                    starts=self.starts, world_size=self.world_size, indices=self.indices)


# Conditioning values a finished row's video depends on and that a manifest edit can change (the image itself is
# compared by images.changed_images). decode_chunk_size is left out: the recorded value is the effective one
# (memory cap, out-of-memory fallback), not the manifest's.
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
