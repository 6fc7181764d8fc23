"""The run folder: where each rank records finished rows, and how a later start finds them again.

Layout under ``output.dir``::

    videos/<ab>/<id>.mp4       one per finished row, renamed into place only when complete (<ab>: ownership.subfolder;
                               folders made before the spread layout keep videos/<id>.mp4: .svd-batch/layout.json)
    results.parquet            one row per manifest row that has a record, written by every merge
    config.yaml                the resolved config of the latest start
    .svd-batch/run.json        what finished videos depend on (config fingerprint, model identity)
    .svd-batch/lock            a lock (flock): held exclusively by a launch while it plans or joins a job
    .svd-batch/active          a lock: held shared by every member while it lives; exclusive means "alone"
    .svd-batch/merge.lock      a lock: one merge at a time
    .svd-batch/records.parquet every record made here, merged (the resume state), with a merge generation
    .svd-batch/merged.json     which part files (and how many rows of each) the latest merge folded in
    .svd-batch/parts/*.parquet records written since, per member, each file written whole
    .svd-batch/members, jobs   the ledger of who works on which units (ledger.py)

Everything under ``.svd-batch`` that the protocol decides on (the locks, members, jobs, job.json, merged.json
and the merge fence on records.parquet) goes through ``RunDir.store`` (store.py); the videos, part files and
records are files of the folder.

Each member appends its finished rows to its own part file and rewrites that small file under a temporary
name, then renames it over the old one after every row: a row counts as done exactly when its record is in a
part, and a reader never sees a half-written file.

Merges are serialized by ``merge.lock`` and fenced by a generation number: a merge that finds records.parquet
replaced since it read it (its lock was lost, say, on a file server that revoked it while the process was
paused) throws its work away instead of putting back an older table. A merge deletes a part only when its
member has finished (a final state in its member file) and the row count it read equals the count the member
recorded; a process that is alone in the folder (``active`` exclusive: every member is gone) folds in and
deletes every part.
"""

from __future__ import annotations

import errno
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
from .ownership import RunDirError
from .atomic import atomic_path, fsync_dir, write_text_atomic  # noqa: F401 - write_text_atomic: re-exported
from .fields import RESULT_SCHEMA, Record
from .hooks import pause_here
from .ledger import FINAL_STATES, MEMBERS, JobInfo, read_json, read_key, read_members
from .store import Lock, PosixStore, Store

STATE = ownership.STATE
GENERATION_KEY = b"svd-batch.generation"
RECORDS = "records.parquet"  # the merged records: a key of the store, for the merge fence
MERGED = "merged.json"  # which parts (and how many rows of each) the latest merge folded in
INPUT_MAX_SIDE = 512


