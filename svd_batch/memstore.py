"""A ledger store in memory: the protocol's rules tested in-process, in milliseconds (and the shortest example
of a backend). Several members sharing one ``MemoryStore`` behave like processes sharing one folder; a lock
closed without a final state is a process that died. ``locks=False`` is a backend without locks (an object
store): members are then judged by heartbeats and leases alone."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from typing import Any, Callable

from .store import Lock, Store


class MemoryStore(Store):
    def __init__(self, locks: bool = True):
        self.locks = locks
        self._data: dict[str, tuple[bytes, int]] = {}
        self._held: dict[str, dict[int, bool]] = {}  # lock key -> {handle id: shared}
        self._n = 0
        self._mutex = threading.RLock()

    def _next(self) -> int:
        self._n += 1
        return self._n

    def create(self, key: str, data: bytes, token: str | None = None) -> bool:
        with self._mutex:
            if key in self._data:
                return False
            self._data[key] = (bytes(data), self._next())
            return True

    def put(self, key: str, data: bytes, durable: bool = True) -> None:
        with self._mutex:
            self._data[key] = (bytes(data), self._next())

    def read(self, key: str) -> bytes | None:
        with self._mutex:
            got = self._data.get(key)
            return None if got is None else got[0]

    def exists(self, key: str) -> bool:
        with self._mutex:
            return key in self._data

    def list(self, folder: str) -> list[str]:
        prefix = folder.rstrip("/") + "/"
        with self._mutex:
            return sorted({k[len(prefix):].split("/", 1)[0] for k in self._data if k.startswith(prefix)})

    def delete(self, key: str) -> None:
        with self._mutex:
            self._data.pop(key, None)

    def delete_all(self, folder: str) -> None:
        prefix = folder.rstrip("/") + "/"
        with self._mutex:
            for key in [k for k in self._data if k.startswith(prefix)]:
                del self._data[key]

    def version(self, key: str) -> Any:
        with self._mutex:
            got = self._data.get(key)
            return None if got is None else got[1]

    def replace_file(self, key: str, write: Callable[[str], None], version: Any) -> bool:
        folder = tempfile.mkdtemp(prefix="svd-batch-memstore-")
        try:
            path = os.path.join(folder, "content")
            write(path)
            with open(path, "rb") as f:
                data = f.read()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        with self._mutex:  # the check and the write are one step here, as with If-Match
            if self.version(key) != version:
                return False
            self._data[key] = (data, self._next())
            return True

    def lock(self, key: str) -> Lock:
        if not self.locks:
            raise OSError(errno.ENOLCK, "this store has no locks")
        with self._mutex:
            if key not in self._data:
                self._data[key] = (b"", self._next())
            self._held.setdefault(key, {})
            return _MemoryLock(self, key, self._next())

    def probe(self, key: str) -> bool | None:
        if not self.locks:
            return None
        with self._mutex:
            if key not in self._held:
                return None
            return not self._held[key]


class _MemoryLock(Lock):
    def __init__(self, store: MemoryStore, key: str, handle: int):
        self.store, self.key, self.handle = store, key, handle

    def take(self, shared: bool = False, block: bool = False) -> bool:
        while True:
            with self.store._mutex:
                held = self.store._held[self.key]
                others = {h: s for h, s in held.items() if h != self.handle}
                if not others or (shared and all(others.values())):
                    held[self.handle] = shared
                    return True
                held.pop(self.handle, None)  # flock: a failed conversion may lose the lock it had
            if not block:
                return False
            threading.Event().wait(0.01)

    def note(self, text: str) -> None:
        with self.store._mutex:
            self.store._data[self.key] = (text.encode(), self.store._next())

    def close(self) -> None:
        with self.store._mutex:
            self.store._held.get(self.key, {}).pop(self.handle, None)
