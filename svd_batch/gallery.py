"""See the results: a static HTML report (``index.html``) and a contact sheet (``contact_sheet.png``).

Written at the end of every run, and by ``svd-batch-report <output.dir>`` for any finished or interrupted
run. The size of what is written grows linearly with the rows (about 100 bytes a row at most): one page
with the summary and charts as HTML, and the rows as compact column arrays in ``report/data-NNNNN.js``
chunks that the page loads with ``<script src>`` (``fetch()`` of ``file://`` is blocked in Chromium, a
script tag is not), so the page opens from disk with no server. The page builds markup only for the rows
on screen; paging, sorting and filtering run over the arrays. The view is kept in the URL fragment
(``#sort=motion_score&order=asc&failed=1&below=image_similarity:0.8&page=3``), so it can be shared.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import math
import os
import re
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import ownership
from .atomic import atomic_path
from .fields import CONDITIONING_FIELDS
from .report import epoch_seconds, float_values
from .rundir import RunDir, write_text_atomic
from .scores import INPUTS, SCORE_COLUMNS, input_image_path
from .util import human_bytes
from .write import read_mp4

REPORT_DIR = "report"
CHUNK_ROWS = 50_000

# column -> decimals kept in the page (the page shows them; results.parquet keeps every digit)
ROUND = {"total_seconds": 2, "motion_score": 4, "image_similarity": 4, "flicker_score": 4,
         "noise_aug_strength": 4, "min_guidance_scale": 3, "max_guidance_scale": 3}
NUMERIC = ("total_seconds", *SCORE_COLUMNS, *CONDITIONING_FIELDS, "rank")

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;background:#111;color:#eee}
a{color:#8cf} table{border-collapse:collapse} td,th{padding:.2rem .6rem;text-align:left;border-bottom:1px solid #333}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:1.5rem} h1{margin:0 0 .8rem;font-size:1.5rem}
.jump button{margin-right:.4rem}
.summary{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start} .figures{font-size:.9rem;max-width:380px}
.figures details{margin:.4rem 0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:1rem}
.card{background:#1c1c1c;border-radius:6px;padding:.5rem}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:4px}
.pair img,.pair video{width:100%;background:#000;border-radius:4px;aspect-ratio:var(--ar);object-fit:contain}
.card .id{font-weight:600;word-break:break-all} .card .meta{font-size:.8rem;color:#aaa}
.card .sc{font-size:.8rem;color:#cfc} .card.failed .err{color:#f99;font-size:.85rem;word-break:break-word}
.failed td{color:#f99} nav{margin:1rem 0} details{margin:1rem 0} .charts{display:flex;flex-wrap:wrap;gap:1.5rem}
#failedrows .scroll{max-height:12rem;overflow:auto}
.charts svg{background:#181818;border-radius:4px} .controls{display:flex;flex-wrap:wrap;gap:1rem;align-items:center;margin:1rem 0}
.controls input[type=number]{width:6rem} #status{color:#aaa}
"""

