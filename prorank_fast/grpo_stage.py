"""Stage 1: GRPO prompt warmup with shared-prefix groups.

The model reads a relevance prompt and must answer with one token of the output set
("1" relevant / "0" not). Per prompt: G completions are sampled from one prefill (the
prompt's keys and values are computed once and serve all G), rewarded (format +
correctness, pluggable by name), turned into group-relative advantages (TRL's
scale_rewards), and trained with `fused_linear_grpo_loss`.

The policy pass shares the prefix too: a packed row of prompts runs once with gradients,
and a second packed row holds the completions' input tokens, whose attention reads the
prompt keys/values (attention.SharedPrefix). One-token completions need no second row: the
hidden state at each prompt's last position predicts every completion's only token, so a
whole group is one forward. Nothing is ever prefilled or backpropagated G times.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from prorank_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs

from .attention import SharedPrefix
from .model import backbone, lm_head_weight

# ---------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------


class Stage1InputError(ValueError):
    """Stage-1 input that cannot be used (labels, empty prompts, settings); names the source."""


@dataclass
class Stage1Prompt:
    """One binary-labelled (query, document) prompt, tokenized with the template."""

    ids: list[int]
    label: int  # 1 relevant, 0 not
    source: str  # "file:line" of the record


def stage1_prompts(examples, tokenizer, template, *, max_length: int, min_query_tokens: int, instruction=None):
    """Every (query, document, label) of `examples` as a Stage1Prompt.

    Raises Stage1InputError (naming the record) for a label outside {0, 1} or an empty
    query / document: checked for all records before any prompt is built.
    """
    for ex in examples:
        if not ex.query.strip():
            raise Stage1InputError(f"{ex.source}: field 'query': empty query (stage 1 needs a prompt)")
        for k, (doc, label) in enumerate(zip(ex.docs, ex.labels, strict=True)):
            if label not in (0, 1):
                raise Stage1InputError(
                    f"{ex.source}: field 'label' (document {k}): stage 1 needs binary labels 0/1, got {label!r}"
                )
            if not doc.strip():
                raise Stage1InputError(f"{ex.source}: field 'document' (document {k}): empty document")
    prompts = []
    for ex in examples:
        for doc, label in zip(ex.docs, ex.labels, strict=True):
            ids = template.build(
                tokenizer, ex.query, doc, instruction=ex.instruction or instruction,
                max_length=max_length, min_query_tokens=min_query_tokens,
            )  # fmt: skip
            prompts.append(Stage1Prompt(ids, int(label), ex.source))
    if not prompts:
        raise Stage1InputError("stage 1: no prompts in the training data")
    return prompts


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """End-of-turn / EOS ids that end a completion: <|im_end|> (Qwen chat) and eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(int(im_end))
    return tuple(sorted(ids))


# ---------------------------------------------------------------------------------------
# Rewards: pluggable by name
# ---------------------------------------------------------------------------------------


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
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group | batch | none, got {scale_rewards!r}")
    zero_variance = (grouped == grouped[:, :1]).all(dim=1)
    return advantages.reshape(-1), zero_variance


# ---------------------------------------------------------------------------------------
# Shared-prefix batches
# ---------------------------------------------------------------------------------------


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


def _prompt_ranges(lengths: list[int]) -> list[torch.Tensor]:
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    return [torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]


@dataclass
class GRPOOptions:
    """The fused loss's options (stage1 section of a recipe)."""

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    temperature: float = 1.0
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None


