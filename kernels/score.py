"""Restricted-vocabulary score and its losses (ProRank stage 2).

The relevance score is read off the LM head restricted to an output set of K tokens::

    s[b] = sum_k w_k * (hidden[b] @ weight[t_k] + bias[t_k])        # by default z["1"] - z["0"]

Only the K gathered rows of the [V, H] weight are ever read: the [B, V] logits are never
formed. Layers, Liger-Kernel style: private ``@triton.jit`` kernels, launchers, an
``autograd.Function``, the functional API. The losses act on s [B] (O(B), fp32 PyTorch,
the formulas of :func:`reference.score_loss_reference`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

from . import launch_table, reference
from ._utils import (
    check_finite,
    check_linear,
    check_temperature,
    check_vector,
    checks_mode,
    device_assert,
    resolve_impl,
    triton_available,
)
from .invariant_matmul import batch_invariant_linear

__all__ = ["RestrictedVocabScoreFunction", "restricted_vocab_score", "restricted_vocab_score_loss"]

# Fixed launch configuration: B changes every step (batch composition) and H is a runtime
# int, so neither may become a compile-time constant; only block sizes are constexpr. The
# launch table owns the values (the compile check builds every launch from it).
_BLOCK_B = launch_table.SCORE_BLOCK_B  # rows of hidden per program
_BLOCK_H = launch_table.SCORE_BLOCK_H  # hidden columns per inner step
_BLOCK_K = launch_table.SCORE_BLOCK_K  # output-set tokens per inner step (K is usually 2)
_BLOCK_P = launch_table.SCORE_BLOCK_P  # row-block partials reduced per step in the deterministic second stage
# num_warps: launch_table.SCORE_WARPS, through Kernel.launch

if triton_available():
    import triton
    import triton.language as tl

    # -----------------------------------------------------------------------------------
    # Kernels
    # -----------------------------------------------------------------------------------

    @triton.jit
    def _combined_rows(
        W_ptr,
        ids_ptr,
        tw_ptr,
        n_tok,
        cols64,
        col_mask,
        stride_wv,
        stride_wh,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """u[cols] = sum_k w_k * W[t_k, cols] in fp32, the K rows gathered by id here."""
        u = tl.zeros([BLOCK_H], dtype=tl.float32)
        for k0 in range(0, n_tok, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < n_tok
            # int64 before the multiply: t_k * stride_wv overflows int32 on a 151936 x 3584 head.
            ids = tl.load(ids_ptr + ks, mask=k_mask, other=0).to(tl.int64)
            tw = tl.load(tw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(
                W_ptr + ids[:, None] * stride_wv + cols64[None, :] * stride_wh,
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            u += tl.sum(w * tw[:, None], axis=0)
        return u

    @triton.jit
    def _score_fwd_kernel(
        H_ptr,
        W_ptr,
        Bias_ptr,
        ids_ptr,
        tw_ptr,
        S_ptr,
        n_rows,
        hidden_size,
        n_tok,
        stride_hb,
        stride_hh,
        stride_wv,
        stride_wh,
        stride_bias,
        HAS_BIAS: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < n_rows
        acc = tl.zeros([BLOCK_B], dtype=tl.float32)
        for h0 in range(0, hidden_size, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            col_mask = cols < hidden_size
            cols64 = cols.to(tl.int64)
            # Combining the K rows first makes this a GEMV against one vector, and for
            # (1, -1) it avoids the cancellation of z["1"] - z["0"] after two dot products.
            u = _combined_rows(W_ptr, ids_ptr, tw_ptr, n_tok, cols64, col_mask, stride_wv, stride_wh, BLOCK_H, BLOCK_K)
            h = tl.load(
                H_ptr + rows[:, None] * stride_hb + cols64[None, :] * stride_hh,
                mask=row_mask[:, None] & col_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(h * u[None, :], axis=1)
        if HAS_BIAS:
            bsum = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, n_tok, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < n_tok
                ids = tl.load(ids_ptr + ks, mask=k_mask, other=0).to(tl.int64)
                tw = tl.load(tw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                b = tl.load(Bias_ptr + ids * stride_bias, mask=k_mask, other=0.0).to(tl.float32)
                bsum += tw * b
            acc += tl.sum(bsum, axis=0)
        tl.store(S_ptr + rows, acc, mask=row_mask)

    @triton.jit
    def _score_bwd_rows_kernel(
        H_ptr,
        W_ptr,
        ids_ptr,
        tw_ptr,
        G_ptr,
        DH_ptr,
        PR_ptr,
        PG_ptr,
        n_rows,
        hidden_size,
        n_tok,
        stride_hb,
        stride_hh,
        stride_wv,
        stride_wh,
        stride_dhb,
        stride_dhh,
        NEED_DH: tl.constexpr,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Per row block: grad_hidden = g * u, and this block's partials of sum_b g[b] h[b]
        (-> PR[pid, :]) and sum_b g[b] (-> PG[pid]) for the second stage."""
        pid = tl.program_id(0).to(tl.int64)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
        row_mask = rows < n_rows
        g = tl.load(G_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        if NEED_DB:
            tl.store(PG_ptr + pid, tl.sum(g, axis=0))
        if NEED_DH or NEED_DW:
            for h0 in range(0, hidden_size, BLOCK_H):
                cols = h0 + tl.arange(0, BLOCK_H)
                col_mask = cols < hidden_size
                cols64 = cols.to(tl.int64)
                tile_mask = row_mask[:, None] & col_mask[None, :]
                if NEED_DH:
                    u = _combined_rows(
                        W_ptr, ids_ptr, tw_ptr, n_tok, cols64, col_mask, stride_wv, stride_wh, BLOCK_H, BLOCK_K
                    )
                    dh = g[:, None] * u[None, :]
                    tl.store(
                        DH_ptr + rows[:, None] * stride_dhb + cols64[None, :] * stride_dhh,
                        dh.to(DH_ptr.dtype.element_ty),
                        mask=tile_mask,
                    )
                if NEED_DW:
                    h = tl.load(
                        H_ptr + rows[:, None] * stride_hb + cols64[None, :] * stride_hh, mask=tile_mask, other=0.0
                    ).to(tl.float32)
                    tl.store(PR_ptr + pid * hidden_size + cols64, tl.sum(h * g[:, None], axis=0), mask=col_mask)

    @triton.jit
    def _score_bwd_reduce_kernel(
        PR_ptr,
        PG_ptr,
        ids_ptr,
        tw_ptr,
        DW_ptr,
        DB_ptr,
        n_parts,
        hidden_size,
        n_tok,
        stride_dwv,
        stride_dwh,
        stride_db,
        NEED_DW: tl.constexpr,
        NEED_DB: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Second stage, one program per column block: r = sum_p PR[p, cols] in a fixed order
        (deterministic, no atomics), then dW[t_k, cols] = w_k * r. Ids are unique here (the
        launcher merged duplicates), so the K row stores never collide."""
        pid = tl.program_id(0)
        if NEED_DW:
            cols = pid * BLOCK_H + tl.arange(0, BLOCK_H)
            col_mask = cols < hidden_size
            cols64 = cols.to(tl.int64)
            r = tl.zeros([BLOCK_H], dtype=tl.float32)
            for p0 in range(0, n_parts, BLOCK_P):
                ps = (p0 + tl.arange(0, BLOCK_P)).to(tl.int64)
                p_mask = ps < n_parts
                part = tl.load(
                    PR_ptr + ps[:, None] * hidden_size + cols64[None, :],
                    mask=p_mask[:, None] & col_mask[None, :],
                    other=0.0,
                )
                r += tl.sum(part, axis=0)
            for k0 in range(0, n_tok, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_mask = ks < n_tok
                ids = tl.load(ids_ptr + ks, mask=k_mask, other=0).to(tl.int64)
                tw = tl.load(tw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                dw = tw[:, None] * r[None, :]
                tl.store(
                    DW_ptr + ids[:, None] * stride_dwv + cols64[None, :] * stride_dwh,
                    dw.to(DW_ptr.dtype.element_ty),
                    mask=k_mask[:, None] & col_mask[None, :],
                )
        if NEED_DB:
            if pid == 0:
                gacc = tl.zeros([BLOCK_P], dtype=tl.float32)
                for p0 in range(0, n_parts, BLOCK_P):
                    ps = p0 + tl.arange(0, BLOCK_P)
                    gacc += tl.load(PG_ptr + ps, mask=ps < n_parts, other=0.0)
                gsum = tl.sum(gacc, axis=0)
                for k0 in range(0, n_tok, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_mask = ks < n_tok
                    ids = tl.load(ids_ptr + ks, mask=k_mask, other=0).to(tl.int64)
                    tw = tl.load(tw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
                    tl.store(DB_ptr + ids * stride_db, (tw * gsum).to(DB_ptr.dtype.element_ty), mask=k_mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _score_forward_triton(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, tw: torch.Tensor
) -> torch.Tensor:
    """s [B] fp32 from hidden [B, H], weight [V, H], bias [V] | None, ids [K] int64, tw [K] fp32."""
    n_rows, hidden_size = hidden.shape
    s = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return s
    _score_fwd_kernel[(_cdiv(n_rows, _BLOCK_B),)](
        hidden,
        weight,
        bias if bias is not None else s,  # dummy pointer, never read when HAS_BIAS is False
        ids,
        tw,
        s,
        n_rows,
        hidden_size,
        ids.numel(),
        hidden.stride(0),
        hidden.stride(1),
        weight.stride(0),
        weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        **launch_table.KERNELS["score_fwd"].launch(
            HAS_BIAS=bias is not None, BLOCK_B=_BLOCK_B, BLOCK_H=_BLOCK_H, BLOCK_K=_BLOCK_K
        ),
    )
    return s


def _score_backward_triton(
    grad_s: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias_like: tuple[torch.Size, torch.dtype] | None,
    ids: torch.Tensor,
    tw: torch.Tensor,
    need_dh: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(grad_hidden [B, H] hidden.dtype, grad_weight [V, H] weight.dtype, grad_bias [V]) or Nones.

    ``ids`` must be unique (the second stage stores each of their rows once)."""
    n_rows, hidden_size = hidden.shape
    device = hidden.device
    g = grad_s.to(torch.float32).contiguous()  # grad of a sum arrives expanded (stride 0)
    n_parts = _cdiv(n_rows, _BLOCK_B)
    dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_dh else None
    # The one dense allocation: autograd wants a [V, H] gradient; only the K rows get written.
    dw = torch.zeros(weight.shape, dtype=weight.dtype, device=device) if need_dw else None
    db = torch.zeros(bias_like[0], dtype=bias_like[1], device=device) if need_db else None
    partial_r = torch.empty((n_parts, hidden_size), dtype=torch.float32, device=device) if need_dw else None
    partial_g = torch.empty(n_parts, dtype=torch.float32, device=device) if need_db else None
    dummy = g
    if n_parts > 0:
        _score_bwd_rows_kernel[(n_parts,)](
            hidden,
            weight,
            ids,
            tw,
            g,
            dh if dh is not None else dummy,
            partial_r if partial_r is not None else dummy,
            partial_g if partial_g is not None else dummy,
            n_rows,
            hidden_size,
            ids.numel(),
            hidden.stride(0),
            hidden.stride(1),
            weight.stride(0),
            weight.stride(1),
            dh.stride(0) if dh is not None else 0,
            dh.stride(1) if dh is not None else 0,
            **launch_table.KERNELS["score_bwd_rows"].launch(
                NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db, BLOCK_B=_BLOCK_B, BLOCK_H=_BLOCK_H, BLOCK_K=_BLOCK_K
            ),
        )
    if (need_dw or need_db) and n_parts > 0:
        # At least one program so that program 0 writes the bias gradient.
        _score_bwd_reduce_kernel[(max(1, _cdiv(hidden_size, _BLOCK_H)),)](
            partial_r if partial_r is not None else dummy,
            partial_g if partial_g is not None else dummy,
            ids,
            tw,
            dw if dw is not None else dummy,
            db if db is not None else dummy,
            n_parts,
            hidden_size,
            ids.numel(),
            dw.stride(0) if dw is not None else 0,
            dw.stride(1) if dw is not None else 0,
            db.stride(0) if db is not None else 0,
            **launch_table.KERNELS["score_bwd_reduce"].launch(
                NEED_DW=need_dw, NEED_DB=need_db, BLOCK_P=_BLOCK_P, BLOCK_H=_BLOCK_H, BLOCK_K=_BLOCK_K
            ),
        )
    return dh, dw, db


# ---------------------------------------------------------------------------------------
# autograd.Function
# ---------------------------------------------------------------------------------------


class RestrictedVocabScoreFunction(torch.autograd.Function):
    """Triton score: forward(hidden [B, H], weight [V, H], bias [V] | None, ids [K] int64 unique,
    tw [K] fp32) -> s [B] fp32. ids / tw are constants (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, tw):
        s = _score_forward_triton(hidden, weight, bias, ids, tw)
        ctx.save_for_backward(hidden, weight, ids, tw)
        ctx.bias_like = (bias.shape, bias.dtype) if bias is not None else None
        return s

    @staticmethod
    def backward(ctx, grad_s):
        hidden, weight, ids, tw = ctx.saved_tensors
        need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
        if not (need_dh or need_dw or need_db):
            return None, None, None, None, None
        dh, dw, db = _score_backward_triton(
            grad_s, hidden, weight, ctx.bias_like, ids, tw, need_dh, need_dw, need_db and ctx.bias_like is not None
        )
        return dh, dw, db, None, None


# ---------------------------------------------------------------------------------------
# Functional API
# ---------------------------------------------------------------------------------------


def _check_tokens(token_ids, token_weights, vocab: int) -> tuple[list[int], list[float]]:
    """Validate the output set; returns plain Python lists (K is tiny). Python sequences are
    checked in Python; a tensor output set is read back once (a sync when it is on a GPU)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        ids = token_ids.detach().tolist()
    elif isinstance(token_ids, Sequence) and not isinstance(token_ids, str):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in token_ids):
            raise ValueError(f"token_ids must hold ints, got {list(token_ids)!r}")
        ids = [int(t) for t in token_ids]
    else:
        raise ValueError(
            f"token_ids must be a sequence of ints or a 1-D integer tensor, got {type(token_ids).__name__}"
        )
    if not ids:
        raise ValueError("token_ids must not be empty")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ValueError(f"token_ids holds ids outside [0, {vocab}): min {min(ids)}, max {max(ids)}")

    if isinstance(token_weights, torch.Tensor):
        if token_weights.dim() != 1:
            raise ValueError(f"token_weights must be 1-D, got shape {tuple(token_weights.shape)}")
        w_list = [float(x) for x in token_weights.detach().tolist()]
    elif isinstance(token_weights, Sequence) and not isinstance(token_weights, str):
        try:
            w_list = [float(x) for x in token_weights]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"token_weights must hold numbers, got {list(token_weights)!r}") from exc
    else:
        raise ValueError(
            f"token_weights must be a sequence of floats or a 1-D tensor, got {type(token_weights).__name__}"
        )
    if len(w_list) != len(ids):
        raise ValueError(f"token_weights has {len(w_list)} entries but token_ids has {len(ids)}")
    if not all(math.isfinite(x) for x in w_list):
        raise ValueError(f"token_weights holds non-finite values: {w_list}")
    return ids, w_list


