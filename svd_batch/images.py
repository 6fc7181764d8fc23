"""Loading a row's image the way diffusers' ``load_image`` does: open, apply EXIF orientation, RGB.

Local paths, http(s) URLs, fsspec URLs (s3://, gs://, hf://, memory://, ...) and image bytes embedded in
the Parquet manifest all work; remote reads have a deadline and a size cap so one bad server cannot stall
or flood a run. Every failure becomes an ``ImageError`` with a reason a person can act on.
Unusual but valid images (CMYK, palette, 16-bit, grey, alpha, animated, rotated by EXIF) are converted,
not failed.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import stat
import threading
import urllib.error
import urllib.request
import warnings

import numpy as np
import PIL.Image
import PIL.ImageOps
import pyarrow as pa
import pyarrow.compute as pc

from . import embedded
from .remote import RemoteError, is_url, protocol, with_deadline
from .remote import read_bytes as remote_bytes
from .util import first_line, human_bytes


class ImageError(Exception):
    """The row's image cannot be used; the row is recorded as failed and the run goes on."""


class _Deadline:
    """One fetch's total time limit. A socket timeout bounds each read, not the whole: a server that sends its
    headers a byte at a time would never trip it. When the time is up this closes the fetch's sockets, so a
    read blocked in the middle of a header returns at once."""

    def __init__(self, seconds: float):
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's opener, with every connection it makes (redirects, proxies, TLS tunnels) watched by ``deadline``."""
    def watched(base):
        class Connection(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                connect = self._create_connection
                self._create_connection = lambda *a, **kw: deadline.watch(connect(*a, **kw))
        return Connection

    plain, tls = watched(http.client.HTTPConnection), watched(http.client.HTTPSConnection)

    class HTTP(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(plain, req, **kwargs)

    class HTTPS(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(tls, req, **kwargs)

    return urllib.request.build_opener(HTTP, HTTPS)


def fetch_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    """GET ``url`` within ``timeout`` seconds in all (headers included: a trickling server is cut off too) and at
    most ``max_bytes`` bytes. Any failure, a malformed answer included, is an ImageError: the row's, not the run's."""
    deadline = _Deadline(timeout)
    too_slow = f"{url} did not finish within images.timeout={timeout:g} s"
    chunks, size = [], 0
    try:
        with _opener(deadline).open(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            declared = resp.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"{url} is {declared} bytes, over the {max_bytes} byte cap (images.max_bytes)")
            while True:
                chunk = resp.read1(65536)  # returns what has arrived; read() would wait for all
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"{url} sends more than the {max_bytes} byte cap (images.max_bytes)")
                chunks.append(chunk)
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageError(f"HTTP {exc.code} {(str(exc.reason).splitlines() or [''])[0][:200]} from {url}") from None
    except Exception as exc:  # noqa: BLE001 - malformed answers raise http.client's own errors, not OSError
        if deadline.expired:
            raise ImageError(too_slow) from None
        reason = getattr(exc, "reason", None)  # URLError's cause: refused, unknown host, timed out
        detail = str(reason) if reason else f"{type(exc).__name__}: {exc}"
        # The setting is named only when it is what cut the fetch short: a malformed answer is no timeout.
        timed_out = isinstance(exc, TimeoutError) or isinstance(reason, TimeoutError)
        raise ImageError(f"could not fetch {url}: {(detail.splitlines() or [''])[0][:200]}"
                         + (f" (images.timeout={timeout:g} s)" if timed_out else "")) from None
    finally:
        deadline.cancel()
    if deadline.expired:  # the watchdog closed the socket: what arrived is cut short
        raise ImageError(too_slow)
    return b"".join(chunks)


# Modes of one band deeper than 8 bits: a plain convert would clip nearly everything to white.
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
CHUNK_PIXELS = 1 << 21  # converted a band of rows at a time: 16 MB of float64, whatever the image's size


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Any mode to 8-bit RGB as a viewer shows it (RGBA drops alpha, as diffusers' ``load_image`` does)."""
    if getattr(image, "is_animated", False):
        image.seek(0)  # animated GIF/WebP/APNG: the first frame
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in HIGH_DEPTH:
        arr = np.asarray(image)
        hi = arr.max() if arr.size else 0
        top = 1.0 if image.mode == "F" and hi <= 1.0 else (65535.0 if hi > 255 else 255.0)
        out = np.empty(arr.shape, np.uint8)
        step = max(1, CHUNK_PIXELS // max(1, arr.shape[1]))
        for r in range(0, arr.shape[0], step):  # a whole float64 copy would be 4x a 16-bit image
            out[r:r + step] = np.clip(arr[r:r + step].astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        del arr  # before the RGB copy is made
        image = PIL.Image.fromarray(out, "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """Memory that decoding and converting an image of this size and mode takes at its peak: the decoded image
    (PIL keeps 4 bytes a pixel for every mode of several bands), a rotated or array copy of it, the 8-bit grey
    of a deep image, and the RGB result."""
    try:
        bands = PIL.Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    depth = 4 if bands > 1 or mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    per_pixel = 2 * depth + 4 + (1 if mode in HIGH_DEPTH else 0)
    return int(size[0]) * int(size[1]) * per_pixel


def load_image(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
               max_pixels: int | None = 178956970, max_decoded_bytes: int | None = None) -> PIL.Image.Image:
    return load_image_digest(uri, timeout=timeout, max_bytes=max_bytes, max_pixels=max_pixels,
                             max_decoded_bytes=max_decoded_bytes)[0]


def read_source(uri: str, timeout: float, max_bytes: int) -> bytes:
    """The encoded bytes behind ``uri``: a local path, an http(s) URL, an fsspec URL or a Parquet cell."""
    if uri.startswith(("http://", "https://")):
        return fetch_bytes(uri, timeout, max_bytes)
    if uri.startswith(embedded.PREFIX):
        try:
            data = embedded.read_cell(uri, timeout)
        except RemoteError as exc:
            raise ImageError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - whatever a damaged shard raises, it is this row's failure
            raise ImageError(f"could not read the embedded image {uri}: {type(exc).__name__}: {exc}") from None
        if data is None:
            raise ImageError(f"the embedded image cell is empty: {uri}")
        if len(data) > max_bytes:
            raise ImageError(f"{uri} is {len(data)} bytes, over the {max_bytes} byte cap (images.max_bytes)")
        return data
    if is_url(uri) and protocol(uri) != "file":
        try:
            return remote_bytes(uri, timeout, max_bytes)
        except RemoteError as exc:
            raise ImageError(str(exc)) from None
    if is_url(uri):  # file://: the same checks as a plain path, where fsspec's open would wait on a FIFO
        from fsspec.implementations.local import LocalFileSystem

        uri = LocalFileSystem._strip_protocol(uri)
    return read_local(uri, timeout, max_bytes)


def read_local(path: str, timeout: float, max_bytes: int) -> bytes:
    """A local file's bytes, with the cap and deadline of a remote read. Only regular files are read: a FIFO
    blocks for ever, /dev/zero never ends, and a file on a hung network mount is abandoned at the deadline."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"file not found: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL character in the path
        raise ImageError(f"could not read {path!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageError(f"is a directory, not an image: {path}")
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path} is {_file_kind(info.st_mode)}, not a regular file: only files are read as images")
    if info.st_size > max_bytes:
        raise ImageError(f"{path} is {info.st_size} bytes, over the {max_bytes} byte cap (images.max_bytes)")

    def read() -> bytes:
        # Non-blocking open: if a FIFO took the file's place since the stat, the open must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ImageError(f"{path} is {_file_kind(os.fstat(fd).st_mode)}, not a regular file")
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageError(f"{path} holds more than the {max_bytes} byte cap (images.max_bytes)")
        return data

    try:
        return with_deadline(read, timeout, path)
    except RemoteError as exc:
        raise ImageError(str(exc)) from None
    except OSError as exc:
        raise ImageError(f"could not read {path}: {exc.strerror or exc}") from None


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def load_image_digest(uri: str, *, timeout: float = 30.0, max_bytes: int = 64 << 20,
                      max_pixels: int | None = 178956970,
                      max_decoded_bytes: int | None = None) -> tuple[PIL.Image.Image, str]:
    """The row's image and the sha256 of its encoded bytes (recorded, so a later start can tell whether
    the bytes behind a changed reference are still the same). Whatever reading, decoding or converting raises
    becomes an ImageError with a one-line reason: an odd file fails its row, never the run."""
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
                need = decoded_bytes(image.size, image.mode)
                if max_decoded_bytes is not None and need > max_decoded_bytes:
                    raise ImageError(
                        f"{uri} is {image.size[0]}x{image.size[1]} pixels of mode {image.mode}, which takes about "
                        f"{human_bytes(need)} to decode and convert, over runtime.max_row_bytes={max_decoded_bytes}; "
                        "use a smaller image, or raise runtime.max_row_bytes if the machine has the memory")
                image.load()
                return to_rgb(image), digest
    except ImageError:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image too large for images.max_pixels={max_pixels}: {exc}") from None
    except PIL.UnidentifiedImageError:
        raise ImageError(f"not an image file PIL can read: {uri}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"corrupt or truncated image {uri}: {first_line(exc, 300)}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise anything (NotImplementedError, AttributeError, ...)
        raise ImageError(f"could not decode {uri}: {type(exc).__name__}: {first_line(exc, 300)}") from None
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
