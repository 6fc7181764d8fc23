"""One shard of an export, written to a local file a sample at a time (so memory holds one sample, or one Parquet
row group, never the shard): a WebDataset tar with its Parquet sidecar, or a Hugging Face Parquet file.

WebDataset groups a tar's members into samples by key, the member name up to its *first* dot, so an id with
dots (``beach.motion_bucket_id=60.seed=1``) cannot be a key as it is: ``sample_key`` writes its dots (and
percent signs) percent-encoded, and the real id travels in the sample's JSON."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import io
import json
import math
import os
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# Hugging Face datasets' Video and Image features are this struct, declared in the schema's "huggingface" metadata.
MEDIA_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# ("image" is taken: results.parquet's own column, the manifest's reference to the image)
HF_FEATURES = {"video": {"_type": "Video"}, "input_image": {"_type": "Image"}}
ROW_GROUP_BYTES = 64 << 20  # datasets aims at row groups of at most 100 MB: one row is read by its row group
ROW_GROUP_ROWS = 100


def sample_key(row_id: str) -> str:
    """A WebDataset key for an id: no dot (the key ends at the first dot), reversible (``unquote`` gives the id)."""
    return row_id.replace("%", "%25").replace(".", "%2E")


def jsonable(value: Any) -> Any:
    """A results cell as JSON: timestamps in ISO 8601, bytes in base64, NaN as null, nested values recursively."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(x, tuple) and len(x) == 2 for x in value):  # an Arrow map: (key, value) pairs
            return {str(k): jsonable(v) for k, v in value}
        return [jsonable(x) for x in value]
    return str(value)


def sample_json(row: dict[str, Any]) -> bytes:
    return json.dumps({k: jsonable(v) for k, v in row.items()}, ensure_ascii=False, allow_nan=False).encode()


class Sample:
    """One row to pack: its results row, key, video bytes and input image bytes (None when the run has none)."""

    def __init__(self, row: dict[str, Any], key: str, video: bytes, image: bytes | None, mtime: float):
        self.row, self.key, self.video, self.image, self.mtime = row, key, video, image, mtime

    @property
    def size(self) -> int:
        return len(self.video) + len(self.image or b"") + 2048  # with the JSON and tar headers, roughly


class TarShard:
    """``<key>.mp4``, ``<key>.json``, ``<key>.jpg`` per sample (GNU tar: names of any length), plus the rows for
    the sidecar."""

    suffix = ".tar"

    def __init__(self, path: str, schema: pa.Schema):
        self.tar = tarfile.open(path, "w", format=tarfile.GNU_FORMAT)
        self.schema = pa.schema([("key", pa.string()), *schema])
        self.rows: list[dict[str, Any]] = []
        self.count = 0
        self.size = 0

    def _member(self, name: str, data: bytes, mtime: float) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
        self.tar.addfile(info, io.BytesIO(data))

    def add(self, s: Sample) -> None:
        self._member(f"{s.key}.mp4", s.video, s.mtime)
        self._member(f"{s.key}.json", sample_json(s.row), s.mtime)
        if s.image is not None:
            self._member(f"{s.key}.jpg", s.image, s.mtime)
        self.rows.append({"key": s.key, **s.row})
        self.count += 1

    def bytes_written(self) -> int:
        return self.size if self.tar.closed else self.tar.fileobj.tell()

    def close(self) -> None:
        if not self.tar.closed:
            self.tar.close()
            self.size = os.path.getsize(self.tar.name)

    def sidecar(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=self.schema)


class ParquetShard:
    """``video`` and ``input_image`` columns typed as datasets' Video and Image features (the bytes in the file), then
    every results column; row groups of at most ROW_GROUP_ROWS rows or ROW_GROUP_BYTES of media."""

    suffix = ".parquet"

    def __init__(self, path: str, schema: pa.Schema):
        meta = {b"huggingface": json.dumps({"info": {"features": HF_FEATURES}}).encode()}
        self.schema = pa.schema([("video", MEDIA_TYPE), ("input_image", MEDIA_TYPE), *schema], metadata=meta)
        self.writer = pq.ParquetWriter(path, self.schema)
        self.buffer: list[dict[str, Any]] = []
        self.buffered = 0
        self.written = 0
        self.count = 0

    def add(self, s: Sample) -> None:
        name = s.row["id"]
        self.buffer.append({"video": {"bytes": s.video, "path": f"{name}.mp4"},
                            "input_image": None if s.image is None else {"bytes": s.image, "path": f"{name}.jpg"}, **s.row})
        self.buffered += s.size
        self.count += 1
        if len(self.buffer) >= ROW_GROUP_ROWS or self.buffered >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
            self.written += self.buffered
            self.buffer, self.buffered = [], 0

    def bytes_written(self) -> int:
        return self.written + self.buffered

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def sidecar(self) -> None:
        return None
