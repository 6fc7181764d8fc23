"""Where ``svd-batch-export`` writes: a local folder or any fsspec URL (s3://, gs://, memory://, ...).

A file appears at its final name only when it is whole. Locally it is written under a temporary name beside its
final one, fsynced and renamed. On a store it is written to a local temporary file and then sent with one
``put``: an object store makes an object visible only when its (multipart) upload completes, so a killed
export never leaves half an object under a final name. Stores that are filesystems (sftp, hdfs, ...) get the
put under a temporary name and a move.

Errors are the destination's, never the rows': a full or read-only local disk is exit 4 (as a run's output
folder), a store that fails or refuses access is exit 5 (as a source of images that is down).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, fsync_dir
from .remote import RemoteError, filesystem, is_url, protocol
from .util import first_line

EXIT_USAGE, EXIT_DEST_FULL, EXIT_DEST_DOWN = 2, 4, 5
# Stores whose put of a finished local file makes the object appear whole, at once.
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "oss", "r2"}
TEMPORARY = re.compile(r"^\.?.+\.tmp-\d+$")
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class ExportError(Exception):
    """The export cannot go on; ``code`` is the exit status (2 usage, 4 destination full, 5 store down)."""

    def __init__(self, message: str, code: int = EXIT_USAGE):
        super().__init__(message)
        self.code = code


class Dest:
    """The destination folder, with paths relative to it ("shard-000000.tar", ".svd-batch-export/index.parquet")."""

    def __init__(self, url: str, tmp_dir: str | None = None):
        self.url = url
        self.remote = is_url(url) and protocol(url) != "file"
        self.tmp_dir = tmp_dir
        if self.remote:
            try:
                self.fs, self.root = filesystem(url)
            except RemoteError as exc:
                raise ExportError(f"--to {url}: {exc}") from None
            self.root = self.root.rstrip("/")
            self.atomic_put = protocol(url) in OBJECT_STORES
        else:
            self.fs = None
            self.root = os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise ExportError(f"--to {url} exists and is not a folder: give a folder (it is created if missing) "
                                  "or a store URL such as s3://bucket/prefix")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.remote else os.path.join(self.root, rel)

    def _failed(self, what: str, exc: BaseException) -> ExportError:
        if not self.remote:
            if isinstance(exc, OSError) and exc.errno in _FULL:
                return ExportError(f"The export folder {self.root} cannot take more files ({what}: "
                                   f"{type(exc).__name__}: {first_line(exc)}): its disk is full, over quota, "
                                   "read-only or failing. Free space (or fix the mount), then run the same command "
                                   "again: it continues where it stopped.", EXIT_DEST_FULL)
            return ExportError(f"Could not {what} in the export folder {self.root} ({type(exc).__name__}: "
                               f"{first_line(exc)}). Check that it is a writable folder, or choose another --to.",
                               EXIT_DEST_FULL)
        return ExportError(f"The destination {self.url} failed or refused access ({what}: {type(exc).__name__}: "
                           f"{first_line(exc) or repr(exc)}). Check the credentials and that the bucket exists and "
                           "answers, then run the same command again: the shards already there are kept and the "
                           "export continues.", EXIT_DEST_DOWN)

    def _call(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except ExportError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of a store library ends as one message
            raise self._failed(what, exc) from None

    # -- reads --------------------------------------------------------------------------------------------
    def names(self, rel: str = "") -> list[str]:
        """File names directly in folder ``rel`` (nothing when it does not exist)."""
        def listing() -> list[str]:
            where = self.path(rel) if rel else self.root
            if not self.remote:
                try:
                    return [e.name for e in os.scandir(where) if e.is_file(follow_symlinks=False)]
                except FileNotFoundError:
                    return []
            try:
                entries = self.fs.ls(where, detail=True, refresh=True)
            except FileNotFoundError:
                return []
            return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory"]
        return self._call(f"list {rel or '.'}", listing)

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return os.path.isfile(self.path(rel))
        return self._call(f"look for {rel}", lambda: self.fs.exists(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self._call(f"read {rel}", lambda: self.fs.cat_file(self.path(rel)))

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        if not self.remote:
            return pq.read_table(self.path(rel), columns=columns)

        def read() -> pa.Table:
            with self.fs.open(self.path(rel), "rb") as f:
                return pq.read_table(f, columns=columns)
        return self._call(f"read {rel}", read)

    # -- writes -------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        if not self.remote:
            self._call("create the folder", os.makedirs, self.root, exist_ok=True)

    def sweep(self, folders: list[str]) -> None:
        """Remove temporary files a killed export left in the local destination (they never counted)."""
        if self.remote:
            return
        for rel in folders:
            where = os.path.join(self.root, rel)
            if not os.path.isdir(where):
                continue
            for entry in os.scandir(where):
                if TEMPORARY.match(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)

    @contextlib.contextmanager
    def writing(self, rel: str) -> Iterator[str]:
        """A local path to write ``rel`` into; when the block ends without error the file is put in place whole."""
        if not self.remote:
            final = self.path(rel)
            try:
                os.makedirs(os.path.dirname(final), exist_ok=True)
                with atomic_path(final, hidden=True) as tmp:
                    yield tmp
            except OSError as exc:
                raise self._failed(f"write {rel}", exc) from None
            return
        folder = tempfile.mkdtemp(prefix="svd-batch-export-", dir=self.tmp_dir)
        try:
            local = os.path.join(folder, os.path.basename(rel))
            yield local
            self._put(local, rel)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _put(self, local: str, rel: str) -> None:
        final = self.path(rel)
        if self.atomic_put:
            self._call(f"upload {rel}", self.fs.put_file, local, final)
            return
        parent, name = final.rsplit("/", 1)
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        self._call(f"upload {rel}", self.fs.put_file, local, tmp)
        self._call(f"move {rel} into place", self.fs.mv, tmp, final)

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.writing(rel) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def write_table(self, rel: str, table: pa.Table) -> None:
        with self.writing(rel) as tmp:
            pq.write_table(table, tmp)

    def sync(self) -> None:
        if not self.remote:
            fsync_dir(self.root)
