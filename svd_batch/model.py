"""Where a run's model comes from and what it can run with: the checkpoint (built-in tiny, a local folder, the
Hugging Face cache or the Hub), its identity (what resume compares), the device, the dtype, the settings that
cannot work together (checked once, before the run folder is touched), and torch.compile of its models."""

from __future__ import annotations

import os

from .attention import ATTENTION, CUDA_ONLY_ATTENTION, supports_priority
from .samplers import ANIMATELCM_MAX_STEPS
from .settings import ModelSettings, RunSettings, RuntimeSettings
from .util import first_line


class ModelUnavailable(Exception):
    """The model's weights cannot be found or fetched: stop before any work (exit code 2)."""


class SettingRefused(ModelUnavailable):
    """The model cannot be loaded with these settings. A ModelUnavailable, so that every caller that stops
    before any work on an unloadable model (exit code 2) stops on this too."""


def resolve_model_path(path: str, variant: str | None = None, name: str | None = None) -> str:
    """A local diffusers-format folder for ``model.path``: built-in, local, Hugging Face cache, or the Hub."""
    if path == "builtin:tiny":
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.exists(os.path.join(expanded, "model_index.json")):
            raise ModelUnavailable(
                f"model.path={path} is a folder but not a diffusers pipeline (no model_index.json). Point "
                "model.path at the folder that `save_pretrained` or `huggingface-cli download` produced."
            )
        return expanded
    if expanded.startswith(("/", ".", "~")) or os.sep in expanded.strip("/").replace("/", "", 1):
        raise ModelUnavailable(f"model.path={path} does not exist. Point model.path at a local diffusers folder.")

    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"] if variant is None else ["*.json", "*.txt", f"*.{variant}.safetensors"]
    try:
        return snapshot_download(path, local_files_only=True, allow_patterns=patterns)
    except Exception:  # noqa: BLE001 - not in the cache: try the Hub below
        pass
    try:
        return snapshot_download(path, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        include = f" --include '*.{variant}.safetensors' --include '*.json' --include '*.txt'" if variant else ""
        hint = (
            " It is gated: accept its licence on https://huggingface.co/" + path + " and log in with "
            "`hf auth login` first."
            if "1-1" in path else ""
        )
        raise ModelUnavailable(
            f"The weights of model {name or path} ({path}) are not in the local Hugging Face cache and could not "
            f"be fetched from the Hub ({type(exc).__name__}: {first_line(exc, 200)})."
            f"{hint} Fetch them on a machine with internet access with `hf download {path}"
            f"{include}` (older huggingface_hub: `huggingface-cli download`; the cache is $HF_HOME, default "
            "~/.cache/huggingface, and can be copied to the nodes), or point model.path "
            "at a local diffusers-format folder. Nothing was run."
        ) from None


def model_path(model: ModelSettings) -> str:
    """model.path as a local diffusers folder (built-in, local, Hugging Face cache, or the Hub)."""
    return resolve_model_path(model.path, model.variant, model.name)


def unet_weights_path(model: ModelSettings) -> str | None:
    """model.unet_weights as a local file: a path, or ``owner/repo/file`` on the Hub (the Hugging Face cache
    first, then a download); None when the checkpoint's own UNet runs."""
    spec = model.unet_weights
    if spec is None:
        return None
    expanded = os.path.expanduser(spec)
    if os.path.isfile(expanded):
        return expanded
    if os.path.isdir(expanded):
        raise ModelUnavailable(f"model.unet_weights={spec} is a folder. Name the .safetensors file that holds the "
                               "UNet's state dict. Nothing was run.")
    parts = spec.split("/")
    if expanded.startswith(("/", ".", "~")) or len(parts) < 3 or "" in parts:
        raise ModelUnavailable(
            f"model.unet_weights={spec} does not exist. Give a local .safetensors file, or a file on the Hugging "
            "Face Hub as owner/repo/file.safetensors (e.g. "
            "wangfuyun/AnimateLCM-SVD-xt/AnimateLCM-SVD-xt.safetensors). Nothing was run.")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: try the Hub below
        pass
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing to the user
        raise ModelUnavailable(
            f"model.unet_weights={spec} is not a local file, is not in the local Hugging Face cache, and could not be "
            f"fetched from the Hub as file {filename} of {repo} ({type(exc).__name__}: {first_line(exc, 200)}). "
            f"Fetch it on a machine with internet access with `hf download {repo} {filename}` (older "
            "huggingface_hub: `huggingface-cli download`; the cache is $HF_HOME, default ~/.cache/huggingface, and "
            "can be copied to the nodes), or give model.unet_weights as a local file. Nothing was run."
        ) from None


def _listed(keys: list[str], what: str, more: str = "") -> str:
    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    return f"{len(keys)} {what}{more} ({shown})"


Shapes = dict[str, tuple[int, ...]]


def unet_weights_problems(file_shapes: Shapes, unet_shapes: Shapes) -> str | None:
    """What ``unet.load_state_dict(file, strict=True)`` would refuse, in words: missing keys, unexpected keys,
    shapes that differ (a few of each, with their number); None when it would load."""
    missing = sorted(set(unet_shapes) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(unet_shapes))
    shapes = sorted(k for k in set(file_shapes) & set(unet_shapes) if tuple(file_shapes[k]) != tuple(unet_shapes[k]))
    parts = []
    if missing:
        parts.append(_listed(missing, "missing key" + "s" * (len(missing) != 1)))
    if unexpected:
        parts.append(_listed(unexpected, "unexpected key" + "s" * (len(unexpected) != 1)))
    if shapes:
        parts.append(_listed([f"{k} {list(file_shapes[k])} in the file, {list(unet_shapes[k])} in the UNet"
                              for k in shapes], "key" + "s" * (len(shapes) != 1), " of another shape"))
    return "; ".join(parts) or None


def safetensors_shapes(path: str, spec: str) -> Shapes:
    """Each tensor's shape in a .safetensors file, read from its header (no weights read)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, the file is not one we can load
        raise SettingRefused(
            f"model.unet_weights={spec} ({path}) is not a safetensors file ({type(exc).__name__}: "
            f"{first_line(exc, 200)}). Give the .safetensors file of a UNet state dict (a .bin or .ckpt file "
            "must be converted first). Nothing was run.") from None


def unet_shapes(local_path: str) -> Shapes:
    """The checkpoint's UNet state dict shapes, from its config alone (built on the meta device: no memory)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from .util import quiet_hf_logging

    quiet_hf_logging()
    config = UNetSpatioTemporalConditionModel.load_config(os.path.join(local_path, "unet"))
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel.from_config(config)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def check_unet_weights(local_path: str, weights: str | None, spec: str | None) -> None:
    """SettingRefused unless the file would load strictly into the checkpoint's UNet (before anything is written)."""
    if weights is None:
        return
    problems = unet_weights_problems(safetensors_shapes(weights, str(spec)), unet_shapes(local_path))
    if problems:
        raise SettingRefused(
            f"model.unet_weights={spec} ({weights}) does not fit the UNet of model.path={local_path}: {problems}. "
            "It must be a state dict of exactly this UNet (as `unet.load_state_dict(..., strict=True)` takes it): "
            "check that the file belongs to this base model (e.g. AnimateLCM-SVD-xt with SVD-XT). Nothing was run.")


def load_unet_weights(unet, weights: str, spec: str | None) -> None:
    """The file's state dict into ``unet``, strictly, each tensor cast to the UNet's own dtype (the run's)."""
    from safetensors.torch import load_file

    try:
        state = load_file(weights)
    except Exception as exc:  # noqa: BLE001 - checked at the start; this is a file changed since, or unreadable
        raise ModelUnavailable(f"model.unet_weights={spec} ({weights}) could not be read ({type(exc).__name__}: "
                               f"{first_line(exc, 300)}). Nothing more was run.") from None
    problems = unet_weights_problems({k: tuple(v.shape) for k, v in state.items()},
                                     {k: tuple(v.shape) for k, v in unet.state_dict().items()})
    if problems:
        raise ModelUnavailable(f"model.unet_weights={spec} ({weights}) does not fit the UNet: {problems}. "
                               "Nothing more was run.")
    unet.load_state_dict(state, strict=True)


def device_type(runtime: RuntimeSettings) -> str:
    """cuda when a GPU is visible and runtime.device allows it, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() and runtime.device != "cpu" else "cpu"


def check_settings(s: RunSettings, device_type_: str) -> None:
    """Settings that cannot work, refused (SettingRefused) before anything is written."""
    rt = s.runtime
    if rt.device == "cuda" and device_type_ != "cuda":
        raise SettingRefused("runtime.device=cuda but no CUDA device is visible. Use runtime.device=auto or cpu.")
    if rt.compile and s.memory.cpu_offload:
        raise SettingRefused(
            f"runtime.compile=true cannot be combined with memory={s.memory.mode} (model CPU offload). Offload wraps "
            "the UNet in accelerate hooks that move it between CPU and GPU on every call, which a fullgraph "
            "compile cannot trace, and the hooks are replaced after every video, which would put the eager "
            "forward back: rows would say compiled but run eager. Use memory=full (or memory.cpu_offload=false) "
            f"with runtime.compile=true, or keep memory={s.memory.mode} with runtime.compile=false. Nothing was run."
        )
    if rt.compile_vae and not rt.compile:
        raise SettingRefused(
            "runtime.compile_vae=true compiles the VAE decoder together with the UNet and needs "
            "runtime.compile=true (which also warms both up before any row is timed). Add runtime.compile=true, "
            "or drop runtime.compile_vae. Nothing was run."
        )
    check_attention(rt.attention, device_type_)
    g = s.generation
    if g.sampler == "animatelcm" and g.num_inference_steps > ANIMATELCM_MAX_STEPS:
        raise SettingRefused(
            f"generation.sampler=animatelcm takes 1 to {ANIMATELCM_MAX_STEPS} steps (AnimateLCM was distilled on "
            f"{ANIMATELCM_MAX_STEPS} timesteps; 4 is typical) and generation.num_inference_steps is "
            f"{g.num_inference_steps}. Set generation.num_inference_steps=4 (or up to {ANIMATELCM_MAX_STEPS}), or "
            "use generation.sampler=euler. Nothing was run.")


def check_attention(name: str, device_type: str) -> None:
    if name not in ATTENTION:
        raise SettingRefused(f"runtime.attention={name!r} is not a known attention backend. Use one of "
                             f"{', '.join(ATTENTION)} (auto keeps torch's own choice). Nothing was run.")
    if name in CUDA_ONLY_ATTENTION and device_type != "cuda":
        raise SettingRefused(f"runtime.attention={name} runs only on CUDA devices and this run is on "
                             f"{device_type}. Use runtime.attention=auto, flash or math there. Nothing was run.")
    if name not in ("auto", "math") and not supports_priority():
        import torch

        raise SettingRefused(f"runtime.attention={name} needs torch >= 2.6, which can put a backend first and "
                             f"fall back where it cannot take a shape; this is torch {torch.__version__}, where "
                             f"{name} alone would fail the VAE's or the UNet's cross-attention. Use "
                             "runtime.attention=auto or math, or upgrade torch. Nothing was run.")


def set_forward_chunking(unet, on: bool) -> None:
    """The SVD UNet has enable_forward_chunking() but no disable: undo what enable does, module by module."""
    if on:
        unet.enable_forward_chunking()
        return
    for module in unet.modules():
        if hasattr(module, "set_chunk_feed_forward"):
            module.set_chunk_feed_forward(chunk_size=None, dim=0)


def compile_models(pipe, backend: str, mode: str | None, compile_vae: bool = False) -> None:
    """As the diffusers guide: the UNet, fullgraph, on inductor; with runtime.compile_vae the VAE decoder too.
    Static shapes: every shape a rank runs is compiled in the warm-up, and CUDA graphs are per shape anyway."""
    import torch

    mode = mode if backend == "inductor" else None
    pipe.unet = torch.compile(pipe.unet, mode=mode, backend=backend, dynamic=False, fullgraph=True)
    if compile_vae:
        # One graph per decode chunk length (e.g. 8 and the remainder), each compiled in the warm-up. Never with
        # CUDA graphs: the pipeline calls the decoder once per chunk and concatenates the chunks afterwards, and a
        # graph's replay overwrites the output of the call before it (seen on the H200 with reduce-overhead:
        # "accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run").
        vae_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=vae_mode, backend=backend, dynamic=False,
                                         fullgraph=True)


def configure_compile(threads: int | str | None = "auto", cache_dir: str | None = None) -> None:
    """Compile workers per rank (inductor's default is one per core, per rank: 8 ranks would start 8x the
    cores) and, optionally, a compile cache shared by every rank (inductor's default, /tmp/torchinductor_$USER,
    is already shared by the ranks of one node)."""
    if threads in (None, "auto"):
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        threads = max(1, min(32, (os.cpu_count() or 1) // local))
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = int(threads)
    if cache_dir:
        cache = os.path.abspath(os.path.expanduser(str(cache_dir)))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))


def resolve_dtype(name: str | None, device_type: str):
    """model.dtype as a torch dtype: auto is float16 on CUDA and float32 on CPU."""
    import torch

    if name in (None, "auto"):
        return torch.float16 if device_type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise ValueError(f"model.dtype={name!r}: use auto, float32, float16 or bfloat16") from None
