"""Stage-1 rewards, pluggable by name, and TRL's group-relative advantages.

A reward function takes `(completions: list[list[int]], labels: list[int], ctx)` and returns
one float per completion; a user's own is registered with `@register_reward(name)` or named
as `package.module:function`. Registered here:

- `format` / `correctness`: strict. The completion is exactly one output-set token (then the
  end token, if any); correctness also wants it to be the label's token. What held-out
  evaluation measures.
- `graded_format` / `parsed_correctness`: for a model that does not yet answer in format
  (a pretrained chat model writes "Relevance: 1 ..." or prose). `parse_answer` grades a
  completion exact (1.0) > answer token first, then text (0.5) > a standalone answer token
  later (0.25) > none (0), and extracts that answer; parsed_correctness rewards a parsed
  answer that equals the label. So a group of long completions has reward variance long
  before any of them is exactly "1" or "0"."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import Stage1InputError


@dataclass(frozen=True)
class RewardContext:
    """What a reward function may look at besides the completions."""

    output_ids: tuple[int, ...]  # (positive, negative): label 1 -> output_ids[0], label 0 -> output_ids[1]
    stop_ids: tuple[int, ...]
    tokenizer: object = None
    # digit tokens: an answer token next to one is part of a number ("10", "2019"), not an answer
    digit_ids: frozenset[int] = frozenset()


# fn(completions: list[list[int]], labels: list[int], ctx) -> list[float]; labels one per completion
RewardFn = Callable[[list[list[int]], list[int], RewardContext], list[float]]


REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: make a reward function selectable by name in `stage1.rewards`."""

    def wrap(fn: RewardFn) -> RewardFn:
        REWARD_FUNCTIONS[name] = fn
        return fn

    return wrap


def answer_token(completion: Sequence[int], ctx: RewardContext) -> int | None:
    """The answer when the completion is exactly one output-set token, optionally followed by
    the end token; None otherwise."""
    if len(completion) == 1 or (len(completion) == 2 and completion[1] in ctx.stop_ids):
        return completion[0] if completion[0] in ctx.output_ids else None
    return None


# parse_answer's grades and the reward graded_format gives each (ours)
FORMAT_GRADES = {"exact": 1.0, "first": 0.5, "anywhere": 0.25, "none": 0.0}


def parse_answer(completion: Sequence[int], ctx: RewardContext) -> tuple[int | None, str]:
    """(answer token or None, grade): the strict parser of a completion of any length.

    Only the text before the first end token counts. exact: that text is one output-set token
    (nothing may follow the end token). first: it starts with a standalone output-set token.
    anywhere: a standalone output-set token occurs later (the first one is the answer).
    Standalone: neither neighbour is a digit or an output-set token ("10" is no answer).
    """
    end = next((i for i, t in enumerate(completion) if t in ctx.stop_ids), len(completion))
    body = completion[:end]
    if answer_token(completion, ctx) is not None:
        return completion[0], "exact"
    glued = ctx.digit_ids.union(ctx.output_ids)
    for i, token in enumerate(body):
        if token in ctx.output_ids:
            before = body[i - 1] if i > 0 else None
            after = body[i + 1] if i + 1 < len(body) else None
            if before not in glued and after not in glued:
                return token, "first" if i == 0 else "anywhere"
    return None, "none"


def answer_first(completion: Sequence[int], ctx: RewardContext) -> int | None:
    """The answer when the completion starts with it (parse grade exact or first), else None:
    what a reranker reads (the score is the answer position's logits). The held-out
    valid-format rate and accuracy count this; format / correctness (exact) are stricter."""
    answer, grade = parse_answer(completion, ctx)
    return answer if grade in ("exact", "first") else None


