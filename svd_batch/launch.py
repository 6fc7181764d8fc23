"""Launches: how the processes of one command find each other at the start, and agree once.

A plain ``svd-batch`` is a launch of one process. The ranks of ``accelerate launch`` / ``torchrun`` agree through
their launcher's key-value store; after that agreement nothing of the launcher is used again (executor.py).
Another kind of launch (Ray, a SLURM array with its own rendezvous) is a class with these four methods.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import time
from typing import Any, Callable

from .util import in_thread


class Launch:
    """A plain ``svd-batch``: one process, nothing to agree with."""

    rank, world, local_rank = 0, 1, 0

    def broadcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> list[Any]:
        return [obj]

    def close(self) -> None:
        pass


class LaunchError(Exception):
    """The ranks of a launch could not agree (their launcher's store stopped answering): nothing was run."""


STORE_OP_SECONDS = 60.0  # one store operation; a store that takes longer is hung (its host paused, say)


class TorchrunLaunch(Launch):
    """The ranks of `accelerate launch` / `torchrun`: they agree through the launcher's key-value store (the
    rendezvous every torch launcher sets up; under torchrun one per restart attempt), with no process group at
    all: no NCCL or gloo connections to set up (gloo's mesh set-up fails now and then after an elastic
    restart), no GPU spinning in a barrier, and nothing left to tear down. Each store operation is bounded
    (a hung store stops the launch cleanly within a minute); the wait for rank 0, which may be downloading
    the model, is bounded by ``runtime.dist_timeout_minutes``. After the agreement the store is never used
    again, so a launcher that stops answering or exits cannot block or end a rank."""

    def __init__(self, timeout_minutes: float):
        import torch.distributed as dist

        self.timeout = 60.0 * float(timeout_minutes)
        store, self.rank, self.world = next(dist.rendezvous("env://", timeout=dt.timedelta(seconds=self.timeout)))
        # The agent's store outlives restarts of its workers: keys of an earlier attempt must not be read.
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        self.store = dist.PrefixStore(f"svd-batch/{attempt}/", store)
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._round = 0

    def _op(self, fn: Callable[[], Any]) -> Any:
        t, box = in_thread(fn, "store")
        t.join(STORE_OP_SECONDS)
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        if t.is_alive():
            raise LaunchError(f"the launcher's key-value store at {where} did not answer for {STORE_OP_SECONDS:.0f} s "
                              "(its host is hung or paused), so this launch stops before any work. Start it again.")
        if "error" in box:
            raise LaunchError(f"the launcher's key-value store at {where} failed ({box['error']}), so this launch "
                              "stops before any work. Start it again.")
        return box.get("value")

    def _wait_for(self, key: str) -> Any:
        deadline = time.monotonic() + self.timeout
        while not self._op(lambda: self.store.check([key])):
            if time.monotonic() > deadline:
                raise LaunchError(f"rank 0 did not answer within runtime.dist_timeout_minutes "
                                  f"({self.timeout / 60:.0f}), so this launch stops before any work.")
            time.sleep(0.2)
        return pickle.loads(self._op(lambda: self.store.get(key)))

    def _key(self, kind: str) -> str:
        self._round += 1
        return f"{kind}/{self._round}"

    def broadcast(self, obj: Any) -> Any:
        key = self._key("broadcast")
        if self.rank == 0:
            data = pickle.dumps(obj)
            self._op(lambda: self.store.set(key, data))
            return obj
        return self._wait_for(key)

    def gather(self, obj: Any) -> list[Any]:
        key = self._key("gather")
        data = pickle.dumps(obj)
        self._op(lambda: self.store.set(f"{key}/{self.rank}", data))
        return [self._wait_for(f"{key}/{r}") for r in range(self.world)]


def start_launch(timeout_minutes: float) -> Launch:
    return TorchrunLaunch(timeout_minutes) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else Launch()
