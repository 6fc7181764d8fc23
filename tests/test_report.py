"""The report and contact sheet, checked in a real headless browser (from file://, no server) and as pixels."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import REPO, SAMPLE, input_file, read_results, run_cli, video_file, write_manifest

PAGE = 24  # videos per page in the big report


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "headless Chromium is needed for this test: `make test` installs it (Debian package chromium)"
    return path


def open_page(root: Path, fragment: str, tmp_path: Path) -> str:
    """The page's DOM after it loaded its rows and its videos had time to load and play."""
    url = (root / "index.html").resolve().as_uri() + (f"#{fragment}" if fragment else "")
    # A tall window: every card of a page is on screen, so every video of the page is asked to play.
    proc = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic", "--mute-audio",
         "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1400,12000", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180)
    assert 'data-loaded="1"' in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def open_page_playing(root: Path, fragment: str, tmp_path: Path, tries: int = 3) -> str:
    """open_page, again while a video of the page has not started yet: headless Chromium's virtual time runs
    out before a slow decode on a loaded machine, which says nothing about the page."""
    for _ in range(tries):
        dom = open_page(root, fragment, tmp_path)
        if all(c["failed"] or (c["video"] or {}).get("data-playing") == "1" for c in cards(dom)):
            break
    return dom


def cards(dom: str) -> list[dict]:
    """Each card on the page: id, whether it is a failed row, its video and input image state."""
    out = []
    for m in re.finditer(r'<div class="card( failed)?" data-id="([^"]+)" data-row="(\d+)"(.*?)</div></div>(?=<div class="card|</div>)',
                         dom, re.S):
        body = m.group(4)
        video = re.search(r"<video ([^>]*)>", body)
        img = re.search(r'<img class="in" ([^>]*)>', body)
        attrs = lambda tag: dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) if tag else None  # noqa: E731
        out.append({"id": m.group(2), "failed": bool(m.group(1)), "video": attrs(video and video.group(1)),
                    "img": attrs(img and img.group(1))})
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real run of the tiny model: three videos and one failed row."""
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


def synthetic_results(n: int) -> pa.Table:
    spec = importlib.util.spec_from_file_location("bench_report", REPO / "scripts" / "bench_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.synthetic_results(n, seed=1)


@pytest.fixture(scope="module")
def big_report(run_dir, tmp_path_factory):
    """1,200 rows (2% failed) whose videos and input images are links to the real run's files."""
    root = tmp_path_factory.mktemp("big") / "run"
    for d in ("videos", "inputs", ".svd-batch"):
        (root / d).mkdir(parents=True)
    t = synthetic_results(1200)
    real = ["cat", "rocket", "coffee"]
    sizes = {r["id"]: r for r in read_results(run_dir).to_pylist()}
    for k, (rid, status) in enumerate(zip(t["id"].to_pylist(), t["status"].to_pylist())):
        if status == "ok":
            src = real[k % 3]
            os.symlink(video_file(run_dir, src), root / "videos" / f"{rid}.mp4")
            os.symlink(input_file(run_dir, src), root / "inputs" / f"{rid}.jpg")
    for c in ("width", "height"):
        t = t.set_column(t.schema.get_field_index(c), c, pa.array(np.full(t.num_rows, sizes["cat"][c]), pa.int64()))
    pq.write_table(t, root / "results.parquet")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.report", str(root), "--page-size", str(PAGE)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return root, t


def assert_plays_with_input(c: dict) -> None:
    assert c["video"] is not None and "data-error" not in c["video"], c
    assert float(c["video"].get("data-duration", 0)) > 0, c  # loaded: the browser decoded its header
    assert c["video"].get("data-playing") == "1", c  # and it played
    assert c["img"] is not None and c["img"].get("data-loaded") == "1", c  # its input image is beside it