def answer_stats(completions, labels, ctx) -> dict[str, float]:
    """Shares over completions: each parse grade (format_exact, ...), valid_format_rate (the answer
    first), accuracy (the answer first and right), exact_format_rate (the answer, then the end),
    and positive_answer_share (of the answers first, the share that say relevant)."""
    n = max(1, len(completions))
    first = [answer_first(c, ctx) for c in completions]
    return {
        **grade_shares(completions, ctx),
        "valid_format_rate": sum(a is not None for a in first) / n,
        "accuracy": sum(a == _wanted(y, ctx) for a, y in zip(first, labels, strict=True)) / n,
        "exact_format_rate": sum(answer_token(c, ctx) is not None for c in completions) / n,
        # near 0 or 1 with format learned: one answer whatever the pair (the collapse to watch for)
        "positive_answer_share": sum(a == ctx.output_ids[0] for a in first) / max(1, sum(a is not None for a in first)),
    }


def _wanted(label: int, ctx: RewardContext) -> int:
    return ctx.output_ids[0] if label == 1 else ctx.output_ids[1]


@register_reward("format")
def format_reward(completions, labels, ctx):
    return [1.0 if answer_token(c, ctx) is not None else 0.0 for c in completions]


@register_reward("correctness")
def correctness_reward(completions, labels, ctx):
    return [1.0 if answer_token(c, ctx) == _wanted(y, ctx) else 0.0 for c, y in zip(completions, labels, strict=True)]


@register_reward("graded_format")
def graded_format_reward(completions, labels, ctx):
    return [FORMAT_GRADES[parse_answer(c, ctx)[1]] for c in completions]


@register_reward("parsed_correctness")
def parsed_correctness_reward(completions, labels, ctx):
    return [
        1.0 if parse_answer(c, ctx)[0] == _wanted(y, ctx) else 0.0 for c, y in zip(completions, labels, strict=True)
    ]


def grade_shares(completions, ctx) -> dict[str, float]:
    """Share of completions per parse_answer grade: {"format_exact": ..., "format_none": ...}."""
    counts = dict.fromkeys(FORMAT_GRADES, 0)
    for c in completions:
        counts[parse_answer(c, ctx)[1]] += 1
    n = max(1, len(completions))
    return {f"format_{k}": v / n for k, v in counts.items()}


def resolve_reward(name: str) -> RewardFn:
    """A registered name, or `package.module:function` (imported; a user's own reward)."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise Stage1InputError(f"stage1.rewards: cannot import {name!r}: {exc}") from exc
        if not callable(fn):
            raise Stage1InputError(f"stage1.rewards: {name!r} is not callable")
        return fn
    raise Stage1InputError(
        f"stage1.rewards: unknown reward {name!r} (registered: {sorted(REWARD_FUNCTIONS)}; or module:function)"
    )


def compute_rewards(names, weights, completions, labels, ctx) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total [S], {name: [S]}): total = sum_i weight_i * reward_i."""
    parts = {}
    total = torch.zeros(len(completions), dtype=torch.float64)
    for name, weight in zip(names, weights, strict=True):
        values = torch.tensor(resolve_reward(name)(completions, labels, ctx), dtype=torch.float64)
        if values.shape != total.shape:
            raise ValueError(f"reward {name!r} returned {values.numel()} values for {len(completions)} completions")
        parts[name] = values
        total += weight * values
    return total, parts


SCALE_REWARDS = ("group", "batch", "none")  # TRL's scale_rewards


def group_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str, batch_std: float | None = None):
    """TRL's group-relative advantages. rewards: [P * G] (group-major) ->
    (advantages [P * G], zero-variance mask [P]).

    scale_rewards: group (divide by the group's std), batch (by the batch's std: pass
    `batch_std` when the batch spans ranks), none. std is torch's unbiased one, + 1e-4, as TRL.
    """
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    advantages = grouped - mean
    if scale_rewards == "group":
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        scale = batch_std if batch_std is not None else float(rewards.std()) if rewards.numel() > 1 else 0.0
        advantages = advantages / (scale + 1e-4)
    elif scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    return advantages.reshape(-1), zero_variance
