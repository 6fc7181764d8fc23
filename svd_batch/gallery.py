"""See the results: a static HTML gallery (``index.html``) and a contact sheet (``contact_sheet.png``).

Written at the end of every run, and by ``svd-batch-report <output.dir>`` for any finished or interrupted
run. The pages are self-contained (inline CSS and JS, relative links): they open from disk or from any
static server. Large runs are paginated, and only the videos on screen play.
"""

from __future__ import annotations

import argparse
import glob
import html
import math
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import atomic_path
from .rundir import RunDir, write_text_atomic

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#111;color:#eee}
a{color:#8cf} table{border-collapse:collapse} td,th{padding:.2rem .6rem;text-align:left;border-bottom:1px solid #333}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1rem}
.card{background:#1c1c1c;border-radius:6px;padding:.5rem} .card video{width:100%;background:#000;border-radius:4px}
.card .id{font-weight:600;word-break:break-all} .card .meta{font-size:.8rem;color:#aaa}
.failed td{color:#f99} nav{margin:1rem 0} nav a,nav span{margin-right:.6rem} details{margin:1rem 0}
"""

# Play only what is on screen: thousands of autoplaying videos would stall any browser.
JS = """
const io = new IntersectionObserver(es => es.forEach(e => e.isIntersecting ? e.target.play().catch(()=>{}) : e.target.pause()));
document.querySelectorAll('video').forEach(v => io.observe(v));
"""


def _human_bytes(n: float | None) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(results: pa.Table) -> dict[str, Any]:
    ok_mask = pc.equal(results["status"], "ok")
    ok = results.filter(ok_mask)
    secs = np.array(ok["total_seconds"].to_pylist(), dtype=float) if ok.num_rows else np.array([])
    s: dict[str, Any] = {
        "rows": results.num_rows, "ok": ok.num_rows, "failed": results.num_rows - ok.num_rows,
        "median_seconds": float(np.median(secs)) if len(secs) else None,
        "p95_seconds": float(np.percentile(secs, 95)) if len(secs) else None,
        "videos_per_hour": None, "peak_vram": {},
    }
    if ok.num_rows:
        span = (pc.max(ok["finished_at"]).as_py() - pc.min(ok["started_at"]).as_py()).total_seconds()
        s["videos_per_hour"] = 3600.0 * ok.num_rows / span if span > 0 else None
        for host, device, peak in zip(ok["host"].to_pylist(), ok["device"].to_pylist(), ok["peak_vram_bytes"].to_pylist()):
            key = f"{host} {device}"
            if peak is not None:
                s["peak_vram"][key] = max(peak, s["peak_vram"].get(key, 0))
            else:
                s["peak_vram"].setdefault(key, None)
    return s


def _label(r: dict[str, Any]) -> str:
    return (f"seed {r['seed']} · {r['num_frames']} frames @ {r['fps']} fps · motion {r['motion_bucket_id']} · "
            f"noise {r['noise_aug_strength']:g} · {r['width']}x{r['height']} · {r['num_inference_steps']} steps · "
            f"guidance {r['min_guidance_scale']:g}-{r['max_guidance_scale']:g}")


def _page_name(i: int) -> str:
    return "index.html" if i == 0 else f"index-{i + 1}.html"


def write_gallery(root: str, page_size: int = 48) -> list[str]:
    """Write index.html (and index-N.html for further pages); return the page paths."""
    rd = RunDir(root)
    results = _read_results(rd)
    s = summarize(results)
    config = ""
    if os.path.exists(os.path.join(root, "config.yaml")):
        with open(os.path.join(root, "config.yaml")) as f:
            config = f.read()
    model = results["model"][0].as_py() if results.num_rows else "n/a"
    ok_rows = results.filter(pc.equal(results["status"], "ok")).to_pylist() if results.num_rows else []
    failed = results.filter(pc.equal(results["status"], "failed")).to_pylist() if results.num_rows else []
    pages = max(1, math.ceil(len(ok_rows) / page_size))
    fmt = lambda v, unit="s": "n/a" if v is None else f"{v:.2f} {unit}"  # noqa: E731
    vph = "n/a" if s["videos_per_hour"] is None else f"{s['videos_per_hour']:.1f}"
    vram = "".join(f"<tr><td>{html.escape(k)}</td><td>{_human_bytes(v)}</td></tr>" for k, v in s["peak_vram"].items())
    head = (
        f"<h1>svd-batch: {html.escape(os.path.basename(os.path.abspath(root)))}</h1>"
        f"<table><tr><th>rows ok</th><td>{s['ok']}</td></tr><tr><th>rows failed</th><td>{s['failed']}</td></tr>"
        f"<tr><th>videos per hour</th><td>{vph}</td></tr>"
        f"<tr><th>median per video</th><td>{fmt(s['median_seconds'])}</td></tr>"
        f"<tr><th>p95 per video</th><td>{fmt(s['p95_seconds'])}</td></tr>"
        f"<tr><th>model</th><td>{html.escape(str(model))}</td></tr></table>"
        f"<h3>Peak VRAM per device</h3><table>{vram}</table>"
        f"<details><summary>config</summary><pre>{html.escape(config)}</pre></details>"
        + ('<p><a href="contact_sheet.png">contact sheet</a></p>' if os.path.exists(os.path.join(root, "contact_sheet.png")) else "")
    )
    written = []
    for p in range(pages):
        nav = "<nav>" + "".join(
            f"<span>{i + 1}</span>" if i == p else f'<a href="{_page_name(i)}">{i + 1}</a>' for i in range(pages)
        ) + "</nav>" if pages > 1 else ""
        cards = "".join(
            f'<div class="card"><video src="{html.escape(r["video_path"])}" muted loop playsinline preload="metadata" '
            f'data-id="{html.escape(r["id"])}" data-frames="{r["num_frames"]}" data-fps="{r["fps"]}"></video>'
            f'<div class="id">{html.escape(r["id"])}</div><div class="meta">{html.escape(_label(r))}</div></div>'
            for r in ok_rows[p * page_size : (p + 1) * page_size]
        )
        fail_html = ""
        if failed and p == 0:
            rows_html = "".join(
                f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['image'] or '')}</td>"
                f"<td>{html.escape(r['error'] or '')}</td></tr>" for r in failed[:1000]
            )
            more = f"<p>... and {len(failed) - 1000} more in results.parquet</p>" if len(failed) > 1000 else ""
            fail_html = f'<h2>Failed rows ({len(failed)})</h2><table class="failed">{rows_html}</table>{more}'
        body = f"{head}{fail_html}<h2>Videos ({len(ok_rows)})</h2>{nav}<div class=\"grid\">{cards}</div>{nav}"
        page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>svd-batch gallery</title>"
                f"<style>{CSS}</style></head><body>{body}<script>{JS}</script></body></html>")
        path = os.path.join(root, _page_name(p))
        write_text_atomic(page, path)
        written.append(path)
    for stale in glob.glob(os.path.join(root, "index-*.html")):
        if stale not in written:
            os.unlink(stale)
    return written


def _read_results(rd: RunDir) -> pa.Table:
    """results.parquet, or for an interrupted run the records so far."""
    if os.path.exists(rd.results_path):
        return pq.read_table(rd.results_path)
    return rd.read_records()


def _frames(path: str) -> list[np.ndarray]:
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    return [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen]


THUMB_HEIGHT, PAD = 128, 6


def _thumb_path(root: str, row_id: str) -> str:
    return os.path.join(root, ".svd-batch", "thumbs", f"{row_id}.png")


def _strip(frames: list[np.ndarray]) -> "Image.Image":
    """First, middle and last frame side by side, THUMB_HEIGHT high."""
    from PIL import Image

    picks = [Image.fromarray(np.asarray(f)) for f in (frames[0], frames[len(frames) // 2], frames[-1])]
    picks = [p.resize((max(1, round(p.width * THUMB_HEIGHT / p.height)), THUMB_HEIGHT)) for p in picks]
    strip = Image.new("RGB", (sum(p.width + PAD for p in picks), THUMB_HEIGHT), (24, 24, 24))
    x = 0
    for p in picks:
        strip.paste(p, (x, 0))
        x += p.width + PAD
    return strip


def save_thumbnails(root: str, row_id: str, frames) -> None:
    """Called by the writer while it still holds the frames, so the contact sheet needs no decoding."""
    path = _thumb_path(root, row_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        _strip(list(frames)).save(tmp, format="PNG")


def write_contact_sheet(root: str, max_rows: int = 16) -> str | None:
    """First, middle and last frame of the first ``max_rows`` rows, each row labelled."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _read_results(RunDir(root)).slice(0, max_rows).to_pylist()
    if not rows:
        return None
    font = ImageFont.load_default(size=14)
    label_w = 300
    strips = []
    for r in rows:
        picture = None
        video = os.path.join(root, r["video_path"]) if r["status"] == "ok" and r["video_path"] else None
        if video and os.path.exists(video):
            thumb = _thumb_path(root, r["id"])
            picture = Image.open(thumb).convert("RGB") if os.path.exists(thumb) else _strip(_frames(video))
        width = label_w + (picture.width if picture else 3 * (THUMB_HEIGHT + PAD))
        strip = Image.new("RGB", (width, THUMB_HEIGHT + 2 * PAD), (24, 24, 24))
        draw = ImageDraw.Draw(strip)
        text = [r["id"][:40], f"seed {r['seed']}  fps {r['fps']}", f"motion {r['motion_bucket_id']}  noise {r['noise_aug_strength']:g}",
                f"{r['num_frames']} frames  {r['width']}x{r['height']}"]
        if r["status"] != "ok":
            text += ["FAILED: " + (r["error"] or "")[:40]]
        for i, line in enumerate(text):
            draw.text((PAD, PAD + i * 18), line, fill=(235, 235, 235) if i == 0 else (170, 170, 170), font=font)
        if picture:
            strip.paste(picture, (label_w, PAD))
        strips.append(strip)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (24, 24, 24))
    y = 0
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    path = os.path.join(root, "contact_sheet.png")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def write_report(root: str, page_size: int = 48, contact_rows: int = 16) -> list[str]:
    sheet = write_contact_sheet(root, contact_rows)
    pages = write_gallery(root, page_size)
    return ([sheet] if sheet else []) + pages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-report", description="Write index.html and contact_sheet.png "
                                 "for a finished or interrupted svd-batch run.")
    ap.add_argument("output_dir")
    ap.add_argument("--page-size", type=int, default=48, help="videos per page")
    ap.add_argument("--contact-rows", type=int, default=16, help="rows on the contact sheet")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.output_dir, ".svd-batch")):
        sys.exit(f"svd-batch-report: {args.output_dir} is not an svd-batch output folder (no .svd-batch/ inside)")
    for path in write_report(args.output_dir, args.page_size, args.contact_rows):
        print(path)


if __name__ == "__main__":
    main()
