"""One rank's share of the work: claimed units -> frames -> videos and records.

The rank asks for the next unit (one row, or one batch) just before the model needs it. With overlap on
(the default on CUDA) the next unit is claimed a little ahead, timed so its images have loaded when the
model is free, and one writer thread encodes MP4s, hashes frames and records results (bounded queue); with
``runtime.overlap=false`` the same steps run one after the other in the calling thread. Either way the
writer is the only thread that records results, so a row counts as done only after its video is in place.

What the rank does about failures: a bad row is recorded failed and the run goes on; an error that breaks
the device (or ``runtime.max_same_failures`` rows in a row failing the same way) stops this rank without
recording its unfinished rows (DeviceFailure); an error of the output folder (disk full) stops the run
(OutputFolderError), again without blaming any row.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from .fields import CONDITIONING_FIELDS
from .gallery import save_thumbnails
from .device_errors import device_answers, is_row_error
from .generate import DeviceFailure, Generator
from .images import ImageError, load_image_digest
from .ledger import Ticket
from .outage import OutageGuard
from .plan import Plan, row_cost, with_seed
from .rundir import PartWriter, RunDir, write_text_atomic
from .scores import pipeline_embedder, save_input_image, scores_for_record
from .settings import WorkerSettings
from .util import first_line, peak_host_memory_bytes
from .write import frames_sha256, is_output_error, output_folder_error, write_mp4


# The rank's last batch: rows the outage guard held back below its threshold are recorded after everything else.
_END: list = []


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


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


class Feed:
    """Units for one rank, claimed as late as the model allows; images load only for claimed units.

    Without lookahead a unit is claimed when the model asks for it. With lookahead (overlap on), ``arm`` is
    called as the model starts a unit, with the seconds that unit is expected to take; the next unit is claimed
    when about twice its expected image-loading time is left, so its images are ready when the model is free,
    and at the end of a run no rank sits on claimed rows while others idle. Claiming ahead never waits: at the
    end of a job only the model's own request waits for units that lost members may leave behind."""

    def __init__(self, plan: Plan, units: "UnitSource", load: Callable[[list], list[Future]],
                 *, base_seed: int, lookahead: bool):
        self.plan, self.units, self.load = plan, units, load
        self.base_seed, self.lookahead = base_seed, lookahead
        self._lock = threading.Lock()
        self._ahead: tuple | None = None
        self._exhausted = False
        self._timer: threading.Timer | None = None
        self._load_seconds: list[float] = []

    def _claim(self, wait: bool) -> tuple | None:
        if self._exhausted:
            return None
        ticket = self.units.next_unit(wait)
        if ticket is None:
            self._exhausted = wait
            return None
        table = self.plan.unit(ticket.unit)
        rows = [with_seed(r, self.base_seed) for r in table.to_pylist()]
        t = time.perf_counter()
        futures = self.load(rows)
        if self.lookahead:
            for f in futures:
                f.add_done_callback(lambda _f, t=t: self._load_seconds.append(time.perf_counter() - t))
        return ticket, rows, futures, float(row_cost(table).sum())

    def next(self) -> tuple | None:
        """(ticket, rows, image futures, estimated cost) of the next unit, or None when this rank is done."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            item, self._ahead = self._ahead, None
            return item if item is not None else self._claim(wait=True)

    def arm(self, expected_seconds: float | None) -> None:
        if not self.lookahead or self._exhausted:
            return
        load = float(np.median(self._load_seconds[-16:])) if self._load_seconds else 0.0
        delay = 0.0 if expected_seconds is None else max(0.0, expected_seconds - 2.0 * load - 0.05)
        self._timer = threading.Timer(delay, self._claim_ahead)
        self._timer.daemon = True
        self._timer.start()

    def _claim_ahead(self) -> None:
        with self._lock:
            if self._ahead is None:
                self._ahead = self._claim(wait=False)

    def close(self) -> None:
        """Cancel the claimed-ahead unit's loads; the unit itself stays held until the rank leaves (then it is
        given back)."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._ahead is not None:
                for f in self._ahead[2]:
                    f.cancel()
                self._ahead = None


