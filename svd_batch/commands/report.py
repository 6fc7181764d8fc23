"""`svd-batch-report <output.dir>`: write the report (index.html and its row data, contact_sheet.png) of a
finished or interrupted run; a folder its run left unmerged is completed first (when no run holds it)."""

from __future__ import annotations

import argparse
import os
import sys

from ..report import write_report
from ..results import complete_folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="svd-batch-report", description="Write index.html (with its row data under "
                                 "report/) and contact_sheet.png for a finished or interrupted svd-batch run.")
    ap.add_argument("output_dir")
    ap.add_argument("--page-size", type=int, default=48, help="videos per page")
    ap.add_argument("--contact-rows", type=int, default=16, help="rows on the contact sheet")
    args = ap.parse_args(argv)
    if not os.path.isdir(os.path.join(args.output_dir, ".svd-batch")):
        sys.exit(f"svd-batch-report: {args.output_dir} is not an svd-batch output folder (no .svd-batch/ inside)")
    # A run whose last rank was lost left its records unmerged: merge them and write results.parquet first
    # (only when no run holds the folder), so the report shows every recorded row.
    complete_folder(args.output_dir, say=lambda msg: print(msg, file=sys.stderr))
    for path in write_report(args.output_dir, args.page_size, args.contact_rows):
        print(path)


if __name__ == "__main__":
    main()
