"""Fused linear GRPO loss: LM head + log-softmax + ratio + clip + k3 KL + aggregation.

The loss is a scalar, so its gradients are computed during the forward pass (as Liger's
fused linear cross-entropy does) and only scaled in backward; the [N, V] logits are never
held: rows go through in chunks of one reused [chunk, V] buffer.

Token-level importance sampling (the default) needs one sweep: per chunk, one GEMM gives
the raw logits, one Triton program per row computes the online log-sum-exp, the log-prob
of the sampled token, the entropy, TRL's per-token loss and its derivative, and rewrites
the row in place as dL/dlogits; two GEMMs give the hidden and weight gradients. That is
the three-GEMM minimum (6*N*H*V FLOPs). GEMMs stay in cuBLAS: a Triton tile loop that
fused them would have to recompute the logits for the weight gradient (5 GEMMs), because
dL/dlogits of a row needs the row's full log-sum-exp first.

Sequence-level importance sampling (GSPO) couples every token of a completion through the
mean log-ratio, so it takes two sweeps: log-probs first, then the O(N) loss epilogue,
then the gradient sweep (4 GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _utils, launch_table, reference
from .lm_head import ROW_OPS, LMHeadChunks, row_stats_op, validate_linear_tokens
from .logprobs import fused_linear_logprobs

if _utils.triton_available():
    import triton
    import triton.language as tl

    from .lm_head import block_for_vocab, online_row_stats, write_grad_logits
else:  # pragma: no cover
    triton = None
    tl = None


# ---------------------------------------------------------------------------------------
# Triton: one program per row of a raw-logits chunk, token-level GRPO end to end.
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _grpo_token_math(
        logp, old, ref, adv, c, beta, eps_low, eps_high, delta,
        HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
    ):  # fmt: skip
        """TRL's per-token GRPO term and its derivative d(c * term)/dlogp, torch's
        subgradient conventions included (min splits ties, clamp passes its bounds)."""
        if HAS_OLD:
            coef = tl.exp(logp - old)
        else:
            coef = logp * 0.0 + 1.0  # old = logp.detach(): ratio 1, gradient still flows
        coef_2 = tl.minimum(tl.maximum(coef, 1.0 - eps_low), 1.0 + eps_high)
        d_coef_2 = tl.where((coef >= 1.0 - eps_low) & (coef <= 1.0 + eps_high), coef, 0.0)
        coef_1 = coef
        d_coef_1 = coef
        if HAS_DELTA:
            coef_1 = tl.minimum(coef, delta)
            d_coef_1 = tl.where(coef <= delta, coef, 0.0)
        l1 = coef_1 * adv
        l2 = coef_2 * adv
        w1 = tl.where(l1 < l2, 1.0, tl.where(l1 == l2, 0.5, 0.0))
        policy = -tl.minimum(l1, l2)
        d_policy = -adv * (w1 * d_coef_1 + (1.0 - w1) * d_coef_2)
        kl = logp * 0.0
        d_kl = logp * 0.0
        if USE_KL:
            diff = ref - logp
            e = tl.exp(diff)
            kl = e - diff - 1.0
            d_kl = 1.0 - e
        loss = c * (policy + beta * kl)
        grad = c * (d_policy + beta * d_kl)
        low = ((coef_1 < 1.0 - eps_low) & (adv < 0.0)).to(tl.float32)
        high = ((coef_1 > 1.0 + eps_high) & (adv > 0.0)).to(tl.float32)
        return loss, grad, kl, low, high

    @triton.jit
    def _grpo_token_rows_kernel(
        logits_ptr, stride_row, bias_ptr, tok_ptr, seq_ptr, adv_ptr, old_ptr, ref_ptr, c_ptr,
        logp_ptr, ent_ptr, loss_ptr, kl_ptr, low_ptr, high_ptr,
        V, inv_t, beta, eps_low, eps_high, delta,
        HAS_BIAS: tl.constexpr, HAS_OLD: tl.constexpr, USE_KL: tl.constexpr, HAS_DELTA: tl.constexpr,
        WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_row
        tok = tl.load(tok_ptr + row).to(tl.int64)
        lse, logp, entropy = online_row_stats(row_ptr, bias_ptr, tok, V, inv_t, HAS_BIAS, BLOCK)
        seq = tl.load(seq_ptr + row).to(tl.int64)
        adv = tl.load(adv_ptr + seq).to(tl.float32)
        c = tl.load(c_ptr + row)
        old = logp
        if HAS_OLD:
            old = tl.load(old_ptr + row).to(tl.float32)
        ref = logp
        if USE_KL:
            ref = tl.load(ref_ptr + row).to(tl.float32)
        loss, grad, kl, low, high = _grpo_token_math(
            logp, old, ref, adv, c, beta, eps_low, eps_high, delta, HAS_OLD, USE_KL, HAS_DELTA
        )
        tl.store(logp_ptr + row, logp)
        tl.store(ent_ptr + row, entropy)
        tl.store(loss_ptr + row, loss)
        tl.store(kl_ptr + row, kl)
        tl.store(low_ptr + row, low)
        tl.store(high_ptr + row, high)
        if WRITE_GRAD:
            write_grad_logits(row_ptr, bias_ptr, tok, lse, grad, 0.0, 0.0, V, inv_t, HAS_BIAS, False, BLOCK)


def _triton_token_rows(raw, bias, tok, seq, advantages, old, ref, c, opts, write_grad, out):
    """Launch the token-level kernel on one chunk; fills out[...] slices, dz into raw."""
    rows, V = raw.shape
    if not rows:
        return
    use_kl = opts.beta != 0.0 and ref is not None
    _grpo_token_rows_kernel[(rows,)](
        raw, raw.stride(0), bias if bias is not None else raw, tok, seq, advantages,
        old if old is not None else c, ref if ref is not None else c, c,
        out["logp"], out["entropy"], out["loss"], out["kl"], out["low"], out["high"],
        V, 1.0 / opts.temperature, float(opts.beta), float(opts.epsilon_low), float(opts.epsilon_high),
        float(opts.delta) if opts.delta is not None else 0.0,
        **launch_table.KERNELS["grpo_token_rows"].launch(
            HAS_BIAS=bias is not None, HAS_OLD=old is not None, USE_KL=use_kl, HAS_DELTA=opts.delta is not None,
            WRITE_GRAD=write_grad, BLOCK=block_for_vocab(V),
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# The O(N) epilogue in PyTorch: the reference's formulas, differentiated by autograd.
# ---------------------------------------------------------------------------------------


def _torch_epilogue(logp, old, ref, advantages, seq_ids, c, opts, need_grad):
    """(weighted per-token loss [N], dL/dlogp [N] or None, terms) from the reference."""
    lp = logp.detach().requires_grad_(need_grad)
    with torch.enable_grad():
        terms = reference.grpo_per_token_terms(
            lp, old, ref, advantages, seq_ids,
            beta=opts.beta, epsilon_low=opts.epsilon_low, epsilon_high=opts.epsilon_high,
            delta=opts.delta, importance_sampling_level=opts.importance_sampling_level,
        )  # fmt: skip
        weighted = terms["per_token_loss"] * c
        grad = torch.autograd.grad(weighted.sum(), lp)[0] if need_grad else None
    return weighted.detach(), grad, terms


@dataclass(frozen=True)
class _Options:
    beta: float
    epsilon_low: float
    epsilon_high: float
    delta: float | None
    temperature: float
    loss_type: str
    importance_sampling_level: str
    max_completion_length: int | None
    num_items_in_batch: float | torch.Tensor | None
    impl: str
    chunk_rows: int | None
    chunk_bytes: int | None
    schedule: str
    checks: str  # "full" | "device": whether host syncs are allowed
    batch_invariant: bool


def _world():
    """(world size, whether a process group is up): the dapo normalizer spans all ranks."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), True
    return 1, False


