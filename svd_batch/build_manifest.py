"""`svd-batch-manifest`: build a manifest from a folder of images, a CSV, a JSONL or Parquet, with sweeps.

    svd-batch-manifest photos/ -o data/photos.parquet --sweep motion_bucket_id=60,127,180 --sweep seed=1,2

gives one row per image and per combination of swept values (the cartesian product), with stable,
readable ids like ``beach_sunset.motion_bucket_id=60.seed=1``. The result is validated as the runner
validates a manifest, then written as Parquet (whole, then renamed).

Ids of a folder's images are valid and unique for any folder, and the same every time: the
file's path without its extension, folders joined by ``_``, characters other than ASCII letters, digits and
``_ = + , @ . -`` replaced by ``_``. Names that would still share an id (ids are compared ignoring case) keep
their extension (``x.jpg``, ``x.png``); names equal even then (``A.jpg``, ``a.jpg``) get ``-`` and 8 hex
digits of a hash of their path instead; a name too long for the id limit (200 characters, less the longest
sweep suffix) is cut and ends in such a hash.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .fields import GENERATION_FIELDS
from .manifest import ManifestError, load_manifest
from .manifest_files import MAX_LISTED_PROBLEMS, read_table

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_=+,@.-]+")
_LEADING = re.compile(r"^[^A-Za-z0-9_]+")  # an id starts with an ASCII letter, digit or _
ID_LIMIT = 200  # manifest.ID_PATTERN
HASH = 8


def _safe(text: str) -> str:
    return _LEADING.sub("", _UNSAFE.sub("_", text)) or "image"


def _digest(text: str) -> str:
    import hashlib

    return hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=HASH // 2).hexdigest()


def folder_ids(names: list[str], room: int = ID_LIMIT) -> list[str]:
    """Unique, valid ids (at most ``room`` characters) for the images at these relative paths; see the module's
    doc for the rule. Deterministic: the same names give the same ids, whatever order they come in."""
    if room < 2 * HASH:
        raise ValueError(f"the sweep suffixes leave {room} characters of the {ID_LIMIT} an id may have: sweep "
                         "fewer columns or shorter values")

    def clashes(ids: list[str]) -> set[str]:
        folded = [i.lower() for i in ids]
        counts: dict[str, int] = {}
        for f in folded:
            counts[f] = counts.get(f, 0) + 1
        return {f for f, c in counts.items() if c > 1}

    def fit(i: int, text: str) -> str:
        return text if len(text) <= room else f"{text[:room - HASH - 1].rstrip('.')}-{_digest(names[i])}"

    flat = [n.replace(os.sep, "_").replace("/", "_") for n in names]
    ids = [fit(i, _safe(os.path.splitext(f)[0])) for i, f in enumerate(flat)]
    shared = clashes(ids)
    ids = [fit(i, _safe(f)) if ids[i].lower() in shared else ids[i] for i, f in enumerate(flat)]
    shared = clashes(ids)
    ids = [f"{_safe(os.path.splitext(flat[i])[0])[:room - HASH - 1]}-{_digest(names[i])}" if x.lower() in shared else x
           for i, x in enumerate(ids)]
    if clashes(ids):  # a hash equal to another file's own name: the whole path's hash settles it
        ids = [f"{x[:room - 2 * HASH - 1]}-{_digest(names[i] + chr(0))}{_digest(names[i])}" if x.lower() in clashes(ids)
               else x for i, x in enumerate(ids)]
    return ids


def parse_sweep(spec: str) -> tuple[str, list[Any]]:
    key, sep, values = spec.partition("=")
    if not sep or not values:
        raise ValueError(f"--sweep {spec!r}: write it as column=value1,value2,...")
    if key not in GENERATION_FIELDS:
        raise ValueError(f"--sweep {spec!r}: {key!r} is not a generation column ({', '.join(GENERATION_FIELDS)})")
    out: list[Any] = []
    for v in values.split(","):
        v = v.strip()
        try:
            out.append(int(v))
        except ValueError:
            try:
                out.append(float(v))
            except ValueError:
                raise ValueError(f"--sweep {spec!r}: {v!r} is not a number") from None
    return key, out


def read_source(source: str, manifest_dir: str, image_column: str = "image",
                id_room: int = ID_LIMIT) -> list[dict[str, Any]]:
    """Rows with at least `image` and `id`; folder images are stored relative to the manifest's folder, with ids
    of at most ``id_room`` characters (folder_ids)."""
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for f in sorted(files):
                if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                    full = os.path.join(root, f)
                    found.append((os.path.relpath(full, source), os.path.relpath(os.path.abspath(full), manifest_dir)))
        ids = folder_ids([rel for rel, _ in found], id_room)
        return [{"id": i, "image": image} for i, (_, image) in zip(ids, found)]
    if source.endswith(".parquet") or ("*" in source and ".parquet" in source):
        return _parquet_rows(source, manifest_dir, image_column)
    if source.endswith(".csv"):
        with open(source, newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif source.endswith((".jsonl", ".ndjson")):
        with open(source) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"{source}: expected a folder of images, a .csv or a .jsonl file")
    base = os.path.dirname(os.path.abspath(source))
    for i, r in enumerate(rows):
        if image_column != "image":
            r["image"] = r.pop(image_column, None)
        img = r.get("image")
        if img and "://" not in img and not os.path.isabs(img):
            # Relative paths in the source are relative to the source file; keep them valid from the manifest.
            r["image"] = os.path.relpath(os.path.join(base, img), manifest_dir)
        for k in GENERATION_FIELDS:  # CSV cells are text: numbers become numbers, empty cells nulls
            if isinstance(r.get(k), str):
                r[k] = None if r[k] == "" else (float(r[k]) if "." in r[k] or "e" in r[k].lower() else int(r[k]))
    return _with_content_ids(rows, [str(r.get("image") or "") for r in rows])


def _with_content_ids(rows: list[dict[str, Any]], refs: list[str]) -> list[dict[str, Any]]:
    """Rows without an id get the runner's content id (image name + a hash of the image as written and the
    row's own generation cells), never one from their position: adding a line to the source keeps every other
    row's id, seed and video."""
    import pyarrow as pa

    from .manifest import _derived_ids

    missing = [i for i, r in enumerate(rows) if not r.get("id")]
    if not missing:
        return rows
    cells = [f for f in GENERATION_FIELDS if any(rows[i].get(f) is not None for i in missing)]
    table = pa.table({"image": [refs[i] for i in missing],
                      **{f: [None if rows[i].get(f) is None else str(rows[i][f]) for i in missing] for f in cells}})
    for i, new in zip(missing, _derived_ids(table, table["image"], cells).to_pylist()):
        rows[i]["id"] = new
    return rows


