"""`svd-batch-verify <output.dir> --sample 5`: regenerate finished rows and compare their frames (verify.py)."""

from __future__ import annotations

import argparse
import sys

from ..verify import __doc__ as DOC, VerifyError, verify


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: give the number of rows to regenerate, 1 or more")
    return n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-verify", description=DOC.split("\n\n")[0],
                                 epilog="Exit code: 0 when every checked row matches its recorded frames_sha256, 1 "
                                 "when one does not (or could not be made again), 2 when nothing could be checked as "
                                 "asked: not a folder an svd-batch run wrote, --ids naming rows that are not in it "
                                 "or did not finish ok, --sample below 1.")
    ap.add_argument("output_dir")
    ap.add_argument("--sample", type=_count, default=5, help="how many finished rows to regenerate (1 or more)")
    ap.add_argument("--seed", type=int, default=0, help="which sample (the same seed picks the same rows)")
    ap.add_argument("--ids", default=None, help="comma-separated ids of rows that finished ok, to check instead of "
                    "a sample (an id not in the run, or of a failed row, is an error)")
    ap.add_argument("--manifest", default=None, help="the run's manifest, for a results.parquet too old to record "
                    "each row's resolved image (image_uri) when the run's manifest.path was relative to another "
                    "directory")
    args = ap.parse_args(argv)
    try:
        matches, n, lines = verify(args.output_dir, args.sample, args.seed,
                                   args.ids.split(",") if args.ids is not None else None, args.manifest)
    except VerifyError as exc:
        print(f"svd-batch-verify: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))
    print(f"svd-batch-verify: {matches} of {n} sampled rows match their recorded frames_sha256")
    sys.exit(0 if matches == n else 1)


if __name__ == "__main__":
    main()
