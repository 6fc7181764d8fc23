"""Step 4 inside a rank: computed rows -> their files (MP4, input image, thumbnails, scores) -> their records.

With overlap on, ``runtime.writers`` encodes run at once on threads (each ffmpeg is one x264 thread, so one
core each), and at most ``runtime.write_queue`` computed videos wait in memory for theirs: the model waits when
that many do. One thread makes the records, in the order the rows left the model, so the results are the same
whatever the number of writers. A row counts as done (its record written, its unit finished) only after its MP4
is in place: a kill at any moment leaves at most a hidden temporary file, and a video without a record is made
again by the next run. With overlap off every step runs in the calling thread, one row after the other.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import __version__
from .fields import Record, Row
from .images import load_image_digest
from .ledger import Ticket
from .outage import OutageGuard
from .report.sheet import save_thumbnails
from .rundir import PartWriter, RunDir
from .scores import scores_for_record
from .settings import RunSettings
from .util import first_line, peak_host_memory_bytes
from .video import frames_sha256, is_output_error, output_folder_error, recipe_comment, write_mp4

# More encoders than this per rank only add memory: 8 keep up with a GPU several times faster than any the
# benchmarks saw (BENCHMARKS.md, "MP4 encode throughput").
MAX_AUTO_WRITERS = 8


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


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
    files: Future | None = None   # the row's files being written (overlap on): a Files when done


@dataclass
class Files:
    """What writing one row's files gave."""

    status: str
    error: str | None
    video_path: str | None
    frames_sha256: str | None
    scores: dict[str, float | None]
    seconds: float


