"""Manifests and images behind URLs that fsspec understands: s3://, gs://, hf://, memory://, file://, ...

The filesystem libraries are optional extras that users already have for their storage (s3fs, gcsfs,
huggingface_hub); credentials come from the environment as those libraries read them. A missing library is
named with the pip command that installs it, instead of fsspec's bare ImportError. Plain http(s) images do
not come here: images.fetch_bytes reads them with urllib, which needs no extra package.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from .util import first_line, in_thread

URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# fsspec protocol -> (the package that implements it, our extra that installs it)
PACKAGES = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "hf": ("huggingface_hub", "hf"),
    "http": ("aiohttp", "http"), "https": ("aiohttp", "http"),
    "az": ("adlfs", None), "abfs": ("adlfs", None), "abfss": ("adlfs", None),
}


class RemoteError(Exception):
    """A URL cannot be read: missing package, unknown protocol, not found, too slow or too big."""


def is_url(path: str) -> bool:
    return bool(URL.match(path))


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for ``url``; a missing package becomes a RemoteError naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        package, extra = PACKAGES.get(protocol(url), (None, None))
        install = f"pip install {package}" if package else "install the fsspec filesystem package for it"
        if extra:
            install += f" (or pip install 'svd-batch[{extra}]')"
        raise RemoteError(f"reading {protocol(url)}:// URLs needs a package that is not installed: {install} "
                          f"({exc})") from None
    except ValueError as exc:
        raise RemoteError(f"unsupported URL scheme in {url!r}: {exc} (use a local path, http(s)://, or a protocol "
                          "fsspec knows such as s3://, gs://, hf://)") from None


def _outcome(box: dict[str, Any]) -> Any:
    if "error" in box:
        raise box["error"]
    return box["value"]


def with_deadline(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn()`` or RemoteError after ``timeout`` seconds: filesystem libraries have their own (often long)
    retry loops, so a stuck read is abandoned in a daemon thread rather than waited for."""
    t, box = in_thread(fn, "remote-read")
    t.join(timeout)
    if t.is_alive():
        raise RemoteError(f"{what} did not finish within images.timeout={timeout:g} s")
    return _outcome(box)


# -- reads of unknown length (a manifest): bounded by silence, not by their total time -----------------------
READ_BLOCK = 4 << 20  # a read larger than this is made in blocks, so a slow but moving transfer shows progress


class Activity:
    """When a remote read last made progress: a filesystem call returned, or a block of bytes arrived."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def touch(self) -> None:
        self.at = time.monotonic()


class _WatchedFile:
    """A file of a watched filesystem: every block read counts as progress."""

    def __init__(self, f: Any, activity: Activity):
        self._f, self._activity = f, activity

    def read(self, n: int | None = -1) -> bytes:
        parts, left = [], (None if n is None or n < 0 else n)
        while left is None or left > 0:
            block = self._f.read(READ_BLOCK if left is None else min(left, READ_BLOCK))
            self._activity.touch()
            if not block:
                break
            parts.append(block)
            if left is not None:
                left -= len(block)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> "_WatchedFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


class WatchedFileSystem:
    """An fsspec filesystem whose calls and file reads mark progress on an Activity (the filesystem itself is
    not changed: fsspec shares cached instances between users)."""

    def __init__(self, fs: Any, activity: Activity):
        self._fs, self._activity = fs, activity

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> _WatchedFile:
        f = self._fs.open(path, mode, **kwargs)
        self._activity.touch()
        return _WatchedFile(f, self._activity)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attr(*args, **kwargs)
            self._activity.touch()
            return out

        return call

    def arrow(self):
        """The same, as a pyarrow filesystem (for pyarrow's readers)."""
        import pyarrow.fs as pafs

        return pafs.PyFileSystem(pafs.FSSpecHandler(self))


def without_stall(fn: Callable[[Activity], Any], timeout: float, what: str) -> Any:
    """``fn(activity)``, abandoned with RemoteError once ``timeout`` seconds pass without progress on
    ``activity``: a manifest of any size may take minutes to arrive, but a hung or unreachable server (a
    library retrying for minutes inside one call) must not hold the run for longer than the timeout."""
    activity = Activity()
    t, box = in_thread(lambda: fn(activity), "remote-read")
    while True:
        t.join(min(1.0, timeout))
        if not t.is_alive():
            return _outcome(box)
        if time.monotonic() - activity.at > timeout:
            raise RemoteError(f"{what}: nothing arrived for {timeout:g} s (images.timeout), so the read was "
                              "abandoned: the server is unreachable or hung")


def read_bytes(url: str, timeout: float, max_bytes: int) -> bytes:
    """The whole object at ``url``, within ``timeout`` seconds and at most ``max_bytes`` bytes."""
    def read() -> bytes:
        fs, path = filesystem(url)  # inside the deadline: some filesystems connect when created
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise RemoteError(f"not found: {url}") from None
        if fs.isdir(path):
            raise RemoteError(f"is a directory, not an image: {url}")
        if size is not None and size > max_bytes:
            raise RemoteError(f"{url} is {size} bytes, over the {max_bytes} byte cap (images.max_bytes)")
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise RemoteError(f"{url} holds more than the {max_bytes} byte cap (images.max_bytes)")
        return data

    try:
        return with_deadline(read, timeout, url)
    except RemoteError:
        raise
    except FileNotFoundError:
        raise RemoteError(f"not found: {url}") from None
    except Exception as exc:  # noqa: BLE001 - every library has its own errors; one line for the row's record
        raise RemoteError(f"could not read {url}: {type(exc).__name__}: {first_line(exc, 300)}") from None
