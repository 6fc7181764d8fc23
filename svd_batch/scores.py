"""Quality scores per video, to find the duds of a large run: static clips, flicker, drift from the input.

- ``motion_score``: mean absolute difference between consecutive frames, on luma downscaled to at most
  64 px, divided by 255 (0 = a still picture; typical SVD clips 0.01-0.1). The SVD paper filtered its
  training clips by motion for the same reason: a static clip is the most common failure.
- ``image_similarity``: cosine similarity between the conditioning image and the frames (mean over up to
  8 evenly spaced frames) in the embedding space of the pipeline's own CLIP image encoder, so no other
  model is downloaded. Near 1 = the video stays on its input; low = it drifted or fell apart.
- ``flicker_score``: mean absolute second temporal difference of the mean luma of a 4x4 grid of regions,
  /255. Texture moving through a region barely changes its mean; a region pumping brighter and darker
  from frame to frame (the flicker users report) gives a large second difference.

Scores describe the files a run leaves: the MP4 as decoded and the input as saved (``inputs/<id>.jpg``), in
the run (from the writer thread, right after writing them) and in ``svd-batch-score`` alike, so both give the
same values for the same video. Scoring the frames in memory instead gave other values than any later
rescoring could (H.264 is lossy, the saved input is a JPEG): image_similarity 0.9518 in the run, 0.9563 from
the files. The decode costs the writer thread tens to hundreds of milliseconds per video, beside the model
(BENCHMARKS.md); the embedding runs where the encoder lives (the GPU in a real run), so the model never waits
for scores. Across device types (a GPU run rescored on CPU) the encoder's float rounding differs slightly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

import numpy as np

from .atomic import atomic_path
from .util import first_line
from .write import read_mp4

SCORE_COLUMNS = ("motion_score", "image_similarity", "flicker_score")
INPUTS = "inputs"
INPUT_MAX_SIDE = 512  # the gallery shows it small and CLIP sees 224 px: a full-size copy would only cost disk
EMBED_FRAMES = 8

Embed = Callable[[list[np.ndarray]], np.ndarray]


def input_image_path(root: str, row_id: str) -> str:
    return os.path.join(root, INPUTS, f"{row_id}.jpg")


def save_input_image(root: str, row_id: str, image) -> None:
    """The conditioning image as the model saw it (after resize), for the gallery and for rescoring."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if max(img.size) > INPUT_MAX_SIDE:
        scale = INPUT_MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    path = input_image_path(root, row_id)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        img.save(tmp, format="JPEG", quality=90)


