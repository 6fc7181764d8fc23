"""Step 1 of a run: read the Parquet manifest, validate it, and resolve every row's effective values.

The manifest stays a columnar pyarrow Table from start to end (validation and default-filling are vector
operations), so a manifest of a million rows costs seconds and megabytes, not Python objects per row.
Every problem is collected before reporting, so a user fixes a bad manifest in one round trip.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .embedded import cell_uris, leaf_values, parquet_file, present
from .fields import FLOAT_FIELDS, GENERATION_FIELDS, INT_FIELDS, ROW_MEMORY_KEY, RULES, arrow_type, row_memory_bytes
from .remote import RemoteError, WatchedFileSystem, filesystem, is_url, without_stall
from .util import human_bytes, occurrence

# Ids become file names (videos/<id>.mp4), so they are restricted to characters that are safe on every
# filesystem, cannot climb out of videos/ and cannot hide (no leading dot).
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,199}$"
ID_ALLOWED = "1-200 characters of letters, digits and . _ = + , @ -, not starting with '.' or '-'"
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


@dataclass
class Manifest:
    """The validated manifest: one row per manifest row, every generation field filled in.

    Columns: ``row`` (position in the manifest), ``id``, ``image`` (as written), ``image_uri`` (resolved
    absolute path or URL), the generation fields of ``fields.GENERATION_FIELDS`` (``seed`` may still be null:
    seeds of rows without one are derived at planning time, for the rows that run), and ``extra`` columns
    prefixed ``extra.``.
    """

    source: str
    table: pa.Table
    extra_columns: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.table.num_rows


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
        tables.append(table.select([fld.name for fld in schema if not holds_bytes(fld.type)]))
    return pa.concat_tables(tables, promote_options="permissive")


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
        table = pads.dataset(files, schema=schema, format="parquet", filesystem=afs).to_table(
            columns=plain, use_threads=fs is None)
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
            first = seen.setdefault(fld.name, (fld.type, f))
            if first[0] != fld.type and not (_numeric(first[0]) and _numeric(fld.type)):
                problems.append(Problem(None, None, fld.name, f"{fld.type} in {f}",
                                        f"one type in every file ({first[0]} in {first[1]})"))
    if problems:
        raise ManifestError(source, problems, hint="Its files do not fit together:")
    return pa.unify_schemas(schemas, promote_options="permissive")


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def load_manifest(
    path: str,
    generation: Mapping[str, Any],
    *,
    columns: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    image_root: str | None = None,
    limit: int | None = None,
    where: Mapping[str, Any] | None = None,
    max_row_bytes: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Manifest:
    """Read and validate a manifest; raise ManifestError listing every problem.

    Args:
        path: a Parquet file, a directory of Parquet files, or a glob.
        generation: the configured defaults for every generation field (``generation.*``).
        columns: our column name -> the manifest's column name, for datasets with their own names.
        defaults: per-dataset defaults, between ``generation`` and a row's own values.
        image_root: where relative image paths resolve; default the manifest's folder.
        limit: keep only the first ``limit`` selected rows.
        where: keep rows whose column equals the value (or is in the list of values).
        max_row_bytes: refuse rows whose size and frames need more memory than this (fields.row_memory_bytes).
        timeout: seconds without progress before a remote read is abandoned (images.timeout).
    """
    raw, source = read_table(path, columns, timeout)
    mapping = dict(columns or {})
    problems: list[Problem] = []

    # Our name -> their column, for every column we know; their other columns are carried as extras.
    theirs = {ours: mapping.get(ours, ours) for ours in ("image", "id", *GENERATION_FIELDS)}
    for ours, col in mapping.items():
        if col not in raw.column_names:
            problems.append(Problem(None, None, col, "<missing>", f"a column of the manifest (mapped from {ours!r})"))
    if problems:
        raise ManifestError(source, problems, hint="The column mapping names columns that do not exist:")

    raw = raw.append_column("__row", pa.array(np.arange(raw.num_rows, dtype=np.int64)))
    for col, wanted in (where or {}).items():
        col = mapping.get(col, col)
        if col not in raw.column_names:
            raise ManifestError(source, [Problem(None, None, col, "<missing>", "a column to filter on")])
        values = wanted if isinstance(wanted, (list, tuple)) else [wanted]
        try:  # the values must be of the column's type: where.fps="7" on an integer column is a usage error
            value_set = pa.array(values).cast(raw[col].type)
            keep = pc.is_in(raw[col], value_set=value_set)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            raise ManifestError(source, [Problem(None, None, col, wanted, f"values of the column's type ({raw[col].type}), "
                                                 "as manifest.where.<column>=<value> or a list of them")],
                                hint="A manifest.where filter does not match its column's type:") from None
        raw = raw.filter(keep)
    if limit is not None:
        raw = raw.slice(0, int(limit))
    if raw.num_rows == 0:
        raise ManifestError(
            source, [Problem(None, None, "rows", 0, "at least one row (after filters and limit)")],
            hint="There is nothing to run:",
        )

    rows = raw["__row"]
    ids_raw = _id_strings(raw[theirs["id"]], theirs["id"], source) if theirs["id"] in raw.column_names else None

    # 1. Image column.
    if theirs["image"] not in raw.column_names:
        raise ManifestError(
            source,
            [Problem(None, None, theirs["image"], "<missing>", "a column of image paths or URLs, or of image bytes")],
            hint="The required image column is missing (map yours with manifest.columns.image=<your column>):",
        )
    image = raw[theirs["image"]]
    if not pa.types.is_string(image.type) and not pa.types.is_large_string(image.type):
        raise ManifestError(source, [Problem(None, None, theirs["image"], str(image.type), IMAGE_TYPES)])
    image = pc.cast(image, pa.string())
    bad_image = pc.or_kleene(pc.is_null(image), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(image)), 0))

    # 2. Ids: given ones are checked; missing ones are derived from the row's content (never its position).
    # (A column that is not numbers is refused below, so ids are never derived from it.)
    cells = [theirs[f] for f in GENERATION_FIELDS
             if theirs[f] in raw.column_names and (_numeric(raw[theirs[f]].type) or pa.types.is_null(raw[theirs[f]].type))]
    if ids_raw is not None and ids_raw.null_count == 0:
        ids = ids_raw  # the common case at scale: no string work for derived ids
    elif ids_raw is not None:
        ids = pc.if_else(pc.is_null(ids_raw), _derived_ids(raw, image, cells), ids_raw)
    else:
        ids = _derived_ids(raw, image, cells)

    # 3. Generation fields, with defaults filled in: row > dataset defaults > generation.*.
    resolved: dict[str, pa.ChunkedArray] = {}
    for name in GENERATION_FIELDS:
        # A missing seed is not filled with generation.seed: that is the base the row's seed is derived from.
        fallback = None if name == "seed" else (defaults or {}).get(name, generation.get(name))
        col = theirs[name]
        values, col_problems = _typed_column(raw, col, name, rows, ids)
        problems += col_problems
        if fallback is not None:
            values = pc.fill_null(values, pa.scalar(fallback, arrow_type(name)))
        resolved[name] = values

    for i in np.flatnonzero(pc.fill_null(bad_image, True).to_numpy(zero_copy_only=False)):
        problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), theirs["image"], image[i].as_py(),
                                "a non-empty path or URL, or image bytes"))
    problems += _range_problems(resolved, rows, ids)
    problems += _combination_problems(resolved, rows, ids, max_row_bytes)
    problems += _id_problems(ids, rows, theirs["id"])
    if problems:
        problems.sort(key=lambda p: (-1 if p.row is None else p.row, p.column))
        raise ManifestError(source, problems)

    root = image_root or os.path.dirname(source if os.path.isfile(source) else source.rstrip("/*"))
    uri = _resolve_images(image, root if is_url(root) else os.path.abspath(root))
    if "__image_uri" in raw.column_names:
        uri = pc.coalesce(raw["__image_uri"], uri)  # embedded bytes win over the struct's path

    used = set(theirs.values())
    extra = [c for c in raw.column_names if c not in used and c not in ("__row", "__image_uri")]
    table = pa.table(
        {
            "row": rows,
            "id": ids,
            "image": image,
            "image_uri": uri,
            **resolved,
            **{f"extra.{c}": raw[c] for c in extra},
        }
    )
    return Manifest(source=source, table=table, extra_columns=[f"extra.{c}" for c in extra])


def _derived_ids(raw: pa.Table, image: pa.ChunkedArray, cells: list[str]) -> pa.ChunkedArray:
    """``<image name>-<10 hex digits>``: the digits hash the image as written and the row's own cells of the
    generation columns, so an id stays the same when rows are inserted, removed or reordered (and so does
    its seed, derived from it). Identical rows get ``-2``, ``-3``, ... in manifest order."""
    import hashlib

    stem = pc.replace_substring_regex(pc.fill_null(image, ""), r"^.*[/\\]", "")
    stem = pc.replace_substring_regex(stem, r"\?.*$", "")
    stem = pc.replace_substring_regex(stem, r"\.[^.]*$", "")
    stem = pc.utf8_slice_codeunits(pc.replace_substring_regex(stem, r"[^A-Za-z0-9_-]+", "_"), 0, 80)
    stem = pc.replace_substring_regex(stem, r"^-+", "")
    stem = pc.if_else(pc.equal(stem, ""), pa.scalar("image"), stem)
    parts = [pc.fill_null(image, "")]
    for c in cells:
        parts.append(pc.fill_null(pc.cast(raw[c], pa.string()), "\x00"))  # a null differs from any value
    content = pc.binary_join_element_wise(*parts, "\x1f") if len(parts) > 1 else parts[0]
    blake = hashlib.blake2b
    digests = np.fromiter((int.from_bytes(blake(k.encode(), digest_size=5).digest(), "big")
                           for k in content.to_pylist()), dtype=np.int64, count=len(content))
    # The n-th copy of an identical row (n >= 2) gets "-n": stable as long as the copies keep their order.
    copy = occurrence(digests)
    hexes = np.char.mod("-%010x", digests)
    dup = copy > 0
    if dup.any():
        hexes = hexes.astype(object)
        hexes[dup] = [f"{h}-{k + 1}" for h, k in zip(hexes[dup], copy[dup])]
    return pc.binary_join_element_wise(stem, pa.array(hexes.astype(object), pa.string()), "")


def _typed_column(raw: pa.Table, col: str, name: str, rows, ids) -> tuple[pa.ChunkedArray, list[Problem]]:
    want = arrow_type(name)
    if col not in raw.column_names:
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), []
    values = raw[col]
    t = values.type
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), []
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        kind = "an integer" if name in INT_FIELDS else "a number"
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), [
            Problem(None, None, col, f"<{t} column>", f"{kind} column (nulls allowed); convert the column to numbers")
        ]
    problems = []
    if pa.types.is_floating(t):
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, t), values)  # pandas writes missing as NaN
        if name in INT_FIELDS:
            # pandas stores an integer column with missing cells as floats: accept whole numbers that fit, and
            # refuse the rest (1.5, inf, 1e30) rather than let them fall back to a default.
            whole = pc.and_(pc.is_finite(values), pc.equal(values, pc.floor(values)))
            fits = pc.and_(pc.greater_equal(values, -(2.0**63)), pc.less(values, 2.0**63))
            bad = pc.fill_null(pc.invert(pc.and_(whole, fits)), False)
            for i in np.flatnonzero(bad.to_numpy(zero_copy_only=False)):
                problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), col, values[i].as_py(), RULES[name][3]))
            values = pc.if_else(bad, pa.scalar(None, t), values)
    elif pa.types.is_unsigned_integer(t) and name in INT_FIELDS:
        too_big = pc.greater(values, pa.scalar(2**63 - 1, t)) if t.bit_width == 64 else None
        if too_big is not None:
            for i in np.flatnonzero(pc.fill_null(too_big, False).to_numpy(zero_copy_only=False)):
                problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), col, values[i].as_py(), RULES[name][3]))
            values = pc.if_else(pc.fill_null(too_big, False), pa.scalar(None, t), values)
    return pc.cast(values, want, safe=False), problems


def _range_problems(resolved: Mapping[str, pa.ChunkedArray], rows, ids) -> list[Problem]:
    problems = []
    for name, values in resolved.items():
        low, high, multiple, allowed = RULES[name]
        bad = pc.is_null(values)
        if name == "seed":  # a missing seed is derived at planning time
            bad = pc.and_(bad, pa.scalar(False))
        if name in FLOAT_FIELDS:
            bad = pc.or_kleene(bad, pc.invert(pc.is_finite(values)))
        if low is not None:
            bad = pc.or_kleene(bad, pc.less(values, low))
        if high is not None:
            bad = pc.or_kleene(bad, pc.greater(values, high))
        if multiple is not None:
            bad = pc.or_kleene(bad, pc.not_equal(pc.bit_wise_and(values, multiple - 1), 0))
        mask = pc.fill_null(bad, False)
        for i in np.flatnonzero(mask.to_numpy(zero_copy_only=False)):
            value = values[i].as_py()
            problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), name,
                                    "<missing: no default configured>" if value is None else value, allowed))
    return problems


def _combination_problems(resolved: Mapping[str, pa.ChunkedArray], rows, ids, max_row_bytes: int | None) -> list[Problem]:
    """Values fine one by one that the pipeline cannot run together: guidance it turns on for the frames but not
    for the image (min_guidance_scale > 1 >= max_guidance_scale), and sizes x frames that cannot fit in memory."""
    problems = []
    lo, hi = resolved["min_guidance_scale"], resolved["max_guidance_scale"]
    mixed = pc.fill_null(pc.and_(pc.greater(lo, 1.0), pc.less_equal(hi, 1.0)), False)
    for i in np.flatnonzero(mixed.to_numpy(zero_copy_only=False)):
        problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), "min_guidance_scale", lo[i].as_py(),
                                f"at most 1 while max_guidance_scale is {hi[i].as_py()} (the pipeline turns guidance "
                                "on from max_guidance_scale alone): raise max_guidance_scale above 1 or lower this"))
    if max_row_bytes is None:
        return problems
    h, w, f = (pc.fill_null(resolved[k], 0).to_numpy().astype(np.float64) for k in ("height", "width", "num_frames"))
    need = row_memory_bytes(h, w, f)
    for i in np.flatnonzero(need > max_row_bytes):
        problems.append(Problem(
            int(rows[i].as_py()), ids[i].as_py(), "height x width x num_frames",
            f"{int(h[i])}x{int(w[i])}x{int(f[i])} (about {human_bytes(need[i])})",
            f"rows that need at most {ROW_MEMORY_KEY}={max_row_bytes} ({human_bytes(max_row_bytes)}): the video as "
            "float32 and the attention over its frames (README, Manifest schema); use a smaller size or fewer "
            f"frames, or raise {ROW_MEMORY_KEY} if the machine has the memory"))
    return problems


def _id_strings(values: pa.ChunkedArray, column: str, source: str) -> pa.ChunkedArray:
    """The id column as strings: text, numbers and bytes that are UTF-8 text; anything else is refused (a list or
    struct of ids, or bytes that are not text, cannot name a file)."""
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        raise ManifestError(source, [Problem(None, None, column, f"<{values.type} column>",
                                             "text ids (a string column), integers, or bytes that are UTF-8 text; "
                                             "convert the column to strings, or drop it to derive ids")]) from None


def _id_problems(ids: pa.ChunkedArray, rows, column: str) -> list[Problem]:
    problems = []
    bad = pc.invert(pc.match_substring_regex(ids, ID_PATTERN))
    for i in np.flatnonzero(pc.fill_null(bad, True).to_numpy(zero_copy_only=False)):
        problems.append(Problem(int(rows[i].as_py()), None, column, ids[i].as_py(), ID_ALLOWED))
    # File names are compared case-insensitively: on macOS and Windows shares, A.mp4 and a.mp4 collide.
    folded = pc.utf8_lower(ids)
    counts = pc.value_counts(folded)
    dup_values = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(dup_values):
        mask = pc.is_in(folded, value_set=dup_values)
        for i in np.flatnonzero(mask.to_numpy(zero_copy_only=False)):
            problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), column, ids[i].as_py(),
                                    "a unique id (ids are compared ignoring case; they name the video files)"))
    return problems


def _resolve_images(image: pa.ChunkedArray, root: str) -> pa.ChunkedArray:
    is_url = pc.match_substring_regex(image, r"^[A-Za-z][A-Za-z0-9+.-]*://")
    expanded = pc.replace_substring_regex(image, r"^~/", os.path.expanduser("~").rstrip("/") + "/")
    is_abs = pc.starts_with(expanded, "/")
    joined = pc.binary_join_element_wise(pa.scalar(root.rstrip("/")), expanded, "/")
    return pc.if_else(pc.or_kleene(is_url, is_abs), expanded, joined)
