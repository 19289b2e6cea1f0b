"""Held-out splits of one collection's queries, and training examples mined from one side.

This file owns two things, both deterministic by construction (no Python ``hash()``, no
dependence on the input order or the machine):

- the split: :func:`split_query_ids` divides a collection's query ids into a training
  side and a held-out side (``data.held_out``), and :func:`check_disjoint` checks two
  sides that came from two settings;
- the mining: :func:`mine_pairs` (stage 1, label-balanced binary pairs) and
  :func:`mine_groups` (stage 2, one positive + negatives) build Examples from the
  judgements of the given queries only, with negatives drawn from a BM25 run's top
  ``depth`` minus every document judged relevant for that query.

The run is passed in (``evaluation.first_stage.bm25_first_stage`` makes one): this is the
data layer, it imports nothing above it. Errors are :class:`~prorank_fast.errors.RecipeError`
for a split that cannot be made from the settings and :class:`~prorank_fast.errors.DataError`
for data that cannot be used; both name the source (the folder)."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping

from ..errors import DataError, RecipeError
from .beir import BeirData
from .records import Example

__all__ = ["check_disjoint", "mine_groups", "mine_pairs", "split_query_ids"]

# how many offending ids an error message lists
_SHOW = 5


def _show(ids: list[str]) -> str:
    text = ", ".join(repr(q) for q in ids[:_SHOW])
    return text + (f", ... ({len(ids)} in all)" if len(ids) > _SHOW else "")


def _rank_key(seed: int, qid: str) -> tuple[str, str]:
    return hashlib.sha256(f"{seed}:{qid}".encode()).hexdigest(), qid


def split_query_ids(
    query_ids: Iterable[str], held_out: float, seed: int, *, source: str
) -> tuple[list[str], list[str]]:
    """Split query ids into (train ids, held-out ids).

    The ids are ranked by ``sha256(f"{seed}:{qid}")`` (ties, impossible in practice, by id)
    and the first ``round(held_out * n)`` are held out: the same ids, the same seed give
    the same split on any machine and for any input order. Both lists keep the input order.

    Args:
        query_ids: the collection's query ids (no duplicates).
        held_out: the fraction held out, strictly between 0 and 1 (``data.held_out``).
        seed: the split's seed.
        source: where the ids came from (the folder), for error messages.

    Raises:
        RecipeError: ``held_out`` not in (0, 1); a split with no held-out or no training
            query; duplicate ids.
    """
    ids = list(query_ids)
    if (
        isinstance(held_out, bool)
        or not isinstance(held_out, int | float)
        or not math.isfinite(held_out)
        or not 0 < held_out < 1
    ):
        raise RecipeError(f"data.held_out: expected a fraction strictly between 0 and 1, got {held_out!r} ({source})")
    seen: set[str] = set()
    duplicates: list[str] = []
    for qid in ids:
        if qid in seen and qid not in duplicates:
            duplicates.append(qid)
        seen.add(qid)
    if duplicates:
        raise RecipeError(f"data.held_out: cannot split {source}: duplicate query ids {_show(duplicates)}")
    n = len(ids)
    k = round(held_out * n)
    if k == 0 or k == n:
        side = "no held-out queries" if k == 0 else "no training queries"
        raise RecipeError(
            f"data.held_out: {held_out:g} of the {n} queries of {source} leaves {side} "
            f"(round({held_out:g} * {n}) = {k}); choose a fraction that leaves at least one query on each side"
        )
    held = set(sorted(ids, key=lambda q: _rank_key(seed, q))[:k])
    return [q for q in ids if q not in held], [q for q in ids if q in held]


def check_disjoint(
    train_ids: Iterable[str], held_out_ids: Iterable[str], *, train_source: str, held_out_source: str
) -> None:
    """Check that no query is on both sides, for callers that read the two sides from two
    settings (a training folder and an evaluation folder).

    Raises:
        DataError: naming the first few query ids found on both sides (in held-out order).
    """
    train = set(train_ids)
    both = [q for q in dict.fromkeys(held_out_ids) if q in train]
    if both:
        raise DataError(
            f"{held_out_source}: {len(both)} held-out queries are also training queries in {train_source}: "
            f"{_show(both)}; a query must be on one side only",
            source=held_out_source,
            reason="held_out_overlap",
        )


def _check_sizes(**sizes: int) -> None:
    for name, (value, least) in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _query(data: BeirData, qid: str, source: str) -> str:
    if qid not in data.queries:
        raise DataError(f"{source}: query {qid!r} is not in the collection's queries", source=source, reason="bad_id")
    return data.queries[qid]


def _positives(data: BeirData, qid: str) -> dict[str, int]:
    """doc id -> relevance of the judged-relevant documents with text, sorted by doc id."""
    judged = data.qrels.get(qid, {})
    return {d: judged[d] for d in sorted(judged) if judged[d] > 0 and data.corpus.get(d)}


def _candidates(data: BeirData, qid: str, run: Mapping[str, Mapping[str, float]], depth: int, source: str) -> list[str]:
    """BM25's top ``depth`` for ``qid`` (rank order) minus every document judged relevant
    for it (judged non-relevant ones stay: they are good negatives) and empty documents."""
    if qid not in run:
        raise DataError(f"{source}: query {qid!r} has no entry in the BM25 run", source=source, reason="bad_id")
    relevant = {d for d, r in data.qrels.get(qid, {}).items() if r > 0}
    top = list(run[qid])[:depth]
    missing = [d for d in top if d not in data.corpus]
    if missing:
        raise DataError(
            f"{source}: the BM25 run for query {qid!r} ranks documents not in the corpus: {_show(missing)}",
            source=source,
            reason="bad_id",
        )
    return [d for d in top if d not in relevant and data.corpus[d]]


def _count(skipped: dict[str, int], reason: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1


def _minable(data: BeirData, query_ids: Iterable[str], run, depth: int, source: str, skipped: dict[str, int],
             positives_depth: int | None = None):  # fmt: skip
    """(qid, query text, positives, BM25 candidates) for each query that has both; the others are
    counted in `skipped` (no_positive; no_positive_in_depth: judged-relevant documents, none within
    the run's top `positives_depth`; no_bm25_negative)."""
    for qid in query_ids:
        query = _query(data, qid, source)
        positives = _positives(data, qid)
        if not positives:
            _count(skipped, "no_positive")
            continue
        candidates = _candidates(data, qid, run, depth, source)
        if positives_depth is not None:
            top = set(list(run[qid])[:positives_depth])
            positives = {d: r for d, r in positives.items() if d in top}
            if not positives:
                _count(skipped, "no_positive_in_depth")
                continue
        if not candidates:
            _count(skipped, "no_bm25_negative")
            continue
        yield qid, query, positives, candidates


def mine_groups(
    data: BeirData,
    query_ids: Iterable[str],
    run: Mapping[str, Mapping[str, float]],
    *,
    group_size: int,
    depth: int,
    seed: int,
    source: str,
    positives_depth: int | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Stage-2 groups from the judgements of ``query_ids`` only.

    For each query (in ``query_ids`` order) and each judged-relevant document (relevance
    > 0, in doc-id order), one Example: ``docs = [positive] + group_size - 1 negatives``,
    ``labels = [relevance, 0, ...]``. Negatives come from the top ``depth`` of ``run[qid]``
    minus every document judged relevant for the query, sampled without replacement with
    ``random.Random(f"{seed}:{qid}:{positive}")`` (kept in rank order); when there are
    fewer than ``group_size - 1``, all of them plus draws with replacement.

    Args:
        data: the collection (texts come from ``data.corpus`` and ``data.queries``).
        query_ids: the queries to mine (e.g. the training side of :func:`split_query_ids`).
        run: query id -> {doc id: score} in rank order (``bm25_first_stage``).
        group_size: documents per group (>= 2).
        depth: how deep in the run negatives are taken from (>= 1).
        seed: the sampling seed.
        source: the collection's folder, for Example.source and errors.
        positives_depth: only judged-relevant documents within the top this many of
            ``run[qid]`` are positives (None: every one). Negatives always come from the run's
            top, so positives from anywhere teach that matching the query's words marks a
            negative; positives from the same first stage do not.

    Returns:
        (examples, skipped): ``skipped["no_bm25_negative"]`` counts queries skipped for an
        empty candidate list; ``skipped["no_positive"]`` queries without a judged-relevant
        document with text, ``skipped["no_positive_in_depth"]`` queries with none within
        ``positives_depth`` (they make no group). A key is present only when counted.

    Raises:
        DataError: a query id not in ``data.queries`` or not in ``run``; a run ranking
            documents absent from the corpus.
        ValueError: ``group_size`` < 2 or ``depth`` < 1.
    """
    _check_sizes(group_size=(group_size, 2), depth=(depth, 1))
    if positives_depth is not None:
        _check_sizes(positives_depth=(positives_depth, 1))
    examples: list[Example] = []
    skipped: dict[str, int] = {}
    for qid, query, positives, candidates in _minable(data, query_ids, run, depth, source, skipped, positives_depth):
        need = group_size - 1
        for pos, relevance in positives.items():
            rng = random.Random(f"{seed}:{qid}:{pos}")
            if len(candidates) >= need:
                picked = sorted(rng.sample(range(len(candidates)), need))
                negatives = [candidates[i] for i in picked]
            else:
                negatives = candidates + [rng.choice(candidates) for _ in range(need - len(candidates))]
            examples.append(
                Example(
                    query=query,
                    docs=[data.corpus[pos]] + [data.corpus[d] for d in negatives],
                    labels=[float(relevance)] + [0.0] * need,
                    teacher_scores=None,
                    instruction=None,
                    source=f"{source}: query {qid}",
                )
            )
    return examples, skipped


def mine_pairs(
    data: BeirData,
    query_ids: Iterable[str],
    run: Mapping[str, Mapping[str, float]],
    *,
    depth: int,
    seed: int,
    source: str,
    max_positives_per_query: int | None = None,
    positives_depth: int | None = None,
) -> tuple[list[Example], dict[str, int]]:
    """Stage-1 binary pairs, label-balanced per query, from the judgements of ``query_ids``.

    One Example per query (in ``query_ids`` order): its judged-relevant documents (doc-id
    order; when more than ``max_positives_per_query``, that many chosen by
    ``random.Random(f"{seed}:{qid}")``) with label 1, then as many negatives with label 0,
    sampled by the same generator from the top ``depth`` of ``run[qid]`` minus every
    document judged relevant for the query (kept in rank order). With fewer candidates
    than positives, all candidates are used and positives are dropped (seeded) to match.

    Args:
        data, query_ids, run, depth, seed, source, positives_depth: as in :func:`mine_groups`.
        max_positives_per_query: cap on positives per query (>= 1), None for no cap.

    Returns:
        (examples, skipped): as :func:`mine_groups`.

    Raises:
        DataError: as :func:`mine_groups`.
        ValueError: ``depth`` < 1 or ``max_positives_per_query`` < 1.
    """
    _check_sizes(depth=(depth, 1))
    if max_positives_per_query is not None:
        _check_sizes(max_positives_per_query=(max_positives_per_query, 1))
    if positives_depth is not None:
        _check_sizes(positives_depth=(positives_depth, 1))
    examples: list[Example] = []
    skipped: dict[str, int] = {}
    for qid, query, positives, candidates in _minable(data, query_ids, run, depth, source, skipped, positives_depth):
        positives = list(positives)
        rng = random.Random(f"{seed}:{qid}")
        keep = min(len(positives), len(candidates), max_positives_per_query or len(positives))
        if keep < len(positives):
            positives = sorted(rng.sample(positives, keep))
        picked = sorted(rng.sample(range(len(candidates)), keep))
        negatives = [candidates[i] for i in picked]
        examples.append(
            Example(
                query=query,
                docs=[data.corpus[d] for d in positives + negatives],
                labels=[1.0] * keep + [0.0] * keep,
                teacher_scores=None,
                instruction=None,
                source=f"{source}: query {qid}",
            )
        )
    return examples, skipped
