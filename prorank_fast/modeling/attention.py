"""Varlen (packed) attention for transformers models, registered as "prorank_varlen".

Importing this module registers `varlen_attention_forward` with transformers'
AttentionInterface (and a padding-only mask function with AttentionMaskInterface), so that
``model.set_attn_implementation("prorank_varlen")`` selects it. Called with one packed row
(``input_ids [1, T]``, ``position_ids`` restarting at 0) and the keyword arguments
``cu_seq_lens_q/k`` (int32 [S + 1]) and ``max_length_q/k`` (int) -- transformers passes any
extra keyword argument of the model's forward through to the attention function -- it computes
causal attention within each sequence, on the first backend that applies:

1. ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16, when flash-attn is installed);
2. ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; its signature changed across
   torch releases -- ``is_causal=`` in 2.10, ``window_size=``/``enable_gqa=`` later -- so it is
   inspected once);
3. SDPA once per sequence (CPU, fp32 anywhere); within `override_cpu_attention` (scoring
   with batch invariance) a fixed-block attention on CPU instead.

`set_varlen_backend` forces one (tests, benchmarks, or to route around a broken fast path);
the environment variable PRORANK_VARLEN_BACKEND sets the initial choice.

Without ``cu_seq_lens_*`` the function stays correct: boundaries come from ``position_ids``
(a new sequence wherever the position does not grow by one, as transformers' own packed-mask
detection does), a 2D padding mask is unpadded into sequences, and otherwise it is plain
causal SDPA over each row (lower-right aligned when a KV cache makes keys longer than queries).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import logging
import os
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "available_backends",
    "get_varlen_backend",
    "override_cpu_attention",
    "per_query_row_attention",
    "register",
    "resolve_backend",
    "set_varlen_backend",
    "varlen_attention",
    "varlen_attention_forward",
]

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "prorank_varlen"
BACKENDS = ("flash_attn", "torch_varlen", "sdpa")
_HALF = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- backends


# Detected once, then read from this dict (plain dict reads trace cleanly under torch.compile,
# where a functools.cache wrapper would be traced through, import included).
_detected: dict[str, Any] = {}


def _flash_attn_varlen_func() -> Callable | None:
    """flash_attn.flash_attn_varlen_func, or None when flash-attn is not importable (detected once)."""
    if "flash_attn" not in _detected:
        try:
            from flash_attn import flash_attn_varlen_func
        except Exception:  # ImportError, or a wheel built for another torch/CUDA
            flash_attn_varlen_func = None
        _detected["flash_attn"] = flash_attn_varlen_func
    return _detected["flash_attn"]


class _TorchVarlen:
    """torch.nn.attention.varlen.varlen_attn behind one call, whatever the torch release.

    2.10 takes ``is_causal=``; later releases take ``window_size=(-1, 0)`` for causal (and
    compare it as a tuple) and, later still, ``enable_gqa=``. Without ``enable_gqa`` the KV heads
    are repeated, which is exactly what GQA means (query head h reads KV head h // n_rep).
    """

    def __init__(self, fn: Callable) -> None:
        params = inspect.signature(fn).parameters
        self.fn = fn
        if "is_causal" in params:
            self.causal_arg = "is_causal"
        elif "window_size" in params:
            self.causal_arg = "window_size"
        else:
            self.causal_arg = None
        self.has_gqa = "enable_gqa" in params
        self.has_scale = "scale" in params

    def __call__(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
        kwargs: dict[str, Any] = {}
        if self.causal_arg == "is_causal":
            kwargs["is_causal"] = causal
        elif self.causal_arg == "window_size":
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        elif causal:
            raise RuntimeError("this torch's varlen_attn has neither is_causal= nor window_size=: cannot run causal")
        if scale is not None:
            if self.has_scale:
                kwargs["scale"] = scale
            elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
                raise RuntimeError("this torch's varlen_attn takes no scale= and the model's scale is not 1/sqrt(D)")
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            if self.has_gqa:
                kwargs["enable_gqa"] = True
            else:
                k = k.repeat_interleave(n_rep, dim=1)
                v = v.repeat_interleave(n_rep, dim=1)
        return self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


def _torch_varlen() -> _TorchVarlen | None:
    """The adapted torch varlen_attn, or None when this torch has none (detected once)."""
    if "torch_varlen" not in _detected:
        try:
            from torch.nn.attention.varlen import varlen_attn

            adapter = _TorchVarlen(varlen_attn)
        except Exception:
            adapter = None
        _detected["torch_varlen"] = adapter if adapter is not None and adapter.causal_arg is not None else None
    return _detected["torch_varlen"]


def available_backends() -> dict[str, bool]:
    """Which backends this process can run (the CUDA ones need a GPU and fp16/bf16 inputs)."""
    cuda = torch.cuda.is_available()
    return {
        "flash_attn": cuda and _flash_attn_varlen_func() is not None,
        "torch_varlen": cuda and _torch_varlen() is not None,
        "sdpa": True,
    }


def _check_backend(name: str) -> None:
    if name == "auto" or name == "sdpa":
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown varlen backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    if name == "flash_attn" and _flash_attn_varlen_func() is None:
        raise RuntimeError(
            "varlen backend 'flash_attn' was forced but flash_attn is not installed (pip install flash-attn)"
        )
    if name == "torch_varlen" and _torch_varlen() is None:
        raise RuntimeError(
            f"varlen backend 'torch_varlen' was forced but torch {torch.__version__} has no usable "
            "torch.nn.attention.varlen.varlen_attn (it needs torch >= 2.10)"
        )
    if not torch.cuda.is_available():
        raise RuntimeError(f"varlen backend {name!r} was forced but it runs on CUDA only and no GPU is available")


_forced_backend = "auto"


def set_varlen_backend(name: str = "auto") -> str:
    """Force one backend ("flash_attn" | "torch_varlen" | "sdpa") or go back to "auto".

    Raises (ValueError / RuntimeError) when the name is unknown or the backend cannot run here.
    Returns the previous setting, so that a caller can restore it.
    """
    global _forced_backend
    _check_backend(name)
    previous, _forced_backend = _forced_backend, name
    return previous


def get_varlen_backend() -> str:
    """The current setting: "auto" or a forced backend name."""
    return _forced_backend


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for inputs on `device` in `dtype` under the current setting."""
    if _forced_backend != "auto":
        if _forced_backend != "sdpa":
            if device.type != "cuda":
                raise RuntimeError(f"varlen backend {_forced_backend!r} is forced but the inputs are on {device}")
            if dtype not in _HALF:
                raise RuntimeError(
                    f"varlen backend {_forced_backend!r} is forced but the inputs are {dtype}; it takes fp16/bf16 only"
                )
        return _forced_backend
    if device.type == "cuda" and dtype in _HALF:
        if _flash_attn_varlen_func() is not None:
            return "flash_attn"
        if _torch_varlen() is not None:
            return "torch_varlen"
    return "sdpa"


_env_backend = os.environ.get("PRORANK_VARLEN_BACKEND")
if _env_backend:
    set_varlen_backend(_env_backend)


# ----------------------------------------------------------------------------- host-side caches

# Boundaries read on the host (a device sync) are computed once per forward, not once per layer:
# every layer receives the same cu_seqlens / position_ids tensor object. A weak reference (not
# id()) keys the cache, so a new tensor that happens to reuse an address never hits.


class _OneEntryCache:
    def __init__(self) -> None:
        self.ref: weakref.ref | None = None
        self.key: Any = None
        self.value: Any = None

    def get(self, tensor: torch.Tensor, compute: Callable[[], Any], extra: Any = None) -> Any:
        key = (tensor._version, extra)
        if self.ref is not None and self.ref() is tensor and self.key == key:
            return self.value
        value = compute()
        self.ref, self.key, self.value = weakref.ref(tensor), key, value
        return value


_cu_list_cache = _OneEntryCache()
_cu_k_list_cache = _OneEntryCache()  # keys longer than queries (a shared-prefix pass): its own entry
_mask_cache = _OneEntryCache()  # the bottom-right causal masks of such a pass, built once for all layers
_position_cache = _OneEntryCache()
_row_plan_cache = _OneEntryCache()  # per_query_row_attention's rows and masks, built once for all layers


def _max_len(cu: torch.Tensor) -> int:
    return int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0


def _cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(cu_seqlens int32 over the flattened [B*T] tokens, max length, number of sequences).

    A sequence starts at each row start and wherever the position does not grow by one.
    """
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    idx = starts.reshape(-1).nonzero().reshape(-1)
    end = torch.full((1,), batch * length, dtype=idx.dtype, device=idx.device)
    cu = torch.cat([idx, end]).to(torch.int32)
    return cu, _max_len(cu), int(idx.numel())


# ----------------------------------------------------------------------------- kernels


def _fp32_on_cpu(fn: Callable) -> Callable:
    """CPU SDPA in fp32 with autocast off, returned in the dtype SDPA would return (autocast's, or
    q's). Measured on 2 cores (torch 2.13): one query over 260 keys takes 160 us in bf16 and 36 us
    in fp32 -- a decode step, or a per-row call -- and a whole 260-token sequence the same in both;
    fp32 also gives the model's bf16 runs fp32 attention, as `blocked_attention` does."""

    @functools.wraps(fn)
    def wrapped(q, k, v, *args):
        if q.device.type != "cpu" or q.dtype == torch.float64:
            return fn(q, k, v, *args)
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
        with torch.autocast("cpu", enabled=False):
            return fn(q.float(), k.float(), v.float(), *args).to(dtype)

    return wrapped


@_fp32_on_cpu
def _sdpa_per_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_q: torch.Tensor,
    cu_k: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """SDPA once per sequence. q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (Hq a multiple of Hkv) -> [Tq, Hq, D]."""
    bounds_q = _cu_list_cache.get(cu_q, cu_q.tolist)
    bounds_k = bounds_q if cu_k is cu_q else _cu_k_list_cache.get(cu_k, cu_k.tolist)
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seq_lens_q has {len(bounds_q)} entries and cu_seq_lens_k {len(bounds_k)}")
    if bounds_q[-1] != q.shape[0] or bounds_k[-1] != k.shape[0]:
        raise ValueError(
            f"cu_seqlens end at {bounds_q[-1]} (q) / {bounds_k[-1]} (k) but the row holds {q.shape[0]} / {k.shape[0]}"
            " tokens: packed rows carry no padding"
        )
    gqa = q.shape[1] != k.shape[1]
    # [T, H, D] -> [1, H, T, D] views split along T, nothing copied. torch.split rather than
    # one slice per sequence: the backward of split is a single concat, while each slice's
    # backward writes a zero tensor the size of the whole packed row (cost ~ docs x tokens).
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    sizes_q = [b - a for a, b in zip(bounds_q[:-1], bounds_q[1:], strict=True)]
    sizes_k = [b - a for a, b in zip(bounds_k[:-1], bounds_k[1:], strict=True)]
    extra = {"enable_gqa": True} if gqa else {}
    masks = [None] * len(sizes_q)
    if causal and sizes_q != sizes_k:  # keys longer than queries: align the diagonal bottom-right
        masks = _mask_cache.get(
            cu_k, lambda: _bottom_right_masks(sizes_q, sizes_k, q.device), (tuple(sizes_q), q.device)
        )
    outs = []
    split = zip(qh.split(sizes_q, dim=2), kh.split(sizes_k, dim=2), vh.split(sizes_k, dim=2), masks, strict=True)
    for qs, ks, vs, mask in split:
        if qs.shape[2]:
            outs.append(_sdpa_one(qs, ks, vs, mask, scale, causal, extra))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.squeeze(0).transpose(0, 1).contiguous()


def _sdpa_one(qs, ks, vs, mask, scale, causal, extra) -> torch.Tensor:
    """One sequence's SDPA call, [1, H, Lq, D] views: the one call both per-sequence and per-row paths make."""
    is_causal = causal and qs.shape[2] > 1 and mask is None
    return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=is_causal, scale=scale, **extra)


@_fp32_on_cpu
def _sdpa_per_query_row(q, k, v, cu_q, cu_k, scale: float | None, causal: bool) -> torch.Tensor:
    """Each query row alone: one SDPA call with one query and the keys it may see (bottom-right
    causal), exactly the call `_sdpa_per_sequence` makes for a decode step's one-token sequence
    over the same keys. q: [Tq, Hq, D], k/v: [Tk, Hkv, D] -> [Tq, Hq, D]."""
    bounds_q = _cu_list_cache.get(cu_q, cu_q.tolist)
    rows, seen, masks = _row_plan_cache.get(cu_k, lambda: _row_plan(bounds_q, cu_k.tolist(), causal, q.device),
                                            (tuple(bounds_q), causal, q.device))  # fmt: skip
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    extra = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    outs = [
        _sdpa_one(qh[:, :, r : r + 1], kh[:, :, ka : ka + n], vh[:, :, ka : ka + n], mask, scale, causal, extra)
        for r, (ka, n, mask) in enumerate(zip(rows, seen, masks, strict=True))
    ]
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1).contiguous()


