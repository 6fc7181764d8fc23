"""Cost of the quality scores per video (svd_batch/scores.py), as the writer thread computes them.

    python scripts/bench_scores.py [--repeats 20] [--vit-h]

- pixel scores (motion_score, flicker_score) on tiny frames (8 x 64 x 64) and SVD-XT frames (25 x 576 x 1024);
- decoding the MP4 the scores are computed from (the run scores its files as written, as svd-batch-score does);
- image_similarity with the tiny model's CLIP image encoder (1 conditioning image + 8 frames);
- with --vit-h: SVD-XT's image encoder architecture (CLIP ViT-H/14, random weights: cost does not depend
  on them) on this machine, plus its FLOP count, from which the GPU estimate in BENCHMARKS.md is made.
  On a CUDA machine it is timed there too (fp16, batch of 9).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def vit_h_macs(tokens: int = 257, d: int = 1280, layers: int = 32) -> float:
    return layers * (12 * tokens * d * d + 2 * tokens * tokens * d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--vit-h", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the writer thread shares the "
                    "CPU with the model; 1 is what it can count on)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    import tempfile

    from svd_batch.scores import clip_embedder, score_video
    from svd_batch.tiny import ensure_tiny_model
    from svd_batch.video import read_mp4, write_mp4

    rng = np.random.default_rng(0)
    print(f"torch threads: {torch.get_num_threads()}")
    for name, shape in (("tiny 8x64x64", (8, 64, 64, 3)), ("SVD-XT 25x576x1024", (25, 576, 1024, 3))):
        frames = rng.integers(0, 255, shape, dtype=np.uint8)
        print(f"pixel scores, {name}: {1000 * timed(lambda: score_video(frames), args.repeats):.2f} ms median")
        # A pan over noise: H.264 finds little to compress, so decoding costs what a busy video costs.
        pan = np.stack([np.roll(frames[0], 4 * i, axis=1) for i in range(shape[0])])
        with tempfile.TemporaryDirectory() as d:
            write_mp4(pan, f"{d}/v.mp4", 7)
            ms = 1000 * timed(lambda: read_mp4(f"{d}/v.mp4"), max(3, args.repeats // 4))
        print(f"decode the MP4, {name}: {ms:.1f} ms median")

    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    tiny = str(ensure_tiny_model())
    enc = CLIPVisionModelWithProjection.from_pretrained(tiny, subfolder="image_encoder").eval()
    fx = CLIPImageProcessor.from_pretrained(tiny, subfolder="feature_extractor")
    frames = rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    embed = clip_embedder(enc, fx)
    ms = 1000 * timed(lambda: score_video(frames, frames[0], embed), args.repeats)
    print(f"all three scores, tiny model's encoder (CPU, 9 images): {ms:.2f} ms median")

    if args.vit_h:
        from transformers import CLIPVisionConfig

        cfg = CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu")
        big = CLIPVisionModelWithProjection(cfg).eval()
        macs = vit_h_macs()
        print(f"ViT-H/14: {sum(p.numel() for p in big.parameters()) / 1e6:.0f} M parameters, "
              f"{macs / 1e9:.0f} GMAC ({2 * macs / 1e9:.0f} GFLOP) per image, {9 * 2 * macs / 1e12:.2f} TFLOP per video")
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            s = timed(lambda: big(x), 2)
        print(f"ViT-H/14 on this CPU, 1 image: {s:.2f} s ({2 * macs / s / 1e9:.0f} GFLOP/s)")
        if torch.cuda.is_available():
            big = big.half().cuda()
            x = torch.randn(9, 3, 224, 224, dtype=torch.float16, device="cuda")

            def run():
                with torch.inference_mode():
                    big(x)
                torch.cuda.synchronize()

            print(f"ViT-H/14 on {torch.cuda.get_device_name()}, fp16, 9 images: {1000 * timed(run, args.repeats):.2f} ms")


if __name__ == "__main__":
    main()
