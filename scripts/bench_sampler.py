"""The fast path's pipeline time on CPU: a 4-step unguided animatelcm row against a 25-step guided euler row.

    .venv/bin/python scripts/bench_sampler.py [--repeats 5] [--height 96 --width 128 --frames 14] [--threads 1]

The tiny model (random weights, SVD's architecture at a small size), two Generators loaded as svd-batch loads
them (generation.sampler=euler and =animatelcm), the same image and size. Each repeat times one row of each,
interleaved so that machine drift hits both alike: Generator.run, the whole pipeline call (CLIP, VAE encode,
the UNet steps, VAE decode, uint8 frames on the host). Medians, and their ratio. UNet passes: 25 steps x 2
(guidance) = 50 against 4; what is left of the ratio is the fixed cost of a video (encode and decode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import svd_batch  # noqa: F401
except ImportError:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

ROWS = {  # sampler -> the row's own values (the rest: bench defaults below)
    "euler": {"num_inference_steps": 25, "min_guidance_scale": 1.0, "max_guidance_scale": 3.0},
    "animatelcm": {"num_inference_steps": 4, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--frames", type=int, default=14)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from PIL import Image

    from svd_batch.fields import Row
    from svd_batch.generate import Generator
    from svd_batch.settings import RunSettings
    from svd_batch.tiny import ensure_tiny_model

    s = RunSettings.compose("model=tiny", "runtime.device=cpu")
    path = str(ensure_tiny_model())
    gens = {name: Generator.load(path, device=torch.device("cpu"), model=s.model, memory=s.memory,
                                 runtime=s.runtime, sampler=name) for name in ROWS}
    image = Image.open(os.path.join(REPO, "svd_batch", "data", "sample", "rocket.jpg")).convert("RGB")

    def row(name: str, i: int) -> Row:
        return Row(id=f"{name}-{i}", image="rocket.jpg", image_uri="rocket.jpg", row=i, seed=i, fps=7,
                   motion_bucket_id=127, noise_aug_strength=0.02, num_frames=args.frames, height=args.height,
                   width=args.width, decode_chunk_size=8, **ROWS[name])

    for name, gen in gens.items():  # first calls (allocator, kernels) out of the timing
        [o] = gen.run([row(name, 0)], [image])
        assert o.error is None, o.error
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for i in range(1, args.repeats + 1):
        for name, gen in gens.items():
            t = time.perf_counter()
            [o] = gen.run([row(name, i)], [image])
            times[name].append(time.perf_counter() - t)
            assert o.error is None, o.error
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"tiny model, {args.height}x{args.width}, {args.frames} frames, {args.threads} thread(s), "
          f"{args.repeats} repeats (median s per row, pipeline call):")
    for name, v in times.items():
        r = ROWS[name]
        guided = "guided" if r["max_guidance_scale"] > 1 else "unguided"
        print(f"  {name:<11} {r['num_inference_steps']:>2} steps {guided:<8} {med[name]:7.3f} s   "
              f"(all: {', '.join(f'{x:.3f}' for x in v)})")
    print(f"  ratio euler / animatelcm: {med['euler'] / med['animatelcm']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