def _row_plan(bounds_q: list[int], bounds_k: list[int], causal: bool, device):
    """Per query row: its sequence's first key, how many keys it sees, and the decode step's mask."""
    rows, seen = [], []
    for a, b, ka, kb in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:], strict=True):
        lq, lk = b - a, kb - ka
        rows += [ka] * lq
        seen += [lk - lq + t + 1 for t in range(lq)] if causal else [lk] * lq
    masks = _bottom_right_masks([1] * len(rows), seen, device) if causal else [None] * len(rows)
    return rows, seen, masks


class _GatheredAttention(torch.autograd.Function):
    """CPU SDPA on k/v's rows at `gather`, selected here, keeping k and v for backward as given:
    a shared prompt's keys are kept once, not once per completion that reads them (G copies of a
    GRPO group's prompt per layer). Forward: `_sdpa_per_query_row` (per_row) or
    `_sdpa_per_sequence`. Backward: that of `_sdpa_per_sequence` on the same inputs, recomputed
    -- for per_row the same function, its rounding aside, at one SDPA call per sequence;
    otherwise the plain pass's gradients bit for bit. Under autocast (q and k fp32 after rotary,
    v bf16) the backward recomputes under the same autocast."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, cu_q, cu_k, scale, causal, gather, per_row):
        ctx.save_for_backward(q, k, v, cu_q, cu_k, gather)
        ctx.scale, ctx.causal = scale, causal
        attend = _sdpa_per_query_row if per_row else _sdpa_per_sequence
        return attend(q, *_rows(k, v, gather), cu_q, cu_k, scale, causal)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        q, k, v, cu_q, cu_k, gather = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3], strict=True)]
        with torch.enable_grad():  # the gather's backward (index_add) is the one it had outside this function
            out = _sdpa_per_sequence(inputs[0], *_rows(inputs[1], inputs[2], gather), cu_q, cu_k, ctx.scale, ctx.causal)
        wanted = [x for x in inputs if x.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad))
        return *(next(grads) if x.requires_grad else None for x in inputs), *[None] * 6


def _rows(k: torch.Tensor, v: torch.Tensor, gather: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return (k, v) if gather is None else (k.index_select(0, gather), v.index_select(0, gather))


def per_query_row_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """`varlen_attention` (SDPA backend) in which every query row gets the bits a decode step gives
    it: one SDPA call with that one query over the keys it may see. A packed pass over several
    tokens of a sequence then reproduces token-by-token decoding exactly (stage 1's on-policy
    policy pass, in one pass instead of one per position). Gradients are those of the
    per-sequence call (equal to rounding). CPU only, where the SDPA backend runs.

    gather: int64 [Tk] -- the packed keys/values are `k.index_select(0, gather)` (and v's), taken
    inside so that only k and v are kept for backward (a key several sequences read, once)."""
    if q.device.type != "cpu" or resolve_backend(q.device, q.dtype) != "sdpa":
        raise ValueError(f"per_query_row_attention reproduces the SDPA backend's decode steps; q is on {q.device}")
    return _GatheredAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, gather, True)


# A function with _sdpa_per_sequence's signature that replaces it on CPU within a block
# (modeling.invariant's fixed-block attention). Set from above, so this module imports nothing
# of the layers that use it.
_cpu_attention_override: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "prorank_cpu_attention_override", default=None
)


@contextlib.contextmanager
def override_cpu_attention(fn: Callable) -> Iterator[None]:
    """Within the block, CPU varlen attention (the SDPA backend) runs ``fn(q, k, v, cu_q, cu_k,
    scale, causal)`` instead of SDPA once per sequence."""
    token = _cpu_attention_override.set(fn)
    try:
        yield
    finally:
        _cpu_attention_override.reset(token)


def _bottom_right_masks(sizes_q: list[int], sizes_k: list[int], device) -> list[torch.Tensor | None]:
    """Per sequence: None where queries and keys have one length (plain causal), else the causal
    mask with its diagonal aligned bottom-right (query i sits at key position lk - lq + i)."""
    return [
        None if lq == lk else torch.ones(lq, lk, dtype=torch.bool, device=device).tril(lk - lq)
        for lq, lk in zip(sizes_q, sizes_k, strict=True)
    ]


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    backend: str | None = None,
    gather: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention within each sequence of a packed batch.

    q: [Tq, Hq, D]; k, v: [Tk, Hkv, D] with Hq a multiple of Hkv (GQA);
    cu_seqlens_q/k: [S + 1] int32 (int64 accepted) cumulative lengths on q's device;
    max_seqlen_q/k: Python ints (computed with a device sync when None).
    Returns [Tq, Hq, D] in q's dtype. `backend` overrides the resolved one (None: resolve).
    gather: int64 [Tk'] -- the packed keys/values are k's (and v's) rows at `gather`
    (a shared prefix: `modeling.shared_prefix`). Where they read more rows than k holds and
    gradients flow, CPU SDPA keeps k and v for backward instead of the gathered rows, and
    recomputes the pass in backward (same bits).
    """
    backend = backend or resolve_backend(q.device, q.dtype)
    cpu = q.device.type == "cpu"
    override = _cpu_attention_override.get() if cpu else None
    if cpu and backend == "sdpa" and override is None and gather is not None and gather.numel() > k.shape[0]:
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            return _GatheredAttention.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal, gather, False)
    k, v = _rows(k, v, gather)
    if backend == "sdpa":
        if override is not None:
            return override(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
        return _sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal)
    if cu_seqlens_q.dtype != torch.int32:
        cu_seqlens_q = cu_seqlens_q.to(torch.int32)
    if cu_seqlens_k.dtype != torch.int32:
        cu_seqlens_k = cu_seqlens_k.to(torch.int32)
    if max_seqlen_q is None:
        max_seqlen_q = _max_len(cu_seqlens_q)
    if max_seqlen_k is None:
        max_seqlen_k = _max_len(cu_seqlens_k)
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    # The kernels want a unit stride on D and dense rows; after RoPE q/k usually already are.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if backend == "flash_attn":
        fn = _flash_attn_varlen_func()
        if fn is None:
            raise RuntimeError("flash_attn is not installed")
        # flash-attn handles GQA natively (query head h reads KV head h // n_rep).
        return fn(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=scale,
            causal=causal,
        )
    if backend == "torch_varlen":
        fn = _torch_varlen()
        if fn is None:
            raise RuntimeError(f"torch {torch.__version__} has no usable torch.nn.attention.varlen.varlen_attn")
        return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)
    raise ValueError(f"unknown varlen backend {backend!r}")


