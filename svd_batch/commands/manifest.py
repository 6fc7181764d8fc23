"""`svd-batch-manifest SOURCE -o manifest.parquet [--sweep COLUMN=V1,V2 ...]`: build a manifest (build_manifest.py)."""

from __future__ import annotations

import argparse
import sys

from ..build_manifest import __doc__ as DOC, build
from ..manifest import ManifestError


def main(argv: list[str] | None = None) -> None:
    parts = DOC.split("\n\n")
    ap = argparse.ArgumentParser(prog="svd-batch-manifest", description=parts[0],
                                 epilog=next(p for p in parts if p.startswith("Ids of a folder")).replace("``", "'")
                                 + " Exit code 2 when the rows cannot be run (each problem listed; nothing written).")
    ap.add_argument("source", help="a folder of images (searched recursively), a .csv, a .jsonl, or Parquet "
                    "(a file, glob or URL; e.g. Hugging Face shards, whose embedded images are referenced, not copied)")
    ap.add_argument("-o", "--output", default="manifest.parquet", help="the Parquet manifest to write")
    ap.add_argument("--sweep", action="append", default=[], metavar="COLUMN=V1,V2",
                    help="one row per value (repeat for a cartesian product), e.g. motion_bucket_id=60,127,180")
    ap.add_argument("--image-column", default="image",
                    help="the CSV/JSONL/Parquet column holding image paths or URLs (Parquet: or image bytes)")
    args = ap.parse_args(argv)
    try:
        n = build(args.source, args.output, args.sweep, args.image_column)
    except (ValueError, OSError) as exc:
        print(f"svd-batch-manifest: {exc}", file=sys.stderr)
        sys.exit(2)
    except ManifestError as exc:
        print(f"svd-batch-manifest: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {n} rows to {args.output}")


if __name__ == "__main__":
    main()
