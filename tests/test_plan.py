import numpy as np
import pyarrow as pa

from svd_batch.executor import static_deal
from svd_batch.manifest import load_manifest
from svd_batch.plan import assign_ranks, derive_seed, group_units, make_plan, row_cost, with_seed
from svd_batch.fields import RESULT_SCHEMA, Row
from tests.conftest import write_manifest
from tests.test_manifest import GEN


def manifest(tmp_path, rows):
    return load_manifest(str(write_manifest(tmp_path / "m.parquet", rows)), GEN).table


def seeds_as_run(m, world: int, base_seed: int = 42, batch_size: int = 1) -> dict:
    """The seed each row runs with, over all units, as the workers fill them in."""
    plan = make_plan(m, RESULT_SCHEMA.empty_table(), world_size=world, batch_size=batch_size)
    return {r["id"]: with_seed(Row.from_mapping(r), base_seed).seed for i in range(plan.num_units)
            for r in plan.unit(i).to_pylist()}


def test_seed_derivation_depends_on_base_seed_and_id_only(tmp_path):
    rows = [{"id": f"r{i}", "image": "a.jpg", "num_frames": 8 + i % 3} for i in range(6)]
    rows.append({"id": "fixed", "image": "a.jpg", "seed": 9})
    m = manifest(tmp_path, rows)
    first = seeds_as_run(m, 1)
    for world, batch_size in ((2, 1), (3, 1), (2, 4)):
        assert seeds_as_run(m, world, batch_size=batch_size) == first
    assert first["fixed"] == 9
    assert first["r0"] == derive_seed(42, "r0")
    assert derive_seed(42, "r0") != derive_seed(43, "r0") and derive_seed(42, "r0") != derive_seed(42, "r1")
    assert seeds_as_run(m, 1, base_seed=43)["r0"] == derive_seed(43, "r0")
    # The same row, placed elsewhere in another manifest, keeps its seed.
    m2 = manifest(tmp_path / "b", list(reversed(rows)))
    assert seeds_as_run(m2, 1) == first
    assert 0 <= min(first.values()) and max(first.values()) < 2**63
    # Planning itself derives nothing: the plan's table still has the manifest's nulls.
    assert make_plan(m, RESULT_SCHEMA.empty_table(), world_size=2).todo["seed"].null_count == 6


def test_every_row_exactly_once_and_cost_balanced():
    rng = np.random.default_rng(0)
    cost = np.concatenate([np.full(50, 14.0), np.full(50, 25.0)]) * rng.uniform(0.9, 1.1, 100)
    for world in (1, 2, 3, 8):
        ranks = assign_ranks(cost, world)
        assert ranks.min() >= 0 and ranks.max() < world and len(ranks) == len(cost)
        loads = np.bincount(ranks, weights=cost, minlength=world)
        assert loads.max() - loads.min() <= cost.max()
    # A contiguous split of the same rows would be badly unbalanced: the balance is real.
    contiguous = np.array([cost[:50].sum(), cost[50:].sum()])
    balanced = np.bincount(assign_ranks(cost, 2), weights=cost)
    assert balanced.max() / balanced.mean() < 1.02 < contiguous.max() / contiguous.mean()


def test_more_ranks_than_rows_leaves_ranks_idle_without_duplicates(tmp_path):
    m = manifest(tmp_path, [{"id": "a", "image": "a.jpg"}, {"id": "b", "image": "b.jpg"}])
    plan = make_plan(m, RESULT_SCHEMA.empty_table(), world_size=4)
    costs = plan.unit_costs()
    shards = [[x for u in static_deal(costs, 4, r) for x in plan.unit(int(u))["id"].to_pylist()] for r in range(4)]
    assert sorted(sum(shards, [])) == ["a", "b"]
    assert sum(1 for s in shards if not s) == 2


def test_finished_rows_are_skipped_failed_ones_only_with_retry(tmp_path):
    m = manifest(tmp_path, [{"id": x, "image": "a.jpg"} for x in "abcd"])
    records = pa.Table.from_pylist([{"id": "a", "status": "ok"}, {"id": "b", "status": "failed"}],
                                   schema=RESULT_SCHEMA)
    plan = make_plan(m, records, world_size=1)
    assert plan.todo["id"].to_pylist() == ["c", "d"] and plan.done == 1 and plan.failed_skipped == 1
    plan = make_plan(m, records, world_size=1, retry_failed=True)
    assert plan.todo["id"].to_pylist() == ["b", "c", "d"] and plan.failed_skipped == 0


def test_cost_grows_with_frames_steps_and_pixels(tmp_path):
    m = manifest(tmp_path, [
        {"image": "a.jpg", "num_frames": 14}, {"image": "a.jpg", "num_frames": 25},
        {"image": "a.jpg", "num_frames": 14, "num_inference_steps": 50}, {"image": "a.jpg", "height": 1152},
    ])
    c = row_cost(m)
    assert c[1] > c[0] and c[2] > c[0] and c[3] > c[0]


def test_units_are_largest_first_and_batches_share_shapes():
    rng = np.random.default_rng(1)
    n = 23
    frames = rng.choice([8, 14, 25], n)
    keys = np.stack([np.full(n, 64), np.full(n, 64), frames, np.full(n, 4), np.ones(n, np.int64)], axis=1)
    cost = frames * 1.0
    for batch_size in (1, 3):
        order, starts = group_units(cost, keys, batch_size)
        assert sorted(order.tolist()) == list(range(n))  # every row exactly once
        sizes = np.diff(starts)
        assert sizes.min() >= 1 and sizes.max() <= batch_size
        unit_frames = [set(frames[order[a:b]].tolist()) for a, b in zip(starts[:-1], starts[1:])]
        assert all(len(f) == 1 for f in unit_frames)  # a batch never mixes shapes
        firsts = [f.pop() for f in unit_frames]
        assert firsts == sorted(firsts, reverse=True)  # largest first: no big unit left for the end
        # at most one short (tail) batch per shape
        for f in set(frames.tolist()):
            short = [s for s, u in zip(sizes, firsts) if u == f and s < batch_size]
            assert len(short) <= 1
