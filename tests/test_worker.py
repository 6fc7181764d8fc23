"""The per-rank loop: batching, overlap and bounded memory, through the CLI and with a stand-in model."""

import threading
import types

import pyarrow as pa
import pytest
import torch

from svd_batch.fields import RESULT_SCHEMA
from svd_batch.plan import make_plan
from svd_batch.worker import RankWorker
from tests.conftest import SAMPLE, read_results, run_cli, write_manifest
from tests.conftest import settings as settings_for


def rows_manifest(tmp_path, n=8):
    rows = [{"id": f"r{i}", "image": str(SAMPLE / ("cat.jpg" if i % 2 else "coffee.jpg")), "seed": i,
             "num_frames": 5 if i % 3 else 6, "motion_bucket_id": 30 * i} for i in range(n)]
    return write_manifest(tmp_path / "m.parquet", rows)


@pytest.mark.slow
def test_overlap_on_and_off_give_identical_videos_and_batches_are_recorded(tmp_path):
    m = rows_manifest(tmp_path)
    outs = {}
    for name, extra in {"seq": ["runtime.overlap=false"], "overlap": ["runtime.overlap=true", "runtime.writers=3"],
                        "batch4": ["runtime.batch_size=4"]}.items():
        outs[name] = tmp_path / name
        proc = run_cli(f"manifest.path={m}", f"output.dir={outs[name]}", *extra)
        assert proc.returncode == 0, proc.stderr
    seq, ovl, b4 = (read_results(outs[k]) for k in ("seq", "overlap", "batch4"))
    # Three writers record what one does: the same rows in the same order, the same files and scores.
    same = ["id", "status", "frames_sha256", "video_path", "motion_score", "image_similarity", "flicker_score"]
    assert seq.select(same).equals(ovl.select(same))
    for p in seq["video_path"].to_pylist():
        assert (outs["seq"] / p).read_bytes() == (outs["overlap"] / p).read_bytes()
    assert set(seq["batch_size"].to_pylist()) == {1}
    # 3 six-frame rows share a batch; 5 five-frame rows make a batch of 4 and one of 1.
    assert sorted(b4["batch_size"].to_pylist()) == [1, 3, 3, 3, 4, 4, 4, 4]
    assert set(b4["status"].to_pylist()) == {"ok"} and b4["id"].to_pylist() == seq["id"].to_pylist()
    # Each MP4 carries its row's recipe in the container's comment tag (issue 25), as ffmpeg reads it.
    import json

    import svd_batch
    from tests.test_video import ffmpeg_tags

    for r in seq.to_pylist():
        recipe = json.loads(ffmpeg_tags(outs["seq"] / r["video_path"])["comment"])
        keys = ["id", "seed", "model", "num_inference_steps", "height", "width", "num_frames", "fps",
                "motion_bucket_id", "noise_aug_strength", "min_guidance_scale", "max_guidance_scale"]
        assert {k: recipe[k] for k in keys} == {k: r[k] for k in keys}
        assert recipe["sampler"] == r.get("sampler", "euler") and recipe["svd_batch"] == svd_batch.__version__


@pytest.mark.slow
def test_memory_mode_and_compile_are_applied_and_recorded(tmp_path):
    m = rows_manifest(tmp_path, n=2)
    out = tmp_path / "out"
    # low_vram without its offload: compile with offload is refused (tests/test_compile.py)
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "memory=low_vram", "memory.cpu_offload=false",
                   "runtime.compile=true", "runtime.compile_backend=eager")
    assert proc.returncode == 0, proc.stderr
    t = read_results(out)
    assert set(t["memory_mode"].to_pylist()) == {"low_vram"} and set(t["decode_chunk_size"].to_pylist()) == {2}
    assert set(t["compiled"].to_pylist()) == {True}
    import json

    stats = json.loads((out / "stats" / "rank-00000.json").read_text())
    assert stats["warmup_seconds"] > 0 and stats["rows"] == 2
    assert "compile warm-up" in proc.stderr


