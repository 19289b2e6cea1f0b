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
    """nDCG@10 of the model reranking BM25's top-k, next to BM25's own; with `run_file`, the
    reranked run is also written there (TREC, scores exact), by the main process."""
    if prep.eval_data is None:
        return {}
    was_training = model.training
    model.eval()

    def score_fn(pairs):
        return score_held_out_pairs(model, prep, cfg, pairs, d.device)

    run = rerank_run(prep.bm25_run, prep.eval_data, score_fn, k=cfg.data.eval_first_stage_k)
    metrics = evaluate_run(run, prep.eval_data.qrels)
    if run_file is not None and d.main:
        write_trec_run(run, run_file, "prorank-fast")
    model.train(was_training)
    return {
        "ndcg@10": metrics["nDCG@10"],
        "bm25_ndcg@10": prep.bm25_metrics["nDCG@10"],
        "queries": len(prep.eval_data.queries),
    }