_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def lock_error(exc: OSError, root: str, holder: str) -> RunDirError:
    """Only "already held" means another run; any other flock failure says what it is."""
    if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        return RunDirError(
            f"Another svd-batch run is using {root} (started by {holder}), and this command needs the folder to "
            "itself (overwrite=true, resume=false, or a tool that rewrites the results). It stops without "
            "touching it. Wait for the other run to finish (or stop it), or give this command its own folder "
            "with output.dir=..."
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


class FolderLock:
    """One lock of the run folder's store (flock on POSIX: it dies with its process, so a killed run leaves no
    stale lock behind). With ``enabled=False`` (output.lock=false, filesystems without locks) every acquire
    succeeds."""

    def __init__(self, store: Store, key: str, root: str, enabled: bool = True):
        self.store, self.key, self.root, self.enabled = store, key, root, enabled
        self.held: Lock | None = None
        self.mode: str | None = None

    def acquire(self, shared: bool = False, wait: float = 0.0, describe: bool = False) -> bool:
        """Take the lock; False when it is held elsewhere after ``wait`` seconds. Errors other than "held"
        raise RunDirError."""
        if not self.enabled:
            self.mode = "shared" if shared else "exclusive"
            return True
        deadline = time.monotonic() + wait
        if self.held is None:
            try:
                self.held = self.store.lock(self.key)  # POSIX: the lock file opened (an unwritable folder raises)
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    raise
                raise lock_error(exc, self.root, "unknown") from None  # a store without locks
        try:
            while not self.held.take(shared=shared):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
        except OSError as exc:
            holder = self.holder()
            self.release()
            raise lock_error(exc, self.root, holder) from None
        self.mode = "shared" if shared else "exclusive"
        if describe and not shared:
            self.held.note(f"host {socket.gethostname()} pid {os.getpid()}")
        return True

    def holder(self) -> str:
        return (self.store.read(self.key) or b"").decode(errors="replace").strip() or "unknown"

    def require(self, shared: bool = False, wait: float = 0.0, describe: bool = False) -> None:
        """acquire, or RunDirError naming the holder."""
        if not self.acquire(shared=shared, wait=wait, describe=describe):
            holder = self.holder()
            self.release()
            raise lock_error(OSError(errno.EWOULDBLOCK, "held"), self.root, holder)

    def release(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None
        self.mode = None


class RunDir:
    def __init__(self, root: str, locks: bool = True):
        self.root = os.path.abspath(root)
        self.videos = os.path.join(self.root, ownership.VIDEOS)
        self.inputs = os.path.join(self.root, ownership.INPUTS)
        self.report = os.path.join(self.root, ownership.REPORT)
        self.stats = os.path.join(self.root, ownership.STATS)
        self.thumbs = os.path.join(self.root, ownership.THUMBS)
        self.state = os.path.join(self.root, STATE)
        self.parts = os.path.join(self.state, "parts")
        self.members = os.path.join(self.state, "members")
        self.jobs = os.path.join(self.state, "jobs")
        self.records_path = os.path.join(self.state, "records.parquet")
        self.merged_path = os.path.join(self.state, "merged.json")
        self.results_path = os.path.join(self.root, "results.parquet")
        self.run_json = os.path.join(self.state, "run.json")
        self.config_path = os.path.join(self.root, "config.yaml")
        self.legacy_done = os.path.join(self.state, "done")  # completion markers of svd-batch <= 0.1 runs
        # The ledger (claims, members, locks, job.json, the merge fence) goes through the store; the videos, parts
        # and records are files of the folder.
        self.store: Store = PosixStore(self.state)
        self.plan_lock = FolderLock(self.store, "lock", self.root, locks)
        self.active_lock = FolderLock(self.store, "active", self.root, locks)
        self.merge_lock = FolderLock(self.store, "merge.lock", self.root, locks)
        self._spread: bool | None = None

    def create(self) -> None:
        ownership.claim(self.root)  # a folder svd-batch did not make is refused before any write
        os.makedirs(self.state, exist_ok=True)
        ownership.mark(self.root)
        for d in (self.videos, self.parts, self.members, self.jobs):
            os.makedirs(d, exist_ok=True)
        # A new folder spreads its files over subfolders; one with results of an earlier version stays flat.
        ownership.make_layout(self.root, fresh=not self.has_previous_work())

    def _place(self, folder: str, row_id: str, ext: str) -> str:
        if self._spread is None:  # read once it is known (a folder being made has no layout file yet)
            version = ownership.layout(self.root)
            self._spread = None if version is None else version == ownership.SPREAD
        sub = ownership.subfolder(row_id) if self._spread else ""
        return os.path.join(folder, sub, f"{row_id}{ext}")

    def video_path(self, row_id: str) -> str:
        """Where a row's video is written; readers take results' video_path (relative to the folder) instead."""
        return self._place(self.videos, row_id, ".mp4")

    def input_path(self, row_id: str) -> str:
        """The conditioning image as the model saw it (resized), for the report and for rescoring."""
        return self._place(self.inputs, row_id, ".jpg")

    def thumb_path(self, row_id: str) -> str:
        """First, middle and last frame of a row, cut while its frames are in memory (the contact sheet)."""
        return self._place(self.thumbs, row_id, ".png")

    def stats_path(self, rank: int) -> str:
        return os.path.join(self.stats, f"rank-{int(rank):05d}.json")

    def save_input(self, row_id: str, image) -> None:
        """The conditioning image as the model saw it (after resize), for the report and for rescoring; at most
        INPUT_MAX_SIDE px (the report shows it small and CLIP sees 224 px: a full-size copy would only cost disk)."""
        from PIL import Image

        img = image.convert("RGB")
        if max(img.size) > INPUT_MAX_SIDE:
            scale = INPUT_MAX_SIDE / max(img.size)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        path = self.input_path(row_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            img.save(tmp, format="JPEG", quality=90)

    def release_locks(self) -> None:
        for lock in (self.merge_lock, self.active_lock, self.plan_lock):
            lock.release()

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
        """overwrite=true (alone in the folder): remove every earlier record and the videos it recorded, keep
        the folder and any file svd-batch did not write."""
        ownership.remove_recorded(self.root, self.read_records(["id"])["id"].to_pylist())
        for path in self.part_files() + [self.records_path, self.results_path, self.run_json]:
            ownership.remove_file(path)
        self.store.delete(MERGED)
        self.store.delete(JobInfo.KEY)
        self.forget_finished_work()

    def forget_finished_work(self) -> None:
        """Alone in the folder: earlier jobs' claims and members' files describe processes that are gone."""
        self.store.delete_all("jobs")
        self.store.delete_all(MEMBERS)
        if os.path.isdir(self.legacy_done):
            for entry in os.scandir(self.legacy_done):
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass

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

    def generation(self) -> int:
        """The merge generation of records.parquet (0: none yet)."""
        try:
            meta = pq.read_schema(self.records_path).metadata or {}
        except FileNotFoundError:
            return 0
        except (pa.ArrowInvalid, OSError):
            return -1
        return int(meta.get(GENERATION_KEY, b"0"))

    def sealed_parts(self) -> dict[str, int]:
        """Part file -> rows its member recorded when it finished: parts no member will write again."""
        sealed: dict[str, int] = {}
        for info in read_members(self.store):
            if info.get("state") in FINAL_STATES:
                sealed.update(info.get("parts") or {})
        if os.path.isdir(self.legacy_done):
            for path in glob.glob(os.path.join(self.legacy_done, "*.json")):
                sealed.update((read_json(path) or {}).get("parts") or {})
        return sealed

    def up_to_date(self) -> bool:
        """Whether the latest merge already holds every part as it is now (nothing for another merge to do)."""
        if not (os.path.exists(self.records_path) and os.path.exists(self.results_path)):
            return False
        merged = (read_key(self.store, MERGED) or {}).get("parts")
        if merged is None:
            return False
        now = {}
        for p in self.part_files():
            try:
                now[os.path.basename(p)] = pq.read_metadata(p).num_rows
            except FileNotFoundError:
                continue
            except (pa.ArrowInvalid, OSError):
                return False
        return now == merged

    def merge(self, all_parts: bool = False) -> pa.Table | None:
        """Fold the part files into records.parquet (written whole, then renamed), then delete the parts that
        are in it for good: every part with ``all_parts`` (only when alone in the folder: no writer is alive),
        else the parts of finished members whose recorded row count equals what this merge read. Returns the
        merged records, or None when another merge replaced records.parquet meanwhile (then nothing was
        written or deleted; merge again). The caller holds ``merge_lock`` where locks work."""
        gen = self.generation()
        version = self.store.version(RECORDS)  # the fence: replaced only if no other merge replaced it meanwhile
        records, counts = self._read_all()
        sealed = self.sealed_parts()
        deletable = [p for p, n in counts.items() if all_parts or sealed.get(os.path.basename(p)) == n]
        if counts or not os.path.exists(self.records_path):
            table = records.replace_schema_metadata({**(records.schema.metadata or {}),
                                                     GENERATION_KEY: str(max(gen, 0) + 1).encode()})
            def write(tmp: str) -> None:
                pq.write_table(table, tmp)
                pause_here("merge")  # test hook: a merge paused half-way (SIGSTOP, NFS hang)

            if not self.store.replace_file(RECORDS, write, version):
                return None  # another merge won meanwhile: keep its table
            for path in deletable:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            fsync_dir(self.parts)
        kept = {os.path.basename(p): n for p, n in counts.items() if p not in deletable}
        self.store.put(MERGED, json.dumps({"parts": kept, "at": time.time()}).encode())
        if all_parts and os.path.isdir(self.legacy_done):
            for path in glob.glob(os.path.join(self.legacy_done, "*.json")):
                os.unlink(path)
        return records

    def remove_temporaries(self) -> None:
        """Drop files that a killed process left half-written (alone in the folder); they never counted."""
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
    """A member's record log: one small Parquet file, rewritten whole and renamed after each finished row."""

    def __init__(self, rundir: RunDir, rank: int = 0, chunk_rows: int = 1024, session: str | None = None,
                 member: str | None = None):
        self.rundir = rundir
        self.chunk_rows = max(1, int(chunk_rows))
        # Names sort in time order (start of the launch, then rank and chunk): when a row was retried in a later
        # run that was also interrupted before merging, the later part is read last and its record wins.
        self.member = member or f"{session or new_session()}-r{int(rank):05d}"
        self.chunk = 0
        self.rows: list[dict[str, Any]] = []
        self.written: dict[str, int] = {}  # part file name -> rows in it (for the member file: what is sealed)

    def _path(self) -> str:
        return os.path.join(self.rundir.parts, f"{self.member}-{self.chunk:05d}.parquet")

    def add(self, record: Record) -> None:
        if not isinstance(record, Record):
            raise TypeError(f"PartWriter.add takes a fields.Record, not {type(record).__name__}")
        self.rows.append(record.as_dict())
        path = self._path()
        write_parquet_atomic(pa.Table.from_pylist(self.rows, schema=RESULT_SCHEMA), path)
        self.written[os.path.basename(path)] = len(self.rows)
        if len(self.rows) >= self.chunk_rows:
            self.chunk += 1
            self.rows = []


def new_session() -> str:
    """A launch's name: sorts in time order, unique across hosts."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