class FakeGen:
    """A stand-in model: returns frames at once, so the test measures the loop's own bookkeeping."""

    memory_mode = "full"
    device = torch.device("cpu")
    compiled = False

    def effective_decode_chunk(self, n):
        return n

    def run(self, rows, images, log=None):
        import numpy as np

        from svd_batch.generate import RowOutcome

        return [RowOutcome(frames=np.zeros((int(r.num_frames), int(r.height), int(r.width), 3), np.uint8),
                           error=None, memory_mode="full", decode_chunk_size=8, batch_size=1, generate_seconds=0.0,
                           peak_vram_bytes=None, attention="auto") for r in rows]


@pytest.mark.slow
def test_images_in_flight_are_bounded(tmp_path, monkeypatch):
    n, batch_size, prefetch = 40, 1, 2
    rows = [{"row": i, "id": f"r{i}", "image": "x", "image_uri": str(SAMPLE / "cat.jpg"), "seed": i, "fps": 7,
             "motion_bucket_id": 1, "noise_aug_strength": 0.0, "num_frames": 2, "num_inference_steps": 1,
             "height": 8, "width": 8, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0, "decode_chunk_size": 2}
            for i in range(n)]
    settings = settings_for(f"runtime.batch_size={batch_size}", "runtime.overlap=true", "generation.seed=1",
                            "model.name=fake", "images.timeout=5", "images.max_bytes=10000000",
                            "images.max_pixels=100000000", "video.crf=30", "video.preset=ultrafast")
    from svd_batch.rundir import RunDir

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    from svd_batch.signals import StopFlag

    stop = StopFlag()
    progress = types.SimpleNamespace(update=lambda k: None)
    worker = RankWorker(FakeGen(), rd, settings, rank=0, world=1, stop=stop, progress=progress, log=lambda m: None)
    lock, live, peak = threading.Lock(), [0], [0]
    real_load, real_generate = worker._load, worker._generate

    def load(row):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return real_load(row)

    def generate(rows_, loaded, ticket):
        out = real_generate(rows_, loaded, ticket)
        with lock:
            live[0] -= len(rows_)
        return out

    monkeypatch.setattr(worker, "_load", load)
    monkeypatch.setattr(worker, "_generate", generate)
    plan = make_plan(pa.Table.from_pylist(rows), RESULT_SCHEMA.empty_table(), world_size=1)
    from svd_batch.feed import ListSource

    stats = worker.run(plan, ListSource(range(plan.num_units)))
    assert stats.ok == n and rd.read_records().num_rows == n
    assert peak[0] <= (prefetch + 1) * batch_size


@pytest.mark.process
def test_a_row_that_fails_after_a_stop_signal_is_left_for_the_next_run(tmp_path):
    """Ctrl-C reaches the whole process group: a row failing after it may have failed because of it, so it
    is given back (its unit unfinished), never recorded failed."""
    from svd_batch.feed import ListSource
    from svd_batch.rundir import RunDir
    from svd_batch.signals import StopFlag

    rows = [{"row": i, "id": f"r{i}", "image": "x", "image_uri": str(SAMPLE / "cat.jpg"), "seed": i, "fps": 7,
             "motion_bucket_id": 1, "noise_aug_strength": 0.0, "num_frames": 2, "num_inference_steps": 1,
             "height": 8, "width": 8, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0, "decode_chunk_size": 2}
            for i in range(3)]
    settings = settings_for("runtime.overlap=false", "model.name=fake", "video.preset=ultrafast")
    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    stop = StopFlag()

    class SignalledGen(FakeGen):
        def run(self, rows_, images, log=None):
            out = super().run(rows_, images, log)
            if rows_[0].id == "r1":  # the signal arrives while r1 is generated, and r1 fails
                stop.signum = 2
                out = [o.__class__(**{**o.__dict__, "frames": None, "error": "row r1: interrupted"}) for o in out]
            return out

    finished = []
    source = ListSource(range(3))
    source.finished = lambda t: finished.append(t)
    progress = types.SimpleNamespace(update=lambda k: None)
    logs = []
    worker = RankWorker(SignalledGen(), rd, settings, rank=0, world=1, stop=stop, progress=progress, log=logs.append)
    with pytest.raises(KeyboardInterrupt):  # stopped: the next unit is not started (signals.StopFlag.busy)
        worker.run(make_plan(pa.Table.from_pylist(rows), RESULT_SCHEMA.empty_table(), world_size=1), source)
    records = rd.read_records().to_pylist()
    assert [(r["id"], r["status"]) for r in records] == [("r0", "ok")]
    assert len(finished) == 1  # r1's unit stays in hand, given back when the rank leaves; r2 was never taken
    assert any("r1 failed after a stop signal" in m for m in logs), logs


