"""Which files in ``output.dir`` are svd-batch's, so that nothing else there is ever deleted or overwritten.

A run creates its folder, or adopts one that is empty or that an earlier svd-batch run made (it keeps
``.svd-batch/owner.json`` there; folders made before that marker existed are known by their ``.svd-batch/``
state). Any other folder is refused before anything is written: ``output.dir=/home/me`` by mistake must not
cost a single file. Inside its folder svd-batch deletes only what it can name as its own: the videos, input
images and thumbnails of the ids it recorded, its state files, and temporary files whose names follow the one
pattern ``atomic.atomic_path`` gives them. Its subfolders must be real folders: writing through a symlinked
``videos/`` would write (and, with overwrite=true, delete) outside the output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from typing import Iterable

# The run folder's names: spelled here only (rundir.RunDir builds its paths from them).
STATE = ".svd-batch"
VIDEOS, INPUTS, REPORT, STATS, THUMBS = "videos", "inputs", "report", "stats", f"{STATE}/thumbs"
MARKER = os.path.join(STATE, "owner.json")
# How a folder lays out its per-row files. Version 2 (folders made since): videos/<ab>/<id>.mp4, inputs/<ab>/<id>.jpg
# and thumbs/<ab>/<id>.png, <ab> the first two hex digits of the id's SHA-1: 256 subfolders, about 4,000 files each
# at a million rows (listing a folder of a million files is slow on NFS and Lustre, and the Hub takes at most
# 10,000 per folder). Version 1 (no layout file: folders of earlier versions) keeps them flat, as they were.
LAYOUT = os.path.join(STATE, "layout.json")
FLAT, SPREAD = 1, 2
SPREAD_FOLDERS = (VIDEOS, INPUTS, THUMBS)
_SUBFOLDER = re.compile(r"^[0-9a-f]{2}$")

# The folders svd-batch writes into, relative to output.dir ("" is output.dir itself).
FOLDERS = ("", VIDEOS, INPUTS, REPORT, STATS, STATE, f"{STATE}/parts", f"{STATE}/done", THUMBS,
           f"{STATE}/members", f"{STATE}/jobs")

_ID = r"[A-Za-z0-9_][A-Za-z0-9._=+,@-]{0,199}"  # manifest.ID_PATTERN: ids name files
_SESSION = r"\d{20}-[0-9a-f]{8}"  # rundir.new_session(): a launch, a job
_MEMBER = rf"{_SESSION}-r\d{{5}}"  # one rank of one launch
# Per folder, the names of the files svd-batch writes there.
NAMES = {
    "": r"results\.parquet|config\.yaml|index\.html|contact_sheet\.png",
    VIDEOS: rf"{_ID}\.mp4|\.probe",
    INPUTS: rf"{_ID}\.jpg",
    REPORT: r"data-\d{5}\.js",
    STATS: r"rank-\d{5}\.json",
    STATE: r"run\.json|records\.parquet|lock|owner\.json|active|merge\.lock|merged\.json|job\.json|layout\.json",
    f"{STATE}/parts": rf"{_MEMBER}-\d{{5}}\.parquet|{_SESSION}-rank\d{{5}}-\d{{5}}\.parquet",
    f"{STATE}/members": rf"{_MEMBER}\.(?:json|lock|token\d+)",
    f"{STATE}/jobs": _SESSION,
    f"{STATE}/done": rf"{_SESSION}-rank\d{{5}}\.json",
    THUMBS: rf"{_ID}\.png",
}
# atomic_path's temporary names: [.]<name>.tmp-<pid>[<the name's extension>]
_TEMPORARY = {folder: re.compile(rf"^\.?(?:{names})\.tmp-\d+(?:\.[a-z0-9]{{1,4}})?$") for folder, names in NAMES.items()}
_FINAL = {folder: re.compile(rf"^(?:{names})$") for folder, names in NAMES.items()}
# The paginated gallery pages of earlier versions (index-2.html, ...), which the gallery removes.
OLD_PAGE = re.compile(r"^index-\d+\.html$")
# What a folder made by svd-batch before the marker existed holds.
_LEGACY = ("run.json", "records.parquet", "lock", "parts")


def subfolder(row_id: str) -> str:
    """The subfolder of a row's files in the spread layout."""
    return hashlib.sha1(row_id.encode()).hexdigest()[:2]


