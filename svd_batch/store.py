"""Where the ledger lives: the few operations the run folder's protocol needs, and their POSIX implementation.

Everything the protocol decides (claims, members and their heartbeats, the folder locks, the merge fence, the
abort flag, job.json) goes through a ``Store`` rooted at ``.svd-batch``; keys are ``/``-separated names under
it (``members/<member>.json``, ``jobs/<job>/claims/<unit>``). A new backend is one file with one class:

- ``create(key, data)``: create the key only if it is absent, complete or not at all (claims, the abort flag).
- ``put(key, data)``: replace it whole (a file with one writer: member files, job.json, the plan).
- ``read`` / ``exists`` / ``list`` / ``delete``.
- ``version(key)`` and ``replace_file(key, write, version)``: replace only if unchanged since ``version`` was read
  (the merge fence: a merge whose lock was revoked half-way never puts back an older table).
- a liveness primitive where the backend has one: ``lock(key)`` gives a lock held until closed, or until the
  process dies (flock); ``probe(key)`` tells whether a lock's holder is gone. A backend without locks says
  ``locks = False``: members are then judged by heartbeats and leases alone (``Peers``), and the folder locks
  refuse to start unless ``output.lock=false`` (as on a POSIX filesystem without flock).

An object store with conditional writes implements the same contract: ``create`` is a PUT with
``If-None-Match: *`` (S3) or ``ifGenerationMatch=0`` (GCS); ``replace_file``'s version is the ETag (S3
``If-Match``) or the generation (GCS ``ifGenerationMatch``); ``list`` is a prefix listing. Where its semantics
differ from a local disk, the backend must raise ``Unknown`` rather than guess: a timeout or an ambiguous 409/5xx
on a conditional write means "it may or may not have happened" (the request may have landed before the
connection broke), never "someone else has it". The callers then read the key back: a claim whose content names
this member is this member's. It has no lock that dies with a process: ``locks = False``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from abc import ABC, abstractmethod
from typing import Any, Callable

from .atomic import atomic_path, fsync_dir

_HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


class Unknown(OSError):
    """The store cannot tell whether a conditional write happened (a timeout, an ambiguous 409 or 5xx): read the
    key back and retry; it does not mean that another process won."""


class Lock(ABC):
    """A handle on one lock of the store; the lock is held until ``close`` or until the process is gone."""

    @abstractmethod
    def take(self, shared: bool = False, block: bool = False) -> bool:
        """Take (or convert) the lock; False when it is held elsewhere. Errors other than "held" raise OSError."""

    @abstractmethod
    def note(self, text: str) -> None:
        """Say who holds it (read back with ``Store.read(key)``), for the message of whoever waits."""

    @abstractmethod
    def close(self) -> None:
        """Release the lock."""


class Store(ABC):
    """The ledger's storage (see the module docstring)."""

    locks: bool = True  # whether ``lock`` / ``probe`` exist: a lock that dies with its process

    @abstractmethod
    def create(self, key: str, data: bytes, token: str | None = None) -> bool:
        """Create ``key`` holding ``data`` if it is absent; False when it exists. ``token``: a key under which
        this same content may be kept once and reused (POSIX: claims are hard links to one token file)."""

    @abstractmethod
    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        """Replace ``key`` whole (readers see the old or the new content). ``durable=False``: worthless after a
        crash (heartbeats), so no flush to disk."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """Its content; None when absent or unreadable."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, folder: str) -> list[str]:
        """The names directly under ``folder`` (not their paths), in no particular order; [] when it is absent."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` (a key already gone is fine)."""

    @abstractmethod
    def delete_all(self, folder: str) -> None:
        """Remove every key under ``folder`` (only when alone in the run folder: earlier jobs and members)."""

    @abstractmethod
    def version(self, key: str) -> Any:
        """A token that changes whenever ``key`` is replaced (None: absent)."""

    @abstractmethod
    def replace_file(self, key: str, write: Callable[[str], None], version: Any) -> bool:
        """Call ``write(path)`` to make the new content in a local file, then put it at ``key`` only if the key's
        version is still ``version`` (None: still absent). False (and nothing changed) when it is not."""

    def lock(self, key: str) -> Lock:
        raise OSError(errno.ENOLCK, "this store has no locks")

    def probe(self, key: str) -> bool | None:
        """True when nobody holds the lock ``key`` (its holder is gone), False when someone does, None when it
        cannot be told (no such lock, a filesystem without locks, a read-only mount)."""
        return None

    def path(self, key: str) -> str | None:
        """A local path for ``key`` (messages, tools that read files); None when the store is not a folder."""
        return None


