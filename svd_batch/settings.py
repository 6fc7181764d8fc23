"""Every config value's type, checked once before a run starts.

Hydra reads ``runtime.batch_size=two`` as the string "two" and ``report.enabled=yes`` as "yes"; without
this check they fail much later, as a traceback from deep inside the run (or a pyarrow error, for a
``manifest.where`` value of the wrong type). Keys this table does not know are left alone, so a new
key never breaks older checks.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from .fields import FLOAT_FIELDS, INT_FIELDS, RULES
from .generate import ATTENTION


class SettingsError(Exception):
    """A config value of the wrong type or out of range: nothing was run (exit code 2)."""


def _int(lo: int | None = None) -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)  # noqa: E731
    return ok, "an integer" + (f" >= {lo}" if lo is not None else "")


def _number(lo: float | None = None, positive: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            return False
        return (v > 0) if positive else (lo is None or v >= lo)
    return ok, "a number" + (" > 0" if positive else f" >= {lo}" if lo is not None else "")


def _bool() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, bool)), "true or false"


def _str() -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v != ""), "a non-empty string"


def _choice(*values: Any) -> tuple[Callable[[Any], bool], str]:
    # type-exact: 1 == True in Python, but runtime.overlap=1 is not what a user of true/false meant
    return (lambda v: any(v == x and type(v) is type(x) for x in values)), \
        "one of " + ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def _nullable(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    ok, text = rule
    return (lambda v: v is None or ok(v)), text + " or null"


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, numbers.Real))


def _where_value() -> tuple[Callable[[Any], bool], str]:
    ok = lambda v: _scalar(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_scalar(x) for x in v))  # noqa: E731
    return ok, "a value, or a non-empty list of values (strings or numbers), e.g. manifest.where.split=val or 'manifest.where.split=[a,b]'"


def _generation(name: str) -> tuple[Callable[[Any], bool], str]:
    lo, hi, multiple, text = RULES[name]
    integer = name in INT_FIELDS

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else numbers.Real):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi) and (multiple is None or v % multiple == 0)
    return ok, text


SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{f"generation.{f}": _generation(f) for f in (*INT_FIELDS, *FLOAT_FIELDS)},
    "output.dir": _str(),
    "video.codec": _str(), "video.pix_fmt": _str(), "video.preset": _str(), "video.crf": _int(0),
    "runtime.device": _choice("auto", "cpu", "cuda"),
    "runtime.batch_size": _int(1),
    "runtime.overlap": _nullable(_choice("auto", True, False)),
    "runtime.prefetch_batches": _int(1),
    "runtime.compile": _bool(),
    "runtime.compile_vae": _bool(),
    "runtime.compile_mode": _nullable(_str()),
    "runtime.compile_backend": _str(),
    "runtime.threads": _nullable(_int(1)),
    "runtime.progress": _bool(),
    "runtime.results_chunk_rows": _int(1),
    "runtime.schedule": _choice("claim", "static"),
    "runtime.max_same_failures": _int(0),
    "runtime.max_row_bytes": _nullable(_int(1)),
    "runtime.attention": _nullable(_choice(*ATTENTION)),
    "runtime.compile_threads": (lambda v: v is None or v == "auto" or (type(v) is int and v >= 1),
                                "auto or an integer >= 1"),
    "runtime.compile_cache_dir": _nullable(_str()),
    "output.lock": _bool(),
    "runtime.dist_timeout_minutes": _number(positive=True),
    "runtime.lease_seconds": _number(positive=True),
    "runtime.heartbeat_seconds": _number(positive=True),
    "runtime.grace_seconds": _number(lo=0),
    "images.timeout": _number(positive=True),
    "images.max_bytes": _int(1),
    "images.max_pixels": _nullable(_int(1)),
    "images.outage_failures": _int(0),
    "images.outage_wait": _number(0),
    "report.enabled": _bool(), "report.page_size": _int(1), "report.contact_sheet_rows": _int(0),
    "report.scores": _bool(),
    "manifest.path": _str(),
    "manifest.image_root": _nullable(_str()),
    "manifest.limit": _nullable(_int(0)),
    "model.name": _str(), "model.path": _str(), "model.variant": _nullable(_str()),
    "model.dtype": _choice("auto", "float16", "bfloat16", "float32"),
    "memory.cpu_offload": _bool(), "memory.forward_chunking": _bool(),
    "memory.max_decode_chunk_size": _nullable(_int(1)),
    "dry_run": _bool(), "resume": _bool(), "overwrite": _bool(), "retry_failed": _bool(),
}
MAPPINGS = ("manifest.columns", "manifest.defaults", "manifest.where")


def _get(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False, None
        node = node[part]
    return True, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _problem(key: str, value: Any, allowed: str, fix: str | None = None) -> str:
    fix = fix or f"set it on the command line as {key}=<value> (or in your config file)"
    return f"{key} = {value!r} ({type(value).__name__}); allowed: {allowed}. Fix: {fix}"


def check(cfg: DictConfig) -> None:
    """Raise SettingsError naming every config value of the wrong type, before anything runs."""
    problems = []
    for key, (ok, allowed) in SCHEMA.items():
        present, value = _get(cfg, key)
        if present and not ok(value):
            problems.append(_problem(key, value, allowed))
    for key in MAPPINGS:
        present, value = _get(cfg, key)
        if not present or value is None:
            continue
        if not isinstance(value, dict):
            problems.append(_problem(key, value, "a mapping of column -> value, e.g. {split: val}",
                                     f"give single entries as {key}.<column>=<value>"))
            continue
        for col, v in value.items():
            if key == "manifest.where":
                ok, allowed = _where_value()
            elif key == "manifest.columns":
                ok, allowed = _str()
                allowed = "a column name of your manifest (a non-empty string)"
            elif col in RULES:
                ok, allowed = _generation(col)
            else:
                problems.append(_problem(f"{key}.{col}", v, "a generation column: " + ", ".join(RULES),
                                         f"remove {key}.{col}, or name a generation column"))
                continue
            if not ok(v):
                problems.append(_problem(f"{key}.{col}", v, allowed))
    if problems:
        n = len(problems)
        raise SettingsError(
            f"{n} config value{'s are' if n != 1 else ' is'} of the wrong type or out of range, so nothing was run: "
            + "; ".join(problems) + ". Values come from the command line (key=value), your config files and the "
            "presets; `svd-batch --help` lists every key with its default."
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What a rank's worker needs from the config, typed once at the runner (below it, nothing reads a
    DictConfig). Built after ``check``, so the conversions here cannot fail on a user's value."""

    batch_size: int = 1
    overlap: bool | None = None          # None: auto (on for CUDA, off for CPU)
    results_chunk_rows: int = 1024
    compile: bool = False
    max_same_failures: int = 0           # 0: off
    base_seed: int = 0                   # generation.seed, for rows without a seed of their own
    model_name: str = ""
    scores: bool = True
    image_timeout: float = 30.0
    image_max_bytes: int = 64 << 20
    image_max_pixels: int | None = None
    max_row_bytes: int | None = None     # runtime.max_row_bytes: also bounds decoding one image
    outage_failures: int = 5             # rows in a row failing for their source's sake before it is retried; 0: off
    outage_wait: float = 120.0           # seconds of retrying a source that is down before the run stops
    video_crf: int = 18
    video_codec: str = "libx264"
    video_pix_fmt: str = "yuv420p"
    video_preset: str = "medium"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "WorkerSettings":
        rt = cfg.runtime
        overlap = rt.get("overlap", "auto")
        max_pixels = cfg.images.get("max_pixels")
        return cls(
            batch_size=max(1, int(rt.batch_size)),
            overlap=None if overlap in ("auto", None) else bool(overlap),
            results_chunk_rows=int(rt.results_chunk_rows),
            compile=bool(rt.compile),
            max_same_failures=int(rt.get("max_same_failures", 0) or 0),
            base_seed=int(cfg.generation.seed),
            model_name=str(cfg.model.name),
            scores=bool(OmegaConf.select(cfg, "report.scores", default=True)),
            image_timeout=float(cfg.images.timeout),
            image_max_bytes=int(cfg.images.max_bytes),
            image_max_pixels=None if max_pixels is None else int(max_pixels),
            max_row_bytes=None if rt.get("max_row_bytes") is None else int(rt.max_row_bytes),
            outage_failures=int(cfg.images.get("outage_failures", 5)),
            outage_wait=float(cfg.images.get("outage_wait", 120.0)),
            video_crf=int(cfg.video.crf),
            video_codec=str(cfg.video.codec),
            video_pix_fmt=str(cfg.video.pix_fmt),
            video_preset=str(cfg.video.preset),
        )
