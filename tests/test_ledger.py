"""ledger.py: claims (each unit once, naming its holder), members' heartbeats and locks, and who is lost."""

import json
import os
import signal
import subprocess
import sys
import time

from svd_batch.ledger import Claims, JobDir, Member, Peers, Ticket, member_gone, takeover_candidates
from tests.conftest import REPO
from tests.test_executor import wait_until


# -- the ledger, in one process ----------------------------------------------------------------------------------
def test_each_unit_is_claimed_once_by_racing_processes(tmp_path):
    jobdir = JobDir(str(tmp_path), "j")
    jobdir.create([0, 1, 2], [0, 1, 2, 3])
    code = ("import sys; from svd_batch.ledger import Claims, JobDir, Ticket\n"
            "c = Claims(JobDir(sys.argv[1], 'j'), sys.argv[2], sys.argv[1])\n"
            "print(' '.join(str(u) for u in range(300) if c.take(Ticket(u))))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"m{k}"], cwd=REPO, stdout=subprocess.PIPE,
                              text=True) for k in range(4)]
    won = [list(map(int, p.communicate()[0].split())) for p in procs]
    assert sorted(u for w in won for u in w) == list(range(300))  # each unit once, none lost
    claims = Claims(jobdir, "x", str(tmp_path))
    for k, w in enumerate(won):
        assert all(claims.holder(Ticket(u)) == f"m{k}" for u in w)  # a claim names its holder


def test_a_claim_names_its_holder_without_hard_links_and_past_the_link_limit(tmp_path, monkeypatch):
    import errno

    jobdir = JobDir(str(tmp_path), "j")
    jobdir.create([0], [0, 1])
    c = Claims(jobdir, "me", str(tmp_path))
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
    assert calls[2] != calls[0]  # a new token after EMLINK
    assert not c.take(Ticket(3)) and not c.take(Ticket(1))
    assert [c.holder(Ticket(u)) for u in range(4)] == ["me"] * 4
    assert c.take(Ticket(3, 1)) and c.superseded(Ticket(3)) and c.latest(3) == Ticket(3, 1)


def test_the_heartbeat_survives_write_errors(tmp_path, monkeypatch):
    import svd_batch.ledger as ledger

    said = []
    m = Member(str(tmp_path), "m", launch="l", job="j", rank=0, local_rank=0, world_size=1, heartbeat_seconds=0.05,
               log=said.append)
    m.start()
    real = ledger.write_text_atomic
    failures = [0]

    def flaky(text, path, durable=True):
        if failures[0] < 5:
            failures[0] += 1
            raise OSError(5, "Input/output error")
        return real(text, path, durable=durable)

    monkeypatch.setattr(ledger, "write_text_atomic", flaky)
    before = json.loads((tmp_path / "m.json").read_text())["beat"]
    wait_until(lambda: json.loads((tmp_path / "m.json").read_text())["beat"] > before + 3, "beats after the errors",
               timeout=20)
    m.close(0)
    assert failures[0] == 5 and len(said) == 2 and "retrying" in said[0] and "writable again" in said[1]


def test_a_paused_member_is_lost_only_after_the_lease_and_a_dead_one_at_once(tmp_path):
    code = ("import sys, time; from svd_batch.ledger import Member\n"
            "m = Member(sys.argv[1], sys.argv[2], launch='l', job='j', rank=0, local_rank=0, world_size=1,"
            " heartbeat_seconds=0.1)\n"
            "m.start(); m.hold(__import__('svd_batch.ledger').ledger.Ticket(7)); print('up', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "other"], cwd=REPO, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "up"
        peers = Peers(str(tmp_path), "j", "me", lease=2.0)
        assert [d["lost"] for d in peers.poll()] == [False]
        os.kill(p.pid, signal.SIGSTOP)  # paused: holds its lock, stops beating
        t = time.monotonic()
        while not peers.poll()[0]["lost"]:
            assert time.monotonic() - t < 15
            time.sleep(0.1)
        assert time.monotonic() - t >= 1.5  # not before the lease (on this process's own clock)
        assert not member_gone(str(tmp_path), "other")
        jobdir = JobDir(str(tmp_path), "j")
        jobdir.create([0] * 8, list(range(9)))
        c = Claims(jobdir, "other", str(tmp_path))
        assert c.take(Ticket(7))
        assert [(t.unit, why) for t, _, why in takeover_candidates(peers.poll(), c, 8)] == [(7, "lost")]
        os.kill(p.pid, signal.SIGCONT)
        wait_until(lambda: not peers.poll()[0]["lost"], "the heartbeat to move again", timeout=10)
        p.kill()
        p.wait()
        assert member_gone(str(tmp_path), "other")
        fresh = Peers(str(tmp_path), "j", "me", lease=3600)  # a newcomer with a long lease: the lock decides
        assert fresh.poll()[0]["lost"]
    finally:
        p.kill()


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


def test_the_reporter_exits_only_after_its_peers_processes_are_gone(tmp_path):
    """A peer writes its decided exit code before its interpreter shuts down: the reporter must not exit
    non-zero in that window (torchrun would SIGTERM the peer), so it waits for the process, not the code."""
    from svd_batch.executor import Executor, Start, Timing
    from svd_batch.launch import Launch
    from svd_batch.ledger import JobInfo
    from svd_batch.rundir import RunDir

    rd = RunDir(str(tmp_path / "out"))
    rd.create()
    peer = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from svd_batch.ledger import Member
m = Member({rd.members!r}, "L1-r00001", launch="L1", job="j1", rank=1, local_rank=1, world_size=2,
           heartbeat_seconds=60.0, log=print)
m.start()
m.close(exit_code=0)  # decided, then a slow shutdown
print("decided", flush=True)
time.sleep(1.5)
"""], stdout=subprocess.PIPE, text=True)
    assert peer.stdout.readline().strip() == "decided"
    launch = Launch()
    launch.rank, launch.world, launch.local_rank = 0, 2, 0
    ex = Executor(launch, rd, Timing(heartbeat=60.0), log=lambda m: None)
    job = JobInfo(job="j1", state="active", total=2, done=0, failed_skipped=0, todo=2, units=2, manifest="m",
                  started_at=time.time())
    ex.begin(Start(launch="L1", job=job), num_units=2)
    try:
        assert ex.is_reporter()
        assert ex.exit_code(1) == 1
        assert peer.poll() is not None  # the peer had exited before the reporter's code was returned
    finally:
        ex.close()
        peer.wait()
