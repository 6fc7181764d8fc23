"""Images whose encoded bytes sit inside a Parquet manifest (Hugging Face datasets, raw bytes columns).

The manifest Table never holds the bytes: each such row's ``image_uri`` names its cell,
``parquet://<shard file or URL>#row=<row in that file>&column=<column path>``, and the worker reads the cell
when the row runs. Cells are read a window of rows at a time (a few MB, never a whole multi-GB row group)
and the last windows are kept in a small LRU, so neighbouring rows cost one read and memory stays bounded
whatever the manifest's size or the order rows run in.
"""

from __future__ import annotations

import collections
import os
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .remote import filesystem, is_url, with_deadline

PREFIX = "parquet://"
WINDOW_BYTES = 8 << 20   # aim for windows of about this many bytes of the image column
CACHE_BYTES = 64 << 20   # windows kept for rows that come back to them
OPEN_FILES = 4


def cell_uris(file: str, rows: pa.Array, column: str) -> pa.Array:
    """The references of cells of one shard file and column, for ``rows`` (row numbers as strings); parse_uri
    reads one back."""
    return pc.binary_join_element_wise(f"{PREFIX}{file}#row=", rows, f"&column={urllib.parse.quote(column)}", "")


def parse_uri(uri: str) -> tuple[str, int, str]:
    """(file, row in file, column path) of a cell reference."""
    file, _, frag = uri[len(PREFIX):].rpartition("#")
    params = urllib.parse.parse_qs(frag)
    try:
        return file, int(params["row"][0]), params["column"][0]
    except (KeyError, ValueError, IndexError):
        raise ValueError(f"{uri!r} is not a cell reference (parquet://<file>#row=<n>&column=<name>)") from None


def open_file(file: str):
    """A binary file object for a local path or an fsspec URL."""
    if is_url(file):
        fs, path = filesystem(file)
        return fs.open(path, "rb")
    return open(file, "rb")


def parquet_file(handle) -> pq.ParquetFile:
    # pre_buffer=False and a read buffer: pages are streamed, instead of a whole column chunk read at once.
    return pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)


def leaf_index(pf: pq.ParquetFile, leaf: str) -> int:
    md = pf.metadata
    for i in range(md.num_columns):
        if md.schema.column(i).path == leaf:
            return i
    raise KeyError(leaf)


def leaf_values(column: Any) -> pa.Array:
    """The values of a column read by a leaf path (``image.bytes``, ``image.path``: a one-field struct) or
    directly, as one array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, [0])
    return column


def window_rows(pf: pq.ParquetFile, rg: int, leaf: str, window_bytes: int = WINDOW_BYTES) -> int:
    meta = pf.metadata.row_group(rg)
    size = meta.column(leaf_index(pf, leaf)).total_uncompressed_size
    per_row = max(1, size // max(1, meta.num_rows))
    return int(max(1, min(meta.num_rows, window_bytes // per_row)))


def present(pf: pq.ParquetFile, leaf: str) -> np.ndarray:
    """Per row of the file: does the cell hold bytes? From row group statistics where they decide it (the
    usual case: all or none), else by streaming that row group's column in windows."""
    md = pf.metadata
    i = leaf_index(pf, leaf)
    out = []
    for rg in range(md.num_row_groups):
        meta = md.row_group(rg)
        stats = meta.column(i).statistics
        n = meta.num_rows
        if stats is not None and stats.has_null_count and stats.null_count in (0, n):
            out.append(np.full(n, stats.null_count == 0))
            continue
        for batch in pf.iter_batches(batch_size=window_rows(pf, rg, leaf), row_groups=[rg], columns=[leaf],
                                     use_threads=False):
            out.append(leaf_values(batch.column(0)).is_valid().to_numpy(zero_copy_only=False))
    return np.concatenate(out) if out else np.zeros(0, dtype=bool)


@dataclass
class _Shard:
    handle: Any
    pf: pq.ParquetFile
    starts: np.ndarray  # first row of each row group, and the total at the end


