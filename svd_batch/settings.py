"""Every setting of a run: declared once here, with its type and allowed values; defaults only in conf/.

A composed config is checked against these declarations before anything runs (``check``: Hydra reads
``runtime.batch_size=two`` as the string "two"; without the check it would fail much later, deep inside the
run), then turned once into a frozen, typed ``RunSettings`` that everything below the command line takes: the
runner, the generator, the worker and the post-run tools (which read the run's saved config.yaml through
``RunSettings.load``). A key marked ``frames`` changes the videos a run makes: together they are the run's
fingerprint (``fingerprint``), which a resume compares.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from omegaconf import DictConfig, OmegaConf

from .attention import ATTENTION
from .fields import INT_FIELDS, RULES
from .samplers import SAMPLERS

Rule = tuple[Callable[[Any], bool], str]  # (accepts a value, what is allowed)

# Keys an earlier svd-batch knew and this one has no use for: still accepted on the command line, with a note
# (cli.py), so that scripts that set them keep working.
DEPRECATED = {
    "runtime.prefetch_batches": "ranks claim work as they need it, so images load for the claimed unit and at "
                                "most the next; the key has no effect and is ignored",
    "model.num_frames": "the model presets set generation.num_frames; model.num_frames was never read",
}


class SettingsError(Exception):
    """A config value of the wrong type or out of range: nothing was run (exit code 2)."""


# -- rules ---------------------------------------------------------------------------------------------------
def _int(lo: int | None = None) -> Rule:
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)  # noqa: E731
    return ok, "an integer" + (f" >= {lo}" if lo is not None else "")


def _number(lo: float | None = None, positive: bool = False) -> Rule:
    def ok(v: Any) -> bool:
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            return False
        return (v > 0) if positive else (lo is None or v >= lo)
    return ok, "a number" + (" > 0" if positive else f" >= {lo}" if lo is not None else "")


def _bool() -> Rule:
    return (lambda v: isinstance(v, bool)), "true or false"


def _str() -> Rule:
    return (lambda v: isinstance(v, str) and v != ""), "a non-empty string"


def _choice(*values: Any) -> Rule:
    # type-exact: 1 == True in Python, but runtime.overlap=1 is not what a user of true/false meant
    return (lambda v: any(v == x and type(v) is type(x) for x in values)), \
        "one of " + ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in values)


def _nullable(rule: Rule) -> Rule:
    ok, text = rule
    return (lambda v: v is None or ok(v)), text + " or null"


def _generation(name: str) -> Rule:
    lo, hi, multiple, text = RULES[name]
    integer = name in INT_FIELDS

    def ok(v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, int if integer else numbers.Real):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi) and (multiple is None or v % multiple == 0)
    return ok, text


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, numbers.Real))


def _where_value() -> Rule:
    ok = lambda v: _scalar(v) or (isinstance(v, (list, tuple)) and len(v) > 0 and all(_scalar(x) for x in v))  # noqa: E731
    return ok, ("a value, or a non-empty list of values (strings or numbers), e.g. manifest.where.split=val or "
                "'+manifest.where.split=[a,b]'")


def _mapping(what: str) -> Rule:
    """A mapping keyed by the user's column names (each entry's rule: _ENTRIES below)."""
    return (lambda v: isinstance(v, Mapping)), what


def key(rule: Rule, frames: bool = False) -> Any:
    """A declared config key: its rule, and whether its value changes the videos (the fingerprint)."""
    return field(metadata={"rule": rule, "frames": frames})


# -- the declarations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSettings:
    name: str = key(_str())
    path: str = key(_str(), frames=True)
    variant: str | None = key(_nullable(_str()), frames=True)
    unet_weights: str | None = key(_nullable(_str()), frames=True)  # its content's sha256 is in the fingerprint too
    dtype: str = key(_choice("auto", "float16", "bfloat16", "float32"))  # the fingerprint holds it resolved


@dataclass(frozen=True)
class GenerationSettings:
    """The defaults of every generation field (a row's own cell and manifest.defaults come first)."""

    seed: int = key(_generation("seed"), frames=True)
    fps: int = key(_generation("fps"), frames=True)
    motion_bucket_id: int = key(_generation("motion_bucket_id"), frames=True)
    num_frames: int = key(_generation("num_frames"), frames=True)
    num_inference_steps: int = key(_generation("num_inference_steps"), frames=True)
    height: int = key(_generation("height"), frames=True)
    width: int = key(_generation("width"), frames=True)
    decode_chunk_size: int = key(_generation("decode_chunk_size"), frames=True)
    noise_aug_strength: float = key(_generation("noise_aug_strength"), frames=True)
    min_guidance_scale: float = key(_generation("min_guidance_scale"), frames=True)
    max_guidance_scale: float = key(_generation("max_guidance_scale"), frames=True)
    # The whole run's sampler (not a row's column): samplers.py.
    sampler: str = key(_choice(*SAMPLERS), frames=True)


@dataclass(frozen=True)
class ManifestSettings:
    path: str = key(_str())
    name: str | None = key(_nullable(_str()))
    image_root: str | None = key(_nullable(_str()))
    limit: int | None = key(_nullable(_int(0)))
    columns: Mapping[str, str] = key(_mapping("a mapping of our column -> yours"))
    defaults: Mapping[str, Any] = key(_mapping("a mapping of generation column -> value"), frames=True)
    where: Mapping[str, Any] = key(_mapping("a mapping of column -> value"))


@dataclass(frozen=True)
class MemorySettings:
    mode: str = key(_str())
    cpu_offload: bool = key(_bool())
    forward_chunking: bool = key(_bool())
    max_decode_chunk_size: int | None = key(_nullable(_int(1)), frames=True)


@dataclass(frozen=True)
class RuntimeSettings:
    device: str = key(_choice("auto", "cpu", "cuda"))
    batch_size: int = key(_int(1), frames=True)
    overlap: bool | str | None = key(_nullable(_choice("auto", True, False)))
    compile: bool = key(_bool())  # in the fingerprint as backend:mode (fingerprint below)
    compile_mode: str | None = key(_nullable(_str()))
    compile_backend: str = key(_str())
    compile_threads: int | str | None = key((lambda v: v is None or v == "auto" or (type(v) is int and v >= 1),
                                             "auto or an integer >= 1"))
    compile_cache_dir: str | None = key(_nullable(_str()))
    compile_vae: bool = key(_bool())
    attention: str = key(_choice(*ATTENTION), frames=True)
    threads: int | None = key(_nullable(_int(1)))
    progress: bool = key(_bool())
    results_chunk_rows: int = key(_int(1))
    schedule: str = key(_choice("claim", "static"))
    max_same_failures: int = key(_int(0))
    max_row_bytes: int | None = key(_nullable(_int(1)))
    dist_timeout_minutes: float = key(_number(positive=True))
    lease_seconds: float = key(_number(positive=True))
    heartbeat_seconds: float = key(_number(positive=True))
    grace_seconds: float = key(_number(lo=0))
    writers: int | str = key((lambda v: v == "auto" or (type(v) is int and v >= 1), "auto or an integer >= 1"))
    write_queue: int | str = key((lambda v: v == "auto" or (type(v) is int and v >= 1), "auto or an integer >= 1"))

    @property
    def overlap_setting(self) -> bool | None:
        """None: auto (on for CUDA, off for CPU)."""
        return None if self.overlap in ("auto", None) else bool(self.overlap)

    def compile_options(self) -> dict[str, Any] | None:
        if not self.compile:
            return None
        return {"mode": self.compile_mode, "backend": self.compile_backend, "fullgraph": True}


@dataclass(frozen=True)
class ImageSettings:
    timeout: float = key(_number(positive=True))
    max_bytes: int = key(_int(1))
    max_pixels: int | None = key(_nullable(_int(1)))
    outage_failures: int = key(_int(0))
    outage_wait: float = key(_number(0))


@dataclass(frozen=True)
class VideoSettings:
    codec: str = key(_str(), frames=True)
    pix_fmt: str = key(_str(), frames=True)
    crf: int = key(_int(0), frames=True)
    preset: str = key(_str(), frames=True)


@dataclass(frozen=True)
class ReportSettings:
    enabled: bool = key(_bool())
    page_size: int = key(_int(1))
    contact_sheet_rows: int = key(_int(0))
    scores: bool = key(_bool())


@dataclass(frozen=True)
class OutputSettings:
    dir: str = key(_str())
    lock: bool = key(_bool())


SECTIONS = {"model": ModelSettings, "generation": GenerationSettings, "manifest": ManifestSettings,
            "memory": MemorySettings, "runtime": RuntimeSettings, "images": ImageSettings, "video": VideoSettings,
            "report": ReportSettings, "output": OutputSettings}
FLAGS = {"dry_run": _bool(), "resume": _bool(), "overwrite": _bool(), "retry_failed": _bool()}


@dataclass(frozen=True)
class RunSettings:
    """The whole config of a run, typed; built once from the composed (or saved) config."""

    model: ModelSettings
    generation: GenerationSettings
    manifest: ManifestSettings
    memory: MemorySettings
    runtime: RuntimeSettings
    images: ImageSettings
    video: VideoSettings
    report: ReportSettings
    output: OutputSettings
    dry_run: bool
    resume: bool
    overwrite: bool
    retry_failed: bool

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "RunSettings":
        """Check ``cfg`` (SettingsError naming every bad value), then type it."""
        check_interpolations(cfg)
        check(cfg)
        data = OmegaConf.to_container(cfg, resolve=True)
        parts: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            values = data.get(name) or {}
            parts[name] = section(**{f.name: _frozen(values.get(f.name)) for f in dataclasses.fields(section)})
        for name in FLAGS:
            parts[name] = bool(data.get(name))
        return cls(**parts)

    @classmethod
    def load(cls, root: str) -> "RunSettings | None":
        """The settings a run saved in its folder (config.yaml), keys added since filled from conf/'s defaults;
        None when the folder has none."""
        path = os.path.join(root, "config.yaml")
        if not os.path.exists(path):
            return None
        register_resolvers()  # saved resolved; a hand-edited one may still name ${pkgdata:...}
        merged = OmegaConf.merge(_package_defaults(), OmegaConf.load(path))
        # The folder read is the run's output folder, wherever it was when the run wrote it (moved, copied off a
        # cluster): and a config without output.dir would otherwise resolve the default's ${manifest.name}.
        OmegaConf.update(merged, "output.dir", os.path.abspath(root))
        return cls.from_config(merged)

    @classmethod
    def compose(cls, *overrides: str) -> "RunSettings":
        """The settings the command line would run with these overrides (Hydra's compose API, the package's
        configs): for tests, benchmarks and scripts that call the library directly."""
        return cls.from_config(compose_config(*overrides))

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.create(_plain(dataclasses.asdict(self))))


