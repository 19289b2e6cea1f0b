"""The specification itself: kernels/reference.py against independent transcriptions.

1. TRL 1.16 ``GRPOTrainer._compute_loss`` maths, written here in TRL's padded [B, T] layout
   (no packing, no shared code with the reference), on random data with a fully masked row.
2. Liger's ``LigerFusedLinearGRPOFunction.ppo_loss_fn`` where the two overlap.
Loss, metrics and gradients (autograd) are compared in fp64.
"""

from __future__ import annotations

import pytest
import torch

from prorank_fast.kernels import reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------
# Independent transcription of TRL's padded formulas
# ---------------------------------------------------------------------------------------


def trl_compute_loss(
    per_token_logps,  # [B, T]
    mask,  # [B, T] completion mask (0/1)
    advantages,  # [B]
    old_per_token_logps=None,
    ref_per_token_logps=None,
    entropies=None,
    *,
    beta=0.0,
    epsilon_low=0.2,
    epsilon_high=0.2,
    delta=None,
    loss_type="dapo",
    importance_sampling_level="token",
    max_completion_length=None,
    num_items_in_batch=None,
):
    """TRL 1.16 GRPOTrainer._compute_loss after the forward pass (one process, no grad accumulation)."""
    mask = mask.to(per_token_logps.dtype)
    if beta != 0.0:
        ref = ref_per_token_logps
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1

    advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    else:
        raise ValueError(importance_sampling_level)

    coef_1 = torch.exp(log_importance_weights)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normalizer = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        loss = (per_token_loss * mask).sum() / normalizer
    else:
        raise ValueError(loss_type)

    completion_token_count = mask.sum().clamp(min=1.0)

    def masked_batch_mean(x):
        if x.shape[1] == 1:  # importance_sampling_level == "sequence"
            return x.mean()
        return (x * mask).sum() / completion_token_count

    metrics = {}
    metrics["kl"] = masked_batch_mean(per_token_kl).detach() if beta != 0.0 else torch.zeros(())
    metrics["entropy"] = masked_batch_mean(entropies).detach() if entropies is not None else torch.zeros(())
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    is_region_clipped = is_low_clipped | is_high_clipped
    metrics["clip_ratio_low"] = masked_batch_mean(is_low_clipped.to(mask.dtype))
    metrics["clip_ratio_high"] = masked_batch_mean(is_high_clipped.to(mask.dtype))
    metrics["clip_ratio_region"] = masked_batch_mean(is_region_clipped.to(mask.dtype))
    return loss, metrics


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