def _dense_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """Plain SDPA over whole rows. query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D] -> [B, Tq, Hq, D].

    attention_mask: None, a 2D [B, Tk] keep-mask (1 = attend), or a 4D mask used as given
    (transformers' convention: a 4D mask already holds causality).
    """
    tq, tk = query.shape[2], key.shape[2]
    n_rep = query.shape[1] // key.shape[1]
    mask = None
    is_causal = False
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    else:
        if causal and tq == tk:
            is_causal = tq > 1
        elif causal:  # a KV cache: query i sits at key position tk - tq + i
            mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)[None, None]
        if attention_mask is not None:
            keep = attention_mask[:, -tk:].to(device=query.device, dtype=torch.bool)[:, None, None, :]
            if is_causal:
                mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril()[None, None]
                is_causal = False
            mask = keep if mask is None else mask & keep
            # A query with nothing to attend to (a padding position) would give NaN: let it see
            # everything; its output is padding and is never read.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
    extra = {}
    if n_rep > 1:
        if mask is None:
            extra["enable_gqa"] = True
        else:  # masked GQA falls back to the math kernel on some devices anyway; repeat explicitly
            key = key.repeat_interleave(n_rep, dim=1)
            value = value.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal, scale=scale, **extra)
    return out.transpose(1, 2).contiguous()


