"""Stage-1 batches: prompts and completions laid out for one shared-prefix forward
(GroupBatch), a step's rollouts (Rollouts) and their micro-batches of whole groups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from ..packing import budget_batches


@dataclass
class GroupBatch:
    """Prompts (one each) and their completions, laid out for one shared-prefix forward.

    Prompt row: the prompts packed, positions restarting at 0. Completion row: for each
    completion of >= 2 tokens, its tokens but the last, at positions continuing after its
    prompt, attending to its prompt's keys/values. `pred_index` picks, for each completion
    token, the hidden state that predicts it from cat([prompt last states [P], completion row
    states]).
    """

    prompt_ids: torch.Tensor  # [T_p] int64
    prompt_positions: torch.Tensor  # [T_p]
    prompt_lengths: list[int]
    comp_ids: torch.Tensor  # [T_c] int64 (may be empty)
    comp_positions: torch.Tensor  # [T_c]
    comp_prompt: list[int]  # per completion-row sequence: its prompt
    comp_lengths: list[int]  # per completion-row sequence: its tokens
    token_ids: torch.Tensor  # [N] completion tokens (packed, completion-major)
    seq_ids: torch.Tensor  # [N] completion index in [0, S)
    pred_index: torch.Tensor  # [N] into cat([prompt last [P], completion row [T_c]])
    advantages: torch.Tensor  # [S] float32
    num_completions: int
    old_logprobs: torch.Tensor | None = None  # [N]
    ref_logprobs: torch.Tensor | None = None  # [N]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_lengths)

    @property
    def num_tokens(self) -> int:
        """Tokens through the backbone: prompts once, completions once."""
        return int(self.prompt_ids.numel() + self.comp_ids.numel())

    @property
    def num_completion_tokens(self) -> int:
        return int(self.token_ids.numel())

    def to(self, device) -> GroupBatch:
        out = GroupBatch(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for name in ("prompt_ids", "prompt_positions", "comp_ids", "comp_positions", "token_ids", "seq_ids",
                     "pred_index", "advantages", "old_logprobs", "ref_logprobs"):  # fmt: skip
            value = getattr(out, name)
            if value is not None:
                setattr(out, name, value.to(device, non_blocking=True))
        return out


def make_group_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    group_of: list[int],
    advantages: Sequence[float] | torch.Tensor | None = None,
) -> GroupBatch:
    """Lay out prompts and completions (completion s belongs to prompt group_of[s]).

    Completions must be non-empty. Works for any mix of completion lengths.
    """
    if len(group_of) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(group_of)} prompt indices")
    if any(len(c) == 0 for c in completions):
        raise ValueError("a completion has no tokens")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt has no tokens")
    p_lengths = [len(p) for p in prompts]
    prompt_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64)
    prompt_positions = torch.cat([torch.arange(n) for n in p_lengths])
    n_prompts = len(prompts)
    comp_ids, comp_pos, comp_prompt, comp_lengths = [], [], [], []
    token_ids, seq_ids, pred_index = [], [], []
    row = 0
    for s, (comp, p) in enumerate(zip(completions, group_of, strict=True)):
        token_ids += comp
        seq_ids += [s] * len(comp)
        pred_index.append(p)  # the first token: predicted by the prompt's last state
        if len(comp) > 1:
            inputs = comp[:-1]
            comp_ids += inputs
            comp_pos += range(p_lengths[p], p_lengths[p] + len(inputs))
            comp_prompt.append(p)
            comp_lengths.append(len(inputs))
            pred_index += range(n_prompts + row, n_prompts + row + len(inputs))
            row += len(inputs)
    adv = torch.zeros(len(completions)) if advantages is None else torch.as_tensor(advantages, dtype=torch.float32)
    return GroupBatch(
        prompt_ids=prompt_ids,
        prompt_positions=prompt_positions,
        prompt_lengths=p_lengths,
        comp_ids=torch.tensor(comp_ids, dtype=torch.int64),
        comp_positions=torch.tensor(comp_pos, dtype=torch.int64),
        comp_prompt=comp_prompt,
        comp_lengths=comp_lengths,
        token_ids=torch.tensor(token_ids, dtype=torch.int64),
        seq_ids=torch.tensor(seq_ids, dtype=torch.int64),
        pred_index=torch.tensor(pred_index, dtype=torch.int64),
        advantages=adv.float(),
        num_completions=len(completions),
    )


def prompt_ranges(lengths: list[int]) -> list[torch.Tensor]:
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    return [torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]


@dataclass
class Rollouts:
    """A step's prompts, completions and advantages on this rank (group-major)."""

    prompts: list[list[int]]
    labels: list[int]
    completions: list[list[int]]
    advantages: torch.Tensor  # [P * G]
    rewards: torch.Tensor  # [P * G] total
    reward_parts: dict[str, torch.Tensor]
    zero_variance: torch.Tensor  # [P] bool
    group_size: int
    old_logprobs: list[torch.Tensor] | None = None  # per micro-batch of kept groups, [tokens]
    ref_logprobs: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)
    # per completion [its tokens]: log-probs recorded while sampling, as the policy computes them
    sample_logprobs: list[torch.Tensor] | None = None

    def kept_groups(self) -> list[int]:
        """Groups with reward variance: the others have zero advantage and contribute nothing."""
        return [p for p in range(len(self.prompts)) if not bool(self.zero_variance[p])]

    def to_state(self) -> dict:
        """Its fields, for a checkpoint (loop/checkpoint.py encodes the lists, tensors and dicts)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> Rollouts:
        """The inverse of to_state; ValueError if the fields are not a Rollouts'."""
        names = {f.name for f in fields(cls)}
        state = {"sample_logprobs": None, **state}  # checkpoints written before it was recorded
        if set(state) != names:
            raise ValueError(f"fields {sorted(state)}, expected {sorted(names)}")
        tensors = [state[k] for k in ("advantages", "rewards", "zero_variance")] + list(state["reward_parts"].values())
        tensors += [t for k in ("old_logprobs", "ref_logprobs", "sample_logprobs") for t in state[k] or ()]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise ValueError("a tensor field holds something else")
        return cls(**state)

    @classmethod
    def concat(cls, parts: list[Rollouts]) -> Rollouts:
        """Several draws of one step as one (dynamic sampling's refills); advantages stay per group."""
        first = parts[0]
        if len(parts) == 1:
            return first
        if any(p.old_logprobs is not None or p.ref_logprobs is not None for p in parts):
            raise ValueError("concatenate rollouts before computing their old / reference log-probs")
        n = sum(len(p.completions) for p in parts)
        stats = {k: sum(p.extra.get("answer_stats", {}).get(k, 0.0) * len(p.completions) for p in parts) / n
                  for k in first.extra.get("answer_stats", {})}  # fmt: skip
        return cls(
            prompts=[x for p in parts for x in p.prompts],
            labels=[x for p in parts for x in p.labels],
            completions=[x for p in parts for x in p.completions],
            advantages=torch.cat([p.advantages for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]),
            reward_parts={k: torch.cat([p.reward_parts[k] for p in parts]) for k in first.reward_parts},
            zero_variance=torch.cat([p.zero_variance for p in parts]),
            group_size=first.group_size,
            extra={"answer_stats": stats, "draws": len(parts)},
            sample_logprobs=None
            if any(p.sample_logprobs is None for p in parts)
            else [x for p in parts for x in p.sample_logprobs],
        )

    def sampled_logprobs(self, groups: list[int]) -> torch.Tensor | None:
        """[tokens] the sampler's log-probs of `groups`' completion tokens, in group_batch's order."""
        if self.sample_logprobs is None:
            return None
        g = self.group_size
        return torch.cat([self.sample_logprobs[s] for p in groups for s in range(p * g, (p + 1) * g)])

    def group_batch(self, groups: list[int]) -> GroupBatch:
        g = self.group_size
        comps, owner, adv = [], [], []
        for i, p in enumerate(groups):
            comps += self.completions[p * g : (p + 1) * g]
            owner += [i] * g
            adv += self.advantages[p * g : (p + 1) * g].tolist()
        return make_group_batch([self.prompts[p] for p in groups], comps, owner, adv)


def micro_batches(rollouts: Rollouts, groups: list[int], max_tokens: int) -> list[list[int]]:
    """Whole groups per micro-batch, within a token budget (prompt once + its completions)."""
    g = rollouts.group_size
    sizes = [len(rollouts.prompts[p]) + sum(len(c) for c in rollouts.completions[p * g : (p + 1) * g]) for p in groups]
    return [[groups[i] for i in chunk] for chunk in budget_batches(sizes, max_tokens)]


def micro_scale(loss_type: str, tokens: int, seqs: int, tokens_total: float, seqs_total: float) -> float:
    """Factor that turns a micro-batch's loss (normalised over the micro-batch by loss_type)
    into its share of the loss over the whole step (all micro-batches, all ranks). dapo gets
    num_items_in_batch instead and needs none."""
    if loss_type == "dapo":
        return 1.0
    if loss_type == "bnpo":
        return tokens / max(tokens_total, 1.0)
    if loss_type in ("grpo", "dr_grpo"):
        return seqs / max(seqs_total, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")
