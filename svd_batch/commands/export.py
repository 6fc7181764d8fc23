"""`svd-batch-export RUN_DIR --to DEST --format webdataset|parquet` (export.py). Exit codes as a run's: 0 every ok
row is at DEST, 1 some ok rows could not be read (named), 2 usage, 4 the destination folder cannot take files,
5 the destination store fails or refuses access, 128+signal when stopped (run it again to continue)."""

from __future__ import annotations

import argparse
import re
import signal
import sys

from ..export import Stopped, export
from ..export_store import ExportError
from ..util import human_bytes

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def byte_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 500MB, 2GiB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _named(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="svd-batch-export",
        description="Pack a run's finished (ok) rows into WebDataset tar shards (per sample <key>.mp4, <key>.json, "
        "<key>.jpg; a Parquet sidecar per shard) or Parquet shards that Hugging Face datasets reads (Video and "
        "Image features), in a local folder or any fsspec URL. Run it again after more rows finish: it adds shards "
        "for the new rows and leaves the earlier ones as they are.",
        epilog="Exit codes: 0 every ok row exported; 1 some ok rows could not be read (named); 2 usage error; 4 the "
        "destination folder cannot take files; 5 the destination store fails or refuses access; 130/143/138 "
        "stopped by a signal (run the same command again to continue).")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="the run's output.dir")
    ap.add_argument("--to", required=True, metavar="DEST", help="a folder, or a URL: s3://bucket/prefix, gs://..., ...")
    ap.add_argument("--format", default="webdataset", choices=("webdataset", "parquet"))
    ap.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    ap.add_argument("--shard-bytes", type=byte_size, default=None,
                    help="cap on a shard's size, e.g. 1GiB (default 2GiB for webdataset, 500MB for parquet)")
    ap.add_argument("--tmp-dir", default=None, help="where shards for a store are assembled before the upload "
                    "(default: the system's temporary folder; needs room for one shard)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    caught: list[int] = []

    def on_signal(signum, frame) -> None:  # noqa: ARG001
        if caught:  # a second signal: stop at once (the shard in hand is dropped all the same)
            raise KeyboardInterrupt
        caught.append(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    try:
        s = export(args.run_dir, args.to, args.format, shard_size=args.shard_size, shard_bytes=args.shard_bytes,
                   tmp_dir=args.tmp_dir, progress=False if args.no_progress else None, stopped=lambda: bool(caught))
    except ExportError as exc:
        print(f"svd-batch-export: {exc}", file=sys.stderr)
        sys.exit(exc.code)
    except (Stopped, KeyboardInterrupt):
        sig = caught[0] if caught else signal.SIGINT
        print(f"svd-batch-export: interrupted ({signal.Signals(sig).name}); the shard in hand was dropped and every "
              "shard already written stays. Run the same command again to continue.", file=sys.stderr)
        sys.exit(128 + int(sig))
    rate = s.samples / s.seconds if s.seconds > 0 else 0.0
    print(f"svd-batch-export: {s.shards} new shard(s), {s.samples} samples, {human_bytes(s.bytes)} written to "
          f"{args.to} in {s.seconds:.1f} s ({rate:.1f} samples/s); it now holds {s.total_shards} shard(s), "
          f"{s.total_samples} samples ({args.format})")
    if s.changed:
        print(f"svd-batch-export: warning: {len(s.changed)} row(s) exported earlier have a remade video since "
              f"(another frames_sha256 or file): {_named(s.changed)}. Their earlier video stays in its shard and they "
              "are not exported twice; export to a new --to for a set with the new videos.", file=sys.stderr)
    if s.missing:
        print(f"svd-batch-export: {len(s.missing)} ok row(s) were not exported because their video (results' "
              f"video_path) could not be read: {_named(s.missing)}. Restore the files (or make those rows again in "
              "a new output.dir), then run the same command again: it adds them.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