# Everything after the summary is drawn from the chunks; markup exists only for the page on screen.
JS = r"""
const M = JSON.parse(document.getElementById('meta').textContent);
const D = new Array(M.chunks); let loaded = 0, view = null;
const $ = id => document.getElementById(id);
const esc = s => String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));
function val(col, i) { const k = Math.floor(i / M.chunkRows), c = D[k][col]; return Array.isArray(c) ? c[i - k * M.chunkRows] : c; }
const S = {sort: 'row', order: 'asc', failed: false, below: '', page: 0};
function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  S.sort = h.get('sort') || 'row'; S.order = h.get('order') || 'asc'; S.failed = h.get('failed') === '1';
  S.below = h.get('below') || ''; S.page = Math.max(0, (parseInt(h.get('page') || '1') || 1) - 1);
  $('sort').value = S.sort; $('order').value = S.order; $('failed').checked = S.failed;
  const [bc, bt] = S.below.split(':'); $('belowcol').value = bc || M.scores[0] || ''; $('belowval').value = bt || '';
}
function writeHash() {
  const h = new URLSearchParams();
  if (S.sort !== 'row') h.set('sort', S.sort); if (S.order !== 'asc') h.set('order', S.order);
  if (S.failed) h.set('failed', '1'); if (S.below) h.set('below', S.below); if (S.page) h.set('page', S.page + 1);
  history.replaceState(null, '', '#' + h.toString());
}
function key(col, i) {
  if (col === 'row') return i;
  const v = val(col, i);
  return v === null || v === undefined || (typeof v === 'number' && isNaN(v)) ? null : v;
}
function compute() {
  // Manifest order with no filter needs no rows at all: a page shows once its chunk is in.
  if (S.sort === 'row' && S.order === 'asc' && !S.failed && !S.below) return null;
  if (loaded < M.chunks) return undefined;
  let idx = [];
  const [bc, bt] = S.below.split(':'); const thr = parseFloat(bt);
  for (let i = 0; i < M.n; i++) {
    if (S.failed && val('st', i) !== 1) continue;
    if (S.below && !isNaN(thr)) { const v = key(bc, i); if (v === null || !(v < thr)) continue; }
    idx.push(i);
  }
  if (S.sort !== 'row' || S.order !== 'asc') {
    const col = S.sort === 'status' ? 'st' : S.sort === 'seconds' ? 'total_seconds' : S.sort;
    const keys = idx.map(i => key(col, i)), pos = idx.map((_, j) => j), dir = S.order === 'desc' ? -1 : 1;
    pos.sort((a, b) => { const x = keys[a], y = keys[b];
      if (x === null) return y === null ? idx[a] - idx[b] : 1; if (y === null) return -1;
      return x < y ? -dir : x > y ? dir : idx[a] - idx[b]; });
    idx = pos.map(j => idx[j]);
  }
  return idx;
}
function label(i) {
  const g = c => val(c, i);
  return `seed ${g('seed')} · ${g('num_frames')} frames @ ${g('fps')} fps · motion ${g('motion_bucket_id')} · ` +
    `noise ${g('noise_aug_strength')} · ${g('width')}x${g('height')} · ${g('num_inference_steps')} steps · ` +
    `guidance ${g('min_guidance_scale')}-${g('max_guidance_scale')} · rank ${g('rank')} on ${M.hosts[g('host')]}`;
}
function path(col, dir, ext, i) { const v = val(col, i); return v === 1 ? `${dir}/${val('id', i)}.${ext}` : v || ''; }
function card(i) {
  const id = esc(val('id', i)), ok = val('st', i) === 0, img = path('img', M.inputs, 'jpg', i);
  const ar = `--ar:${val('width', i)}/${val('height', i)}`;
  const scores = M.scores.map(c => { const v = val(c, i); return `${c} ${v === null || isNaN(v) ? 'n/a' : v}`; }).join(' · ');
  // The video gets its file only while on screen (see io), and shows its input image until it plays.
  const media = (img ? `<img class="in" src="${esc(img)}" alt="input of ${id}" data-id="${id}" loading="eager">` : '<div></div>') +
    (ok ? `<video data-src="${esc(path('vid', 'videos', 'mp4', i))}"${img ? ` poster="${esc(img)}"` : ''} muted loop playsinline preload="none" data-id="${id}"></video>` : '<div></div>');
  return `<div class="card${ok ? '' : ' failed'}" data-id="${id}" data-row="${i}" style="${ar}"><div class="pair">${media}</div>` +
    `<div class="id">${id}</div><div class="meta">${esc(label(i))}</div>` +
    (ok ? `<div class="sc">${esc(scores)} · made in ${val('total_seconds', i)} s</div>` : `<div class="err">${esc(val('err', i) || 'failed')}</div>`) + '</div>';
}
// Chromium keeps only a few dozen media players per page: a video holds one only while it is on screen (or
// near it); one that leaves, or whose page is turned, gives its player back (no src, then load()).
function attach(el) { if (!el.getAttribute('src')) el.src = el.dataset.src; el.play().catch(() => {}); }
function release(el) { el.pause(); el.removeAttribute('src'); el.load(); delete el.dataset.playing; }
const io = new IntersectionObserver(es => es.forEach(e => e.isIntersecting ? attach(e.target) : release(e.target)),
                                    {rootMargin: '50% 0px'});
function render() {
  const v = compute();
  if (v === undefined) { $('status').textContent = `loading rows: ${loaded} of ${M.chunks} parts`; return; }
  const total = v === null ? M.n : v.length, pages = Math.max(1, Math.ceil(total / M.pageSize));
  S.page = Math.min(S.page, pages - 1);
  const lo = S.page * M.pageSize, hi = Math.min(total, lo + M.pageSize), rows = [];
  for (let j = lo; j < hi; j++) rows.push(v === null ? j : v[j]);
  if (v === null && rows.length && !D[Math.floor(rows[rows.length - 1] / M.chunkRows)]) { $('status').textContent = 'loading rows...'; return; }
  $('status').textContent = `${total} rows match · page ${S.page + 1} of ${pages}`;
  $('pageno').value = S.page + 1; $('pageno').max = pages; $('pageof').textContent = `page ${S.page + 1} of ${pages}`;
  io.disconnect();
  $('grid').querySelectorAll('video').forEach(release);
  $('grid').innerHTML = rows.map(card).join('');
  $('grid').querySelectorAll('video').forEach(el => {
    el.addEventListener('loadedmetadata', () => { el.dataset.duration = el.duration; });
    el.addEventListener('playing', () => { el.dataset.playing = '1'; });
    el.addEventListener('error', () => { el.dataset.error = el.error ? el.error.code : '?'; });
    io.observe(el);
  });
  $('grid').querySelectorAll('img.in').forEach(el => {
    const mark = () => { el.dataset.loaded = el.naturalWidth > 0 ? '1' : '0'; };
    el.complete ? mark() : (el.addEventListener('load', mark), el.addEventListener('error', mark));
  });
  writeHash();
}
function update() {
  S.sort = $('sort').value; S.order = $('order').value; S.failed = $('failed').checked;
  const t = $('belowval').value.trim(); S.below = t === '' ? '' : `${$('belowcol').value}:${t}`;
  S.page = 0; render();
}
window.SVD = {chunk(k, cols) { D[k] = cols; loaded++; if (loaded === M.chunks) document.body.dataset.loaded = '1'; render(); }};
['sort', 'order', 'failed', 'belowcol', 'belowval'].forEach(id => $(id).addEventListener('change', update));
const turn = (by, scroll) => { S.page = Math.max(0, S.page + by); render(); if (scroll) $('videos').scrollIntoView(); };
$('prev').onclick = () => turn(-1); $('next').onclick = () => turn(1);
$('prev2').onclick = () => turn(-1, true); $('next2').onclick = () => turn(1, true);
$('tovideos').onclick = () => $('videos').scrollIntoView();
if ($('tofailed')) $('tofailed').onclick = () => $('failedrows').scrollIntoView();
$('pageno').onchange = () => { S.page = Math.max(0, (parseInt($('pageno').value) || 1) - 1); render(); };
window.addEventListener('hashchange', () => { readHash(); render(); });
readHash();
if (!M.chunks) { document.body.dataset.loaded = '1'; render(); }
for (let k = 0; k < M.chunks; k++) { const s = document.createElement('script'); s.src = `${M.dir}/data-${String(k).padStart(5, '0')}.js`; document.body.appendChild(s); }
"""


