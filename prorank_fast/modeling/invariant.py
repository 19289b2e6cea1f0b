"""Batch-invariant forwards: a sequence's hidden states never depend on what else is packed.

Measured on CPU (tests/test_batch_invariance.py), two kinds of operation make a token's
result depend on the rest of a packed batch:

* GEMMs over the packed token dimension (q/k/v/o projections, the MLP): the library picks
  kernel and blocking by M. They run on kernels.batch_invariant_linear (fixed row tiles on
  CPU, a fixed-block Triton matmul on CUDA).
* Transcendental element-wise ops on CPU (the MLP's SiLU, rotary cos/sin): ATen computes the
  bulk of a tensor with SIMD (SLEEF) and the remainder of each thread's chunk with scalar
  libm, which can differ by an ulp, and where a chunk ends depends on the tensor's size and
  the thread count. The activation runs in one call at a length (zero-padded) that every
  thread's chunk divides into whole SIMD steps, so every element takes the SIMD path on all
  threads. The rotary cos/sin come from a table computed once on tiles of at most 32768
  elements (ATen's grain size: one thread per tile), a multiple of 32, indexed by position.

Norms reduce row by row, and varlen attention works sequence by sequence; neither depends on
the batch. But SDPA's CPU kernel blocks a sequence's queries and keys by its lengths, so a
document's rows round differently when its prompt runs whole or after a cached query prefix
(1.3e-5 on a 30-layer model). With ``attention=True`` (the Reranker's ``exact_shared_prefix``) CPU attention runs
`blocked_attention`: fixed query tiles and key blocks, so the two modes give the same bits.
CUDA element-wise kernels compute each element the same way wherever it lies.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch

from prorank_fast.kernels import batch_invariant_linear

from .attention import override_cpu_attention

__all__ = ["batch_invariant_linears", "blocked_attention"]

_GRAIN = 32768  # at::internal::GRAIN_SIZE: below it, ATen runs an element-wise op on one thread
_DYNAMIC_ROPE = ("dynamic", "longrope")  # inv_freq changes with the sequence length: no fixed table


def _simd_step(dtype: torch.dtype) -> int:
    """Elements per iteration of ATen's vectorized loop: two 512-bit vectors (16 fp32 or 32 bf16
    lanes each; the AVX2 loop's step divides it)."""
    return 2 * 64 // dtype.itemsize


