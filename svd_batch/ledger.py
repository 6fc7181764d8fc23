"""The run folder's ledger: who works on a run, which units they hold, and the job they share.

Everything here is a key of the ledger's store (store.py: the run folder's ``.svd-batch`` today), changed only
by its atomic operations: create if absent, replace whole, and a lock that dies with its process where the
backend has one. No decision reads a clock of another node: a member is judged by whether its heartbeat counter
moves, measured on the observer's own monotonic clock (``Peers.clock``), and by whether its lock is still held.

Layout under ``.svd-batch/``::

    job.json                    the current job: its id, state (active | complete) and plan summary
    jobs/<job>/plan.npz         its units: manifest positions in claim order and unit boundaries
    jobs/<job>/claims/<u>       unit u is claimed (a hard link to the claimer's token: its content names it)
    jobs/<job>/claims/<u>.g<k>  unit u was taken over for the k-th time (its holder was lost or gave it back)
    jobs/<job>/abort            the run stops (the output folder cannot take more files); says why
    members/<member>.json       one rank of one launch: state, heartbeat counter, units held, parts written
    members/<member>.lock       flock'ed by that member while its process lives
    members/<member>.token*     the member's id; its claims are hard links to it

A member is ``<launch>-r<rank>``; a launch is one ``svd-batch`` or ``accelerate launch`` command.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .store import Lock, Store, Unknown

FINAL_STATES = ("done", "stopped", "device_failure", "aborted")
MEMBERS = "members"


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON file written by rename; None when absent or not (yet) readable."""
    try:
        with open(path) as f:
            return dict(json.load(f))
    except (OSError, ValueError):
        return None


def read_key(store: Store, key: str) -> dict[str, Any] | None:
    """A small JSON key written whole; None when absent or not (yet) readable."""
    data = store.read(key)
    try:
        return None if data is None else dict(json.loads(data))
    except (ValueError, TypeError):
        return None


# -- the job ------------------------------------------------------------------------------------------------
@dataclass
class JobInfo:
    """What job.json says: one plan of a run, shared by every launch that joins while it is active."""

    job: str
    state: str                 # active | complete
    total: int                 # rows selected in the manifest when the job was planned
    done: int                  # finished ok before the job
    failed_skipped: int        # failed before the job, not retried
    todo: int                  # rows the job runs
    units: int
    manifest: str              # digest of the manifest rows it was planned from
    started_at: float          # wall clock, for people (status): never compared across nodes
    retry_failed: bool = False

    KEY = "job.json"

    @classmethod
    def read(cls, store: Store) -> "JobInfo | None":
        d = read_key(store, cls.KEY)
        if not d:
            return None
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[attr-defined]

    def write(self, store: Store) -> None:
        store.put(self.KEY, json.dumps(self.__dict__, indent=1).encode())


class JobDir:
    """One job's keys: its plan, claims and abort flag."""

    def __init__(self, store: Store, job: str):
        self.store, self.job = store, job
        self.root = f"jobs/{job}"
        self.claims = f"{self.root}/claims"
        self.plan_key = f"{self.root}/plan.npz"
        self.abort_key = f"{self.root}/abort"

    def create(self, indices: np.ndarray, starts: np.ndarray) -> None:
        buf = io.BytesIO()
        np.savez(buf, indices=np.asarray(indices, np.int64), starts=np.asarray(starts, np.int64))
        self.store.put(self.plan_key, buf.getvalue())

    def read_plan(self) -> tuple[np.ndarray, np.ndarray]:
        data = self.store.read(self.plan_key)
        if data is None:
            raise FileNotFoundError(f"the plan of job {self.job} is missing")
        with np.load(io.BytesIO(data)) as z:
            return z["indices"], z["starts"]

    # abort: an error of the whole run (a full output disk); every member sees it at its next claim
    def abort(self, reason: str) -> None:
        try:
            self.store.create(self.abort_key, reason.encode())
        except OSError:
            pass  # the disk refuses even this: the others then meet the error themselves

    def aborted(self) -> bool:
        return self.store.exists(self.abort_key)

    def abort_reason(self) -> str:
        return (self.store.read(self.abort_key) or b"").decode(errors="replace")


# -- claims -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ticket:
    """A unit in a member's hands: generation 0 is a fresh claim, k > 0 the k-th takeover."""

    unit: int
    gen: int = 0