def natural_key(text: str) -> list:
    """cuda:2 before cuda:10, node2 before node10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def summarize(results: pa.Table) -> dict[str, Any]:
    ok = results.filter(pc.equal(results["status"], "ok")) if results.num_rows else results
    secs = float_values(ok["total_seconds"]) if ok.num_rows else np.array([])
    secs = secs[~np.isnan(secs)]
    s: dict[str, Any] = {
        "rows": results.num_rows, "ok": ok.num_rows, "failed": results.num_rows - ok.num_rows,
        "median_seconds": float(np.median(secs)) if len(secs) else None,
        "p95_seconds": float(np.percentile(secs, 95)) if len(secs) else None,
        "videos_per_hour": None, "peak_vram": {},
    }
    if ok.num_rows:
        first, last = pc.min(ok["started_at"]).as_py(), pc.max(ok["finished_at"]).as_py()
        span = (last - first).total_seconds() if first is not None and last is not None else 0.0  # None: made elsewhere
        s["videos_per_hour"] = 3600.0 * ok.num_rows / span if span > 0 else None
        peaks = ok.group_by(["host", "device"], use_threads=False).aggregate([("peak_vram_bytes", "max")])
        for host, device, peak in zip(*(peaks[c].to_pylist() for c in ("host", "device", "peak_vram_bytes_max"))):
            s["peak_vram"][f"{host} {device}"] = peak
    return s


# -- charts (inline SVG: no scripts, no network) ---------------------------------------------------------
# The plot area sits inside the SVG with room for every label: tick labels left of and below it, the title
# above, the legend in its own column right of it (never over the lines).
W, H = 450, 240
PLOT_L, PLOT_T, PLOT_B = 52, 28, 204  # the plot area's left, top and bottom
PLOT_R, LEGEND_R = W - 16, W - 92     # its right edge: the legend's column takes the last 80 px when there is one


def nice_ticks(top: float, n: int = 4) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 x 10^k) up to at least ``top``."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


def human_number(v: float) -> str:
    """12, 2.5, 25k, 1.2M: what a person reads on an axis (never 2.02e+05)."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}" if v != int(v) else str(int(v))


def time_unit(span_seconds: float) -> tuple[str, float]:
    """The unit a time axis of this span reads best in, and its length in seconds."""
    for name, secs, limit in (("seconds", 1, 180), ("minutes", 60, 180 * 60), ("hours", 3600, 72 * 3600)):
        if span_seconds < limit:
            return name, secs
    return "days", 86400


def _x(v: float, hi: float, right: float = PLOT_R) -> float:
    return PLOT_L + (right - PLOT_L) * (v / hi if hi else 0.0)


def _y(v: float, hi: float) -> float:
    return PLOT_B - (PLOT_B - PLOT_T) * (v / hi if hi else 0.0)


