"""Step 1 of a run: read the Parquet manifest, validate it, and resolve every row's effective values.

The manifest stays a columnar pyarrow Table from start to end (validation and default-filling are vector
operations), so a manifest of a million rows costs seconds and megabytes, not Python objects per row.
Every problem is collected before reporting, so a user fixes a bad manifest in one round trip.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from .fields import FLOAT_FIELDS, GENERATION_FIELDS, INT_FIELDS, RULES, arrow_type

# Ids become file names (videos/<id>.mp4), so they are restricted to characters that are safe on every
# filesystem, cannot climb out of videos/ and cannot hide (no leading dot).
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,199}$"
ID_ALLOWED = "1-200 characters of letters, digits and . _ = + , @ -, not starting with '.' or '-'"
MAX_LISTED_PROBLEMS = 50


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


def _files(path: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.endswith(".parquet") and not f.startswith((".", "_"))
        )
    else:
        files = [path]
    return files


def read_table(path: str, columns: Mapping[str, str] | None = None) -> tuple[pa.Table, str]:
    """Read a Parquet file, directory of Parquet files or glob, in a deterministic row order."""
    source = os.path.abspath(path)
    if not any(ch in path for ch in "*?[") and not os.path.exists(path):
        raise ManifestError(
            source,
            [Problem(None, None, "manifest.path", path, "an existing Parquet file, directory or glob")],
            hint="Point manifest.path at your manifest:",
        )
    files = _files(path)
    if not files:
        raise ManifestError(
            source,
            [Problem(None, None, "manifest.path", path, "a directory or glob that holds .parquet files")],
            hint="No Parquet files were found:",
        )
    schema = _unified_schema(files, source) if len(files) > 1 else None
    try:
        # Sorted file names, then row order within each file: the same directory read twice gives the same
        # order, which sharding and resume rely on.
        table = pads.dataset(files, schema=schema, format="parquet").to_table(use_threads=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(
            source,
            [Problem(None, None, "manifest.path", path, f"readable Parquet with one schema ({exc})")],
            hint="It could not be read as Parquet:",
        ) from None
    return table, source


def _unified_schema(files: list[str], source: str) -> pa.Schema:
    """Shards must agree on each column's type (ints in one and floats in another are fine, and a column
    missing from some shards reads as nulls there)."""
    import pyarrow.parquet as pq

    seen: dict[str, tuple[pa.DataType, str]] = {}
    problems, schemas = [], []
    for f in files:
        try:
            schema = pq.read_schema(f)
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
    """
    raw, source = read_table(path, columns)
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
    ids_raw = raw[theirs["id"]] if theirs["id"] in raw.column_names else None

    # 1. Image column.
    if theirs["image"] not in raw.column_names:
        raise ManifestError(
            source,
            [Problem(None, None, theirs["image"], "<missing>", "a string column of image paths or http(s) URLs")],
            hint="The required image column is missing (map yours with manifest.columns.image=<your column>):",
        )
    image = raw[theirs["image"]]
    if not pa.types.is_string(image.type) and not pa.types.is_large_string(image.type):
        raise ManifestError(source, [Problem(None, None, theirs["image"], str(image.type), "strings")])
    image = pc.cast(image, pa.string())
    bad_image = pc.or_kleene(pc.is_null(image), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(image)), 0))

    # 2. Ids: given ones are checked; missing ones are derived from the row's content (never its position).
    cells = [theirs[f] for f in GENERATION_FIELDS if theirs[f] in raw.column_names]
    if ids_raw is not None and ids_raw.null_count == 0:
        ids = pc.cast(ids_raw, pa.string())  # the common case at scale: no string work for derived ids
    elif ids_raw is not None:
        ids_given = pc.cast(ids_raw, pa.string())
        ids = pc.if_else(pc.is_null(ids_given), _derived_ids(raw, image, cells), ids_given)
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
                                "a non-empty local path or http(s) URL"))
    problems += _range_problems(resolved, rows, ids)
    problems += _id_problems(ids, rows, theirs["id"])
    if problems:
        problems.sort(key=lambda p: (-1 if p.row is None else p.row, p.column))
        raise ManifestError(source, problems)

    root = image_root or os.path.dirname(source if os.path.isfile(source) else source.rstrip("/*"))
    uri = _resolve_images(image, os.path.abspath(root))

    used = set(theirs.values())
    extra = [c for c in raw.column_names if c not in used and c != "__row"]
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
    by_digest = np.argsort(digests, kind="stable")
    sorted_d = digests[by_digest]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_d)) + 1] if len(sorted_d) else np.zeros(0, np.int64)
    lens = np.diff(np.r_[group_start, len(sorted_d)])
    occurrence = np.empty(len(digests), np.int64)
    occurrence[by_digest] = np.arange(len(digests)) - np.repeat(group_start, lens)
    hexes = np.char.mod("-%010x", digests)
    dup = occurrence > 0
    if dup.any():
        hexes = hexes.astype(object)
        hexes[dup] = [f"{h}-{k + 1}" for h, k in zip(hexes[dup], occurrence[dup])]
    ids = hexes
    return pc.binary_join_element_wise(stem, pa.array(ids.astype(object), pa.string()), "")


def _typed_column(raw: pa.Table, col: str, name: str, rows, ids) -> tuple[pa.ChunkedArray, list[Problem]]:
    want = arrow_type(name)
    if col not in raw.column_names:
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), []
    values = raw[col]
    t = values.type
    if pa.types.is_null(t):
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), []
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        kind = "integer" if name in INT_FIELDS else "number"
        return pa.chunked_array([pa.nulls(raw.num_rows, want)]), [
            Problem(None, None, col, f"<{t} column>", f"a {kind} column (nulls allowed); convert the column to numbers")
        ]
    problems = []
    if pa.types.is_floating(t):
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, t), values)  # pandas writes missing as NaN
        if name in INT_FIELDS:
            # pandas stores an integer column with missing cells as floats: accept whole numbers.
            frac = pc.not_equal(values, pc.floor(values))
            for i in np.flatnonzero(pc.fill_null(frac, False).to_numpy(zero_copy_only=False)):
                problems.append(Problem(int(rows[i].as_py()), ids[i].as_py(), col, values[i].as_py(), RULES[name][3]))
            values = pc.if_else(pc.fill_null(frac, False), pa.scalar(None, t), values)
            ok = pc.and_(pc.greater_equal(values, -(2.0**63)), pc.less(values, 2.0**63))
            values = pc.if_else(pc.fill_null(ok, True), values, pa.scalar(None, t))
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
