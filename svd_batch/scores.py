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
the run (from the writer, right after writing them; the ffmpeg that encodes the MP4 also decodes it, with
the frames a reader of the file gets) and in ``svd-batch-score`` alike, so both give the same values for the
same video. Scoring the frames in memory instead gave other values than any later
rescoring could (H.264 is lossy, the saved input is a JPEG): image_similarity 0.9518 in the run, 0.9563 from
the files. The decode costs the writer thread tens to hundreds of milliseconds per video, beside the model
(BENCHMARKS.md); the embedding runs where the encoder lives (the GPU in a real run), so the model never waits
for scores. Across device types (a GPU run rescored on CPU) the encoder's float rounding differs slightly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .video import read_mp4

if TYPE_CHECKING:
    import torch

SCORE_COLUMNS = ("motion_score", "image_similarity", "flicker_score")
EMBED_FRAMES = 8

Embed = Callable[[list[np.ndarray]], np.ndarray]


def _luma(frames: np.ndarray, max_side: int) -> np.ndarray:
    """(F, h, w) float32 luma, block-averaged so the longer side is at most ``max_side``."""
    f = np.asarray(frames)
    # Every 2nd..nth pixel first: the block means barely change, and float work on full SVD-XT frames
    # (25 x 576 x 1024) would cost tens of milliseconds.
    step = max(1, max(f.shape[1], f.shape[2]) // (2 * max_side))
    f = f[:, ::step, ::step]
    n, h, w, _ = f.shape
    k = max(1, int(np.ceil(max(h, w) / max_side)))
    # A side shorter than a block (16x4096 frames) keeps its pixels whole rather than becoming 0 blocks (NaN).
    kh, kw = min(k, h), min(k, w)
    h2, w2 = (h // kh) * kh, (w // kw) * kw
    f = f[:, :h2, :w2].astype(np.float32)
    y = f[..., 0] * 0.299 + f[..., 1] * 0.587 + f[..., 2] * 0.114
    return y.reshape(n, h2 // kh, kh, w2 // kw, kw).mean(axis=(2, 4))


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
    gh, gw = min(4, y.shape[1]), min(4, y.shape[2])  # fewer regions along a side shorter than 4 luma blocks
    h4, w4 = y.shape[1] // gh * gh, y.shape[2] // gw * gw
    y = y[:, :h4, :w4].reshape(len(y), gh, h4 // gh, gw, w4 // gw).mean(axis=(2, 4))
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
    import threading

    embed = clip_embedder(enc, fx)
    one_at_a_time = threading.Lock()  # several writer threads score at once; the encoder is one module

    def guarded(images: list[np.ndarray]) -> np.ndarray:
        if hasattr(enc, "_hf_hook") or next(enc.parameters()).device.type == "meta":
            raise _Offloaded
        with one_at_a_time:
            return embed(images)

    return guarded


class _Offloaded(Exception):
    pass


def score_files(video_path: str, image, embed: Embed | None,
                decoded: np.ndarray | None = None) -> dict[str, float | None]:
    """The scores of a video as written and its conditioning image as saved (None: pixel scores only): what the
    run records and what svd-batch-score recomputes, read the same way. ``decoded``: the file's frames as
    ``read_mp4`` gives them, already in hand (the writer's ffmpeg decoded what it encoded: video.write_mp4)."""
    return score_video(read_mp4(video_path) if decoded is None else decoded, image, embed)


def scores_for_record(video_path: str, image_path: str | None, embed: Embed | None,
                      decoded: np.ndarray | None = None) -> dict[str, float | None]:
    """For the writer, once the row's video and input image are in place: scores never fail a row (a video that
    exists is worth more than its score)."""
    def image():
        if image_path is None or embed is None:
            return None
        from PIL import Image

        return Image.open(image_path).convert("RGB")

    try:
        try:
            return score_files(video_path, image(), embed, decoded)
        except _Offloaded:
            return score_files(video_path, None, None, decoded)
    except Exception:  # noqa: BLE001 - a broken scorer leaves the columns empty; svd-batch-score can redo them
        return {c: None for c in SCORE_COLUMNS}


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


LOWEST = 10


def score_summary(table: Any, lowest: int = LOWEST) -> str:
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