def padded_batch(B=5, T=7, dtype=torch.float64, seed=0):
    """Random padded batch: row 1 fully masked, right padding elsewhere, one full row.

    old/ref are spread so that token and sequence ratios land on both sides of the clip range.
    Padded positions hold finite junk (TRL's tensors are finite there).
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(dtype)
    logp = (-torch.rand(B, T, generator=g, dtype=dtype) * 3.0).requires_grad_(True)
    # per-row offset so that sequence-level ratios (means over the row) also leave the clip range
    row_shift = 0.5 * torch.randn(B, 1, generator=g, dtype=dtype)
    old = (logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=dtype) + row_shift).clamp(max=0.0)
    ref = (logp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)).clamp(max=0.0)
    adv = torch.randn(B, generator=g, dtype=dtype)
    adv[2] = 0.0  # zero advantage: never clipped
    entropies = torch.rand(B, T, generator=g, dtype=dtype) * 2.0
    return logp, mask, adv, old, ref, entropies


def pack(mask, *padded):
    """Padded [B, T] -> packed [N] (row-major order) plus seq_ids."""
    m = mask.bool()
    B, T = m.shape
    seq_ids = torch.arange(B)[:, None].expand(B, T)[m]
    return seq_ids, [None if x is None else x[m] for x in padded]


# rtol 1e-7, not 1e-12: reference.grpo_token_weights builds the aggregation weights in fp32 even for
# fp64 log-probs, so the fp64 gold is only good to ~1e-7 relative.
def assert_close(a, b, rtol=1e-7, atol=1e-12, what=""):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    err = (a - b).norm().item()
    bound = rtol * b.norm().item() + atol
    assert err <= bound, f"{what}: |a-b|={err:.3e} > {bound:.3e} (a={a}, b={b})"


CASES = [
    pytest.param(lt, lvl, beta, with_old, id=f"{lt}-{lvl}-beta{beta}-{'old' if with_old else 'noold'}")
    for lt in LOSS_TYPES
    for lvl in LEVELS
    for beta in (0.0, 0.04)
    for with_old in (True, False)
]


# ---------------------------------------------------------------------------------------
# Reference vs TRL transcription
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,level,beta,with_old", CASES)
def test_reference_matches_trl_padded(loss_type, level, beta, with_old):
    logp, mask, adv, old, ref, ent = padded_batch()
    kw = dict(
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=1.5 if with_old else None,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=9 if loss_type == "dr_grpo" else None,
    )
    old_in = old if with_old else None
    trl_loss, trl_metrics = trl_compute_loss(logp, mask, adv, old_in, ref, ent, **kw)
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)

    seq_ids, (p_logp, p_old, p_ref, p_ent) = pack(mask, logp, old_in, ref, ent)
    loss, metrics = reference.grpo_loss_from_logprobs(p_logp, adv, seq_ids, p_old, p_ref, entropy=p_ent, **kw)
    (grad,) = torch.autograd.grad(loss, logp)

    assert torch.isfinite(loss)
    assert_close(loss, trl_loss, what="loss")
    assert_close(grad, trl_grad, what="grad")
    assert grad[1].abs().sum() == 0  # fully masked row gets no gradient
    assert set(metrics) == {"kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region"}
    for key, value in trl_metrics.items():
        assert_close(metrics[key], value, rtol=1e-6, atol=1e-7, what=key)
    if with_old:
        # The data are spread enough for both clip sides to fire (else the test proves little).
        assert trl_metrics["clip_ratio_region"] > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_reference_num_items_in_batch(loss_type):
    logp, mask, adv, old, ref, ent = padded_batch(seed=3)
    kw = dict(
        beta=0.04,
        loss_type=loss_type,
        max_completion_length=8 if loss_type == "dr_grpo" else None,
        num_items_in_batch=37.0,
    )
    trl_loss, _ = trl_compute_loss(logp, mask, adv, old, ref, ent, **kw)
    seq_ids, (p_logp, p_old, p_ref) = pack(mask, logp, old, ref)
    loss, _ = reference.grpo_loss_from_logprobs(p_logp, adv, seq_ids, p_old, p_ref, **kw)
    assert_close(loss, trl_loss, what="loss")
    if loss_type == "dapo":
        # num_items_in_batch really is the normalizer (not the local token count).
        loss_local, _ = reference.grpo_loss_from_logprobs(
            p_logp, adv, seq_ids, p_old, p_ref, **{**kw, "num_items_in_batch": None}
        )
        assert_close(loss * 37.0, loss_local * mask.sum(), what="dapo normalizer")


def test_reference_end_to_end_from_lm_head():
    """grpo_loss_reference (packed hidden) vs TRL on padded [B, T, V] logits, grads of hidden/weight/bias."""
    B, T, H, V, temp = 4, 6, 8, 37, 0.7
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 0, 3, 5])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits0 = (hidden @ weight.t() + bias) / temp
        lp0 = torch.log_softmax(logits0, -1).gather(-1, tokens[..., None])[..., 0]
    old = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    kw = dict(beta=0.04, epsilon_high=0.28, delta=1.5, loss_type="grpo", importance_sampling_level="token")

    logits = (hidden @ weight.t() + bias) / temp
    logsm = torch.log_softmax(logits, -1)
    trl_logp = logsm.gather(-1, tokens[..., None])[..., 0]
    # TRL's entropy_from_logits
    trl_ent = -(torch.softmax(logits, -1) * logsm).sum(-1)
    trl_loss, trl_metrics = trl_compute_loss(trl_logp, mask, adv, old, ref, trl_ent, **kw)
    trl_grads = torch.autograd.grad(trl_loss, (hidden, weight, bias))

    m = mask.bool()
    seq_ids = torch.arange(B)[:, None].expand(B, T)[m]
    loss, metrics = reference.grpo_loss_reference(
        hidden[m], weight, tokens[m], adv, seq_ids, old[m], ref[m], bias=bias, temperature=temp, **kw
    )
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert_close(loss, trl_loss, atol=1e-8, what="loss")  # the loss is a small difference of O(1) terms
    for name, a, b in zip(("hidden", "weight", "bias"), grads, trl_grads, strict=True):
        assert_close(a, b, what=f"grad {name}")
    for key, value in trl_metrics.items():
        assert_close(metrics[key], value, rtol=1e-6, atol=1e-7, what=key)


def test_linear_logprobs_reference_independent():
    """Selective log-softmax = -cross_entropy; entropy = Categorical entropy; temperature divides logits."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(23, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(23, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 23, (9,), generator=g)
    logp, ent = reference.linear_logprobs_reference(hidden, weight, tokens, bias, temperature=0.6)
    logits = (hidden @ weight.t() + bias) / 0.6
    expected = -torch.nn.functional.cross_entropy(logits, tokens, reduction="none")
    assert_close(logp, expected, what="logp")
    assert_close(ent, torch.distributions.Categorical(logits=logits).entropy(), what="entropy")
    assert logp.dtype == torch.float64
    # fp32 / bf16 inputs give fp32 outputs
    lp32, _ = reference.linear_logprobs_reference(hidden.bfloat16(), weight.bfloat16(), tokens)
    assert lp32.dtype == torch.float32


