"""Stage 1's pieces (GRPO prompt warmup with shared-prefix groups); stages/stage1.py runs them.

prompts.py   binary-labelled pairs as template prompts; the ids that end a completion
rewards.py   rewards by name (format, correctness, yours) and TRL's group advantages
batches.py   GroupBatch (one shared-prefix forward), Rollouts, micro-batches of whole groups
policy.py    PolicyForGRPO: the FSDP root whose forward is the fused GRPO loss, log-probs or sampling logits
sampling.py  G completions per prompt from one prefill; rollouts; greedy held-out accuracy
"""

from .batches import GroupBatch, Rollouts, make_group_batch, micro_batches, micro_scale
from .policy import GRPOOptions, PolicyForGRPO
from .prompts import Stage1Prompt, stage1_prompts, stop_token_ids
from .rewards import (
    REWARD_FUNCTIONS,
    RewardContext,
    answer_token,
    compute_rewards,
    correctness_reward,
    format_reward,
    group_advantages,
    register_reward,
    resolve_reward,
)
from .sampling import answer_accuracy, generate_rollouts, sample_group_completions

__all__ = [
    "REWARD_FUNCTIONS",
    "GRPOOptions",
    "GroupBatch",
    "PolicyForGRPO",
    "RewardContext",
    "Rollouts",
    "Stage1Prompt",
    "answer_accuracy",
    "answer_token",
    "compute_rewards",
    "correctness_reward",
    "format_reward",
    "generate_rollouts",
    "group_advantages",
    "make_group_batch",
    "micro_batches",
    "micro_scale",
    "register_reward",
    "resolve_reward",
    "sample_group_completions",
    "stage1_prompts",
    "stop_token_ids",
]
