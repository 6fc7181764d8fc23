"""Reading a manifest's files into one table, in a deterministic row order: a Parquet file, a folder of them,
a glob, any of those behind an fsspec URL (a remote read is abandoned once nothing arrives for the timeout),
and the Arrow files of a ``datasets`` ``save_to_disk`` folder. Image columns holding the images themselves
become readable references plus a cell address (embedded.py); other byte columns are left unread, so the
table stays small at any number of rows. Validation is manifest.py's."""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .embedded import cell_uris, leaf_values, parquet_file, present
from .fields import GENERATION_FIELDS
from .remote import RemoteError, WatchedFileSystem, filesystem, is_url, without_stall

MAX_LISTED_PROBLEMS = 50
NOT_A_FILE = ("a Parquet file, directory or glob (this is a FIFO, device or socket: reading it could wait for ever "
              "or never end)")
DEFAULT_TIMEOUT = 30.0  # seconds without progress before a remote manifest read is abandoned (images.timeout)
IMAGE_TYPES = ("strings (paths or URLs), binary (encoded image bytes) or struct<bytes: binary, path: string> "
               "(a Hugging Face Image column)")


@dataclass
class Problem:
    row: int | None  # manifest row number (0-based); None when the problem is the whole column or file
    id: str | None
    column: str
    value: Any
    allowed: str

    def __str__(self) -> str:
        where = "all rows" if self.row is None else f"row {self.row}"
        if self.id is not None:
            where += f" (id {self.id!r})"
        return f"{where}: column {self.column!r} = {self.value!r}; allowed: {self.allowed}"


class ManifestError(Exception):
    """The manifest cannot be run as it is; raised before any model is loaded (exit code 2)."""

    def __init__(self, source: str, problems: list[Problem], hint: str | None = None):
        super().__init__(source)
        self.source = source
        self.problems = problems
        self.hint = hint
        self.dataset: str | None = None  # the manifest config entry, when the CLI knows it

    def __str__(self) -> str:
        n = len(self.problems)
        what = f"{self.dataset!r} ({self.source})" if self.dataset else self.source
        head = f"The manifest {what} has {n} problem{'s' if n != 1 else ''}, so nothing was run. " + (
            self.hint or "Fix these cells (or clear a cell to use the configured default) and run the same command again:"
        )
        lines = [str(p) for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"... and {n - MAX_LISTED_PROBLEMS} more")
        return head + "\n" + "\n".join("  " + line for line in lines)


