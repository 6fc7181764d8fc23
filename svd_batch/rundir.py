"""The run folder: where each rank records finished rows, and how a later start finds them again.

Layout under ``output.dir``::

    videos/<id>.mp4            one per finished row, renamed into place only when complete
    results.parquet            one row per manifest row that has a record, merged at the end of a run
    config.yaml                the resolved config of the latest start
    .svd-batch/run.json        what finished videos depend on (config fingerprint, model identity)
    .svd-batch/lock            held (flock) by rank 0 for the whole run
    .svd-batch/records.parquet every record ever made here, merged (the resume state)
    .svd-batch/parts/*.parquet records written since the last merge, per rank, each file written whole

Each rank appends its finished rows to its own part file and rewrites that small file under a temporary
name, then renames it over the old one after every row: a row counts as done exactly when its record is
in a part, and a reader never sees a half-written file. Resume reads one listing of ``parts/`` and a
few Parquet files, never a stat per row.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import socket
import time
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path
from .fields import CONDITIONING_FIELDS, INT_FIELDS

STATE = ".svd-batch"

RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("video_path", pa.string()),
        ("image", pa.string()),
        ("row", pa.int64()),
        ("seed", pa.int64()),
        *[(f, pa.int64() if f in INT_FIELDS else pa.float64()) for f in CONDITIONING_FIELDS],
        ("frames_sha256", pa.string()),
        ("image_sha256", pa.string()),  # of the encoded image bytes the row was made from (see images.py)
        ("load_seconds", pa.float64()),
        ("generate_seconds", pa.float64()),
        ("write_seconds", pa.float64()),
        ("total_seconds", pa.float64()),
        ("peak_vram_bytes", pa.int64()),
        ("peak_host_memory_bytes", pa.int64()),
        ("memory_mode", pa.string()),
        ("batch_size", pa.int32()),
        ("compiled", pa.bool_()),
        ("model", pa.string()),
        ("device", pa.string()),
        ("rank", pa.int32()),
        ("world_size", pa.int32()),
        ("host", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)


class RunDirError(Exception):
    """The run folder cannot be used as asked (locked, incompatible, or would be overwritten): exit 2."""


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: str) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_text_atomic(text: str, path: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class RunDir:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.videos = os.path.join(self.root, "videos")
        self.state = os.path.join(self.root, STATE)
        self.parts = os.path.join(self.state, "parts")
        self.records_path = os.path.join(self.state, "records.parquet")
        self.results_path = os.path.join(self.root, "results.parquet")
        self.run_json = os.path.join(self.state, "run.json")
        self._lock_fd: int | None = None

    def create(self) -> None:
        for d in (self.root, self.videos, self.state, self.parts):
            os.makedirs(d, exist_ok=True)

    def video_path(self, row_id: str) -> str:
        return os.path.join(self.videos, f"{row_id}.mp4")

    # -- locking ------------------------------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Refuse a second launch on the same folder. flock dies with its process, so a killed run leaves no
        stale lock behind."""
        path = os.path.join(self.state, "lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunDirError(
                f"Another svd-batch run is using {self.root} (held by {holder}). Two runs on one folder would "
                "overwrite each other's videos and results, so this one stops without touching it. Wait for "
                "the other run to finish (or stop it), or give this run its own folder with output.dir=..."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode())
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- what finished videos depend on -------------------------------------------------------------------
    def read_fingerprint(self) -> dict[str, Any] | None:
        if not os.path.exists(self.run_json):
            return None
        with open(self.run_json) as f:
            return json.load(f)

    def write_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        write_text_atomic(json.dumps(fingerprint, indent=2, sort_keys=True), self.run_json)

    def has_previous_work(self) -> bool:
        return (
            os.path.exists(self.records_path)
            or bool(self.part_files())
            or os.path.exists(self.results_path)
        )

    def clear(self) -> None:
        """overwrite=true: remove every earlier record and video, keep the folder."""
        for path in self.part_files() + [self.records_path, self.results_path, self.run_json]:
            if os.path.exists(path):
                os.unlink(path)
        for folder, suffix in ((self.videos, ".mp4"), (os.path.join(self.state, "thumbs"), ".png")):
            if os.path.isdir(folder):
                for entry in os.scandir(folder):
                    if entry.name.endswith(suffix):
                        os.unlink(entry.path)

    # -- records ------------------------------------------------------------------------------------------
    def part_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.parts, "*.parquet")))

    def read_records(self, columns: list[str] | None = None) -> pa.Table:
        """Every record made in this folder, the latest per id (a retried row replaces its failure)."""
        merged = self._read(self.records_path, columns) if os.path.exists(self.records_path) else None
        parts = [t for t in (self._read_if_present(p, columns) for p in self.part_files()) if t is not None]
        if merged is None and not parts:
            return RESULT_SCHEMA.empty_table().select(columns) if columns else RESULT_SCHEMA.empty_table()
        if not parts:
            return merged  # written by merge(): one record per id already
        recent = latest_per_id(pa.concat_tables(parts, promote_options="permissive"))
        if merged is None:
            return recent
        # Only the few ids in the parts can repeat; the merged file need not be hashed whole.
        older = merged.filter(pc.invert(pc.is_in(merged["id"], value_set=recent["id"])))
        return pa.concat_tables([older, recent], promote_options="permissive")

    @classmethod
    def _read_if_present(cls, path: str, columns: list[str] | None) -> pa.Table | None:
        """A part merged away since the listing (another process finishing) is simply gone."""
        try:
            return cls._read(path, columns)
        except FileNotFoundError:
            return None

    @staticmethod
    def _read(path: str, columns: list[str] | None) -> pa.Table:
        try:
            # One open file: a part may be replaced (renamed over) while we read, and reading by path can
            # open it twice, pairing the old file's footer with the new file's pages.
            with open(path, "rb") as f:
                return pq.read_table(f, columns=columns or None)
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            raise RunDirError(
                f"The results file {path} cannot be read ({exc}). It is not one svd-batch writes "
                "half-way, so something else changed it. Move it away and run the same command again: "
                "the rows it recorded are regenerated."
            ) from None

    def merge(self) -> pa.Table:
        """Fold the part files into records.parquet (written whole, then renamed), then delete the parts."""
        parts = self.part_files()
        records = self.read_records()
        if parts or not os.path.exists(self.records_path):
            write_parquet_atomic(records, self.records_path)
            for path in parts:
                os.unlink(path)
            fsync_dir(self.parts)
        return records

    def remove_temporaries(self) -> None:
        """Drop files that a killed process left half-written; they never counted as done."""
        for d in (self.videos, self.parts, self.state, os.path.join(self.state, "thumbs"), self.root):
            if os.path.isdir(d):
                for entry in os.scandir(d):
                    if ".tmp-" in entry.name:
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass


