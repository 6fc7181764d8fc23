"""Loading a row's image the way diffusers' ``load_image`` does: open, apply EXIF orientation, RGB.

Local paths, http(s) URLs, fsspec URLs (s3://, gs://, hf://, memory://, ...) and image bytes embedded in
the Parquet manifest all work; remote reads have a deadline and a size cap so one bad server cannot stall
or flood a run. Every failure becomes an ``ImageError`` with a reason a person can act on.
Unusual but valid images (CMYK, palette, 16-bit, grey, alpha, animated, rotated by EXIF) are converted,
not failed.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
import urllib.error
import urllib.request
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow as pa
import pyarrow.compute as pc

from . import embedded
from .remote import RemoteError, is_url
from .remote import read_bytes as remote_bytes


class ImageError(Exception):
    """The row's image cannot be used; the row is recorded as failed and the run goes on."""


def fetch_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (not per read: a trickling server is cut off too)."""
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"{url} is {declared} bytes, over the {max_bytes} byte cap (images.max_bytes)")
            while True:
                if time.monotonic() > deadline:
                    raise ImageError(f"{url} did not finish within images.timeout={timeout:g} s")
                chunk = resp.read1(65536)  # returns what has arrived; read() would wait for all
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"{url} sends more than the {max_bytes} byte cap (images.max_bytes)")
                chunks.append(chunk)
    except urllib.error.HTTPError as exc:
        raise ImageError(f"HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageError(f"could not fetch {url}: {reason} (images.timeout={timeout:g} s)") from None
    return b"".join(chunks)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode to 8-bit RGB as a viewer shows it (RGBA drops alpha, as diffusers' ``load_image`` does)."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit grey: a plain convert would clip nearly everything to white.
        arr = np.asarray(image).astype(np.float64)
        top = 1.0 if image.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        image = PIL.Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
               max_pixels: int | None = 178956970) -> PIL.Image.Image:
    return load_image_digest(uri, timeout=timeout, max_bytes=max_bytes, max_pixels=max_pixels)[0]


def read_source(uri: str, timeout: float, max_bytes: int) -> bytes:
    """The encoded bytes behind ``uri``: a local path, an http(s) URL, an fsspec URL or a Parquet cell."""
    if uri.startswith(("http://", "https://")):
        return fetch_bytes(uri, timeout, max_bytes)
    if uri.startswith(embedded.PREFIX):
        try:
            data = embedded.read_cell(uri, timeout)
        except RemoteError as exc:
            raise ImageError(str(exc)) from None
        except (OSError, ValueError, IndexError, KeyError, pa.ArrowException) as exc:
            raise ImageError(f"could not read the embedded image {uri}: {type(exc).__name__}: {exc}") from None
        if data is None:
            raise ImageError(f"the embedded image cell is empty: {uri}")
        if len(data) > max_bytes:
            raise ImageError(f"{uri} is {len(data)} bytes, over the {max_bytes} byte cap (images.max_bytes)")
        return data
    if is_url(uri):
        try:
            return remote_bytes(uri, timeout, max_bytes)
        except RemoteError as exc:
            raise ImageError(str(exc)) from None
    if not os.path.exists(uri):
        raise ImageError(f"file not found: {uri}")
    if os.path.isdir(uri):
        raise ImageError(f"is a directory, not an image: {uri}")
    try:
        with open(uri, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ImageError(f"could not read {uri}: {exc.strerror or exc}") from None


def load_image_digest(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
                      max_pixels: int | None = 178956970) -> tuple[PIL.Image.Image, str]:
    """The row's image and the sha256 of its encoded bytes (recorded, so a later start can tell whether
    the bytes behind a changed reference are still the same)."""
    data = read_source(uri, timeout, max_bytes)
    digest = hashlib.sha256(data).hexdigest()
    source = io.BytesIO(data)
    old_limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x the limit; a configured limit is a limit.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(source) as image:
                image.load()
                return to_rgb(image), digest
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large for images.max_pixels={max_pixels}: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"not an image file PIL can read: {uri}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {uri}: {exc}") from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = old_limit


def changed_images(manifest: pa.Table, records: pa.Table, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
                   limit: int = 20) -> tuple[int, list[str]]:
    """Finished rows whose image is no longer the one their video was made from.

    A row whose image reference (``image``) or resolved location (``image_uri``, after image_root and the
    column mapping) differs from the recorded one is a candidate. Reading every image at every start would
    cost a full pass over the dataset, so only candidates are read again, and hashed against the recorded
    ``image_sha256``: a moved or re-sharded image with the same bytes is not a change. A candidate without a
    recorded hash (records from before hashes were kept) counts as changed. Bytes replaced under an unchanged
    reference and location are not seen (as with local files overwritten in place); overwrite=true or a new
    output.dir redoes such rows. Returns the count and up to ``limit`` descriptions."""
    if records.num_rows == 0 or "image" not in records.column_names:
        return 0, []
    ok = records.filter(pc.equal(records["status"], "ok"))
    pos = pc.index_in(manifest["id"], value_set=ok["id"])
    present = pc.is_valid(pos)
    m = manifest.filter(present)
    r = ok.take(pos.filter(present))
    moved = pc.fill_null(pc.not_equal(m["image"], r["image"]), False)
    if "image_uri" in r.column_names:
        moved = pc.or_(moved, pc.fill_null(pc.not_equal(m["image_uri"], r["image_uri"]), False))
    if not pc.any(moved).as_py():
        return 0, []
    m, r = m.filter(moved), r.filter(moved)
    has_sha = "image_sha256" in r.column_names
    rec_cols = [c for c in ("image", "image_uri", "image_sha256") if c in r.column_names]
    n, out = 0, []
    for mine, rec in zip(m.select(["id", "image", "image_uri"]).to_pylist(), r.select(rec_cols).to_pylist()):
        where = (f"image_uri {rec.get('image_uri')!r} -> {mine['image_uri']!r}"
                 if rec.get("image_uri") not in (None, mine["image_uri"])
                 else f"image {rec['image']!r} -> {mine['image']!r}")
        if not has_sha or rec.get("image_sha256") is None:
            n += 1
            if len(out) < limit:
                out.append(f"{mine['id']}: {where}")
            continue
        try:
            now = hashlib.sha256(read_source(mine["image_uri"], timeout, max_bytes)).hexdigest()
        except ImageError as exc:
            now = f"unreadable ({exc})"
        if now != rec["image_sha256"]:
            n += 1
            if len(out) < limit:
                out.append(f"{mine['id']}: {where} (other bytes: sha256 {rec['image_sha256'][:12]} -> {now[:12]})")
    return n, out
