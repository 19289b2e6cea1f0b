"""Reranking a first stage with any `score_fn(pairs) -> scores`, and the evaluation workflow
behind `prorank-fast eval`: candidates, both runs, metrics.json."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.beir import BeirData, Run
from ..errors import BeirFormatError
from ..io import atomic_write_text
from .metrics import DEFAULT_MEASURES, evaluate_run
from .trec import write_trec_run

ScoreFn = Callable[[list[tuple[str, str]]], Any]


def rerank_run(
    first_stage_run: Mapping[str, Mapping[str, float]],
    data: BeirData,
    score_fn: ScoreFn,
    k: int | None = None,
    batch_size: int = 256,
    *,
    show_progress: bool = False,
) -> Run:
    """Rescore the top ``k`` candidates of each query with ``score_fn``.

    The first-stage rank is the order by first-stage score, ties kept in the run's dict
    order (the rank order for runs from :func:`bm25_first_stage` and :func:`read_trec_run`).
    Candidates beyond the top k are dropped. Queries of the run that ``data`` does not
    have are skipped (a run file may cover other splits); queries of ``data`` absent from
    the run get no entry (and score 0 in :func:`evaluate_run`).

    Args:
        first_stage_run: query id -> {doc id: score}.
        data: texts of queries and documents.
        score_fn: list of (query text, document text) pairs, length <= batch_size ->
            as many scores (list, 1-d numpy array or 1-d tensor); higher = more relevant.
            Called with pairs of several queries together, so it can batch across them.
        k: candidates per query (None: all).
        batch_size: pairs per score_fn call.

    Returns:
        run: query id -> {doc id: score}, in reranked order (dict order). Scores are
        score_fn's, except that a score equal to the one above it once both are rounded
        to float32 (the precision pytrec_eval compares at) is set one float32 ulp below
        it, so the order is strictly decreasing: every evaluator re-sorts by score and
        would otherwise break ties by doc id, not by first-stage rank.

    Raises:
        ValueError: a candidate absent from ``data.corpus``; score_fn returned the wrong
            number of scores or a NaN.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    candidates: dict[str, list[str]] = {}
    absent: list[str] = []
    for qid, docs in first_stage_run.items():
        if qid not in data.queries:
            continue
        ranked = sorted(docs, key=lambda d: -float(docs[d]))  # stable: ties keep dict order
        ranked = ranked if k is None else ranked[:k]
        absent.extend(f"{qid}/{d}" for d in ranked if d not in data.corpus)
        candidates[qid] = ranked
    if absent:
        raise ValueError(
            f"rerank_run: {len(absent)} candidate documents are absent from the corpus "
            f"({data.source or 'collection'}), e.g. {', '.join(absent[:3])}; is the run from another collection?"
        )

    pairs = [(qid, did) for qid, docs in candidates.items() for did in docs]
    scores = np.empty(len(pairs), dtype=np.float64)
    starts = range(0, len(pairs), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="rerank", unit="batch")
    for start in starts:
        chunk = pairs[start : start + batch_size]
        out = score_fn([(data.queries[q], data.corpus[d]) for q, d in chunk])
        if hasattr(out, "detach"):  # a torch tensor, possibly on GPU; no torch import here
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape[0] != len(chunk):
            raise ValueError(f"score_fn returned {out.shape[0]} scores for {len(chunk)} pairs")
        if np.isnan(out).any():
            raise ValueError(f"score_fn returned NaN for pairs {start}..{start + len(chunk) - 1}")
        scores[start : start + len(chunk)] = out

    run: Run = {}
    i = 0
    for qid, docs in candidates.items():
        s = scores[i : i + len(docs)]
        i += len(docs)
        order = np.lexsort((np.arange(len(docs)), -s))  # by score, then first-stage rank
        run[qid] = dict(zip((docs[j] for j in order), _strictly_decreasing(s[order]), strict=True))
    return run


