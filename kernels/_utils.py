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


def row_chunk_size(
    n_rows: int, vocab: int, hidden: int, device: torch.device | None = None, override: int | None = None
) -> int:
    """Rows per chunk of the [rows, V] logits block.

    GPU: a power of two >= max(256, H) rows, so the transient block stays near the size of
    the LM head it comes from (1024 x 151936 bf16 = 311 MB for Qwen2.5-0.5B) while each
    GEMM keeps an M large enough for cuBLAS to run near peak.
    CPU: about 2M logits per chunk (8 MB fp32); CPU GEMMs need no large M, and the point
    of this path is memory. ``chunk_rows`` / ``PRORANK_CHUNK_ROWS`` override both.
    """
    if override is None:
        env = os.environ.get("PRORANK_CHUNK_ROWS")
        override = int(env) if env else None
    if override is not None:
        if override < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {override}")
        return max(1, min(override, n_rows))
    if device is not None and device.type == "cuda":
        rows = 1 << max(8, int(math.ceil(math.log2(max(hidden, 1)))))
    else:
        rows = 1 << max(4, int(math.log2(max((1 << 21) // max(vocab, 1), 1))))
    return max(1, min(rows, n_rows))


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


def check_token_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    if ids.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{name} holds ids outside [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}")


def check_finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} holds non-finite values (nan or inf)")


def check_temperature(temperature: float) -> None:
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a finite positive number, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
