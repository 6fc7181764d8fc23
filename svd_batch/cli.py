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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    from .runner import run

    code = run(cfg)
    sys.exit(code)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
