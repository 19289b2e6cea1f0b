"""Batch-invariant forwards: a sequence's hidden states never depend on what else is packed.

Measured on CPU (tests/test_batch_invariance.py), two kinds of operation make a token's
result depend on the rest of a packed batch:

* GEMMs over the packed token dimension (q/k/v/o projections, the MLP): the library picks
  kernel and blocking by M. They run on kernels.batch_invariant_linear (fixed row tiles on
  CPU, a fixed-block Triton matmul on CUDA).
* Transcendental element-wise ops on CPU (the MLP's SiLU, rotary cos/sin): ATen computes the
  bulk of a tensor with SIMD (SLEEF) and the remainder of each thread's chunk with scalar
  libm, which can differ by an ulp, and where a chunk ends depends on the tensor's size and
  the thread count. They run on fixed tiles of at most 32768 elements (ATen's grain size: one
  thread per tile) and a multiple of 32 (no scalar remainder), so every element takes the SIMD
  path. The rotary cos/sin come from a table computed once that way, indexed by position.

Norms reduce row by row, and varlen attention works sequence by sequence; neither depends on
the batch. CUDA element-wise kernels compute each element the same way wherever it lies.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

from prorank_fast.kernels import batch_invariant_linear

__all__ = ["batch_invariant_linears"]

_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it, ATen runs an element-wise op on one thread
_SIMD_STEP = 32  # ATen's vectorized loop takes 2 x 16 fp32 lanes at a time (AVX-512); 32 covers AVX2 too
_DYNAMIC_ROPE = ("dynamic", "longrope")  # inv_freq changes with the sequence length: no fixed table


def _tile_rows(width: int) -> int:
    """Rows per element-wise tile: rows * width <= _GRAIN and a multiple of _SIMD_STEP."""
    for rows in range(max(_GRAIN // max(width, 1), 1), 0, -1):
        if rows * width % _SIMD_STEP == 0 and rows * width <= _GRAIN:
            return rows
    raise ValueError(
        f"batch_invariant=True: a row of {width} elements cannot be tiled into SIMD-only chunks of at most "
        f"{_GRAIN} elements; pass batch_invariant=False"
    )


def _on_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    tile = _tile_rows(width)
    m = rows.shape[0]
    pad = -m % tile
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, width)])
    out = torch.cat([fn(rows[i : i + tile]) for i in range(0, rows.shape[0], tile)])
    return out[:m].reshape(*x.shape[:-1], out.shape[-1])


def _linear_forward(module: torch.nn.Linear):
    return lambda x: batch_invariant_linear(x, module.weight, module.bias)


def _activation_forward(module: torch.nn.Module):
    original = type(module).forward

    def forward(x):
        if x.device.type != "cpu":
            return original(module, x)
        return _on_tiles(lambda t: original(module, t), x)

    return forward


# rotary module -> {(device, dtype): (cos, sin)}: built once per model, not once per call
_ROPE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rotary_forward(module: torch.nn.Module, max_positions: int):
    original = type(module).forward
    tables = _ROPE_TABLES.setdefault(module, {})

    def forward(x, position_ids):
        if x.device.type != "cpu":
            return original(module, x, position_ids)
        key = (x.device, x.dtype)
        if key not in tables:
            dim = original(module, x, torch.zeros(1, 1, dtype=torch.long, device=x.device))[0].shape[-1]
            tile = _tile_rows(dim)
            total = -(-max_positions // tile) * tile
            parts = [
                original(module, x, torch.arange(i, i + tile, device=x.device)[None]) for i in range(0, total, tile)
            ]
            tables[key] = (torch.cat([c[0] for c, _ in parts]), torch.cat([s[0] for _, s in parts]))
        cos, sin = tables[key]
        if position_ids.numel() and int(position_ids.max()) >= cos.shape[0]:
            raise ValueError(f"batch_invariant=True: position {int(position_ids.max())} beyond the model's table")
        return cos[position_ids], sin[position_ids]

    return forward


def _max_positions(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 32768)


@contextlib.contextmanager
def batch_invariant_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s forward is batch-invariant: every ``torch.nn.Linear``, every
    MLP activation (``act_fn``) and the rotary embedding run as described in the module docstring.

    Raises:
        ValueError: naming ``batch_invariant`` when the model cannot be made invariant: no
            ``torch.nn.Linear`` (e.g. GPT-2's Conv1D or a quantized layer), or a rotary embedding
            whose frequencies change with the sequence length. A silent fallback would promise
            what it does not give.
    """
    if not enabled:
        yield
        return
    patches: list[tuple[torch.nn.Module, Callable]] = []
    max_positions = _max_positions(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            patches.append((m, _linear_forward(m)))
        elif type(m).__name__.endswith("RotaryEmbedding"):
            if str(getattr(m, "rope_type", "default")) in _DYNAMIC_ROPE:
                raise ValueError(
                    f"batch_invariant=True: {type(m).__name__} uses rope_type={m.rope_type!r}, whose frequencies "
                    "depend on the sequence length; pass batch_invariant=False"
                )
            patches.append((m, _rotary_forward(m, max_positions)))
        act = getattr(m, "act_fn", None)
        if isinstance(act, torch.nn.Module):
            patches.append((act, _activation_forward(act)))
    if not any(isinstance(m, torch.nn.Linear) for m, _ in patches):
        raise ValueError(
            f"batch_invariant=True: {type(model).__name__} has no torch.nn.Linear layers, so its token-wise "
            "projections cannot be made batch-invariant; pass batch_invariant=False"
        )
    saved = []
    for m, forward in patches:
        saved.append((m, m.__dict__.get("forward")))  # an instance-level forward (e.g. a hook) is restored
        m.forward = forward
    try:
        yield
    finally:
        for m, previous in reversed(saved):
            if previous is None:
                del m.forward
            else:
                m.forward = previous
