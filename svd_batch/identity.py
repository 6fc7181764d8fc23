"""A model known by its content: the sha256 of each weight file, which resume and the ranks' agreement compare.

Sizes alone cannot tell a fine-tune saved over the old file, or a new Hub revision with the same shapes, from the
model that made a folder's videos. Reading 10 GB of weights at every start is no answer either, so a file's hash
comes, cheapest first, from:

- the Hugging Face cache: a snapshot's files link to ``blobs/<sha256>`` for LFS files (every weight file on the
  Hub), the Hub's own content hash, read off the name;
- this machine's hash cache (``file-hashes.json`` under $SVD_BATCH_CACHE, default ~/.cache/svd-batch), keyed by
  the file's real path, size, modification and change times and inode: an unchanged file is never read twice;
- reading the file (sha256, streamed), once, then remembered in that cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterable

from .atomic import atomic_path

CONFIG_SUFFIXES = (".json", ".txt")  # small: hashed by content every time, like the weights' names and sizes
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 8 << 20


def cache_root() -> str:
    """svd-batch's own cache folder on this machine (the tiny model, the hash cache)."""
    return os.environ.get("SVD_BATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "svd-batch")


def hash_cache_path() -> str:
    return os.path.join(cache_root(), "file-hashes.json")


def hub_sha256(path: str) -> str | None:
    """The sha256 the Hub gave this file, when it lives in a Hugging Face cache as an LFS blob (its name); None
    otherwise (a local folder, or a small file, whose blob is named by its git sha1 instead)."""
    real = os.path.realpath(path)
    blobs = os.path.dirname(real)
    name = os.path.basename(real)
    if (os.path.basename(blobs) == "blobs" and os.path.basename(os.path.dirname(blobs)).startswith("models--")
            and _SHA256.fullmatch(name)):
        return name
    return None


def _stamp(st: os.stat_result) -> list[int]:
    # ctime and inode too: a copy that restores the old mtime (cp -p, rsync -t) still changes the file's ctime.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def stream_sha256(path: str) -> str:
    """Read the whole file (the one place weight bytes are read for identity: tests count calls here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(path: str) -> dict[str, list]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: str, entries: dict[str, list]) -> None:
    """Best effort: an unwritable cache only means hashing again next time. Entries of files gone are dropped;
    two processes writing at once lose one's entries, never corrupt the file (rename)."""
    keep = {p: e for p, e in entries.items() if os.path.exists(p)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path, durable=False) as tmp, open(tmp, "w") as f:
            json.dump(keep, f)
    except OSError:
        pass


def file_sha256s(paths: Iterable[str], cache_file: str | None = None) -> dict[str, str]:
    """sha256 of each file (path -> hex): from the Hub's blob name, the hash cache, or reading it once."""
    cache_file = cache_file or hash_cache_path()
    out: dict[str, str] = {}
    entries: dict[str, list] | None = None
    changed = False
    for path in paths:
        hub = hub_sha256(path)
        if hub is not None:
            out[path] = hub
            continue
        if entries is None:
            entries = _load_cache(cache_file)
        real = os.path.realpath(path)
        stamp = _stamp(os.stat(real))
        entry = entries.get(real)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
            out[path] = entry[1]
            continue
        digest = stream_sha256(real)
        if _stamp(os.stat(real)) == stamp:  # not rewritten while it was read: worth remembering
            entries[real] = [stamp, digest]
            changed = True
        out[path] = digest
    if changed and entries is not None:
        _save_cache(cache_file, entries)
    return out


def checkpoint_files(local_path: str) -> list[tuple[str, str]]:
    """(path relative to the folder, full path) of every file of a checkpoint folder, sorted; hidden ones left out."""
    found = []
    for root, dirs, files in os.walk(local_path):
        dirs.sort()
        for f in sorted(files):
            if not f.startswith("."):
                full = os.path.join(root, f)
                found.append((os.path.relpath(full, local_path), full))
    return found


def model_identity(local_path: str) -> str:
    """The checkpoint's file names, configs and weight file sizes, in 16 hex digits (``model.identity`` as every
    svd-batch recorded it; reads no weights). The weights' content is ``weight_hashes``."""
    h = hashlib.sha256()
    for rel, full in checkpoint_files(local_path):
        h.update(rel.encode())
        if rel.endswith(CONFIG_SUFFIXES):
            with open(full, "rb") as fh:
                h.update(fh.read())
        else:
            h.update(str(os.path.getsize(full)).encode())
    return h.hexdigest()[:16]


def weight_hashes(local_path: str, cache_file: str | None = None) -> dict[str, str]:
    """Each weight file of the checkpoint (every file but its configs), relative path -> sha256."""
    files = [(rel, full) for rel, full in checkpoint_files(local_path) if not rel.endswith(CONFIG_SUFFIXES)]
    hashes = file_sha256s([full for _, full in files], cache_file)
    return {rel: hashes[full] for rel, full in files}


WEIGHTS_KEY = "model.weights."  # + a weight file's path in the checkpoint: its sha256, in the fingerprint
UNET_WEIGHTS_KEY = "model.unet_weights.sha256"


def model_facts(local_path: str, unet_weights: str | None = None, cache_file: str | None = None) -> dict[str, str]:
    """What a run's model is, as fingerprint entries: ``model.identity`` (names, configs, sizes), each weight
    file's sha256 and that of the model.unet_weights file when one is given."""
    facts = {"model.identity": model_identity(local_path)}
    facts.update({WEIGHTS_KEY + rel: h for rel, h in weight_hashes(local_path, cache_file).items()})
    if unet_weights is not None:
        facts[UNET_WEIGHTS_KEY] = file_sha256s([unet_weights], cache_file)[unet_weights]
    return facts


def facts_digest(facts: dict[str, str]) -> str:
    """All of ``model_facts`` in 16 hex digits: what the ranks of a launch compare."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def changed_weights(before: dict, now: dict) -> list[str]:
    """The weight files (and the unet_weights file) whose bytes differ between two fingerprints while their
    names are the same (model.path, model.unet_weights): replaced in place, or another revision."""
    names = []
    for key in sorted(now):
        if key not in before or before[key] == now[key]:
            continue
        if key.startswith(WEIGHTS_KEY) and before.get("model.path") == now.get("model.path"):
            names.append(key[len(WEIGHTS_KEY):])
        elif key == UNET_WEIGHTS_KEY and before.get("model.unet_weights") == now.get("model.unet_weights"):
            names.append("model.unet_weights")
    return names