def _merge_duplicates(ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """w_a * W[t] + w_b * W[t] == (w_a + w_b) * W[t]: merging repeated ids keeps the kernel's
    weight-row stores collision-free (and so deterministic) without atomics."""
    merged: dict[int, float] = {}
    for t, w in zip(ids, weights, strict=True):
        merged[t] = merged.get(t, 0.0) + w
    return list(merged), list(merged.values())


@functools.lru_cache(maxsize=64)
def _device_tokens(ids: tuple[int, ...], weights: tuple[float, ...], device: torch.device):
    """The output set as device tensors, copied once per (set, device): a host-to-device copy
    from pageable memory waits for the stream, so a copy per call would be a sync per call."""
    return (
        torch.tensor(ids, dtype=torch.int64, device=device),
        torch.tensor(weights, dtype=torch.float32, device=device),
    )


def _score_torch(hidden, weight, bias, ids: list[int], weights: list[float]) -> torch.Tensor:
    """Same maths in PyTorch on the K gathered rows ([K, H], never [B, V]); autograd's
    index_select backward scatters (and accumulates duplicates) into the [V, H] gradient.
    Batch-invariant like the Triton kernel: a row's score never depends on the other rows."""
    idx, w = _device_tokens(tuple(ids), tuple(weights), weight.device)
    z = batch_invariant_linear(hidden.float(), weight.index_select(0, idx).float(), impl="tiles")  # [B, K]
    if bias is not None:
        z = z + bias.index_select(0, idx).float()
    return (z * w).sum(-1)  # a per-row sum over K, not a GEMV whose blocking could depend on B


def _validate_score_args(hidden, weight, bias, token_ids, token_weights, impl) -> tuple[str, list[int], list[float]]:
    check_linear(hidden, weight, bias)
    check_vector("bias", bias, weight.shape[0], device=hidden.device)
    ids, weights = _check_tokens(token_ids, token_weights, weight.shape[0])
    return resolve_impl(impl, hidden, weight, bias), ids, weights


def _score(hidden, weight, bias, ids, weights, impl) -> torch.Tensor:
    if impl == "torch":
        return _score_torch(hidden, weight, bias, ids, weights)
    ids, weights = _merge_duplicates(ids, weights)
    ids_t, w_t = _device_tokens(tuple(ids), tuple(weights), hidden.device)
    return RestrictedVocabScoreFunction.apply(hidden, weight, bias, ids_t, w_t)


def restricted_vocab_score(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids=(16, 15),
    token_weights=(1.0, -1.0),
    *,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    checks: str | None = None,
) -> torch.Tensor:
    """Restricted-vocabulary relevance score ``s[b] = sum_k w_k * (hidden[b] @ weight[t_k] + bias[t_k])``.

    Args:
        hidden: [B, H], any float dtype (upcast to fp32 on load), typically the last prompt position.
        weight: [V, H] the full LM head; only its K rows ``token_ids`` are read.
        token_ids: K ints in [0, V) (sequence or 1-D integer tensor); duplicates accumulate.
            Default (16, 15) is "1", "0" with the Qwen2 tokenizer.
        token_weights: K floats (sequence or 1-D tensor), treated as constants. Default (1, -1).
        bias: [V] or None.
        impl: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
        checks: "full" | "device" (no host sync; the default on CUDA, ``PRORANK_CHECKS``).
            The score itself reads no tensor back either way when token_ids/token_weights are
            Python sequences (the output set is copied to the device once and cached); a
            tensor output set is read back once per call.

    Returns:
        s [B] fp32, differentiable w.r.t. hidden, weight (a [V, H] gradient in weight's dtype,
        zero outside the K rows) and bias.
    """
    impl, ids, weights = _validate_score_args(hidden, weight, bias, token_ids, token_weights, impl)
    checks_mode(hidden.device, checks)  # validates the setting: the score reads no device value either way
    return _score(hidden, weight, bias, ids, weights, impl)


def _check_loss_args(n_rows, device, labels, loss, group_size, teacher_scores, temperature, reduction, mode) -> None:
    if loss not in reference.SCORE_LOSSES:
        raise ValueError(f"loss must be one of {reference.SCORE_LOSSES}, got {loss!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    check_temperature(temperature)

    if labels is None:
        if loss in ("bce", "mse"):
            raise ValueError(f"labels must be given for loss={loss!r}")
    else:
        check_vector("labels", labels, n_rows, device=device)
        check_finite("labels", labels, mode)

    if loss in ("listwise", "distill"):
        if group_size is None:
            raise ValueError(f"group_size must be given for loss={loss!r}")
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n_rows % group_size != 0:
            raise ValueError(f"group_size={group_size} does not divide the batch size B={n_rows}")

    if mode == "device":
        _device_label_checks(labels, loss, group_size)
    elif loss in ("bce", "mse"):
        lab = labels.double()
        if lab.numel() and (float(lab.min()) < 0.0 or float(lab.max()) > 1.0):
            raise ValueError(
                f"labels must lie in [0, 1] for loss={loss!r}, got min {float(lab.min())}, max {float(lab.max())}"
            )
    elif loss == "listwise" and labels is not None:
        lab = labels.double().reshape(-1, group_size)
        if lab.numel() and float(lab.min()) < 0.0:
            raise ValueError(f"labels must be >= 0 for loss='listwise', got min {float(lab.min())}")
        empty = (lab.sum(-1) == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(f"labels of listwise group(s) {empty.tolist()[:8]} sum to 0: no target to normalize")
    if loss == "distill":
        if teacher_scores is None:
            raise ValueError("teacher_scores must be given for loss='distill'")
        check_vector("teacher_scores", teacher_scores, n_rows, device=device)
        check_finite("teacher_scores", teacher_scores, mode)


def _device_label_checks(labels, loss, group_size) -> None:
    """The label value checks of full mode as device-side asserts (no host sync)."""
    if labels is None or not labels.numel():
        return
    lab = labels.detach().double()
    if loss in ("bce", "mse"):
        device_assert(((lab >= 0.0) & (lab <= 1.0)).all(), f"labels must lie in [0, 1] for loss={loss!r}")
    elif loss == "listwise":
        lab = lab.reshape(-1, group_size)
        device_assert((lab >= 0.0).all(), "labels must be >= 0 for loss='listwise'")
        device_assert((lab.sum(-1) > 0).all(), "labels of a listwise group sum to 0: no target to normalize")


def restricted_vocab_score_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    token_ids=(16, 15),
    token_weights=(1.0, -1.0),
    loss: str = "bce",
    group_size: int | None = None,
    teacher_scores: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    checks: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage-2 loss of the restricted-vocabulary score (formulas of ``reference.score_loss_reference``).

    Args:
        hidden, weight, token_ids, token_weights, bias, impl: as in :func:`restricted_vocab_score`.
        labels: [B] or None. bce / mse: soft targets in [0, 1] (required). listwise: None means
            the first item of each group is the positive, else non-negative graded labels
            normalized per group (no group may sum to 0). distill: ignored.
        loss: "bce" | "mse" (sigmoid(s) vs label) | "listwise" (softmax CE per group) |
            "distill" (KL(softmax(teacher / T) || softmax(s / T)) * T^2 per group).
        group_size: items per contiguous group (listwise, distill); must divide B.
        teacher_scores: [B] floats (distill).
        temperature: T > 0 (distill).
        reduction: "mean" (over items, or over groups for listwise / distill) or "sum".
        checks: "full" (label checks on the host, exact messages) | "device" (the same checks as
            device-side asserts, no host sync; the default on CUDA). ``PRORANK_CHECKS``.

    Returns:
        (loss, s): loss is an fp32 scalar; s [B] fp32 is the score it was computed from,
        still attached to the graph (detach it for logging).
    """
    impl, ids, weights = _validate_score_args(hidden, weight, bias, token_ids, token_weights, impl)
    mode = checks_mode(hidden.device, checks)
    _check_loss_args(
        hidden.shape[0], hidden.device, labels, loss, group_size, teacher_scores, temperature, reduction, mode
    )
    s = _score(hidden, weight, bias, ids, weights, impl)
    # O(B) work on the scores: the fp32 reference formulas are the implementation.
    value = reference.score_loss_reference(
        s,
        labels.contiguous() if labels is not None and loss != "distill" else None,
        loss=loss,
        group_size=group_size,
        teacher_scores=teacher_scores.contiguous() if loss == "distill" else None,
        temperature=temperature,
        reduction=reduction,
    )
    return value, s