def _axes(title: str, xlabel: str, xticks: list[float], xhi: float, ylabel: str, yticks: list[float],
          right: float = PLOT_R) -> str:
    """Axes, grid lines and labels, all inside the SVG; ``xhi`` is the value at the plot's right edge."""
    text = 'font-size="10" fill="#aaa"'
    parts = [f'<text x="{PLOT_L}" y="16" font-size="12" fill="#eee">{html.escape(title)}</text>',
             f'<line x1="{PLOT_L}" y1="{PLOT_B}" x2="{right}" y2="{PLOT_B}" stroke="#555"/>',
             f'<line x1="{PLOT_L}" y1="{PLOT_T}" x2="{PLOT_L}" y2="{PLOT_B}" stroke="#555"/>']
    for v in yticks:
        y = _y(v, yticks[-1])
        parts.append(f'<line x1="{PLOT_L}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#2a2a2a"/>')
        parts.append(f'<text x="{PLOT_L - 4}" y="{y + 3:.1f}" {text} text-anchor="end">{human_number(v)}</text>')
    for i, v in enumerate(xticks):
        x = _x(v, xhi, right)
        anchor = "start" if i == 0 else "end" if x > right - 16 else "middle"
        parts.append(f'<text x="{x:.1f}" y="{PLOT_B + 13}" {text} text-anchor="{anchor}">'
                     f"{human_number(v)}</text>")
    parts.append(f'<text x="{(PLOT_L + right) / 2:.0f}" y="{H - 8}" {text} text-anchor="middle">'
                 f"{html.escape(xlabel)}</text>")
    parts.append(f'<text x="12" y="{(PLOT_T + PLOT_B) / 2:.0f}" {text} text-anchor="middle" '
                 f'transform="rotate(-90 12 {(PLOT_T + PLOT_B) / 2:.0f})">{html.escape(ylabel)}</text>')
    return "".join(parts)


def _svg(chart_id: str, label: str, body: str) -> str:
    return (f'<svg id="{chart_id}" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{html.escape(label)}">{body}</svg>')


def seconds_histogram(secs: np.ndarray, bins: int = 40) -> str:
    secs = secs[~np.isnan(secs)]
    if not len(secs):
        return ""
    hi = float(np.percentile(secs, 99.5)) or float(secs.max()) or 1.0
    xticks = nice_ticks(hi)
    counts, _ = np.histogram(np.clip(secs, 0, xticks[-1]), bins=bins, range=(0, xticks[-1]))
    yticks = nice_ticks(max(int(counts.max()), 1))
    bw = (PLOT_R - PLOT_L) / bins
    bars = "".join(
        f'<rect x="{PLOT_L + i * bw:.1f}" y="{_y(c, yticks[-1]):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{PLOT_B - _y(c, yticks[-1]):.1f}" fill="#6af"/>' for i, c in enumerate(counts) if c)
    return _svg("chart-seconds", "seconds per video",
                _axes("Seconds per video (ok rows)", "seconds", xticks, xticks[-1], "videos", yticks) + bars)


def smoothed_rate(done: np.ndarray, t0: float, t1: float, width: float, points: int) -> tuple[np.ndarray, np.ndarray]:
    """(times, videos per minute) over [t0, t1], smoothed over about ``width`` seconds around each time.

    Finishes are counted in windows of half the width (over the part inside the run, at least a quarter of the
    width: never a few seconds holding a row or two, a spike), and those counts are averaged over the other
    half: a triangular kernel, so a row entering or leaving the window moves the line a little, not a step.
    A width as long as the run gives one flat line at the run's own rate."""
    done = np.sort(done)
    if width >= t1 - t0:
        return np.array([t0, t1]), np.full(2, 60.0 * len(done) / (t1 - t0))
    at = np.linspace(t0, t1, points)
    lo, hi = np.maximum(at - width / 4, t0), np.minimum(at + width / 4, t1)
    n = np.searchsorted(done, hi, "right") - np.searchsorted(done, lo, "right")
    rate = 60.0 * n / (hi - lo)
    k = max(1, int(round((points - 1) * (width / 2) / (t1 - t0))))
    kernel = np.ones(k)
    return at, np.convolve(rate, kernel, "same") / np.convolve(np.ones(points), kernel, "same")


RATE_POINTS = 240
LEGEND_MAX = 12