def _files(path: str, source: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = _folder_files(path, None, path, source)
    else:
        files = [path]
    return files


def _remote_files(fs: Any, inner: str, path: str, source: str) -> list[str]:
    """The files of a manifest URL inside its filesystem: one file, a folder of .parquet files, or a glob."""
    try:
        if any(ch in inner for ch in "*?["):
            files = sorted(f for f in fs.glob(inner) if fs.isfile(f))
        elif fs.isdir(inner):
            files = _folder_files(inner, fs, path, source)
        elif fs.isfile(inner):
            files = [inner]
        elif fs.exists(inner):
            raise ManifestError(source, [Problem(None, None, "manifest.path", path, NOT_A_FILE)],
                                hint="It is not a file or directory:")
        else:
            raise ManifestError(
                source, [Problem(None, None, "manifest.path", path, "an existing Parquet file, directory or glob")],
                hint="Point manifest.path at your manifest:",
            )
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - each filesystem library has its own errors (auth, network)
        raise ManifestError(source, [Problem(None, None, "manifest.path", path,
                                             f"a readable location ({type(exc).__name__}: {exc})")],
                            hint="It could not be listed:") from None
    return files


def _folder_files(folder: str, fs: Any, path: str, source: str) -> list[str]:
    """A folder's .parquet files (recursively), else the Arrow files of a ``datasets`` ``save_to_disk`` folder."""
    if fs is None:
        found = (p for p in (os.path.join(root, f) for root, _, names in os.walk(folder) for f in names)
                 if os.path.isfile(p))  # a FIFO or device named *.parquet would hang the read
    else:
        found = (f for f, info in fs.find(folder, detail=True).items() if info.get("type") == "file")
    parquet = sorted(f for f in found if f.endswith(".parquet") and not posixpath.basename(f).startswith((".", "_")))
    return parquet or _saved_dataset_files(folder, fs, path, source)


def _saved_dataset_files(folder: str, fs: Any, path: str, source: str) -> list[str]:
    """The data files of a folder written by ``datasets``' ``save_to_disk`` (state.json lists them in order), or
    the folder's .arrow files; a DatasetDict (one folder per split) asks for one split."""
    join = posixpath.join if fs is not None else os.path.join

    def read_json(name: str) -> dict[str, Any] | None:
        p = join(folder, name)
        if not (fs.exists(p) if fs is not None else os.path.exists(p)):
            return None
        with (fs.open(p, "rb") if fs is not None else open(p, "rb")) as f:
            return json.loads(f.read())

    splits = read_json("dataset_dict.json")
    if splits is not None:
        names = list(splits.get("splits") or [])
        raise ManifestError(source, [Problem(None, None, "manifest.path", path,
                                             "one split's folder: " + ", ".join(join(path, n) for n in names))],
                            hint="It is a DatasetDict saved with datasets' save_to_disk (one folder per split); "
                                 "point manifest.path at the split to run:")
    state = read_json("state.json")
    if state is not None and state.get("_data_files"):
        return [join(folder, d["filename"]) for d in state["_data_files"]]
    listing = fs.ls(folder, detail=False) if fs is not None else [join(folder, n) for n in os.listdir(folder)]
    return sorted(f for f in listing if f.endswith(ARROW_SUFFIX) and not posixpath.basename(f).startswith((".", "_")))


ARROW_SUFFIX = ".arrow"
# Arrow IPC: the file format starts with "ARROW1", the stream format (what save_to_disk writes) with a
# continuation marker.
ARROW_MAGIC = (b"ARROW1", b"\xff\xff\xff\xff")


def _is_arrow(file: str, fs: Any) -> bool:
    with (fs.open(file, "rb") if fs is not None else open(file, "rb")) as f:
        return f.read(6).startswith(ARROW_MAGIC)


def _open_arrow(file: str, fs: Any):
    """A record batch reader over an Arrow IPC stream or file (memory-mapped when local: nothing is copied)."""
    src = fs.open(file, "rb") if fs is not None else pa.memory_map(file)
    try:
        return pa.ipc.open_stream(src)
    except pa.ArrowInvalid:
        src.seek(0)
        return pa.ipc.open_file(src)


def _read_arrow(files: list[str], fs: Any, image_col: str, path: str, source: str) -> pa.Table:
    """Arrow files (``datasets``' ``save_to_disk``), without their byte columns. Images embedded in them are not
    read (only Parquet cells are read one by one as rows run): that case says how to write Parquet instead."""
    tables = []
    for f in files:
        reader = _open_arrow(f, fs)
        schema = reader.schema
        if image_col in schema.names and _embedded_kind(schema.field(image_col).type) is not None:
            stem = path.rstrip("/").rsplit("/", 1)[-1] or "manifest"
            raise ManifestError(source, [Problem(
                None, None, image_col, str(schema.field(image_col).type),
                "image paths or URLs in Arrow files; for images stored inside the dataset, Parquet: run "
                f"python -c \"from datasets import load_from_disk; load_from_disk('{path}').to_parquet('{stem}.parquet')\" "
                f"and set manifest.path={stem}.parquet (embedded images are then read cell by cell as rows run, "
                "never loaded whole)")],
                hint="It holds its images inside Arrow files (datasets' save_to_disk), which svd-batch does not read "
                     "image by image:")
        table = reader.read_all()
        tables.append(plain_dictionaries(table.select([fld.name for fld in schema if not holds_bytes(fld.type)])))
    return pa.concat_tables(tables, promote_options="permissive")


def plain_dictionaries(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (a pandas ``category``, Arrow's dictionary<string>) as their plain values, so a
    category column is read wherever its values are: an image, id or filter column of strings is a string column."""
    for i, fld in enumerate(table.schema):
        if pa.types.is_dictionary(fld.type):
            table = table.set_column(i, fld.name, table.column(i).cast(fld.type.value_type))
    return table


def _plain_type(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _same_kind(t: pa.DataType) -> pa.DataType:
    """What shards are compared on: a category column and strings, string and large_string (pandas writes either)
    are one kind of column."""
    t = _plain_type(t)
    return {pa.large_string(): pa.string(), pa.large_binary(): pa.binary()}.get(t, t)


def holds_bytes(t: pa.DataType) -> bool:
    """Binary columns, and structs with a binary field (the Hugging Face Image and Audio features)."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return True
    return pa.types.is_struct(t) and any(holds_bytes(t.field(i).type) for i in range(t.num_fields))


def _embedded_kind(t: pa.DataType) -> str | None:
    """'raw' for encoded bytes, 'struct' for {bytes, path} (path optional), None for anything else."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "raw"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        b = t.field(t.get_field_index("bytes")).type
        p = t.get_field_index("path")
        if (pa.types.is_binary(b) or pa.types.is_large_binary(b)) and (
            p < 0 or pa.types.is_string(t.field(p).type) or pa.types.is_large_string(t.field(p).type)
        ):
            return "struct"
    return None


def read_table(path: str, columns: Mapping[str, str] | None = None,
               timeout: float = DEFAULT_TIMEOUT) -> tuple[pa.Table, str]:
    """Read a Parquet file, directory of Parquet files or glob (local or any fsspec URL), in a deterministic
    row order; also the Arrow files of a ``datasets`` ``save_to_disk`` folder.

    An image column of embedded bytes (raw binary, or the Hugging Face struct<bytes, path>) is not read:
    it becomes a string column of readable references (the struct's path, else ``<shard>#row=<n>``) plus a
    ``__image_uri`` column naming each row's cell (see embedded.py); other byte columns are left out, so the
    table stays small at any number of rows. A remote read is abandoned once ``timeout`` seconds pass with
    nothing arriving (a hung server), whatever the filesystem library's own retries.
    """
    remote = is_url(path)
    source = path if remote else os.path.abspath(path)
    if not remote:
        if not any(ch in path for ch in "*?[") and not os.path.exists(path):
            raise ManifestError(
                source,
                [Problem(None, None, "manifest.path", path, "an existing Parquet file, directory or glob")],
                hint="Point manifest.path at your manifest:",
            )
        if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
            raise ManifestError(source, [Problem(None, None, "manifest.path", path, NOT_A_FILE)],
                                hint="It is not a file or directory:")
        return _read_files(path, source, columns, None, None), source
    try:
        fs, inner = filesystem(path)
    except RemoteError as exc:
        raise ManifestError(source, [Problem(None, None, "manifest.path", path, str(exc))],
                            hint="It cannot be read here:") from None
    try:
        table = without_stall(lambda activity: _read_files(path, source, columns, WatchedFileSystem(fs, activity),
                                                           inner), timeout, f"reading the manifest {path}")
    except RemoteError as exc:
        raise ManifestError(source, [Problem(None, None, "manifest.path", path, f"a location that answers ({exc})")],
                            hint="It could not be read:") from None
    return table, source


def _read_files(path: str, source: str, columns: Mapping[str, str] | None, fs: Any, inner: str | None) -> pa.Table:
    """The rows of the manifest's files; ``fs`` is None for local paths."""
    files = _remote_files(fs, inner, path, source) if fs is not None else _files(path, source)
    if not files:
        raise ManifestError(
            source,
            [Problem(None, None, "manifest.path", path, "a directory or glob that holds .parquet files (or the "
                     "Arrow files of a datasets save_to_disk folder)")],
            hint="No Parquet files were found:",
        )
    image_col = (columns or {}).get("image", "image")
    afs = fs.arrow() if fs is not None else None
    try:
        if _is_arrow(files[0], fs):
            return _read_arrow(files, fs, image_col, path, source)
        schema = _unified_schema(files, source, afs) if len(files) > 1 else pq.read_schema(files[0], filesystem=afs)
        _no_repeated_names(schema, source)
        kind = _embedded_kind(schema.field(image_col).type) if image_col in schema.names else None
        # Byte columns are left unread, except ours: a binary id or fps must be checked, not silently dropped.
        ours = {(columns or {}).get(c, c) for c in ("id", *GENERATION_FIELDS)}
        plain = [f.name for f in schema if not holds_bytes(f.type) or f.name in ours]
        # Sorted file names, then row order within each file: the same directory read twice gives the same
        # order, which sharding and resume rely on.
        # Remote files are Python (fsspec) files, whose buffers Arrow's reader threads free under the GIL; one
        # still doing so as the interpreter exits (a manifest error ends the run at once) aborts the process.
        table = plain_dictionaries(pads.dataset(files, schema=schema, format="parquet", filesystem=afs).to_table(
            columns=plain, use_threads=fs is None))
        if kind is not None:
            refs, uris = _embedded_refs(files, fs, image_col, kind, _shard_base(path, files, fs))
            table = table.append_column(image_col, refs).append_column("__image_uri", uris)
    except ManifestError:
        raise
    except (pa.ArrowInvalid, OSError, RemoteError) as exc:
        raise ManifestError(
            source,
            [Problem(None, None, "manifest.path", path, f"readable Parquet with one schema ({exc})")],
            hint="It could not be read as Parquet:",
        ) from None
    return table


def _no_repeated_names(schema: pa.Schema, source: str) -> None:
    names = schema.names
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ManifestError(source, [Problem(None, None, n, f"<{names.count(n)} columns of this name>",
                                             "one column of each name: rename or drop the copies") for n in repeated],
                            hint="Column names repeat, so which one to use is unclear:")


def _shard_base(path: str, files: list[str], fs) -> str:
    """The folder that shard names in ``<shard>#row=<n>`` references are relative to (the manifest's folder,
    or the fixed part of a glob), so references stay the same when the dataset is moved or copied."""
    inner = filesystem(path)[1] if fs is not None else path
    if files == [inner]:
        return posixpath.dirname(inner)
    wild = re.search(r"[*?\[]", inner)
    return inner.rstrip("/") if wild is None else inner[: inner.rfind("/", 0, wild.start()) + 1].rstrip("/") or "."


def _embedded_refs(files: list[str], fs, column: str, kind: str, base: str) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """Per row of every shard: the readable reference and, where the cell holds bytes, the cell's URI."""
    leaf = f"{column}.bytes" if kind == "struct" else column
    refs, uris = [], []
    for f in files:
        with (fs.open(f, "rb") if fs is not None else open(f, "rb")) as handle:
            pf = parquet_file(handle)
            n = pf.metadata.num_rows
            has = pa.array(present(pf, leaf))
            paths = None
            if kind == "struct" and f"{column}.path" in [pf.metadata.schema.column(i).path
                                                         for i in range(pf.metadata.num_columns)]:
                paths = pc.cast(leaf_values(pf.read(columns=[f"{column}.path"], use_threads=False).column(0)),
                                pa.string())
        full = fs.unstrip_protocol(f) if fs is not None else os.path.abspath(f)
        name = posixpath.relpath(f, base) if fs is not None else os.path.relpath(os.path.abspath(f), os.path.abspath(base))
        numbers = pc.cast(pa.array(np.arange(n, dtype=np.int64)), pa.string())
        cell = pc.binary_join_element_wise(f"{name}#row=", numbers, "")
        uri = cell_uris(full, numbers, leaf)
        if paths is not None:
            given = pc.and_(pc.is_valid(paths), pc.not_equal(pc.fill_null(pc.utf8_trim_whitespace(paths), ""), ""))
            ref = pc.if_else(pc.fill_null(given, False), paths, pc.if_else(has, cell, pa.scalar(None, pa.string())))
        else:
            ref = pc.if_else(has, cell, pa.scalar(None, pa.string()))
        refs.append(ref)
        uris.append(pc.if_else(has, uri, pa.scalar(None, pa.string())))
    return pa.chunked_array(refs, pa.string()), pa.chunked_array(uris, pa.string())


def _unified_schema(files: list[str], source: str, fs=None) -> pa.Schema:
    """Shards must agree on each column's type (ints in one and floats in another are fine, and a column
    missing from some shards reads as nulls there)."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    problems, schemas = [], []
    for f in files:
        try:
            schema = pq.read_schema(f, filesystem=fs)
            schemas.append(schema.remove_metadata())
        except (pa.ArrowInvalid, OSError) as exc:
            problems.append(Problem(None, None, "file", f, f"a readable Parquet file ({exc})"))
            continue
        for fld in schema:
            if pa.types.is_null(fld.type):
                continue  # an all-null column in one shard fits any type
            t = _same_kind(fld.type)
            first = seen.setdefault(fld.name, (t, f))
            if first[0] != t and not (_numeric(first[0]) and _numeric(t)):
                problems.append(Problem(None, None, fld.name, f"{fld.type} in {f}",
                                        f"one type in every file ({first[0]} in {first[1]})"))
    if problems:
        raise ManifestError(source, problems, hint="Its files do not fit together:")
    plain = [pa.schema([fld.with_type(_plain_type(fld.type)) for fld in sc], metadata=sc.metadata) for sc in schemas]
    return pa.unify_schemas(plain, promote_options="permissive")


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)