def _strictly_decreasing(sorted_desc: np.ndarray) -> list[float]:
    # pytrec_eval compares scores as float32 (checked: 0.5 and 0.5 - 2**-27 tie there),
    # so the order must be strict after rounding to float32, not just in float64.
    out = sorted_desc.astype(np.float64).copy()
    neg_inf = np.float32(-np.inf)
    for j in range(1, len(out)):
        above = np.float32(out[j - 1])
        if np.float32(out[j]) >= above:
            out[j] = float(np.nextafter(above, neg_inf))
    return [float(x) for x in out]


def evaluate_reranker(
    score_fn: ScoreFn,
    data: BeirData,
    first_stage_run: Mapping[str, Mapping[str, float]],
    k: int = 100,
    out_dir: str | os.PathLike | None = None,
    *,
    first_stage_name: str = "BM25",
    reranker_name: str = "reranker",
    run_source: str | None = None,
    measures: Sequence[Any] = DEFAULT_MEASURES,
    batch_size: int = 256,
    show_progress: bool = False,
    info: Mapping[str, Any] | None = None,
) -> dict:
    """Rerank the first stage's top ``k`` with ``score_fn`` and score both runs side by side.

    Both rows are measured on the same candidates: the first-stage row is its top ``k``
    per query (by score, ties in the run's order), the set the reranker reorders, so
    Recall@k is the same in both and nDCG/MRR differ by the reranking alone. Metrics are
    :func:`evaluate_run`'s, averaged over every judged query of ``data``.

    Counted in ``skipped`` / ``warnings`` (never silently applied): the loading counters of
    ``data``; ``run_query_not_evaluated``, queries of the run that ``data`` does not
    evaluate (another split, another collection), dropped; ``query_without_candidates``,
    judged queries absent from the run or with an empty list (BM25: no term in common
    with the corpus), which score 0 in both rows.

    Args:
        score_fn: list of (query text, document text) -> as many scores, higher = more
            relevant (see :func:`rerank_run`).
        data: the collection.
        first_stage_run: query id -> {doc id: score} (:func:`bm25_first_stage`,
            :func:`read_trec_run`).
        k: candidates reranked per query (>= 1).
        out_dir: if given, ``first_stage.trec``, ``reranker.trec`` (TREC runs, the exact
            inputs of the metrics) and ``metrics.json`` (the returned dict) are written there.
        first_stage_name, reranker_name: row names in the table and in ``metrics``.
        run_source: where the first-stage run came from (a file), for messages.
        measures: ir-measures names, as :func:`evaluate_run` takes them.
        batch_size: pairs per score_fn call.
        info: extra JSON-able fields for the report (the model path, the command line).

    Returns:
        The report: ``metrics`` ({first_stage_name: {...}, reranker_name: {...}}),
        ``collection``, ``first_stage``, ``reranker``, ``skipped``, ``warnings``,
        ``files`` (absent without out_dir), ``pairs``, ``seconds``, and ``info``'s fields.

    Raises:
        BeirFormatError: no query of the run is judged in ``data`` (a run of another split
            or collection), none has a candidate, or a candidate is absent from the corpus
            (:func:`first_stage_candidates`); the message names ``run_source``.
        ValueError: k < 1, first_stage_name == reranker_name; bad scores from score_fn
            (:func:`rerank_run`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if first_stage_name == reranker_name:
        raise ValueError(f"first_stage_name and reranker_name must differ, both are {first_stage_name!r}")
    source = run_source or first_stage_name
    first, skipped, warnings = first_stage_candidates(data, first_stage_run, k, source=source)

    t0 = time.perf_counter()
    reranked = rerank_run(first, data, score_fn, k=None, batch_size=batch_size, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    pairs = sum(len(docs) for docs in first.values())

    metrics = {
        first_stage_name: evaluate_run(first, data.qrels, measures),
        reranker_name: evaluate_run(reranked, data.qrels, measures),
    }
    report: dict[str, Any] = {
        "metrics": metrics,
        "collection": {
            "source": data.source,
            "queries": len(data.queries),
            "documents": len(data.corpus),
            "judgements": sum(len(d) for d in data.qrels.values()),
        },
        "first_stage": {"name": first_stage_name, "source": source, "k": k},
        "reranker": {"name": reranker_name},
        "pairs": pairs,
        "seconds": {"rerank": round(seconds, 3)},
        "pairs_per_second": round(pairs / seconds, 1) if seconds > 0 else None,
        "skipped": skipped,
        "warnings": warnings,
        **(info or {}),
    }
    if out_dir is not None:
        out = Path(out_dir)
        files = {
            "first_stage_run": str(out / "first_stage.trec"),
            "reranker_run": str(out / "reranker.trec"),
            "metrics": str(out / "metrics.json"),
        }
        report["files"] = files
        write_trec_run(first, files["first_stage_run"], tag=_run_tag(first_stage_name))
        write_trec_run(reranked, files["reranker_run"], tag=_run_tag(reranker_name))
        atomic_write_text(files["metrics"], json.dumps(report, indent=2) + "\n")
    return report


def first_stage_candidates(
    data: BeirData, first_stage_run: Mapping[str, Mapping[str, float]], k: int, *, source: str = "first stage"
) -> tuple[Run, dict[str, int], list[str]]:
    """The top ``k`` of the run for every judged query of ``data``, checked; cheap, so a
    command can call it to fail on bad input before it loads a model.

    Returns:
        (run, skipped, warnings): query id -> {doc id: score} in the collection's query
        order (an empty dict for a query without candidates), then ``data``'s counters and
        warnings with ``run_query_not_evaluated`` and ``query_without_candidates`` added
        (see :func:`evaluate_reranker`).

    Raises:
        BeirFormatError: naming ``source``: no query of the run is judged in ``data``; no
            judged query has a candidate; a candidate absent from the corpus.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    skipped = dict(data.skipped)
    warnings = list(data.warnings)

    foreign = [q for q in first_stage_run if q not in data.queries]
    if first_stage_run and len(foreign) == len(first_stage_run):
        raise BeirFormatError(
            f"{source}: none of the run's {len(foreign)} queries is a judged query of {data.source or 'the data'} "
            f"(e.g. {', '.join(foreign[:3])}; collection queries e.g. {', '.join(list(data.queries)[:3])}); "
            "wrong split or collection?"
        )
    if foreign:
        skipped["run_query_not_evaluated"] = len(foreign)
        warnings.append(
            f"{source}: {len(foreign)} queries of the run are not judged queries of this split, ignored "
            f"(e.g. {', '.join(foreign[:3])})"
        )

    first: Run = {}
    empty: list[str] = []
    for qid in data.queries:  # the collection's order: the written runs do not depend on the run file's
        docs = first_stage_run.get(qid) or {}
        if not docs:
            empty.append(qid)
        ranked = sorted(docs, key=lambda d: -float(docs[d]))[:k]  # stable: ties keep the run's order
        first[qid] = {d: float(docs[d]) for d in ranked}
    if empty:
        skipped["query_without_candidates"] = len(empty)
        warnings.append(
            f"{source}: {len(empty)} of {len(data.queries)} judged queries have no first-stage candidates "
            f"(they score 0 in both rows; e.g. {', '.join(empty[:3])})"
        )
    if len(empty) == len(data.queries):
        raise BeirFormatError(f"{source}: no judged query has a first-stage candidate; nothing to rerank")
    absent = [f"{q}/{d}" for q, docs in first.items() for d in docs if d not in data.corpus]
    if absent:
        raise BeirFormatError(
            f"{source}: {len(absent)} candidates are absent from the corpus of {data.source or 'the data'} "
            f"(e.g. {', '.join(absent[:3])}); is the run from another collection?"
        )
    return first, skipped, warnings


def _run_tag(name: str) -> str:
    # The tag is one whitespace-free field of a TREC line.
    return "_".join(name.split()) or "run"
