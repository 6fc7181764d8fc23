"""One rank's share of the work: claimed units -> frames -> videos and records.

The rank asks for the next unit (one row, or one batch) just before the model needs it (feed.py). With overlap
on (the default on CUDA) the next unit is claimed a little ahead, timed so its images have loaded when the model
is free, and one writer thread encodes MP4s, hashes frames and records results (bounded queue); with
``runtime.overlap=false`` the same steps run one after the other in the calling thread. Either way the writer is
the only thread that records results, so a row counts as done only after its video is in place.

What the rank does about failures: a bad row is recorded failed and the run goes on; an error that breaks the
device (or ``runtime.max_same_failures`` rows in a row failing the same way on a device that no longer
computes) stops this rank without recording its unfinished rows (DeviceFailure); an error of the output folder
(disk full) stops the run (OutputFolderError), again without blaming any row; a source of images that is down
stops it too (outage.py), recording none of the rows it failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .atomic import write_text_atomic
from .device_errors import device_answers, is_row_error
from .feed import Feed, UnitSource, _Inline
from .fields import Record, Row
from .device_errors import DeviceFailure
from .generate import Generator
from .hooks import slow_factor
from .images import ImageError, load_image_digest
from .ledger import Ticket
from .outage import OutageGuard
from .plan import Plan, with_seed
from .report.sheet import save_thumbnails
from .rundir import PartWriter, RunDir
from .scores import pipeline_embedder, scores_for_record
from .settings import RunSettings
from .util import first_line, peak_host_memory_bytes
from .video import frames_sha256, is_output_error, output_folder_error, write_mp4

# The rank's last batch: rows the outage guard held back below its threshold are recorded after everything else.
_END: list = []


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class RankStats:
    rank: int
    world_size: int
    host: str
    device: str
    units: int = 0
    rows: int = 0
    ok: int = 0
    failed: int = 0
    model_load_seconds: float = 0.0
    warmup_seconds: float = 0.0
    wall_seconds: float = 0.0
    pipeline_seconds: float = 0.0
    recompiles_after_warmup: int | None = None  # compiled runs: graphs compiled in timed rows (should be 0)
    ok_seconds: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("ok_seconds")
        d["outside_pipeline_fraction"] = 1.0 - self.pipeline_seconds / self.wall_seconds if self.wall_seconds else None
        return json.dumps(d, indent=2)

    def figures(self) -> dict[str, Any]:
        """What the run's summary lists per rank (results.summary)."""
        return {k: getattr(self, k) for k in ("rank", "host", "rows", "ok", "failed", "model_load_seconds",
                                              "warmup_seconds", "pipeline_seconds", "wall_seconds")}


@dataclass
class Done:
    """One row between the model and the writer: its frames, or why it has none, and how they were made."""

    row: Row
    ticket: Ticket | None
    error: str | None
    loaded: bool
    load_seconds: float
    started_at: dt.datetime
    memory_mode: str
    decode_chunk_size: int
    frames: np.ndarray | None = None
    input_image: Any = None       # the conditioning image as loaded (resized by the writer, for report and scores)
    batch_size: int | None = None
    generate_seconds: float | None = None
    peak_vram_bytes: int | None = None
    attention: str | None = None
    signature: str | None = None  # the error with the row's id taken out: equal failures in a row compare equal