class Claims:
    """Exclusive claims on a job's units: a claim is created only where absent, holding its claimer's name, so it
    appears complete, naming its holder, or not at all (store.py says how each backend makes sure)."""

    def __init__(self, jobdir: JobDir, member: str):
        self.jobdir, self.store, self.member = jobdir, jobdir.store, member

    def key(self, t: Ticket) -> str:
        name = str(t.unit) if t.gen == 0 else f"{t.unit}.g{t.gen}"
        return f"{self.jobdir.claims}/{name}"

    def take(self, t: Ticket, tries: int = 5) -> bool:
        """Claim ``t``; False when someone has it already."""
        for _ in range(tries):
            try:
                # The token: on POSIX every claim is a hard link to members/<member>.token<n>, written once.
                return self.store.create(self.key(t), self.member.encode(), token=f"members/{self.member}.token")
            except Unknown:
                # The write may have landed (an object store's timeout or ambiguous 409): the claim says whose
                # it is; absent, nobody has it yet and the claim is tried again.
                holder = self.holder(t)
                if holder is not None:
                    return holder == self.member
        raise OSError(f"cannot tell whether unit {t.unit} was claimed after {tries} tries ({self.key(t)})")

    def holder(self, t: Ticket) -> str | None:
        return (self.store.read(self.key(t)) or b"").decode(errors="replace").strip() or None

    def exists(self, t: Ticket) -> bool:
        return self.store.exists(self.key(t))

    def superseded(self, t: Ticket) -> bool:
        """Whether ``t`` was taken over by another member since it was claimed (its holder was judged lost)."""
        return self.exists(Ticket(t.unit, t.gen + 1))

    def latest(self, unit: int, start_gen: int = 0) -> Ticket | None:
        """The newest claim on ``unit`` (None: never claimed)."""
        if not self.exists(Ticket(unit, start_gen)):
            return None
        gen = start_gen
        while self.exists(Ticket(unit, gen + 1)):
            gen += 1
        return Ticket(unit, gen)


