"""One rank's share of the work: rows -> batches -> frames -> videos and records.

The model computes while, beside it, a small thread pool loads the next batches' images (bounded
prefetch) and one writer thread encodes MP4s, hashes frames and records results (bounded queue). With
``runtime.overlap=false`` the same steps run one after the other in the calling thread. Either way the
writer is the only thread that records results, so a row counts as done only after its video is in place.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import pyarrow as pa

from .batch import batch_key, batched_frames
from .fields import CONDITIONING_FIELDS
from .gallery import save_thumbnails
from .generate import Generator, OutOfMemory, first_line, peak_host_memory_bytes
from .images import ImageError, load_image_digest
from .plan import with_seed
from .rundir import PartWriter, RunDir, write_text_atomic
from .write import frames_sha256, write_mp4


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iter_batches(shard: pa.Table, batch_size: int, base_seed: int = 42,
                 window: int = 256) -> Iterator[list[dict[str, Any]]]:
    """Rows in manifest order, seeds filled in; with batch_size > 1, rows of a window that share shapes are
    grouped. Only one window of rows is ever held as Python objects."""
    for chunk in shard.to_batches(max_chunksize=max(window, batch_size)):
        rows = [with_seed(r, base_seed) for r in chunk.to_pylist()]
        if batch_size <= 1:
            yield from ([r] for r in rows)
            continue
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(batch_key(r), []).append(r)
        for members in groups.values():
            for i in range(0, len(members), batch_size):
                yield members[i : i + batch_size]


class _Inline:
    """An executor that runs each task at once: the no-overlap path shares the overlapped code."""

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class RankStats:
    rank: int
    world_size: int
    host: str
    device: str
    rows: int = 0
    ok: int = 0
    failed: int = 0
    model_load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    wall_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    ok_seconds: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("ok_seconds")
        d["outside_pipeline_fraction"] = 1.0 - self.pipeline_seconds / self.wall_seconds if self.wall_seconds else None
        return json.dumps(d, indent=2)


class RankWorker:
    def __init__(self, gen: Generator, rundir: RunDir, cfg, *, rank: int, world: int, stop, progress,
                 log: Callable[[str], None], thumb_max_row: int = -1):
        self.gen, self.rundir, self.cfg = gen, rundir, cfg
        self.rank, self.world, self.stop, self.progress, self.log = rank, world, stop, progress, log
        self.batch_size = max(1, int(cfg.runtime.batch_size))
        # auto: overlap on GPUs, where the CPU is otherwise idle while the model runs; on CPU the model already
        # uses every core and loader/writer threads would only compete with it (BENCHMARKS.md).
        overlap = cfg.runtime.get("overlap", "auto")
        self.overlap = gen.device.type == "cuda" if overlap in ("auto", None) else bool(overlap)
        self.prefetch = max(1, int(cfg.runtime.get("prefetch_batches", 2)))
        self.parts = PartWriter(rundir, rank, int(cfg.runtime.results_chunk_rows))
        self.stats = RankStats(rank=rank, world_size=world, host=socket.gethostname(), device=str(gen.device))
        self._write_error: BaseException | None = None
        self.thumb_max_row = thumb_max_row

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, shard: pa.Table) -> RankStats:
        started = time.perf_counter()
        loader = ThreadPoolExecutor(2, thread_name_prefix="load") if self.overlap else _Inline()
        writes: queue.Queue = queue.Queue(maxsize=2)
        writer = threading.Thread(target=self._writer_loop, args=(writes,), daemon=True, name="write")
        if self.overlap:
            writer.start()
        pending: collections.deque = collections.deque()
        batches = iter_batches(shard, self.batch_size, int(self.cfg.generation.seed))
        try:
            while True:
                # Keep up to `prefetch` batches of images loading ahead of the model.
                while len(pending) < self.prefetch + 1 and self.stop.signum is None:
                    rows = next(batches, None)
                    if rows is None:
                        break
                    pending.append((rows, [loader.submit(self._load, r) for r in rows]))
                if not pending or self.stop.signum is not None:
                    break
                rows, futures = pending.popleft()
                if self.cfg.runtime.compile and not self.stats.warmup_seconds:
                    self._warmup(rows)
                loaded = [f.result() for f in futures]
                done = self._generate(rows, loaded)
                if self.overlap:
                    writes.put(done)
                else:
                    self._write_batch(done)
                if self._write_error:
                    raise self._write_error
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
            loader.shutdown(wait=True)
            if self.overlap:
                writes.put(None)  # finish what is queued: those rows are computed, keep them
                writer.join()
            self.stats.wall_seconds = time.perf_counter() - started
            self.save_stats()
        if self._write_error:
            raise self._write_error
        return self.stats

    def _warmup(self, rows: list[dict[str, Any]]) -> None:
        """Compile before timing rows: a 2-step pass at the first batch's shapes, its output thrown away."""
        from PIL import Image

        t = time.perf_counter()
        fake = [{**r, "num_inference_steps": 2, "seed": 0} for r in rows]
        images = [Image.new("RGB", (int(r["width"]), int(r["height"]))) for r in rows]
        if len(fake) > 1:
            batched_frames(self.gen.pipe, images, fake)
        else:
            self.gen.frames(images[0], fake[0])
        self.stats.warmup_seconds = time.perf_counter() - t
        self.log(f"svd-batch: compile warm-up took {self.stats.warmup_seconds:.1f} s")

    def _load(self, row: dict[str, Any]) -> tuple[Any, str | None, float, dt.datetime]:
        started_at = _now()
        t = time.perf_counter()
        img = self.cfg.images
        try:
            image, row["image_sha256"] = load_image_digest(row["image_uri"], timeout=float(img.timeout),
                                                           max_bytes=int(img.max_bytes), max_pixels=img.max_pixels)
            return image, None, time.perf_counter() - t, started_at
        except ImageError as exc:
            return None, f"row {row['id']}: image {row['image']!r}: {exc}", time.perf_counter() - t, started_at

    def _generate(self, rows, loaded) -> list[dict[str, Any]]:
        """Frames for the rows whose image loaded; a record skeleton for every row."""
        import torch

        gen = self.gen
        out = []
        for row, (image, error, load_s, started_at) in zip(rows, loaded):
            out.append({"row": row, "image": image, "error": error, "load_seconds": load_s, "started_at": started_at,
                        "frames": None, "memory_mode": gen.memory_mode,
                        "decode_chunk_size": gen.effective_decode_chunk(row["decode_chunk_size"])})
        todo = [o for o in out if o["error"] is None]
        if not todo:
            return out
        if gen.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(gen.device)
        t = time.perf_counter()
        if len(todo) > 1:
            try:
                rows_eff = [{**o["row"], "decode_chunk_size": o["decode_chunk_size"]} for o in todo]
                for o, frames in zip(todo, batched_frames(gen.pipe, [o["image"] for o in todo], rows_eff)):
                    o["frames"] = frames
            except Exception as exc:  # noqa: BLE001 - OOM or one bad row: fall back to rows one by one
                self.log(f"svd-batch: a batch of {len(todo)} failed ({type(exc).__name__}); running its rows one by one")
                for o in todo:
                    o["frames"] = None
        for o in todo:
            if o["frames"] is not None:
                continue
            try:
                o["frames"], o["memory_mode"], o["decode_chunk_size"] = gen.frames_with_fallback(o["image"], o["row"])
            except OutOfMemory as exc:
                o["error"] = f"row {o['row']['id']}: {exc}"
            except Exception as exc:  # noqa: BLE001 - one bad row must not stop the run; the reason is recorded
                o["error"] = f"row {o['row']['id']}: generate failed: {type(exc).__name__}: {first_line(exc)}"
        elapsed = time.perf_counter() - t
        self.stats.pipeline_seconds += elapsed
        peak = int(torch.cuda.max_memory_allocated(gen.device)) if gen.device.type == "cuda" else None
        for o in todo:
            o["generate_seconds"] = elapsed / len(todo)
            o["batch_size"] = len(todo)
            o["peak_vram_bytes"] = peak
        for o in out:
            o["image"] = None  # the writer needs frames, not the source image: free it early
        return out

    # -- writing ------------------------------------------------------------------------------------------
    def _writer_loop(self, writes: queue.Queue) -> None:
        while True:
            done = writes.get()
            if done is None:
                return
            if self._write_error is None:
                try:
                    self._write_batch(done)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                    self._write_error = exc

    def _write_batch(self, done: list[dict[str, Any]]) -> None:
        for o in done:
            self._write_row(o)

    def _write_row(self, o: dict[str, Any]) -> None:
        row, cfg = o["row"], self.cfg
        record: dict[str, Any] = {
            "id": row["id"], "image": row["image"], "row": row["row"], "seed": row["seed"],
            **{f: row[f] for f in CONDITIONING_FIELDS},
            "decode_chunk_size": o["decode_chunk_size"], "memory_mode": o["memory_mode"],
            "batch_size": o.get("batch_size"), "compiled": bool(cfg.runtime.compile), "model": str(cfg.model.name),
            "device": str(self.gen.device), "rank": self.rank, "world_size": self.world,
            "host": self.stats.host, "started_at": o["started_at"], "load_seconds": o["load_seconds"],
            "generate_seconds": o.get("generate_seconds"), "peak_vram_bytes": o.get("peak_vram_bytes"),
            "image_sha256": row.get("image_sha256"),
        }
        t = time.perf_counter()
        if o["frames"] is not None and o["error"] is None:
            try:
                record["frames_sha256"] = frames_sha256(o["frames"])
                write_mp4(o["frames"], self.rundir.video_path(row["id"]), int(row["fps"]), crf=int(cfg.video.crf),
                          codec=str(cfg.video.codec), pix_fmt=str(cfg.video.pix_fmt), preset=str(cfg.video.preset))
                if row["row"] <= self.thumb_max_row:
                    save_thumbnails(self.rundir.root, row["id"], o["frames"])
                record.update(status="ok", error=None, video_path=f"videos/{row['id']}.mp4")
            except Exception as exc:  # noqa: BLE001 - e.g. ffmpeg failing on this row
                record.update(status="failed", frames_sha256=None,
                              error=f"row {row['id']}: write failed: {type(exc).__name__}: {first_line(exc)}")
        else:
            record.update(status="failed", error=o["error"])
        record["write_seconds"] = time.perf_counter() - t
        record["total_seconds"] = sum(record.get(k) or 0.0 for k in ("load_seconds", "generate_seconds", "write_seconds"))
        record["finished_at"] = _now()
        record["peak_host_memory_bytes"] = peak_host_memory_bytes()
        self.parts.add(record)
        self.stats.rows += 1
        if record["status"] == "ok":
            self.stats.ok += 1
            self.stats.ok_seconds.append(record["total_seconds"])
        else:
            self.stats.failed += 1
            self.log(f"svd-batch: {record['error']}")
        self.progress.update(1)

    def save_stats(self) -> None:
        os.makedirs(os.path.join(self.rundir.root, "stats"), exist_ok=True)
        write_text_atomic(self.stats.to_json(), os.path.join(self.rundir.root, "stats", f"rank-{self.rank:05d}.json"))
