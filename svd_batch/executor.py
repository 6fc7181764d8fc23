"""The executor: how the processes working on one run folder cooperate. The whole protocol lives here.

A *launch* is one command (`svd-batch`, `accelerate launch`, `torchrun`, a SLURM array task); a *member* is
one rank of one launch. Any number of launches may work on one folder at any time, as long as their settings
give the same videos (the fingerprint). The run folder is the authority (ledger.py), not any launcher:

1. Agreement (per launch, once). Rank 0 takes the folder's planning lock. If no member of any launch is
   alive (the ``active`` lock can be taken exclusively), it cleans up after earlier runs, merges every part
   and plans a new *job* (the rows still to do, as units in claim order) from that one snapshot. Otherwise it
   joins the job in progress (job.py says what a job is). Every rank of the launch checks that it sees the
   same model, manifest and device type; all go, or none does. The messages go through the launch
   (launch.py); after this nothing of the launcher is used again, so nothing outside the folder can block or
   end a rank.
2. Claims. Units are claimed one at a time, in order, as the model needs work, by creating their claim file
   (atomic exclusive creation), so a slow member simply claims less, across launches too.
3. Liveness. Each member rewrites its file every few seconds (a thread) and holds a lock for its life. A
   member is lost when its lock is free (its process is gone) or its heartbeat counter has not moved for
   ``runtime.lease_seconds`` on the observer's own clock. A member that runs out of units takes over the
   units of lost members (and those that stopping members gave back) under a new claim generation; the late
   holder, should it wake up, sees the newer claim and throws its result away (a record written anyway
   would be a duplicate of the same row, which the merge folds into one).
4. The end. A member with nothing left to claim or take over writes its final state, waits until every
   other member of the job is final or lost, and merges (one merge at a time; a merge finding the folder
   already merged skips). Per launch and node one member, the reporter, prints the summary and exits with
   the run's code, after the launch's other local ranks have exited (torchrun stops a node's workers as soon
   as one exits non-zero): no rank is ever cut short by another's exit code (``Executor.end``). Stop signals
   and their grace period are signals.py's.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .launch import Launch, LaunchError
from .ledger import (FINAL_STATES, Claims, JobDir, JobInfo, Member, Peers, Ticket, read_members,
                     takeover_candidates)
from .rundir import RunDir, RunDirError, new_session

EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, EXIT_INCOMPLETE, EXIT_OUTPUT, EXIT_SOURCE = 0, 1, 2, 3, 4, 5


# -- the agreement ------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """The protocol's clocks (runtime.*): all on each process's own monotonic clock."""

    lease: float = 180.0        # heartbeat silence after which a member's units are taken over
    heartbeat: float = 2.0      # seconds between heartbeats
    poll: float = 1.0           # seconds between looks at the other members while waiting at the end
    plan_wait: float = 600.0    # how long a launch waits for another one that is planning


@dataclass
class Start:
    """What rank 0 proposes to its launch: the job to work on, or why nothing runs."""

    error: str | None = None
    launch: str = ""
    job: JobInfo | None = None
    joined: bool = False
    facts: dict[str, Any] = field(default_factory=dict)  # what every rank checks it sees alike (model, ...)


class _Refused(Exception):
    """Rank 0's reason to stop before the folder is touched."""


