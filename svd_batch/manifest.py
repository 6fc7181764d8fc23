"""Step 1 of a run: read the Parquet manifest, validate it, and resolve every row's effective values.

The manifest stays a columnar pyarrow Table from start to end (validation and default-filling are vector
operations), so a manifest of a million rows costs seconds and megabytes, not Python objects per row.
Every problem is collected before reporting, so a user fixes a bad manifest in one round trip.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .fields import FLOAT_FIELDS, GENERATION_FIELDS, INT_FIELDS, ROW_MEMORY_KEY, RULES, arrow_type, row_memory_bytes
from .manifest_files import (DEFAULT_TIMEOUT, IMAGE_TYPES, ManifestError, Problem, _numeric,
                             read_table)
from .remote import is_url
from .util import human_bytes, occurrence

if TYPE_CHECKING:
    from .settings import RunSettings

# Ids become file names (videos/<id>.mp4), so they are restricted to characters that are safe on every
# filesystem, cannot climb out of videos/ and cannot hide (no leading dot).
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,199}$"
ID_ALLOWED = ("1-200 characters of ASCII letters (A-Z, a-z), digits and . _ = + , @ -, starting with an ASCII "
              "letter, a digit or _")


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
    ids_raw = _id_strings(raw[theirs["id"]], theirs["id"], source, rows) if theirs["id"] in raw.column_names else None

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


def _id_strings(values: pa.ChunkedArray, column: str, source: str, rows: pa.ChunkedArray) -> pa.ChunkedArray:
    """The id column as strings: text, numbers and bytes that are UTF-8 text; anything else is refused (a list or
    struct of ids, or bytes that are not text, cannot name a file), bytes that are not text naming their rows."""
    try:
        return pc.cast(values, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
            bad = []
            for i, v in enumerate(values.to_pylist()):  # the error path only: which rows are not text
                try:
                    v is None or v.decode("utf-8")
                except UnicodeDecodeError:
                    bad.append(Problem(int(rows[i].as_py()), None, column, v,
                                       "an id that is UTF-8 text (these bytes are not): write it as text, or clear "
                                       "the cell to derive the row's id"))
            if bad:
                raise ManifestError(source, bad) from None
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


def load_for(s: "RunSettings") -> Manifest:
    """The manifest a run's settings name, read and validated (ManifestError naming every problem)."""
    m = s.manifest
    import dataclasses

    try:
        return load_manifest(m.path, dataclasses.asdict(s.generation), columns=dict(m.columns),
                             defaults=dict(m.defaults), image_root=m.image_root, limit=m.limit, where=dict(m.where),
                             max_row_bytes=s.runtime.max_row_bytes, timeout=s.images.timeout)
    except ManifestError as exc:
        exc.dataset = m.name or None
        raise