def _token_weights(seq_ids, num_sequences, opts, device):
    world_size, distributed = _world()
    global_tokens = None
    if opts.loss_type == "dapo" and opts.num_items_in_batch is None and distributed:
        count = torch.tensor([float(seq_ids.numel())], device=device)
        torch.distributed.all_reduce(count)
        global_tokens = count if opts.checks == "device" else float(count.item())
    return reference.grpo_token_weights(
        seq_ids, num_sequences, opts.loss_type,
        max_completion_length=opts.max_completion_length, num_items_in_batch=opts.num_items_in_batch,
        world_size=world_size, global_num_tokens=global_tokens,
    ).to(device)  # fmt: skip


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, advantages, seq_ids, old, ref, opts: _Options):
        n, num_seq = hidden.shape[0], advantages.numel()
        need = ctx.needs_input_grad
        chunks = LMHeadChunks(
            hidden, weight, bias, need_hidden_grad=need[0], need_weight_grad=need[1],
            need_bias_grad=bias is not None and need[2], chunk_rows=opts.chunk_rows,
            chunk_bytes=opts.chunk_bytes, schedule=opts.schedule, batch_invariant=opts.batch_invariant,
        )  # fmt: skip
        c = _token_weights(seq_ids, num_seq, opts, hidden.device)
        inv_t = 1.0 / opts.temperature
        stats, grad_logits = row_stats_op(opts.impl, opts.batch_invariant), ROW_OPS[opts.impl][1]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        out = {k: torch.zeros(n, **f32) for k in ("logp", "entropy", "loss", "kl", "low", "high")}
        adv = advantages.float().contiguous()

        if opts.importance_sampling_level == "token":
            for start, end, raw in chunks:
                sl = slice(start, end)
                old_c = old[sl] if old is not None else None
                ref_c = ref[sl] if ref is not None else None
                if opts.impl == "triton":
                    _triton_token_rows(
                        raw, bias, token_ids[sl], seq_ids[sl], adv, old_c, ref_c, c[sl], opts,
                        chunks.needs_grad, {k: v[sl] for k, v in out.items()},
                    )  # fmt: skip
                else:
                    logp, lse, ent = stats(raw, bias, token_ids[sl], inv_t)
                    loss, g, terms = _torch_epilogue(
                        logp, old_c, ref_c, adv, seq_ids[sl], c[sl], opts, chunks.needs_grad
                    )
                    out["logp"][sl], out["entropy"][sl], out["loss"][sl] = logp, ent, loss
                    out["kl"][sl], out["low"][sl], out["high"][sl] = terms["kl"], terms["clip_low"], terms["clip_high"]
                    if chunks.needs_grad:
                        grad_logits(raw, bias, token_ids[sl], lse, g, inv_t)
                if chunks.needs_grad:
                    chunks.backward_chunk(start, end, raw)
            flags = {k: out[k] for k in ("low", "high")}
            flags["region"] = torch.maximum(flags["low"], flags["high"])
            region_tokens = flags["region"].sum() / max(n, 1)
        else:
            lse = torch.empty(n, **f32)
            for start, end, raw in chunks:
                sl = slice(start, end)
                out["logp"][sl], lse[sl], out["entropy"][sl] = stats(raw, bias, token_ids[sl], inv_t)
            loss, g, terms = _torch_epilogue(out["logp"], old, ref, adv, seq_ids, c, opts, chunks.needs_grad)
            out["loss"], out["kl"] = loss, terms["kl"].detach()
            if chunks.needs_grad:
                for start, end, raw in chunks:
                    sl = slice(start, end)
                    grad_logits(raw, bias, token_ids[sl], lse[sl], g[sl].contiguous(), inv_t)
                    chunks.backward_chunk(start, end, raw)
            flags = {k: terms[f"clip_{k}"].float() for k in ("low", "high", "region")}  # [S]
            # Liger weights the per-sequence flag by the sequence's tokens; kept for the drop-in Module
            region_tokens = flags["region"][seq_ids.long()].sum() / max(n, 1)

        grad_hidden, grad_weight, grad_bias = chunks.grads(bias)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.checks, ctx.scaled = opts.checks, False
        denom = max(n, 1)
        # how far from on-policy the batch is: 0.0 when old log-probs are the policy's own, bit for bit
        log_ratio_max = (out["logp"] - old).abs().max() if old is not None and n else torch.zeros((), **f32)
        metrics = [
            out["kl"].sum() / denom if opts.beta != 0.0 else torch.zeros((), **f32),
            out["entropy"].sum() / denom,
            *(flags[k].sum() / max(flags[k].numel(), 1) for k in ("low", "high", "region")),
            log_ratio_max,
            region_tokens,
        ]
        ctx.mark_non_differentiable(*metrics)
        return (out["loss"].sum(), *metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_metric_grads):
        if ctx.checks == "full":
            unit = bool(grad_loss == 1.0)  # one sync; skip scaling [V, H] in the usual loss.backward()
            grads = [None if g is None else (g if unit else g * grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        else:
            # No sync: scale in place (exact for the usual 1.0), once; the gradients were
            # computed in the forward, so a second backward through the graph cannot be served.
            if ctx.scaled:
                raise RuntimeError("fused_linear_grpo_loss: a second backward through one call is not supported")
            ctx.scaled = True
            grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        # hidden, weight, bias, token_ids, advantages, seq_ids, old, ref, opts
        return (*grads, None, None, None, None, None, None)


METRIC_NAMES = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "log_ratio_max")


def _check_number(name, value, *, positive=False, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not isinstance(value, int | float) or not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")


def _as_positive_int(name, value) -> int:
    """Any integral number (int, numpy int, 0-d tensor, 12.0) -> int >= 1, as TRL/Liger accept."""
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if not math.isfinite(as_float) or as_float != int(as_float) or as_float < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(as_float)


def _grpo_call(
    hidden, weight, token_ids, advantages, seq_ids, old_logprobs, ref_logprobs, *,
    bias, beta, epsilon_low, epsilon_high, delta, temperature, loss_type, importance_sampling_level,
    max_completion_length, num_items_in_batch, impl, chunk_rows, chunk_bytes=None, schedule=None, checks=None,
    batch_invariant=False,
):  # fmt: skip
    """Validate, then run; returns (loss, the five metrics, Liger's token-weighted clip ratio)."""
    mode = _utils.checks_mode(hidden.device, checks)
    validate_linear_tokens(hidden, weight, token_ids, bias, temperature, mode)
    n, device = hidden.shape[0], hidden.device
    if not isinstance(advantages, torch.Tensor) or advantages.dim() != 1 or advantages.numel() < 1:
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be a 1-D tensor with one value per completion [S >= 1], got {shape}")
    if advantages.device != device:
        raise ValueError(f"advantages is on {advantages.device} but hidden is on {device}")
    _utils.check_floating("advantages", advantages)
    _utils.check_finite("advantages", advantages, mode)
    _utils.check_vector("seq_ids", seq_ids, n, device=device)
    _utils.check_token_ids("seq_ids", seq_ids, advantages.numel(), mode)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        _utils.check_vector(name, t, n, device=device)
        _utils.check_finite(name, t, mode)
    if loss_type not in reference.LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {reference.LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in reference.IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {reference.IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if max_completion_length is not None:
        max_completion_length = _as_positive_int("max_completion_length", max_completion_length)
    elif loss_type == "dr_grpo":
        raise ValueError("max_completion_length must be given for loss_type='dr_grpo'")
    _check_number("beta", beta)
    _check_number("epsilon_low", epsilon_low)
    _check_number("epsilon_high", epsilon_high)
    _check_number("delta", delta, positive=True, allow_none=True)
    if isinstance(num_items_in_batch, torch.Tensor) and mode == "device":
        # TRL passes a device tensor: keep it there rather than read it back
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be one number, got shape {tuple(num_items_in_batch.shape)}")
        items = num_items_in_batch.detach().reshape(()).double()
        _utils.device_assert(torch.isfinite(items) & (items > 0), "num_items_in_batch must be a finite positive number")
    else:
        _check_number("num_items_in_batch", num_items_in_batch, positive=True, allow_none=True)
        items = None if num_items_in_batch is None else float(num_items_in_batch)
    impl = _utils.resolve_impl(impl, hidden, weight)

    opts = _Options(
        beta=float(beta), epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high),
        delta=None if delta is None else float(delta), temperature=float(temperature), loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
        num_items_in_batch=items, impl=impl, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes,
        schedule=_utils.resolve_schedule(schedule), checks=mode, batch_invariant=bool(batch_invariant),
    )  # fmt: skip
    ref = ref_logprobs.detach().float().contiguous() if ref_logprobs is not None else None
    old = old_logprobs.detach().float().contiguous() if old_logprobs is not None else None
    bias = bias.contiguous() if bias is not None else None  # the row kernels index it densely
    if not torch.is_grad_enabled():
        # needs_input_grad ignores no_grad mode: detach so the forward skips the gradient GEMMs
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    return _FusedLinearGRPO.apply(
        hidden, weight, bias, token_ids.contiguous(), advantages.detach(), seq_ids.contiguous(), old, ref, opts
    )


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    impl: str = "auto",
    chunk_rows: int | None = None,
    chunk_bytes: int | None = None,
    schedule: str | None = None,
    checks: str | None = None,
    batch_invariant: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of packed completions straight from the LM head (TRL's formulas).

    Args:
        hidden: [N, H] states that predict the completion tokens (packed, any float dtype).
        weight: [V, H] LM head; bias: [V] or None. Read inside the caller's forward so FSDP
            has gathered them.
        token_ids: [N] sampled tokens. seq_ids: [N] completion of each token, in [0, S).
        advantages: [S] one per completion (a completion with no tokens still counts in S).
        old_logprobs: [N] behaviour-policy log-probs; None means on-policy (ratio 1).
        ref_logprobs: [N] reference-policy log-probs for the k3 KL; None means no KL term.
        beta: KL weight. epsilon_low / epsilon_high: clip range of the ratio. delta: upper
            clamp of the unclipped ratio (INTELLECT-2). temperature: logits are divided by it.
        loss_type: grpo | bnpo | dr_grpo | dapo (dapo normalizes by num_items_in_batch /
            world size when given, else by the token count summed over ranks / world size).
        importance_sampling_level: token | sequence (GSPO).
        max_completion_length: required by dr_grpo.
        impl: "auto" (Triton on CUDA, chunked PyTorch elsewhere) | "triton" | "torch".
        chunk_rows: rows per logits chunk (default: from chunk_bytes).
        chunk_bytes: byte budget of the transient logits buffers (default 256 MiB on CUDA,
            8 MiB elsewhere; ``PRORANK_CHUNK_BYTES``).
        schedule: "serial" | "overlap" (next chunk's logits GEMM on a side stream while this
            chunk's row kernel and gradient GEMMs run; same results). ``PRORANK_SCHEDULE``.
        checks: "full" (value checks with exact messages; host syncs) | "device" (no host
            sync: device-side asserts; a second backward through one call is refused).
            Default ``PRORANK_CHECKS``, else device on CUDA, full elsewhere.
        batch_invariant: each token's log-prob is bitwise independent of the other rows, so
            that log-probs recorded at sampling time (``fused_linear_logprobs(...,
            batch_invariant=True)`` on the same states) equal the ones computed here.

    Returns:
        (loss, metrics): loss is an fp32 scalar differentiable w.r.t. hidden, weight, bias;
        metrics holds detached scalars kl, entropy, clip_ratio_low, clip_ratio_high,
        clip_ratio_region, as TRL logs them, and log_ratio_max = max |logp - old_logprobs|
        (0 without old log-probs): exactly 0 when the old log-probs are the policy's own.
    """
    loss, *metrics, _ = _grpo_call(
        hidden, weight, token_ids, advantages, seq_ids, old_logprobs, ref_logprobs,
        bias=bias, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        temperature=temperature, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch,
        impl=impl, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes, schedule=schedule, checks=checks,
        batch_invariant=batch_invariant,
    )  # fmt: skip
    return loss, dict(zip(METRIC_NAMES, metrics, strict=True))


_LIGER_ONLY_LOSS_TYPES = ("cispo", "sapo", "luspo", "vespo")


class FusedLinearGRPOLoss(torch.nn.Module):
    """Drop-in for liger_kernel's ``LigerFusedLinearGRPOLoss``: same constructor, same
    forward ([B, T, H] + attention mask), same return value ``(loss, metrics)`` with
    metrics = (kl,) if beta != 0, then (clip_ratio,), computed as Liger computes them.

    ``compiled`` and ``chunk_size`` are accepted for compatibility and have no effect (the
    kernels need no torch.compile and choose their own row chunks). Packing the padded input
    (boolean-mask indexing) reads the mask's count back, one host sync per call that the packed
    :func:`fused_linear_grpo_loss` does not make. Loss types beyond
    grpo / bnpo / dr_grpo / dapo, ``use_bias_correction_kl`` and ``vllm_is_ratio`` are not
    implemented and raise ValueError.
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        impl: str = "auto",
        chunk_rows: int | None = None,
        chunk_bytes: int | None = None,
        schedule: str | None = None,
        checks: str | None = None,
    ):
        super().__init__()
        if loss_type in _LIGER_ONLY_LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r} is not implemented; supported: {reference.LOSS_TYPES}")
        if loss_type not in reference.LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {reference.LOSS_TYPES}, got {loss_type!r}")
        if importance_sampling_level not in reference.IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level must be one of {reference.IMPORTANCE_SAMPLING_LEVELS}, "
                f"got {importance_sampling_level!r}"
            )
        if use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl=True is not implemented")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        _utils.check_temperature(temperature)
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.temperature = temperature
        self.delta = delta
        self.impl = impl
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.schedule = schedule
        self.checks = checks

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
    ):
        """_input [B, T, H], selected_token_ids / attention_mask [B, T], advantages [B],
        ref/old per-token log-probs [B, T]. Returns (loss, metrics tuple)."""
        if vllm_is_ratio is not None:
            raise ValueError("vllm_is_ratio is not implemented")
        if _input.dim() != 3:
            raise ValueError(f"_input must be [B, T, H], got shape {tuple(_input.shape)}")
        if attention_mask.shape != _input.shape[:2] or selected_token_ids.shape != _input.shape[:2]:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and selected_token_ids "
                f"{tuple(selected_token_ids.shape)} must both be [B, T] = {tuple(_input.shape[:2])}"
            )
        mask = attention_mask.bool()
        seq_ids = mask.nonzero()[:, 0]
        hidden = _input[mask]
        tokens = selected_token_ids[mask]
        ref = None
        if self.use_ref_model:
            if ref_per_token_logps is not None:
                ref = ref_per_token_logps[mask]
            elif ref_input is not None:
                with torch.no_grad():
                    ref = fused_linear_logprobs(
                        ref_input[mask], ref_weight, tokens, bias=ref_bias, temperature=self.temperature,
                        impl=self.impl, chunk_rows=self.chunk_rows, chunk_bytes=self.chunk_bytes,
                        schedule=self.schedule, checks=self.checks,
                    )  # fmt: skip
            else:
                raise ValueError("use_ref_model=True needs ref_per_token_logps or ref_input")
        old = old_per_token_logps[mask] if old_per_token_logps is not None else None
        loss, kl, _entropy, _low, _high, _region, _log_ratio_max, region_tokens = _grpo_call(
            hidden, lin_weight, tokens, advantages, seq_ids, old, ref,
            bias=bias, beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
            delta=self.delta, temperature=self.temperature, loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            max_completion_length=self.max_completion_length, num_items_in_batch=num_items_in_batch,
            impl=self.impl, chunk_rows=self.chunk_rows, chunk_bytes=self.chunk_bytes, schedule=self.schedule,
            checks=self.checks,
        )  # fmt: skip
        metrics = (kl, region_tokens) if self.beta != 0.0 else (region_tokens,)
        return loss, metrics