# -- the POSIX folder -------------------------------------------------------------------------------------------
class PosixStore(Store):
    """A folder on a local disk, NFS or Lustre: exclusive creation (a hard link, or O_EXCL), rename, and flock."""

    def __init__(self, root: str):
        self.root = root
        self._prefix = os.path.join(root, "")
        self._tokens: dict[str, tuple[str, int]] = {}  # token key -> (its current file, number)
        self._links = True
        self._mutex = threading.Lock()

    def path(self, key: str) -> str:
        return f"{self._prefix}{key}"  # keys are "/"-separated already: a claim's check is one string and a stat

    def _parent(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def _token(self, token: str, data: bytes, fresh: bool = False) -> str:
        with self._mutex:
            path, n = self._tokens.get(token, ("", 0))
            if fresh or not path:
                n += 1
                path = self.path(f"{token}{n}")
                self._parent(path)
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    f.write(data)
                self._tokens[token] = (path, n)
            return path

    def create(self, key: str, data: bytes, token: str | None = None) -> bool:
        # A hard link to a token file appears complete, naming its holder, or not at all (link fails with EEXIST
        # when the name exists, also on NFS); where hard links are refused, an O_EXCL file with the content
        # written into it does the same for readers that take an empty file for "not yet".
        path = self.path(key)
        if token is not None and self._links:
            source = self._token(token, data)
            for _ in range(3):
                try:
                    os.link(source, path)
                    return True
                except FileExistsError:
                    return False
                except FileNotFoundError:
                    self._parent(path)
                except OSError as exc:
                    if exc.errno == errno.EMLINK:  # the token has as many links as the filesystem allows
                        source = self._token(token, data, fresh=True)
                        continue
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                        raise
                    self._links = False
                    break
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            self._parent(path)
            return self.create(key, data)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return True

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        path = self.path(key)
        if not os.path.isdir(os.path.dirname(path)):
            self._parent(path)
        with atomic_path(path, durable=durable) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                return f.read()
        except OSError:
            return None

    def exists(self, key: str) -> bool:
        return os.path.exists(self.path(key))

    def list(self, folder: str) -> list[str]:
        try:
            return os.listdir(self.path(folder))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def delete_all(self, folder: str) -> None:
        import shutil

        for name in self.list(folder):
            path = self.path(f"{folder}/{name}")
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def version(self, key: str) -> Any:
        try:
            st = os.stat(self.path(key))
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def replace_file(self, key: str, write: Callable[[str], None], version: Any) -> bool:
        # A rename has no precondition on POSIX: the check and the rename are two steps, so a merge that loses
        # its lock in between can still win; the window is the rename's, not the whole merge's. An object
        # store's If-Match / ifGenerationMatch closes it.
        path = self.path(key)
        try:
            with atomic_path(path) as tmp:
                write(tmp)
                if self.version(key) != version:
                    raise _Changed
        except _Changed:
            return False
        fsync_dir(os.path.dirname(path))
        return True

    def lock(self, key: str) -> Lock:
        path = self.path(key)
        self._parent(path)
        return _Flock(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))

    def probe(self, key: str) -> bool | None:
        # Taking the lock for a moment is the only way to test it; closing drops what this test took. A
        # read-only open cannot take an exclusive lock where flock is emulated by fcntl (NFS): None then.
        fd = None
        for mode in (os.O_RDWR, os.O_RDONLY):  # read-only: svd-batch-status on a read-only mount
            try:
                fd = os.open(self.path(key), mode)
                break
            except OSError:
                continue
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            return False if exc.errno in _HELD else None
        finally:
            os.close(fd)


class _Changed(Exception):
    pass


class _Flock(Lock):
    def __init__(self, fd: int):
        self.fd: int | None = fd

    def take(self, shared: bool = False, block: bool = False) -> bool:
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if block else fcntl.LOCK_NB))
            return True
        except OSError as exc:
            if exc.errno in _HELD:
                return False
            raise

    def note(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode(), 0)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