class PolicyForGRPO(torch.nn.Module):
    """Wraps a *ForCausalLM for stage 1; it is the FSDP root, so the LM head is read inside
    its forward (after FSDP gathered it), as in score_stage.RerankerForTraining.

    forward(batch, head=...):
      "grpo"     -> (loss, metrics): fused_linear_grpo_loss over the batch's completion tokens
      "logprobs" -> [N] log-probs of the completion tokens (old / reference passes)
      "sample"   -> [rows, V] logits at `rows` of a pass described by `prefix` (sampling)
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def _decoder(self, input_ids, positions, prefix: SharedPrefix) -> torch.Tensor:
        out = backbone(self.lm)(
            input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False,
            shared_prefix=prefix,
        )  # fmt: skip
        return out.last_hidden_state[0]

    def completion_states(self, batch: GroupBatch) -> torch.Tensor:
        """[N, H]: for each completion token, the hidden state that predicts it."""
        device = batch.prompt_ids.device
        prefix = SharedPrefix()
        prefix.begin_pass(
            [torch.empty(0, dtype=torch.int64)] * batch.num_prompts, batch.prompt_lengths, append=True, device=device
        )
        prompt_states = self._decoder(batch.prompt_ids, batch.prompt_positions, prefix)
        last = torch.tensor(batch.prompt_lengths, device=device).cumsum(0) - 1
        states = [prompt_states.index_select(0, last)]
        if batch.comp_lengths:
            ranges = _prompt_ranges(batch.prompt_lengths)
            prefix.begin_pass([ranges[p] for p in batch.comp_prompt], batch.comp_lengths, append=False, device=device)
            states.append(self._decoder(batch.comp_ids, batch.comp_positions, prefix))
        return torch.cat(states).index_select(0, batch.pred_index)

    def forward(self, batch=None, *, head: str = "grpo", options: GRPOOptions | None = None,
                num_items_in_batch=None, input_ids=None, positions=None, prefix=None, rows=None):  # fmt: skip
        weight = lm_head_weight(self.lm)
        if head == "sample":
            states = self._decoder(input_ids, positions, prefix).index_select(0, rows)
            return (states @ weight.t()).float()  # in the head's dtype: no fp32 copy of [V, H] per call
        hidden = self.completion_states(batch)
        if head == "logprobs":
            t = options.temperature if options is not None else 1.0
            return fused_linear_logprobs(hidden, weight, batch.token_ids, temperature=t)
        if head != "grpo":
            raise ValueError(f"head must be grpo | logprobs | sample, got {head!r}")
        o = options or GRPOOptions()
        return fused_linear_grpo_loss(
            hidden, weight, batch.token_ids, batch.advantages, batch.seq_ids,
            old_logprobs=batch.old_logprobs, ref_logprobs=batch.ref_logprobs if o.beta else None,
            beta=o.beta, epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high, delta=o.delta,
            temperature=o.temperature, loss_type=o.loss_type, importance_sampling_level=o.importance_sampling_level,
            max_completion_length=o.max_completion_length, num_items_in_batch=num_items_in_batch,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Sampling: one prefill per prompt, G completions from its keys/values
# ---------------------------------------------------------------------------------------


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
) -> list[list[int]]:
    """G completions per prompt (group-major: prompt 0's G, then prompt 1's, ...).

    All prompts are prefilled together in one packed row; each decode step is one packed row
    of one token per unfinished completion, attending to its prompt's keys/values and its own
    earlier tokens. A completion ends after a stop token or at max_new_tokens. `policy` is
    called as policy(head="sample", ...) so FSDP gathers the head.
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
    logits = policy(head="sample", input_ids=ids, positions=positions, prefix=prefix, rows=last)
    tokens = _draw(logits, group_size, temperature, top_p, generator).cpu().reshape(-1)  # [P*G]
    completions = [[int(t)] for t in tokens]
    finished = torch.isin(tokens, stop)
    ranges = _prompt_ranges(lengths)
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
        logits = policy(head="sample", input_ids=step_ids, positions=step_pos, prefix=prefix, rows=rows)
        new = _draw(logits, 1, temperature, top_p, generator).cpu().reshape(-1)
        stopped = torch.isin(new, stop).tolist()
        for s, token, is_stop in zip(live, new.tolist(), stopped, strict=True):
            completions[s].append(token)
            if is_stop:
                finished[s] = True
    return completions


