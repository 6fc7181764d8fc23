"""index.html: the summary, the charts and the first failed rows as HTML; the videos drawn by report.js from the
row data, markup only for the page on screen (paging, sorting, filtering in the browser; the view in the URL)."""

from __future__ import annotations

import glob
import html
import json
import os
from importlib import resources

import numpy as np
import pyarrow.compute as pc

from .. import ownership
from ..atomic import write_text_atomic
from ..fields import CONDITIONING_FIELDS
from ..results import epoch_seconds, float_values
from ..rundir import RunDir
from ..scores import SCORE_COLUMNS
from ..util import human_bytes
from .charts import seconds_histogram, throughput_chart
from .data import CHUNK_ROWS, INPUTS, REPORT_DIR, natural_key, read_results, summarize, write_data_chunks


def _static(name: str) -> str:
    return resources.files("svd_batch").joinpath("report", "static", name).read_text()


def write_gallery(root: str, page_size: int = 48, chunk_rows: int = CHUNK_ROWS) -> list[str]:
    """Write index.html and its row data; return the paths written."""
    rd = RunDir(root)
    results = read_results(rd)
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
    vpm = "n/a" if s["videos_per_minute"] is None else f"{s['videos_per_minute']:.1f}"
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
        f'<tr><th title="ok rows over the time from the first start to the last finish, every launch together">'
        f"videos per minute</th><td>{vpm}</td></tr>"
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
            f"<style>{_static('report.css')}</style></head><body>{body}"
            f'<script type="application/json" id="meta">{meta_json}</script>'
            f"<script>{_static('report.js')}</script></body></html>")
    path = os.path.join(root, "index.html")
    write_text_atomic(page, path)
    for stale in glob.glob(os.path.join(root, "index-*.html")):  # the paginated pages of earlier versions
        if ownership.OLD_PAGE.match(os.path.basename(stale)):
            ownership.remove_file(stale)
    return [path]
