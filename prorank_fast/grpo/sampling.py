"""Stage-1 rollouts: G completions per prompt from one prefill (the prompt's keys and values
are computed once and serve all G), rewarded and turned into group advantages; and greedy
answers on held-out pairs (valid-format rate, accuracy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..modeling.shared_prefix import SharedPrefix
from ..packing import budget_batches
from .batches import Rollouts, prompt_ranges
from .policy import GRPOOptions, PolicyForGRPO
from .prompts import Stage1Prompt
from .rewards import RewardContext, answer_stats, compute_rewards, group_advantages


def _filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (the smallest set of tokens whose probability reaches top_p),
    as transformers' TopPLogitsWarper, on [R, V] fp32 logits."""
    if top_p >= 1.0:
        return logits
    from transformers import TopPLogitsWarper

    return TopPLogitsWarper(top_p=top_p)(None, logits)


def _draw(logits: torch.Tensor, n: int, temperature: float, top_p: float, generator) -> torch.Tensor:
    """[R, V] logits -> [R, n] token ids (greedy when temperature == 0). Drawn where the logits
    are: `generator` lives on their device (no [R, V] copy to the host per decode step)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True).expand(-1, n)
    probs = torch.softmax(_filter_top_p(logits / temperature, top_p), dim=-1)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@torch.no_grad()
def sample_group_completions(
    policy: PolicyForGRPO | torch.nn.Module,
    prompts: list[list[int]],
    *,
    group_size: int,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
    options: GRPOOptions | None = None,
    with_logprobs: bool = False,
):
    """G completions per prompt (group-major: prompt 0's G, then prompt 1's, ...); with
    `with_logprobs`, (completions, their tokens' log-probs: one fp32 CPU tensor per completion).

    All prompts are prefilled together in one packed row; each decode step is one packed row
    of one token per unfinished completion, attending to its prompt's keys/values and its own
    earlier tokens. A completion ends after a stop token or at max_new_tokens. `policy` is
    called as policy(head="sample", ...) so FSDP gathers the head. The log-probs are computed
    as the policy pass computes them (`options`: temperature, batch_invariant): with
    batch_invariant they are the policy pass's own, bit for bit (each token of the policy pass's
    completion row then attends as its decode step here did: PolicyForGRPO._states).
    """
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.int64)
    n_prompts = len(prompts)
    lengths = [len(p) for p in prompts]
    prefix = SharedPrefix()
    prefix.begin_pass([torch.empty(0, dtype=torch.int64)] * n_prompts, lengths, append=True, device=device)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    last = torch.tensor(lengths, device=device).cumsum(0) - 1
    sample = dict(options=options, draw=lambda n: lambda z: _draw(z, n, temperature, top_p, generator))
    tokens, logp = policy(
        head="sample", input_ids=ids, positions=positions, prefix=prefix, rows=last,
        options=sample["options"], draw=sample["draw"](group_size),
    )  # fmt: skip
    tokens, logp = tokens.cpu().reshape(-1), logp.float().cpu().reshape(-1)  # [P*G], group-major
    completions = [[int(t)] for t in tokens]
    logprobs = [[lp] for lp in logp]
    finished = torch.isin(tokens, stop)
    ranges = prompt_ranges(lengths)
    owner = [s // group_size for s in range(n_prompts * group_size)]
    store_pos: list[list[int]] = [[] for _ in completions]  # where each completion's own tokens sit in the store
    for step in range(1, max_new_tokens):
        live = [s for s in range(len(completions)) if not finished[s]]
        if not live:
            break
        # the newest token of each live completion goes in; it attends to its prompt and earlier tokens
        base = prefix.size
        prefix.begin_pass(
            [torch.cat([ranges[owner[s]], torch.tensor(store_pos[s], dtype=torch.int64)]) for s in live],
            [1] * len(live), append=True, device=device,
        )  # fmt: skip
        for i, s in enumerate(live):
            store_pos[s].append(base + i)
        step_ids = torch.tensor([completions[s][-1] for s in live], dtype=torch.int64, device=device)
        step_pos = torch.tensor([lengths[owner[s]] + step - 1 for s in live], dtype=torch.int64, device=device)
        rows = torch.arange(len(live), device=device)
        new, logp = policy(
            head="sample", input_ids=step_ids, positions=step_pos, prefix=prefix, rows=rows,
            options=sample["options"], draw=sample["draw"](1),
        )  # fmt: skip
        new, logp = new.cpu().reshape(-1), logp.float().cpu().reshape(-1)
        stopped = torch.isin(new, stop).tolist()
        for i, (s, token, is_stop) in enumerate(zip(live, new.tolist(), stopped, strict=True)):
            completions[s].append(token)
            logprobs[s].append(logp[i])
            if is_stop:
                finished[s] = True
    if with_logprobs:
        return completions, [torch.stack(lp) for lp in logprobs]
    return completions


@torch.no_grad()
def answer_accuracy(policy, prompts: list[Stage1Prompt], ctx: RewardContext, *, max_new_tokens: int,
                    max_tokens: int, device) -> dict:  # fmt: skip
    """Greedy answers over `prompts`: rewards.answer_stats (valid-format rate and accuracy of the
    answer first, the exact-format rate, the share of each parse grade) and the pair count."""
    was_training = policy.training
    policy.eval()
    all_comps, all_labels = [], []
    for chunk in budget_batches([len(p.ids) for p in prompts], max_tokens):
        comps = sample_group_completions(
            policy, [prompts[i].ids for i in chunk], group_size=1, max_new_tokens=max_new_tokens,
            stop_ids=ctx.stop_ids, temperature=0.0, device=device,
        )  # fmt: skip
        all_comps += comps
        all_labels += [prompts[i].label for i in chunk]
    policy.train(was_training)
    return {**answer_stats(all_comps, all_labels, ctx), "pairs": len(prompts)}


def generate_rollouts(policy, prompts: list[Stage1Prompt], g, ctx: RewardContext, *, generator, max_tokens: int,
                      device, d, max_new_tokens: int | None = None,
                      options: GRPOOptions | None = None) -> Rollouts:  # fmt: skip
    """Sample G completions per prompt (of at most max_new_tokens, default g.max_new_tokens),
    reward them and compute group advantages; the tokens' log-probs as the policy computes them
    under `options` go along (Rollouts.sample_logprobs)."""
    ids = [p.ids for p in prompts]
    completions: list[list[int]] = []
    logprobs: list[torch.Tensor] = []
    for chunk in budget_batches([len(x) for x in ids], max_tokens):  # prefill rows within the micro-batch budget
        comps, lps = sample_group_completions(
            policy, [ids[i] for i in chunk], group_size=g.group_size, max_new_tokens=max_new_tokens or g.max_new_tokens,
            stop_ids=ctx.stop_ids, temperature=g.temperature, top_p=g.top_p, generator=generator, device=device,
            options=options, with_logprobs=True,
        )  # fmt: skip
        completions += comps
        logprobs += lps
    labels = [p.label for p in prompts]
    per_completion = [label for label in labels for _ in range(g.group_size)]
    rewards, parts = compute_rewards(g.rewards, g.reward_weights, completions, per_completion, ctx)
    batch_std = None
    if g.scale_rewards == "batch":  # the batch spans the ranks: its std from global sums
        n, s, s2 = d.all_sum([rewards.numel(), float(rewards.sum()), float((rewards**2).sum())])
        batch_std = math.sqrt(max(0.0, (s2 - s * s / n) / max(n - 1, 1)))
    advantages, zero_var = group_advantages(rewards, g.group_size, g.scale_rewards, batch_std)
    rollouts = Rollouts(ids, labels, completions, advantages.float(), rewards, parts, zero_var, g.group_size)
    rollouts.sample_logprobs = logprobs
    rollouts.extra["answer_stats"] = answer_stats(completions, per_completion, ctx)  # logged whatever the rewards
    return rollouts