class Executor:
    """One member's handle on the protocol (see the module docstring)."""

    def __init__(self, launch: Launch, rundir: RunDir, timing: Timing, log: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.launch, self.rundir, self.timing, self.log = launch, rundir, timing, log
        self.clock, self.sleep = clock, sleep  # this process's own clock (tests pass a fake one)
        self.rank, self.world, self.local_rank = launch.rank, launch.world, launch.local_rank
        self.member: Member | None = None
        self.job: JobInfo | None = None
        self.jobdir: JobDir | None = None
        self.claims: Claims | None = None
        self.peers: Peers | None = None
        self.num_units = 0
        self.static_units: list[int] | None = None
        self._cursor = 0
        self._fresh_done = False
        self._orphans: dict[str, list[Ticket]] = {}
        self.took_over: dict[Ticket, tuple[str, str]] = {}  # ticket -> (from member, why)
        self.stopped: Callable[[], bool] = lambda: False

    # 1. Agreement ------------------------------------------------------------------------------------------
    def agree(self, propose: Callable[[bool], Start], check: Callable[[Start], str | None],
              before: Callable[[], str | None] = lambda: None) -> Start | None:
        """Rank 0 runs ``before()`` (an error message stops the launch before the folder is touched), then
        ``propose(alone)`` under the planning lock (``alone``: no member of any launch lives, so the folder may
        be cleaned and re-planned); every rank runs ``check`` on the proposal. Returns the agreed start (every
        rank holding the ``active`` lock shared), or None when the launch must stop (the message is logged by
        rank 0)."""
        rd = self.rundir
        start: Start | None = None
        if self.rank == 0:
            try:
                error = before()
                if error is not None:
                    raise _Refused(error)
                rd.create()
                rd.plan_lock.require(wait=self.timing.plan_wait, describe=True)
                try:
                    alone = rd.active_lock.acquire(shared=False)
                    start = propose(alone)
                    rd.active_lock.require(shared=True)  # from now on this launch counts as alive
                finally:
                    rd.plan_lock.release()
                start.launch = new_session()
            except _Refused as exc:
                start = Start(error=str(exc))
            except RunDirError as exc:
                start = Start(error=f"svd-batch: {exc}")
            except OSError as exc:
                start = Start(error=f"svd-batch: cannot use output.dir={rd.root}: {exc}. Choose a writable folder.")
        try:
            start = self.launch.broadcast(start)
        except LaunchError as exc:
            self.log(f"svd-batch: rank {self.rank}: {exc}")
            return None
        if start.error is not None:
            if self.rank == 0:
                self.log(start.error)
            return None
        problem = None
        try:
            if self.rank != 0:
                problem = check(start)
                if problem is None:
                    rd.active_lock.require(shared=True)
        except (RunDirError, OSError) as exc:
            problem = f"rank {self.rank} on host {socket.gethostname()}: {exc}"
        try:
            problems = [p for p in self.launch.gather(problem) if p]
        except LaunchError as exc:
            self.log(f"svd-batch: rank {self.rank}: {exc}")
            return None
        self.launch.close()  # from here on the folder carries every message: no rank waits on another
        if problems:
            if self.rank == 0:
                self.log("svd-batch: the ranks do not agree, so nothing was run:\n" +
                         "\n".join(f"  {p}" for p in problems))
            return None
        return start

    def begin(self, start: Start, num_units: int, static_units: list[int] | None = None) -> None:
        """Enter the job as a member: the member file and its heartbeat, the claims, the view of the others."""
        rd, job = self.rundir, start.job
        self.job, self.num_units, self.static_units = job, num_units, static_units
        self.jobdir = JobDir(rd.store, job.job)
        member = f"{start.launch}-r{self.rank:05d}"
        self.member = Member(rd.store, member, launch=start.launch, job=job.job, rank=self.rank,
                             local_rank=self.local_rank, world_size=self.world,
                             heartbeat_seconds=self.timing.heartbeat, log=self.log)
        self.claims = Claims(self.jobdir, member)
        self.peers = Peers(rd.store, job.job, member, self.timing.lease, clock=self.clock)
        # Every unit below another member's cursor is claimed: a newcomer starts there.
        self._cursor = max([int(d.get("cursor", 0)) for d in read_members(rd.store, job.job)] or [0])
        self.member.info["cursor"] = self._cursor
        self.member.start()

    @property
    def name(self) -> str:
        return self.member.member if self.member else "?"

    # 2. Claims and takeovers -------------------------------------------------------------------------------
    def aborted(self) -> bool:
        return self.jobdir is not None and self.jobdir.aborted()

    def abort(self, reason: str) -> None:
        """An error of the whole run ("output: ..." a full disk, "source: ..." an image source that is down):
        every member stops at its next claim."""
        if self.jobdir is not None:
            self.jobdir.abort(reason)

    def abort_reason(self) -> str:
        return self.jobdir.abort_reason() if self.jobdir is not None else ""

    def next_unit(self, wait: bool) -> Ticket | None:
        """The next unit for this member: a fresh claim, else a takeover. With ``wait`` (the model is idle) it
        waits at the end of the job until every other member is finished, lost or waiting too, taking over
        what lost or stopping members leave; None then means this member is done. Without ``wait`` (claiming
        ahead) None means "nothing right now"."""
        if self.stopped() or self.aborted():
            return None
        t = self._fresh()
        if t is not None:
            return t
        while True:
            t = self._takeover()
            if t is not None or not wait:
                return t
            if self.member.info["state"] != "waiting":
                self.member.update(state="waiting")
            if not self._others_at_work():
                return None
            self.sleep(self._poll_seconds())
            if self.stopped() or self.aborted():
                return None

    def _fresh(self) -> Ticket | None:
        if self._fresh_done:
            return None
        mine = self.static_units
        while True:
            if mine is not None:
                if self._cursor >= len(mine):
                    break
                t = Ticket(mine[self._cursor])
            elif self._cursor < self.num_units:
                t = Ticket(self._cursor)
            else:
                break
            self._cursor += 1
            if self.claims.take(t):
                # In claim order the heartbeat's cursor finds a claim made just before dying; a static deal's
                # units are not in order, so there the claim is written at once.
                self.member.hold(t, write=mine is not None, cursor=self._cursor if mine is None else 0)
                return t
        self._fresh_done = True
        return None

    def _takeover(self) -> Ticket | None:
        peers = self.peers.poll()
        for t, holder, why in takeover_candidates(peers, self.claims, self.num_units, self._orphans):
            if self.claims.latest(t.unit, t.gen) != t or self.claims.holder(t) != holder:
                continue  # taken over already, or never really claimed by that member
            mine = Ticket(t.unit, t.gen + 1)
            self.member.hold(mine, state="working")  # written before the claim: a takeover is never orphaned
            if self.claims.take(mine):
                self.took_over[mine] = (holder, why)
                self.log(f"svd-batch: took over unit {t.unit} from {holder} ({why})")
                return mine
            self.member.drop(mine)
        return None

    def _poll_seconds(self) -> float:
        """Each poll reads every member file not yet final: with thousands of members waiting at the end of a
        job, look less often rather than flood the file server."""
        return self.timing.poll * max(1.0, self.peers.active() / 64)

    def _others_at_work(self) -> bool:
        return any(not d["lost"] and d.get("state") not in (*FINAL_STATES, "waiting") for d in self.peers.poll())

    def superseded(self, t: Ticket) -> bool:
        """Whether another member took this unit over (this one was judged lost): its result must be dropped."""
        return self.claims.superseded(t)

    def finished(self, t: Ticket) -> None:
        """The unit's records are durable (the next heartbeat says so)."""
        self.member.drop(t, write=False)

    def recorded(self, parts: dict[str, int], **counts: int) -> None:
        """A row was recorded: the next heartbeat carries the counts (and which parts hold how many rows)."""
        self.member.set(parts=dict(parts), **counts)

    # 4. The end --------------------------------------------------------------------------------------------
    def leave(self, state: str, parts: dict[str, int], stats: dict[str, Any] | None = None,
              early: bool = False) -> None:
        """Enter a final state; units still held are given back (the others take them over at once). ``early``:
        this member leaves while others may still work (its device broke), so it does not report: said in the
        same write that gives its units back, before any other member can take one and look for a reporter."""
        if self.member is None:
            return
        self.member.set(parts=dict(parts), stats=stats or {}, **({"exit_code": EXIT_OK} if early else {}))
        self.member.release_all(state)

    def others_alive(self) -> bool:
        """Whether another member of the job is alive and not yet final (it takes over what this one gives back)."""
        return any(not d["lost"] and d.get("state") not in FINAL_STATES for d in self.peers.poll())

    def wait_for_others(self) -> list[str] | None:
        """After leaving: wait until every other member of the job is final or lost. Returns the lost ones, or
        None when a stop signal came meanwhile (this member's records are durable; the others merge them)."""
        while True:
            peers = self.peers.poll()
            if all(d["lost"] or d.get("state") in FINAL_STATES for d in peers):
                return [d["member"] for d in peers if d["lost"]]
            if self.stopped():
                return None
            self.sleep(self._poll_seconds())

    def merge(self, write: Callable[[], Any]) -> tuple[bool, Any]:
        """Run ``write`` (merge the records, write results and report) under the merge lock, unless the folder
        is already merged as it stands. Returns (whether it ran, its result)."""
        lock = self.rundir.merge_lock
        deadline = time.monotonic() + self.timing.lease
        # In short waits: a stop signal (Kubernetes' 30 s grace) must end the wait, not the lease (180 s).
        while not lock.acquire(wait=min(0.5, max(0.0, deadline - time.monotonic()))):
            if self.stopped():
                return False, None
            if time.monotonic() >= deadline:
                self.log(f"svd-batch: another process has held the merge lock of {self.rundir.root} for "
                         f"{self.timing.lease:.0f} s (paused?); it writes results.parquet when it resumes, or run "
                         "svd-batch-report on the folder.")
                return False, None
        try:
            if self.rundir.up_to_date():
                return False, None
            return True, write()
        finally:
            lock.release()

    def local_peers(self) -> list[dict[str, Any]]:
        """The other members of this launch on this member's node (the workers of one torchrun agent)."""
        me = self.member.info
        return [d for d in read_members(self.rundir.store, self.job.job, prefix=f"{me['launch']}-", skip={self.name})
                if d.get("node", 0) == me["node"] and d.get("host") == me["host"]]

    def _running_peers(self) -> list[dict[str, Any]]:
        """This node's other members of this launch that are still here and have not yet decided their exit."""
        return [d for d in self.local_peers() if d.get("exit_code") is None and pid_running(int(d.get("pid", 0)))]

    def is_reporter(self) -> bool:
        """Per launch and node, one member reports (prints the summary, exits with the run's code once the others
        have left): the lowest local rank still running, unless a peer has already taken the part; the others
        exit 0."""
        # The choice is written down before the reporter sets its exit code: a slower peer that looks afterwards
        # must not take the reporter's decided code for a departure and report a second time.
        if any(d.get("reporter") for d in self.local_peers()):
            return False
        if any(int(d.get("local_rank", 0)) < self.local_rank for d in self._running_peers()):
            return False
        self.member.update(reporter=True)
        return True

    def exit_code(self, code: int, others_carry_on: bool = False) -> int:
        """The code this process may exit with. torchrun stops every worker of a node as soon as one exits
        non-zero, so per launch and node only the reporter exits with the code, after the others have exited.
        ``others_carry_on``: this member leaves while the others go on working (its device broke): it exits 0
        while any of its node's peers runs."""
        alive = [d for d in self.local_peers() if pid_running(int(d.get("pid", 0)))]
        running = [d for d in alive if d.get("exit_code") is None]
        if (others_carry_on and running) or any(int(d.get("local_rank", 0)) < self.local_rank for d in running):
            self.member.update(exit_code=EXIT_OK)
            return EXIT_OK
        self.member.update(exit_code=code)
        # Every peer whose process still runs, also those that have decided their code: a peer writes it before
        # its interpreter shuts down, and torchrun would SIGTERM it in that window (CI saw exitcode -15).
        wait_until_gone([int(d["pid"]) for d in alive], timeout=self.timing.lease + 30)
        return code

    def end(self, state: str, parts: dict[str, int], stats: dict[str, Any], *, signum: int | None,
            merge: Callable[[], Any], report: Callable[[Any, list[str]], int], say: Callable[[str], None]) -> int:
        """Step 4 of a member's life: enter its final state and return its exit code.

        ``state``: how its work ended (done, device_failure, aborted); ``signum``: the stop signal, if one came.
        ``merge()`` folds the records into results (under the merge lock, skipped when the folder is merged as it
        stands) and returns them; ``report(results or None, lost members)`` prints the summary and returns the
        run's code. Exit codes: 128+signal when stopped; 4, 5 or 2 when the run was aborted (output folder, image
        source, a model that does not load); a broken device leaves at once (3, or 0 while this node's other ranks still work); else every
        member waits until the others are finished or lost, merges, and one per launch and node reports."""
        if signum is not None:
            self.leave("stopped", parts, stats)
            return 128 + signum
        if state == "aborted" or self.aborted():
            self.leave("aborted", parts, stats)
            why = self.abort_reason().split(":", 1)[0]
            return self.exit_code({"source": EXIT_SOURCE, "model": EXIT_USAGE}.get(why, EXIT_OUTPUT))
        if state == "device_failure":
            self.leave(state, parts, stats, early=True)
            if self.others_alive():
                # The others take this member's units over; this node's other ranks must not be cut short.
                return self.exit_code(EXIT_INCOMPLETE, others_carry_on=True)
            self.member.update(exit_code=None)  # nobody else is left: this member reports after all
        else:
            self.leave(state, parts, stats)
        lost = self.wait_for_others()
        _, results = self.merge(merge) if lost is not None else (False, None)
        signum = getattr(self.stopped, "signum", None)
        if signum is not None:  # stopped while waiting for the others or the merge lock: said as interrupted
            return 128 + signum
        if not self.is_reporter():
            if self.world > 1:
                say(f"svd-batch: rank {self.rank} done ({stats.get('rows', 0)} rows)")
            return EXIT_OK
        return self.exit_code(report(results, lost))

    def launch_figures(self) -> list[dict[str, Any]]:
        """Each member of this launch: its rank, host and figures (the summary's lines per rank)."""
        prefix = f"{self.member.info['launch']}-"
        return [{**(d.get("stats") or {}), "rank": d.get("rank"), "host": d.get("host")}
                for d in read_members(self.rundir.store, self.job.job, prefix=prefix)]

    def close(self, exit_code: int | None = None) -> None:
        if self.member is not None:
            self.member.close(exit_code)
        self.rundir.release_locks()


def pid_running(pid: int) -> bool:
    """Whether a process of this host is running (a zombie has exited already)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until_gone(pids: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if pid_running(p)]
        if pids:
            time.sleep(0.05)


def static_deal(costs: np.ndarray, world: int, rank: int) -> list[int]:
    from .plan import assign_ranks

    return np.flatnonzero(assign_ranks(costs, world) == rank).tolist()
