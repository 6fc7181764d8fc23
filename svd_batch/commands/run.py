"""`svd-batch [hydra overrides]`: the command line, a thin shell over ``runner.run``."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from .. import conf  # noqa: F401  (declares the manifest's open mappings before Hydra composes)
from ..settings import DEPRECATED, register_resolvers

register_resolvers()


_started = False

# Libraries that log at INFO through the root logger Hydra sets up: botocore's "Found credentials in
# environment variables." on every rank, connection pools' chatter. Their warnings still show.
NOISY_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "fsspec", "urllib3", "google", "httpx",
                 "huggingface_hub", "filelock")


def quiet_library_logs() -> None:
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _main(cfg: DictConfig) -> None:
    global _started
    from ..runner import run

    _started = True
    quiet_library_logs()  # after Hydra configured logging, before any library is used
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


def _launcher_num_processes(cmdline: list[str]) -> int | None:
    """--num_processes N (or =N) on an ``accelerate launch`` command line, if given there."""
    for i, a in enumerate(cmdline):
        value = a.split("=", 1)[1] if a.startswith("--num_processes=") else (
            cmdline[i + 1] if a == "--num_processes" and i + 1 < len(cmdline) else None)
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


def _parent_cmdline() -> list[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def lone_process_warning(env: dict[str, str], parent: list[str]) -> str | None:
    """The warning for ``accelerate launch --num_processes N`` (N > 1) that started one plain process.

    Without --multi_gpu, accelerate runs its "simple" launcher on a machine with fewer than two GPUs: one
    process, no WORLD_SIZE, only MASTER_ADDR/MASTER_PORT set for the processes it did not start. The run then
    quietly does everything on one process ("to run on 1 process(es)")."""
    if int(env.get("WORLD_SIZE", "1") or 1) > 1 or "ACCELERATE_MIXED_PRECISION" not in env:
        return None  # a real world, or not started by accelerate
    if not any(a.endswith("accelerate") or a == "launch" for a in parent[:3]):
        return None
    n = _launcher_num_processes(parent)
    if n is None and "MASTER_ADDR" not in env:
        return None  # accelerate sets MASTER_ADDR in its simple launcher only when asked for more than one process
    if n is not None and n <= 1:
        return None
    asked = f"--num_processes {n}" if n else "more than one process (its config file)"
    return (f"svd-batch: warning: accelerate launch was asked for {asked} but started this one process alone (a "
            "world of 1): without --multi_gpu, accelerate runs a single process unless it sees several GPUs. "
            "This run does every row on one process. For several processes, on GPUs or on CPU (gloo), add "
            f"--multi_gpu: accelerate launch --multi_gpu --num_processes {n or 'N'} -m svd_batch ...")


def without_deprecated(argv: list[str]) -> tuple[list[str], list[str]]:
    """The overrides without the keys svd-batch no longer uses (settings.DEPRECATED), and a note for each."""
    kept, notes = [], []
    for a in argv:
        key = a.lstrip("+~").split("=", 1)[0]
        if key in DEPRECATED and "=" in a:
            notes.append(f"svd-batch: note: {key} is no longer used ({DEPRECATED[key]}); drop it from the command")
        else:
            kept.append(a)
    return kept, notes


def main() -> None:
    warning = lone_process_warning(dict(os.environ), _parent_cmdline())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    sys.argv[1:], notes = without_deprecated(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        for note in notes:
            print(note, file=sys.stderr, flush=True)
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
