"""`svd-batch-verify <output.dir> --sample 5`: regenerate finished rows and compare their frames (verify.py)."""

from __future__ import annotations

import argparse
import os
import sys

from ..verify import __doc__ as DOC, verify


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-verify", description=DOC.split("\n\n")[0])
    ap.add_argument("output_dir")
    ap.add_argument("--sample", type=int, default=5, help="how many finished rows to regenerate")
    ap.add_argument("--seed", type=int, default=0, help="which sample (the same seed picks the same rows)")
    ap.add_argument("--ids", default=None, help="comma-separated ids to check instead of a sample")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.output_dir, "results.parquet")):
        sys.exit(f"svd-batch-verify: {args.output_dir} has no results.parquet: run svd-batch there first")
    matches, n, lines = verify(args.output_dir, args.sample, args.seed, args.ids.split(",") if args.ids else None)
    print("\n".join(lines))
    print(f"svd-batch-verify: {matches} of {n} sampled rows match their recorded frames_sha256")
    sys.exit(0 if matches == n else 1)


if __name__ == "__main__":
    main()
