"""Files that are either absent or complete: write under a temporary name, fsync, rename into place."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def fsync_dir(path: str) -> None:
    """Make renames in ``path`` durable (a record must never reach disk before the video it points to)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str, hidden: bool = False, keep_extension: bool = False, durable: bool = True) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is fsynced, renamed to ``path`` and the rename made
    durable, on failure removed. Temporary names contain ``.tmp-`` so a later start can sweep what a killed
    process left. ``durable=False`` skips both fsyncs, for files that are rewritten every few seconds and
    worthless after a crash (heartbeats): the rename alone keeps readers from seeing half a file."""
    directory, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    tmp_name = f"{'.' if hidden else ''}{name}.tmp-{os.getpid()}{ext if keep_extension else ''}"
    tmp = os.path.join(directory, tmp_name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(directory or ".")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path: str, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp, open(tmp, "w") as f:
        f.write(text)