class UnitSource:
    """Where a worker's units come from and go back to (the executor; tests use a plain list)."""

    def next_unit(self, wait: bool) -> Ticket | None:
        raise NotImplementedError

    def superseded(self, ticket: Ticket) -> bool:
        return False

    def finished(self, ticket: Ticket) -> None:
        pass

    def recorded(self, parts: dict[str, int], **counts: int) -> None:
        pass


class ListSource(UnitSource):
    """Units handed out from a list, for one process without a run folder protocol (tests)."""

    def __init__(self, units):
        self._it = iter(units)

    def next_unit(self, wait: bool) -> Ticket | None:
        u = next(self._it, None)
        return None if u is None else Ticket(int(u))


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


class RankWorker:
    def __init__(self, gen: Generator, rundir: RunDir, settings: WorkerSettings, *, rank: int, world: int, stop,
                 progress, log: Callable[[str], None], thumb_max_row: int = -1, member: str | None = None):
        self.gen, self.rundir, self.settings = gen, rundir, settings
        self.rank, self.world, self.stop, self.progress, self.log = rank, world, stop, progress, log
        self.batch_size = settings.batch_size
        # auto: overlap on GPUs, where the CPU is otherwise idle while the model runs; on CPU the model already
        # uses every core and loader/writer threads would only compete with it (BENCHMARKS.md).
        self.overlap = gen.device.type == "cuda" if settings.overlap is None else settings.overlap
        self.parts = PartWriter(rundir, rank, settings.results_chunk_rows, member=member)
        self.units: UnitSource = UnitSource()
        self._pending: dict[Ticket, int] = {}  # rows of each unit in hand not yet recorded (or dropped)
        self._dropped: set[Ticket] = set()
        self.stats = RankStats(rank=rank, world_size=world, host=socket.gethostname(), device=str(gen.device))
        self._write_error: BaseException | None = None
        self._seconds_per_cost: list[float] = []
        # SVD_BATCH_INJECT_SLOW="<rank>:<factor>": that rank idles factor x its generation time after each unit,
        # standing in for an older GPU or a throttled one in tests and benchmarks.
        slow = dict(x.split(":") for x in filter(None, os.environ.get("SVD_BATCH_INJECT_SLOW", "").split(",")))
        self.slow = float(slow.get(str(rank), 0.0))
        self.thumb_max_row = thumb_max_row
        self.scores = settings.scores
        self.embed = pipeline_embedder(getattr(gen, "pipe", None)) if self.scores else None
        self.outage = OutageGuard(
            lambda uri: load_image_digest(uri, timeout=settings.image_timeout, max_bytes=settings.image_max_bytes,
                                          max_pixels=settings.image_max_pixels),
            failures=settings.outage_failures, wait_seconds=settings.outage_wait, log=log,
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
        feed = Feed(plan, units, lambda rows: [loader.submit(self._load, r) for r in rows],
                    base_seed=self.settings.base_seed, lookahead=self.overlap)
        held_back: list[dict[str, Any]] = []
        try:
            while True:
                item = feed.next()
                if item is None:
                    break
                ticket, rows, futures, cost = item
                self._pending[ticket] = len(rows)
                self.stats.units += 1
                if self.settings.compile and not self.stats.warmup_seconds:
                    # Any rank may claim any unit: warm up every (shape, unit size) of the plan.
                    self._warmup([(with_seed(plan.todo.slice(first, 1).to_pylist()[0], self.settings.base_seed), n)
                                  for first, n in plan.shapes()])
                expected = self._expected_seconds(cost)
                # A stop signal now lets this unit finish only if it fits the grace period (StopFlag).
                self.stop.busy(expected)
                try:
                    loaded = [f.result() for f in futures]
                    feed.arm(expected)
                    t = time.perf_counter()
                    done = self._generate(rows, loaded)
                    if self.slow:  # test and benchmark hook: this rank runs at 1 / (1 + slow) of its speed
                        time.sleep(self.slow * (time.perf_counter() - t))
                finally:
                    self.stop.idle()
                self._seconds_per_cost.append((time.perf_counter() - t) / max(cost, 1e-9))
                for o in done:
                    o["ticket"] = ticket
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

    def _put(self, writes: queue.Queue, done: list[dict[str, Any]]) -> None:
        if self.overlap:
            writes.put(done)
        else:
            self._write_batch(done)

    def _expected_seconds(self, cost: float) -> float | None:
        recent = self._seconds_per_cost[-8:]
        return float(sorted(recent)[len(recent) // 2]) * cost if recent else None

    def _screen(self, done: list[dict[str, Any]], held: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Hold back rows that fail generation the same way in a row; at runtime.max_same_failures of them the
        device (or its environment) is to blame, not the rows: stop this rank, recording none of them."""
        limit = self.settings.max_same_failures
        out: list[dict[str, Any]] = []
        for o in done:
            failed_in_model = o["error"] is not None and o.get("loaded", False)
            if not failed_in_model:
                if o["error"] is None and held:  # a success: the streak was the rows' own fault
                    out += held
                    held.clear()
                out.append(o)
                continue
            sig = o["error"].replace(str(o["row"]["id"]), "<id>")
            if held and held[0]["signature"] != sig:
                out += held
                held.clear()
            o["signature"] = sig
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

    def _warmup(self, shapes: list[tuple[dict[str, Any], int]]) -> None:
        """Compile before timing rows: every (row shape, batch size) this rank will run, outputs thrown away."""
        self.stats.warmup_seconds = self.gen.warmup(shapes, log=self.log)
        self.log(f"svd-batch: compile warm-up of {len(shapes)} shape(s) took {self.stats.warmup_seconds:.1f} s")

    def _load(self, row: dict[str, Any]) -> tuple[Any, str | None, float, dt.datetime]:
        started_at = _now()
        t = time.perf_counter()
        s = self.settings
        try:
            image, row["image_sha256"] = load_image_digest(row["image_uri"], timeout=s.image_timeout,
                                                           max_bytes=s.image_max_bytes, max_pixels=s.image_max_pixels,
                                                           max_decoded_bytes=s.max_row_bytes)
            return image, None, time.perf_counter() - t, started_at
        except Exception as exc:  # noqa: BLE001 - whatever one image raises fails its row, never the run
            reason = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
            reason = reason.replace("\r", "\\r").replace("\n", "\\n")  # one line, whatever a name or server holds
            return None, f"row {row['id']}: image {row['image']!r}: {reason}", time.perf_counter() - t, started_at

    def _generate(self, rows, loaded) -> list[dict[str, Any]]:
        """Frames for the rows whose image loaded; a record skeleton for every row."""
        gen = self.gen
        out = []
        for row, (image, error, load_s, started_at) in zip(rows, loaded):
            out.append({"row": row, "image": image, "error": error, "loaded": error is None,
                        "load_seconds": load_s, "started_at": started_at,
                        "frames": None, "memory_mode": gen.memory_mode,
                        "decode_chunk_size": gen.effective_decode_chunk(row["decode_chunk_size"])})
        todo = [o for o in out if o["error"] is None]
        if todo:
            t = time.perf_counter()
            outcomes = gen.run([o["row"] for o in todo], [o["image"] for o in todo], log=self.log)
            self.stats.pipeline_seconds += time.perf_counter() - t
            for o, res in zip(todo, outcomes):
                o.update(frames=res.frames, error=res.error, memory_mode=res.memory_mode,
                         decode_chunk_size=res.decode_chunk_size, batch_size=res.batch_size,
                         generate_seconds=res.generate_seconds, peak_vram_bytes=res.peak_vram_bytes,
                         attention=res.attention)
            self.stats.recompiles_after_warmup = gen.recompiles() if gen.compiled else None
        for o in out:
            if o["image"] is not None and o["frames"] is not None:  # for gallery and scores; resized by the writer
                o["input_image"] = o["image"]
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
        # A source that is down is the run's error, not the rows': their records are held back (outage.py), and
        # SourceOutage stops the run if it does not come back. Held rows keep their units in hand.
        rows = self.outage.release() if done is _END else self.outage.screen(
            (o["row"]["image_uri"], None if o["loaded"] else o["error"], o) for o in done)
        for o in rows:
            ticket = o["ticket"]
            if self.units.superseded(ticket):
                # Another member took this unit over while this one was paused or cut off: its record stands.
                if ticket not in self._dropped:
                    self._dropped.add(ticket)
                    self.log(f"svd-batch: unit {ticket.unit} was taken over by another process while this one "
                             "was not heard from; its result here is dropped")
            else:
                self._write_row(o)
            self._pending[ticket] -= 1
            if self._pending[ticket] == 0:
                del self._pending[ticket]
                self.units.finished(ticket)

    def _write_row(self, o: dict[str, Any]) -> None:
        row, s = o["row"], self.settings
        record: dict[str, Any] = {
            "id": row["id"], "image": row["image"], "image_uri": row["image_uri"], "row": row["row"],
            "seed": row["seed"],
            **{f: row[f] for f in CONDITIONING_FIELDS},
            "decode_chunk_size": o["decode_chunk_size"], "memory_mode": o["memory_mode"],
            "batch_size": o.get("batch_size"), "compiled": s.compile, "model": s.model_name,
            "attention": o.get("attention"),
            "device": str(self.gen.device), "rank": self.rank, "world_size": self.world,
            "host": self.stats.host, "started_at": o["started_at"], "load_seconds": o["load_seconds"],
            "generate_seconds": o.get("generate_seconds"), "peak_vram_bytes": o.get("peak_vram_bytes"),
            "image_sha256": row.get("image_sha256"),
        }
        t = time.perf_counter()
        if o["frames"] is not None and o["error"] is None:
            try:
                record["frames_sha256"] = frames_sha256(o["frames"])
                write_mp4(o["frames"], self.rundir.video_path(row["id"]), int(row["fps"]), crf=s.video_crf,
                          codec=s.video_codec, pix_fmt=s.video_pix_fmt, preset=s.video_preset)
                # The conditioning image as the model saw it: the same resize generate.py does, off the model's thread.
                seen = o["input_image"].resize((int(row["width"]), int(row["height"]))) if o.get("input_image") is not None else None
                if row["row"] <= self.thumb_max_row:
                    save_thumbnails(self.rundir.root, row["id"], o["frames"], seen)
                if seen is not None:
                    save_input_image(self.rundir.root, row["id"], seen)
                if self.scores:
                    record.update(scores_for_record(self.rundir.root, row, self.embed))  # from the files just written
                record.update(status="ok", error=None, video_path=f"videos/{row['id']}.mp4")
            except Exception as exc:  # noqa: BLE001 - e.g. ffmpeg failing on this row
                if is_output_error(exc) or self._folder_refuses_writes():
                    raise output_folder_error(exc, self.rundir.root) from None
                record.update(status="failed", frames_sha256=None,
                              error=f"row {row['id']}: write failed: {type(exc).__name__}: {first_line(exc)}")
        else:
            record.update(status="failed", error=o["error"])
        record["write_seconds"] = time.perf_counter() - t
        record["total_seconds"] = sum(record.get(k) or 0.0 for k in ("load_seconds", "generate_seconds", "write_seconds"))
        record["finished_at"] = _now()
        record["peak_host_memory_bytes"] = peak_host_memory_bytes()
        try:
            self.parts.add(record)
        except OSError as exc:
            if is_output_error(exc):
                raise output_folder_error(exc, self.rundir.root) from None
            raise
        self.stats.rows += 1
        if record["status"] == "ok":
            self.stats.ok += 1
            self.stats.ok_seconds.append(record["total_seconds"])
        else:
            self.stats.failed += 1
            self.log(f"svd-batch: {record['error']}")
        self.units.recorded(self.parts.written, rows=self.stats.rows, ok=self.stats.ok, failed=self.stats.failed)
        self.progress.update(1)

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
        try:
            os.makedirs(os.path.join(self.rundir.root, "stats"), exist_ok=True)
            write_text_atomic(self.stats.to_json(),
                              os.path.join(self.rundir.root, "stats", f"rank-{self.rank:05d}.json"))
        except OSError as exc:
            self.log(f"svd-batch: could not write stats/rank-{self.rank:05d}.json ({exc})")