def layout(root: str) -> int | None:
    """The folder's layout version; None when it has no layout file (an earlier version's folder: flat)."""
    try:
        with open(os.path.join(root, LAYOUT)) as f:
            return int(json.load(f).get("version", FLAT))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, AttributeError):
        return FLAT


def set_layout(root: str, version: int) -> None:
    from .atomic import write_text_atomic

    write_text_atomic(json.dumps({"version": version, "subfolders": "sha1(id)[:2]" if version == SPREAD else None}),
                      os.path.join(root, LAYOUT))


def make_layout(root: str, fresh: bool) -> None:
    """Record the layout of a folder that has none (spread when ``fresh``: nothing recorded yet, else flat), and
    make every video subfolder before any rank writes, durably (no writer has to create one)."""
    from .atomic import fsync_dir

    if layout(root) is None:
        set_layout(root, SPREAD if fresh else FLAT)
    videos = os.path.join(root, VIDEOS)
    if layout(root) == SPREAD and not os.path.isdir(os.path.join(videos, "ff")):
        for k in range(256):
            os.makedirs(os.path.join(videos, f"{k:02x}"), exist_ok=True)
        fsync_dir(videos)


def subfolders(root: str, folder: str) -> list[str]:
    """The spread layout's real subfolders of ``folder`` (relative to output.dir); links are never followed."""
    path = real_folder(root, folder)
    if path is None:
        return []
    return [f"{folder}/{e.name}" for e in os.scandir(path)
            if _SUBFOLDER.match(e.name) and e.is_dir(follow_symlinks=False)]


def _spread(root: str) -> list[tuple[str, str]]:
    """(subfolder, the folder whose names it holds) for every spread subfolder of a spread-layout folder."""
    if layout(root) != SPREAD:
        return []
    return [(sub, folder) for folder in SPREAD_FOLDERS for sub in subfolders(root, folder)]


def is_temporary(folder: str, name: str) -> bool:
    """A name ``atomic_path`` gives a file svd-batch is writing in ``folder`` (relative to output.dir)."""
    pattern = _TEMPORARY.get(folder)
    return bool(pattern and pattern.match(name))


def is_ours(folder: str, name: str) -> bool:
    """A name svd-batch writes in ``folder`` (relative to output.dir)."""
    pattern = _FINAL.get(folder)
    return bool(pattern and pattern.match(name))


class RunDirError(Exception):
    """The run folder cannot be used as asked (not svd-batch's, locked, incompatible, or would be overwritten):
    nothing is run (exit 2)."""


def refused(message: str) -> Exception:
    return RunDirError(message)


def real_folder(root: str, folder: str) -> str | None:
    """``root/folder`` when it is a directory and no symlink (nothing is written or deleted through a link)."""
    path = os.path.join(root, folder) if folder else root
    if folder and os.path.islink(path):
        return None
    return path if os.path.isdir(path) else None


def _links(root: str) -> list[str]:
    """svd-batch's subfolders and files in ``root`` that are symlinks (or a file where a folder belongs)."""
    bad = []
    for folder in FOLDERS[1:]:
        path = os.path.join(root, folder)
        if os.path.islink(path):
            bad.append(f"{folder} (a symlink to {os.readlink(path)})")
        elif os.path.lexists(path) and not os.path.isdir(path):
            bad.append(f"{folder} (not a folder)")
    if layout(root) == SPREAD:
        for folder in SPREAD_FOLDERS:
            path = real_folder(root, folder)
            for entry in os.scandir(path) if path else ():
                if _SUBFOLDER.match(entry.name) and entry.is_symlink():
                    bad.append(f"{folder}/{entry.name} (a symlink to {os.readlink(entry.path)})")
    for folder in ("", STATE):
        where = os.path.join(root, folder) if folder else root
        if os.path.isdir(where) and not os.path.islink(where):
            for entry in os.scandir(where):
                if entry.is_symlink() and is_ours(folder, entry.name):
                    bad.append(f"{os.path.join(folder, entry.name)} (a symlink)")
    return bad


