"""BEIR-format evaluation: BM25 first stage (bm25s), reranking, metrics (ir-measures /
pytrec_eval), TREC run files. Collections are loaded by data.beir (re-exported here).

first_stage.py  bm25_first_stage
reranking.py    rerank_run, first_stage_candidates, evaluate_reranker (the `prorank-fast eval` workflow)
metrics.py      evaluate_run, format_metrics_table
trec.py         write_trec_run, read_trec_run

Nothing here computes a metric by hand: BM25 is bm25s, metrics are ir-measures.
"""

from ..data import BeirData, Qrels, Run, load_beir, load_collection, load_hf_beir
from ..errors import BeirFormatError
from .first_stage import bm25_first_stage
from .metrics import DEFAULT_MEASURES, evaluate_run, format_metrics_table
from .reranking import ScoreFn, evaluate_reranker, first_stage_candidates, rerank_run
from .trec import read_trec_run, write_trec_run

__all__ = [
    "DEFAULT_MEASURES",
    "BeirData",
    "BeirFormatError",
    "Qrels",
    "Run",
    "ScoreFn",
    "bm25_first_stage",
    "evaluate_reranker",
    "evaluate_run",
    "first_stage_candidates",
    "format_metrics_table",
    "load_beir",
    "load_collection",
    "load_hf_beir",
    "read_trec_run",
    "rerank_run",
    "write_trec_run",
]
