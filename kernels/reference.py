"""fp32 PyTorch references: the specification every kernel is tested against.

Plain, readable, materializing code. The GRPO formulas are TRL's
``GRPOTrainer._compute_loss`` (trl 1.16) transcribed to the packed layout used across
prorank-fast: completion tokens of all sequences are concatenated into N rows and
``seq_ids[n]`` says which of the S completions row n belongs to (a completion with no
rows is a "fully masked" completion: it still counts in S).

Mapping to TRL's padded [B, T] layout (mask = completion_mask):
  per_token_logps[b, t]  <->  logp[n]  for the rows n with seq_ids[n] == b, in order
  mask.sum(-1)[b]        <->  seq_lengths[b]
  B                      <->  S = advantages.numel()

The chunked PyTorch path reuses :func:`grpo_per_token_terms` and
:func:`grpo_token_weights` below (autograd gives it dL/dlogp); the Triton path has its
own fused epilogue and is tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCORE_LOSSES = ("bce", "mse", "listwise", "distill")


# ---------------------------------------------------------------------------------------
# LM head -> selective log-probs (+ entropy)
# ---------------------------------------------------------------------------------------


def linear_logits_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """[N, H] x [V, H] -> fp32 (or fp64 for fp64 inputs) logits [N, V], divided by temperature."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits / temperature


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective log-softmax and entropy of the temperature-scaled LM-head logits.

    Returns (logp [N], entropy [N]); logp is differentiable w.r.t. hidden, weight and bias,
    entropy too (TRL's ``entropy_from_logits``: -sum p log p over the full vocabulary).
    """
    logits = linear_logits_reference(hidden, weight, bias, temperature)
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------------------
# GRPO: per-token terms, aggregation weights, the loss
# ---------------------------------------------------------------------------------------


def seq_lengths(seq_ids: torch.Tensor, num_sequences: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Number of completion tokens per sequence, [S] (TRL's ``mask.sum(-1)``).

    index_add, not bincount: bincount sizes its output from the data (a host sync on CUDA)."""
    ones = torch.ones(seq_ids.shape, dtype=dtype, device=seq_ids.device)
    return torch.zeros(num_sequences, dtype=dtype, device=seq_ids.device).index_add_(0, seq_ids.long(), ones)


def grpo_token_weights(
    seq_ids: torch.Tensor,
    num_sequences: int,
    loss_type: str,
    *,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    world_size: int = 1,
    global_num_tokens: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Aggregation weight c_n of each token, so that loss = sum_n c_n * per_token_loss_n.

    grpo:    mean over sequences of the per-sequence token mean: 1 / (S * max(len_s, 1))
    bnpo:    token mean over the batch:                         1 / max(N, 1)
    dr_grpo: 1 / (S * max_completion_length)
    dapo:    1 / normalizer, normalizer = num_items_in_batch / world_size when given, else the
             token count summed over ranks / world_size (Liger's ``_compute_dapo_normalizer``;
             TRL passes ``num_items_in_batch``); clamped to >= 1. A tensor count stays on its
             device (no host sync).
    """
    n = seq_ids.numel()
    device = seq_ids.device
    if loss_type == "grpo":
        lengths = seq_lengths(seq_ids, num_sequences, dtype).clamp(min=1.0)
        return 1.0 / (num_sequences * lengths[seq_ids.long()])
    if loss_type == "bnpo":
        return torch.full((n,), 1.0 / max(n, 1), device=device, dtype=dtype)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length must be given for loss_type='dr_grpo'")
        return torch.full((n,), 1.0 / (num_sequences * max_completion_length), device=device, dtype=dtype)
    if loss_type == "dapo":
        count = num_items_in_batch if num_items_in_batch is not None else global_num_tokens
        if isinstance(count, torch.Tensor):
            normalizer = (count.to(device=device, dtype=torch.float64).reshape(()) / world_size).clamp(min=1.0)
            return (1.0 / normalizer).to(dtype).expand(n).contiguous()
        normalizer = (float(n) if count is None else float(count)) / world_size
        return torch.full((n,), 1.0 / max(normalizer, 1.0), device=device, dtype=dtype)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def grpo_per_token_terms(
    logp: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
) -> dict[str, torch.Tensor]:
    """TRL's per-token GRPO loss in the packed layout (differentiable w.r.t. logp).

    Returns per_token_loss [N] (policy term + beta * kl), kl [N] (zeros when beta == 0 or
    ref_logprobs is None), and the clip flags low / high / region: [N] for token-level
    importance sampling, [S] for sequence level (TRL logs them per sequence then).
    """
    num_sequences = advantages.numel()
    ids = seq_ids.long()
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    log_ratio = logp - old
    adv = advantages.to(logp.dtype)
    if importance_sampling_level == "token":
        log_w = log_ratio
        adv_w = adv[ids]
    elif importance_sampling_level == "sequence":
        lengths = seq_lengths(seq_ids, num_sequences, logp.dtype).clamp(min=1.0)
        seq_sum = torch.zeros(num_sequences, dtype=logp.dtype, device=logp.device).index_add(0, ids, log_ratio)
        log_w = seq_sum / lengths  # [S]
        adv_w = adv
    else:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {importance_sampling_level!r}"
        )

    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    policy = -torch.min(coef_1 * adv_w, coef_2 * adv_w)
    if importance_sampling_level == "sequence":
        policy = policy[ids]

    if beta != 0.0 and ref_logprobs is not None:
        d = ref_logprobs.to(logp.dtype) - logp
        kl = torch.exp(d) - d - 1
        per_token_loss = policy + beta * kl
    else:
        # Liger treats a missing reference as the current policy itself: kl == 0.
        kl = torch.zeros_like(logp)
        per_token_loss = policy

    is_low = (coef_1 < 1 - epsilon_low) & (adv_w < 0)
    is_high = (coef_1 > 1 + epsilon_high) & (adv_w > 0)
    return {
        "per_token_loss": per_token_loss,
        "kl": kl,
        "clip_low": is_low,
        "clip_high": is_high,
        "clip_region": is_low | is_high,
    }


def grpo_metrics(terms: dict[str, torch.Tensor], entropy: torch.Tensor | None, beta: float) -> dict[str, torch.Tensor]:
    """TRL's logged metrics: token means of kl and entropy; clip ratios as TRL's global masked
    means, i.e. over tokens at token level and over sequences (fully masked ones included)
    at sequence level, where the flags are [S]."""
    n_tok = max(terms["kl"].numel(), 1)
    zero = terms["kl"].new_zeros((), dtype=torch.float32)
    metrics = {
        "kl": terms["kl"].detach().float().sum() / n_tok if beta != 0.0 else zero,
        "entropy": entropy.detach().float().sum() / n_tok if entropy is not None else zero,
    }
    for key in ("low", "high", "region"):
        flag = terms[f"clip_{key}"]
        metrics[f"clip_ratio_{key}"] = flag.float().sum() / max(flag.numel(), 1)
    return metrics


def grpo_loss_from_logprobs(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    old_logprobs: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    *,
    entropy: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
    world_size: int = 1,
    global_num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO loss of packed per-token log-probs: (scalar loss, metrics)."""
    terms = grpo_per_token_terms(
        logp,
        old_logprobs,
        ref_logprobs,
        advantages,
        seq_ids,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        importance_sampling_level=importance_sampling_level,
    )
    weights = grpo_token_weights(
        seq_ids,
        advantages.numel(),
        loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
        world_size=world_size,
        global_num_tokens=global_num_tokens,
        dtype=logp.dtype,
    )
    loss = (terms["per_token_loss"] * weights).sum()
    metrics = grpo_metrics(terms, entropy, beta)
    return loss, metrics


def grpo_loss_reference(
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Materializing fp32 reference of ``fused_linear_grpo_loss`` (same signature, no impl)."""
    logp, entropy = linear_logprobs_reference(hidden, weight, token_ids, bias, temperature)
    return grpo_loss_from_logprobs(
        logp,
        advantages,
        seq_ids,
        old_logprobs,
        ref_logprobs,
        entropy=entropy,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        delta=delta,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items_in_batch,
    )


# ---------------------------------------------------------------------------------------
# Restricted-vocabulary score and its losses (stage 2)
# ---------------------------------------------------------------------------------------


def restricted_vocab_score_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids=(16, 15),
    token_weights=(1.0, -1.0),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """s[b] = sum_k w_k * z[b, token_k] with z = hidden @ weight.T (+ bias): [B] fp32.

    The default (16, 15) / (1, -1) is z["1"] - z["0"] with the Qwen2 tokenizer.
    """
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    ids = torch.as_tensor(token_ids, device=weight.device, dtype=torch.long)
    w = torch.as_tensor(token_weights, device=weight.device, dtype=dtype)
    z = hidden.to(dtype) @ weight[ids].to(dtype).t()  # [B, K]
    if bias is not None:
        z = z + bias[ids].to(dtype)
    return z @ w


def score_loss_reference(
    scores: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    loss: str = "bce",
    group_size: int | None = None,
    teacher_scores: torch.Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Loss of scores [B] (mean over items, or over groups for the listwise losses; ``sum`` sums).

    bce:      binary cross-entropy with logits; labels are soft targets in [0, 1].
    mse:      (sigmoid(s) - label)^2.
    listwise: softmax cross-entropy over contiguous groups of ``group_size``; the target is the
              first item of each group when labels is None, else labels / labels.sum() per group
              (graded or multi-positive groups).
    distill:  KL(softmax(teacher / T) || softmax(s / T)) per group, times T^2
              (sentence-transformers' DistillKLDivLoss convention).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    if loss == "bce":
        per_item = F.binary_cross_entropy_with_logits(s, labels.to(s.dtype), reduction="none")
    elif loss == "mse":
        per_item = (torch.sigmoid(s) - labels.to(s.dtype)) ** 2
    elif loss == "listwise":
        groups = s.reshape(-1, group_size)
        logsm = torch.log_softmax(groups, dim=-1)
        if labels is None:
            target = torch.zeros_like(groups)
            target[:, 0] = 1.0
        else:
            lab = labels.to(s.dtype).reshape(-1, group_size)
            target = lab / lab.sum(-1, keepdim=True)
        per_item = -(target * logsm).sum(-1)
    elif loss == "distill":
        groups = s.reshape(-1, group_size) / temperature
        teacher = teacher_scores.to(s.dtype).reshape(-1, group_size) / temperature
        log_q = torch.log_softmax(groups, dim=-1)
        log_p = torch.log_softmax(teacher, dim=-1)
        per_item = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    else:
        raise ValueError(f"loss must be one of {SCORE_LOSSES}, got {loss!r}")
    return per_item.sum() if reduction == "sum" else per_item.mean()
