"""ledger.py: claims (each unit once, naming its holder), members' heartbeats and locks, and who is lost."""

import json
import os
import time

from svd_batch.ledger import Claims, JobDir, Member, Ticket
from svd_batch.store import PosixStore
from tests.test_executor import wait_until


# -- the ledger on the POSIX folder (the protocol's rules on every store: test_rules.py) ---------------------------
def test_a_claim_names_its_holder_without_hard_links_and_past_the_link_limit(tmp_path, monkeypatch):
    import errno

    jobdir = JobDir(PosixStore(str(tmp_path)), "j")
    jobdir.create([0], [0, 1])
    c = Claims(jobdir, "me")
    real = os.link
    calls = []

    def link(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EMLINK, "too many links")
        if len(calls) == 4:
            raise OSError(errno.EPERM, "no hard links here")
        return real(src, dst)

    monkeypatch.setattr(os, "link", link)
    assert c.take(Ticket(0)) and c.take(Ticket(1)) and c.take(Ticket(2)) and c.take(Ticket(3))
    assert calls[2] != calls[0] and calls[2].endswith("me.token2")  # a new token after EMLINK
    assert (tmp_path / "jobs" / "j" / "claims" / "3").read_text() == "me"  # O_EXCL, naming its holder
    assert not c.take(Ticket(3)) and not c.take(Ticket(1))
    assert [c.holder(Ticket(u)) for u in range(4)] == ["me"] * 4
    assert c.take(Ticket(3, 1)) and c.superseded(Ticket(3)) and c.latest(3) == Ticket(3, 1)


def test_the_heartbeat_survives_write_errors(tmp_path, monkeypatch):
    said = []
    store = PosixStore(str(tmp_path))
    m = Member(store, "m", launch="l", job="j", rank=0, local_rank=0, world_size=1, heartbeat_seconds=0.05,
               log=said.append)
    m.start()
    real = store.put
    failures = [0]

    def flaky(key, data, durable=True):
        if failures[0] < 5:
            failures[0] += 1
            raise OSError(5, "Input/output error")
        return real(key, data, durable=durable)

    monkeypatch.setattr(store, "put", flaky)
    path = tmp_path / "members" / "m.json"
    before = json.loads(path.read_text())["beat"]
    wait_until(lambda: json.loads(path.read_text())["beat"] > before + 3, "beats after the errors", timeout=20)
    m.close(0)
    assert failures[0] == 5 and len(said) == 2 and "retrying" in said[0] and "writable again" in said[1]


def test_one_reporter_per_launch_and_node_even_after_it_decided_its_code(tmp_path):
    """The reporter writes down its part before its exit code: a slower peer that looks once the reporter has
    decided (and waits for the others to leave) must not report the run a second time."""
    from svd_batch.executor import Executor, Start, Timing
    from svd_batch.launch import Launch
    from svd_batch.ledger import JobInfo
    from svd_batch.rundir import RunDir

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    job = JobInfo(job="j1", state="active", total=2, done=0, failed_skipped=0, todo=2, units=2, manifest="m",
                  started_at=time.time())
    members = []
    for rank in (0, 1):
        launch = Launch()
        launch.rank, launch.world, launch.local_rank = rank, 2, rank
        ex = Executor(launch, rd, Timing(heartbeat=60.0), log=lambda m: None)
        ex.begin(Start(launch="L1", job=job), num_units=2)
        members.append(ex)
    first, second = members
    try:
        assert not second.is_reporter()  # local rank 0 is still running
        assert first.is_reporter()
        first.member.update(exit_code=1)  # what exit_code() writes before it waits for the others to leave
        assert not second.is_reporter()
    finally:
        for ex in members:
            ex.close()


def test_the_reporter_exits_only_after_its_peers_processes_are_gone(tmp_path, monkeypatch):
    """A peer writes its decided exit code before its interpreter shuts down: the reporter must not exit
    non-zero in that window (torchrun would SIGTERM the peer), so it waits for the process, not the code."""
    import svd_batch.executor as executor
    from svd_batch.executor import Executor, Start, Timing
    from svd_batch.launch import Launch
    from svd_batch.ledger import JobInfo
    from svd_batch.rundir import RunDir

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    peer = Member(rd.store, "L1-r00001", launch="L1", job="j1", rank=1, local_rank=1, world_size=2,
                  heartbeat_seconds=60.0)
    peer.start()
    peer.info["pid"] = 999_999_999  # its process: alive until told otherwise below
    peer.close(exit_code=0)  # decided, then a slow shutdown
    looks = []

    def pid_running(pid):
        if pid != 999_999_999:
            return True
        looks.append(pid)
        return len(looks) < 4  # the peer's interpreter takes three looks to exit

    monkeypatch.setattr(executor, "pid_running", pid_running)
    launch = Launch()
    launch.rank, launch.world, launch.local_rank = 0, 2, 0
    ex = Executor(launch, rd, Timing(heartbeat=60.0), log=lambda m: None)
    job = JobInfo(job="j1", state="active", total=2, done=0, failed_skipped=0, todo=2, units=2, manifest="m",
                  started_at=time.time())
    ex.begin(Start(launch="L1", job=job), num_units=2)
    try:
        assert ex.is_reporter()
        assert ex.exit_code(1) == 1
        assert len(looks) >= 4  # returned only once the peer's process was seen gone
    finally:
        ex.close()