@pytest.mark.browser
def test_big_report_pages_sorts_and_filters_in_the_browser(big_report, tmp_path):
    root, t = big_report
    assert len(list((root / "report").glob("data-*.js"))) == 1
    assert not list(root.glob("index-*.html"))
    ids, status = t["id"].to_pylist(), t["status"].to_pylist()
    motion = t["motion_score"].to_pylist()

    first = cards(open_page_playing(root, "", tmp_path))
    assert [c["id"] for c in first] == ids[:PAGE]  # manifest order, one page of cards, not 1,200
    for c in first:
        if c["failed"]:
            assert c["video"] is None
        else:
            assert_plays_with_input(c)

    # Sorting by a score reorders the videos: the lowest motion_score over all 1,200 rows comes first (the
    # page holds scores to 4 decimals; equal ones keep manifest order).
    by_motion = sorted((float(np.round(m, 4)), i) for i, m in enumerate(motion) if m is not None)
    dom = open_page_playing(root, "sort=motion_score&order=asc", tmp_path)
    low = cards(dom)
    assert [c["id"] for c in low] == [ids[i] for _, i in by_motion[:PAGE]]
    assert [c["id"] for c in low] != [c["id"] for c in first]
    for c in low:
        assert_plays_with_input(c)
    high = cards(open_page_playing(root, "sort=motion_score&order=desc&page=2", tmp_path))
    by_motion_desc = sorted(by_motion, key=lambda p: (-p[0], p[1]))
    assert [c["id"] for c in high] == [ids[i] for _, i in by_motion_desc[PAGE:2 * PAGE]]

    # Failed only: only failed rows, all of them in order, with their errors.
    failed_ids = [i for i, s in zip(ids, status) if s == "failed"]
    dom = open_page_playing(root, "failed=1", tmp_path)
    shown = cards(dom)
    assert shown and all(c["failed"] for c in shown)
    assert [c["id"] for c in shown] == failed_ids[:PAGE]
    assert f"{len(failed_ids)} rows match" in dom and "file not found" in dom

    # Score below a threshold: only rows under it.
    sim = {i: None if v is None else float(np.round(v, 4)) for i, v in zip(ids, t["image_similarity"].to_pylist())}
    shown = cards(open_page_playing(root, "below=image_similarity:0.9&sort=id&order=desc", tmp_path))
    expected = sorted((i for i in ids if sim[i] is not None and sim[i] < 0.9), reverse=True)[:PAGE]
    assert [c["id"] for c in shown] == expected


@pytest.mark.slow
def test_big_report_size_and_summary(big_report):
    root, t = big_report
    page = (root / "index.html").read_text()
    n_failed = pc.sum(pc.equal(t["status"], "failed")).as_py()
    assert f"rows ok</th><td>{t.num_rows - n_failed}" in page and f"rows failed</th><td>{n_failed}" in page
    # The summary is HTML (shown before any row data loads); the rows are data, not markup.
    assert page.split("<script")[0].count('class="card') == 0 and len(page) < 100_000
    assert 'id="chart-throughput"' in page and 'id="chart-seconds"' in page
    assert page.count("<polyline") == 8  # one throughput line per rank
    data = (root / "report" / "data-00000.js").read_text()
    assert data.startswith("SVD.chunk(0,") and len(data) < 200 * t.num_rows
    meta = json.loads(re.search(r'<script type="application/json" id="meta">(.*?)</script>', page).group(1))
    assert meta["n"] == 1200 and meta["scores"] == ["motion_score", "image_similarity", "flicker_score"]


@pytest.mark.slow
def test_real_run_report(run_dir, tmp_path):
    page = (run_dir / "index.html").read_text()
    assert "rows ok</th><td>3" in page and "rows failed</th><td>1" in page
    assert "videos per minute" in page and "p95 per video" in page and "Peak VRAM" in page
    assert "missing.jpg" in page and "file not found" in page  # failed rows are listed at once
    assert "motion_score</th>" in page  # score summary
    dom = open_page_playing(run_dir, "", tmp_path)
    shown = cards(dom)
    assert [c["id"] for c in shown] == ["cat", "rocket"]  # page 1 of 2 (page size 2), manifest order
    results = {r["id"]: r for r in read_results(run_dir).to_pylist()}
    for c in shown:
        assert_plays_with_input(c)
        r = results[c["id"]]
        duration = float(c["video"]["data-duration"])
        assert abs(duration - r["num_frames"] / r["fps"]) < 0.5 / r["fps"] + 0.02, (c["id"], duration)
    assert [c["id"] for c in cards(open_page_playing(run_dir, "page=2", tmp_path))] == ["coffee", "gone"]
    assert "http" not in page.split("<script")[0].split("<body>")[1]  # nothing from the network