def throughput_chart(rank: np.ndarray, finished: np.ndarray, started: np.ndarray | None = None) -> str:
    """Videos per minute per rank over the run, smoothed: a rank that slows down or stops shows as its own line.

    Each line averages over a window of at least a 40th of the run and of about 20 of the rank's videos, so a
    handful of rows reads as their real rate (8 rows at 4.5/min are not a spike of 43.8)."""
    good = ~np.isnan(finished)
    rank, t = rank[good], finished[good]
    t0 = float(np.nanmin(started)) if started is not None and np.any(~np.isnan(started)) else float(t.min(initial=0))
    if len(t) < 2 or t.max() <= t0:
        return ""
    t1 = float(t.max())
    span = t1 - t0
    ranks = np.unique(rank)
    per_rank = len(t) / len(ranks)
    width = min(span, max(span / 40, 20 * span / per_rank))
    series = [(int(r), *smoothed_rate(t[rank == r], t0, t1, width, RATE_POINTS)) for r in ranks]
    yticks = nice_ticks(max(float(v.max()) for _, _, v in series))
    unit, secs = time_unit(span)
    xticks = [v for v in nice_ticks(span / secs) if v <= span / secs]
    xhi = span
    lines, legend = [], []
    for j, (r, at, v) in enumerate(series):
        colour = f"hsl({int(360 * j / len(series))},70%,60%)"
        pts = " ".join(f"{_x(a - t0, xhi, LEGEND_R):.1f},{_y(y, yticks[-1]):.1f}" for a, y in zip(at, v))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}">'
                     f"<title>rank {r}</title></polyline>")
        if j < LEGEND_MAX:
            legend.append(f'<text x="{LEGEND_R + 12}" y="{PLOT_T + 8 + 13 * j}" font-size="10" fill="{colour}">'
                          f"rank {r}</text>")
    if len(series) > LEGEND_MAX:
        legend.append(f'<text x="{LEGEND_R + 12}" y="{PLOT_T + 8 + 13 * LEGEND_MAX}" font-size="10" fill="#aaa">'
                      f"+{len(series) - LEGEND_MAX} more</text>")
    return _svg("chart-throughput", "throughput per rank",
                _axes("Videos per minute, per rank (smoothed)", f"{unit} since the start", xticks, span / secs,
                      "videos/min", yticks, LEGEND_R) + "".join(lines) + "".join(legend))


# -- row data ----------------------------------------------------------------------------------------------
def _js_values(values: np.ndarray | list, decimals: int | None = None) -> Any:
    """A column of one chunk as JSON-ready data: one value when every row has it (the common case for
    conditioning values), else a list."""
    if isinstance(values, np.ndarray):
        if values.dtype.kind == "f":
            if decimals is not None:
                values = np.round(values, decimals)
            if len(values) and (np.all(values == values[0]) or np.all(np.isnan(values))):
                v = float(values[0])
                return None if math.isnan(v) else (int(v) if v.is_integer() and decimals is None else v)
            finite = values[~np.isnan(values)]
            if decimals is None and len(finite) == len(values) and np.all(finite == np.round(finite)):
                return values.astype(np.int64).tolist()  # integer columns read as floats: "3", not "3.0"
            return [None if math.isnan(v) else v for v in values.tolist()]
        if len(values) and np.all(values == values[0]):
            return values[0].item()
        return values.tolist()
    if len(values) and all(v == values[0] for v in values):
        return values[0]
    return values


def _file_names(folder: str) -> set[str]:
    """One listing instead of a stat per row."""
    try:
        return {e.name for e in os.scandir(folder)}
    except FileNotFoundError:
        return set()


def _paths(root: str, ids: list[str], given: list[str | None], default_dir: str, ext: str,
           present: set[str], fallback: list[str | None] | None = None) -> list[Any]:
    """Per row: 1 when <default_dir>/<id>.<ext> exists (the page builds the name), else a relative path or 0."""
    out: list[Any] = []
    for k, rid in enumerate(ids):
        name = f"{rid}.{ext}"
        if name in present:
            out.append(1)
            continue
        p = given[k] if given is not None else None
        if p is None and fallback is not None and fallback[k] and not str(fallback[k]).startswith(("http://", "https://")):
            src = str(fallback[k])
            p = os.path.relpath(src, root) if os.path.isabs(src) else src
        elif p is None and fallback is not None and fallback[k]:
            p = fallback[k]
        out.append(p or 0)
    return out