class RankWorker:
    def __init__(self, gen: Generator, rundir: RunDir, settings: RunSettings, *, rank: int, world: int, stop,
                 progress, log: Callable[[str], None], thumb_max_row: int = -1, member: str | None = None):
        self.gen, self.rundir, self.settings = gen, rundir, settings
        self.rank, self.world, self.stop, self.progress, self.log = rank, world, stop, progress, log
        overlap = settings.runtime.overlap_setting
        # auto: overlap on GPUs, where the CPU is otherwise idle while the model runs; on CPU the model already
        # uses every core and loader/writer threads would only compete with it (BENCHMARKS.md).
        self.overlap = gen.device.type == "cuda" if overlap is None else overlap
        self.parts = PartWriter(rundir, rank, settings.runtime.results_chunk_rows, member=member)
        self.units: UnitSource = UnitSource()
        self._pending: dict[Ticket, int] = {}  # rows of each unit in hand not yet recorded (or dropped)
        self._dropped: set[Ticket] = set()
        self.stats = RankStats(rank=rank, world_size=world, host=socket.gethostname(), device=str(gen.device))
        self._write_error: BaseException | None = None
        self._seconds_per_cost: list[float] = []
        self.slow = slow_factor(rank)  # test and benchmark hook (hooks.py): an older or throttled GPU
        self.thumb_max_row = thumb_max_row
        self.embed = pipeline_embedder(getattr(gen, "pipe", None)) if settings.report.scores else None
        img = settings.images
        self.outage = OutageGuard(
            lambda uri: load_image_digest(uri, timeout=img.timeout, max_bytes=img.max_bytes,
                                          max_pixels=img.max_pixels),
            failures=img.outage_failures, wait_seconds=img.outage_wait, log=log,
            stopped=lambda: getattr(stop, "signum", None) is not None)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, plan: Plan, units: UnitSource) -> RankStats:
        """Run units of ``plan`` as ``units`` hands them out, until it has none left for this rank."""
        started = time.perf_counter()
        self.units = units
        loader = ThreadPoolExecutor(2, thread_name_prefix="load") if self.overlap else _Inline()
        writes: queue.Queue = queue.Queue(maxsize=2)
        writer = threading.Thread(target=self._writer_loop, args=(writes,), daemon=True, name="write")
        if self.overlap:
            writer.start()
        base_seed = self.settings.generation.seed
        feed = Feed(plan, units, lambda rows: [loader.submit(self._load, r) for r in rows],
                    base_seed=base_seed, lookahead=self.overlap)
        held_back: list[Done] = []
        try:
            while True:
                item = feed.next()
                if item is None:
                    break
                ticket, rows, futures, cost = item
                self._pending[ticket] = len(rows)
                self.stats.units += 1
                if self.settings.runtime.compile and not self.stats.warmup_seconds:
                    # Any rank may claim any unit: warm up every (shape, unit size) of the plan.
                    self._warmup([(with_seed(Row.from_mapping(plan.todo.slice(first, 1).to_pylist()[0]), base_seed), n)
                                  for first, n in plan.shapes()])
                expected = self._expected_seconds(cost)
                # A stop signal now lets this unit finish only if it fits the grace period (signals.StopFlag).
                self.stop.busy(expected)
                try:
                    loaded = [f.result() for f in futures]
                    feed.arm(expected)
                    t = time.perf_counter()
                    done = self._generate(rows, loaded, ticket)
                    if self.slow:  # test and benchmark hook: this rank runs at 1 / (1 + slow) of its speed
                        time.sleep(self.slow * (time.perf_counter() - t))
                finally:
                    self.stop.idle()
                self._seconds_per_cost.append((time.perf_counter() - t) / max(cost, 1e-9))
                self._put(writes, self._screen(done, held_back))
                if self._write_error:
                    raise self._write_error
            # The rank ends normally: rows held back in a streak of equal failures did fail.
            if held_back:
                self._put(writes, held_back)
            self._put(writes, _END)
        except DeviceFailure:
            raise  # the streak's rows and the unit in hand stay unrecorded: their units are given back
        except BaseException:
            if held_back:
                self._put(writes, held_back)
            raise
        finally:
            feed.close()
            loader.shutdown(wait=True)
            if self.overlap:
                writes.put(None)  # finish what is queued: those rows are computed, keep them
                writer.join()
            self.stats.wall_seconds = time.perf_counter() - started
            self.save_stats()
        if self._write_error:
            raise self._write_error
        return self.stats

    def _put(self, writes: queue.Queue, done: list[Done]) -> None:
        if self.overlap:
            writes.put(done)
        else:
            self._write_batch(done)

    def _expected_seconds(self, cost: float) -> float | None:
        recent = self._seconds_per_cost[-8:]
        return float(sorted(recent)[len(recent) // 2]) * cost if recent else None

    def _screen(self, done: list[Done], held: list[Done]) -> list[Done]:
        """Hold back rows that fail generation the same way in a row; at runtime.max_same_failures of them the
        device (or its environment) is to blame, not the rows: stop this rank, recording none of them."""
        limit = self.settings.runtime.max_same_failures
        out: list[Done] = []
        for o in done:
            failed_in_model = o.error is not None and o.loaded
            if not failed_in_model:
                if o.error is None and held:  # a success: the streak was the rows' own fault
                    out += held
                    held.clear()
                out.append(o)
                continue
            sig = o.error.replace(str(o.row.id), "<id>")
            if held and held[0].signature != sig:
                out += held
                held.clear()
            o.signature = sig
            held.append(o)
            if limit and len(held) >= limit:
                # A shape or value error is the rows' own whenever the device still computes: record them (a rerun
                # would only fail them again), do not stop a working device.
                if is_row_error(sig) and device_answers(self.gen.device):
                    self.log(f"svd-batch: {len(held)} rows in a row failed the same way ({sig}); the device computes "
                             "correctly and the error comes from the rows' values, so they are recorded as failed")
                    out += held
                    held.clear()
                    continue
                raise DeviceFailure(
                    f"{self.stats.device} on host {self.stats.host}: {len(held)} rows in a row failed the same way "
                    f"({sig}), which points at the device or its environment rather than at "
                    "the rows. They are not recorded as failed: the other ranks and the next run do them. Check the "
                    "device (nvidia-smi, dmesg for Xid errors), then run the same command again; raise "
                    "runtime.max_same_failures (0 turns this off) if such rows really are bad."
                )
        return out

    def _warmup(self, shapes: list[tuple[Row, int]]) -> None:
        """Compile before timing rows: every (row shape, batch size) this rank will run, outputs thrown away."""
        self.stats.warmup_seconds = self.gen.warmup(shapes, log=self.log)
        self.log(f"svd-batch: compile warm-up of {len(shapes)} shape(s) took {self.stats.warmup_seconds:.1f} s")

    def _load(self, row: Row) -> tuple[Any, str | None, float, dt.datetime]:
        started_at = _now()
        t = time.perf_counter()
        img = self.settings.images
        try:
            image, row.image_sha256 = load_image_digest(row.image_uri, timeout=img.timeout, max_bytes=img.max_bytes,
                                                        max_pixels=img.max_pixels,
                                                        max_decoded_bytes=self.settings.runtime.max_row_bytes)
            return image, None, time.perf_counter() - t, started_at
        except Exception as exc:  # noqa: BLE001 - whatever one image raises fails its row, never the run
            reason = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
            reason = reason.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a name or server holds
            return None, f"row {row.id}: image {row.image!r}: {reason}", time.perf_counter() - t, started_at

    def _generate(self, rows: list[Row], loaded, ticket: Ticket | None) -> list[Done]:
        """Frames for the rows whose image loaded; a Done for every row."""
        gen = self.gen
        out, images = [], []
        for row, (image, error, load_s, started_at) in zip(rows, loaded):
            out.append(Done(row=row, ticket=ticket, error=error, loaded=error is None, load_seconds=load_s,
                            started_at=started_at, memory_mode=gen.memory_mode,
                            decode_chunk_size=gen.effective_decode_chunk(row.decode_chunk_size)))
            images.append(image)
        todo = [(o, im) for o, im in zip(out, images) if o.error is None]
        if todo:
            t = time.perf_counter()
            outcomes = gen.run([o.row for o, _ in todo], [im for _, im in todo], log=self.log)
            self.stats.pipeline_seconds += time.perf_counter() - t
            for (o, image), res in zip(todo, outcomes):
                o.frames, o.error, o.memory_mode = res.frames, res.error, res.memory_mode
                o.decode_chunk_size, o.batch_size = res.decode_chunk_size, res.batch_size
                o.generate_seconds, o.peak_vram_bytes, o.attention = (res.generate_seconds, res.peak_vram_bytes,
                                                                      res.attention)
                if res.frames is not None:  # for the report and scores; resized by the writer, off this thread
                    o.input_image = image
            self.stats.recompiles_after_warmup = gen.recompiles() if gen.compiled else None
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

    def _write_batch(self, done: list[Done]) -> None:
        # A source that is down is the run's error, not the rows': their records are held back (outage.py), and
        # SourceOutage stops the run if it does not come back. Held rows keep their units in hand.
        rows = self.outage.release() if done is _END else self.outage.screen(
            (o.row.image_uri, None if o.loaded else o.error, o) for o in done)
        for o in rows:
            ticket = o.ticket
            if ticket is not None and self.units.superseded(ticket):
                # Another member took this unit over while this one was paused or cut off: its record stands.
                if ticket not in self._dropped:
                    self._dropped.add(ticket)
                    self.log(f"svd-batch: unit {ticket.unit} was taken over by another process while this one "
                             "was not heard from; its result here is dropped")
            elif not self._write_row(o):
                continue  # given back: its unit stays in hand, unfinished
            if ticket is not None:
                self._pending[ticket] -= 1
                if self._pending[ticket] == 0:
                    del self._pending[ticket]
                    self.units.finished(ticket)

    def _write_row(self, o: Done) -> bool:
        """Write the row's video and record; False when the row is given back instead (see below)."""
        row, s, rd = o.row, self.settings, self.rundir
        t = time.perf_counter()
        status, error, video_path, frames_hash = "failed", o.error, None, None
        scores: dict[str, float | None] = {"motion_score": None, "image_similarity": None, "flicker_score": None}
        if o.frames is not None and o.error is None:
            try:
                frames_hash = frames_sha256(o.frames)
                v = s.video
                write_mp4(o.frames, rd.video_path(row.id), int(row.fps), crf=v.crf, codec=v.codec,
                          pix_fmt=v.pix_fmt, preset=v.preset)
                # The conditioning image as the model saw it: the same resize generate.py does, off the model's thread.
                seen = o.input_image.resize((int(row.width), int(row.height))) if o.input_image is not None else None
                if row.row <= self.thumb_max_row:
                    save_thumbnails(rd.thumb_path(row.id), o.frames, seen)
                if seen is not None:
                    rd.save_input(row.id, seen)
                if s.report.scores:  # from the files just written: what svd-batch-score reads too
                    scores = scores_for_record(rd.video_path(row.id),
                                               rd.input_path(row.id) if seen is not None else None, self.embed)
                status, error, video_path = "ok", None, os.path.relpath(rd.video_path(row.id), rd.root)
            except Exception as exc:  # noqa: BLE001 - e.g. ffmpeg failing on this row
                if is_output_error(exc) or self._folder_refuses_writes():
                    raise output_folder_error(exc, rd.root) from None
                frames_hash, error = None, f"row {row.id}: write failed: {type(exc).__name__}: {first_line(exc)}"
        write_seconds = time.perf_counter() - t
        if status == "failed" and self.stop():
            # A stop signal reaches the whole process group (Ctrl-C, a scheduler): whatever failed after it may
            # have failed because of it. The row is left for the next run instead of recorded failed.
            self.log(f"svd-batch: row {row.id} failed after a stop signal ({error}); left for the next run")
            return False
        record = Record(
            id=row.id, status=status, error=error, video_path=video_path, image=row.image, image_uri=row.image_uri,
            row=row.row, seed=row.seed, fps=row.fps, motion_bucket_id=row.motion_bucket_id,
            noise_aug_strength=row.noise_aug_strength, num_frames=row.num_frames,
            num_inference_steps=row.num_inference_steps, height=row.height, width=row.width,
            min_guidance_scale=row.min_guidance_scale, max_guidance_scale=row.max_guidance_scale,
            decode_chunk_size=o.decode_chunk_size, frames_sha256=frames_hash, image_sha256=row.image_sha256,
            load_seconds=o.load_seconds, generate_seconds=o.generate_seconds, write_seconds=write_seconds,
            total_seconds=o.load_seconds + (o.generate_seconds or 0.0) + write_seconds,
            peak_vram_bytes=o.peak_vram_bytes, peak_host_memory_bytes=peak_host_memory_bytes(),
            memory_mode=o.memory_mode, batch_size=o.batch_size, compiled=s.runtime.compile, attention=o.attention,
            sampler=s.generation.sampler, model=s.model.name, device=str(self.gen.device), rank=self.rank,
            world_size=self.world,
            host=self.stats.host, started_at=o.started_at, finished_at=_now(), **scores)
        try:
            self.parts.add(record)
        except OSError as exc:
            if is_output_error(exc):
                raise output_folder_error(exc, rd.root) from None
            raise
        self.stats.rows += 1
        if record.status == "ok":
            self.stats.ok += 1
            self.stats.ok_seconds.append(record.total_seconds)
        else:
            self.stats.failed += 1
            self.log(f"svd-batch: {record.error}")
        self.units.recorded(self.parts.written, rows=self.stats.rows, ok=self.stats.ok, failed=self.stats.failed)
        self.progress.update(1)
        return True

    def _folder_refuses_writes(self) -> bool:
        """After a failed video write: can the output folder still take a small file? If not, the disk is to
        blame (ffmpeg does not always say so), not the row."""
        probe = os.path.join(self.rundir.videos, f".probe.tmp-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
            return False
        except OSError as exc:
            return is_output_error(exc)
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass

    def save_stats(self) -> None:
        """Statistics are for people: a full disk must not hide the error that stopped the run behind this one."""
        path = self.rundir.stats_path(self.rank)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_text_atomic(self.stats.to_json(), path)
        except OSError as exc:
            self.log(f"svd-batch: could not write {os.path.relpath(path, self.rundir.root)} ({exc})")