# ---------------------------------------------------------------------------------------
# Evaluation: greedy answers on held-out pairs
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def answer_accuracy(policy, prompts: list[Stage1Prompt], ctx: RewardContext, *, max_new_tokens: int,
                    max_tokens: int, device) -> dict:  # fmt: skip
    """Greedy answers: valid-format rate and accuracy (answer == label) over `prompts`."""
    was_training = policy.training
    policy.eval()
    valid = correct = 0
    for chunk in _chunks_by_tokens([len(p.ids) for p in prompts], max_tokens):
        comps = sample_group_completions(
            policy, [prompts[i].ids for i in chunk], group_size=1, max_new_tokens=max_new_tokens,
            stop_ids=ctx.stop_ids, temperature=0.0, device=device,
        )  # fmt: skip
        labels = [prompts[i].label for i in chunk]
        valid += sum(format_reward(comps, labels, ctx))
        correct += sum(correctness_reward(comps, labels, ctx))
    policy.train(was_training)
    n = max(1, len(prompts))
    return {"valid_format_rate": valid / n, "accuracy": correct / n, "pairs": len(prompts)}


def _chunks_by_tokens(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive index chunks whose token total stays within budget (one at least)."""
    chunks, current, used = [], [], 0
    for i, size in enumerate(sizes):
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += size
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------------------------------
# One optimizer step's rollouts
# ---------------------------------------------------------------------------------------


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
    old_logprobs: list[torch.Tensor] | None = None  # per kept group, [tokens] (num_iterations > 1)
    ref_logprobs: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)

    def kept_groups(self) -> list[int]:
        """Groups with reward variance: the others have zero advantage and contribute nothing."""
        return [p for p in range(len(self.prompts)) if not bool(self.zero_variance[p])]

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
    return [[groups[i] for i in chunk] for chunk in _chunks_by_tokens(sizes, max_tokens)]


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


def mean_completion_length(completions: list[list[int]]) -> float:
    return sum(len(c) for c in completions) / max(1, len(completions))


# ---------------------------------------------------------------------------------------
# The stage: rollouts + policy update in the one loop
# ---------------------------------------------------------------------------------------

METRIC_KEYS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region")


def _generator(seed: int, batch_index: int, rank: int, device) -> torch.Generator:
    """Sampling RNG of one rollout batch, on the device that samples: follows from (seed, batch,
    rank) alone, so a resumed run draws what an uninterrupted one drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index * 7_919 + rank) % (2**63))


def _prompt_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10_007 + epoch)).tolist()


def generate_rollouts(policy, prompts: list[Stage1Prompt], g, ctx: RewardContext, *, generator, max_tokens: int,
                      device, d) -> Rollouts:  # fmt: skip
    """Sample G completions per prompt, reward them and compute group advantages."""
    ids = [p.ids for p in prompts]
    completions: list[list[int]] = []
    for chunk in _chunks_by_tokens([len(x) for x in ids], max_tokens):  # prefill rows within the micro-batch budget
        completions += sample_group_completions(
            policy, [ids[i] for i in chunk], group_size=g.group_size, max_new_tokens=g.max_new_tokens,
            stop_ids=ctx.stop_ids, temperature=g.temperature, top_p=g.top_p, generator=generator, device=device,
        )  # fmt: skip
    labels = [p.label for p in prompts]
    per_completion = [label for label in labels for _ in range(g.group_size)]
    rewards, parts = compute_rewards(g.rewards, g.reward_weights, completions, per_completion, ctx)
    batch_std = None
    if g.scale_rewards == "batch":  # the batch spans the ranks: its std from global sums
        n, s, s2 = d.all_sum([rewards.numel(), float(rewards.sum()), float((rewards**2).sum())])
        batch_std = math.sqrt(max(0.0, (s2 - s * s / n) / max(n - 1, 1)))
    advantages, zero_var = group_advantages(rewards, g.group_size, g.scale_rewards, batch_std)
    for name, fn in (("format", format_reward), ("correctness", correctness_reward)):
        if name not in parts:  # the step's format rate / accuracy are logged whatever the rewards
            parts[name] = torch.tensor(fn(completions, per_completion, ctx), dtype=torch.float64)
    return Rollouts(ids, labels, completions, advantages.float(), rewards, parts, zero_var, g.group_size)