def _luma(frames: np.ndarray, max_side: int) -> np.ndarray:
    """(F, h, w) float32 luma, block-averaged so the longer side is at most ``max_side``."""
    f = np.asarray(frames)
    # Every 2nd..nth pixel first: the block means barely change, and float work on full SVD-XT frames
    # (25 x 576 x 1024) would cost tens of milliseconds.
    step = max(1, max(f.shape[1], f.shape[2]) // (2 * max_side))
    f = f[:, ::step, ::step]
    n, h, w, _ = f.shape
    k = max(1, int(np.ceil(max(h, w) / max_side)))
    h2, w2 = (h // k) * k, (w // k) * k
    f = f[:, :h2, :w2].astype(np.float32)
    y = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
    return y.reshape(n, h2 // k, k, w2 // k, k).mean(axis=(2, 4))


def motion_score(frames: np.ndarray, y: np.ndarray | None = None) -> float | None:
    if len(frames) < 2:
        return None
    y = _luma(frames, 64) if y is None else y
    return float(np.abs(np.diff(y, axis=0)).mean() / 255.0)


def flicker_score(frames: np.ndarray, y: np.ndarray | None = None) -> float | None:
    if len(frames) < 3:
        return None
    # Mean luma of a 4x4 grid of regions: texture moving through a region barely changes its mean, a
    # region pumping brighter and darker does, and changes direction every frame (a large second difference).
    y = _luma(frames, 64) if y is None else y
    h4, w4 = y.shape[1] // 4 * 4, y.shape[2] // 4 * 4
    y = y[:, :h4, :w4].reshape(len(y), 4, h4 // 4, 4, w4 // 4).mean(axis=(2, 4))
    return float(np.abs(y[2:] - 2 * y[1:-1] + y[:-2]).mean() / 255.0)


def image_similarity(frames: np.ndarray, image, embed: Embed) -> float:
    picks = np.unique(np.linspace(0, len(frames) - 1, min(EMBED_FRAMES, len(frames))).round().astype(int))
    e = np.asarray(embed([np.asarray(image, dtype=np.uint8)] + [np.asarray(frames[i]) for i in picks]), dtype=np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return float((e[1:] @ e[0]).mean())


def score_video(frames: np.ndarray, image=None, embed: Embed | None = None) -> dict[str, float | None]:
    """The three scores of one video; image_similarity is None without the image or an encoder."""
    y = _luma(frames, 64)
    out: dict[str, float | None] = {"motion_score": motion_score(frames, y), "flicker_score": flicker_score(frames, y),
                                    "image_similarity": None}
    if image is not None and embed is not None:
        out["image_similarity"] = image_similarity(frames, image, embed)
    return out


def clip_embedder(image_encoder, feature_extractor) -> Embed:
    """An embedding function over the pipeline's CLIP image encoder and its feature extractor."""
    import torch

    def embed(images: list[np.ndarray]) -> np.ndarray:
        p = next(image_encoder.parameters())
        pixels = _preprocess(images, feature_extractor)
        with torch.inference_mode():
            out = image_encoder(pixels.to(device=p.device, dtype=p.dtype)).image_embeds
        return out.float().cpu().numpy()

    return embed


def _preprocess(images: list[np.ndarray], fx) -> "torch.Tensor":
    """The feature extractor's steps (shortest edge to 224 bicubic, centre crop, normalise) in torch: the
    PIL path of CLIPImageProcessor costs ~150 ms for 9 images, this a few ms."""
    import torch
    import torch.nn.functional as F

    size = getattr(fx, "size", None) or {}
    edge = int(size.get("shortest_edge", 224)) if isinstance(size, dict) else 224
    crop = getattr(fx, "crop_size", None) or {"height": edge, "width": edge}
    ch, cw = int(crop["height"]), int(crop["width"])
    mean = torch.tensor(getattr(fx, "image_mean", [0.48145466, 0.4578275, 0.40821073])).view(3, 1, 1)
    std = torch.tensor(getattr(fx, "image_std", [0.26862954, 0.26130258, 0.27577711])).view(3, 1, 1)
    out = []
    for im in images:
        x = torch.from_numpy(np.array(np.asarray(im)[..., :3], dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        h, w = x.shape[1:]
        scale = edge / min(h, w)
        nh, nw = max(ch, round(h * scale)), max(cw, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0].clamp(0, 1)
        top, left = (nh - ch) // 2, (nw - cw) // 2
        out.append((x[:, top:top + ch, left:left + cw] - mean) / std)
    return torch.stack(out)


def pipeline_embedder(pipe) -> Embed | None:
    """The run's own encoder. With offloading (accelerate hooks move modules on demand from the model
    thread), scoring from the writer thread could race them: no embedding then, the pixel scores still run."""
    enc, fx = getattr(pipe, "image_encoder", None), getattr(pipe, "feature_extractor", None)
    if enc is None or fx is None:
        return None
    embed = clip_embedder(enc, fx)

    def guarded(images: list[np.ndarray]) -> np.ndarray:
        if hasattr(enc, "_hf_hook") or next(enc.parameters()).device.type == "meta":
            raise _Offloaded
        return embed(images)

    return guarded


class _Offloaded(Exception):
    pass


def score_files(root: str, row: dict[str, Any], embed: Embed | None) -> dict[str, float | None]:
    """The scores of a row's video as written (videos/<id>.mp4, or its recorded video_path) and its input as
    saved: what the run records and what svd-batch-score recomputes, read the same way."""
    video = os.path.join(root, row.get("video_path") or os.path.join("videos", f"{row['id']}.mp4"))
    image = conditioning_image(root, row) if embed is not None else None
    return score_video(read_mp4(video), image, embed)


def scores_for_record(root: str, row: dict[str, Any], embed: Embed | None) -> dict[str, float | None]:
    """For the writer, once the row's video and input image are in place: scores never fail a row (a video that
    exists is worth more than its score)."""
    try:
        return score_files(root, row, embed)
    except _Offloaded:
        return score_files(root, row, None)
    except Exception:  # noqa: BLE001 - a broken scorer leaves the columns empty; svd-batch-score can redo them
        return {c: None for c in SCORE_COLUMNS}


# -- svd-batch-score ----------------------------------------------------------------------------------------
def load_embedder(model_path: str, device: str | None = None) -> Embed:
    """Only the pipeline's image encoder and feature extractor, from the run's model folder."""
    import torch

    from .util import quiet_hf_logging

    quiet_hf_logging()  # no weight-loading bar, no warning about torchvision's image processor backend
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    enc = CLIPVisionModelWithProjection.from_pretrained(model_path, subfolder="image_encoder").to(dev).eval()
    if dev.startswith("cuda"):
        enc = enc.half()
    fx = CLIPImageProcessor.from_pretrained(model_path, subfolder="feature_extractor")
    return clip_embedder(enc, fx)


def conditioning_image(root: str, row: dict[str, Any]):
    """inputs/<id>.jpg when the run kept it; else the row's own image resized as the model resizes it."""
    from PIL import Image

    saved = input_image_path(root, row["id"])
    if os.path.exists(saved):
        return Image.open(saved).convert("RGB")
    src = row.get("image")
    if src and not src.startswith(("http://", "https://")):
        path = src if os.path.isabs(src) else os.path.join(root, src)
        if os.path.exists(path):
            return Image.open(path).convert("RGB").resize((int(row["width"]), int(row["height"])))
    return None


def _model_path_from_config(root: str) -> str | None:
    from .runner import model_path, saved_config

    cfg = saved_config(root)
    return None if cfg is None else model_path(cfg)


def rescore(root: str, embed: Embed | None, log: Callable[[str], None] = print) -> "pa.Table":
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .rundir import RunDir, write_parquet_atomic

    rd = RunDir(root)
    table = pq.read_table(rd.results_path)
    cols = {c: [None] * table.num_rows for c in SCORE_COLUMNS}
    keep = ["id", "status", "video_path", "image", "width", "height"]
    started, missing, scored = time.perf_counter(), 0, 0
    for i, row in enumerate(table.select(keep).to_pylist()):
        video = os.path.join(root, row["video_path"]) if row["status"] == "ok" and row["video_path"] else None
        if not video or not os.path.exists(video):
            missing += row["status"] == "ok"
            continue
        s = score_files(root, row, embed)
        scored += 1
        for c in SCORE_COLUMNS:
            cols[c][i] = s[c]
    for c in SCORE_COLUMNS:
        arr = pa.array(cols[c], pa.float64())
        if c in table.column_names:
            table = table.set_column(table.schema.get_field_index(c), c, arr)
        else:
            table = table.append_column(c, arr)
    write_parquet_atomic(table, rd.results_path)
    log(f"svd-batch-score: scored {scored} rows in {time.perf_counter() - started:.1f} s"
        + (f"; {missing} ok rows have no video file (scores left empty)" if missing else ""))
    return table


LOWEST = 10


def score_summary(table: "pa.Table", lowest: int = LOWEST) -> str:
    """Per score: its distribution, and the rows with the lowest values (the first duds to look at)."""
    import pyarrow.compute as pc

    lines = []
    for c in SCORE_COLUMNS:
        if c not in table.column_names:
            continue
        scored = table.filter(pc.is_valid(table[c])).select(["id", c])
        if not scored.num_rows:
            lines.append(f"{c}: no values")
            continue
        v = scored[c].to_numpy()
        q = np.percentile(v, [0, 5, 25, 50, 75, 95, 100])
        lines.append(f"{c} ({scored.num_rows} rows): min {q[0]:.4f} · 5% {q[1]:.4f} · 25% {q[2]:.4f} · median "
                     f"{q[3]:.4f} · 75% {q[4]:.4f} · 95% {q[5]:.4f} · max {q[6]:.4f}")
        low = scored.sort_by([(c, "ascending"), ("id", "ascending")]).slice(0, lowest).to_pylist()
        lines.append(f"  lowest {len(low)}: " + ", ".join(f"{r['id']} {r[c]:.4f}" for r in low))
    return "\n".join(lines)


def rebuild_report(root: str, log: Callable[[str], None] = print) -> None:
    """The report shows the scores: write it again from the new results (with the run's report settings)."""
    from .gallery import write_report
    from .runner import saved_config

    cfg = saved_config(root)
    report = cfg.get("report") if cfg is not None else None
    page_size = int(report.get("page_size", 48)) if report is not None else 48
    contact_rows = int(report.get("contact_sheet_rows", 16)) if report is not None else 16
    try:
        paths = write_report(root, page_size, contact_rows)
    except Exception as exc:  # noqa: BLE001 - the scores are saved; the report is for people
        log(f"svd-batch-score: the scores are saved, but the report could not be rewritten ({type(exc).__name__}: "
            f"{first_line(exc)}); run svd-batch-report {root}")
        return
    log("svd-batch-score: report rewritten with the new scores: " + ", ".join(os.path.relpath(p, root) for p in paths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-score", description="Recompute motion_score, image_similarity "
                                 "and flicker_score of a finished run from its MP4s and input images (the same "
                                 "reading the run does: the same values on the same device type), rewrite "
                                 "results.parquet (atomically), print each score's distribution and lowest rows, "
                                 "and rewrite the report.")
    ap.add_argument("output_dir")
    ap.add_argument("--model", help="diffusers folder whose image_encoder/ embeds images (default: the run's "
                    "model, from its config.yaml)")
    ap.add_argument("--no-embed", action="store_true", help="skip image_similarity (no encoder is loaded)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--no-report", action="store_true", help="leave index.html and contact_sheet.png as they are "
                    "(by default they are rewritten, since they show the scores)")
    args = ap.parse_args(argv)
    root = args.output_dir
    if not os.path.exists(os.path.join(root, "results.parquet")):
        print(f"svd-batch-score: {root} has no results.parquet, so there is nothing to score. Point it at the "
              "output.dir of a finished run, or finish an interrupted one first (run the same svd-batch command "
              "again: it resumes and writes results.parquet).", file=sys.stderr)
        sys.exit(2)
    embed = None
    if not args.no_embed:
        try:
            path = args.model or _model_path_from_config(root)
            if path is None:
                raise FileNotFoundError("no config.yaml in the folder")
            embed = load_embedder(path, args.device)
        except Exception as exc:  # noqa: BLE001 - one message for every way the encoder is unavailable
            print(f"svd-batch-score: cannot load the image encoder for image_similarity ({type(exc).__name__}: "
                  f"{first_line(exc)}). Pass --model <diffusers folder with "
                  "image_encoder/ and feature_extractor/>, or --no-embed to compute only the pixel scores.",
                  file=sys.stderr)
            sys.exit(2)
    table = rescore(root, embed)
    print(score_summary(table))
    if not args.no_report:
        rebuild_report(root)


if __name__ == "__main__":
    main()
