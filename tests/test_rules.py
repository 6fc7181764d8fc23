"""The protocol's rules, in one process and in milliseconds: members are Executors sharing one ledger store (in
memory, and the POSIX folder), each with its own fake clock. A process that dies is a lock closed without a final
state; a paused one simply stops beating. The interleavings the process tests reach by pausing processes are
reached here by calling the members in the order wanted."""

import threading
import time

import pytest

from svd_batch.executor import Executor, Start, Timing
from svd_batch.launch import Launch
from svd_batch.ledger import Claims, JobDir, JobInfo, Ticket, member_gone
from svd_batch.memstore import MemoryStore
from svd_batch.rundir import FolderLock, RunDir
from svd_batch.store import PosixStore

LEASE = 10.0


class Clock:
    """A process's own monotonic clock, moved by hand (``sleep`` moves it too)."""

    def __init__(self, t: float = 1000.0):
        self.t = self.t0 = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        assert self.t - self.t0 < 100 * LEASE, "waited a hundred leases: the wait never ends"


def drain(*members: Executor) -> None:
    """Each member claims until nothing is left for it right now (a rule broken so that units keep moving fails
    instead of looping)."""
    for _ in range(100):
        if all(ex.next_unit(wait=False) is None for ex in members):
            return
    raise AssertionError("units keep changing hands")


@pytest.fixture(params=["memory", "posix"])
def store(request, tmp_path):
    return MemoryStore() if request.param == "memory" else PosixStore(str(tmp_path / "out" / ".svd-batch"))


class Ledger:
    """One job of ``units`` units in ``store``; ``join`` adds a member (a one-rank launch) with its own clock."""

    def __init__(self, store, root, units=4):
        self.store, self.units = store, units
        self.rd = RunDir(root)
        self.rd.store = store
        self.job = JobInfo(job="job", state="active", total=units, done=0, failed_skipped=0, todo=units,
                           units=units, manifest="m", started_at=time.time())
        self.members: list[Executor] = []

    def join(self, launch: str, clock: Clock | None = None) -> Executor:
        one = Launch()
        one.rank, one.world, one.local_rank = 0, 1, 0
        clock = clock or Clock()
        ex = Executor(one, self.rd, Timing(lease=LEASE, heartbeat=3600.0, poll=1.0), log=lambda m: None,
                      clock=clock, sleep=clock.sleep)
        ex.begin(Start(launch=launch, job=self.job), num_units=self.units)
        ex.test_clock = clock
        self.members.append(ex)
        return ex

    def close(self):
        for ex in self.members:
            ex.member.close()


@pytest.fixture()
def ledger(store, tmp_path):
    led = Ledger(store, str(tmp_path / "out"))
    yield led
    led.close()


def die(ex: Executor) -> None:
    """The process is gone: no more beats, and (where the store has locks) its lock is free."""
    ex.member._stop.set()
    if ex.member._lock is not None:
        ex.member._lock.close()
        ex.member._lock = None