@pytest.mark.slow
def test_contact_sheet_shows_input_then_first_middle_last_frames(run_dir, tmp_path):
    from PIL import ImageDraw, ImageFont

    from svd_batch.report.sheet import CAPTION_HEIGHT, COLUMNS, LABEL_WIDTH, PAD

    # Thumbnails were kept while the frames were in memory, so the sheet decodes nothing.
    assert sorted(p.name for p in (run_dir / ".svd-batch" / "thumbs").rglob("*.png")) == ["cat.png", "coffee.png", "rocket.png"]
    sheet = Image.open(run_dir / "contact_sheet.png")
    assert sheet.mode == "RGB" and sheet.height >= 4 * 128  # four rows, the failed one labelled
    top = PAD + CAPTION_HEIGHT  # the pictures sit under their column names
    # First column: the conditioning image as the model saw it.
    inp = np.asarray(Image.open(input_file(run_dir, "cat")).convert("RGB").resize((128, 128)), dtype=float)
    first = np.asarray(sheet.crop((LABEL_WIDTH, top, LABEL_WIDTH + 128, top + 128)), dtype=float)
    assert np.abs(first - inp).mean() < 12
    strip = sheet.crop((LABEL_WIDTH + 128 + PAD, top, sheet.width, top + 128)).convert("L")
    assert strip.getextrema()[1] - strip.getextrema()[0] > 50  # real frames after it
    # Each picture is named above it: input, first, middle, last (drawn here the same way to compare pixels).
    font = ImageFont.load_default(size=14)
    step = 128 + PAD
    for k, name in enumerate(COLUMNS):
        x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), name, font=font)
        expected = Image.new("RGB", (x1, y1), (24, 24, 24))
        ImageDraw.Draw(expected).text((0, 0), name, fill=(150, 190, 255), font=font)
        got = sheet.crop((LABEL_WIDTH + k * step, PAD, LABEL_WIDTH + k * step + x1, PAD + y1))
        assert np.abs(np.asarray(got, dtype=float) - np.asarray(expected, dtype=float)).mean() < 1, name
    # Without thumbnails (a run made before them, or deleted) the sheet decodes the videos: same picture.
    from svd_batch.report import write_contact_sheet

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / ".svd-batch" / "thumbs")
    write_contact_sheet(str(copy))
    decoded = Image.open(copy / "contact_sheet.png")
    assert decoded.size == sheet.size


