"""`svd-batch-status <output.dir>`: where a run stands (status.py). Read-only."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..rundir import STATE, RunDirError
from ..status import collect, render


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-status", description="Whether an svd-batch run is running, stopped "
                                 "or finished; rows done, failed and to do; the current run's rate and ETA; each "
                                 "member's state and last row. Read-only: takes no lock, writes nothing.")
    ap.add_argument("output_dir")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.output_dir, STATE)):
        print(f"svd-batch-status: {args.output_dir} is not an svd-batch output folder (no .svd-batch/ inside). "
              "Pass the output.dir of a run.", file=sys.stderr)
        sys.exit(2)
    try:
        st = collect(args.output_dir)
    except RunDirError as exc:
        print(f"svd-batch-status: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(st, indent=2) if args.json else render(st))


if __name__ == "__main__":
    main()