class FrozenDict(dict):
    """A read-only dict: RunSettings is frozen all the way down (its mappings too)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("settings are read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __reduce__(self):
        return FrozenDict, (dict(self),)

    def __deepcopy__(self, memo: dict) -> "FrozenDict":
        return self


def _frozen(v: Any) -> Any:
    if isinstance(v, dict):
        return FrozenDict({k: _frozen(x) for k, x in v.items()})
    if isinstance(v, list):
        return tuple(_frozen(x) for x in v)
    return v


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


def _package_defaults() -> DictConfig:
    """conf/config.yaml's own values (without its group defaults): what a key added after a run was saved is."""
    from importlib import resources

    base = OmegaConf.load(str(resources.files("svd_batch").joinpath("conf", "config.yaml")))
    for k in ("defaults", "hydra"):
        base.pop(k, None)
    return base


def compose_config(*overrides: str) -> DictConfig:
    """The composed config (what ``svd-batch`` sees) for these overrides."""
    from hydra import compose, initialize_config_module

    from . import conf  # noqa: F401 - declares the manifest's open mappings

    register_resolvers()
    with initialize_config_module("svd_batch.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def register_resolvers() -> None:
    """The resolvers config.yaml uses: ${pkgdata:...} (a file of the package) and ${stem:...} (a file's stem)."""
    from importlib import resources

    def pkgdata(relpath: str) -> str:
        return str(resources.files("svd_batch").joinpath("data", relpath))

    def stem(path: str) -> str:
        base = os.path.basename(str(path).rstrip("/*")) or "manifest"
        return os.path.splitext(base)[0]

    for name, fn in (("pkgdata", pkgdata), ("stem", stem)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


# -- the check -------------------------------------------------------------------------------------------------
def declared() -> dict[str, Rule]:
    """Every declared key ("section.name") and its rule."""
    keys = {f"{name}.{f.name}": f.metadata["rule"] for name, section in SECTIONS.items()
            for f in dataclasses.fields(section)}
    keys.update(FLAGS)
    return keys


def _get(cfg: DictConfig, dotted: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in dotted.split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False, None
        node = node[part]
    return True, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _problem(dotted: str, value: Any, allowed: str, fix: str | None = None) -> str:
    fix = fix or f"set it on the command line as {dotted}=<value> (or in your config file)"
    return f"{dotted} = {value!r} ({type(value).__name__}); allowed: {allowed}. Fix: {fix}"


_ENTRIES: dict[str, Callable[[str], Rule | None]] = {
    "manifest.columns": lambda c: ((lambda v: isinstance(v, str) and v != ""),
                                   "a column name of your manifest (a non-empty string)"),
    "manifest.defaults": lambda c: _generation(c) if c in RULES else None,
    "manifest.where": lambda c: _where_value(),
}


def check_interpolations(cfg: DictConfig) -> None:
    """Raise SettingsError naming every value whose ``${...}`` cannot be resolved ('output.dir=/x/${oops}'):
    a usage error, not a traceback from deep inside the first access."""
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    problems = []

    def walk(node: Any, prefix: str) -> None:
        raw = OmegaConf.to_container(node, resolve=False)
        for k in (list(raw) if isinstance(raw, dict) else range(len(raw))):
            try:
                child = node[k]
            except InterpolationResolutionError as exc:
                why = str(exc).splitlines()[0].strip()
                problems.append(f"{prefix}{k} = {raw[k]!r} ({why})")
                continue
            except MissingMandatoryValue:  # '???': left to the checks below, as before
                continue
            if OmegaConf.is_config(child):
                walk(child, f"{prefix}{k}.")

    walk(cfg, "")
    if problems:
        n = len(problems)
        raise SettingsError(
            f"{n} config value{'s' if n != 1 else ''} could not be resolved, so nothing was run: "
            + "; ".join(problems) + ". ${...} in a value names another config key (such as ${manifest.name}) or "
            "a resolver: fix the name, or escape a literal one as \\${...} (in single quotes in the shell)."
        )


def check(cfg: DictConfig) -> None:
    """Raise SettingsError naming every config value of the wrong type, before anything runs. A key missing from
    the config is not checked here (a saved config of an older version); its section's defaults fill it."""
    problems = []
    for dotted, (ok, allowed) in declared().items():
        present, value = _get(cfg, dotted)
        if not present or (dotted in _ENTRIES and value is None):
            continue
        if dotted in _ENTRIES:
            if not isinstance(value, dict):
                problems.append(_problem(dotted, value, "a mapping of column -> value, e.g. {split: val}",
                                         f"give single entries as {dotted}.<column>=<value>"))
                continue
            for col, v in value.items():
                rule = _ENTRIES[dotted](col)
                if rule is None:
                    problems.append(_problem(f"{dotted}.{col}", v, "a generation column: " + ", ".join(RULES),
                                             f"remove {dotted}.{col}, or name a generation column"))
                elif not rule[0](v):
                    problems.append(_problem(f"{dotted}.{col}", v, rule[1]))
        elif not ok(value):
            problems.append(_problem(dotted, value, allowed))
    if problems:
        n = len(problems)
        raise SettingsError(
            f"{n} config value{'s are' if n != 1 else ' is'} of the wrong type or out of range, so nothing was run: "
            + "; ".join(problems) + ". Values come from the command line (key=value), your config files and the "
            "presets; `svd-batch --help` lists every key with its default."
        )