def run_stage1(cfg, prep, d, out) -> dict:
    """GRPO prompt warmup of prep.model (trained in place) with cfg.stage1; checkpoints,
    metrics.jsonl, curves.png and final/ under `out`. A finished stage (out/summary.json)
    is not run again: a resumed chain goes straight on to stage 2."""
    import copy
    import json
    from pathlib import Path

    from . import pipeline
    from .trainer import LoopSettings, _atomic_write, run_loop, shard

    out = Path(out)
    done_marker = out / "summary.json"
    if done_marker.exists():
        return json.loads(done_marker.read_text())
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    g, tcfg = cfg.stage1, cfg.train
    for name in g.rewards:
        resolve_reward(name)  # an unknown reward fails before any work
    prompts = prep.stage1_prompts
    if len(prompts) < g.prompts_per_step:
        raise Stage1InputError(
            f"stage 1: {len(prompts)} training pairs, fewer than stage1.prompts_per_step={g.prompts_per_step}"
        )
    options = GRPOOptions(
        beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, delta=g.delta,
        temperature=g.temperature if g.temperature > 0 else 1.0, loss_type=g.loss_type,
        importance_sampling_level=g.importance_sampling_level, max_completion_length=g.max_new_tokens,
    )  # fmt: skip
    reference = None
    if g.beta > 0:  # a frozen copy of the starting weights, sharded like the policy
        ref_lm = copy.deepcopy(prep.model).requires_grad_(False)
        reference = shard(PolicyForGRPO(ref_lm), d, compile_layers=False).eval()
    policy = shard(PolicyForGRPO(prep.model), d, compile_layers=cfg.model.compile)
    ctx = RewardContext(tuple(prep.output_ids), stop_token_ids(prep.tokenizer), prep.tokenizer)
    batches_per_epoch = len(prompts) // g.prompts_per_step

    def evaluate() -> dict:
        if not prep.stage1_eval_prompts:
            return {}
        return answer_accuracy(
            policy, prep.stage1_eval_prompts, ctx, max_new_tokens=g.max_new_tokens, max_tokens=tcfg.max_tokens,
            device=d.device,
        )  # fmt: skip

    def rollouts_for(step: int, state: dict) -> Rollouts:
        index = step // g.num_iterations
        kept = state.get("rollouts")
        if kept is not None and kept[0] == index:
            return kept[1]
        epoch, offset = divmod(index, batches_per_epoch)
        order = _prompt_order(len(prompts), tcfg.seed, epoch)
        chosen = order[offset * g.prompts_per_step : (offset + 1) * g.prompts_per_step][d.rank :: d.world]
        rollouts = generate_rollouts(
            policy, [prompts[i] for i in chosen], g, ctx, generator=_generator(tcfg.seed, index, d.rank, d.device),
            max_tokens=tcfg.max_tokens, device=d.device, d=d,
        )  # fmt: skip
        if g.num_iterations > 1:  # the behaviour policy's log-probs, before this batch's updates
            groups = rollouts.kept_groups() or [0]
            rollouts.old_logprobs = [
                policy(rollouts.group_batch(mb).to(d.device), head="logprobs", options=options).detach()
                for mb in micro_batches(rollouts, groups, tcfg.max_tokens)
            ]
            state["rollouts"] = (index, rollouts)  # reused by the next iterations, and saved with checkpoints
        return rollouts

    def step_fn(step: int, state: dict) -> dict:
        rollouts = rollouts_for(step, state)
        kept = rollouts.kept_groups()
        groups = kept or [0]  # a rank without signal still joins FSDP's collectives, with weight 0
        mbs = micro_batches(rollouts, groups, tcfg.max_tokens)
        mb_batches = [rollouts.group_batch(mb) for mb in mbs]
        local_tokens = sum(b.num_completion_tokens for b in mb_batches) if kept else 0
        local_seqs = sum(b.num_completions for b in mb_batches) if kept else 0
        tokens_total, seqs_total, kept_total = d.all_sum([local_tokens, local_seqs, len(kept)])
        sums = dict.fromkeys(METRIC_KEYS, 0.0)
        loss_sum = 0.0
        if kept_total > 0:
            for i, batch in enumerate(mb_batches):
                if d.distributed and hasattr(policy, "set_requires_gradient_sync"):
                    policy.set_requires_gradient_sync(i == len(mbs) - 1)
                batch = batch.to(d.device)
                if rollouts.old_logprobs is not None:
                    batch.old_logprobs = rollouts.old_logprobs[i]
                if reference is not None:
                    with torch.no_grad():
                        batch.ref_logprobs = reference(batch, head="logprobs", options=options)
                dapo = g.loss_type == "dapo"
                loss, metrics = policy(
                    batch, head="grpo", options=options, num_items_in_batch=max(tokens_total, 1.0) if dapo else None
                )
                # dapo's normaliser already spans the step (num_items_in_batch / world); the others are
                # per micro-batch: weight them by their share, times world against FSDP's mean
                scale = 1.0 if dapo else micro_scale(g.loss_type, batch.num_completion_tokens, batch.num_completions,
                                                     tokens_total, seqs_total) * d.world  # fmt: skip
                if not kept:
                    scale = 0.0
                (loss * scale).backward()
                loss_sum += float(loss.detach()) * scale
                weight = batch.num_completion_tokens if kept else 0
                for key in METRIC_KEYS:
                    sums[key] += float(metrics[key]) * weight
        n_comp = len(rollouts.completions)
        # the step's work: every prompt prefilled once and every completion token, sampled and trained
        step_tokens = sum(len(p) for p in rollouts.prompts) + sum(len(c) for c in rollouts.completions)
        figures = [
            loss_sum,
            step_tokens,
            n_comp,
            float(rollouts.rewards.sum()),
            float(sum(len(c) for c in rollouts.completions)),
            float(rollouts.zero_variance.sum()),
            len(rollouts.prompts),
        ] + [float(rollouts.reward_parts[k].sum()) for k in rollouts.reward_parts]
        figures += [sums[k] for k in METRIC_KEYS]  # fmt: skip
        total = d.all_sum(figures)
        loss_g, tokens_g, comps_g, reward_g, length_g, zero_g, prompts_g = total[:7]
        part_sums = dict(zip(rollouts.reward_parts, total[7 : 7 + len(rollouts.reward_parts)], strict=True))
        metric_sums = dict(zip(METRIC_KEYS, total[7 + len(rollouts.reward_parts) :], strict=True))
        record = {
            "loss": loss_g / d.world,
            "tokens": int(tokens_g),
            "reward": reward_g / comps_g,
            **{f"reward_{k}": v / comps_g for k, v in part_sums.items()},
            "valid_format_rate": part_sums["format"] / comps_g,
            "accuracy": part_sums["correctness"] / comps_g,
            "completion_length": length_g / comps_g,
            "zero_variance_groups": int(zero_g),
            "groups": int(prompts_g),
        }
        record.update({k: v / max(tokens_total, 1.0) for k, v in metric_sums.items()})
        return record

    settings = LoopSettings(
        "stage 1", out, g.max_steps, g.lr, g.warmup_ratio, g.checkpoint_every,
        postfix=("loss", "reward", "valid_format_rate", "accuracy", "zero_variance_groups"),
    )  # fmt: skip
    result = run_loop(policy, step_fn, settings, tcfg, d, lambda: {"eval_before": evaluate()})
    before, after = result["state"]["eval_before"], evaluate()
    pipeline.export(policy, prep, cfg, out / "final", d)
    last = result["last"]
    summary = {
        "steps": g.max_steps,
        "resumed_from_step": result["start_step"],
        "valid_format_rate_before": before.get("valid_format_rate"),
        "accuracy_before": before.get("accuracy"),
        "valid_format_rate_after": after.get("valid_format_rate"),
        "accuracy_after": after.get("accuracy"),
        "eval_pairs": after.get("pairs"),
        "final_reward": last.get("reward"),
        "final_train_valid_format_rate": last.get("valid_format_rate"),
        "final_train_accuracy": last.get("accuracy"),
        "tokens_per_s": result["tokens"] / max(result["loop_time"], 1e-9),
        "loop_time_s": result["loop_time"],
        "final_model": str(out / "final"),
    }
    if d.main:
        _atomic_write(done_marker, json.dumps(summary, indent=2))
    d.barrier()
    return summary