# -- the write stage (writer.py) ---------------------------------------------------------------------------------
def tiny_rows(n, frames=2, size=8):
    return [{"row": i, "id": f"r{i}", "image": "x", "image_uri": str(SAMPLE / "cat.jpg"), "seed": i, "fps": 7,
             "motion_bucket_id": 1, "noise_aug_strength": 0.0, "num_frames": frames, "num_inference_steps": 1,
             "height": size, "width": size, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0,
             "decode_chunk_size": 2} for i in range(n)]


def stage(tmp_path, *overrides):
    """A RowWriter over a fresh run folder, as RankWorker makes it."""
    from svd_batch.rundir import RunDir
    from svd_batch.signals import StopFlag
    from svd_batch.worker import RankStats
    from svd_batch.writer import RowWriter

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    s = settings_for("model.name=fake", "video.preset=ultrafast", "report.scores=false", *overrides)
    stats = RankStats(rank=0, world_size=1, host="h", device="cpu")
    return rd, RowWriter(rd, s, device="cpu", rank=0, world=1, stats=stats, stop=StopFlag(),
                         progress=types.SimpleNamespace(update=lambda k: None), log=lambda m: None, embed=None)


def computed(rows):
    import datetime as dt

    import numpy as np

    from svd_batch.fields import Row
    from svd_batch.ledger import Ticket
    from svd_batch.writer import Done

    out = []
    for r in rows:
        frames = np.full((r["num_frames"], r["height"], r["width"], 3), r["row"] * 20, np.uint8)
        out.append([Done(row=Row.from_mapping(r), ticket=Ticket(r["row"]), error=None, loaded=True, load_seconds=0.0,
                         started_at=dt.datetime.now(dt.timezone.utc), memory_mode="full", decode_chunk_size=2,
                         frames=frames)])
    return out


def test_the_write_queue_bounds_the_videos_held_and_the_model_waits_when_it_is_full(tmp_path):
    """A stand-in writer that holds every encode: the model's thread stops at runtime.write_queue videos (never
    more held), runtime.writers encodes run at once, and the records come in the order the rows were computed."""
    from svd_batch.feed import ListSource
    from svd_batch.ledger import Ticket
    from svd_batch.writer import Files

    rd, w = stage(tmp_path, "runtime.writers=2", "runtime.write_queue=3")
    assert (w.writers, w.cap) == (2, 3)
    both_in = threading.Barrier(3, timeout=60)  # the two encoders and this test
    go = threading.Event()

    def held_encode(o):
        if not go.is_set():  # the first two: the others start only once these let go of their videos
            both_in.wait()  # passes only with two encodes in flight at once
        assert go.wait(60)
        return Files("ok", None, f"videos/{o.row.id}.mp4", "h" + o.row.id,
                     {"motion_score": None, "image_similarity": None, "flicker_score": None}, 0.0)

    w._files = held_encode
    n = 8
    w.start(ListSource(range(n)), threaded=True)
    for t in range(n):
        w.pending[Ticket(t)] = 1
    batches = computed(tiny_rows(n))
    model = threading.Thread(target=lambda: [w.put(b) for b in batches], daemon=True)
    model.start()
    both_in.wait()
    with w.slots.cond:  # the model's thread is stopped at the cap: 3 videos held, 2 of them being encoded
        assert w.slots.cond.wait_for(lambda: w.slots.blocked, timeout=60)
        assert w.slots.held == 3 and w.slots.peak == 3
    assert model.is_alive() and rd.read_records().num_rows == 0
    go.set()
    model.join(60)
    w.end()
    w.close()
    assert w.error is None and w.slots.peak == 3 and w.slots.held == 0
    assert rd.read_records()["id"].to_pylist() == [f"r{i}" for i in range(n)]
    assert all(b[0].frames is None for b in batches)  # encoded videos are let go of


