"""Remote manifests: a read that stops arriving is abandoned after images.timeout, whatever the library's retries."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from svd_batch.remote import RemoteError, without_stall
from tests.conftest import REPO


@pytest.fixture()
def hung_server():
    """Accepts connections and never answers: what a hung S3 endpoint looks like to a client."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held, stop = [], threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()


@pytest.mark.slow
def test_a_hung_manifest_server_stops_the_dry_run_with_exit_2(hung_server, tmp_path):
    # Without the bound, fsspec's HTTP client waits 5 minutes per request (S3 clients retry for 7): this
    # subprocess timeout would expire first.
    proc = subprocess.run([sys.executable, "-m", "svd_batch", f"manifest.path={hung_server}/m.parquet",
                           "images.timeout=3", "dry_run=true", f"output.dir={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "nothing arrived for 3 s (images.timeout)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_slow_read_that_keeps_moving_is_not_cut_off():
    def moving(activity):
        for _ in range(12):  # 1.2 s in all, longer than the timeout, with progress every 0.1 s
            time.sleep(0.1)
            activity.touch()
        return "all of it"

    assert without_stall(moving, 0.5, "a slow read") == "all of it"
    with pytest.raises(RemoteError, match="nothing arrived for 0.5 s"):
        without_stall(lambda activity: time.sleep(30), 0.5, "a stuck read")
    with pytest.raises(ValueError, match="its own error"):  # a failure of the read itself comes through as is
        without_stall(lambda activity: (_ for _ in ()).throw(ValueError("its own error")), 5, "a read")
