"""`svd-batch [hydra overrides]`: the command line, a thin shell over ``runner.run``."""

from __future__ import annotations

import os
import sys
from importlib import resources

import hydra
from omegaconf import DictConfig, OmegaConf


def _pkgdata(relpath: str) -> str:
    return str(resources.files("svd_batch").joinpath("data", relpath))


def _stem(path: str) -> str:
    base = os.path.basename(str(path).rstrip("/*")) or "manifest"
    return os.path.splitext(base)[0]


def register_resolvers() -> None:
    for name, fn in (("pkgdata", _pkgdata), ("stem", _stem)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


_started = False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    global _started
    from .runner import run

    _started = True
    code = run(cfg)
    sys.exit(code)


MULTIRUN_REFUSED = (
    "svd-batch: Hydra multirun ({flag}) is not supported, and nothing was run. Hydra would run the jobs one "
    "after another in one process (the first one's exit ends the rest) and leave multirun/<date>/ folders; a "
    "sweep here is one manifest instead, with one row per combination, run in a single job that resumes and "
    "spreads over every GPU: build it with `svd-batch-manifest <images folder, CSV or JSONL> -o sweep.parquet --sweep column=v1,v2` (see svd-batch-manifest --help), "
    "then run `svd-batch manifest.path=<that file>`. To run separate configurations, start svd-batch once "
    "per configuration, each with its own output.dir=..."
)


def multirun_flag(argv: list[str]) -> str | None:
    """The argument that asks Hydra for a multirun, if any."""
    for a in argv:
        if a in ("-m", "--multirun"):
            return a
        if a.replace(" ", "").lower() in ("hydra.mode=multirun", "+hydra.mode=multirun", "++hydra.mode=multirun"):
            return a
    return None


def main() -> None:
    # Refused before Hydra sees it: by then Hydra has already made its multirun/<date> folder.
    flag = multirun_flag(sys.argv[1:])
    if flag is not None:
        sweeps = [f"--sweep {a.split('=', 1)[0][len('generation.'):]}={a.split('=', 1)[1]}"
                  for a in sys.argv[1:] if a.startswith("generation.") and "=" in a and "," in a]
        hint = f" For this command: svd-batch-manifest <images folder, CSV or JSONL> -o sweep.parquet {' '.join(sweeps)}." if sweeps else ""
        print(MULTIRUN_REFUSED.format(flag=flag) + hint, file=sys.stderr)
        sys.exit(2)
    try:
        _main()
    except SystemExit as exc:
        # Hydra reports a bad override or config with exit 1, which here means "some rows failed".
        # Nothing has run yet in that case: it is a usage error, exit 2.
        if exc.code == 1 and not _started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
