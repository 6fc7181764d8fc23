"""The contact sheet (contact_sheet.png): the first rows' input image beside their first, middle and last frame,
each row labelled; the writer cuts each row's strip (a thumbnail) while it still holds the frames."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_path
from ..rundir import RunDir
from ..video import read_mp4
from .data import read_results

if TYPE_CHECKING:
    from PIL import Image

# -- contact sheet -----------------------------------------------------------------------------------------
THUMB_HEIGHT, PAD = 128, 6
# PNG at zlib level 1: the sheet is a preview, and level 6 (PIL's default) cost ~0.5 s per run.
PNG_LEVEL = 1


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


def save_thumbnails(path: str, frames, image=None) -> None:
    """Called by the writer while it still holds the frames, so the contact sheet needs no decoding."""
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

    rd = RunDir(root)
    rows = read_results(rd).slice(0, max_rows).to_pylist()
    if not rows:
        return None
    font = ImageFont.load_default(size=14)
    strips = []
    for r in rows:
        picture = None
        video = os.path.join(root, r["video_path"]) if r["status"] == "ok" and r["video_path"] else None
        # Regular files only: a FIFO or device named like a video would never finish reading.
        if video and os.path.isfile(video):
            thumb = rd.thumb_path(r["id"])
            if os.path.isfile(thumb):
                picture = Image.open(thumb).convert("RGB")
            else:
                inp = rd.input_path(r["id"])
                picture = _strip(read_mp4(video), Image.open(inp) if os.path.isfile(inp) else None)
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
