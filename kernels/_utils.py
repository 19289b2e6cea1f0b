"""Shared plumbing for the kernels: backend choice, argument checks, chunk sizing.

Nothing here is numerical: the maths lives in ``reference.py`` (the specification)
and in the op files (``grpo.py``, ``logprobs.py``, ``score.py``).
"""

from __future__ import annotations

import functools
import math
import os

import torch

IMPLS = ("auto", "triton", "torch")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when triton imports; detected once. ``PRORANK_DISABLE_TRITON=1`` forces it off."""
    if os.environ.get("PRORANK_DISABLE_TRITON", "0") == "1":
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Pick the backend: ``auto`` -> Triton on CUDA tensors, chunked PyTorch elsewhere.

    ``triton`` on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the tests).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' but triton is not importable (pip install triton)")
        if not on_cuda and not interpreting():
            raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return impl


# Transient logits allowed per call by default: the [rows, V] chunk buffer(s). 256 MiB holds 768
# rows of Qwen2.5's 151936-token vocabulary in bf16, a GEMM M that still runs near peak.
CHUNK_BYTES_CUDA = 256 << 20
# CPU: the point of the chunked path is memory, and small chunks stay in cache.
CHUNK_BYTES_CPU = 8 << 20
# On GPU, row counts are multiples of this (cuBLAS tiles), and at least this many where N allows.
GEMM_ROWS = 256
SCHEDULES = ("serial", "overlap")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def chunk_plan(
    n_rows: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
    *,
    chunk_rows: int | None = None,
    chunk_bytes: int | None = None,
    buffers: int = 1,
) -> tuple[int, int]:
    """(rows per chunk, transient bytes of the chunk buffers) for a [n_rows, V] logits sweep.

    The rows come from a byte budget (``chunk_bytes`` / ``PRORANK_CHUNK_BYTES``; default
    256 MiB on CUDA, 8 MiB elsewhere) shared by ``buffers`` chunk buffers of ``dtype``. On
    CUDA the rows are a multiple of 256 (at least 256 while N allows, even past the budget,
    so that each GEMM keeps an M near peak); elsewhere a power of two of at least 16.
    ``chunk_rows`` / ``PRORANK_CHUNK_ROWS`` fix the rows instead.
    """
    if chunk_rows is None:
        chunk_rows = _env_int("PRORANK_CHUNK_ROWS")
    if chunk_bytes is None:
        chunk_bytes = _env_int("PRORANK_CHUNK_BYTES")
    on_cuda = device is not None and device.type == "cuda"
    row_bytes = max(vocab, 1) * torch.empty((), dtype=dtype).element_size()
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        rows = chunk_rows
    else:
        budget = chunk_bytes if chunk_bytes is not None else (CHUNK_BYTES_CUDA if on_cuda else CHUNK_BYTES_CPU)
        if isinstance(budget, bool) or budget < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {budget}")
        fit = budget // (buffers * row_bytes)
        if on_cuda:
            rows = max(GEMM_ROWS, fit // GEMM_ROWS * GEMM_ROWS)
        else:
            rows = 1 << max(4, int(math.log2(max(fit, 1))))
    rows = max(1, min(rows, n_rows))
    return rows, buffers * rows * row_bytes


def resolve_schedule(schedule: str | None) -> str:
    """``serial`` (default) or ``overlap``; ``PRORANK_SCHEDULE`` sets the default."""
    if schedule is None:
        schedule = os.environ.get("PRORANK_SCHEDULE") or "serial"
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return schedule


# ---------------------------------------------------------------------------------------
# Check modes: value checks cost a host-device sync each on CUDA.
# ---------------------------------------------------------------------------------------

CHECK_MODES = ("device", "full")


def checks_mode(device: torch.device, checks: str | None = None) -> str:
    """``full``: value checks on the host with exact messages (they read the data back, a sync
    each on CUDA); ``device``: the same checks as asynchronous device-side asserts, no sync.

    ``checks`` / ``PRORANK_CHECKS`` choose; the default is ``device`` on CUDA and ``full``
    elsewhere, where reading a value costs no sync.
    """
    mode = checks if checks is not None else os.environ.get("PRORANK_CHECKS") or None
    if mode is None:
        return "device" if device.type == "cuda" else "full"
    if mode not in CHECK_MODES:
        source = "checks" if checks is not None else "PRORANK_CHECKS"
        raise ValueError(f"{source} must be one of {CHECK_MODES}, got {mode!r}")
    return mode


def device_assert(condition: torch.Tensor, message: str) -> None:
    """Assert a 0-d bool tensor without reading it back: on CUDA a failure surfaces as a
    device-side assert at a later synchronisation; on CPU it raises at once."""
    torch._assert_async(condition, message)


# ---------------------------------------------------------------------------------------
# Argument checks: every public op validates before any work, naming the argument.
# ---------------------------------------------------------------------------------------


def check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")


def check_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden [N, H], weight [V, H], bias [V] or None."""
    check_2d("hidden", hidden)
    check_2d("weight", weight)
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden and weight disagree on the hidden size: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")


def check_vector(name: str, t: torch.Tensor | None, length: int, *, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")


def check_token_ids(name: str, ids: torch.Tensor, vocab: int, mode: str = "full") -> None:
    if ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if not ids.numel():
        return
    if mode == "device":
        device_assert(((ids >= 0) & (ids < vocab)).all(), f"{name} holds ids outside [0, {vocab})")
    elif int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"{name} holds ids outside [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")


def check_finite(name: str, t: torch.Tensor | None, mode: str = "full") -> None:
    if t is None or not t.numel():
        return
    if mode == "device":
        device_assert(torch.isfinite(t).all(), f"{name} holds non-finite values (nan or inf)")
    elif not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values (nan or inf)")


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
