"""`svd-batch-score <output.dir>`: recompute the quality scores of a finished run from its MP4s and input images
(the same reading the run does), rewrite results.parquet, print each score's spread and lowest rows, and rewrite
the report (it shows the scores)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from ..model import model_path
from ..report import write_report
from ..results import ResultsError, read_for_rescore, rescore
from ..rundir import RunDirError
from ..scores import load_embedder, score_summary
from ..settings import RunSettings
from ..util import first_line


def rebuild_report(root: str, log: Callable[[str], None] = print) -> None:
    """The report shows the scores: write it again from the new results (with the run's report settings)."""
    s = RunSettings.load(root)
    page_size, contact_rows = (s.report.page_size, s.report.contact_sheet_rows) if s is not None else (48, 16)
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
                                 "and rewrite the report. A video that cannot be read is named in one line and "
                                 "its scores are left empty; the rest are scored. Exit code: 0 when every video "
                                 "was scored, 1 when one could not be, 2 for a usage error (no results.parquet, "
                                 "or one svd-batch did not write).")
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
    try:  # before the encoder loads: a foreign table is refused at once
        read_for_rescore(os.path.join(root, "results.parquet"))
    except ResultsError as exc:
        print(f"svd-batch-score: {exc}", file=sys.stderr)
        sys.exit(2)
    embed = None
    if not args.no_embed:
        try:
            path = args.model
            if path is None:
                s = RunSettings.load(root)
                if s is None:
                    raise FileNotFoundError("no config.yaml in the folder")
                path = model_path(s.model)
            embed = load_embedder(path, args.device)
        except Exception as exc:  # noqa: BLE001 - one message for every way the encoder is unavailable
            print(f"svd-batch-score: cannot load the image encoder for image_similarity ({type(exc).__name__}: "
                  f"{first_line(exc)}). Pass --model <diffusers folder with "
                  "image_encoder/ and feature_extractor/>, or --no-embed to compute only the pixel scores.",
                  file=sys.stderr)
            sys.exit(2)
    try:
        table, bad = rescore(root, embed)
    except RunDirError as exc:
        print(f"svd-batch-score: {exc}", file=sys.stderr)
        sys.exit(1)
    print(score_summary(table))
    if not args.no_report:
        rebuild_report(root)
    # As svd-batch does for failed rows: 1 when a video could not be scored (the others are scored and saved).
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
