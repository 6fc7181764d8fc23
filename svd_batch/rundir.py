"""The run folder: where each rank records finished rows, and how a later start finds them again.

Layout under ``output.dir``::

    videos/<id>.mp4            one per finished row, renamed into place only when complete
    results.parquet            one row per manifest row that has a record, merged at the end of a run
    config.yaml                the resolved config of the latest start
    .svd-batch/run.json        what finished videos depend on (config fingerprint, model identity)
    .svd-batch/lock            flock: exclusive while rank 0 prepares, then shared by every rank while it works
    .svd-batch/records.parquet every record ever made here, merged (the resume state)
    .svd-batch/parts/*.parquet records written since the last merge, per rank, each file written whole
    .svd-batch/done/*.json     one per rank and start: how it ended and how many records each of its parts holds

Each rank appends its finished rows to its own part file and rewrites that small file under a temporary
name, then renames it over the old one after every row: a row counts as done exactly when its record is
in a part, and a reader never sees a half-written file. Resume reads one listing of ``parts/`` and a
few Parquet files, never a stat per row.

A merge deletes only parts it read whole: at the start of a run (exclusive lock: no writer is alive) every
part; at the end only parts whose rank's completion marker lists exactly the rows the merge read, so a stale
copy (NFS caches file contents and listings per client) or a part still being written is never lost.
"""

from __future__ import annotations

import errno
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

from . import ownership
from .atomic import atomic_path, fsync_dir
from .fields import RESULT_SCHEMA

STATE = ".svd-batch"