def test_reference_fully_masked_and_empty_sequences():
    """A completion with no tokens counts in S for grpo / dr_grpo / sequence-level clip metrics."""
    logp = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    seq_ids = torch.tensor([0, 0, 2])
    adv = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)  # S = 4: ids 1 and 3 unused
    loss, metrics = reference.grpo_loss_from_logprobs(logp, adv, seq_ids, old, loss_type="grpo")
    # per token: ratio exp(0.5)=1.65 -> clipped at 1.2 (adv>0): -1.2; exp(-1)=0.37, adv>0: -0.368; ratio 1 adv 2: -2
    r1 = min(torch.exp(torch.tensor(0.5)).item(), 1.2)
    r2 = torch.exp(torch.tensor(-1.0)).item()
    expected = (-(r1 + r2) / 2 - 2.0) / 4
    assert abs(loss.item() - expected) < 1e-7 * abs(expected)
    assert metrics["clip_ratio_high"].item() == pytest.approx(1 / 3)
    _, mseq = reference.grpo_loss_from_logprobs(
        logp, adv, seq_ids, old, loss_type="grpo", importance_sampling_level="sequence"
    )
    # sequence 0: mean log ratio 0.5*(0.5-1) = -0.25 -> ratio 0.78, adv>0: no clip; flags over S=4 sequences.
    assert mseq["clip_ratio_region"].item() == 0.0
    logp2 = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    old2 = torch.tensor([-2.0, -1.0], dtype=torch.float64)
    _, mseq2 = reference.grpo_loss_from_logprobs(
        logp2, adv, torch.tensor([0, 2]), old2, importance_sampling_level="sequence"
    )
    assert mseq2["clip_ratio_high"].item() == pytest.approx(2 / 4)  # 2 of 4 sequences, empty ones included


def test_reference_weights_and_errors():
    seq_ids = torch.tensor([0, 1, 1, 1, 3])
    w = reference.grpo_token_weights(seq_ids, 4, "grpo")
    assert torch.allclose(w, torch.tensor([1 / 4, 1 / 12, 1 / 12, 1 / 12, 1 / 4]))
    assert torch.allclose(reference.grpo_token_weights(seq_ids, 4, "bnpo"), torch.full((5,), 0.2))
    w = reference.grpo_token_weights(seq_ids, 4, "dr_grpo", max_completion_length=10)
    assert torch.allclose(w, torch.full((5,), 1 / 40))
    assert torch.allclose(reference.grpo_token_weights(seq_ids, 4, "dapo"), torch.full((5,), 0.2))
    w = reference.grpo_token_weights(seq_ids, 4, "dapo", num_items_in_batch=20, world_size=2)
    assert torch.allclose(w, torch.full((5,), 0.1))
    w = reference.grpo_token_weights(seq_ids, 4, "dapo", world_size=2, global_num_tokens=16)
    assert torch.allclose(w, torch.full((5,), 1 / 8))
    w = reference.grpo_token_weights(seq_ids, 4, "dapo", num_items_in_batch=0.5)
    assert torch.allclose(w, torch.ones(5))  # normalizer clamped to >= 1
    with pytest.raises(ValueError, match="max_completion_length"):
        reference.grpo_token_weights(seq_ids, 4, "dr_grpo")
    with pytest.raises(ValueError, match="loss_type"):
        reference.grpo_token_weights(seq_ids, 4, "ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        reference.grpo_per_token_terms(
            torch.zeros(5), None, None, torch.zeros(4), seq_ids, importance_sampling_level="seq"
        )


# ---------------------------------------------------------------------------------------
# Reference vs Liger's ppo_loss_fn
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type,level,beta,with_old", CASES)
def test_reference_matches_liger_ppo_loss_fn(loss_type, level, beta, with_old):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

    logp, mask, adv, old, ref, _ = padded_batch(seed=7)
    old_in = old if with_old else None
    kw = dict(
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        delta=1.5 if with_old else None,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=9 if loss_type == "dr_grpo" else None,
    )
    liger_loss, liger_metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        per_token_logps=logp,
        attention_mask=mask,
        advantages=adv,
        full_attention_mask=mask,
        ref_per_token_logps=ref,
        old_per_token_logps=old_in,
        **kw,
    )
    (liger_grad,) = torch.autograd.grad(liger_loss, logp)

    seq_ids, (p_logp, p_old, p_ref) = pack(mask, logp, old_in, ref)
    loss, metrics = reference.grpo_loss_from_logprobs(p_logp, adv, seq_ids, p_old, p_ref, **kw)
    (grad,) = torch.autograd.grad(loss, logp)

    assert_close(loss, liger_loss, what="loss")
    assert_close(grad, liger_grad, what="grad")
    assert len(liger_metrics) == (2 if beta != 0.0 else 1)
    if beta != 0.0:
        assert_close(metrics["kl"], liger_metrics[0], rtol=1e-6, atol=1e-7, what="kl")
    # Liger's clip metric is the region ratio, token-weighted at both levels.
    if level == "token":
        expected_clip = metrics["clip_ratio_region"]
    else:
        terms = reference.grpo_per_token_terms(
            p_logp,
            p_old,
            p_ref,
            adv,
            seq_ids,
            **{k: kw[k] for k in ("beta", "epsilon_low", "epsilon_high", "delta", "importance_sampling_level")},
        )
        expected_clip = terms["clip_region"][seq_ids].double().mean()
    assert_close(expected_clip, liger_metrics[-1], rtol=1e-6, atol=1e-7, what="clip_ratio")
    if with_old:
        assert liger_metrics[-1] > 0  # the comparison is not vacuous
