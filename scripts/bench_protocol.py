"""The run folder's protocol (issue 16): what it costs per unit, and how fast a lost launch's units are finished.

    .venv/bin/python scripts/bench_protocol.py [--units 1000000] [--sample 20000] [--rows 120] [--repeats 3]
        [--baseline REV] [--skip-e2e] [--skip-takeover]

Part 1, per-unit cost at scale: a job of --units units in a folder on this disk; times, per unit, what a member
does for each unit it runs: claim it (an exclusive hard link), list it as held and drop it again once recorded
(in memory: the heartbeat thread writes the member file every 2 s, timed apart), and check that nobody took it
over (one stat), at the start, the middle and the end of the unit list; plus a newcomer's start (reading every member file) and writing/reading the job's
plan. Then the same claims made by two processes racing (each claim attempt that loses costs one failed link).

Part 2, end to end: --rows tiny rows (32x32, 2 frames, 1 step: the protocol's share is largest there) in one
process, with this tree and with --baseline (a git revision, default the commit before the protocol change),
interleaved, median of --repeats: the time per row and the ratio.

Part 3, takeover: two independent launches on one folder; one is SIGKILLed (its locks are freed: the others
take over at once) or SIGSTOPped (a hung node: after the lease) while it holds a unit; the time from the kill or
stop until its unit's row is recorded by the other launch.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from svd_batch.ledger import Claims, JobDir, Member, Ticket, read_members  # noqa: E402
from svd_batch.store import PosixStore  # noqa: E402

SAMPLE = os.path.join(REPO, "svd_batch", "data", "sample")


def per_unit(units: int, sample: int) -> None:
    with tempfile.TemporaryDirectory(dir=REPO) as root:  # this disk, as a run folder would be
        state = os.path.join(root, ".svd-batch")
        store = PosixStore(state)
        jobdir = JobDir(store, "job")
        t = time.perf_counter()
        jobdir.create(np.arange(units), np.arange(units + 1))
        write_plan = time.perf_counter() - t
        t = time.perf_counter()
        jobdir.read_plan()
        read_plan = time.perf_counter() - t
        m = Member(store, "me", launch="l", job="job", rank=0, local_rank=0, world_size=1, heartbeat_seconds=3600)
        m.start()
        claims = Claims(jobdir, "me")
        print(f"per-unit protocol cost, job of {units:,} units (plan written in {write_plan:.2f} s, "
              f"read in {read_plan:.2f} s)")
        for where, first in (("start", 0), ("middle", units // 2), ("end", units - sample)):
            take, hold, check, drop = [], [], [], []
            for u in range(first, first + sample):
                tk = Ticket(u)
                a = time.perf_counter()
                assert claims.take(tk)
                b = time.perf_counter()
                m.hold(tk, write=False, cursor=u + 1)  # as the executor does: the next heartbeat writes it
                c = time.perf_counter()
                claims.superseded(tk)
                d = time.perf_counter()
                m.drop(tk, write=False)
                e = time.perf_counter()
                take.append(b - a), hold.append(c - b), check.append(d - c), drop.append(e - d)
            med = [statistics.median(x) * 1e6 for x in (take, hold, check, drop)]
            print(f"  {where:6s}: claim {med[0]:6.1f} us, list as held {med[1]:5.1f} us, takeover check "
                  f"{med[2]:5.1f} us, drop {med[3]:5.1f} us; total {sum(med):6.1f} us per unit (median of {sample:,})")
        beats = []
        for _ in range(200):
            t = time.perf_counter()
            m.update()
            beats.append(time.perf_counter() - t)
        print(f"  a heartbeat (one member file rewritten, every runtime.heartbeat_seconds): "
              f"{1e6 * statistics.median(beats):.0f} us")
        for k in range(64):  # a newcomer reads every member file of the job (64 ranks)
            Member(store, f"m{k}", launch="l", job="job", rank=k, local_rank=0, world_size=64,
                   heartbeat_seconds=3600).update()
        t = time.perf_counter()
        read_members(store, "job")
        print(f"  a newcomer reads 65 member files in {1e3 * (time.perf_counter() - t):.1f} ms")
        m.close()
        # Two processes claiming the same units in order: each claim a loser also tried costs a failed link.
        race = ("import sys, time; sys.path.insert(0, sys.argv[3]); from svd_batch.ledger import Claims, JobDir, Ticket\n"
                "from svd_batch.store import PosixStore\n"
                "c = Claims(JobDir(PosixStore(sys.argv[1]), 'race'), sys.argv[2]); n = int(sys.argv[4]); won = 0\n"
                "t = time.perf_counter()\n"
                "for u in range(n): won += c.take(Ticket(u))\n"
                "print(won, time.perf_counter() - t)")
        JobDir(store, "race").create(np.arange(sample), np.arange(sample + 1))
        procs = [subprocess.Popen([sys.executable, "-c", race, state, f"p{k}", REPO, str(sample)],
                                  stdout=subprocess.PIPE, text=True) for k in range(2)]
        got = [p.communicate()[0].split() for p in procs]
        won = sum(int(w) for w, _ in got)
        secs = max(float(s) for _, s in got)
        print(f"  2 processes racing for {sample:,} units: {won:,} claims made (each unit once), "
              f"{1e6 * secs / sample:.1f} us per unit of wall time")


def tiny_manifest(root: str, n: int) -> str:
    path = os.path.join(root, "tiny.parquet")
    pq.write_table(pa.table({"id": [f"t{i:04d}" for i in range(n)],
                             "image": [os.path.join(SAMPLE, "cat.jpg")] * n, "seed": list(range(n))}), path)
    return path


TINY = ["model=tiny", "generation.height=32", "generation.width=32", "generation.num_frames=2",
        "generation.num_inference_steps=1", "runtime.threads=1", "runtime.progress=false", "report.enabled=false",
        "report.scores=false", "runtime.overlap=false"]


def end_to_end(rows: int, repeats: int, baseline: str) -> None:
    with tempfile.TemporaryDirectory() as root:
        base = os.path.join(root, "baseline")
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "-q", base, baseline], check=True)
        try:
            manifest = tiny_manifest(root, rows)
            times: dict[str, list[float]] = {"baseline": [], "this tree": []}
            for _ in range(repeats):
                for name, tree in (("baseline", base), ("this tree", REPO)):
                    out = os.path.join(root, "out")
                    shutil.rmtree(out, ignore_errors=True)
                    t = time.perf_counter()
                    proc = subprocess.run([sys.executable, "-m", "svd_batch", *TINY, f"manifest.path={manifest}",
                                           f"output.dir={out}"], cwd=tree, capture_output=True, text=True,
                                          env={**os.environ, "PYTHONPATH": tree})
                    wall = time.perf_counter() - t
                    if proc.returncode != 0:
                        sys.exit(proc.stderr)
                    res = pq.read_table(os.path.join(out, "results.parquet"))
                    span = (max(res["finished_at"].to_pylist()) - min(res["started_at"].to_pylist())).total_seconds()
                    times[name].append(span / rows)
                    print(f"  {name:9s}: {1e3 * span / rows:7.2f} ms per row ({wall:.1f} s wall)", flush=True)
            b, n = statistics.median(times["baseline"]), statistics.median(times["this tree"])
            print(f"end to end, {rows} tiny rows, median of {repeats}: baseline ({baseline}) {1e3 * b:.2f} ms per row, "
                  f"this tree {1e3 * n:.2f} ms per row, ratio {n / b:.3f}")
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", base], check=False)


def members_of(out: str) -> list[dict]:
    return read_members(PosixStore(os.path.join(out, ".svd-batch")))


def takeover(how: str, lease: float) -> float:
    """Seconds from killing/stopping launch A (holding a unit) until that unit's rows are recorded by B."""
    from svd_batch.rundir import RunDir

    with tempfile.TemporaryDirectory() as root:
        manifest = tiny_manifest(root, 12)
        out = os.path.join(root, "out")
        args = [sys.executable, "-m", "svd_batch", *TINY, "generation.height=64", "generation.width=64",
                "generation.num_frames=6", "generation.num_inference_steps=4", f"manifest.path={manifest}",
                f"output.dir={out}", f"runtime.lease_seconds={lease}", "runtime.heartbeat_seconds=1"]
        env = {**os.environ, "SVD_BATCH_INJECT_SLOW": "0:3"}
        a = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not any(m["pid"] == a.pid and m["holding"] for m in members_of(out)):
            time.sleep(0.05)
        b = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not any(m["pid"] == b.pid for m in members_of(out)):
            time.sleep(0.05)
        while True:  # A in the middle of a unit
            held = [m["holding"] for m in members_of(out) if m["pid"] == a.pid and m["holding"]]
            if held:
                break
            time.sleep(0.02)
        unit = held[0][0][0]
        os.kill(a.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t = time.monotonic()
        plan = JobDir(PosixStore(os.path.join(out, ".svd-batch")), json.load(open(os.path.join(out, ".svd-batch", "job.json")))["job"])
        indices, starts = plan.read_plan()
        want = {f"t{i:04d}" for i in indices[starts[unit]:starts[unit + 1]]}
        while not want <= set(RunDir(out).read_records(["id"])["id"].to_pylist()):
            time.sleep(0.05)
        took = time.monotonic() - t
        if how == "stop":
            os.kill(a.pid, signal.SIGCONT)
        a.wait()
        b.wait()
        return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=20_000)
    ap.add_argument("--rows", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline", default="9507206")
    ap.add_argument("--lease", type=float, default=10.0)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-takeover", action="store_true")
    args = ap.parse_args()
    per_unit(args.units, args.sample)
    if not args.skip_e2e:
        end_to_end(args.rows, args.repeats, args.baseline)
    if not args.skip_takeover:
        for how in ("kill", "stop"):
            secs = [takeover(how, args.lease) for _ in range(args.repeats)]
            print(f"takeover after {'SIGKILL' if how == 'kill' else 'SIGSTOP (lease ' + str(args.lease) + ' s)'}: "
                  f"the lost unit recorded by the other launch {statistics.median(secs):.1f} s later "
                  f"(median of {args.repeats}: {', '.join(f'{s:.1f}' for s in secs)})")


if __name__ == "__main__":
    main()
