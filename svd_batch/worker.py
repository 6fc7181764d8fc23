"""One rank's share of the work: claimed units -> frames -> videos and records.

The rank asks for the next unit (one row, or one batch) just before the model needs it (feed.py). With overlap
on (the default on CUDA) the next unit is claimed a little ahead, timed so its images have loaded when the model
is free, and the write stage (writer.py) encodes several MP4s at once while one thread records results in order,
with a cap on the videos waiting in memory; with ``runtime.overlap=false`` the same steps run one after the other
in the calling thread. Either way a row counts as done only after its video is in place.

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
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from .atomic import write_text_atomic
from .device_errors import DeviceFailure, device_answers, is_row_error
from .feed import Feed, UnitSource, _Inline
from .fields import Row
from .generate import Generator
from .hooks import slow_factor
from .images import ImageError, load_image_digest
from .ledger import Ticket
from .plan import Plan, with_seed
from .rundir import RunDir
from .scores import pipeline_embedder
from .settings import RunSettings
from .writer import Done, RowWriter


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


class RankWorker:
    def __init__(self, gen: Generator, rundir: RunDir, settings: RunSettings, *, rank: int, world: int, stop,
                 progress, log: Callable[[str], None], thumb_max_row: int = -1, member: str | None = None):
        self.gen, self.rundir, self.settings = gen, rundir, settings
        self.rank, self.world, self.stop, self.progress, self.log = rank, world, stop, progress, log
        overlap = settings.runtime.overlap_setting
        # auto: overlap on GPUs, where the CPU is otherwise idle while the model runs; on CPU the model already
        # uses every core and loader/writer threads would only compete with it (BENCHMARKS.md).
        self.overlap = gen.device.type == "cuda" if overlap is None else overlap
        self.stats = RankStats(rank=rank, world_size=world, host=socket.gethostname(), device=str(gen.device))
        self._seconds_per_cost: list[float] = []
        self.slow = slow_factor(rank)  # test and benchmark hook (hooks.py): an older or throttled GPU
        # Scores embed with the pipeline's own CLIP encoder, where it lives: on the GPU in a GPU run.
        embed = pipeline_embedder(getattr(gen, "pipe", None)) if settings.report.scores else None
        self.writer = RowWriter(rundir, settings, device=str(gen.device), rank=rank, world=world, stats=self.stats,
                                stop=stop, progress=progress, log=log, embed=embed, thumb_max_row=thumb_max_row,
                                member=member)

    @property
    def parts(self):
        return self.writer.parts

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, plan: Plan, units: UnitSource) -> RankStats:
        """Run units of ``plan`` as ``units`` hands them out, until it has none left for this rank."""
        started = time.perf_counter()
        writer = self.writer
        loader = ThreadPoolExecutor(2, thread_name_prefix="load") if self.overlap else _Inline()
        writer.start(units, threaded=self.overlap)
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
                writer.pending[ticket] = len(rows)
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
                writer.put(self._screen(done, held_back))  # waits while runtime.write_queue videos wait
                if writer.error:
                    raise writer.error
            # The rank ends normally: rows held back in a streak of equal failures did fail.
            if held_back:
                writer.put(held_back)
            writer.end()
        except DeviceFailure:
            raise  # the streak's rows and the unit in hand stay unrecorded: their units are given back
        except BaseException:
            if held_back:
                writer.put(held_back)
            raise
        finally:
            feed.close()
            loader.shutdown(wait=True)
            writer.close()  # finish what is queued: those rows are computed, keep them
            self.stats.wall_seconds = time.perf_counter() - started
            self.save_stats()
        if writer.error:
            raise writer.error
        return self.stats

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

    def save_stats(self) -> None:
        """Statistics are for people: a full disk must not hide the error that stopped the run behind this one."""
        path = self.rundir.stats_path(self.rank)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_text_atomic(self.stats.to_json(), path)
        except OSError as exc:
            self.log(f"svd-batch: could not write {os.path.relpath(path, self.rundir.root)} ({exc})")
