"""Can the trainer make a model learn at all? Stage 2 on a handful of training groups, repeated:
the groups themselves are the evaluation set, so their nDCG@10 (the positive's rank among the
group's documents) must climb towards 1. A model, budget or trainer that cannot fit 16 groups in
60 steps will not generalise from 1,000 either; one that can, and still does not beat BM25 on
held-out queries, is limited by something else (data, lr, tokens seen: README's ablations).

    python -m benchmarks.learnability [--recipe R] [--groups 16] [--steps 60] [--eval-every 10] [overrides...]

It runs stage 2 of `prorank-fast train` as it is (prepare, the loop, the scorer, Reranker for the
evaluation); only the groups and the evaluation set differ. Prints the curve (step, loss, the groups'
nDCG@10) and writes OUTPUT_DIR/learnability.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from prorank_fast.config import load_recipe
from prorank_fast.data import BeirData
from prorank_fast.evaluation import evaluate_run
from prorank_fast.loop import set_seed, setup_distributed
from prorank_fast.stages import prepare, run_stage2
from prorank_fast.stages.collection import split_collections
from prorank_fast.stages.prepare import HeldOutSet


def groups_as_collection(examples) -> tuple[BeirData, dict]:
    """The groups as a collection whose queries are theirs, judged on their own documents (label >
    0 relevant), with a "first stage" that lists every document, relevant ones last (reranking must
    move them up; ties would not)."""
    corpus, queries, qrels, run = {}, {}, {}, {}
    for g, ex in enumerate(examples):
        qid = f"g{g}"
        queries[qid] = ex.query
        ids = [f"{qid}d{j}" for j in range(len(ex.docs))]
        corpus.update(zip(ids, ex.docs, strict=True))
        qrels[qid] = {i: 1 for i, y in zip(ids, ex.labels, strict=True) if y > 0}
        order = sorted(range(len(ids)), key=lambda j: ex.labels[j] > 0)
        run[qid] = {ids[j]: float(len(ids) - r) for r, j in enumerate(order)}
    return BeirData.from_dicts(corpus, queries, qrels, source="training groups"), run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learnability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="smollm2-135m-multi")
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    args = parser.parse_args(argv)
    overrides = ["stage1.enabled=false", f"stage2.max_steps={args.steps}", f"stage2.eval_every={args.eval_every}",
                 "stage2.checkpoint_every=0", *args.overrides]  # fmt: skip
    cfg = load_recipe(args.recipe, overrides)
    d = setup_distributed(cfg.train.device)
    if cfg.train.num_threads:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    out = Path(cfg.train.output_dir) / "learnability"
    set_seed(cfg.train.seed)
    prep = prepare(cfg, out, d)
    examples = [ex for s in split_collections(cfg) for ex in s.groups]  # prepare()'s order
    assert len(examples) == len(prep.groups)
    chosen = sorted(random.Random(cfg.train.seed).sample(range(len(examples)), args.groups))
    prep.groups = [prep.groups[i] for i in chosen]
    data, run = groups_as_collection([examples[i] for i in chosen])
    prep.held_out = [HeldOutSet("training groups", data, run, evaluate_run(run, data.qrels))]
    cfg.data.eval_first_stage_k = max(len(docs) for docs in run.values())
    result = run_stage2(cfg, prep, prep.model, d, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": 0, "ndcg@10": result["ndcg@10_before"]}]
    curve += [{"step": r["step"], "loss": r.get("loss"), "ndcg@10": r["held_out_ndcg@10"]}
              for r in records if r.get("held_out_ndcg@10") is not None]  # fmt: skip
    report = {"recipe": cfg.source, "overrides": overrides, "groups": args.groups, "chosen": chosen,
              "sources": [examples[i].source for i in chosen], "curve": curve,
              "train_tokens_per_s": result["train_tokens_per_s"]}  # fmt: skip
    if d.main:
        (out / "learnability.json").write_text(json.dumps(report, indent=2))
        print(f"{args.groups} training groups, repeated for {args.steps} steps ({cfg.source}):")
        print("| step | loss (last 1) | training groups' nDCG@10 |\n|---|---|---|")
        for point in curve:
            loss = point.get("loss")
            print(f"| {point['step']} | {'' if loss is None else f'{loss:.4f}'} | {point['ndcg@10']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