def _tile_rows(width: int) -> int:
    """Rows per element-wise tile: rows * width <= _GRAIN and a multiple of the fp32 SIMD step (the
    rotary table computes in fp32)."""
    step = _simd_step(torch.float32)
    for rows in range(max(_GRAIN // max(width, 1), 1), 0, -1):
        if rows * width % step == 0 and rows * width <= _GRAIN:
            return rows
    raise ValueError(
        f"batch_invariant=True: a row of {width} elements cannot be tiled into SIMD-only chunks of at most "
        f"{_GRAIN} elements; pass batch_invariant=False"
    )


def _on_simd_lanes(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Element-wise fn of x in one call on all threads, at a length whose every thread's chunk is
    whole SIMD steps (zero-padded when it is not already): every element takes the SIMD path
    whatever the tensor's size and the thread count."""
    flat = x.reshape(-1)
    n = flat.numel()
    length = _simd_only_length(n, _simd_step(x.dtype))
    if length != n:
        flat = torch.cat([flat, flat.new_zeros(length - n)])
    return fn(flat)[:n].view(x.shape)


def _linear_forward(module: torch.nn.Linear):
    return lambda x: batch_invariant_linear(x, module.weight, module.bias)


def _activation_forward(module: torch.nn.Module):
    original = type(module).forward

    def forward(x):
        if x.device.type != "cpu":
            return original(module, x)
        return _on_simd_lanes(lambda t: original(module, t), x)

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


_BLOCK = 64  # query rows and keys per attention block: every score and value GEMM has one shape
_TILES_PER_STEP = 16  # query tiles per block step (speed only: tiles never interact)


def _simd_only_length(n: int, step: int) -> int:
    """The smallest length >= n that ATen's parallel loop cuts into chunks of whole SIMD steps.

    An element-wise op over a contiguous tensor runs at::parallel_for(0, numel, _GRAIN): tasks =
    min(ceil(numel / _GRAIN), threads), each a chunk of ceil(numel / tasks) elements whose
    remainder modulo the SIMD step takes the scalar path. At a length that is a multiple of
    tasks * step every chunk is whole SIMD steps, on every thread count."""
    threads = torch.get_num_threads()
    length = -(-n // step) * step
    while True:
        tasks = min(-(-length // _GRAIN), threads)
        if length % (tasks * step) == 0:
            return length
        length += step


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp with every element on ATen's SIMD (SLEEF) path, in one call on all threads."""
    flat = x.reshape(-1)
    n = flat.numel()
    length = _simd_only_length(n, _simd_step(x.dtype))
    if length != n:
        flat = torch.cat([flat, flat.new_zeros(length - n)])
    return torch.exp(flat)[:n].view(x.shape)


def _attend_tiles(
    qt: torch.Tensor,
    q_pos: torch.Tensor,
    last_key: torch.Tensor,
    seq_lk: torch.Tensor,
    seq_k0: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Online softmax of query tiles qt [Hkv, A, M, D] over their sequences' key blocks ->
    [Hkv, A, M, D]; q_pos [A, M] the rows' key positions, last_key/seq_lk/seq_k0 [A] per tile."""
    hkv, tiles, m, dim = qt.shape
    acc = qt.new_zeros(hkv, tiles, m, dim + 1)
    row_max = qt.new_full((hkv, tiles, m, 1), float("-inf"))
    cols = torch.arange(_BLOCK, device=qt.device)
    for first in range(0, int(last_key.max()) + 1, _BLOCK):
        active = torch.nonzero(last_key >= first).squeeze(1)  # tiles that see some key of this block
        every = active.numel() == tiles
        k_pos = first + cols
        # keys past a sequence's end: any row (masked below, so weighted by exactly zero)
        key_index = torch.where(k_pos < seq_lk[active, None], seq_k0[active, None] + k_pos, 0)
        visible = k_pos < seq_lk[active, None, None]
        if causal:
            visible = visible & (k_pos <= q_pos[active, :, None])  # [A, M, BLOCK]
        scores = torch.matmul(qt if every else qt[:, active], k_heads[:, key_index].transpose(-1, -2))
        scores.masked_fill_(~visible, float("-inf"))
        old_max = row_max if every else row_max[:, active]
        new_max = torch.maximum(old_max, scores.amax(-1, keepdim=True))
        values = torch.matmul(_exp(scores.sub_(new_max)), v_heads[:, key_index])  # [Hkv, A, M, D + 1]
        if first == 0:  # nothing accumulated yet (every tile sees key 0)
            step = values
        else:
            step = (acc if every else acc[:, active]) * _exp(old_max - new_max) + values
        if every:
            acc, row_max = step, new_max
        else:
            acc[:, active], row_max[:, active] = step, new_max
    return acc[..., :dim] / acc[..., dim:]


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """Attention within each packed sequence whose rounding depends on a query's own keys only.

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D], causal aligned bottom-right (as the SDPA backend).
    SDPA's CPU kernel blocks queries and keys by the sequence's lengths, so a document's query
    row rounds differently when the document runs whole or after a shared prefix (measured:
    1.3e-5 on a 30-layer model). Here every sequence is cut into tiles of ``_BLOCK`` query rows
    (zero-padded; the ``rep`` query heads of one KV head stacked, so a tile is [rep * _BLOCK, D])
    and reads its keys in blocks of ``_BLOCK`` from its first key. Every GEMM has one shape; the
    softmax is accumulated block by block (online), its denominator by the values' GEMM (a
    column of ones), exp at lengths ATen runs on SIMD only. A block a row may not see adds exactly zero
    and rescales by exactly one, so a row's result is the same whatever follows its last visible
    key: the same bits for a prompt run whole and for its document run after the cached prefix.
    Computed in fp32 (autocast off: the softmax accumulates across blocks), returned in q's dtype.
    """
    with torch.autocast(q.device.type, enabled=False):
        out = _blocked_attention_fp32(q.float(), k.float(), v.float(), cu_q, cu_k, scale, causal)
    return out.to(q.dtype)


def _blocked_attention_fp32(q, k, v, cu_q, cu_k, scale, causal) -> torch.Tensor:
    """blocked_attention on fp32 inputs with autocast off."""
    device = q.device
    hq, hkv, dim = q.shape[1], k.shape[1], q.shape[2]
    rep = hq // hkv
    scale = dim**-0.5 if scale is None else scale
    lq, lk = cu_q.diff().long(), cu_k.diff().long()
    tiles_per_seq = (lq + _BLOCK - 1) // _BLOCK
    seq = torch.repeat_interleave(torch.arange(lq.numel(), device=device), tiles_per_seq)  # tile -> sequence
    if seq.numel() == 0:
        return q.new_zeros(q.shape)
    first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
    local = torch.arange(seq.numel(), device=device) - first_tile[seq]  # tile index within its sequence
    rows = local[:, None] * _BLOCK + torch.arange(_BLOCK, device=device)  # [T, BLOCK] row within sequence
    valid = rows < lq[seq, None]
    q_index = torch.where(valid, cu_q[:-1].long()[seq, None] + rows, 0)  # padding rows: any row, dropped
    q_pos = rows + (lk - lq)[seq, None]  # key position of each row (bottom-right)
    tiles = seq.numel()
    qt = (q * scale)[q_index]  # [T, BLOCK, Hq, D]
    qt = qt.view(tiles, _BLOCK, hkv, rep, dim).permute(2, 0, 3, 1, 4).reshape(hkv, tiles, rep * _BLOCK, dim)
    # [Hkv, Tk, D] and [Hkv, Tk, D + 1]: a block gathered from them is one contiguous GEMM operand
    k_heads = k.transpose(0, 1).contiguous()
    v_heads = torch.cat([v, v.new_ones(v.shape[0], hkv, 1)], -1).transpose(0, 1).contiguous()
    seq_lk, seq_k0 = lk[seq], cu_k[:-1].long()[seq]
    # a tile's last visible key: its last row's position (causal) or the sequence's last key
    last_key = torch.minimum(q_pos[:, -1], seq_lk - 1) if causal else seq_lk - 1
    q_pos = q_pos[:, None, :].expand(tiles, rep, _BLOCK).reshape(tiles, rep * _BLOCK)
    # a few tiles at a time keep the block step's operands in cache; tiles are independent
    parts = [
        _attend_tiles(qt[:, t : t + _TILES_PER_STEP], q_pos[t : t + _TILES_PER_STEP], last_key[t : t + _TILES_PER_STEP],
                      seq_lk[t : t + _TILES_PER_STEP], seq_k0[t : t + _TILES_PER_STEP], k_heads, v_heads, causal)
        for t in range(0, tiles, _TILES_PER_STEP)
    ]  # fmt: skip
    out = torch.cat(parts, 1) if len(parts) > 1 else parts[0]  # [Hkv, T, rep * BLOCK, D]
    out = out.view(hkv, tiles, rep, _BLOCK, dim).permute(1, 3, 0, 2, 4).reshape(tiles, _BLOCK, hq, dim)
    return out[valid]


def _max_positions(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 32768)


@contextlib.contextmanager
def batch_invariant_linears(model: torch.nn.Module, enabled: bool = True, *, attention: bool = False) -> Iterator[None]:
    """Within the block, ``model``'s forward is batch-invariant: every ``torch.nn.Linear``, every
    MLP activation (``act_fn``) and the rotary embedding run as described in the module docstring.
    With ``attention``, CPU varlen attention runs on `blocked_attention` too, so that a document
    after a shared prefix gets the bits of the same prompt run whole.

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
        with override_cpu_attention(blocked_attention) if attention else contextlib.nullcontext():
            yield
    finally:
        for m, previous in reversed(saved):
            if previous is None:
                del m.forward
            else:
                m.forward = previous
