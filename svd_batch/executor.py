"""The executor: how the ranks of one run work together, apart from what a row is.

One agreement at the start, then no collective. Rank 0 prepares the run folder and the plan from one snapshot
of the records; every rank checks that it sees the same manifest and model, and all go or none does. After
that, ranks talk only through the launcher's key-value store (the TCPStore torchrun already runs; no new
service) and through the run folder:

- claims: a shared counter hands out the plan's units in order, one when a rank needs work, so a slow rank
  claims less and a dead one leaves only what it had claimed (for the next run);
- completion: each rank writes a marker into the run folder and counts itself finished; the last rank to
  finish (or a survivor that sees the unfinished ones stopped beating) merges the records and writes the
  results and the report;
- abort: a rank that meets an error of the whole run (the output disk is full) raises a flag the others see
  at their next claim;
- heartbeats: a thread per rank bumps a counter every second, so a survivor can tell a lost rank from a slow
  one without waiting for it.

The control plane is gloo (CPU) also on GPU nodes: no GPU ever spins in a barrier, and a dead or hung peer
is noticed (NCCL notices neither before its timeout). Exit codes follow one rule: a rank exits non-zero only
when nothing of the run is left to cut short, since torchrun stops every worker of a node as soon as one
exits non-zero.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_OUTPUT = 0, 1, 2, 3, 4

HEARTBEAT_SECONDS = 1.0
LOST_AFTER_SECONDS = 6.0  # a rank whose heartbeat has not moved for this long is gone


class StoreGone(Exception):
    """The launcher's store (hosted by the first node's agent) cannot be reached: this rank's work ends."""


@dataclass
class Ending:
    """How this rank's work ended, and what it means for the run."""

    merge: bool            # this rank merges the records and writes results.parquet
    lost_ranks: list[int]  # ranks that stopped beating without finishing (only known to a merging survivor)
    others_running: int    # ranks still at work when this one left (0 for the merger)


class Executor:
    """One rank's handle on the run's control plane (see the module docstring)."""

    def __init__(self, rank: int, world: int, local_rank: int, store=None, session: str = ""):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.store = store
        self.session = session
        self._local_claims = 0
        self._beat_stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- start ------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, timeout_minutes: float) -> "Executor":
        """Join the launcher's process group on gloo (a plain `svd-batch` is a world of one, with no group)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if world <= 1:
            return cls(0, 1, 0)
        import torch.distributed as dist

        if not dist.is_initialized():
            # The start may wait on rank 0 downloading the model: the group's timeout covers that wait.
            dist.init_process_group("gloo", timeout=dt.timedelta(minutes=float(timeout_minutes)))
        store = dist.distributed_c10d._get_default_store()
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, store=store)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def begin(self, session: str, claim_timeout_s: float = 60.0) -> None:
        """The agreement is done: from here on only the store and the run folder carry messages."""
        self.session = session
        if self.store is None:
            return
        # A store operation now fails within a minute instead of the start's long timeout: a lost first node
        # ends this rank's work instead of hanging it.
        self.store.set_timeout(dt.timedelta(seconds=claim_timeout_s))
        self._beat = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._beat.start()

    def _key(self, name: str) -> str:
        return f"svd-batch/{self.session}/{name}"

    def _beat_loop(self) -> None:
        while not self._beat_stop.wait(HEARTBEAT_SECONDS):
            try:
                self.store.add(self._key(f"beat/{self.rank}"), 1)
            except Exception:  # noqa: BLE001 - the store is gone: claims will say so
                return

    # -- claims -----------------------------------------------------------------------------------------
    def claim(self) -> int:
        """The next unit number (0, 1, 2, ... across all ranks); raises StoreGone."""
        if self.store is None:
            self._local_claims += 1
            return self._local_claims - 1
        try:
            return int(self.store.add(self._key("claims"), 1)) - 1
        except Exception as exc:  # noqa: BLE001 - any store failure means the same: no more work from it
            raise StoreGone(str(exc)) from None

    def claims(self, num_units: int, stopped: Callable[[], bool]) -> Iterator[int]:
        """Unit numbers for this rank, claimed one at a time as the caller asks for the next."""
        while not stopped():
            i = self.claim()
            if i >= num_units:
                return
            yield i

    # -- abort ------------------------------------------------------------------------------------------
    def abort(self) -> None:
        """Stop the run: every rank sees it at its next claim (the aborting rank has said why)."""
        if self.store is not None:
            try:
                self.store.add(self._key("aborted"), 1)
            except Exception:  # noqa: BLE001 - the others then meet the same error themselves
                pass

    def aborted(self) -> bool:
        if self.store is None:
            return False
        try:
            return int(self.store.add(self._key("aborted"), 0)) > 0
        except Exception:  # noqa: BLE001
            return False

    # -- completion -------------------------------------------------------------------------------------
    def finish(self) -> Ending:
        """Count this rank finished and decide who merges: the last rank to finish, or, when the ranks still
        unfinished have all stopped beating (killed, node lost), the first survivor to notice."""
        self._beat_stop.set()
        if self.store is None:
            return Ending(merge=True, lost_ranks=[], others_running=0)
        try:
            self.store.set(self._key(f"finished/{self.rank}"), b"1")
            finished = int(self.store.add(self._key("finished"), 1))
            if finished >= self.world:
                return Ending(merge=True, lost_ranks=[], others_running=0)
            others = [r for r in range(self.world) if r != self.rank and not self._has(f"finished/{r}")]
            before = {r: self._beats(r) for r in others}
            deadline = time.monotonic() + LOST_AFTER_SECONDS
            while time.monotonic() < deadline:
                time.sleep(0.5)
                others = [r for r in others if not self._has(f"finished/{r}")]
                alive = [r for r in others if self._beats(r) != before[r]]
                if alive or not others:
                    # Someone still works (and will merge when it finishes), or everyone finished meanwhile and
                    # the last of them merges.
                    return Ending(merge=False, lost_ranks=[], others_running=len(others))
            # Everyone unfinished is silent: they are gone. One survivor merges (the first to claim the job).
            if int(self.store.add(self._key("survivor_merge"), 1)) == 1:
                return Ending(merge=True, lost_ranks=others, others_running=0)
            return Ending(merge=False, lost_ranks=others, others_running=0)
        except Exception:  # noqa: BLE001 - the store is gone: leave the merge to the next run / svd-batch-report
            return Ending(merge=False, lost_ranks=[], others_running=-1)

    def _has(self, name: str) -> bool:
        return bool(self.store.check([self._key(name)]))

    def _beats(self, rank: int) -> int:
        return int(self.store.add(self._key(f"beat/{rank}"), 0))

    def close(self) -> None:
        self._beat_stop.set()
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # noqa: BLE001 - peers may be gone; nothing left to tear down cleanly
                    pass
