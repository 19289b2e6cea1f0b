"""Stage 2, fine-grained score learning, as a run of the one loop: packed micro-batches of
whole groups, the restricted-vocabulary loss, held-out nDCG@10 before and after, export."""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from ..export import export_model
from ..loop import Dist, LoopSettings, StepPlan, peak_rss_gib, reset_peak_rss, run_loop, shard
from ..loop.progress import add_record, plot_metrics
from ..packing import collate
from ..scoring import RerankerScorer, loss_units
from .held_out import held_out_ndcg


def curve_points(evaluation: dict) -> dict:
    """metrics.jsonl's held-out fields: the mean nDCG@10, and each collection's where there are several."""
    points = {"held_out_ndcg@10": evaluation.get("ndcg@10")}
    collections = evaluation.get("collections") or {}
    if len(collections) > 1:
        points.update({f"held_out_ndcg@10/{name}": c["ndcg@10"] for name, c in collections.items()})
    return points


def run_stage2(cfg: Recipe, prep, lm, d: Dist, out: Path) -> dict:
    """Stage 2 on `lm` (trained in place); checkpoints, metrics and final/ under `out`."""
    tcfg = cfg.train
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    reset_peak_rss()
    wrapper = RerankerScorer(lm, prep.output_ids, prep.token_weights, cfg.stage2.loss, cfg.stage2.temperature)
    model = shard(wrapper, d, compile_layers=cfg.model.compile)
    steps = StepPlan(prep.groups, tcfg.max_tokens, tcfg.seed, d.world * tcfg.grad_accum)

    def step_fn(step: int, state: dict) -> dict:
        mine = steps.step_batches(step)[d.rank :: d.world]
        batches = [collate([prep.groups[i] for i in ids]).to(d.device) for ids in mine]
        local = [loss_units(b, cfg.stage2.loss) for b in batches]
        units_total, tokens_total = d.all_sum([sum(local), sum(b.num_tokens for b in batches)])
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            if d.distributed and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i == len(batches) - 1)
            loss, _scores = model(batch, with_loss=True)
            # FSDP averages gradients over ranks: scale so the step's gradient is the mean over all units
            (loss * (d.world / units_total)).backward()
            loss_sum += float(loss.detach())
        (global_loss,) = d.all_sum([loss_sum])
        return {"loss": global_loss / units_total, "tokens": int(tokens_total)}

    s2 = cfg.stage2
    settings = LoopSettings(
        "stage 2", out, s2.max_steps, s2.lr, s2.warmup_ratio, s2.checkpoint_every,
        postfix=("loss", "lr", "tokens_per_s", "held_out_ndcg@10"), evaluate_every=s2.eval_every,
        evaluate=lambda: curve_points(held_out_ndcg(model, prep, cfg, d)),
    )  # fmt: skip

    def before() -> dict:
        return {"eval_before": held_out_ndcg(model, prep, cfg, d, out / "held_out_before.trec")}

    result = run_loop(model, step_fn, settings, tcfg, d, before)
    eval_before = result["state"]["eval_before"]
    eval_after = held_out_ndcg(model, prep, cfg, d, out / "held_out_after.trec")
    export_model(
        model, prep.model, prep.tokenizer, out / "final", cfg, prep.output_ids, prep.token_weights, is_main=d.main
    )
    if d.main and s2.eval_every and eval_after.get("ndcg@10") is not None:
        # the curve's last point: the held-out nDCG@10 after the last step (what summary.json reports)
        add_record(out / "metrics.jsonl", s2.max_steps, curve_points(eval_after))
        plot_metrics(out / "metrics.jsonl", out / "curves.png")
    return {
        "stage2_loss": cfg.stage2.loss,
        "stage2_final_loss": result["last"].get("loss", float("nan")),
        "steps": cfg.stage2.max_steps,
        "resumed_from_step": result["start_step"],
        "world_size": d.world,
        "ndcg@10_before": eval_before.get("ndcg@10"),
        "ndcg@10_after": eval_after.get("ndcg@10"),
        "bm25_ndcg@10": eval_after.get("bm25_ndcg@10"),
        "eval_queries": eval_after.get("queries"),
        "held_out_collections_before": eval_before.get("collections"),
        "held_out_collections_after": eval_after.get("collections"),
        "packing_waste": steps.stats.waste,
        "train_tokens_per_s": result["tokens"] / max(result["loop_time"], 1e-9),
        "peak_rss_gib": peak_rss_gib(),  # this process, this stage: evaluations and export included
        "final_model": str(out / "final"),
    }