# -- members ------------------------------------------------------------------------------------------------
class Member:
    """This process's entry in the ledger: a lock held for its whole life, and a small JSON file rewritten on
    every change of state or held units and on every heartbeat (a thread, so a long GPU call or a compile
    does not make the member look lost; a process that is paused, swapped out or hung does stop beating)."""

    def __init__(self, store: Store, member: str, *, launch: str, job: str, rank: int, local_rank: int,
                 world_size: int, heartbeat_seconds: float, log: Callable[[str], None] = lambda m: None):
        self.store, self.member = store, member
        self.json_key = f"{MEMBERS}/{member}.json"
        self.lock_key = f"{MEMBERS}/{member}.lock"
        self.heartbeat_seconds = heartbeat_seconds
        self.log = log
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock: Lock | None = None
        self._failing = False
        self.info: dict[str, Any] = {
            "member": member, "launch": launch, "job": job, "rank": rank, "local_rank": local_rank,
            "world_size": world_size, "host": socket.gethostname(), "pid": os.getpid(), "state": "working",
            # the launcher's node (torchrun's GROUP_RANK): its workers are stopped together on a non-zero exit
            "node": int(os.environ.get("GROUP_RANK", 0) or 0),
            "beat": 0, "heartbeat_seconds": heartbeat_seconds, "beat_at": time.time(), "started_at": time.time(), "holding": [], "released": [],
            "cursor": 0, "parts": {}, "rows": 0, "ok": 0, "failed": 0, "exit_code": None, "stats": {},
        }

    def start(self) -> None:
        if self.store.locks:  # without locks (an object store) the heartbeat and the lease alone tell
            self._lock = self.store.lock(self.lock_key)
            self._lock.take(block=True)  # before the JSON exists: whoever sees the JSON can test it
        self._write()
        self._thread = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            self.update()

    def update(self, **changes: Any) -> None:
        """Change fields and rewrite the file (every call is a heartbeat). A failed write (a full disk, a
        network blip) is retried at the next beat; it never ends the heartbeat."""
        with self._mutex:
            self.info.update(changes)
            self.info["beat"] += 1
            self.info["beat_at"] = time.time()
            try:
                self._write()
                if self._failing:
                    self.log("svd-batch: heartbeat file writable again")
                self._failing = False
            except OSError as exc:
                if not self._failing:
                    where = self.store.path(self.json_key) or self.json_key
                    self.log(f"svd-batch: cannot write heartbeat {where} ({exc}); retrying")
                self._failing = True

    def set(self, **changes: Any) -> None:
        """Change fields without a write: the next heartbeat carries them."""
        with self._mutex:
            self.info.update(changes)

    def _write(self) -> None:
        self.store.put(self.json_key, json.dumps(self.info).encode(), durable=False)

    # Units in hand. A fresh claim is listed by the next heartbeat, with the cursor its next search starts from:
    # a claim made just before dying is found by scanning the claims from the last cursor written (orphans). A
    # takeover is written before it is tried (``write``). A unit is dropped once its records are durable; until
    # the next heartbeat a lost member may still list it, and its rows are then made twice (the same frames,
    # one record kept).
    def hold(self, t: Ticket, write: bool = True, **changes: Any) -> None:
        with self._mutex:
            changes["holding"] = [*self.info["holding"], [t.unit, t.gen]]
            self.update(**changes) if write else self.set(**changes)

    def drop(self, t: Ticket, write: bool = True) -> None:
        with self._mutex:
            holding = [h for h in self.info["holding"] if h != [t.unit, t.gen]]
            self.update(holding=holding) if write else self.set(holding=holding)

    def holding(self) -> list[Ticket]:
        with self._mutex:
            return [Ticket(u, g) for u, g in self.info["holding"]]

    def release_all(self, state: str) -> None:
        """Give every unit in hand back (the others take them over at once) and enter a final state."""
        with self._mutex:
            self.update(state=state, released=[*self.info["released"], *self.info["holding"]], holding=[])

    def close(self, exit_code: int | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if exit_code is not None:
            self.update(exit_code=exit_code)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def member_gone(store: Store, member: str) -> bool:
    """True when the member's process is certainly gone: nobody holds its lock. (A paused or hung process
    still holds it; so does one whose node is lost, until the file server notices; a store without locks never
    says.)"""
    return store.probe(f"{MEMBERS}/{member}.lock") is True


def read_members(store: Store, job: str | None = None, prefix: str = "",
                 skip: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Every member file (of one job; whose name starts with ``prefix``, e.g. a launch), in member order, but
    those named in ``skip``; unreadable files are skipped."""
    names = sorted(n for n in store.list(MEMBERS)
                   if n.endswith(".json") and n.startswith(prefix) and n[:-5] not in skip)
    out = []
    for n in names:
        d = read_key(store, f"{MEMBERS}/{n}")
        if d and (job is None or d.get("job") == job):
            out.append(d)
    return out


@dataclass
class Peers:
    """The other members of a job, as this process sees them. A member is *lost* when its lock is free (its
    process is gone) or when its heartbeat counter has not moved for ``lease`` seconds of this process's own
    monotonic clock: a paused member becomes lost after the lease, never before, and nothing depends on the
    clocks of two nodes agreeing or on file times (which NFS caches)."""

    store: Store
    job: str
    me: str
    lease: float
    clock: Callable[[], float] = time.monotonic  # this process's own clock; tests pass a fake one
    _seen: dict[str, tuple[int, float]] = field(default_factory=dict)
    _final: dict[str, dict[str, Any]] = field(default_factory=dict)  # final states do not change: read once

    def poll(self) -> list[dict[str, Any]]:
        """The other members, each with "lost": bool added."""
        now = self.clock()
        out = list(self._final.values())
        for d in read_members(self.store, self.job, skip={self.me, *self._final}):
            m = d["member"]
            if d.get("state") in FINAL_STATES:
                self._final[m] = {**d, "lost": False}
            beat = int(d.get("beat", 0))
            seen = self._seen.get(m)
            if seen is None or seen[0] != beat:
                self._seen[m] = seen = (beat, now)
            final = d.get("state") in FINAL_STATES
            d["gone"] = (not final) and member_gone(self.store, m)  # its lock is free: lost at once
            d["lost"] = d["gone"] or ((not final) and now - seen[1] >= self.lease)
            out.append(d)
        return sorted(out, key=lambda d: d["member"])

    def active(self) -> int:
        """How many members were not final at the last poll (what a poll has to read)."""
        return len(self._seen) - len(self._final)


def takeover_candidates(peers: Iterable[dict[str, Any]], claims: Claims, num_units: int,
                        orphans: dict[str, list[Ticket]] | None = None) -> list[tuple[Ticket, str, str]]:
    """(ticket, its holder, why) for units whose holder gave them back or is lost ("lost: its lock is free" when its
    process is certainly gone, else "lost": silent for the lease): the units it listed, and a
    fresh claim it made after its last listing (found by scanning from its cursor to the first unclaimed unit;
    ``orphans`` caches that scan per member, since a lost member's claims do not change)."""
    out = []
    orphans = {} if orphans is None else orphans
    for d in peers:
        for u, g in d.get("released", []):
            out.append((Ticket(u, g), d["member"], d.get("state", "stopped")))
        if not d.get("lost"):
            continue
        why = "lost: its lock is free" if d.get("gone") else "lost"
        listed = {(u, g) for u, g in d.get("holding", [])}
        out += [(Ticket(u, g), d["member"], why) for u, g in sorted(listed)]
        if d["member"] not in orphans:
            found, u = [], int(d.get("cursor", 0))
            while u < num_units and claims.exists(Ticket(u)):
                if (u, 0) not in listed and claims.holder(Ticket(u)) == d["member"]:
                    found.append(Ticket(u))
                u += 1
            orphans[d["member"]] = found
        out += [(t, d["member"], why) for t in orphans[d["member"]]]
    return out