def test_each_unit_is_claimed_once_by_racing_members(store):
    jobdir = JobDir(store, "race")
    won: dict[str, list[int]] = {}
    go = threading.Barrier(4)

    def claim(name):
        c = Claims(jobdir, name)
        go.wait()
        won[name] = [u for u in range(300) if c.take(Ticket(u))]

    threads = [threading.Thread(target=claim, args=(f"m{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(u for w in won.values() for u in w) == list(range(300))  # each unit once, none lost
    look = Claims(jobdir, "x")
    assert all(look.holder(Ticket(u)) == name for name, w in won.items() for u in w)  # a claim names its holder
    assert not look.take(Ticket(5)) and look.take(Ticket(5, 1)) and look.latest(5) == Ticket(5, 1)


def test_interleaved_members_share_the_units_in_claim_order(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    got = [a.next_unit(wait=False), b.next_unit(wait=False), b.next_unit(wait=False), a.next_unit(wait=False)]
    assert got == [Ticket(0), Ticket(1), Ticket(2), Ticket(3)]
    assert a.next_unit(wait=False) is None and b.next_unit(wait=False) is None  # nothing left, both alive


def test_a_silent_member_is_taken_over_only_after_the_lease_on_the_observer_s_clock(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    ledger.units = 2
    for ex in (a, b):
        ex.num_units = 2
    held = a.next_unit(wait=False)
    a.member.update()  # the heartbeat lists the unit
    assert b.next_unit(wait=False) == Ticket(1)
    b.finished(Ticket(1))
    assert b.next_unit(wait=False) is None  # first sight of a: its lease starts now, on b's clock
    a.test_clock.t += 1e6  # a's own clock means nothing to b,
    a.member.info["beat_at"] = 0.0  # nor does the wall-clock time a's file carries
    a.member.update()
    b.test_clock.sleep(LEASE - 0.5)
    assert b.next_unit(wait=False) is None  # a beat: its lease starts again
    b.test_clock.sleep(LEASE - 0.5)
    assert b.next_unit(wait=False) is None  # silent, but not for a whole lease yet
    b.test_clock.sleep(1.0)
    assert b.next_unit(wait=False) == Ticket(0, 1)
    assert b.took_over[Ticket(0, 1)] == ("LA-r00000", "lost")
    assert a.superseded(held) and not b.superseded(Ticket(0, 1))  # the late holder throws its result away
    assert member_gone(ledger.store, "LA-r00000") is False  # paused, not gone: it still holds its lock


def test_a_dead_member_is_taken_over_at_once_where_the_store_has_locks(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    held = a.next_unit(wait=False)  # claimed, not yet listed by a heartbeat: found from a's cursor
    drain(b)
    die(a)
    assert member_gone(ledger.store, "LA-r00000")
    assert b.next_unit(wait=False) == Ticket(held.unit, 1)  # no lease to wait for
    assert b.took_over[Ticket(held.unit, 1)] == ("LA-r00000", "lost: its lock is free")


def test_without_locks_a_dead_member_is_lost_after_the_lease_alone(tmp_path):
    led = Ledger(MemoryStore(locks=False), str(tmp_path / "out"))
    try:
        a, b = led.join("LA"), led.join("LB")
        held = a.next_unit(wait=False)
        drain(b)
        die(a)
        assert not member_gone(led.store, "LA-r00000")  # a store without locks cannot say
        b.test_clock.sleep(LEASE - 0.1)
        assert b.next_unit(wait=False) is None
        b.test_clock.sleep(0.2)
        assert b.next_unit(wait=False) == Ticket(held.unit, 1)
    finally:
        led.close()


def test_units_given_back_by_a_stopping_member_are_taken_over_at_once(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    held = a.next_unit(wait=False)
    drain(b)
    a.leave("stopped", {})
    assert b.next_unit(wait=False) == Ticket(held.unit, 1)
    assert b.took_over[Ticket(held.unit, 1)] == ("LA-r00000", "stopped")


def test_two_observers_take_a_lost_unit_over_once(ledger, monkeypatch):
    a, b, c = ledger.join("LA"), ledger.join("LB"), ledger.join("LC")
    held = a.next_unit(wait=False)
    drain(b, c)
    die(a)
    # c looked at the claims just before b took the unit over: its claim on the same generation must fail
    stale = c.claims.latest
    monkeypatch.setattr(c.claims, "latest", lambda unit, start_gen=0: held if unit == held.unit else stale(unit, start_gen))
    assert b.next_unit(wait=False) == Ticket(held.unit, 1)
    assert c.next_unit(wait=False) is None
    assert c.member.holding() == []  # listed before the claim, dropped when it failed
    assert c.claims.holder(Ticket(held.unit, 1)) == b.name


def test_a_newcomer_starts_at_the_cursor(ledger):
    a = ledger.join("LA")
    assert [a.next_unit(wait=False) for _ in range(3)] == [Ticket(0), Ticket(1), Ticket(2)]
    a.member.update()  # the heartbeat carries the cursor
    c = ledger.join("LC")
    assert c._cursor == 3 and c.next_unit(wait=False) == Ticket(3)


def test_the_end_waits_for_working_members_until_final_or_lost(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    a.next_unit(wait=False)
    drain(b)
    b.leave("done", {})
    start = b.test_clock()
    assert b.wait_for_others() == ["LA-r00000"]  # a never beat again: lost after the lease, on b's clock
    assert LEASE <= b.test_clock() - start <= LEASE + 2 * b.timing.poll
    a.leave("done", {})
    a.member.update()
    assert ledger.join("LC").wait_for_others() == []  # final members are not waited for


def test_one_merge_at_a_time_and_alone_only_without_live_members(store, tmp_path):
    root = str(tmp_path / "out")
    first, second = FolderLock(store, "merge.lock", root), FolderLock(store, "merge.lock", root)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    members = [FolderLock(store, "active", root) for _ in range(2)]
    assert all(m.acquire(shared=True) for m in members)
    planner = FolderLock(store, "active", root)
    assert not planner.acquire(shared=False)  # someone lives: not alone
    members[0].release()
    assert not planner.acquire(shared=False)
    members[1].release()
    assert planner.acquire(shared=False)  # alone: the folder may be cleaned and re-planned
    planner.release()


def test_a_merge_revoked_half_way_never_puts_back_an_older_table(store):
    store.put("records.parquet", b"gen1")
    seen = store.version("records.parquet")

    def write_then_lose_the_lock(path):
        with open(path, "wb") as f:
            f.write(b"gen2 from the older read")
        # meanwhile the lock went to another merge, which read gen1 and wrote its own table
        assert store.replace_file("records.parquet", lambda p: open(p, "wb").write(b"gen2"), seen)

    assert not store.replace_file("records.parquet", write_then_lose_the_lock, seen)
    assert store.read("records.parquet") == b"gen2"
    assert not store.replace_file("records.parquet", lambda p: open(p, "wb").write(b"x"), None)  # not absent
    assert store.replace_file("fresh", lambda p: open(p, "wb").write(b"y"), None) and store.read("fresh") == b"y"


def test_the_abort_flag_is_raised_once_and_seen_by_every_member(ledger):
    a, b = ledger.join("LA"), ledger.join("LB")
    a.abort("output: the disk is full")
    b.abort("source: a later reason")
    assert b.aborted() and b.next_unit(wait=False) is None
    assert b.abort_reason() == "output: the disk is full"


def test_an_ambiguous_claim_is_read_back_not_taken_for_someone_else_s():
    """An object store's timeout or ambiguous 409 on a conditional create: the claim may have landed. The claimer
    reads it back: its own name is its claim (not "someone else has it", which would leave the unit unclaimed
    by anyone), another name is another's, and nothing there means try again."""
    from svd_batch.store import Unknown

    class Flaky(MemoryStore):
        def __init__(self):
            super().__init__(locks=False)
            self.replies = []

        def create(self, key, data, token=None):
            reply = self.replies.pop(0) if self.replies else "ok"
            if reply == "landed":  # written, then the connection broke
                super().create(key, data)
                raise Unknown("timeout")
            if reply == "lost":  # never reached the store
                raise Unknown("timeout")
            return super().create(key, data)

    store = Flaky()
    mine, other = Claims(JobDir(store, "j"), "me"), Claims(JobDir(store, "j"), "other")
    store.replies = ["landed"]
    assert mine.take(Ticket(0)) and mine.holder(Ticket(0)) == "me"
    store.replies = ["lost", "lost"]
    assert mine.take(Ticket(1)) and mine.holder(Ticket(1)) == "me"  # retried until it said
    assert other.take(Ticket(2))
    store.replies = ["landed"]
    assert not mine.take(Ticket(2)) and mine.holder(Ticket(2)) == "other"