def write_data_chunks(root: str, results: pa.Table, hosts: list[str], chunk_rows: int = CHUNK_ROWS) -> int:
    """report/data-NNNNN.js, one per ``chunk_rows`` rows, each a single ``SVD.chunk(k, {...})`` call."""
    folder = os.path.join(root, REPORT_DIR)
    os.makedirs(folder, exist_ok=True)
    videos, inputs = _file_names(os.path.join(root, "videos")), _file_names(os.path.join(root, INPUTS))
    host_index = {h: i for i, h in enumerate(hosts)}
    n = results.num_rows
    chunks = max(1, math.ceil(n / chunk_rows)) if n else 0
    t0 = pc.min(results["finished_at"]).as_py() if n else None
    for k in range(chunks):
        part = results.slice(k * chunk_rows, chunk_rows)
        ids = part["id"].to_pylist()
        status = part["status"].to_pylist()
        failed = np.array([s != "ok" for s in status])
        cols: dict[str, Any] = {"id": ids, "st": _js_values(failed.astype(np.int8))}
        errors = part["error"].to_pylist()
        cols["err"] = [(e or "")[:300] if f else None for e, f in zip(errors, failed)] if failed.any() else None
        cols["seed"] = _js_values([str(s) for s in part["seed"].to_pylist()])
        for c in NUMERIC:
            if c not in part.column_names:
                cols[c] = None
                continue
            a = float_values(part[c])
            cols[c] = _js_values(a, ROUND.get(c))
        cols["host"] = _js_values(np.array([host_index.get(h, 0) for h in part["host"].to_pylist()], dtype=np.int64))
        fin = part["finished_at"]
        if t0 is not None:
            secs = pc.divide(pc.cast(pc.subtract(pc.cast(fin, pa.int64()), pa.scalar(int(t0.timestamp() * 1e6))),
                                     pa.float64()), 1e6)
            cols["t"] = _js_values(np.round(float_values(secs), 1))
        vp = part["video_path"].to_pylist()
        cols["vid"] = _js_values([1 if (not f and f"{i}.mp4" in videos and p == f"videos/{i}.mp4") else (p if not f else 0)
                                  for i, p, f in zip(ids, vp, failed)])
        cols["img"] = _js_values(_paths(root, ids, None, INPUTS, "jpg", inputs, part["image"].to_pylist()))
        text = f"SVD.chunk({k},{json.dumps(cols, separators=(',', ':'), allow_nan=True)});\n"
        write_text_atomic(text, os.path.join(folder, f"data-{k:05d}.js"))
    own = ownership.real_folder(root, REPORT_DIR)  # never delete through a link out of the folder
    for stale in glob.glob(os.path.join(own, "data-*.js")) if own else []:  # chunks of an earlier, longer run
        name = os.path.basename(stale)
        if ownership.is_ours(REPORT_DIR, name) and int(name[5:10]) >= chunks:
            ownership.remove_file(stale)
    return chunks


