"""runtime.attention: the SDPA kernel the UNet's attention tries first, and the kernels it actually ran.

SVD's three models need different kernels. The UNet's attention has heads of 64, and its cross-attention
looks at one image token (a key of length 1, which cuDNN attention refuses); the VAE's has one head of 512
(flash attention takes at most 256); the CLIP encoder's heads of 80. One backend forced on the whole pipeline
fails every row somewhere. So the requested backend goes first in torch's priority order, around the UNet's
calls only: where it cannot take a call's shapes, torch goes on to the next backend in its own order, and the
VAE and the CLIP encoder keep torch's own choice.

Which kernel ran is asked of torch (``torch._fused_sdp_choice``, the function its SDPA dispatch itself
calls) with the very tensors of each UNet attention call, under the same settings, and recorded per pass as
``cudnn`` or, when the UNet's calls differ, ``self:cudnn cross:flash``. A compiled UNet runs no Python per
call: for each input shape, its first call is also run eagerly once, and that eager call's kernels are
recorded (inductor asks torch the same question, with the same settings, when it traces the graph).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

# runtime.attention -> the torch SDPA backend the UNet tries first (auto: torch's own order, untouched).
ATTENTION = {"auto": None, "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION",
             "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
CUDA_ONLY_ATTENTION = ("cudnn", "efficient")  # torch has no CPU kernel for these
KERNEL = {backend: name for name, backend in ATTENTION.items() if backend}  # SDPBackend name -> setting name
ROLES = ("self", "cross")


def supports_priority() -> bool:
    """torch >= 2.6 takes a priority order (``sdpa_kernel(..., set_priority=True)``); older torch only an
    allowed set, inside which its own order decides, so a request could not come first."""
    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def priority(name: str) -> list | None:
    """The backends allowed around the UNet's calls, first choice first; None keeps torch's own choice."""
    backend = ATTENTION[name]
    if backend is None:
        return None
    from torch.nn.attention import SDPBackend

    first = getattr(SDPBackend, backend)
    if backend == "MATH":
        # Math runs every shape, so it needs no fallback; and on CPU torch takes flash whenever flash is allowed,
        # whatever the order.
        return [first]
    return [first, *(b for b in default_order() if b != first)]


def default_order() -> list:
    """torch's own priority order of the four kernels (it puts cuDNN first on Hopper)."""
    import torch
    from torch.nn.attention import SDPBackend

    known = {int(m.value): m for key, m in SDPBackend.__members__.items() if key in KERNEL}
    order = getattr(torch._C, "_get_sdp_priority_order", None)
    values = [int(v) for v in order()] if order else [int(SDPBackend[k].value) for k in
                                                      ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")]
    return [known[v] for v in values if v in known]


def kernel_context(order: list | None):
    if order is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(order, set_priority=True) if len(order) > 1 else sdpa_kernel(order)


def describe(kernels: dict[str, set[str]]) -> str | None:
    """{"self": {"cudnn"}, "cross": {"flash"}} -> "self:cudnn cross:flash"; one kernel throughout -> its name."""
    if not kernels:
        return None
    every = set().union(*kernels.values())
    if len(every) == 1:
        return every.pop()
    return " ".join(f"{role}:{'+'.join(sorted(kernels[role]))}" for role in ROLES if role in kernels)


def kernel_of_call(args: tuple, kwargs: dict) -> str:
    """The kernel torch's SDPA dispatch picks for these arguments under the settings in force."""
    import torch
    from torch.nn.attention import SDPBackend

    choice = getattr(torch, "_fused_sdp_choice", None)
    if choice is None:
        return "unknown"
    try:
        value = int(choice(*args, **kwargs))
    except Exception:  # noqa: BLE001 - no kernel at all: the call itself raises the real error next
        return "none"
    names = {int(m.value): KERNEL.get(key, key.lower()) for key, m in SDPBackend.__members__.items()}
    return names.get(value, str(value))


class UNetAttention:
    """The requested priority around each call of the UNet, and the kernels its attention ran in one pass.

    ``called`` is what the pipeline calls (a compiled wrapper or the UNet itself); the priority is entered in
    forward hooks on it, outside any compiled graph. Each attention processor of the UNet is wrapped to note
    its SDPA calls' kernels during one eager call per input shape (the choice depends on shapes, dtype, device
    and the order, all fixed for a shape here): noting every call cost the tiny model a few percent on CPU."""

    def __init__(self, called: Any, name: str = "auto") -> None:
        self.called = called
        self.eager = getattr(called, "_orig_mod", called)
        self.by_shape: dict[tuple, dict[str, set[str]]] = {}  # the kernels of one eager call per shape
        self.set(name)
        self.watching = False
        self.noting = False
        self._noting_shape: tuple = ()
        self.seen: dict[str, set[str]] = {}
        self._shapes: set[tuple] = set()
        self._contexts: list[Any] = []
        self.eager.set_attn_processor({key: _Watched(getattr(p, "inner", p), self)
                                       for key, p in self.eager.attn_processors.items()})
        self._handles = [called.register_forward_pre_hook(self._enter, with_kwargs=True),
                         called.register_forward_hook(self._exit, always_call=True)]

    @classmethod
    def attach(cls, pipe: Any, name: str = "auto") -> "UNetAttention | None":
        """On a real UNet; None for stand-ins without attention processors (tests' fake pipelines)."""
        import torch

        unet = getattr(pipe, "unet", None)
        eager = getattr(unet, "_orig_mod", unet)
        if not isinstance(unet, torch.nn.Module) or not hasattr(eager, "attn_processors"):
            return None
        existing = getattr(eager, "_svd_batch_attention", None)
        if existing is not None and existing.called is unet:
            existing.set(name)
            return existing
        if existing is not None:  # made for the UNet before it was compiled (or the other way round)
            existing.detach()
        router = cls(unet, name)
        eager._svd_batch_attention = router
        return router

    def set(self, name: str) -> None:
        if getattr(self, "name", name) != name:
            self.by_shape = {}  # what a compiled graph ran depends on the order it was traced under
        self.name, self.order = name, priority(name)

    def detach(self) -> None:
        """Remove the hooks and processor wrappers (before the UNet is compiled or handed to another generator)."""
        for handle in self._handles:
            handle.remove()
        self.eager.set_attn_processor({key: getattr(p, "inner", p) for key, p in self.eager.attn_processors.items()})

    @contextlib.contextmanager
    def watch(self):
        """One pass: note the UNet's kernels (read them with ``ran``)."""
        self._shapes, self.watching = set(), True
        try:
            yield
        finally:
            self.watching = False

    def ran(self) -> str | None:
        """The kernels of the last watched pass: those of each of its shapes' eager call."""
        merged: dict[str, set[str]] = {}
        for shape in self._shapes:
            for role, kernels in self.by_shape.get(shape, {}).items():
                merged.setdefault(role, set()).update(kernels)
        return describe(merged)

    def note(self, role: str, args: tuple, kwargs: dict) -> None:
        self.seen.setdefault(role, set()).add(kernel_of_call(args, kwargs))

    # -- hooks on the called UNet ---------------------------------------------------------------------------
    def _enter(self, module, args, kwargs):
        import torch

        if torch.compiler.is_compiling():
            return None
        context = kernel_context(self.order)
        context.__enter__()
        self._contexts.append(context)
        sample = args[0] if args else kwargs.get("sample")
        shape = tuple(getattr(sample, "shape", ()))
        self._shapes.add(shape)
        if self.watching and shape not in self.by_shape:
            self.seen = {}
            if self.eager is module:
                self.noting, self._noting_shape = True, shape  # _exit files this call's kernels under its shape
            else:
                # Compiled: run this call once eagerly with the same inputs and settings to see its kernels.
                self.noting = True
                try:
                    self.eager(*args, **kwargs)
                    self.by_shape[shape] = self.seen
                finally:
                    self.noting = False
        return None

    def _exit(self, module, args, output):
        import torch

        if torch.compiler.is_compiling() or not self._contexts:
            return None
        if self.noting:
            self.noting = False
            self.by_shape[self._noting_shape] = self.seen
        self._contexts.pop().__exit__(None, None, None)
        return None


class _Watched:
    """An attention module's own processor; while a pass is watched, each SDPA call's kernel is noted."""

    def __init__(self, inner: Any, owner: UNetAttention) -> None:
        self.inner, self.owner = inner, owner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        import torch

        if torch.compiler.is_compiling() or not self.owner.noting:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with _note_sdpa()(self.owner, "cross" if encoder_hidden_states is not None else "self"):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


@functools.cache
def _note_sdpa():
    from torch.overrides import TorchFunctionMode

    class NoteSdpa(TorchFunctionMode):
        """Active only inside one attention processor call, on this thread: sees its SDPA call."""

        def __init__(self, owner: UNetAttention, role: str) -> None:
            super().__init__()
            self.owner, self.role = owner, role

        def __torch_function__(self, func, types, args=(), kwargs=None):
            import torch.nn.functional as F

            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                self.owner.note(self.role, args, kwargs)
            return func(*args, **kwargs)

    return NoteSdpa
