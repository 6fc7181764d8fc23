"""The report never reaches out: opening index.html loads only files svd-batch wrote inside the run folder, whatever
a failed row's image reference was (a URL of a malfunctioning server, /dev/zero, a FIFO, a path outside)."""

import datetime as dt
import http.server
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd_batch.fields import RESULT_SCHEMA


class CountingServer:
    """127.0.0.1 server that counts every request and answers each with a redirect to itself (a loop)."""

    def __init__(self):
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                owner.requests.append(self.path)
                self.send_response(302)
                self.send_header("Location", self.path + "x")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def hostile_run(root: Path, url: str, videos: bool = False) -> dict[str, str]:
    """A run folder as svd-batch leaves it: two ok rows (video and input saved) and failed rows whose image
    references must never be opened by the page. Returns id -> image reference of the failed rows."""
    (root / ".svd-batch").mkdir(parents=True)
    (root / "videos").mkdir()
    (root / "inputs").mkdir()
    fifo = root.parent / "a-fifo.jpg"
    os.mkfifo(fifo)
    failed = {"device": "../../../../dev/zero", "fifo": str(fifo), "url": f"{url}/loop.jpg",
              "local": "../elsewhere/missing.jpg", "quote": "x\" onerror=\"alert(1).jpg"}
    ok = ["cat", "dog", "held"]
    for rid in ok:
        Image.new("RGB", (64, 64), (200, 80, 40)).save(root / "inputs" / f"{rid}.jpg")
        if rid == "held":  # an ok row whose video is now a FIFO: never handed to the browser either
            os.mkfifo(root / "videos" / f"{rid}.mp4")
        elif videos:
            from svd_batch.video import write_mp4

            frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
            write_mp4(frames, str(root / "videos" / f"{rid}.mp4"), 8)
        else:
            (root / "videos" / f"{rid}.mp4").write_bytes(b"not decoded by this test")
    ids = ok + list(failed)
    n = len(ids)
    t0 = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    cols = {f.name: pa.nulls(n, f.type) for f in RESULT_SCHEMA}
    cols.update({
        "id": pa.array(ids), "status": pa.array(["ok"] * len(ok) + ["failed"] * len(failed)),
        "error": pa.array([None] * len(ok) + [f"row {k}: image {failed[i]!r}: cannot be read"
                                              for k, i in enumerate(failed, len(ok))]),
        "video_path": pa.array([f"videos/{i}.mp4" for i in ok] + [None] * len(failed)),
        "image": pa.array([f"{i}.jpg" for i in ok] + list(failed.values())),
        "row": pa.array(range(n), pa.int64()), "seed": pa.array(range(n), pa.int64()),
        "fps": pa.array([8] * n, pa.int64()), "num_frames": pa.array([8] * n, pa.int64()),
        "width": pa.array([64] * n, pa.int64()), "height": pa.array([64] * n, pa.int64()),
        "total_seconds": pa.array([1.5, 2.5, 2.0] + [0.01] * len(failed)), "rank": pa.array([0] * n, pa.int32()),
        "host": pa.array(["node"] * n), "device": pa.array(["cpu"] * n), "model": pa.array(["tiny"] * n),
        "started_at": pa.array([t0 + dt.timedelta(seconds=2 * k) for k in range(n)], pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array([t0 + dt.timedelta(seconds=2 * k + 1.5) for k in range(n)], pa.timestamp("us", tz="UTC")),
    })
    pq.write_table(pa.table({f.name: cols[f.name].cast(f.type) for f in RESULT_SCHEMA}), root / "results.parquet")
    return failed


def chunk(root: Path) -> dict:
    text = (root / "report" / "data-00000.js").read_text()
    return json.loads(re.match(r"SVD\.chunk\(0,(.*)\);\s*$", text, re.S).group(1))


def test_the_row_data_names_no_file_the_run_did_not_write(tmp_path):
    from svd_batch.report import write_gallery

    root = tmp_path / "run"
    failed = hostile_run(root, "http://127.0.0.1:9")
    write_gallery(str(root))
    cols = chunk(root)
    # What the page builds a src from is only "the file svd-batch wrote is there" (1) or "it is not" (0).
    assert cols["img"] == [1, 1, 1] + [0] * len(failed)
    assert cols["vid"] == [1, 1, 0] + [0] * len(failed)  # held.mp4 is a FIFO, not a video
    # A failed row's reference is there as text, for the page to show.
    assert {cols["id"][int(k)]: v for k, v in cols["src"].items()} == failed
    page = (root / "index.html").read_text()
    html = page.split("<script")[0]  # the markup; the cards are drawn by the page's script from the data above
    assert "../../../../dev/zero" in html and "127.0.0.1" in html  # the failed rows' table, as text
    for attr in re.findall(r'\b(?:src|href|poster)="([^"]*)"', html):
        assert attr in ("contact_sheet.png", "results.parquet"), attr


@pytest.mark.browser
def test_the_page_of_a_run_with_hostile_failed_rows_loads_only_its_own_files(tmp_path):
    from svd_batch.report import write_gallery
    from tests.browser import Browser

    server = CountingServer()
    try:
        root = tmp_path / "run"
        failed = hostile_run(root, server.url, videos=True)
        write_gallery(str(root))
        b = Browser(tmp_path / "profile", 1400, 2400)
        try:
            b.page("Network.enable")
            b.open((root / "index.html").resolve().as_uri())
            # Both videos play; every card is drawn, each failed one showing its reference as text.
            b.wait("[...document.querySelectorAll('#grid video')].filter(v => v.dataset.playing === '1').length === 2",
                   timeout=90, what="both videos playing")
            assert b.js("document.readyState") == "complete"
            refs = b.js("[...document.querySelectorAll('#grid .card.failed .ref')].map(e => e.textContent)")
            assert sorted(r for r in refs if r) == sorted(f"image: {v}" for v in failed.values())
            assert b.js("document.querySelectorAll('#grid .card').length") == 3 + len(failed)
            assert b.js("document.querySelector('.card[data-id=held] .ref').textContent") == "video file missing"
            loaded = b.js("[...document.querySelectorAll('[src],[poster],[href]')].flatMap(e => "
                          "['src', 'poster', 'href'].map(a => e.getAttribute(a)).filter(Boolean))")
            requested = [e["params"]["request"]["url"] for e in b.events
                         if e.get("method") == "Network.requestWillBeSent"]
        finally:
            b.close()
        inside = root.resolve().as_uri() + "/"
        assert requested and all(u.startswith(inside) for u in requested), requested
        assert any(u.endswith("/videos/cat.mp4") for u in requested)  # the listener saw the page's own loads
        assert all(not re.match(r"^[a-z]+:|^/|\.\.", a) for a in loaded), loaded
        assert server.requests == []
    finally:
        server.close()