def cores_per_rank() -> int:
    """The cores this process may use, shared with the other ranks of its node unless the launcher pinned each
    rank to cores of its own (then its affinity is already less than the whole machine)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    if local > 1 and cores >= (os.cpu_count() or cores):
        cores //= local
    return max(1, cores)


def writer_counts(settings: RunSettings, cores: int | None = None) -> tuple[int, int]:
    """(encodes in flight, videos that may wait for one). auto: a core for the model's own thread and the image
    loaders, the others encode; twice as many videos may wait as are encoded, so no encoder idles."""
    r = settings.runtime
    writers = r.writers if isinstance(r.writers, int) else max(1, min(MAX_AUTO_WRITERS, (cores or cores_per_rank()) - 1))
    return writers, (r.write_queue if isinstance(r.write_queue, int) else 2 * writers)


class Slots:
    """At most ``cap`` videos held between the model and their encode; ``take`` blocks while that many are."""

    def __init__(self, cap: int):
        self.cap, self.held, self.peak, self.blocked = cap, 0, 0, False
        self.cond = threading.Condition()

    def take(self) -> None:
        with self.cond:
            while self.held >= self.cap:
                self.blocked = True
                self.cond.notify_all()  # for whoever watches the state (tests)
                self.cond.wait(1.0)  # woken by give; the timeout only keeps a signal to this thread prompt
            self.blocked = False
            self.held += 1
            self.peak = max(self.peak, self.held)
            self.cond.notify_all()

    def give(self) -> None:
        with self.cond:
            self.held -= 1
            self.cond.notify_all()


_END: list = []  # the rank's last batch: rows the outage guard held back are recorded after everything else


class RowWriter:
    """The write stage of one rank (module docstring). ``stats`` is the rank's RankStats (rows, ok, failed)."""

    def __init__(self, rundir: RunDir, settings: RunSettings, *, device: str, rank: int, world: int, stats,
                 stop, progress, log: Callable[[str], None], embed, thumb_max_row: int = -1,
                 member: str | None = None):
        self.rundir, self.settings, self.device, self.rank, self.world = rundir, settings, device, rank, world
        self.stats, self.stop, self.progress, self.log = stats, stop, progress, log
        self.embed, self.thumb_max_row = embed, thumb_max_row
        self.parts = PartWriter(rundir, rank, settings.runtime.results_chunk_rows, member=member)
        self.units: Any = None
        self.pending: dict[Ticket, int] = {}  # rows of each unit in hand not yet recorded (or dropped)
        self.dropped: set[Ticket] = set()
        self.error: BaseException | None = None
        self.threaded = False
        self.writers, self.cap = writer_counts(settings)
        self.slots = Slots(self.cap)
        img = settings.images
        self.outage = OutageGuard(
            lambda uri: load_image_digest(uri, timeout=img.timeout, max_bytes=img.max_bytes,
                                          max_pixels=img.max_pixels),
            failures=img.outage_failures, wait_seconds=img.outage_wait, log=log,
            stopped=lambda: getattr(stop, "signum", None) is not None)
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots: only rows without frames come free
        self._pool: ThreadPoolExecutor | None = None
        self._committer: threading.Thread | None = None

    def start(self, units, threaded: bool) -> None:
        self.units, self.threaded = units, threaded
        if threaded:
            self._pool = ThreadPoolExecutor(self.writers, thread_name_prefix="encode")
            self._committer = threading.Thread(target=self._commit_loop, daemon=True, name="record")
            self._committer.start()

    def put(self, done: list[Done]) -> None:
        """Rows out of the model (or failed before it), in order. Blocks while the write queue is full."""
        if not self.threaded:
            self._write_batch(done)
            return
        try:
            for o in done:
                if o.frames is not None and o.error is None:
                    self.slots.take()
                    o.files = self._pool.submit(self._files_released, o)
        finally:  # stopped while waiting: the rows are computed, the record thread writes the rest itself
            self._queue.put(done)

    def end(self) -> None:
        """The rank's work ended normally: rows still held by the outage guard failed on their own."""
        self.put(_END)

    def close(self) -> None:
        """Finish what is queued (those rows are computed: keep them), then stop the threads."""
        if self._committer is not None:
            self._queue.put(None)
            self._committer.join()
            self._committer = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- the record thread ------------------------------------------------------------------------------------
    def _commit_loop(self) -> None:
        while True:
            done = self._queue.get()
            if done is None:
                return
            if self.error is None:
                try:
                    self._write_batch(done)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the model's thread
                    self.error = exc

    def _write_batch(self, done: list[Done]) -> None:
        # A source that is down is the run's error, not the rows': their records are held back (outage.py), and
        # SourceOutage stops the run if it does not come back. Held rows keep their units in hand.
        rows = self.outage.release() if done is _END else self.outage.screen(
            (o.row.image_uri, None if o.loaded else o.error, o) for o in done)
        for o in rows:
            ticket = o.ticket
            if ticket is not None and self.units.superseded(ticket):
                # Another member took this unit over while this one was paused or cut off: its record stands.
                if ticket not in self.dropped:
                    self.dropped.add(ticket)
                    self.log(f"svd-batch: unit {ticket.unit} was taken over by another process while this one "
                             "was not heard from; its result here is dropped")
            elif not self._record(o):
                continue  # given back: its unit stays in hand, unfinished
            if ticket is not None:
                self.pending[ticket] -= 1
                if self.pending[ticket] == 0:
                    del self.pending[ticket]
                    self.units.finished(ticket)

    # -- one row's files ----------------------------------------------------------------------------------------
    def _files_released(self, o: Done) -> Files | None:
        try:
            return None if self.error is not None else self._files(o)
        finally:
            o.frames = o.input_image = None  # what the slot stood for
            self.slots.give()

    def _files(self, o: Done) -> Files:
        row, s, rd = o.row, self.settings, self.rundir
        t = time.perf_counter()
        status, error, video_path, frames_hash = "failed", o.error, None, None
        scores: dict[str, float | None] = {"motion_score": None, "image_similarity": None, "flicker_score": None}
        if o.frames is not None and o.error is None:
            try:
                frames_hash = frames_sha256(o.frames)
                v = s.video
                # With scores on, the same ffmpeg decodes what it wrote: the frames any reader of the file gets.
                decoded = write_mp4(o.frames, rd.video_path(row.id), int(row.fps), crf=v.crf, codec=v.codec,
                                    pix_fmt=v.pix_fmt, preset=v.preset, comment=recipe_comment(self.recipe(row)),
                                    decode=s.report.scores)
                # The conditioning image as the model saw it: the same resize generate.py does, off the model's thread.
                seen = o.input_image.resize((int(row.width), int(row.height))) if o.input_image is not None else None
                if row.row <= self.thumb_max_row:
                    save_thumbnails(rd.thumb_path(row.id), o.frames, seen)
                if seen is not None:
                    rd.save_input(row.id, seen)
                if s.report.scores:  # from the files just written: what svd-batch-score reads too
                    scores = scores_for_record(rd.video_path(row.id),
                                               rd.input_path(row.id) if seen is not None else None, self.embed,
                                               decoded)
                status, error, video_path = "ok", None, os.path.relpath(rd.video_path(row.id), rd.root)
            except Exception as exc:  # noqa: BLE001 - e.g. ffmpeg failing on this row
                if is_output_error(exc) or self._folder_refuses_writes():
                    raise output_folder_error(exc, rd.root) from None
                frames_hash, error = None, f"row {row.id}: write failed: {type(exc).__name__}: {first_line(exc)}"
        return Files(status, error, video_path, frames_hash, scores, time.perf_counter() - t)

    def recipe(self, row: Row) -> dict[str, Any]:
        """What the MP4 carries of how it was made: enough to make it again from the image."""
        s = self.settings
        return {"id": row.id, "seed": row.seed, "model": s.model.name,
                "sampler": s.generation.sampler,
                "num_inference_steps": row.num_inference_steps, "height": row.height, "width": row.width,
                "num_frames": row.num_frames, "fps": row.fps, "motion_bucket_id": row.motion_bucket_id,
                "noise_aug_strength": row.noise_aug_strength, "min_guidance_scale": row.min_guidance_scale,
                "max_guidance_scale": row.max_guidance_scale, "svd_batch": __version__}

    def _folder_refuses_writes(self) -> bool:
        """After a failed video write: can the output folder still take a small file? If not, the disk is to
        blame (ffmpeg does not always say so), not the row."""
        probe = os.path.join(self.rundir.videos, f".probe.tmp-{os.getpid()}-{threading.get_ident()}")
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

    # -- one row's record ---------------------------------------------------------------------------------------
    def _record(self, o: Done) -> bool:
        """Record the row (its files written first); False when the row is given back instead (see below)."""
        row, s, stats = o.row, self.settings, self.stats
        files = o.files.result() if o.files is not None else self._files(o)
        if files is None:  # skipped after an error of the stage: nothing is recorded any more
            return False
        if files.status == "failed" and self.stop():
            # A stop signal reaches the whole process group (Ctrl-C, a scheduler): whatever failed after it may
            # have failed because of it. The row is left for the next run instead of recorded failed.
            self.log(f"svd-batch: row {row.id} failed after a stop signal ({files.error}); left for the next run")
            return False
        record = Record(
            id=row.id, status=files.status, error=files.error, video_path=files.video_path, image=row.image,
            image_uri=row.image_uri, row=row.row, seed=row.seed, fps=row.fps, motion_bucket_id=row.motion_bucket_id,
            noise_aug_strength=row.noise_aug_strength, num_frames=row.num_frames,
            num_inference_steps=row.num_inference_steps, height=row.height, width=row.width,
            min_guidance_scale=row.min_guidance_scale, max_guidance_scale=row.max_guidance_scale,
            decode_chunk_size=o.decode_chunk_size, frames_sha256=files.frames_sha256, image_sha256=row.image_sha256,
            load_seconds=o.load_seconds, generate_seconds=o.generate_seconds, write_seconds=files.seconds,
            total_seconds=o.load_seconds + (o.generate_seconds or 0.0) + files.seconds,
            peak_vram_bytes=o.peak_vram_bytes, peak_host_memory_bytes=peak_host_memory_bytes(),
            memory_mode=o.memory_mode, batch_size=o.batch_size, compiled=s.runtime.compile, attention=o.attention,
            sampler=s.generation.sampler, model=s.model.name, device=self.device, rank=self.rank,
            world_size=self.world, host=stats.host, started_at=o.started_at, finished_at=_now(), **files.scores)
        try:
            self.parts.add(record)
        except OSError as exc:
            if is_output_error(exc):
                raise output_folder_error(exc, self.rundir.root) from None
            raise
        stats.rows += 1
        if record.status == "ok":
            stats.ok += 1
            stats.ok_seconds.append(record.total_seconds)
        else:
            stats.failed += 1
            self.log(f"svd-batch: {record.error}")
        self.units.recorded(self.parts.written, rows=stats.rows, ok=stats.ok, failed=stats.failed)
        self.progress.update(1)
        return True