def _unpadded(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    scale: float | None,
    causal: bool,
) -> torch.Tensor:
    """A padded batch as varlen: each row's kept tokens form one sequence (as flash-attn's unpad does).

    query [B, Hq, T, D], key/value [B, Hkv, T, D], keep [B, T] -> [B, T, Hq, D] (zeros at padding).
    """
    batch, heads, length, dim = query.shape
    keep = keep.to(device=query.device, dtype=torch.bool)
    idx = keep.reshape(-1).nonzero().reshape(-1)
    counts = keep.sum(dim=1, dtype=torch.int32)
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=query.device)
    cu[1:] = torch.cumsum(counts, 0)
    max_len = int(counts.max().item())

    def flat(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim).index_select(0, idx)

    out = varlen_attention(flat(query), flat(key), flat(value), cu, cu, max_len, max_len, scale=scale, causal=causal)
    full = out.new_zeros(batch * length, heads, dim).index_copy(0, idx, out)
    return full.view(batch, length, heads, dim)


# ----------------------------------------------------------------------------- the registered function


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (AttentionInterface signature).

    query: [B, Hq, Tq, D]; key, value: [B, Hkv, Tk, D] (after RoPE and any KV cache update).
    Returns (attn_output [B, Tq, Hq, D] contiguous, None): no attention weights are formed.

    transformers (5.17 and 5.24) calls it with `dropout`, `scaling`, `sliding_window`,
    `position_ids`, `use_cache` and every extra keyword of the model's forward, among them
    `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k`.
    """
    if dropout:
        raise NotImplementedError(f"prorank_varlen attention has no dropout (got {dropout}); set attention_dropout=0")
    if sliding_window is not None:
        raise NotImplementedError(f"prorank_varlen attention has no sliding window (layer asks for {sliding_window})")
    if softcap is not None:
        raise NotImplementedError("prorank_varlen attention has no logit softcap")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("prorank_varlen attention has no attention sinks")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    batch, heads, tq, dim = query.shape
    tk = key.shape[2]

    shared = kwargs.get("shared_prefix")
    if shared is not None:
        if batch != 1 or attention_mask is not None:
            raise ValueError("prorank_varlen: a shared-prefix pass is one packed row without an attention_mask")
        out = shared.attend(module.layer_idx, _flat(query), _flat(key), _flat(value), scale=scaling, causal=causal)
        return out.reshape(batch, tq, heads, dim), None

    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        if attention_mask is not None:
            raise ValueError("prorank_varlen: packed input (cu_seq_lens_*) comes without an attention_mask")
        if tq != tk:
            raise ValueError(f"prorank_varlen: packed input with a KV cache is not supported (q {tq}, k {tk} tokens)")
        cu_q = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
        cu_k = cu_seq_lens_k if cu_seq_lens_k is not None else cu_seq_lens_q
        max_q = max_length_q if max_length_q is not None else max_length_k
        max_k = max_length_k if max_length_k is not None else max_length_q
        out = varlen_attention(
            _flat(query), _flat(key), _flat(value), cu_q, cu_k, max_q, max_k, scale=scaling, causal=causal
        )
        return out.reshape(batch, tq, heads, dim), None

    if attention_mask is not None:
        if attention_mask.dim() == 2 and tq == tk:
            return _unpadded(query, key, value, attention_mask[:, -tk:], scaling, causal), None
        return _dense_sdpa(query, key, value, attention_mask, scaling, causal), None

    if position_ids is not None and position_ids.dim() == 2 and tq == tk and tq > 1:
        pos = position_ids if position_ids.shape[0] == batch else position_ids.expand(batch, -1)
        cu, max_len, num_seqs = _position_cache.get(position_ids, lambda: _cu_seqlens_from_position_ids(pos), batch)
        if num_seqs > batch:  # packed: several sequences in a row
            out = varlen_attention(
                _flat(query), _flat(key), _flat(value), cu, cu, max_len, max_len, scale=scaling, causal=causal
            )
            return out.reshape(batch, tq, heads, dim), None

    return _dense_sdpa(query, key, value, None, scaling, causal), None


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H, D] (a view when B == 1)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h, d)


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask function for AttentionMaskInterface: the 2D padding mask when there is padding, else None.

    Without a registered mask function transformers would drop a user's padding mask silently
    for a custom attention implementation; causality and packing are handled in the attention
    function, so no [T, T] mask is ever built here.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention and mask functions under `name` (done on import for "prorank_varlen")."""
    AttentionInterface.register(name, varlen_attention_forward)
    AttentionMaskInterface.register(name, _padding_mask)
    return name


register()