class CellReader:
    """Reads cells by (file, row, column) through a bounded cache of row windows; thread-safe."""

    def __init__(self, window_bytes: int = WINDOW_BYTES, cache_bytes: int = CACHE_BYTES, open_files: int = OPEN_FILES):
        self.window_bytes, self.cache_bytes, self.open_files = window_bytes, cache_bytes, open_files
        self._lock = threading.Lock()
        self._shards: collections.OrderedDict[str, _Shard] = collections.OrderedDict()
        self._windows: collections.OrderedDict[tuple, pa.Array] = collections.OrderedDict()
        self._cached = 0
        # Per (file, column): the row group and next window of an open stream, so rows in order cost one read.
        self._cursors: dict[tuple[str, str], tuple[int, int, Any]] = {}
        self.windows_read = 0
        self.restarts = 0

    def read(self, file: str, row: int, column: str) -> bytes | None:
        with self._lock:
            shard = self._shard(file)
            if not 0 <= row < shard.starts[-1]:
                raise IndexError(f"row {row} is outside {file} ({int(shard.starts[-1])} rows)")
            rg = int(np.searchsorted(shard.starts, row, side="right") - 1)
            w_rows = window_rows(shard.pf, rg, column, self.window_bytes)
            offset = row - int(shard.starts[rg])
            w = offset // w_rows
            key = (file, column, rg, w)
            window = self._windows.get(key)
            if window is None:
                window = self._load(shard, file, column, rg, w, w_rows)
            else:
                self._windows.move_to_end(key)
            value = window[offset - w * w_rows]
            return value.as_py() if value.is_valid else None

    def _shard(self, file: str) -> _Shard:
        shard = self._shards.get(file)
        if shard is not None:
            self._shards.move_to_end(file)
            return shard
        handle = open_file(file)
        pf = parquet_file(handle)
        md = pf.metadata
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        shard = self._shards[file] = _Shard(handle, pf, starts)
        while len(self._shards) > self.open_files:
            old, dropped = self._shards.popitem(last=False)
            for k in [k for k in self._cursors if k[0] == old]:
                del self._cursors[k]
            dropped.handle.close()
        return shard

    def _load(self, shard: _Shard, file: str, column: str, rg: int, w: int, w_rows: int) -> pa.Array:
        cursor = self._cursors.get((file, column))
        if cursor is None or cursor[0] != rg or cursor[1] > w:
            if cursor is not None and cursor[0] == rg:
                self.restarts += 1  # a row before the stream's position: read the row group again
            stream = shard.pf.iter_batches(batch_size=w_rows, row_groups=[rg], columns=[column], use_threads=False)
            cursor = (rg, 0, stream)
        rg_, nxt, stream = cursor
        while True:
            batch = next(stream)  # windows before w are skipped, not kept: memory stays one window
            self.windows_read += 1
            nxt += 1
            if nxt - 1 == w:
                break
        self._cursors[(file, column)] = (rg_, nxt, stream)
        window = leaf_values(batch.column(0))
        self._windows[(file, column, rg, w)] = window
        self._cached += window.nbytes
        while self._cached > self.cache_bytes and len(self._windows) > 1:
            _, old = self._windows.popitem(last=False)
            self._cached -= old.nbytes
        return window

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                shard.handle.close()
            self._shards.clear()
            self._windows.clear()
            self._cursors.clear()
            self._cached = 0


_reader: CellReader | None = None
_reader_pid: int | None = None


def reader() -> CellReader:
    """One reader per process (a forked child opens its own files)."""
    global _reader, _reader_pid
    if _reader is None or _reader_pid != os.getpid():
        _reader, _reader_pid = CellReader(), os.getpid()
    return _reader


def read_cell(uri: str, timeout: float) -> bytes | None:
    file, row, column = parse_uri(uri)
    if is_url(file):
        return with_deadline(lambda: reader().read(file, row, column), timeout, uri)
    return reader().read(file, row, column)