def write_gallery(root: str, page_size: int = 48, chunk_rows: int = CHUNK_ROWS) -> list[str]:
    """Write index.html and its row data; return the paths written."""
    rd = RunDir(root)
    results = _read_results(rd)
    s = summarize(results)
    config = ""
    if os.path.exists(rd.config_path):
        with open(rd.config_path) as f:
            config = f.read()
    model = results["model"][0].as_py() if results.num_rows else "n/a"
    hosts = sorted(set(pc.unique(results["host"]).to_pylist()) - {None}) if results.num_rows else []
    chunks = write_data_chunks(root, results, hosts, chunk_rows)
    scores = [c for c in SCORE_COLUMNS if c in results.column_names]
    fmt = lambda v, unit="s": "n/a" if v is None else f"{v:.2f} {unit}"  # noqa: E731
    vph = "n/a" if s["videos_per_hour"] is None else f"{s['videos_per_hour']:.1f}"
    vram = "".join(f"<tr><td>{html.escape(k)}</td><td>{human_bytes(v)}</td></tr>"
                   for k, v in sorted(s["peak_vram"].items(), key=lambda kv: natural_key(kv[0])))
    score_rows = ""
    ok = results.filter(pc.equal(results["status"], "ok")) if results.num_rows else results
    for c in scores:
        a = float_values(ok[c]) if ok.num_rows else np.array([])
        a = a[~np.isnan(a)]
        if len(a):
            lo, med, p5 = np.min(a), np.median(a), np.percentile(a, 5)
            score_rows += f"<tr><th>{c}</th><td>median {med:.4f} · 5th percentile {p5:.4f} · min {lo:.4f}</td></tr>"
    charts = ""
    if ok.num_rows:
        charts = (throughput_chart(float_values(ok["rank"]), epoch_seconds(ok["finished_at"]),
                                   epoch_seconds(ok["started_at"]))
                  + seconds_histogram(float_values(ok["total_seconds"])))
    failed = results.filter(pc.equal(results["status"], "failed")) if results.num_rows else results
    fail_html = ""
    if failed.num_rows:
        shown = failed.slice(0, 20).select(["id", "image", "error"]).to_pylist()
        rows_html = "".join(f"<tr><td>{html.escape(r['id'])}</td><td>{html.escape(r['image'] or '')}</td>"
                            f"<td>{html.escape((r['error'] or '')[:300])}</td></tr>" for r in shown)
        more = (f"<p>... {failed.num_rows - 20} more: tick \"failed only\" below, or read results.parquet "
                "(status == 'failed')</p>") if failed.num_rows > 20 else ""
        fail_html = (f'<details open id="failedrows"><summary>Failed rows ({failed.num_rows})</summary>'
                     f'<div class="scroll"><table class="failed">{rows_html}</table></div>{more}</details>')
    sort_opts = [("row", "manifest order"), ("id", "id"), ("status", "status"), ("seconds", "seconds per video"),
                 *[(c, c) for c in scores], *[(c, c) for c in CONDITIONING_FIELDS], ("rank", "rank")]
    options = "".join(f'<option value="{v}">{html.escape(t)}</option>' for v, t in sort_opts)
    score_opts = "".join(f'<option value="{c}">{c}</option>' for c in scores)
    meta = {"n": results.num_rows, "chunks": chunks, "chunkRows": chunk_rows, "pageSize": max(1, int(page_size)),
            "hosts": hosts, "scores": scores, "dir": REPORT_DIR, "inputs": INPUTS}
    links = "".join(f' <a href="{f}">{t}</a>' for f, t in (("contact_sheet.png", "contact sheet"),
                                                           ("results.parquet", "results.parquet"))
                    if os.path.exists(os.path.join(root, f)))
    devices = len(s["peak_vram"])
    body = (
        f"<header><h1>svd-batch: {html.escape(os.path.basename(os.path.abspath(root)))}</h1>"
        f'<nav class="jump"><button id="tovideos">videos ({s["ok"]}) &darr;</button>'
        + (f'<button id="tofailed">failed rows ({s["failed"]}) &darr;</button>' if s["failed"] else "")
        + f"{links}</nav></header>"
        '<div class="summary"><div class="figures">'
        f"<table><tr><th>rows ok</th><td>{s['ok']}</td></tr><tr><th>rows failed</th><td>{s['failed']}</td></tr>"
        f"<tr><th>videos per hour</th><td>{vph}</td></tr>"
        f"<tr><th>median per video</th><td>{fmt(s['median_seconds'])}</td></tr>"
        f"<tr><th>p95 per video</th><td>{fmt(s['p95_seconds'])}</td></tr>"
        f"<tr><th>model</th><td>{html.escape(str(model))}</td></tr>{score_rows}</table>"
        f"<details{' open' if devices <= 4 else ''}><summary>Peak VRAM per device ({devices})</summary>"
        f"<table>{vram}</table></details>"
        f"<details><summary>config</summary><pre>{html.escape(config)}</pre></details></div>"
        f'<div class="charts">{charts}</div></div>'
        + fail_html
        + f"<h2 id=\"videos\">Videos ({s['ok']} ok, {s['failed']} failed)</h2>"
        '<div class="controls"><label>sort <select id="sort">' + options + '</select></label>'
        '<select id="order"><option value="asc">ascending</option><option value="desc">descending</option></select>'
        '<label><input type="checkbox" id="failed"> failed only</label>'
        f'<label>score <select id="belowcol">{score_opts}</select> below <input type="number" id="belowval" step="any"></label>'
        '<span id="status">loading rows...</span></div>'
        '<nav><button id="prev">previous</button> page <input type="number" id="pageno" min="1" value="1" style="width:5rem">'
        ' <button id="next">next</button></nav><div class="grid" id="grid"></div>'
        '<nav><button id="prev2">previous</button> <span id="pageof"></span> <button id="next2">next</button></nav>'
    )
    meta_json = json.dumps(meta).replace("</", "<\\/")  # a host name cannot end the script element
    page = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>svd-batch report</title>"
            f"<style>{CSS}</style></head><body>{body}"
            f'<script type="application/json" id="meta">{meta_json}</script>'
            f"<script>{JS}</script></body></html>")
    path = os.path.join(root, "index.html")
    write_text_atomic(page, path)
    for stale in glob.glob(os.path.join(root, "index-*.html")):  # the paginated pages of earlier versions
        if ownership.OLD_PAGE.match(os.path.basename(stale)):
            ownership.remove_file(stale)
    return [path]


def _read_results(rd: RunDir) -> pa.Table:
    """results.parquet, or for an interrupted run the records so far."""
    if os.path.exists(rd.results_path):
        return pq.read_table(rd.results_path)
    return rd.read_records()


# -- contact sheet -----------------------------------------------------------------------------------------
THUMB_HEIGHT, PAD = 128, 6
# PNG at zlib level 1: the sheet is a preview, and level 6 (PIL's default) cost ~0.5 s per run.
PNG_LEVEL = 1


def _thumb_path(root: str, row_id: str) -> str:
    return os.path.join(root, ".svd-batch", "thumbs", f"{row_id}.png")


