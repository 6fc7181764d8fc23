"""A source of images that goes down is an error of the run, not of its rows (outage.py)."""

import http.server
import threading

import pytest

from svd_batch.images import ImageError, fetch_bytes
from svd_batch.executor import EXIT_SOURCE
from svd_batch.outage import OutageGuard, SourceOutage, failure_kind, source_of
from tests.conftest import SAMPLE, free_port, part_records, read_results, run_cli, start_cli, wait_for_records, \
    write_manifest


class Images:
    """An image server on 127.0.0.1 that can be stopped, started again on the same port, or made to refuse."""

    def __init__(self):
        self.port, self.srv, self.answer = free_port(), None, 200
        self.pictures = [(SAMPLE / f).read_bytes() for f in ("cat.jpg", "rocket.jpg", "coffee.jpg")]

    def start(self):
        images = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if images.answer != 200:
                    self.send_error(images.answer)
                    return
                body = images.pictures[int(self.path.strip("/").split(".")[0][3:]) % 3]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.srv.shutdown()
        self.srv.server_close()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.port}/img{i}.jpg"


@pytest.fixture()
def images():
    srv = Images().start()
    yield srv
    srv.stop()


@pytest.mark.slow
def test_a_source_that_goes_away_stops_the_run_and_no_row_is_failed_for_it(tmp_path, images):
    m = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i:02d}", "image": images.url(i)} for i in range(12)])
    out = tmp_path / "out"
    log = open(tmp_path / "run.log", "w")
    proc = start_cli(f"manifest.path={m}", f"output.dir={out}", "images.outage_failures=3",
                     "images.outage_wait=2", "report.enabled=false", log=log)
    try:
        wait_for_records(out, 3, proc)
        images.stop()  # the server goes away mid-run
        assert proc.wait(timeout=300) == EXIT_SOURCE, (tmp_path / "run.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    assert f"the image source http://127.0.0.1:{images.port} failed 3 rows in a row" in text
    assert "No row was recorded as failed for it" in text and "Traceback" not in text
    done = part_records(out)
    assert 3 <= done.num_rows < 12 and set(done["status"].to_pylist()) == {"ok"}  # nothing recorded failed

    # The server is back: the same command does every row that was not done.
    images.start()
    again = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.enabled=false")
    assert again.returncode == 0, again.stderr
    t = read_results(out)
    assert t.num_rows == 12 and set(t["status"].to_pylist()) == {"ok"}
    assert f"{12 - done.num_rows} rows in" in again.stderr  # only the rows not done ran


@pytest.mark.slow
def test_refused_credentials_stop_the_run_before_rows_fail_one_by_one(tmp_path, images):
    images.answer = 403
    m = write_manifest(tmp_path / "m.parquet", [{"id": f"r{i}", "image": images.url(i)} for i in range(8)])
    out = tmp_path / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "images.outage_failures=3", "images.outage_wait=1")
    assert proc.returncode == EXIT_SOURCE, proc.stderr
    assert "(permission: " in proc.stderr and "Check the credentials" in proc.stderr
    assert part_records(out).num_rows == 0  # not one row recorded failed
    # The rule can be turned off: then they are the rows' failures, as before.
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "images.outage_failures=0")
    assert proc.returncode == 1, proc.stderr
    t = read_results(out)
    assert set(t["status"].to_pylist()) == {"failed"} and "HTTP 403" in t["error"][0].as_py()


# -- the rule itself -----------------------------------------------------------------------------------------
def test_errors_are_told_apart_by_whose_fault_they_are(images):
    refused = free_port()  # nothing listens there
    with pytest.raises(ImageError) as gone:
        fetch_bytes(f"http://127.0.0.1:{refused}/a.jpg", 5, 1 << 20)
    images.answer = 403
    with pytest.raises(ImageError) as forbidden:
        fetch_bytes(images.url(0), 5, 1 << 20)
    images.answer = 503
    with pytest.raises(ImageError) as unavailable:
        fetch_bytes(images.url(0), 5, 1 << 20)
    images.answer = 404
    with pytest.raises(ImageError) as missing:
        fetch_bytes(images.url(0), 5, 1 << 20)
    assert failure_kind(str(gone.value)) == "connection"
    assert failure_kind(str(forbidden.value)) == "permission"
    assert failure_kind(str(unavailable.value)) == "connection"
    assert failure_kind(str(missing.value)) is None  # the server answers: the row's own problem
    for own in ("file not found: /data/a.jpg", "cannot identify image file", "over the 67108864 byte cap"):
        assert failure_kind(own) is None
    # What s3fs/botocore say through remote.read_bytes
    assert failure_kind("could not read s3://b/k.jpg: PermissionError: Forbidden") == "permission"
    assert failure_kind("could not read s3://b/k.jpg: NoCredentialsError: Unable to locate credentials") == "permission"
    assert failure_kind("could not read s3://b/k.jpg: EndpointConnectionError: Could not connect to the "
                        "endpoint URL") == "connection"
    assert source_of("s3://bucket/a/b.jpg") == source_of("s3://bucket/c.jpg") == "s3://bucket"
    assert source_of("parquet://s3://bucket/shard-1.parquet#row=3&column=image.bytes") == "s3://bucket"
    assert source_of("https://cdn.example.org:8443/x.jpg?sig=1") == "https://cdn.example.org:8443"
    assert source_of("/data/set/a.jpg") == "/data/set"