def _only_empty_folders(path: str) -> bool:
    """Nothing but (nested) empty real folders: what a start killed before writing its marker leaves."""
    for entry in os.scandir(path):
        if entry.is_symlink() or not entry.is_dir() or not _only_empty_folders(entry.path):
            return False
    return True


def _made_by_svd_batch(root: str) -> bool:
    if os.path.isfile(os.path.join(root, MARKER)):
        return True
    state = real_folder(root, STATE)
    return state is not None and any(os.path.lexists(os.path.join(state, name)) for name in _LEGACY)


def claim(root: str) -> None:
    """Raise RunDirError (exit 2, nothing written) unless svd-batch may write in ``root``: it does not exist yet,
    is empty, or was made by svd-batch; and none of svd-batch's subfolders or files there is a symlink."""
    if not os.path.lexists(root):
        return
    if not os.path.isdir(root):
        raise refused(f"output.dir={root} exists and is not a folder, so nothing was written. Choose a folder "
                      "(a new one is created) with output.dir=...")
    links = _links(root)
    if links:
        raise refused(
            f"In output.dir={root}, {', '.join(links[:5])}{', ...' if len(links) > 5 else ''}: svd-batch writes and "
            "deletes only inside its output folder and never through a link out of it, so nothing was written. "
            "Replace the link with a real folder (move its files in), or point output.dir at a folder on the "
            "other disk instead."
        )
    if _made_by_svd_batch(root) or _only_empty_folders(root):
        return
    found = sorted(os.listdir(root))
    shown = ", ".join(found[:5]) + (f", ... ({len(found)} entries)" if len(found) > 5 else "")
    raise refused(
        f"output.dir={root} already holds files that svd-batch did not make ({shown}), so nothing was written or "
        "deleted there. A run uses a new or empty folder, or one an earlier svd-batch run made (it keeps "
        f"{MARKER} there), because overwrite=true and cleanup delete files in it. Choose another output.dir "
        f"(e.g. output.dir={os.path.join(root, 'svd-batch')}), or empty this folder."
    )


def mark(root: str) -> None:
    """Write the marker that says svd-batch made ``root`` (once; its state folder exists by now)."""
    path = os.path.join(root, MARKER)
    if os.path.exists(path):
        return
    from .atomic import write_text_atomic

    write_text_atomic(json.dumps({"made_by": "svd-batch", "host": socket.gethostname(), "created_at": time.time()}),
                      path)


def remove_temporaries(root: str) -> None:
    """Delete what a killed writer left half-written: only names matching the temporary pattern of the folder,
    only in real folders, and only files or links (removing a link never touches what it points to)."""
    for folder, names in [(f, f) for f in FOLDERS] + _spread(root):
        path = real_folder(root, folder)
        if path is None:
            continue
        for entry in os.scandir(path):
            if is_temporary(names, entry.name) and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
                _unlink(entry.path)


def remove_recorded(root: str, ids: Iterable[str]) -> None:
    """Delete the videos, input images and thumbnails of recorded ids (overwrite=true); nothing else there."""
    ids = set(ids)
    spread = _spread(root)
    for folder, ext in [(VIDEOS, ".mp4"), (INPUTS, ".jpg"), (THUMBS, ".png")] + [
            (sub, {VIDEOS: ".mp4", INPUTS: ".jpg", THUMBS: ".png"}[parent]) for sub, parent in spread]:
        path = real_folder(root, folder)
        if path is None:
            continue
        for entry in os.scandir(path):
            name = entry.name
            if name.endswith(ext) and name[: -len(ext)] in ids and entry.is_file(follow_symlinks=False):
                _unlink(entry.path)


def remove_file(path: str) -> None:
    """Delete one of svd-batch's own files by its full path, if it is there and is a file (never a folder)."""
    if os.path.islink(path) or os.path.isfile(path):
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
