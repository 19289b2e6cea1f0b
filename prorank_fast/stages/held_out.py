"""Held-out nDCG@10 during training: the model being trained reranks BM25's top k of the
evaluation queries through Reranker (the one packing path), next to BM25's own figure.

The scores are Reranker's defaults in the recipe's numeric mode (model.dtype, model.autocast),
batch-invariant on CPU: so with unchanged weights, the figure before training, the one after and
`prorank-fast eval` of the export with the same split and mode are the same bits (the TREC runs
written next to the metrics show it, score by score)."""

from __future__ import annotations

from pathlib import Path

from ..config import Recipe
from ..evaluation import evaluate_run, rerank_run, write_trec_run
from ..rerank import Reranker
from .prepare import Prepared


def score_held_out_pairs(model, prep: Prepared, cfg: Recipe, pairs: list[tuple[str, str]], device) -> list[float]:
    """Scores of (query, document) pairs through the training root `model` (so FSDP gathers the
    parameters), packed into batches of cfg.train.max_tokens tokens by Reranker."""
    reranker = Reranker(
        prep.model, prep.tokenizer, template=prep.template, output_ids=prep.output_ids,
        token_weights=prep.token_weights, instruction=cfg.data.instruction, max_length=cfg.data.max_length,
        min_query_tokens=cfg.data.min_query_tokens, max_tokens=cfg.train.max_tokens, device=device, scorer=model,
    )  # fmt: skip
    return reranker.predict(pairs, show_progress_bar=False)


def held_out_ndcg(model, prep: Prepared, cfg: Recipe, d, run_file: Path | None = None) -> dict:
    """nDCG@10 of the model reranking BM25's top-k of each collection's held-out queries, next to
    BM25's own: `ndcg@10` and `bm25_ndcg@10` are the means over collections, `collections` has each
    one's. With `run_file`, the reranked runs are also written (TREC, scores exact) by the main
    process: there for one collection, with the collection's name before the suffix for several."""
    if not prep.held_out:
        return {}
    was_training = model.training
    model.eval()

    def score_fn(pairs):
        return score_held_out_pairs(model, prep, cfg, pairs, d.device)

    collections = {}
    for held in prep.held_out:
        run = rerank_run(held.bm25_run, held.data, score_fn, k=cfg.data.eval_first_stage_k)
        metrics = evaluate_run(run, held.data.qrels)
        if run_file is not None and d.main:
            path = run_file if len(prep.held_out) == 1 else run_file.with_suffix(f".{held.name}{run_file.suffix}")
            write_trec_run(run, path, "prorank-fast")
        collections[held.name] = {
            "ndcg@10": metrics["nDCG@10"],
            "bm25_ndcg@10": held.bm25_metrics["nDCG@10"],
            "queries": len(held.data.queries),
        }
    model.train(was_training)
    return {
        "ndcg@10": sum(c["ndcg@10"] for c in collections.values()) / len(collections),
        "bm25_ndcg@10": sum(c["bm25_ndcg@10"] for c in collections.values()) / len(collections),
        "queries": sum(c["queries"] for c in collections.values()),
        "collections": collections,
    }
