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


def main() -> None:
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
