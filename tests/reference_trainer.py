"""A plain stage-2 trainer from transformers and torch alone: the check that a whole training step
of prorank-fast (packing, varlen attention, the fused restricted-vocabulary loss, the loop) is the
update a straightforward implementation makes.

What it shares with the trainer is data, never arithmetic: the tokenized groups, the initial
weights, and which groups each optimizer step sees (the step plan). Everything else is written
here as a plain implementation would: a right-padded batch with an attention mask, the model's own
forward in its stock SDPA attention with full [B, T, V] logits, the score z[id_1] * w_1 + z[id_0] *
w_0 at each sequence's last real token, the listwise or BCE loss typed out from their definitions,
torch.optim.AdamW, warmup + cosine through LambdaLR, clip_grad_norm_.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 over the rest."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A stock transformers model (SDPA attention) with `model`'s weights."""
    plain = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa", dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def _micro_batch_loss(model, groups, output_ids, token_weights, loss: str, pad_id: int) -> tuple[torch.Tensor, int]:
    """Summed loss of the groups (one term per group for listwise, per sequence for bce) and the count."""
    seqs = [seq for g in groups for seq in g.input_ids]
    labels = torch.tensor([y for g in groups for y in g.labels], dtype=torch.float32)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # [B, T, V]
    last = logits[torch.arange(len(seqs)), mask.sum(1) - 1]  # [B, V]
    scores = sum(w * last[:, i] for i, w in zip(output_ids, token_weights, strict=True))
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(scores, labels, reduction="sum"), len(seqs)
    if loss == "listwise":
        size = len(groups[0].input_ids)
        log_p = torch.log_softmax(scores.reshape(-1, size), dim=-1)
        target = labels.reshape(-1, size)
        target = target / target.sum(-1, keepdim=True)
        return -(target * log_p).sum(), len(groups)
    raise ValueError(f"the reference trains listwise or bce, not {loss!r}")


def train_reference(model, groups, plan_steps, *, output_ids, token_weights, loss: str, lr: float,
                    warmup_ratio: float, betas, weight_decay: float, max_grad_norm: float,
                    pad_id: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:  # fmt: skip
    """Train `model` (changed in place) over `plan_steps` (per step, its micro-batches as lists of
    group indices); returns each step's loss (the mean over its groups or pairs) and the final
    state dict."""
    total = len(plan_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8)
    warmup = int(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    model.train()
    losses = []
    for micro_batches in plan_steps:
        units = sum(len(ids) if loss == "listwise" else sum(len(groups[i].input_ids) for i in ids)
                    for ids in micro_batches)  # fmt: skip
        step_loss = 0.0
        for ids in micro_batches:
            summed, _ = _micro_batch_loss(model, [groups[i] for i in ids], output_ids, token_weights, loss, pad_id)
            (summed / units).backward()
            step_loss += float(summed.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(step_loss / units)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
