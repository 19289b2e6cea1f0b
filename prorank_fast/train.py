"""`prorank-fast train`: prepare, stage 1 (and stage 2 alone from the same start, when asked),
stage 2 from stage 1's weights, the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import Recipe
from .io import atomic_write_text
from .loop import set_seed, setup_distributed
from .modeling import numeric_mode
from .stages import initial_model, load_exported, prepare, run_stage1, run_stage2


def train(recipe: Recipe) -> dict:
    """Run the recipe: stage 1 (when stage1.enabled) then stage 2 from its weights; returns
    the summary (also in OUTPUT_DIR/summary.json)."""
    t_start = time.time()
    cfg, tcfg = recipe, recipe.train
    d = setup_distributed(tcfg.device)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    out = Path(tcfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    set_seed(tcfg.seed)
    prep = prepare(cfg, out, d)  # tokenizer, template, model, groups, eval data, stage-1 prompts

    summary = {"recipe": cfg.source, **({"split": prep.split} if prep.split else {})}
    alone = None
    if cfg.stage1.enabled:
        stage1 = run_stage1(cfg, prep, d, out / "stage1")
        summary["stage1"] = stage1
        if cfg.stage1.compare_stage2_alone:
            # the same stage 2 from the same start, without stage 1 (reported next to the chained run)
            alone = run_stage2(cfg, prep, initial_model(cfg, prep, d), d, out / "stage2_alone")
            summary["ndcg@10_stage2_alone"] = alone.get("ndcg@10_after")
        prep.model = load_exported(cfg, Path(stage1["final_model"]), d)
    summary.update(run_stage2(cfg, prep, prep.model, d, out))
    summary["held_out"] = held_out_table(summary, alone, numeric_mode(cfg.model.dtype, cfg.model.autocast))
    summary["wall_time_s"] = time.time() - t_start
    if d.main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    d.barrier()
    d.close()
    return summary


def held_out_table(summary: dict, alone: dict | None, mode: str) -> dict:
    """The run's held-out figures side by side (None where the run did not measure one): greedy
    valid-format rate and accuracy zero-shot and after stage 1; nDCG@10 of BM25, the zero-shot
    model (score z["1"] - z["0"] without training), stage 1, stage 1 + stage 2, stage 2 alone
    (means over collections), each collection's under `collections` when there are several; the
    numeric mode every model figure was computed in."""
    s1 = summary.get("stage1") or {}
    table = {
        "queries": summary.get("eval_queries"),
        "pairs": s1.get("eval_pairs"),
        "valid_format_rate_zero_shot": s1.get("valid_format_rate_before"),
        "accuracy_zero_shot": s1.get("accuracy_before"),
        "valid_format_rate_stage1": s1.get("valid_format_rate_after"),
        "accuracy_stage1": s1.get("accuracy_after"),
        **_ndcg_rows(summary, alone, chained=s1 != {}, name=None),
        "numeric_mode": mode,
    }
    collections = summary.get("held_out_collections_after") or {}
    if len(collections) > 1:
        table["collections"] = {
            name: {"queries": c["queries"], **_ndcg_rows(summary, alone, chained=s1 != {}, name=name)}
            for name, c in collections.items()
        }
    return table


def _ndcg_rows(summary: dict, alone: dict | None, *, chained: bool, name: str | None) -> dict:
    """nDCG@10 rows of held_out_table: the means (name None) or one collection's. In a chained run,
    stage 2's "before" is the stage-1 model and the zero-shot model is stage 2 alone's "before"."""

    def pick(result: dict | None, when: str) -> float | None:
        if not result:
            return None
        if name is None:
            return result.get("bm25_ndcg@10" if when == "bm25" else f"ndcg@10_{when}")
        entry = (result.get("held_out_collections_after" if when == "bm25" else f"held_out_collections_{when}")
                 or {}).get(name) or {}  # fmt: skip
        return entry.get("bm25_ndcg@10" if when == "bm25" else "ndcg@10")

    zero_shot = pick(alone, "before") if alone else (None if chained else pick(summary, "before"))
    alone_after = pick(alone, "after") if alone else (None if chained else pick(summary, "after"))
    return {
        "ndcg@10_bm25": pick(summary, "bm25"),
        "ndcg@10_zero_shot": zero_shot,
        "ndcg@10_stage1": pick(summary, "before") if chained else None,
        "ndcg@10_stage1_stage2": pick(summary, "after") if chained else None,
        "ndcg@10_stage2_alone": alone_after,
    }