class RunDirError(Exception):
    """The run folder cannot be used as asked (locked, incompatible, or would be overwritten): exit 2."""


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def lock_error(exc: OSError, root: str, holder: str) -> RunDirError:
    """Only "already held" means another run; any other flock failure says what it is."""
    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return RunDirError(
            f"Another svd-batch run is using {root} (started by {holder}). Two runs on one folder would "
            "overwrite each other's videos and results, so this one stops without touching it. Wait for "
            "the other run to finish (or stop it), or give this run its own folder with output.dir=..."
        )
    if exc.errno in _NO_LOCKS:
        return RunDirError(
            f"The filesystem of {root} does not support file locks (flock failed: {exc.strerror}), so svd-batch "
            "cannot make sure that no other run writes into the same folder. Put output.dir on a filesystem "
            "with lock support (local disk; NFS with lockd/NFSv4; Lustre mounted with -o flock), or, if you are "
            "sure that only one run at a time uses this folder, add output.lock=false (unsafe: two runs on one "
            "folder would then overwrite each other's videos and records)."
        )
    return RunDirError(f"Could not lock {root} ({type(exc).__name__}: {exc}). Check that the folder is "
                       "writable, or choose another output.dir.")


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
        self.config_path = os.path.join(self.root, "config.yaml")
        self.done = os.path.join(self.state, "done")
        self._lock_fd: int | None = None

    def create(self) -> None:
        ownership.claim(self.root)  # a folder svd-batch did not make is refused before any write
        os.makedirs(self.state, exist_ok=True)
        ownership.mark(self.root)
        for d in (self.videos, self.parts, self.done):
            os.makedirs(d, exist_ok=True)

    def video_path(self, row_id: str) -> str:
        return os.path.join(self.videos, f"{row_id}.mp4")

    # -- locking ------------------------------------------------------------------------------------------
    def acquire_lock(self, shared: bool = False) -> None:
        """Refuse a second launch on the same folder. Rank 0 takes the lock exclusively while it prepares and
        plans, then every rank holds it shared while it works, so a new launch is refused until the last rank
        of this one is gone. flock dies with its process: a killed run leaves no stale lock behind."""
        path = os.path.join(self.state, "lock")
        fd = self._lock_fd if self._lock_fd is not None else os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
                self._lock_fd = None
            raise lock_error(exc, self.root, holder) from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode(), 0)
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
        """overwrite=true: remove every earlier record and the videos it recorded, keep the folder and any
        file svd-batch did not write."""
        ownership.remove_recorded(self.root, self.read_records(["id"])["id"].to_pylist())
        for path in self.part_files() + self.markers() + [self.records_path, self.results_path, self.run_json]:
            ownership.remove_file(path)

    # -- records ------------------------------------------------------------------------------------------
    def part_files(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.parts, "*.parquet")))

    def read_records(self, columns: list[str] | None = None) -> pa.Table:
        """Every record made in this folder, the latest per id (a retried row replaces its failure)."""
        return self._read_all(columns)[0]

    def _read_all(self, columns: list[str] | None = None) -> tuple[pa.Table, dict[str, int]]:
        """The records, and the row count read from each part file (what a merge may delete)."""
        merged = self._read(self.records_path, columns) if os.path.exists(self.records_path) else None
        counts: dict[str, int] = {}
        parts = []
        for p in self.part_files():
            t = self._read_if_present(p, columns)
            if t is not None:
                parts.append(t)
                counts[p] = t.num_rows
        if merged is None and not parts:
            empty = RESULT_SCHEMA.empty_table()
            return (empty.select(columns) if columns else empty), counts
        if not parts:
            return merged, counts  # written by merge(): one record per id already
        recent = latest_per_id(pa.concat_tables(parts, promote_options="permissive"))
        if merged is None:
            return recent, counts
        # Only the few ids in the parts can repeat; the merged file need not be hashed whole.
        older = merged.filter(pc.invert(pc.is_in(merged["id"], value_set=recent["id"])))
        return pa.concat_tables([older, recent], promote_options="permissive"), counts

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
            # open it twice, pairing the old file's footer with the new file's pages. A native file, not
            # Python's open(): Arrow's reader threads free a Python file's buffers under the GIL, and one still
            # doing so when the interpreter exits aborts the process ("terminate called without an active
            # exception", exit -6 instead of the run's own exit status).
            with pa.OSFile(path, "rb") as f:
                pf = pq.ParquetFile(f)
                # Columns added by a later svd-batch are simply absent from older files.
                have = set(pf.schema_arrow.names)
                return pf.read(columns=[c for c in columns if c in have] if columns else None)
        except FileNotFoundError:
            raise
        except (pa.ArrowInvalid, OSError) as exc:
            raise RunDirError(
                f"The results file {path} cannot be read ({exc}). It is not one svd-batch writes "
                "half-way, so something else changed it. Move it away and run the same command again: "
                "the rows it recorded are regenerated."
            ) from None

    def merge(self, all_parts: bool = False) -> pa.Table:
        """Fold the part files into records.parquet (written whole, then renamed), then delete the parts read
        whole: every part with ``all_parts`` (only under the exclusive lock, when no writer is alive), else
        those whose completion marker lists the very row count this merge read."""
        records, counts = self._read_all()
        # One reading of the markers decides both which parts are sealed and which markers go.
        markers = {path: self.read_marker(path) for path in self.markers()}
        sealed = {name: n for info in markers.values() for name, n in info.get("parts", {}).items()}
        deletable = [p for p, n in counts.items() if all_parts or sealed.get(os.path.basename(p)) == n]
        if counts or not os.path.exists(self.records_path):
            write_parquet_atomic(records, self.records_path)
            for path in deletable:
                os.unlink(path)
            fsync_dir(self.parts)
        # A marker whose parts are all merged away has nothing left to vouch for.
        gone = {os.path.basename(p) for p in deletable}
        for path, info in markers.items():
            if all_parts or set(info.get("parts", {})) <= gone:
                os.unlink(path)
        return records

    # -- completion markers -------------------------------------------------------------------------------
    def markers(self) -> list[str]:
        return sorted(glob.glob(os.path.join(self.done, "*.json")))

    def write_marker(self, session: str, rank: int, info: dict[str, Any]) -> None:
        os.makedirs(self.done, exist_ok=True)
        write_text_atomic(json.dumps(info, indent=1, default=str),
                          os.path.join(self.done, f"{session}-rank{rank:05d}.json"))

    @staticmethod
    def read_marker(path: str) -> dict[str, Any]:
        """A completion marker's content; {} when it cannot be read (half-visible on a cached filesystem: its
        parts then count as unsealed)."""
        try:
            with open(path) as f:
                return dict(json.load(f))
        except (OSError, ValueError):
            return {}

    def remove_temporaries(self) -> None:
        """Drop files that a killed process left half-written; they never counted as done."""
        ownership.remove_temporaries(self.root)


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

    def __init__(self, rundir: RunDir, rank: int, chunk_rows: int = 1024, session: str | None = None):
        self.rundir = rundir
        self.rank = rank
        self.chunk_rows = max(1, int(chunk_rows))
        # Names sort in time order (start of the run, then chunk): when a row was retried in a later run that
        # was also interrupted before merging, the later part is read last and its record wins.
        self.session = session or new_session()
        self.chunk = 0
        self.rows: list[dict[str, Any]] = []
        self.written: dict[str, int] = {}  # part file name -> rows in it (for the completion marker)

    def _path(self) -> str:
        return os.path.join(self.rundir.parts, f"{self.session}-rank{self.rank:05d}-{self.chunk:05d}.parquet")

    def add(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        path = self._path()
        write_parquet_atomic(pa.Table.from_pylist(self.rows, schema=RESULT_SCHEMA), path)
        self.written[os.path.basename(path)] = len(self.rows)
        if len(self.rows) >= self.chunk_rows:
            self.chunk += 1
            self.rows = []


def new_session() -> str:
    """A start's name: sorts in time order, unique across hosts."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