@pytest.mark.slow
def test_report_command_on_an_interrupted_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    os.unlink(copy / "results.parquet")  # as if killed before the merge: records only
    for f in ("index.html", "contact_sheet.png"):
        os.unlink(copy / f)
    shutil.rmtree(copy / "report")
    (copy / "index-2.html").write_text("a page of an earlier version")
    proc = subprocess.run([sys.executable, "-m", "svd_batch.commands.report", str(copy), "--page-size", "10"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (copy / "index.html").exists() and (copy / "contact_sheet.png").exists()
    assert (copy / "report" / "data-00000.js").exists()
    assert not (copy / "index-2.html").exists()


# -- charts people can read -------------------------------------------------------------------------------------
def svg_labels(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def test_a_few_rows_read_at_their_real_rate():
    from svd_batch.report.charts import smoothed_rate, throughput_chart

    # 8 rows on one rank, 4.5 per minute (the sample run): one flat line at 4.5, not spikes of 43.8.
    start = np.array([13.3 * k for k in range(8)])
    done = start + 13.3
    at, rate = smoothed_rate(done, 0.0, float(done[-1]), float(done[-1]), 120)
    assert np.allclose(rate, 8 / (done[-1] / 60))
    svg = throughput_chart(np.zeros(8), done, start)
    assert svg_labels(svg)[1:5] == ["0", "2", "4", "6"]  # the y axis tops at 6 videos/min
    # A rank that stops half-way reads as stopped; its steady part reads at its rate.
    finishes = np.arange(1, 401) * 6.0  # 10 a minute for 40 minutes
    at, rate = smoothed_rate(finishes[:200], 0.0, 2400.0, 240.0, 240)
    assert np.all(np.abs(rate[(at > 120) & (at < 1000)] - 10) < 0.6) and np.all(rate[at > 1200 + 240] == 0)


@pytest.mark.slow
def test_a_million_rows_read_in_human_units():
    from svd_batch.report.charts import human_number, seconds_histogram, throughput_chart

    assert [human_number(v) for v in (0, 2.5, 25_000, 202_000, 1_200_000)] == ["0", "2.5", "25k", "202k", "1.2M"]
    t = synthetic_results(1_000_000)
    ok = t.filter(pc.equal(t["status"], "ok"))
    from svd_batch.results import epoch_seconds, float_values

    rate = throughput_chart(float_values(ok["rank"]), epoch_seconds(ok["finished_at"]), epoch_seconds(ok["started_at"]))
    hist = seconds_histogram(float_values(ok["total_seconds"]))
    labels = svg_labels(rate) + svg_labels(hist)
    assert not [x for x in labels if "e+" in x or "e-" in x]  # never 2.51e+04 or 2.02e+05
    assert "days since the start" in labels  # a 36-day run (8 ranks, 125k rows each at ~25 s a row)
    assert any(x.endswith("k") for x in svg_labels(hist))  # tens of thousands of videos per bin, in k


def test_peak_vram_is_listed_in_device_order(tmp_path):
    from svd_batch.report import write_gallery

    t = synthetic_results(64)
    devices = [f"cuda:{i}" for i in (10, 2, 1, 0, 11, 3, 9, 8)]
    t = t.set_column(t.schema.get_field_index("device"), "device",
                     pa.array([devices[r] for r in t["rank"].to_pylist()]))
    t = t.set_column(t.schema.get_field_index("host"), "host", pa.array(["node10" if r % 2 else "node2"
                                                                          for r in t["rank"].to_pylist()]))
    (tmp_path / ".svd-batch").mkdir()
    pq.write_table(t, tmp_path / "results.parquet")
    write_gallery(str(tmp_path))
    page = (tmp_path / "index.html").read_text()
    table = page.split("Peak VRAM per device")[1].split("</table>")[0]
    listed = re.findall(r"<tr><td>([^<]+)</td>", table)
    assert listed == ["node2 cuda:1", "node2 cuda:9", "node2 cuda:10", "node2 cuda:11",
                      "node10 cuda:0", "node10 cuda:2", "node10 cuda:3", "node10 cuda:8"]


# -- the page in a browser that is driven: paging, jumping, layout ------------------------------------------------
VISIBLE = """[...document.querySelectorAll('#grid video')].filter(e => { const r = e.getBoundingClientRect();
             return r.bottom > 0 && r.top < innerHeight; })"""
LIVE = "document.querySelectorAll('video[src]').length"
PLAYER_LIMIT = 30  # Chromium's players per page, lowered from its default: far more pages than it holds


@pytest.fixture()
def browser(tmp_path):
    from tests.browser import Browser

    b = Browser(tmp_path / "profile", 1400, 900, extra=(f"--max-web-media-player-count={PLAYER_LIMIT}",))
    yield b
    b.close()


@pytest.mark.browser
def test_paging_through_a_big_report_keeps_every_visible_video_playing(big_report, browser):
    """A page holds a media player only for the videos on screen (or near it) and gives it back when they leave
    or the page turns: with 24 videos a page and room for 30 players, the second page would be black otherwise."""
    root, t = big_report
    browser.open((root / "index.html").resolve().as_uri())
    browser.js("document.getElementById('tovideos').click()")
    assert abs(browser.js("document.getElementById('videos').getBoundingClientRect().top")) < 2  # jumped to the grid
    seen = set()
    for turn in range(12):
        ids = browser.wait(f"(() => {{ const v = {VISIBLE}; return v.length && v.every(e => e.dataset.playing === '1')"
                           " && v.map(e => e.dataset.id); })()", timeout=90, what=f"the videos on screen of page {turn + 1}")
        assert not seen & set(ids)  # a new page each time
        seen |= set(ids)
        assert browser.js(LIVE) <= PAGE  # players only for this page's videos near the screen
        if turn == 5:  # down to the end of the page: those videos play too, the ones far above gave theirs back
            browser.js("document.getElementById('next2').scrollIntoView({block: 'end'})")
            browser.wait(f"(() => {{ const v = {VISIBLE}; return v.length && v.every(e => e.dataset.playing === '1'); }})()",
                         timeout=90, what="the videos at the end of the page")
            assert browser.js("document.querySelectorAll('#grid video:not([src])').length") > 0
            browser.js("document.getElementById('next2').click()")  # the bottom buttons turn and go back up
            assert abs(browser.js("document.getElementById('videos').getBoundingClientRect().top")) < 2
        else:
            browser.js("document.getElementById('next').click()")
    assert browser.js("location.hash") == "#page=13"
    assert not [line for line in browser.logged() if "WebMediaPlayer" in line]
    # A video not on screen yet shows its input image, not a black box.
    browser.js("window.scrollTo(0, 0)")
    off = browser.js("[...document.querySelectorAll('#grid video:not([src])')].map(e => e.getAttribute('poster'))")
    assert off and all(p and p.startswith("inputs/") for p in off)


@pytest.mark.browser
def test_the_first_screen_reaches_the_videos_and_the_charts_fit(big_report, browser):
    root, _ = big_report
    browser.open((root / "index.html").resolve().as_uri())
    # 1400 x 900: the summary, both charts and the failed rows leave the grid's heading on the first screen.
    assert browser.js("document.getElementById('videos').getBoundingClientRect().top") < 900 - 60
    # Every label inside its chart; the legend right of every line.
    fit = browser.js("""[...document.querySelectorAll('svg')].map(svg => {
        const w = svg.width.baseVal.value, h = svg.height.baseVal.value;
        const out = [...svg.querySelectorAll('text')].filter(t => { const b = t.getBBox();
            const m = t.getCTM(); const x = b.x * m.a + b.y * m.c + m.e, y = b.x * m.b + b.y * m.d + m.f;
            const x2 = x + b.width * Math.abs(m.a) + b.height * Math.abs(m.c), y2 = y + b.width * Math.abs(m.b) + b.height * Math.abs(m.d);
            return Math.min(x, x2) < 0 || Math.max(x, x2) > w || Math.min(y, y2) < 0 || Math.max(y, y2) > h; })
          .map(t => t.textContent);
        const right = Math.max(0, ...[...svg.querySelectorAll('polyline')].flatMap(p => [...p.points].map(q => q.x)));
        const legend = [...svg.querySelectorAll('text')].filter(t => t.textContent.startsWith('rank '))
          .map(t => t.getBBox().x);
        return {id: svg.id, out, legendClear: legend.every(x => x > right)}; })""")
    assert {c["id"] for c in fit} == {"chart-throughput", "chart-seconds"}
    for c in fit:
        assert c["out"] == [] and c["legendClear"], c
    # Each card names what its seconds figure is.
    assert browser.wait("document.querySelector('#grid .card:not(.failed) .sc')?.textContent.includes(' · made in ')")


def test_a_spread_folder_s_report_points_at_the_subfolders(tmp_path):
    """Videos and input images in videos/<ab>/, inputs/<ab>/ (new folders): the page gets their subfolders and
    builds videos/<ab>/<id>.mp4 itself (the browser tests play such a folder's videos)."""
    import json

    from svd_batch import ownership
    from svd_batch.report.data import write_data_chunks
    from svd_batch.rundir import RunDir
    from tests.conftest import record

    rd = RunDir(str(tmp_path / "run"))
    rd.create()
    for rid in ("a.1", "b"):
        for path in (rd.video_path(rid), rd.input_path(rid)):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
    rows = [record(id=rid, row=k, video_path=os.path.relpath(rd.video_path(rid), rd.root)).as_dict()
            for k, rid in enumerate(("a.1", "b"))]
    from svd_batch.fields import RESULT_SCHEMA

    write_data_chunks(rd.root, pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), ["h"])
    text = (tmp_path / "run" / "report" / "data-00000.js").read_text()
    cols = json.loads(text[text.index(",") + 1:text.rindex(")")])
    subs = [ownership.subfolder(r) for r in ("a.1", "b")]
    assert cols["vid"] == subs and cols["img"] == subs
    os.remove(rd.video_path("b"))
    write_data_chunks(rd.root, pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), ["h"])
    text = (tmp_path / "run" / "report" / "data-00000.js").read_text()
    assert json.loads(text[text.index(",") + 1:text.rindex(")")])["vid"] == [subs[0], 0]