class Clock:
    def __init__(self):
        self.t = 0.0

    def now(self):
        return self.t

    def sleep(self, s):
        self.t += s


def guard(probe, **kw):
    clock, said = Clock(), []
    g = OutageGuard(probe, log=said.append, sleep=clock.sleep, clock=clock.now, **{"failures": 3, "wait_seconds": 10, **kw})
    return g, clock, said


def down(uri):
    raise ImageError(f"could not fetch {uri}: [Errno 111] Connection refused")


A, B = "http://a:1/x.jpg", "http://b:1/y.jpg"
REFUSED = "row r: image 'x': could not fetch http://a:1/x.jpg: [Errno 111] Connection refused"


def test_failures_below_the_threshold_are_the_rows_own_once_the_source_answers():
    g, _, _ = guard(down)
    assert g.screen([(A, REFUSED, "f1"), (A, REFUSED, "f2")]) == []  # held, not recorded yet
    assert g.screen([(B, REFUSED, "other source")]) == []  # another source has its own count
    assert g.screen([(A, None, "ok")]) == ["f1", "f2", "ok"]  # A answers: those two failed on their own
    assert g.screen([(A, "HTTP 404 Not Found", "404")]) == ["404"]  # the row's own error: recorded at once
    assert g.release() == ["other source"]  # the rank's end: what is still held failed on its own


def test_a_source_that_stays_down_stops_the_run_after_backing_off():
    probes = []
    g, clock, said = guard(lambda uri: (probes.append(clock.now()), down(uri)))
    assert g.screen([(A, REFUSED, 1), (A, REFUSED, 2)]) == []
    with pytest.raises(SourceOutage, match=r"http://a:1 failed 3 rows in a row.*No row was recorded as failed"):
        g.screen([(A, REFUSED, 3)])
    assert clock.now() >= 10 and len(probes) >= 3  # retried with growing waits for the whole wait
    assert probes == sorted(probes) and probes[1] - probes[0] > probes[0] > 0
    assert "retrying it for up to 10 s" in said[0]


def test_a_source_that_comes_back_goes_on_and_its_outage_rows_are_not_recorded():
    answers = iter([down, down, lambda uri: None])
    g, _, said = guard(lambda uri: next(answers)(uri))
    assert g.screen([(A, REFUSED, 1), (A, REFUSED, 2), (A, REFUSED, 3)]) == []  # no SourceOutage: it came back
    assert "answers again" in said[-1] and g.not_recorded == 3
    # Rows that failed while it was coming back (already in the queue) are the outage's too, not the rows'.
    assert g.screen([(A, REFUSED, 4), (A, None, "ok")]) == ["ok"] and g.not_recorded == 4
    assert g.screen([(A, REFUSED, 5)]) == [] and g.release() == [5]  # back to normal: below the threshold


def test_the_rule_can_be_turned_off():
    g, _, _ = guard(down, failures=0)
    assert g.screen([(A, REFUSED, i) for i in range(10)]) == list(range(10))


def test_a_stop_of_the_run_ends_the_wait_and_leaves_the_rows_undone():
    clock, said, stop = Clock(), [], []
    g = OutageGuard(down, failures=2, wait_seconds=120, log=said.append, sleep=lambda s: (clock.sleep(s), stop.append(1)),
                    clock=clock.now, stopped=lambda: len(stop) >= 3)
    assert g.screen([(A, REFUSED, 1), (A, REFUSED, 2)]) == []  # no SourceOutage: the run is being stopped
    assert clock.now() < 5  # noticed within a second of the signal, not after 120 s
    assert g.release() == [] and g.not_recorded == 2  # not recorded failed: the next run does them
