"""Manifests and images behind URLs that fsspec understands: s3://, gs://, hf://, memory://, file://, ...

The filesystem libraries are optional extras that users already have for their storage (s3fs, gcsfs,
huggingface_hub); credentials come from the environment as those libraries read them. A missing library is
named with the pip command that installs it, instead of fsspec's bare ImportError. Plain http(s) images do
not come here: images.fetch_bytes reads them with urllib, which needs no extra package.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable

from .util import first_line

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


def with_deadline(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """``fn()`` or RemoteError after ``timeout`` seconds: filesystem libraries have their own (often long)
    retry loops, so a stuck read is abandoned in a daemon thread rather than waited for."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name="remote-read")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise RemoteError(f"{what} did not finish within images.timeout={timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


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
