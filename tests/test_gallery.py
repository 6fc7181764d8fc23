"""The gallery and contact sheet, checked in a real headless browser and as pixels."""

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from functools import partial

import pytest
from PIL import Image

from tests.conftest import SAMPLE, read_results, run_cli, write_manifest

HARNESS = """<!doctype html><html><body><iframe id="f" src="{page}"></iframe><pre id="result">pending</pre><script>
const f = document.getElementById('f');
f.onload = () => {{
  const vids = [...f.contentDocument.querySelectorAll('video')];
  const out = {{}};
  let left = vids.length;
  const done = () => {{ document.getElementById('result').textContent = JSON.stringify(out); }};
  const rec = (v, value) => {{ out[v.dataset.id] = value; if (--left === 0) done(); }};
  vids.forEach(v => {{
    if (v.readyState >= 1) rec(v, v.duration);
    else {{
      v.addEventListener('loadedmetadata', () => rec(v, v.duration));
      v.addEventListener('error', () => rec(v, 'error ' + (v.error && v.error.code)));
      v.load();
    }}
  }});
  if (!vids.length) done();
}};
</script></body></html>"""


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed for this test: `make test` installs it (Debian package chromium)"
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gallery")
    rows = [{"id": "cat", "image": str(SAMPLE / "cat.jpg"), "fps": 8, "num_frames": 8},
            {"id": "rocket", "image": str(SAMPLE / "rocket.jpg"), "fps": 4, "num_frames": 6},
            {"id": "coffee", "image": str(SAMPLE / "coffee.jpg"), "fps": 12, "num_frames": 9},
            {"id": "gone", "image": str(d / "missing.jpg")}]
    m = write_manifest(d / "m.parquet", rows)
    out = d / "out"
    proc = run_cli(f"manifest.path={m}", f"output.dir={out}", "report.page_size=2")
    assert proc.returncode == 1, proc.stderr  # one row failed on purpose
    return out


def serve(root):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def durations_in_browser(root, page, tmp_path) -> dict:
    (root / "selftest.html").write_text(HARNESS.format(page=page))
    srv = serve(root)
    try:
        proc = subprocess.run(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--mute-audio",
             "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=20000", "--dump-dom",
             f"http://127.0.0.1:{srv.server_address[1]}/selftest.html"],
            capture_output=True, text=True, timeout=120)
    finally:
        srv.shutdown()
        os.unlink(root / "selftest.html")
    found = re.search(r'<pre id="result">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(found.group(1))


def test_every_video_on_the_first_page_loads_with_its_duration(run_dir, tmp_path):
    results = {r["id"]: r for r in read_results(run_dir).to_pylist()}
    got = durations_in_browser(run_dir, "index.html", tmp_path)
    assert sorted(got) == ["cat", "rocket"]  # page 1 of 2 (page size 2), in manifest order
    for vid, duration in got.items():
        r = results[vid]
        assert isinstance(duration, (int, float)), f"{vid}: {duration}"
        assert abs(duration - r["num_frames"] / r["fps"]) < 0.5 / r["fps"] + 0.02, (vid, duration)
    assert list(durations_in_browser(run_dir, "index-2.html", tmp_path)) == ["coffee"]


def test_page_content(run_dir):
    page = (run_dir / "index.html").read_text()
    assert "rows ok</th><td>3" in page and "rows failed</th><td>1" in page
    assert "videos per hour" in page and "p95 per video" in page and "Peak VRAM" in page
    assert 'href="index-2.html"' in page and "missing.jpg" in page and "file not found" in page
    assert "seed " in page and "motion 127" in page and "muted loop" in page
    assert 'src="videos/cat.mp4"' in page and "http" not in page.split("<script>")[0].split("<body>")[1]
    assert "IntersectionObserver" in page  # only visible videos play


def test_contact_sheet_shows_first_middle_last_frames(run_dir, tmp_path):
    # Thumbnails were kept while the frames were in memory, so the sheet decodes nothing.
    assert sorted(p.name for p in (run_dir / ".svd-batch" / "thumbs").iterdir()) == ["cat.png", "coffee.png", "rocket.png"]
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.mode == "RGB" and sheet.height >= 4 * 128  # four rows, the failed one labelled
    strip = sheet.crop((300, 0, sheet.width, 140)).convert("L")
    assert strip.getextrema()[1] - strip.getextrema()[0] > 50  # real frames, not an empty canvas
    # Without thumbnails (a run made before them, or deleted) the sheet decodes the videos: same picture.
    from svd_batch.gallery import write_contact_sheet

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / ".svd-batch" / "thumbs")
    write_contact_sheet(str(copy))
    decoded = Image.open(copy / "contact_sheet.png")
    assert decoded.size == sheet.size


def test_report_command_on_an_interrupted_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    os.unlink(copy / "results.parquet")  # as if killed before the merge: records only
    for f in ("index.html", "index-2.html", "contact_sheet.png"):
        os.unlink(copy / f)
    proc = subprocess.run([str(Path(sys.executable).with_name("svd-batch-report")), str(copy), "--page-size", "10"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "index.html").exists() and (copy / "contact_sheet.png").exists()
    assert not (copy / "index-2.html").exists()
