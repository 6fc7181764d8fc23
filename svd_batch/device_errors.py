"""What a failed pipeline pass means: the row's own problem, memory (retry cheaper), or a poisoned device.

CUDA reports most kernel faults as "sticky" errors: once one happens, every later call in the process fails
the same way, so failing row after row would only turn one broken device into thousands of failed rows.
Allocation failures inside cuBLAS and cuDNN arrive as plain RuntimeErrors, not torch.cuda.OutOfMemoryError,
yet mean the same as an OOM. Both are recognised here by their messages (torch gives no finer types).
"""

from __future__ import annotations

import socket

# Lower-case fragments of messages that mean memory ran out (the fallback ladder can help).
OOM_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "failed to allocate memory",
)

# Lower-case fragments of messages after which the device is unusable in this process.
POISON_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ecc",
    "ecc error",
    "misaligned address",
    "an illegal instruction",
    "illegal address",
    "invalid program counter",
    "hardware stack error",
    "the launch timed out",
    "uncorrectable nvlink",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cuda error: unknown error",
    "cuda error: launch failure",
    "gpu is lost",
    "fell off the bus",
)


# Errors a row's own values give on any device: Python's value and type errors, and torch's shape checks.
ROW_ERROR_TYPES = ("ValueError", "TypeError", "IndexError", "KeyError", "OverflowError", "ZeroDivisionError",
                   "NotImplementedError")
ROW_ERROR_MARKERS = (
    "size of tensor",
    "sizes of tensors",
    "shape",
    "must match",
    "expected size",
    "expected input",
    "expected more than",
    "dimension",
    "mat1 and mat2",
    "out of bounds",
)


class OutOfMemory(Exception):
    """A row ran out of memory in every mode of the fallback ladder."""


class DeviceFailure(Exception):
    """The device failed in a way that poisons it: the rank must stop rather than fail its remaining rows."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_device_poisoned(exc: BaseException) -> bool:
    """True for CUDA/cuBLAS/cuDNN errors after which the device cannot be trusted (looks through causes)."""
    return any(m in str(e).lower() for e in _chain(exc) for m in POISON_MARKERS)


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory in any form (torch's OutOfMemoryError, cuBLAS/cuDNN allocation failures),
    unless the same error also poisoned the device."""
    import torch

    if is_device_poisoned(exc):
        return False
    return any(isinstance(e, torch.cuda.OutOfMemoryError) or any(m in str(e).lower() for m in OOM_MARKERS)
               for e in _chain(exc))


def is_row_error(message: str) -> bool:
    """A recorded row error (``... generate failed: <Type>: <message>``) that the same row would give on any
    device: a shape or value the model cannot take. Memory and device errors never are."""
    text = message.lower()
    if any(m in text for m in OOM_MARKERS + POISON_MARKERS) or "out of memory in every mode" in text:
        return False
    return any(f"{t.lower()}: " in text for t in ROW_ERROR_TYPES) or any(m in text for m in ROW_ERROR_MARKERS)


def device_answers(device) -> bool:
    """Does the device still compute? A small matrix product with a known, exactly representable result (exact in
    float32 and TF32 alike), and on CUDA a synchronize, so that a failed kernel shows here."""
    try:
        import torch

        a = torch.arange(64, dtype=torch.float32, device=device).reshape(8, 8)
        got = float((a @ a.T).sum().item())
        if getattr(device, "type", "") == "cuda":
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - a broken device fails in any way at all
        return False
    return got == float(sum((224 + 8 * k) ** 2 for k in range(8)))


def device_failure(exc: BaseException, device, row_ids: list[str]) -> DeviceFailure:
    """The one-paragraph message for a poisoned device: where, which rows, what the error was, what to do."""
    from .util import first_line

    name = ""
    if getattr(device, "type", "") == "cuda":
        try:
            import torch

            name = f" ({torch.cuda.get_device_name(device)})"
        except Exception:  # noqa: BLE001 - a broken device may not even answer this
            name = ""
    rows = ", ".join(row_ids[:5]) + (", ..." if len(row_ids) > 5 else "")
    return DeviceFailure(
        f"device {device}{name} on host {socket.gethostname()} failed while generating row(s) {rows}: "
        f"{type(exc).__name__}: {first_line(exc, 300)}. After an error of this kind the device is unusable in "
        "this process, so this rank stops instead of failing its remaining rows; those rows are not recorded "
        "as failed and run again on resume. Check the device (nvidia-smi, and the kernel log for Xid errors) "
        "before rerunning; a device-side assert usually points at an input or a bug, not the hardware."
    )
