"""Stage 1, GRPO prompt warmup, as a run of the one loop: rollouts with shared-prefix groups,
the policy update with the fused GRPO loss, before/after greedy accuracy, export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import Stage1InputError
from ..export import export_model
from ..grpo import (
    GRPOOptions,
    PolicyForGRPO,
    RewardContext,
    Rollouts,
    answer_accuracy,
    generate_rollouts,
    micro_batches,
    micro_scale,
    resolve_reward,
    stop_token_ids,
)
from ..grpo.prompts import digit_token_ids
from ..io import atomic_write_text
from ..loop import LoopSettings, peak_rss_gib, reset_peak_rss, run_loop, shard

METRIC_KEYS = ("kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "answer_entropy")


def _generator(seed: int, batch_index: int, rank: int, device) -> torch.Generator:
    """Sampling RNG of one rollout batch, on the device that samples: follows from (seed, batch,
    rank) alone, so a resumed run draws what an uninterrupted one drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch_index * 7_919 + rank) % (2**63))


def _prompt_order(labels: list[int], seed: int, epoch: int, balance: bool) -> list[int]:
    """The epoch's prompt order. Balanced: relevant and non-relevant prompts alternate (each
    shuffled; the longer side's surplus waits for a later epoch), so every step's batch is half
    and half whatever its size; the loop shuffles within a batch before ranks take their share."""
    gen = torch.Generator().manual_seed(seed * 10_007 + epoch)
    if not balance:
        return torch.randperm(len(labels), generator=gen).tolist()
    sides = [[i for i, y in enumerate(labels) if y == label] for label in (1, 0)]
    pos, neg = ([side[j] for j in torch.randperm(len(side), generator=gen).tolist()] for side in sides)
    return [i for pair in zip(pos, neg, strict=False) for i in pair]


def _batch(order: list[int], offset: int, size: int, seed: int, index: int) -> list[int]:
    chunk = order[offset * size : (offset + 1) * size]
    gen = torch.Generator().manual_seed(seed * 31 + index)
    return [chunk[j] for j in torch.randperm(len(chunk), generator=gen).tolist()]