def _strip(frames: list[np.ndarray], image=None) -> "Image.Image":
    """The conditioning image (when known), then the first, middle and last frame, THUMB_HEIGHT high."""
    from PIL import Image

    picks = [Image.fromarray(np.asarray(f)) for f in (frames[0], frames[len(frames) // 2], frames[-1])]
    if image is not None:
        picks.insert(0, image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
    picks = [p.convert("RGB").resize((max(1, round(p.width * THUMB_HEIGHT / p.height)), THUMB_HEIGHT)) for p in picks]
    strip = Image.new("RGB", (sum(p.width + PAD for p in picks), THUMB_HEIGHT), (24, 24, 24))
    x = 0
    for p in picks:
        strip.paste(p, (x, 0))
        x += p.width + PAD
    return strip


def save_thumbnails(root: str, row_id: str, frames, image=None) -> None:
    """Called by the writer while it still holds the frames, so the contact sheet needs no decoding."""
    path = _thumb_path(root, row_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        _strip(list(frames), image).save(tmp, format="PNG", compress_level=PNG_LEVEL)


CAPTION_HEIGHT = 18  # the row's column names above its pictures
COLUMNS = ("input", "first frame", "middle frame", "last frame")
LABEL_WIDTH = 300


def _value(v: Any, spec: str = "") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _row_text(r: dict[str, Any]) -> list[str]:
    text = [str(r["id"])[:40], f"seed {_value(r.get('seed'))}  fps {_value(r.get('fps'))}",
            f"motion {_value(r.get('motion_bucket_id'))}  noise {_value(r.get('noise_aug_strength'), 'g')}",
            f"{_value(r.get('num_frames'))} frames  {_value(r.get('width'))}x{_value(r.get('height'))}"]
    if r.get("motion_score") is not None:
        text.append(f"motion_score {r['motion_score']:.3f}  sim {_value(r.get('image_similarity'), '.3f')}")
    if r["status"] != "ok":
        # the reason, without the "row <id>: image '<path>': " that the row's own label already shows
        text.append("FAILED: " + (r.get("error") or "").split("': ", 1)[-1][:44])
    return text


def write_contact_sheet(root: str, max_rows: int = 16) -> str | None:
    """Input image, then first, middle and last frame of the first ``max_rows`` rows, each row labelled and each
    picture named above it (rows of other sizes have other column widths)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = _read_results(RunDir(root)).slice(0, max_rows).to_pylist()
    if not rows:
        return None
    font = ImageFont.load_default(size=14)
    strips = []
    for r in rows:
        picture = None
        video = os.path.join(root, r["video_path"]) if r["status"] == "ok" and r["video_path"] else None
        if video and os.path.exists(video):
            thumb = _thumb_path(root, r["id"])
            if os.path.exists(thumb):
                picture = Image.open(thumb).convert("RGB")
            else:
                inp = input_image_path(root, r["id"])
                picture = _strip(read_mp4(video), Image.open(inp) if os.path.exists(inp) else None)
        width = LABEL_WIDTH + (picture.width if picture else 4 * (THUMB_HEIGHT + PAD))
        strip = Image.new("RGB", (width, CAPTION_HEIGHT + THUMB_HEIGHT + 2 * PAD), (24, 24, 24))
        draw = ImageDraw.Draw(strip)
        for i, line in enumerate(_row_text(r)):
            draw.text((PAD, PAD + i * 18), line, fill=(235, 235, 235) if i == 0 else (170, 170, 170), font=font)
        if picture:
            strip.paste(picture, (LABEL_WIDTH, PAD + CAPTION_HEIGHT))
            # Every picture of a strip has the row's shape; without an input image the strip starts at the first frame.
            w = max(1, round(int(r["width"] or 1) * THUMB_HEIGHT / int(r["height"] or 1)))
            n = min(len(COLUMNS), max(1, round(picture.width / (w + PAD))))
            step = picture.width / n
            for k, name in enumerate(COLUMNS[4 - n:]):
                draw.text((LABEL_WIDTH + k * step, PAD), name, fill=(150, 190, 255), font=font)
        strips.append(strip)
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), (24, 24, 24))
    y = 0
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    path = os.path.join(root, "contact_sheet.png")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=PNG_LEVEL)
    return path


def write_report(root: str, page_size: int = 48, contact_rows: int = 16) -> list[str]:
    sheet = write_contact_sheet(root, contact_rows)
    pages = write_gallery(root, page_size)
    return ([sheet] if sheet else []) + pages


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-report", description="Write index.html (with its row data under "
                                 "report/) and contact_sheet.png for a finished or interrupted svd-batch run.")
    ap.add_argument("output_dir")
    ap.add_argument("--page-size", type=int, default=48, help="videos per page")
    ap.add_argument("--contact-rows", type=int, default=16, help="rows on the contact sheet")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.output_dir, ".svd-batch")):
        sys.exit(f"svd-batch-report: {args.output_dir} is not an svd-batch output folder (no .svd-batch/ inside)")
    from .runner import complete_folder

    # A run whose last rank was lost left its records unmerged: merge them and write results.parquet first
    # (only when no run holds the folder), so the report shows every recorded row.
    complete_folder(args.output_dir, say=lambda msg: print(msg, file=sys.stderr))
    for path in write_report(args.output_dir, args.page_size, args.contact_rows):
        print(path)


if __name__ == "__main__":
    main()