@pytest.mark.slow
def test_several_encodes_in_flight_give_the_files_and_records_of_one_writer(tmp_path, monkeypatch):
    """Real ffmpeg: three encodes at once (they meet at a barrier only three in flight can pass), and the same
    MP4 bytes, hashes and record order as the inline writer of overlap off."""
    import svd_batch.writer as writer_module
    from svd_batch.feed import ListSource
    from svd_batch.ledger import Ticket

    n = 6
    outs = {}
    for name, threaded, extra in (("inline", False, ()), ("three", True, ("runtime.writers=3",))):
        rd, w = stage(tmp_path / name, *extra)
        real = writer_module.write_mp4
        if threaded:
            met = threading.Barrier(3, timeout=60)

            def write_mp4(*a, _met=met, **k):
                _met.wait()  # 6 rows: two rounds of three
                return real(*a, **k)

            monkeypatch.setattr(writer_module, "write_mp4", write_mp4)
        w.start(ListSource(range(n)), threaded=threaded)
        for t in range(n):
            w.pending[Ticket(t)] = 1
        for b in computed(tiny_rows(n, frames=4, size=16)):
            w.put(b)
        w.end()
        w.close()
        monkeypatch.setattr(writer_module, "write_mp4", real)
        assert w.error is None
        if threaded:
            assert not met.broken
        t = rd.read_records()
        outs[name] = (t["id"].to_pylist(), t["frames_sha256"].to_pylist(), t["status"].to_pylist(),
                      [(tmp_path / name / "out" / p).read_bytes() for p in t["video_path"].to_pylist()])
    assert outs["three"] == outs["inline"] and set(outs["three"][2]) == {"ok"}


def test_writers_are_sized_from_the_cores_each_local_rank_has(monkeypatch):
    import os

    from svd_batch.writer import cores_per_rank, writer_counts

    def machine(affinity, cpus, local):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        return cores_per_rank()

    assert machine(16, 16, 2) == 8  # two ranks share the node's 16 cores
    assert machine(4, 16, 4) == 4  # the launcher pinned each rank to 4 cores of its own
    assert machine(2, 2, 1) == 2 and machine(1, 16, 8) == 1
    auto = settings_for()
    assert writer_counts(auto, cores=8) == (7, 14)  # a core for the model's thread and the loaders
    assert writer_counts(auto, cores=64) == (8, 16) and writer_counts(auto, cores=1) == (1, 2)
    assert writer_counts(settings_for("runtime.writers=3"), cores=64) == (3, 6)
    assert writer_counts(settings_for("runtime.writers=3", "runtime.write_queue=1"), cores=1) == (3, 1)


def test_a_full_disk_in_one_encode_stops_the_stage_and_the_model_is_not_left_waiting(tmp_path):
    """An output-folder error in an encoder thread reaches the model's thread (RankWorker raises it), the rows
    before it are recorded, none after it, and a model blocked on the full write queue is let go."""
    from svd_batch.feed import ListSource
    from svd_batch.ledger import Ticket
    from svd_batch.video import OutputFolderError
    from svd_batch.writer import Files

    rd, w = stage(tmp_path, "runtime.writers=2", "runtime.write_queue=2")

    def encode(o):
        if o.row.row == 3:
            raise OutputFolderError("disk full")
        return Files("ok", None, f"videos/{o.row.id}.mp4", "h", {"motion_score": None, "image_similarity": None,
                                                                  "flicker_score": None}, 0.0)

    w._files = encode
    n = 12
    w.start(ListSource(range(n)), threaded=True)
    for t in range(n):
        w.pending[Ticket(t)] = 1
    for b in computed(tiny_rows(n)):  # never blocks for good: failed encodes give their slots back too
        w.put(b)
    w.close()
    assert isinstance(w.error, OutputFolderError)
    assert rd.read_records()["id"].to_pylist() == ["r0", "r1", "r2"] and w.slots.held == 0
