"""Stage-1 rewards, pluggable by name, and TRL's group-relative advantages.

A reward function takes `(completions: list[list[int]], labels: list[int], ctx)` and returns
one float per completion; `format` and `correctness` are registered here, a user's own is
registered with `@register_reward(name)` or named as `package.module:function`."""

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


@register_reward("format")
def format_reward(completions, labels, ctx):
    return [1.0 if answer_token(c, ctx) is not None else 0.0 for c in completions]


@register_reward("correctness")
def correctness_reward(completions, labels, ctx):
    want = {1: ctx.output_ids[0], 0: ctx.output_ids[1]}
    return [1.0 if answer_token(c, ctx) == want[label] else 0.0 for c, label in zip(completions, labels, strict=True)]


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
