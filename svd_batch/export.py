"""``svd-batch-export RUN_DIR --to DEST --format webdataset|parquet``: a run's finished rows as the shards training
pipelines read, in any folder or store.

What DEST holds::

    shard-000000.tar, shard-000000.parquet   webdataset: <key>.mp4, <key>.json, <key>.jpg per sample; the sidecar
                                             holds the shard's rows (key + every results column)
    data/train-000000.parquet                parquet: video and input_image (datasets' Video and Image), results columns
    .svd-batch-export/export.json            format and run of this export
    .svd-batch-export/index/shard-NNNNNN.parquet   per shard: id, key, frames_sha256, the video's size and mtime
    .svd-batch-export/index.parquet          the pieces folded together at the end of each export (fewer reads)

A shard counts once its data file is in place, and it is put there last, after its index piece (and sidecar):
an export killed at any point leaves no shard counted that is not whole, and the same command continues with
the shard it was writing (same number, same rows). Later exports of the same run add shards for rows not in any
counted shard and never rewrite one. A row exported before whose video has been remade since (overwrite=true:
another frames_sha256, or another file) is named in a warning and not exported twice. Memory holds one sample
(or one Parquet row group) of the shard in hand, a batch of results rows, and the index (about 100 bytes a row).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import __version__, ownership
from .export_shards import ParquetShard, Sample, TarShard, sample_key
from .export_store import Dest, ExportError
from .hooks import pause_here
from .rundir import RunDir

STATE_DIR = ".svd-batch-export"
INDEX_DIR = f"{STATE_DIR}/index"
INDEX_FILE = f"{STATE_DIR}/index.parquet"
EXPORT_JSON = f"{STATE_DIR}/export.json"
FORMATS = ("webdataset", "parquet")
DEFAULT_SHARD_BYTES = {"webdataset": 2 << 30, "parquet": 500 << 20}  # the Hub's datasets keep Parquet files <= 500 MB
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("key", pa.string()), ("shard", pa.int64()),
                          ("frames_sha256", pa.string()), ("video_size", pa.int64()), ("video_mtime_ns", pa.int64())])
_DATA = {"webdataset": re.compile(r"^shard-(\d{6})\.tar$"), "parquet": re.compile(r"^train-(\d{6})\.parquet$")}
_PIECE = re.compile(r"^shard-(\d{6})\.parquet$")
SCAN_ROWS, READ_ROWS = 8192, 256


def data_name(fmt: str, n: int) -> str:
    return f"shard-{n:06d}.tar" if fmt == "webdataset" else f"data/train-{n:06d}.parquet"


@dataclass
class Summary:
    shards: int = 0            # written by this export
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    total_shards: int = 0      # at DEST now
    total_samples: int = 0
    changed: list[str] = field(default_factory=list)  # exported before, video remade since: not exported again
    missing: list[str] = field(default_factory=list)  # ok rows whose video could not be read: not exported


class Stopped(Exception):
    """A stop signal: the shard in hand was abandoned (nothing of it counts)."""


def run_identity(rd: RunDir) -> str:
    """Which run made the folder: its owner marker (a moved folder is the same run), else its path."""
    try:
        with open(os.path.join(rd.root, ownership.MARKER)) as f:
            owner = json.load(f)
        return f"{owner.get('host')}@{owner.get('created_at')}"
    except (OSError, ValueError):
        return rd.root


def _check_meta(dest: Dest, fmt: str, rd: RunDir) -> None:
    meta = json.loads(dest.read_bytes(EXPORT_JSON)) if dest.exists(EXPORT_JSON) else None
    ident = run_identity(rd)
    if meta is None:
        dest.write_bytes(EXPORT_JSON, json.dumps({"format": fmt, "run_dir": rd.root, "run_id": ident,
                                                  "svd_batch_version": __version__,
                                                  "created_at": dt.datetime.now(dt.timezone.utc).isoformat()},
                                                 indent=2).encode())
        return
    if meta.get("format") != fmt:
        raise ExportError(f"{dest.url} holds a {meta.get('format')} export, and this command asks for --format {fmt}. "
                          f"Export each format to its own --to, or pass --format {meta.get('format')} to add to it.")
    if meta.get("run_id") != ident:
        raise ExportError(f"{dest.url} holds the export of another run ({meta.get('run_dir')}), not of {rd.root}: "
                          "their ids could collide. Export each run to its own --to.")


def load_index(dest: Dest, fmt: str) -> tuple[pa.Table, set[int], bool]:
    """The index rows of every counted shard (its data file is in place), the counted shard numbers, and whether
    pieces not yet folded into index.parquet were read."""
    folder = os.path.dirname(data_name(fmt, 0))
    counted = {int(m.group(1)) for name in dest.names(folder) if (m := _DATA[fmt].match(name))}
    tables, covered, pieces = [], set(), 0
    if dest.exists(INDEX_FILE):
        t = dest.read_table(INDEX_FILE)
        covered = set(pc.unique(t["shard"]).to_pylist())
        tables.append(t.filter(pc.is_in(t["shard"], value_set=pa.array(sorted(counted), pa.int64()))))
    for name in sorted(dest.names(INDEX_DIR)):
        m = _PIECE.match(name)
        if m and int(m.group(1)) in counted and int(m.group(1)) not in covered:
            tables.append(dest.read_table(f"{INDEX_DIR}/{name}"))
            pieces += 1
    index = pa.concat_tables([t.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA) for t in tables]) if tables \
        else INDEX_SCHEMA.empty_table()
    return index, counted, pieces > 0


def _stat(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def plan(pf: pq.ParquetFile, index: pa.Table, root: str, summary: Summary) -> np.ndarray:
    """Which results rows to export (ok, in no counted shard); rows exported before whose video changed since go
    to ``summary.changed``. Reads only four columns, SCAN_ROWS at a time."""
    todo = np.zeros(pf.metadata.num_rows, bool)
    offset = 0
    for b in pf.iter_batches(batch_size=SCAN_ROWS, columns=["id", "status", "video_path", "frames_sha256"]):
        n = b.num_rows
        ok = pc.fill_null(pc.equal(b["status"], "ok"), False).to_numpy(zero_copy_only=False)
        pos = pc.fill_null(pc.index_in(b["id"], value_set=index["id"]), -1).to_numpy(zero_copy_only=False)
        todo[offset:offset + n] = ok & (pos < 0)
        old = np.flatnonzero(ok & (pos >= 0))
        if len(old):
            was = index.take(pa.array(pos[old])).select(["frames_sha256", "video_size", "video_mtime_ns"]).to_pydict()
            now = b.select(["id", "video_path", "frames_sha256"]).take(pa.array(old)).to_pydict()
            for k, rid in enumerate(now["id"]):
                vp = now["video_path"][k]
                file = _stat(os.path.join(root, vp)) if vp else None
                if (now["frames_sha256"][k] != was["frames_sha256"][k]
                        or (file is not None and file != (was["video_size"][k], was["video_mtime_ns"][k]))):
                    summary.changed.append(rid)
        offset += n
    return todo


def _read(path: str) -> tuple[bytes, os.stat_result]:
    with open(path, "rb") as f:
        return f.read(), os.fstat(f.fileno())


class _Open:
    """The shard being written: its writer inside Dest.writing (put in place on commit, dropped on abandon)."""

    def __init__(self, dest: Dest, fmt: str, n: int, schema: pa.Schema):
        self.dest, self.fmt, self.n = dest, fmt, n
        self.stack = contextlib.ExitStack()
        local = self.stack.enter_context(dest.writing(data_name(fmt, n)))
        self.writer = (TarShard if fmt == "webdataset" else ParquetShard)(local, schema)
        self.index: list[dict] = []

    def commit(self) -> int:
        self.writer.close()
        size = self.writer.bytes_written()
        self.table = pa.Table.from_pylist(self.index, schema=INDEX_SCHEMA)
        self.index = []
        self.dest.write_table(f"{INDEX_DIR}/shard-{self.n:06d}.parquet", self.table)
        sidecar = self.writer.sidecar()
        if sidecar is not None:
            self.dest.write_table(f"shard-{self.n:06d}.parquet", sidecar)
        self.stack.close()  # the data file goes in place last: from now on the shard counts
        return size

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
        self.stack.__exit__(Stopped, Stopped(), None)


def export(run_dir: str, to: str, fmt: str = "webdataset", *, shard_size: int = 1000, shard_bytes: int | None = None,
           tmp_dir: str | None = None, progress: bool | None = None,
           stopped: Callable[[], bool] = lambda: False) -> Summary:
    """Export the run's ok rows not yet at ``to`` (see the module docstring). Raises ExportError (its ``code``) or
    Stopped; rows that could not be read are in ``Summary.missing``."""
    from tqdm import tqdm

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    if shard_size < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ExportError("--shard-size and --shard-bytes must be at least 1")
    shard_bytes = shard_bytes or DEFAULT_SHARD_BYTES[fmt]
    rd = RunDir(run_dir)
    if not os.path.isfile(rd.results_path):
        raise ExportError(f"{run_dir} has no results.parquet, so there is nothing to export. Point it at the "
                          "output.dir of a run; an interrupted run writes results.parquet when its command is run "
                          "again (it resumes), or svd-batch-report completes it.")
    started = time.perf_counter()
    summary = Summary()
    dest = Dest(to, tmp_dir)
    dest.prepare()
    with _dest_lock(dest):
        dest.sweep(["", "data", STATE_DIR, INDEX_DIR])
        _check_meta(dest, fmt, rd)
        index, counted, pieces = load_index(dest, fmt)
        with pa.OSFile(rd.results_path, "rb") as handle:  # one open file: a run may replace results.parquet meanwhile
            pf = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)  # streamed: a page at a time
            todo = plan(pf, index, rd.root, summary)
            schema = pa.schema(list(pf.schema_arrow))  # without pandas' metadata
            new = _write(pf, todo, schema, rd, dest, fmt, max(counted, default=-1) + 1, shard_size, shard_bytes,
                         summary, stopped, tqdm(total=int(todo.sum()), unit="sample", desc="export",
                                                disable=None if progress is None else not progress))
        if new or pieces:
            index = pa.concat_tables([index, *new]).combine_chunks()
            dest.write_table(INDEX_FILE, index)
        dest.sync()
    summary.total_shards = len(counted) + summary.shards
    summary.total_samples = index.num_rows
    summary.seconds = time.perf_counter() - started
    return summary


def _write(pf: pq.ParquetFile, todo: np.ndarray, schema: pa.Schema, rd: RunDir, dest: Dest, fmt: str, n: int,
           shard_size: int, shard_bytes: int, summary: Summary, stopped: Callable[[], bool], bar) -> list[pa.Table]:
    """Pack the rows marked in ``todo`` into shards n, n+1, ...; returns their index rows (a table per shard)."""
    shard: _Open | None = None
    new: list[pa.Table] = []
    offset = 0
    try:
        for b in pf.iter_batches(batch_size=READ_ROWS):
            sel = todo[offset:offset + b.num_rows]
            offset += b.num_rows
            if not sel.any():
                continue
            for row in b.filter(pa.array(sel)).to_pylist():
                if stopped():
                    raise Stopped
                rid = row["id"]
                try:
                    video, st = _read(os.path.join(rd.root, row["video_path"] or ""))
                except OSError:
                    summary.missing.append(rid)
                    continue
                try:
                    image = _read(rd.input_path(rid))[0]
                except OSError:
                    image = None
                s = Sample(row, sample_key(rid), video, image, st.st_mtime)
                if shard is not None and (shard.writer.count >= shard_size
                                          or shard.writer.bytes_written() + s.size > shard_bytes):
                    summary.bytes += shard.commit()
                    summary.shards += 1
                    new.append(shard.table)
                    shard, n = None, n + 1
                if shard is None:
                    shard = _Open(dest, fmt, n, schema)
                shard.writer.add(s)
                shard.index.append({"id": rid, "key": s.key, "shard": n, "frames_sha256": row["frames_sha256"],
                                    "video_size": st.st_size, "video_mtime_ns": st.st_mtime_ns})
                if shard.writer.count == 2:
                    pause_here(f"export:{n}")  # test hook: an export stopped half-way through shard n
                summary.samples += 1
                bar.update(1)
        if shard is not None:
            if stopped():
                raise Stopped
            summary.bytes += shard.commit()
            summary.shards += 1
            new.append(shard.table)
            shard = None
    except BaseException:
        if shard is not None:
            shard.abandon()
            summary.samples -= shard.writer.count
        raise
    finally:
        bar.close()
    return new


@contextlib.contextmanager
def _dest_lock(dest: Dest):
    """One export at a time into a local folder (flock); a store has no locks: run one export per DEST."""
    if dest.remote:
        yield
        return
    import fcntl

    os.makedirs(dest.path(STATE_DIR), exist_ok=True)
    fd = os.open(dest.path(f"{STATE_DIR}/lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ExportError(f"Another svd-batch-export is writing to {dest.root}. Wait for it to finish; running "
                              "the same command afterwards adds whatever it did not export.") from None
        yield
    finally:
        os.close(fd)
