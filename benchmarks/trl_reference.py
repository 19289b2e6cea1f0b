"""Stage 1's policy update against TRL's GRPOTrainer loss (trl 1.16, as shipped): the same rollouts, the same
starting weights, the same optimizer, a few optimizer steps each; per-step losses, final weights, wall time.

What the two share is data, never arithmetic:

* the rollouts: P prompts of the recipe (label-balanced) and G fixed completions each (``make_completions``:
  the right answer, the wrong one, then mixed lengths up to ``stage1.max_new_tokens``, ending in the stop
  token when shorter), with the rewards, advantages and behaviour log-probs our trainer computed for them
  (read back from the run's last checkpoint): TRL is given the same completions, rewards and log-probs;
* the starting weights (a copy taken before our run trains the model in place);
* the optimizer: torch.optim.AdamW (the recipe's lr, betas, weight decay; eps 1e-8), cosine decay over the
  steps without warm-up (ours: the loop's LambdaLR; TRL: transformers' ``get_cosine_schedule_with_warmup``,
  what TRL's Trainer builds for ``lr_scheduler_type="cosine"``, the same factors), ``clip_grad_norm_`` to
  ``train.max_grad_norm``.

Old log-probs: ``stage1.num_iterations`` = the number of steps, so every step's importance ratio is against
the starting weights' log-probs, as TRL's ``num_iterations > 1``: step 1 is on-policy (ratio 1 up to
rounding), steps 2.. are off-policy, so the ratio, its clip range and the advantages' signs all shape the
update (both sides log their clipped shares). It is how ``prorank-fast train`` runs stage 1 with
``num_iterations > 1``: one batch of rollouts, its sampler log-probs as the old ones, for that many steps.

(a) ours: ``stages.run_stage1`` itself, as ``prorank-fast train`` runs it (the loop, whole groups per
micro-batch under ``train.max_tokens``, ``PolicyForGRPO`` with ``fused_linear_grpo_loss``, AdamW, schedule,
clipping), with one seam: the sampler, ``grpo.sampling.sample_group_completions``, returns the fixed
completions and their log-probs under the policy it is handed (``FixedSampler``) instead of drawing.
Rewards, advantages, the dropping of groups without reward variance, the old log-probs and the steps are
the trainer's own code.

(b) TRL: ``trl.GRPOTrainer`` on a copy of the starting weights (stock SDPA attention). Its ``rollout_func``
hook returns the same prompt and completion ids and log-probs, its reward functions the same rewards;
``_generate_and_score_completions`` builds the inputs (left-padded prompts, right-padded completions,
masks, TRL's group advantages, ``num_items_in_batch``, and its own old log-probs at the starting weights,
compared with ours and then replaced by ours, so that both see the same numbers); each step is
``trainer.compute_loss`` (TRL's ``_compute_loss``: fused LM-head log-probs, ratio, clip, aggregation by
``loss_type``), backward, clipping, AdamW.

One difference is kept out of the comparison by the choice of rollouts (every group has reward variance):
our trainer drops the groups without reward variance and normalises over the groups it keeps (dapo: their
tokens; grpo: their sequences), while TRL keeps them in its batch, where they add nothing to the loss sum
but count in its normaliser. With 1 of these 8 groups without variance, ours' step-1 loss is 1.129x TRL's
for dapo (70 tokens against 62) and 8/7 for grpo, and the final weights' updates differ by 1.4%.

Wall time: ours = the stage loop's time less the fixed sampler's log-prob pass (a real run records the
log-probs while sampling); TRL = its steps (compute_loss, backward, clipping, AdamW). Neither includes
building its inputs or a model.

    python -m benchmarks.trl_reference                        # dapo and grpo, 5 steps, the tiny model
    python -m benchmarks.trl_reference --loss-types dapo --steps 5

tests/test_stage1_vs_trl.py asserts the agreement (its docstring states the tolerances).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .stage1_step import _version, trl_trainer, word_tokenizer

STEPS = 5
PROMPTS = 8  # P, half relevant and half not
GROUP_SIZE = 4  # G
# The embedded default (tiny Qwen2, demo data), stage 1 alone and cut down: no held-out evaluation, completions
# of up to 3 tokens (so that dapo's token mean and grpo's mean of sequence means differ), two micro-batches a
# step (train.max_tokens), no warm-up (TRL's cosine has none), no intermediate checkpoint. The settings the
# comparison depends on are spelled out, whatever the recipe says: TRL's loss has no answer-entropy floor
# (ours), trains every group it is given (no refills), and would build a reference model from the model's
# hub id when beta > 0; lr 3e-3 makes steps 2.. clip a large share of the tokens.
OVERRIDES = ("data.demo_queries=8", "data.eval=null", "stage1.eval=null", "stage1.max_new_tokens=3",
             "stage1.bootstrap_new_tokens=0", "stage1.dynamic_sampling=false", "stage1.answer_entropy_floor=0",
             "stage1.beta=0", "stage1.lr=3e-3", "stage1.epsilon_low=0.2", "stage1.epsilon_high=0.2",
             "stage1.delta=null", "stage1.importance_sampling_level=token", "stage1.temperature=1.0",
             "stage1.top_p=1.0", "stage1.rewards=[format,correctness]", "stage1.reward_weights=[1.0,1.0]",
             "stage1.scale_rewards=group", "stage1.checkpoint_every=0", "stage1.warmup_ratio=0",
             "train.max_tokens=640")  # fmt: skip


def make_completions(labels: list[int], group_size: int, max_new_tokens: int, output_ids, stop_id: int,
                     vocab: int, seed: int = 0) -> list[list[int]]:  # fmt: skip
    """G completions per label (group-major): the right answer, then the wrong one (each followed by the
    stop token), then random ones of 1..max_new_tokens tokens (answer tokens half the time, other tokens else;
    the stop token ends the shorter ones, where the sampler would have stopped). Every group has reward
    variance (format + correctness: the right and the wrong answer differ), so our trainer drops none."""
    gen = torch.Generator().manual_seed(seed)
    pool = [t for t in range(3, vocab) if t not in (*output_ids, stop_id)]

    def draw(n: int) -> int:
        return int(torch.randint(0, n, (1,), generator=gen))

    completions = []
    for label in labels:
        right, wrong = (output_ids[0], output_ids[1]) if label == 1 else (output_ids[1], output_ids[0])
        group = [[right, stop_id][:max_new_tokens], [wrong, stop_id][:max_new_tokens]]
        while len(group) < group_size:
            length = 1 + draw(max_new_tokens)
            body = [output_ids[k] if (k := draw(4)) < 2 else pool[draw(len(pool))] for _ in range(length)]
            group.append(body if length == max_new_tokens else body[:-1] + [stop_id])
        completions += group[:group_size]
    return completions


class FixedSampler:
    """Stands in for ``grpo.sampling.sample_group_completions``: the fixed completions of the prompts it is
    given (G per prompt, looked up by the prompt's ids) and, as the real one records them, their tokens'
    log-probs under the policy and options it is handed (at the start of the run: the starting weights)."""

    def __init__(self, prompts: list[list[int]], completions: list[list[int]], group_size: int):
        self.index = {tuple(p): i for i, p in enumerate(prompts)}
        if len(self.index) != len(prompts) or len(completions) != len(prompts) * group_size:
            raise ValueError("the fixed rollouts need distinct prompts and G completions for each")
        self.completions, self.group_size = completions, group_size
        self.seconds = 0.0  # spent computing log-probs (a real sampler has them for free)

    @torch.no_grad()
    def __call__(self, policy, prompts, *, group_size, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0,
                 generator=None, device=None, options=None, with_logprobs=False):  # fmt: skip
        from prorank_fast.grpo import make_group_batch

        t0 = time.perf_counter()
        g = self.group_size
        if group_size != g:
            raise ValueError(f"the trainer samples G={group_size}; the fixed rollouts have G={g}")
        completions = [c for p in prompts for c in self.completions[self.index[tuple(p)] * g :][:g]]
        for c in completions:
            if len(c) > max_new_tokens or (len(c) < max_new_tokens and c[-1] not in stop_ids):
                raise ValueError(f"{c}: not a completion the sampler could draw (max_new_tokens={max_new_tokens})")
        batch = make_group_batch(prompts, completions, [s // g for s in range(len(completions))])
        logp = policy(batch.to(device), head="logprobs", options=options).float().cpu()
        per = list(torch.split(logp, [len(c) for c in completions]))
        self.seconds += time.perf_counter() - t0
        return (completions, per) if with_logprobs else completions


@contextmanager
def sampler_replaced(sampler):
    """``grpo.sampling.sample_group_completions`` (what ``generate_rollouts`` calls) is ``sampler`` inside."""
    from prorank_fast.grpo import sampling

    original = sampling.sample_group_completions
    sampling.sample_group_completions = sampler
    try:
        yield sampler
    finally:
        sampling.sample_group_completions = original


@dataclass
class Comparison:
    loss_type: str
    steps: int
    losses_ours: list[float]
    losses_trl: list[float]
    start: dict[str, torch.Tensor]  # the starting weights (parameters by name, a tied head once)
    weights_ours: dict[str, torch.Tensor]
    weights_trl: dict[str, torch.Tensor]
    seconds_ours: float
    seconds_trl: float
    lr: float
    lrs_trl: list[float]  # the learning rate of each TRL step (ours: records[i]["lr"])
    records: list[dict]  # our run's metrics.jsonl, one per step (clip ratios, rollout_logp_max_diff, ...)
    micro_batches: int  # ours, per step
    advantages_ours: torch.Tensor  # [P * G], in the trained order
    advantages_trl: torch.Tensor
    old_logp_diff: float  # max |TRL's own old log-probs - ours|, both at the starting weights
    trl_clip: dict = field(default_factory=dict)  # TRL's logged clip_ratio/* per step

    def loss_abs_diffs(self) -> list[float]:
        return [abs(a - b) for a, b in zip(self.losses_ours, self.losses_trl, strict=True)]

    def loss_rel_diffs(self, floor: float = 1e-3) -> list[float]:
        """Per step with |TRL's loss| >= floor (grpo's step-1 loss is ~0: the mean of centred advantages)."""
        pairs = zip(self.losses_ours, self.losses_trl, strict=True)
        return [abs(a - b) / abs(b) for a, b in pairs if abs(b) >= floor]

    def update_gaps(self) -> dict[str, float]:
        """Per tensor: ||ours' update - TRL's update|| / ||TRL's update||."""
        out = {}
        for name, ours in self.weights_ours.items():
            ref = self.weights_trl[name] - self.start[name]
            out[name] = float((ours - self.start[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        return out

    def max_weight_diff(self) -> float:
        return max(float((w - self.weights_trl[k]).abs().max()) for k, w in self.weights_ours.items())


def _state(model) -> dict[str, torch.Tensor]:
    """The parameters, each once (a tied LM head is its embedding's)."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def run_trl(start_lm, rollouts, cfg, steps: int) -> dict:
    """trl.GRPOTrainer's loss on a copy of ``start_lm`` over ``rollouts`` (our run's, in its order: completions,
    reward parts, sampler log-probs), ``steps`` optimizer steps."""
    from datasets import Dataset
    from transformers import get_cosine_schedule_with_warmup

    g, t = cfg.stage1, cfg.train
    size = rollouts.group_size
    rows = [{"prompt": f"prompt {s // size}"} for s in range(len(rollouts.completions))]
    for name, values in rollouts.reward_parts.items():
        for row, value in zip(rows, values.tolist(), strict=True):
            row[f"reward_{name}"] = value
    prompt_ids = [rollouts.prompts[s // size] for s in range(len(rows))]
    logprobs = [lp.tolist() for lp in rollouts.sample_logprobs]

    def rollout_func(prompts, trainer):  # TRL's hook for rollouts made elsewhere
        if prompts != [r["prompt"] for r in rows]:
            raise RuntimeError("TRL asked for other prompts than the fixed rollouts'")
        return {"prompt_ids": prompt_ids, "completion_ids": rollouts.completions, "logprobs": logprobs}

    def given(name: str):
        def reward(prompts, completions, **columns):
            return list(columns[f"reward_{name}"])

        reward.__name__ = name  # TRL names its reward metrics after the function
        return reward

    model = copy.deepcopy(start_lm)
    model.set_attn_implementation("sdpa")
    with warnings.catch_warnings():  # trl 1.16 flags the hook as experimental (constraints.txt pins trl)
        warnings.filterwarnings("ignore", message=".*'rollout_func', which is an experimental feature")
        trainer = trl_trainer(
            model, [given(name) for name in rollouts.reward_parts], Dataset.from_list(rows),
            word_tokenizer(model.config.vocab_size), rollout_func=rollout_func,
            per_device_train_batch_size=len(rows), num_generations=size,
            max_completion_length=max(len(c) for c in rollouts.completions), temperature=g.temperature,
            top_p=g.top_p, max_steps=steps, learning_rate=g.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
            adam_beta2=t.betas[1], adam_epsilon=1e-8, max_grad_norm=t.max_grad_norm, lr_scheduler_type="cosine",
            warmup_steps=0, beta=g.beta, loss_type=g.loss_type, epsilon=g.epsilon_low, epsilon_high=g.epsilon_high,
            delta=g.delta, importance_sampling_level=g.importance_sampling_level, scale_rewards=g.scale_rewards,
            reward_weights=list(g.reward_weights), num_iterations=steps, seed=t.seed,
        )  # fmt: skip
    model.train()
    inputs = trainer._generate_and_score_completions(rows)
    mask = inputs["completion_mask"].bool()
    own_old = inputs["old_per_token_logps"]  # TRL's, at the starting weights (num_iterations > 1)
    given_old = torch.zeros_like(own_old)
    given_old[mask] = torch.cat(list(rollouts.sample_logprobs)).to(given_old)
    inputs["old_per_token_logps"] = given_old
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets (gradient_accumulation_steps=1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=g.lr, betas=t.betas, weight_decay=t.weight_decay, eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, steps)
    losses, lrs = [], []
    t0 = time.perf_counter()
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    clip = {k: list(v) for k, v in trainer._metrics["train"].items() if k.startswith("clip_ratio/")}
    return {
        "losses": losses, "lrs": lrs, "weights": _state(model), "seconds": seconds,
        "advantages": inputs["advantages"].cpu(),
        "old_logp_diff": float((own_old - given_old)[mask].abs().max()), "clip": clip,
    }  # fmt: skip


def run_both(out: Path, loss_type: str, steps: int = STEPS, recipe: str | None = None,
             overrides=OVERRIDES) -> Comparison:  # fmt: skip
    """Our stage 1 (``run_stage1``, in this process, into ``out``) over the fixed rollouts for ``steps`` steps,
    then TRL's loss over the rollouts our trainer made of them, from the same starting weights."""
    from prorank_fast.config import load_recipe
    from prorank_fast.grpo import Rollouts, micro_batches, stop_token_ids
    from prorank_fast.loop import set_seed, setup_distributed
    from prorank_fast.loop.checkpoint import Checkpointer
    from prorank_fast.stages import prepare, run_stage1

    settings = [f"output_dir={out}", "stage1.enabled=true", f"stage1.loss_type={loss_type}",
                f"stage1.max_steps={steps}", f"stage1.num_iterations={steps}", f"stage1.prompts_per_step={PROMPTS}",
                f"stage1.group_size={GROUP_SIZE}", *overrides]  # fmt: skip
    cfg = load_recipe(recipe, settings)
    d = setup_distributed("cpu")
    set_seed(cfg.train.seed)
    prep = prepare(cfg, out, d)
    # P label-balanced prompts (distinct: the fixed sampler finds a prompt's completions by its ids)
    by_label = {y: list({tuple(p.ids): p for p in prep.stage1_prompts if p.label == y}.values()) for y in (1, 0)}
    prep.stage1_prompts = [p for pair in zip(by_label[1], by_label[0], strict=False) for p in pair][:PROMPTS]
    completions = make_completions(
        [p.label for p in prep.stage1_prompts], GROUP_SIZE, cfg.stage1.max_new_tokens, prep.output_ids,
        stop_token_ids(prep.tokenizer)[0], prep.model.config.vocab_size, seed=cfg.train.seed,
    )  # fmt: skip
    sampler = FixedSampler([p.ids for p in prep.stage1_prompts], completions, GROUP_SIZE)
    start_lm = copy.deepcopy(prep.model)
    start = _state(start_lm)

    with sampler_replaced(sampler):
        summary = run_stage1(cfg, prep, d, out / "stage1")
    records = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    ckpt = Checkpointer(out / "stage1", d, cfg.train.keep_checkpoints, (Rollouts,))
    _index, rollouts = ckpt.read_extra(ckpt.latest())["state"]["rollouts"]  # what the trainer trained on
    weights_ours = _state(prep.model)
    n_micro = len(micro_batches(rollouts, rollouts.kept_groups(), cfg.train.max_tokens))

    trl = run_trl(start_lm, rollouts, cfg, steps)
    return Comparison(
        loss_type, steps, [r["loss"] for r in records], trl["losses"], start, weights_ours, trl["weights"],
        summary["loop_time_s"] - sampler.seconds, trl["seconds"], cfg.stage1.lr, trl["lrs"], records, n_micro,
        rollouts.advantages.float(), trl["advantages"].float(), trl["old_logp_diff"], trl["clip"],
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.trl_reference",
        description="Stage 1's policy update (prorank-fast's run_stage1) against TRL's GRPOTrainer loss on the same "
        "rollouts, starting weights and optimizer (CPU, the tiny default): agreement and wall time per loss type.",
    )
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--loss-types", default="dapo,grpo")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = ["| loss type | steps | ours s | TRL s | TRL / ours | max abs. loss diff | max rel. loss diff "
            "(\\|loss\\| >= 1e-3) | max weight diff | clipped tokens, steps 2.. |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for loss_type in args.loss_types.split(","):
        with tempfile.TemporaryDirectory(prefix="prorank-trl-reference-") as tmp:
            c = run_both(Path(tmp) / "run", loss_type, args.steps)
        clipped = [r["clip_ratio_region"] for r in c.records[1:]]
        rows.append(
            f"| {loss_type} | {c.steps} | {c.seconds_ours:.2f} | {c.seconds_trl:.2f} | "
            f"{c.seconds_trl / max(c.seconds_ours, 1e-9):.2f}x | {max(c.loss_abs_diffs()):.1e} | "
            f"{max(c.loss_rel_diffs(), default=0.0):.1e} | "
            f"{c.max_weight_diff():.1e} | {min(clipped, default=0):.0%}-{max(clipped, default=0):.0%} |"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"P={PROMPTS} prompts x G={GROUP_SIZE} completions, tiny Qwen2 (recipes/tiny.yaml), fp32; torch "
          f"{torch.__version__}, trl {_version('trl')}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"1-min load average {load:.2f}")  # fmt: skip
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
