"""The report's two charts as inline SVG (no scripts, no network): videos per minute per rank over the run, and
the distribution of seconds per video; human units, every label inside the picture, the legend clear of the lines."""

from __future__ import annotations

import html
import math

import numpy as np

# -- charts (inline SVG: no scripts, no network) ---------------------------------------------------------
# The plot area sits inside the SVG with room for every label: tick labels left of and below it, the title
# above, the legend in its own column right of it (never over the lines).
W, H = 450, 240
PLOT_L, PLOT_T, PLOT_B = 52, 28, 204  # the plot area's left, top and bottom
PLOT_R, LEGEND_R = W - 16, W - 92     # its right edge: the legend's column takes the last 80 px when there is one


def nice_ticks(top: float, n: int = 4, whole: bool = False) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 x 10^k) up to at least ``top``; ``whole``: whole-number steps only (an
    axis of counts has no 0.5 videos)."""
    if not top > 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / n
    mag = 10 ** math.floor(math.log10(raw))
    if whole and mag < 1:
        raw, mag = 1.0, 1
    steps = (1, 2, 5, 10) if whole and mag < 10 else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
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
    yticks = nice_ticks(max(int(counts.max()), 1), whole=True)
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
