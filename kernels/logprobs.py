"""Fused linear selective log-probs (+ entropy): the old-policy and reference passes of GRPO.

logp[n] = log_softmax((hidden[n] @ weight.T + bias) / T)[token_ids[n]] without ever holding
the [N, V] logits, on the chunk machinery of lm_head.py: the forward runs the row-stats
kernel per chunk; the backward recomputes the chunk's logits, turns them into dL/dlogits in
place, and does the two gradient GEMMs.
"""

from __future__ import annotations

import torch

from . import _utils
from .lm_head import ROW_OPS, LMHeadChunks, row_stats_op, validate_linear_tokens

# ---------------------------------------------------------------------------------------
# Autograd Function and functional API
# ---------------------------------------------------------------------------------------


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, impl, plan):
        stats = row_stats_op(impl, plan["batch_invariant"])
        inv_t = 1.0 / temperature
        chunks = LMHeadChunks(
            hidden, weight, bias, need_hidden_grad=False, need_weight_grad=False, need_bias_grad=False, **plan
        )
        n = hidden.shape[0]
        logp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp)
        for start, end, raw in chunks:
            logp[start:end], lse[start:end], ent[start:end] = stats(raw, bias, token_ids[start:end], inv_t)
        ctx.save_for_backward(hidden, weight, bias, token_ids, lse, ent)
        ctx.inv_t, ctx.impl, ctx.plan = inv_t, impl, plan
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, token_ids, lse, ent = ctx.saved_tensors
        _, grad_logits = ROW_OPS[ctx.impl]
        need = ctx.needs_input_grad
        chunks = LMHeadChunks(
            hidden, weight, bias, need_hidden_grad=need[0], need_weight_grad=need[1],
            need_bias_grad=bias is not None and need[2], **ctx.plan,
        )  # fmt: skip
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        for start, end, raw in chunks:
            grad_logits(
                raw, bias, token_ids[start:end], lse[start:end], g_logp[start:end], ctx.inv_t,
                None if g_ent is None else g_ent[start:end], ent[start:end],
            )  # fmt: skip
            chunks.backward_chunk(start, end, raw)
        gh, gw, gb = chunks.grads(bias)
        return gh, gw, gb, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    chunk_rows: int | None = None,
    chunk_bytes: int | None = None,
    schedule: str | None = None,
    checks: str | None = None,
    batch_invariant: bool = False,
):
    """Log-probability of ``token_ids`` under the LM head, without materializing [N, V].

    Args:
        hidden: [N, H] states that predict the tokens (any float dtype).
        weight: [V, H] LM head. bias: [V] or None.
        token_ids: [N] integer ids in [0, V).
        temperature: logits are divided by it (TRL's sampling temperature).
        return_entropy: also return the entropy of the full softmax per row.
        impl: "auto" (Triton on CUDA, chunked PyTorch elsewhere), "triton", "torch".
        chunk_rows: rows per logits chunk (default: from chunk_bytes).
        chunk_bytes: byte budget of the transient logits buffers (default 256 MiB on CUDA,
            8 MiB elsewhere; ``PRORANK_CHUNK_BYTES``).
        schedule: "serial" | "overlap" (next chunk's logits GEMM on a side stream while this
            chunk's row kernel and gradient GEMMs run; same results). ``PRORANK_SCHEDULE``.
        checks: "full" (value checks with exact messages; host syncs) | "device" (no host
            sync: device-side asserts). Default ``PRORANK_CHECKS``, else device on CUDA.
        batch_invariant: a row's log-prob is bitwise independent of the other rows (stage 1's
            sampler and policy pass then agree exactly; see ``batch_invariant_linear``).

    Returns:
        logp [N] fp32, or (logp, entropy) with return_entropy; differentiable w.r.t.
        hidden, weight and bias.
    """
    mode = _utils.checks_mode(hidden.device, checks)
    validate_linear_tokens(hidden, weight, token_ids, bias, temperature, mode)
    impl = _utils.resolve_impl(impl, hidden, weight)
    plan = dict(
        chunk_rows=chunk_rows, chunk_bytes=chunk_bytes, schedule=_utils.resolve_schedule(schedule),
        batch_invariant=bool(batch_invariant),
    )  # fmt: skip
    bias = bias.contiguous() if bias is not None else None  # the row kernels index it densely
    logp, ent = _FusedLinearLogprobs.apply(hidden, weight, bias, token_ids.contiguous(), float(temperature), impl, plan)
    return (logp, ent) if return_entropy else logp