def latest_per_id(table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    # The later file and the later row win: parts are read after records.parquet, rows in write order.
    order = pa.array(range(table.num_rows))
    table = table.append_column("__order", order)
    last = table.group_by("id").aggregate([("__order", "max")])
    keep = pc.is_in(table["__order"], value_set=last["__order_max"])
    return table.filter(keep).drop_columns(["__order"])


class PartWriter:
    """A rank's record log: one small Parquet file, rewritten whole and renamed after each finished row."""

    def __init__(self, rundir: RunDir, rank: int, chunk_rows: int = 1024):
        self.rundir = rundir
        self.rank = rank
        self.chunk_rows = max(1, int(chunk_rows))
        # Names sort in time order (start of this process, then chunk): when a row was retried in a later run
        # that was also interrupted before merging, the later part is read last and its record wins.
        self.session = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        self.chunk = 0
        self.rows: list[dict[str, Any]] = []

    def _path(self) -> str:
        return os.path.join(self.rundir.parts, f"{self.session}-rank{self.rank:05d}-{self.chunk:05d}.parquet")

    def add(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        write_parquet_atomic(pa.Table.from_pylist(self.rows, schema=RESULT_SCHEMA), self._path())
        if len(self.rows) >= self.chunk_rows:
            self.chunk += 1
            self.rows = []