def run_stage1(cfg, prep, d, out) -> dict:
    """GRPO prompt warmup of prep.model (trained in place) with cfg.stage1; checkpoints,
    metrics.jsonl, curves.png and final/ under `out`. A finished stage (out/summary.json)
    is not run again: a resumed chain goes straight on to stage 2."""
    out = Path(out)
    done_marker = out / "summary.json"
    if done_marker.exists():
        return json.loads(done_marker.read_text())
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    reset_peak_rss()
    g, tcfg = cfg.stage1, cfg.train
    for name in g.rewards:
        resolve_reward(name)  # an unknown reward fails before any work
    prompts = prep.stage1_prompts
    labels = [p.label for p in prompts]
    usable = 2 * min(labels.count(0), labels.count(1)) if g.balance_labels else len(prompts)
    if usable < g.prompts_per_step:
        raise Stage1InputError(
            f"stage 1: {usable} training pairs{' (label-balanced)' if g.balance_labels else ''}, fewer than "
            f"stage1.prompts_per_step={g.prompts_per_step}"
        )
    options = GRPOOptions(
        beta=g.beta, epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, delta=g.delta,
        temperature=g.temperature if g.temperature > 0 else 1.0, loss_type=g.loss_type,
        importance_sampling_level=g.importance_sampling_level,
        max_completion_length=max(g.max_new_tokens, g.bootstrap_new_tokens), output_ids=tuple(prep.output_ids),
        answer_entropy_floor=g.answer_entropy_floor, answer_entropy_coef=g.answer_entropy_coef,
        batch_invariant=g.batch_invariant if g.batch_invariant is not None else d.device.type == "cpu",
    )  # fmt: skip
    reference = None
    if g.beta > 0:  # a frozen copy of the starting weights, sharded like the policy
        ref_lm = copy.deepcopy(prep.model).requires_grad_(False)
        reference = shard(PolicyForGRPO(ref_lm), d, compile_layers=False).eval()
    policy = shard(PolicyForGRPO(prep.model), d, compile_layers=cfg.model.compile)
    ctx = RewardContext(
        tuple(prep.output_ids), stop_token_ids(prep.tokenizer), prep.tokenizer, digit_token_ids(prep.tokenizer)
    )
    batches_per_epoch = usable // g.prompts_per_step
    target_groups = g.prompts_per_step  # groups with reward variance a step wants (dynamic sampling)

    def evaluate() -> dict:
        if not prep.stage1_eval_prompts:
            return {}
        return answer_accuracy(
            policy, prep.stage1_eval_prompts, ctx, max_new_tokens=g.max_new_tokens, max_tokens=tcfg.max_tokens,
            device=d.device,
        )  # fmt: skip

    def max_new_tokens(state: dict) -> int:
        """The curriculum: bootstrap-length completions until the format is learned."""
        return g.max_new_tokens if state.get("format_learned", not g.bootstrap_new_tokens) else g.bootstrap_new_tokens

    def draw(index: int, round_: int, state: dict) -> Rollouts:
        if round_ == 0:  # the epoch's next batch
            epoch, offset = divmod(index, batches_per_epoch)
            order = _prompt_order(labels, tcfg.seed, epoch, g.balance_labels)
        else:  # a refill: a fresh draw from the whole pool, seeded by (step, round)
            order, offset = _prompt_order(labels, tcfg.seed + 7_919 * round_, index, g.balance_labels), 0
        chosen = _batch(order, offset, g.prompts_per_step, tcfg.seed + round_, index)[d.rank :: d.world]
        return generate_rollouts(
            policy, [prompts[i] for i in chosen], g, ctx,
            generator=_generator(tcfg.seed + round_, index, d.rank, d.device), max_tokens=tcfg.max_tokens,
            device=d.device, d=d, max_new_tokens=max_new_tokens(state), options=options,
        )  # fmt: skip

    def rollouts_for(step: int, state: dict) -> Rollouts:
        index = step // g.num_iterations
        kept = state.get("rollouts")
        if kept is not None and kept[0] == index:
            return kept[1]
        draws = [draw(index, 0, state)]
        for round_ in range(1, g.max_refills + 1 if g.dynamic_sampling else 1):
            # every rank refills alike (sampling is collective under FSDP): decide on global counts
            (with_variance,) = d.all_sum([sum(len(r.kept_groups()) for r in draws)])
            if with_variance >= target_groups:
                break
            draws.append(draw(index, round_, state))
        rollouts = Rollouts.concat(draws)
        # The behaviour policy's log-probs are the sampler's (no extra pass): the importance ratio is
        # exactly 1 at the first iteration when sampling and policy pass are batch-invariant.
        if rollouts.sample_logprobs is not None:
            mbs = micro_batches(rollouts, rollouts.kept_groups() or [0], tcfg.max_tokens)
            rollouts.old_logprobs = [rollouts.sampled_logprobs(mb) for mb in mbs]
        if g.num_iterations > 1:
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
        logp_max_diff = 0.0  # the largest |sampler log-prob - policy log-prob| of the step
        if kept_total > 0:
            for i, batch in enumerate(mb_batches):
                if d.distributed and hasattr(policy, "set_requires_gradient_sync"):
                    policy.set_requires_gradient_sync(i == len(mbs) - 1)
                batch = batch.to(d.device)
                if rollouts.old_logprobs is not None:
                    batch.old_logprobs = rollouts.old_logprobs[i].to(d.device)
                if reference is not None:
                    with torch.no_grad():
                        batch.ref_logprobs = reference(batch, head="logprobs", options=options)
                dapo = g.loss_type == "dapo"
                # dapo's normaliser already spans the step (num_items_in_batch / world); the others are
                # per micro-batch: weight them by their share, times world against FSDP's mean
                scale = 1.0 if dapo else micro_scale(g.loss_type, batch.num_completion_tokens, batch.num_completions,
                                                     tokens_total, seqs_total) * d.world  # fmt: skip
                if not kept:
                    scale = 0.0
                loss, metrics = policy(
                    batch, head="grpo", options=options, num_items_in_batch=max(tokens_total, 1.0) if dapo else None,
                    penalty_scale=d.world / (max(kept_total, 1.0) * scale) if scale else 0.0,  # a mean over prompts
                )  # fmt: skip
                (loss * scale).backward()
                loss_sum += float(loss.detach()) * scale
                weight = batch.num_completion_tokens if kept else 0
                for key in METRIC_KEYS:
                    sums[key] += float(metrics.get(key, 0.0)) * weight
                if kept and step % g.num_iterations == 0:  # before this batch's updates: on-policy
                    logp_max_diff = max(logp_max_diff, float(metrics["log_ratio_max"]))
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
        grades = d.all_sum([rollouts.extra["answer_stats"][k] * n_comp for k in sorted(rollouts.extra["answer_stats"])])
        kept_g, draws = d.all_sum([len(kept), rollouts.extra.get("draws", 1)])
        (logp_max_diff,) = d.all_max([logp_max_diff])
        record = {
            "loss": loss_g / d.world,
            "tokens": int(tokens_g),
            "reward": reward_g / comps_g,
            **{f"reward_{k}": v / comps_g for k, v in part_sums.items()},
            "completion_length": length_g / comps_g,
            "zero_variance_groups": int(zero_g),
            "zero_variance_share": zero_g / max(prompts_g, 1.0),
            "groups": int(prompts_g),
            "trained_groups": int(kept_g),
            "draws": draws / d.world,
            "reward_std": float(rollouts.rewards.std()) if rollouts.rewards.numel() > 1 else 0.0,
            "max_new_tokens": max_new_tokens(state),
            "rollout_logp_max_diff": logp_max_diff,
            **{k: v / comps_g for k, v in zip(sorted(rollouts.extra["answer_stats"]), grades, strict=True)},
        }
        if not state.get("format_learned", not g.bootstrap_new_tokens):
            # the curriculum moves on once most completions start with the answer (then stays)
            state["format_learned"] = record["valid_format_rate"] >= g.curriculum_threshold
        record.update({k: v / max(tokens_total, 1.0) for k, v in metric_sums.items()})
        return record

    settings = LoopSettings(
        "stage 1", out, g.max_steps, g.lr, g.warmup_ratio, g.checkpoint_every,
        postfix=("loss", "reward", "valid_format_rate", "accuracy", "zero_variance_share"), state_types=(Rollouts,),
    )  # fmt: skip
    result = run_loop(policy, step_fn, settings, tcfg, d, lambda: {"eval_before": evaluate()})
    before, after = result["state"]["eval_before"], evaluate()
    export_model(
        policy, prep.model, prep.tokenizer, out / "final", cfg, prep.output_ids, prep.token_weights, is_main=d.main
    )
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
        "exact_format_rate_before": before.get("exact_format_rate"),
        "exact_format_rate_after": after.get("exact_format_rate"),
        "tokens_per_s": result["tokens"] / max(result["loop_time"], 1e-9),
        "loop_time_s": result["loop_time"],
        "peak_rss_gib": peak_rss_gib(),  # this process, this stage: evaluations and export included
        "final_model": str(out / "final"),
    }
    if d.main:
        atomic_write_text(done_marker, json.dumps(summary, indent=2))
    d.barrier()
    return summary