def _parquet_rows(source: str, manifest_dir: str, image_column: str) -> list[dict[str, Any]]:
    """Rows of a Parquet dataset (local or a URL), e.g. Hugging Face shards with embedded images: an embedded
    image becomes a reference to its cell (``parquet://<shard>#row=<n>&column=...``), so the new manifest
    stays small and sweeps do not copy image bytes."""
    from .remote import is_url

    table, _ = read_table(source, {"image": image_column})
    if image_column not in table.column_names:
        raise ValueError(f"{source}: no column {image_column!r} (name the image column with --image-column)")
    cells = table["__image_uri"].to_pylist() if "__image_uri" in table.column_names else [None] * table.num_rows
    base = source.rsplit("/", 1)[0] if is_url(source) else os.path.dirname(os.path.abspath(source))
    rows, refs = [], []
    for i, (r, cell) in enumerate(zip(table.drop_columns([c for c in ("__image_uri",) if c in table.column_names])
                                      .to_pylist(), cells)):
        ref = r.pop(image_column)
        if cell is not None:
            image = cell
        elif ref and not is_url(ref) and not os.path.isabs(ref):
            image = f"{base}/{ref}" if is_url(base) else os.path.relpath(os.path.join(base, ref), manifest_dir)
        else:
            image = ref
        r["image"] = image
        rows.append(r)
        refs.append(str(ref or image or ""))
    return _with_content_ids(rows, refs)


def _suffix(keys: list[str], combo: tuple) -> str:
    return "." + ".".join(f"{k}={v}" for k, v in zip(keys, combo))


def expand(rows: list[dict[str, Any]], sweeps: list[tuple[str, list[Any]]]) -> list[dict[str, Any]]:
    if not sweeps:
        return rows
    keys = [k for k, _ in sweeps]
    out = []
    for r in rows:
        for combo in itertools.product(*(v for _, v in sweeps)):
            out.append({**r, **dict(zip(keys, combo)), "id": f"{r['id']}{_suffix(keys, combo)}"})
    return out


def build(source: str, output: str, sweeps: list[str], image_column: str = "image") -> int:
    manifest_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(manifest_dir, exist_ok=True)
    swept = [parse_sweep(s) for s in sweeps]
    longest = max((len(_suffix([k for k, _ in swept], c)) for c in itertools.product(*(v for _, v in swept))),
                  default=0) if swept else 0
    rows = expand(read_source(source, manifest_dir, image_column, ID_LIMIT - longest), swept)
    if not rows:
        raise ValueError(f"{source}: no images found")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({k: [r.get(k) for r in rows] for k in keys})
    tmp = f"{output}.tmp-{os.getpid()}.parquet"
    pq.write_table(table, tmp)
    try:
        from hydra import compose, initialize_config_module

        from .settings import register_resolvers

        register_resolvers()

        with initialize_config_module("svd_batch.conf", version_base="1.3"):
            generation = dict(compose("config").generation)
        try:
            load_manifest(tmp, generation)
        except ManifestError as exc:  # named after the source, in this command's words (not the temporary file's)
            n = len(exc.problems)
            raise ValueError(
                f"the rows built from {source} have {n} problem{'s' if n != 1 else ''}, so {output} was not "
                "written. Fix them in the source (or, for ids, leave the id column out: ids are then derived) and "
                "run svd-batch-manifest again:\n" + "\n".join(f"  {p}" for p in exc.problems[:MAX_LISTED_PROBLEMS])
                + (f"\n  ... and {n - MAX_LISTED_PROBLEMS} more" if n > MAX_LISTED_PROBLEMS else "")) from None
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(rows)
